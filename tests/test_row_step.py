"""speculant.row_step: the batched step's device half as static functions (what CUDA captures as one
graph per step) gives the eager step's tokens, rows joining, leaving, catching up and with mixed
sampling params; joining requests prefilled together fill the caches as one at a time; the captured
step dispatches no model op outside its graph. The CUDA tests (skipped without a GPU) replay the
graphs themselves."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_batching import run_batch

from speculant.batching import BatchEngine, BatchRequest
from speculant.bench.op_counter import counting_ops
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.models.feature_draft import DraftConfig, build_draft, init_random
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.row_step import CAPTURED_PARAMS, MIN_KEYS
from speculant.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
PLAIN = SamplingParams()
TOP_P = SamplingParams(top_p=0.8)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [3, 3, 3, 1, 2, 3, 3, 1, 2], [5], [40, 41, 42, 40, 41], [7, 7, 8, 9]]
KINDS = ["model", "feature", "ngram", "none"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def weights():
    return random_weights(tiny_config("llama"), seed=0, scale=4.0), random_weights(tiny_config("llama", num_layers=1),
                                                                                     seed=1, scale=4.0)


def engine(kind: str, weights, graphs: bool, device: str = "cpu", max_batch: int = 4, gamma: int | str = 3,
           max_seq_len: int = 128, compile: bool | None = None) -> BatchEngine:
    target_weights, draft_weights = (w if device == "cpu" else copy.deepcopy(w).to(device) for w in weights)
    target = LeanModel(target_weights, max_seq_len=max_seq_len)
    if kind == "model":
        factory = ModelDrafter(LeanModel(draft_weights, max_seq_len=max_seq_len)).rows
    elif kind == "feature":
        cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=target.vocab_size, inputs="features")
        draft = build_draft(cfg, target.weights, torch.arange(target.vocab_size, device=device),
                            max_seq_len=max_seq_len)
        init_random(draft.draft_weights, 1, scale=1.0)
        factory = FeatureDrafter(draft, target).rows
    elif kind == "ngram":
        factory = NgramDrafter().rows
    else:
        factory, gamma = None, 0
    return BatchEngine(target, factory, gamma=gamma, max_batch=max_batch, graphs=graphs, compile=compile)



def mixed_requests(max_new_tokens: int = 14) -> list[BatchRequest]:
    params = [GREEDY, PLAIN, TOP_P]
    return [BatchRequest(p, params[i % 3], max_new_tokens + 3 * i, seed=10 + i) for i, p in enumerate(PROMPTS)]


JOINS = {0: [0, 1, 2], 2: [3], 3: [4, 5]}


@pytest.mark.parametrize("kind", KINDS)
def test_the_static_step_gives_the_eager_steps_tokens_rows_joining_leaving_and_cancelled(kind, weights):
    """Greedy, plain and top-p rows side by side (one graph per set of params), six requests through
    four rows (two wait), one cancelled: the padded static functions give the eager step's tokens."""
    outs = [run_batch(engine(kind, weights, graphs), mixed_requests(), JOINS, cancels={4: [1]}) for graphs in (False, True)]
    assert outs[0] == outs[1]
    assert outs[0][1][1] == "cancelled" and all(outs[0][i][1] == "length" for i in (0, 2, 3, 4, 5))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "feature"])
def test_the_static_step_over_compiled_row_forwards_gives_the_eager_steps_tokens(kind, weights):
    """compile=True (`speculant serve --compile`): the target's and the draft's row forwards
    through torch.compile (LeanModel.compile_layers), float32, greedy and sampled rows: the eager
    step's tokens, with no fallback to eager forwards."""
    eager = run_batch(engine(kind, weights, False), mixed_requests(), JOINS)
    run = engine(kind, weights, True, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compiler failure would fall back with a warning
        compiled = run_batch(run, mixed_requests(), JOINS)
    assert run.row_step.compiled and "_layer" in run.target.__dict__
    assert "_layer" in run.drafter.model.__dict__
    assert compiled == eager


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_rows_that_drafted_nothing_for_a_while_catch_up_before_the_window(kind, weights):
    """Plain steps (Γ 0) leave a model draft's rows behind by more than the static step's window (the
    longest Γ + 1): they feed the difference through the prefill first, and give the eager tokens."""
    plain_steps = {step: 0 for step in range(1, 8)}
    outs, static = [], None
    for graphs in (False, True):
        run = engine(kind, weights, graphs)
        outs.append(run_batch(run, mixed_requests(24), JOINS, gammas=plain_steps))
        static = run if graphs else static
    assert outs[0] == outs[1]
    catch_ups = [key for key in static.row_step.graphs if key[0] == "prefill" and not key[4]]  # no target part
    assert catch_ups, list(static.row_step.graphs)


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_static_steps_read_keys_up_to_a_bucket_past_their_rows_ends(kind, weights):
    """A static step reads each row's keys up to a power of two past the furthest row's end (MIN_KEYS
    at least), not over the whole cache: rows that grow past 256 positions move from the 256-key
    functions to the 512-key ones, and every token is the eager step's (which reads exactly to the end)."""
    requests = [BatchRequest([1 + (5 * i + j) % 60 for j in range(236 + 4 * i)], (GREEDY, PLAIN)[i % 2], 24, seed=i)
                for i in range(3)]
    outs, static = [], None
    for graphs in (False, True):
        run = engine(kind, weights, graphs, max_seq_len=1024)
        outs.append(run_batch(run, requests))
        static = run if graphs else static
    assert outs[0] == outs[1] and all(len(tokens) == 24 for tokens, _ in outs[0].values())
    assert {key[-1] for key in static.row_step.graphs if key[0] == "step"} == {MIN_KEYS, 2 * MIN_KEYS}


@pytest.mark.parametrize("graphs", [False, True])
def test_a_step_of_more_distinct_params_than_a_graph_takes_runs_eagerly_with_the_same_tokens(graphs, weights):
    requests = [BatchRequest(PROMPTS[i % len(PROMPTS)], SamplingParams(temperature=0.5 + 0.1 * i), 10, seed=i)
                for i in range(CAPTURED_PARAMS + 1)]
    run = engine("feature", weights, graphs, max_batch=8)
    out = run_batch(run, requests, {0: list(range(len(requests)))})
    assert out == run_batch(engine("feature", weights, False, max_batch=8), requests, {0: list(range(len(requests)))})
    assert all(len(key[3]) <= CAPTURED_PARAMS for key in run.row_step.graphs if key[0] == "step")


def test_logprobs_from_the_static_step_are_the_eager_steps(weights):
    """A request asking for log-probabilities beside one that does not: the static step then keeps the
    target's logits as an output (a graph of its own) and gives the eager values."""
    requests = [BatchRequest(PROMPTS[2], PLAIN, 12, seed=3, logprobs=2), BatchRequest(PROMPTS[0], PLAIN, 12, seed=4)]
    outs = []
    for graphs in (False, True):
        run = engine("model", weights, graphs)
        ids = [run.add(r) for r in requests]
        got = {i: ([], []) for i in ids}
        while run.num_running:
            for update in run.step():
                got[update.request_id][0].extend(update.tokens)
                got[update.request_id][1].extend(update.logprobs or [])
        outs.append(got)
        if graphs:
            assert {key[4] for key in run.row_step.graphs if key[0] == "step"} == {True}
    assert [tokens for tokens, _ in outs[0].values()] == [tokens for tokens, _ in outs[1].values()]
    eager, static = outs[0][0][1], outs[1][0][1]  # request 0's (logprob, top-2) per token
    assert len(eager) == len(static) == 12
    for (value, top), (value_static, top_static) in zip(eager, static):
        assert value == pytest.approx(value_static, abs=1e-5)
        assert [t for t, _ in top] == [t for t, _ in top_static]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("kind", ["model", "feature"])
def test_requests_prefilled_together_fill_the_caches_as_one_at_a_time(kind, graphs, weights):
    """Three prompts joining in one step (one batched forward, padded in static mode) leave the target's
    and the draft's cache rows (keys, values, features) as each prompt joining alone does."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    together = engine(kind, weights, graphs)
    together.row_step.prefill(prompts)
    for b, prompt in enumerate(prompts):
        alone = engine(kind, weights, graphs)
        alone.row_step.prefill([prompt])
        for ours, theirs in ((together.cache, alone.cache), (together.drafter.cache, alone.drafter.cache)):
            n = len(prompt) - 1
            torch.testing.assert_close(ours.k[:, b, :, :n], theirs.k[:, 0, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.v[:, b, :, :n], theirs.v[:, 0, :, :n], atol=1e-5, rtol=1e-5)
            if ours.features is not None:
                torch.testing.assert_close(ours.features[b, :n], theirs.features[0, :n], atol=1e-5, rtol=1e-5)
    # and the target's rows are the single-row forward's cache
    single = LeanModel(random_weights(tiny_config("llama"), seed=0, scale=4.0), max_seq_len=128)
    single.forward(torch.tensor(prompts[1][:-1]), 0)
    torch.testing.assert_close(together.cache.k[:, 1, :, :len(prompts[1]) - 1],
                               single.k_cache[:, :len(prompts[1]) - 1].transpose(1, 2),
                               atol=1e-5, rtol=1e-5)


def ops_outside_the_graph(run: BatchEngine, steps: int) -> list[int]:
    """Ops per step outside the bodies CUDA captures, after a first step (joins, first captures)."""
    per_step = []
    with counting_ops() as counter:
        for _ in range(steps):
            before = sum(counter.outside.values())
            run.step()
            per_step.append(sum(counter.outside.values()) - before)
    return per_step


def test_a_static_step_dispatches_no_model_op_outside_its_graph(weights):
    """The same rows through a target of 3 layers and of 6: the ops a static step dispatches outside
    its graph (the per-row random draws, the input buffer, the one read) do not grow with the model,
    while the eager step's do."""
    counts = {}
    for layers in (3, 6):
        big = (random_weights(tiny_config("llama", num_layers=layers), seed=0, scale=4.0), weights[1])
        for graphs in (False, True):
            run = engine("model", big, graphs, max_batch=4)
            for p in PROMPTS[:4]:
                run.add(BatchRequest(p, PLAIN, 40, seed=1))
            run.step()
            counts[layers, graphs] = ops_outside_the_graph(run, 4)
    assert counts[3, True] == counts[6, True], counts
    assert min(counts[6, False]) > max(counts[3, False]) > 5 * max(counts[3, True]), counts


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_a_greedy_step_draws_without_scanning_the_vocabulary(kind, weights):
    """A step whose rows are all greedy draws its draft and next tokens by argmax: no cumulative sum
    over the vocabulary runs inside its graph; a step with a sampled row runs one per draw."""
    scans = {}
    for params in (GREEDY, PLAIN):
        run = engine(kind, weights, True, max_batch=4)
        for p in PROMPTS[:3]:
            run.add(BatchRequest(p, params, 20, seed=1))
        run.step()
        with counting_ops() as counter:
            run.step(3)
        scans[params.greedy] = counter.inside[torch.ops.aten.cumsum.default]
    assert scans == {True: 0, False: 3 + 1}, scans


# ---- CUDA: the graphs themselves -------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("kind", KINDS)
def test_the_captured_step_gives_the_eager_steps_tokens_on_cuda(kind, weights):
    """float32 on the GPU: each step replayed from ONE captured graph (and each join from a prefill
    graph) gives the eager step's tokens, greedy and seeded sampling, joins, leaves, a cancel."""
    outs = []
    for graphs in (False, True):
        run = engine(kind, weights, graphs, device="cuda")
        outs.append(run_batch(run, mixed_requests(), JOINS, cancels={4: [1]}))
        if graphs:
            assert run.row_step.graphs and all(g.graph is not None for g in run.row_step.graphs.values())
    assert outs[0] == outs[1]


@CUDA
@pytest.mark.parametrize("kind", ["model", "feature"])
def test_the_captured_catch_up_and_auto_gamma_give_the_eager_tokens_on_cuda(kind, weights):
    """Plain steps, then drafting again (the catch-up prefill graph), and `auto` over the nominal table."""
    plain_steps = {step: 0 for step in range(1, 8)}
    for gamma, gammas in ((3, plain_steps), ("auto", None)):
        outs = [run_batch(engine(kind, weights, graphs, device="cuda", gamma=gamma), mixed_requests(24), JOINS,
                      gammas=gammas) for graphs in (False, True)]
        assert outs[0] == outs[1], gamma


def test_one_draw_of_n_uniforms_on_a_cpu_generator_is_the_draws_of_its_parts_in_turn():
    """drafters.base.row_uniforms draws a row's draft and verification uniforms in one call: the values
    the single-request engine's two calls give (γ draft, then γ' + 1), for every split up to γ 32."""
    for total in range(1, 66):
        for first in range(total + 1):
            one = torch.rand(total, generator=torch.Generator().manual_seed(total))
            generator = torch.Generator().manual_seed(total)
            parts = torch.cat([torch.rand(first, generator=generator), torch.rand(total - first, generator=generator)])
            assert torch.equal(one, parts), (total, first)


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_a_warm_up_leaves_the_engine_as_it_was_the_tokens_after_it_are_the_tokens_without(kind, weights):
    """warm_up makes every step and prefill function on zeros (rows of length 0 write only scratch
    slots): the requests after it get the tokens they get from an engine never warmed up."""
    cold, warm = engine(kind, weights, True), engine(kind, weights, True)
    made = warm.warm_up(params=[GREEDY, PLAIN, TOP_P], max_prompt=16)
    assert made.functions == len(warm.row_step.graphs) > 0 and made.captured == 0  # the CPU captures nothing
    assert run_batch(warm, mixed_requests(), JOINS) == run_batch(cold, mixed_requests(), JOINS)


def test_after_a_warm_up_no_batch_gamma_or_prompt_length_compiles_or_makes_a_function(weights, monkeypatch):
    """The row forwards compile a bounded number of times (per kind of call: target or draft, with or
    without logits, one row or a feed of one token), all inside warm_up: batches of 1..7 rows, every
    Γ, prompts of 1..40 tokens and a row that fills the 512-slot cache (its steps read 256 keys, then
    512) afterwards compile nothing and make no new step or prefill function. Counted with dynamo's own counter, through its cheapest backend (the frames it compiles
    do not depend on the backend)."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{"backend": "eager", **kw}))
    torch._dynamo.reset()
    counters.clear()
    run = engine("model", weights, True, max_batch=8, gamma="auto", max_seq_len=512, compile=True)
    made = run.warm_up(params=[PLAIN])
    compiles, functions = counters["frames"]["ok"], len(run.row_step.graphs)
    assert made.functions == functions and 0 < compiles <= 16
    for rows in (1, 2, 3, 5, 7):
        requests = [BatchRequest([1 + (7 * i + j) % 60 for j in range(1 + 13 * i % 40)], PLAIN, 5 + i % 4, seed=i)
                    for i in range(rows)]
        run_batch(run, requests, gammas={1: 0, 2: 1, 3: 2, 4: 3})
    long = [BatchRequest([1 + j % 60 for j in range(250)], PLAIN, 300, seed=9), BatchRequest([5, 6], PLAIN, 8, seed=8)]
    tokens, finish = run_batch(run, long)[0]
    assert finish == "context" and 250 + len(tokens) == 512
    assert (counters["frames"]["ok"], len(run.row_step.graphs)) == (compiles, functions)
