"""The batched engine (speculant.batching): rows equal single requests, the exact law with batch > 1
(and a neighbour-mixing control it must catch), joins / leaves / cancels, bad requests, γ under load
(LoadGamma over a table of step costs; its calibration and reproducibility: test_batch_calibrate.py),
and a lone request's solo runs. Long because every part is pinned to the same tiny models, prompts
and exact-law helpers, defined once here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speculant.acceptance import verify, verify_rows
from speculant.adaptive import BatchStepCosts, batch_buckets
from speculant.batching import BatchEngine, BatchRequest, LoadGamma, batch_bucket
from speculant.drafters.base import RowLaws
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.models.base import ContextOverflowError
from speculant.models.feature_draft import DraftConfig, build_draft, init_random
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.sampling import SamplingParams, sample_from

GREEDY = SamplingParams(temperature=0)
PLAIN = SamplingParams()
TOP_P = SamplingParams(top_p=0.8)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [3, 3, 3, 1, 2, 3, 3, 1, 2], [5], [40, 41, 42, 40, 41]]


@pytest.fixture(scope="module")
def llama():
    return random_weights(tiny_config("llama"), seed=0, scale=4.0)


@pytest.fixture(scope="module")
def draft_weights():
    return random_weights(tiny_config("llama", num_layers=1), seed=1, scale=4.0)


def feature_draft(target: LeanModel, seed: int = 1):
    cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=target.vocab_size, inputs="features")
    draft = build_draft(cfg, target.weights, torch.arange(target.vocab_size), max_seq_len=target.max_seq_len)
    init_random(draft.draft_weights, seed, scale=1.0)
    return draft


def pair(kind: str, weights, draft_weights, max_seq_len: int = 128):
    """(target, single-request drafter, its row factory) for a drafter kind."""
    target = LeanModel(weights, max_seq_len=max_seq_len)
    if kind == "ngram":
        drafter = NgramDrafter()
    elif kind == "model":
        drafter = ModelDrafter(LeanModel(draft_weights, max_seq_len=max_seq_len))
    else:
        drafter = FeatureDrafter(feature_draft(target), target)
    return target, drafter, drafter.rows


def run_batch(engine: BatchEngine, requests, joins=None, cancels=None, gammas=None) -> dict:
    """Drive the engine until idle; joins {step: [request index]} adds later, cancels {step: [request
    index]}, gammas {step: Γ for that step}. Returns {request index: (tokens, finish reason)}."""
    joins = joins or {0: list(range(len(requests)))}
    cancels, gammas = cancels or {}, gammas or {}
    ids, out, step = {}, {}, 0
    while step <= max(joins) or engine.num_running:
        for i in joins.get(step, []):
            ids[engine.add(requests[i])] = i
        for i in cancels.get(step, []):
            engine.cancel(next(r for r, j in ids.items() if j == i))
        for update in engine.step(gammas.get(step)):
            tokens, _ = out.get(ids[update.request_id], ([], None))
            out[ids[update.request_id]] = (tokens + update.tokens, update.finished)
        step += 1
    return out


def single(kind, weights, draft_weights, prompt, params, seed, gamma=3, max_new_tokens=20, max_seq_len=128):
    target, drafter, _ = pair(kind, weights, draft_weights, max_seq_len)
    steps = list(generate(target, drafter, prompt, gamma=gamma, params=params, max_new_tokens=max_new_tokens,
                          generator=torch.Generator().manual_seed(seed)))
    return [t for s in steps for t in s.tokens], steps[-1].stats.finish_reason


# ================================================================ the batched forward and verify


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_forward_rows_equals_the_single_row_forward_row_by_row(arch):
    """Ragged rows (prefill, then a step of different lengths per row) give each row's own logits."""
    weights = random_weights(tiny_config(arch, tie_word_embeddings=arch == "llama"), seed=0, scale=4.0)
    model = LeanModel(weights, max_seq_len=64)
    cache = model.new_row_cache(4)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 64, (n,), generator=g) for n in (10, 4, 7)]
    more = torch.randint(0, 64, (3, 3), generator=g)
    tokens = torch.zeros(3, 10, dtype=torch.int64)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = s
    first, _ = model.forward_rows(cache, tokens, [0, 0, 0], [10, 4, 7])
    second, _ = model.forward_rows(cache, more, [10, 4, 7], [3, 1, 2])
    for b, (s, n) in enumerate(zip(seqs, [3, 1, 2])):
        model.truncate(0)
        reference = model.forward(torch.cat([s, more[b, :n]]), 0)
        torch.testing.assert_close(first[b, :len(s)], reference[:len(s)], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(second[b, :n], reference[len(s):], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled", "point-masses"])
def test_verify_rows_equals_acceptance_verify_row_by_row(deterministic):
    """Random p, q (with zeros, p == q rows), every draft count 0..W: the same accepted count and next
    token as acceptance.verify on each row alone, for the same uniforms."""
    g = torch.Generator().manual_seed(0)
    rows, width, vocab = 64, 4, 6
    for trial in range(20):
        support = torch.rand(rows, width + 1, vocab, generator=g) > 0.3
        target = torch.rand(rows, width + 1, vocab, generator=g) * support
        target[:, :, 0] += 1e-3
        target = target / target.sum(-1, keepdim=True)
        draft = torch.rand(rows, width, vocab, generator=g) * (torch.rand(rows, width, vocab, generator=g) > 0.3)
        draft[:, :, 1] += 1e-3
        draft = draft / draft.sum(-1, keepdim=True)
        draft[: rows // 8] = target[: rows // 8, :width]  # p == q: the residual is empty
        tokens = torch.multinomial(draft.view(-1, vocab), 1, generator=g).view(rows, width)
        uniforms = torch.rand(rows, width + 1, generator=g)
        counts = torch.randint(0, width + 1, (rows,), generator=g)
        sample = uniforms[torch.arange(rows), counts]
        verdict = verify_rows(tokens, None if deterministic else draft, target, uniforms[:, :width], sample, counts)
        for b in range(rows):
            n = int(counts[b])
            one = verify(tokens[b, :n], None if deterministic else draft[b, :n], target[b, :n + 1],
                         uniforms[b, :n], uniforms[b, n])
            assert int(verdict.num_accepted[b]) == int(one.num_accepted), (trial, b)
            assert int(verdict.next_token[b]) == int(one.next_token), (trial, b)


@pytest.mark.parametrize("deterministic", [False, True], ids=["greedy-draft", "point-masses"])
def test_greedy_verify_rows_draws_the_argmax_as_sample_from_would(deterministic):
    """Greedy rows (every law a point mass: logits_to_probs at temperature 0, ties included): verify_rows
    with greedy=True (an argmax, no scan) gives the accepted counts and tokens of greedy=False, for the
    same uniforms, every draft count 0..W; so does RowLaws.draw against sample_from."""
    g = torch.Generator().manual_seed(1)
    rows, width, vocab = 64, 4, 6
    greedy = SamplingParams(temperature=0)
    laws = RowLaws((greedy,), [0] * rows)
    assert laws.greedy and not RowLaws((greedy, SamplingParams()), [0] * rows).greedy
    for _ in range(20):
        target = laws(torch.randint(0, 3, (rows, width + 1, vocab), generator=g).float())  # ties: first max
        draft = laws(torch.randint(0, 3, (rows, width, vocab), generator=g).float())
        draft[: rows // 4] = target[: rows // 4, :width]  # drafts the target keeps
        tokens = draft.argmax(-1)
        uniforms = torch.rand(rows, width + 1, generator=g)
        counts = torch.randint(0, width + 1, (rows,), generator=g)
        sample = uniforms[torch.arange(rows), counts]
        args = (tokens, None if deterministic else draft, target, uniforms[:, :width], sample, counts)
        scanned, argmax = verify_rows(*args), verify_rows(*args, greedy=True)
        assert torch.equal(scanned.num_accepted, argmax.num_accepted)
        assert torch.equal(scanned.next_token, argmax.next_token)
        assert torch.equal(laws.draw(target[:, 0], uniforms[:, 0]), sample_from(target[:, 0], uniforms[:, 0]))


# ================================================================ rows are single requests


@pytest.mark.parametrize("kind", ["model", "ngram", "feature"])
@pytest.mark.parametrize("params", [GREEDY, PLAIN, TOP_P], ids=["greedy", "plain", "top_p"])
def test_batched_rows_equal_speculant_engine_generate_for_the_same_seed(kind, params, llama, draft_weights):
    """On the CPU each row draws what generate draws (same generator, same order), so every request
    gives generate's tokens, with five requests in one batch."""
    target, _, factory = pair(kind, llama, draft_weights)
    engine = BatchEngine(target, factory, gamma=3, max_batch=8)
    requests = [BatchRequest(p, params, 20, seed=100 + i) for i, p in enumerate(PROMPTS)]
    out = run_batch(engine, requests)
    for i, prompt in enumerate(PROMPTS):
        assert out[i] == single(kind, llama, draft_weights, prompt, params, 100 + i), i


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_a_request_gives_the_same_tokens_alone_and_among_others_joining_and_leaving(kind, llama, draft_weights):
    """Request 0 alone, then with neighbours that join mid-way, finish early, get cancelled, and wait
    for a row (max_batch 3): the same tokens, greedy and sampled with a seed, mixed params per row."""
    for params in (GREEDY, PLAIN):
        others = [BatchRequest(p, [PLAIN, TOP_P, GREEDY][i % 3], 5 + 7 * i, seed=i) for i, p in enumerate(PROMPTS)]
        requests = [BatchRequest(PROMPTS[0], params, 30, seed=7)] + others
        target, _, factory = pair(kind, llama, draft_weights)
        alone = run_batch(BatchEngine(target, factory, gamma=3, max_batch=3), requests[:1])
        target, _, factory = pair(kind, llama, draft_weights)
        batched = run_batch(BatchEngine(target, factory, gamma=3, max_batch=3), requests,
                            joins={0: [0, 1], 2: [2, 3], 4: [4], 6: [5]}, cancels={3: [2]})
        assert batched[0] == alone[0]
        assert batched[2][1] == "cancelled" and batched[1][1] == "length"
        assert [len(batched[i][0]) for i in (1, 3, 4, 5)] == [5, 19, 26, 33]


def test_a_full_context_ends_a_row_with_reason_context_as_generate_does(llama, draft_weights):
    requests = [BatchRequest(p, PLAIN, 100, seed=i) for i, p in enumerate(PROMPTS[:3])]
    target, _, factory = pair("model", llama, draft_weights, max_seq_len=24)
    out = run_batch(BatchEngine(target, factory, gamma=4, max_batch=4), requests)
    for i, request in enumerate(requests):
        tokens, reason = single("model", llama, draft_weights, request.prompt_ids, PLAIN, i, gamma=4,
                                max_new_tokens=100, max_seq_len=24)
        assert out[i] == (tokens, "context") and reason == "context"
        assert len(request.prompt_ids) + len(tokens) == 24


def test_a_stop_token_inside_an_accepted_draft_ends_the_row_there(llama):
    """The drafter is the target itself (always right): the stop token sits inside an accepted draft."""
    target = LeanModel(llama, max_seq_len=128)
    plain = run_batch(BatchEngine(target, None, gamma=0), [BatchRequest(PROMPTS[0], GREEDY, 20)])[0][0]
    stop = plain[6]
    request = BatchRequest(PROMPTS[0], GREEDY, 20, stop_ids=(stop,))
    right = ModelDrafter(LeanModel(llama, max_seq_len=128)).rows
    out = run_batch(BatchEngine(LeanModel(llama, max_seq_len=128), right, gamma=4), [request, request])
    assert out[0] == out[1] == (plain[: plain.index(stop) + 1], "stop")


def test_plain_batching_is_gamma_zero_and_equals_greedy_speculation(llama, draft_weights):
    requests = [BatchRequest(p, GREEDY, 15) for p in PROMPTS]
    target, _, factory = pair("model", llama, draft_weights)
    plain = run_batch(BatchEngine(LeanModel(llama, max_seq_len=128), factory, gamma=0), requests)
    speculative = run_batch(BatchEngine(target, factory, gamma=3), requests)
    assert plain == speculative


def test_logprobs_are_the_targets_log_softmax_at_each_emitted_token(llama):
    target = LeanModel(llama, max_seq_len=128)
    engine = BatchEngine(target, NgramDrafter().rows, gamma=3)
    engine.add(BatchRequest(PROMPTS[2], PLAIN, 8, seed=3, logprobs=2))
    engine.add(BatchRequest(PROMPTS[0], PLAIN, 8, seed=4))
    tokens, logprobs = [], []
    while engine.num_running:
        for update in engine.step():
            if update.request_id == 0:
                tokens += update.tokens
                logprobs += update.logprobs
            else:
                assert update.logprobs is None
    reference = torch.log_softmax(LeanModel(llama, max_seq_len=128).forward(torch.tensor(PROMPTS[2] + tokens), 0), -1)
    for j, (token, (value, top)) in enumerate(zip(tokens, logprobs)):
        row = reference[len(PROMPTS[2]) - 1 + j]
        assert value == pytest.approx(float(row[token]), abs=1e-4)
        assert [t for t, _ in top] == row.topk(2).indices.tolist()


# ================================================================ the exact law with batch > 1

VOCAB = 6
LAW_PROMPT = [0, 3, 1, 4, 2, 5, 0, 1]
LAW_RUNS = 1000


@pytest.fixture(scope="module")
def law_pair():
    """A 6-token tiny target and a feature draft over it (the default drafter's kind)."""
    weights = random_weights(tiny_config(vocab_size=VOCAB, num_layers=2), seed=3, scale=2.0)
    target = LeanModel(weights, max_seq_len=32)
    return target, feature_draft(target, seed=4)


def exact_law(target: LeanModel, params: SamplingParams, tokens: int, gof) -> np.ndarray:
    """P(t1..t_tokens | LAW_PROMPT) under the transformed target: every prefix through the single-row
    forward, the transform by the independent float64 reference: [V]^tokens."""
    law, prefixes = np.ones(1), [[]]
    for _ in range(tokens):
        logits = np.stack([target.forward(torch.tensor(LAW_PROMPT + p), 0)[-1].double().numpy() for p in prefixes])
        step = gof.transform(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             min_p=params.min_p)
        law = (law[:, None] * step).reshape(-1)
        prefixes = [p + [t] for p in prefixes for t in range(VOCAB)]
    return law.reshape([VOCAB] * tokens)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_the_batched_engine_follows_the_exact_target_law(graphs, law_pair, gof):
    """1000 requests per params group, two groups (plain, top-p) interleaved in one continuous batch
    of 16 rows (requests join as others leave), γ 2, 3 tokens each: chi-square of (t1, t2, t3), 216
    cells, against the exact law; Bonferroni over the two groups. Each request has its own seed. The
    eager step and the static one (what CUDA captures: rows padded, one function per params set)."""
    target, draft = law_pair
    engine = BatchEngine(target, FeatureDrafter(draft, target).rows, gamma=2, max_batch=16, graphs=graphs)
    groups = [PLAIN, TOP_P]
    ids = {engine.add(BatchRequest(LAW_PROMPT, groups[i % 2], 3, seed=i)): i for i in range(2 * LAW_RUNS)}
    out = np.zeros((2 * LAW_RUNS, 3), dtype=np.int64)
    filled = np.zeros(2 * LAW_RUNS, dtype=np.int64)
    accepted = tested = 0
    while engine.num_running:
        for update in engine.step():
            i = ids[update.request_id]
            out[i, filled[i]:filled[i] + len(update.tokens)] = update.tokens
            filled[i] += len(update.tokens)
            if update.finished:
                accepted += update.stats.accepted
                tested += update.stats.accepted + update.stats.rejections
    assert (filled == 3).all()
    assert 0.2 < accepted / tested < 0.95  # both acceptance and rejection paths run
    fits = []
    for k, params in enumerate(groups):
        law = exact_law(target, params, 3, gof)
        codes = out[k::2] @ np.array([VOCAB**2, VOCAB, 1])
        fits.append(gof.chi_square(codes, law.ravel()))
    assert min(1.0, 2 * min(f.pvalue for f in fits)) >= gof.SIGNIFICANCE, fits


class NeighbourProbs:
    """A broken row drafter: row b reports row b+1's draft law (the last row row 0's): the bug of a
    batched verifier that mixes up rows."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def draft(self, *args):
        tokens, probs = self.inner.draft(*args)
        return tokens, probs.roll(-1, 0)


def gamma1_law(p1, p2, sampled, reported) -> np.ndarray:
    """Exact law of (t1, t2) from one γ = 1 step then a plain one: draft x ~ sampled, kept with
    min(1, p1(x) / reported(x)), then a bonus from p2[x]; else t1 ~ norm(max(0, p1 - reported)) and
    t2 ~ p2[t1]. p1 [V], p2 [V, V] (row x: the target's law after x), sampled / reported [V]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.where(reported > 0, np.minimum(1.0, p1 / np.where(reported > 0, reported, 1.0)), 1.0)
    residual = np.maximum(p1 - reported, 0.0)
    residual = residual / residual.sum() if residual.sum() > 1e-12 else p1
    kept = sampled * keep
    return kept[:, None] * p2 + (1 - kept.sum()) * residual[:, None] * p2


def test_a_row_reading_its_neighbours_draft_law_is_caught(law_pair, gof):
    """Batches of 16 requests in lockstep, prompts A and B alternating (row 2i: A, row 2i+1: B), γ 1, 2
    tokens: only the first step drafts, with every row in admission order. With row b reporting row
    b+1's q, A's (t1, t2) follow gamma1_law(p_A, ·, q_A, q_B); the test of A's 36 cells has power > 0.99
    against that law at 400 runs (noncentrality ~540 against a critical value ~49: computed and
    asserted), and the same calculator with honest q gives
    the target's law (checked), so the control is sound. The honest engine passes the same kind of
    test in test_the_batched_engine_follows_the_exact_target_law."""
    target, draft = law_pair
    prompts = [LAW_PROMPT, [5, 5, 2, 0, 3]]

    def laws(prompt):
        p1 = torch.softmax(target.forward(torch.tensor(prompt), 0)[-1].double(), -1).numpy()
        p2 = np.stack([torch.softmax(target.forward(torch.tensor(prompt + [x]), 0)[-1].double(), -1).numpy()
                       for x in range(VOCAB)])
        drafter = FeatureDrafter(draft, target)
        target.truncate(0)
        target.forward(torch.tensor(prompt[:-1]), 0)
        drafter.reset()
        q = drafter.propose(prompt, 1, PLAIN, torch.Generator()).probs[0].double().numpy()
        return p1, p2, q

    (p1, p2, q_a), (_, _, q_b) = laws(prompts[0]), laws(prompts[1])
    good = p1[:, None] * p2
    np.testing.assert_allclose(gamma1_law(p1, p2, q_a, q_a), good, atol=1e-12)
    runs, rows = 400, 16
    power = gof.power(good, gamma1_law(p1, p2, q_a, q_b), runs)
    assert power.power > 0.99, power

    factory = FeatureDrafter(draft, target).rows
    engine = BatchEngine(target, lambda n, cache: NeighbourProbs(factory(n, cache)), gamma=1, max_batch=rows)
    out = []
    for batch in range(runs * 2 // rows):
        ids = [engine.add(BatchRequest(prompts[b % 2], PLAIN, 2, seed=batch * rows + b)) for b in range(rows)]
        tokens = {i: [] for i in ids[::2]}  # the A rows
        while engine.num_running:
            for update in engine.step():
                tokens.get(update.request_id, []).extend(update.tokens)
        out += tokens.values()
    assert gof.chi_square(np.array(out) @ np.array([VOCAB, 1]), good.ravel()).pvalue < gof.SIGNIFICANCE


# ================================================================ joins, cancels, bad requests


def test_cancel_frees_the_row_at_once_for_a_waiting_request(llama):
    engine = BatchEngine(LeanModel(llama, max_seq_len=128), NgramDrafter().rows, gamma=2, max_batch=2)
    ids = [engine.add(BatchRequest(p, GREEDY, 50)) for p in PROMPTS[:3]]
    engine.step()
    assert len(engine.rows) == 2 and engine.num_running == 3
    engine.cancel(ids[0])
    assert [r.request_id for r in engine.rows] == [ids[1]] and engine.num_running == 2
    updates = {u.request_id: u for u in engine.step()}
    assert updates[ids[0]].finished == "cancelled" and updates[ids[0]].tokens == []
    assert sorted(r.request_id for r in engine.rows) == [ids[1], ids[2]]
    engine.cancel(ids[0])  # already gone: ignored
    engine.cancel(ids[2])
    engine.cancel(ids[1])
    assert [u.finished for u in engine.step()] == ["cancelled", "cancelled"]
    assert engine.num_running == 0 and engine.step() == []


@pytest.mark.parametrize("request_args, error, message", [
    ({"prompt_ids": []}, ValueError, "at least one token"),
    ({"prompt_ids": [1, 64]}, ValueError, "out of range"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
    ({"stop_ids": (99,)}, ValueError, "stop ids"),
    ({"logprobs": -1}, ValueError, "logprobs"),
    ({"seed": -3}, ValueError, "seed"),
    ({"params": 0.5}, ValueError, "SamplingParams"),
    ({"prompt_ids": list(range(32))}, ContextOverflowError, "does not fit"),
])
def test_bad_requests_raise_a_clear_error(request_args, error, message, llama):
    engine = BatchEngine(LeanModel(llama, max_seq_len=32), None, gamma=0)
    args = {"prompt_ids": [1, 2], "params": GREEDY, "max_new_tokens": 4} | request_args
    with pytest.raises(error, match=message):
        engine.add(BatchRequest(**args))
    assert engine.num_running == 0


@pytest.mark.parametrize("args, message", [
    ({"gamma": -1}, "gamma"), ({"gamma": "fast"}, "gamma"), ({"max_batch": 0}, "max_batch"),
])
def test_bad_engine_settings_raise_a_clear_error(args, message, llama):
    with pytest.raises(ValueError, match=message):
        BatchEngine(LeanModel(llama, max_seq_len=32), NgramDrafter().rows, **args)


def test_a_request_for_no_tokens_finishes_at_once(llama):
    engine = BatchEngine(LeanModel(llama, max_seq_len=32), None, gamma=0)
    engine.add(BatchRequest([1, 2], GREEDY, 0))
    [update] = engine.step()
    assert (update.tokens, update.finished, engine.num_running) == ([], "length", 0)


# ================================================================ γ under load


def simulated_step_time(rows: int, gamma: int) -> float:
    """A GPU-like cost: a fixed launch cost, then compute growing with rows × positions; drafting
    costs a tenth of a verify per position."""
    verify = 1.0 + 0.02 * rows * (gamma + 1)
    return verify + gamma * 0.1 * (1.0 + 0.02 * rows)


def simulated_costs(max_batch: int = 256, max_gamma: int = 8, step_time=simulated_step_time) -> BatchStepCosts:
    """The table calibration would measure for `step_time` (a bucket's rows: the bucket)."""
    return BatchStepCosts({b: tuple(step_time(b, g) for g in range(max_gamma + 1)) for b in batch_buckets(max_batch)})


def settle(policy: LoadGamma, rows: int, alpha: float, steps: int = 60) -> list[int]:
    """Run the policy at a fixed batch size; rows accept at rate alpha (the expected accepted count,
    deterministic). Returns the Γ chosen at each step (probes included)."""
    chosen = []
    for _ in range(steps):
        gamma = policy.choose(rows, [(int(100 * alpha), 100)] * rows)
        accepted = rows * sum(alpha ** k for k in range(1, gamma + 1))
        tested = rows * sum(alpha ** (k - 1) for k in range(1, gamma + 1))
        policy.observe(round(accepted), round(tested))
        chosen.append(gamma)
    return chosen


def test_load_gamma_shrinks_gamma_as_the_batch_grows_down_to_plain_decoding():
    policy = LoadGamma(simulated_costs())
    settled = {}
    for rows in (1, 4, 16, 64, 256):
        settle(policy, rows, alpha=0.7)
        settled[rows] = policy.best(rows, [(70, 100)] * rows)
    assert settled[1] >= 3
    assert settled[1] >= settled[4] >= settled[16] >= settled[64] >= settled[256]
    assert settled[256] == 0 and settled[16] < settled[1]
    # each settled Γ is the best for the simulated cost
    for rows, gamma in settled.items():
        rate = [sum(0.7 ** k for k in range(g + 1)) / simulated_step_time(rows, g) for g in range(9)]
        assert rate[gamma] >= 0.97 * max(rate), (rows, gamma)


def test_load_gamma_turns_speculation_off_for_a_drafter_never_accepted():
    policy = LoadGamma(simulated_costs(), probe_every=32)
    chosen = settle(policy, 1, alpha=0.0, steps=96)
    assert policy.best(1, [(0, 100)]) == 0 and chosen[-64:].count(0) >= 62  # a probe of Γ 1 every 32 steps


def fixed_draft_cost(rows: int, gamma: int) -> float:
    """A CPU-like cost of one row: the draft's fixed cost makes Γ = 1 lose to plain, long drafts win."""
    return 1.0 + (0.6 if gamma else 0.0) + 0.05 * gamma


def test_load_gamma_probes_while_off_and_turns_a_drafter_that_got_good_back_on():
    """Plain steps test no draft: without probes a drafter switched off would stay off. After 100
    steps of a useless drafter, a request whose drafts the target keeps (0.9) comes: a probe finds
    it out within about two probe periods, and speculation is on for the rest of it."""
    policy = LoadGamma(simulated_costs(1, step_time=fixed_draft_cost), probe_every=16)
    settle(policy, 1, alpha=0.0, steps=100)
    counts, chosen = (0, 0), []
    for _ in range(80):
        gamma = policy.choose(1, [counts])
        accepted = round(sum(0.9 ** k for k in range(1, gamma + 1)))
        tested = round(sum(0.9 ** (k - 1) for k in range(1, gamma + 1)))
        counts = (counts[0] + accepted, counts[1] + tested)
        policy.observe(accepted, tested)
        chosen.append(gamma)
    assert chosen[0] == 0, chosen  # the pooled rate says the drafter is useless
    first = next(i for i, gamma in enumerate(chosen) if gamma)
    assert first <= 64 and min(chosen[first + 4:]) >= 3, chosen


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 32, 64]
    assert batch_buckets(1) == [1] and batch_buckets(5) == [1, 2, 4, 8] and batch_buckets(64)[-1] == 64


def test_auto_gamma_runs_the_engine_and_keeps_the_output_exact(llama, draft_weights):
    """γ chosen by LoadGamma (here over the nominal table) never changes a greedy output."""
    requests = [BatchRequest(p, GREEDY, 15) for p in PROMPTS]
    target, _, factory = pair("model", llama, draft_weights)
    auto = run_batch(BatchEngine(target, factory, gamma="auto"), requests)
    plain = run_batch(BatchEngine(LeanModel(llama, max_seq_len=128), None, gamma=0), requests)
    assert auto == plain


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_the_static_padded_forward_behind_cuda_graphs_gives_the_eager_tokens(kind, llama, draft_weights):
    """graphs=True on the CPU runs what the CUDA graphs replay (rows padded to a power of two, keys over
    the whole cache), eagerly: the same tokens as the eager engine, sampled, rows joining and leaving."""
    requests = [BatchRequest(p, PLAIN, 12 + 3 * i, seed=i) for i, p in enumerate(PROMPTS)]
    outs = []
    for graphs in (False, True):
        target, _, factory = pair(kind, llama, draft_weights)
        engine = BatchEngine(target, factory, gamma=3, max_batch=4, graphs=graphs)
        outs.append(run_batch(engine, requests, joins={0: [0, 1, 2], 3: [3, 4]}))
    assert outs[0] == outs[1]


def test_the_api_batch_engine_runs_the_speculants_target_draft_and_gamma(llama):
    from pathlib import Path

    from speculant.api import Speculant
    from speculant.models.registry import LoadedModel

    loaded = LoadedModel(name="tiny", source="", source_hash="", folder=Path("."),
                         model=LeanModel(llama, max_seq_len=128), weights=llama, tokenizer=None, config=llama.cfg,
                         arch="llama", context_length=128,
                         num_params=0, weight_bytes=0)
    spec = Speculant(loaded, ["layers:1"], gamma=3, fused=False)
    engine = spec.batch_engine(max_batch=4)
    assert engine.gamma == 3 and engine.max_batch == 4
    out = run_batch(engine, [BatchRequest(PROMPTS[0], PLAIN, 12, seed=5)])
    _, steps = spec.steps(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=5, stop_ids=[])
    assert out[0] == ([t for s in steps for t in s.tokens], "length")
    with pytest.raises(ValueError, match="batched decoding drafts with"):
        Speculant(loaded, ["layers:1"], gamma=3, fused=False, lookup=2).batch_engine()
    # under auto, a lone request runs solo with candidates and the lookup branch; the batch drafts their chain
    engine = Speculant(loaded, ["layers:1"], gamma="auto", fused=False, candidates=2, lookup=2).batch_engine(solo=True)
    assert engine.solo_steps is not None and engine.drafter is not None
    requests = [BatchRequest(p, GREEDY, 10) for p in PROMPTS[:3]]
    plain = run_batch(BatchEngine(LeanModel(llama, max_seq_len=128), None, gamma=0), requests)
    assert run_batch(engine, requests, joins={0: [0], 2: [1], 3: [2]}) == plain


def test_load_gamma_finds_long_drafts_behind_a_fixed_drafting_cost():
    """The drafter's fixed cost makes Γ = 1 lose to plain while Γ = 3 wins (a CPU's shape): the
    policy does not stop at Γ = 1."""
    costs = simulated_costs(1, step_time=fixed_draft_cost)
    rate = [sum(0.6 ** k for k in range(g + 1)) / costs.cost(1, g) for g in range(9)]
    assert rate[1] < rate[0] < rate[3]
    policy = LoadGamma(costs)
    settle(policy, 1, alpha=0.6, steps=40)
    assert policy.best(1, [(60, 100)]) >= 3


# ================================================================ a lone request runs solo


def solo_factory(kind, weights, draft_weights, calls: list, max_seq_len: int = 128):
    """A solo engine over the single-request loop (speculant.engine.generate: the tiny pair's own
    target and drafter, a fixed γ 3 policy stand-in) that records each start: (context length, left)."""
    target, drafter, _ = pair(kind, weights, draft_weights, max_seq_len)

    def solo(context, request, seed, left):
        calls.append((len(context), left))
        return generate(target, drafter, context, gamma=3, params=request.params, max_new_tokens=left,
                        stop_ids=request.stop_ids, generator=torch.Generator().manual_seed(seed))

    return solo


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_a_lone_request_runs_solo_and_joins_the_batch_when_others_come(kind, llama, draft_weights):
    """Greedy: a request alone runs the single-request engine; a second one arriving moves it into the
    batch (its context prefilled there); alone again, it goes back to solo. Every output is plain
    greedy decoding's, and the stats count every step of both engines."""
    calls = []
    target, _, factory = pair(kind, llama, draft_weights)
    engine = BatchEngine(target, factory, gamma="auto", max_batch=4, solo=solo_factory(kind, llama, draft_weights, calls))
    requests = [BatchRequest(PROMPTS[0], GREEDY, 40), BatchRequest(PROMPTS[1], GREEDY, 6)]
    finals = {}
    ids, out, step = {}, {}, 0
    while step <= 2 or engine.num_running:
        if step in (0, 2):
            ids[engine.add(requests[step // 2])] = step // 2
        for update in engine.step():
            i = ids[update.request_id]
            out[i] = out.get(i, []) + update.tokens
            if update.finished:
                finals[i] = (update.finished, update.stats)
        step += 1
    plain = run_batch(BatchEngine(LeanModel(llama, max_seq_len=128), None, gamma=0), requests)
    assert {i: (out[i], finals[i][0]) for i in out} == plain
    assert calls[0] == (len(PROMPTS[0]), 40)  # solo from the start
    assert len(calls) == 2 and calls[1][0] > len(PROMPTS[0]) and calls[1][1] < 40  # back to solo, mid-way
    stats = finals[0][1]
    assert stats.new_tokens == 40 and stats.drafted > 0 and stats.target_calls <= 40
    assert sum(stats.drafted_by_position) == stats.drafted and len(stats.gamma_history) == stats.target_calls


def test_a_solo_request_can_be_cancelled_and_bad_solo_settings_are_refused(llama, draft_weights):
    calls = []
    target, _, factory = pair("model", llama, draft_weights)
    solo = solo_factory("model", llama, draft_weights, calls)
    engine = BatchEngine(target, factory, gamma="auto", solo=solo)
    request_id = engine.add(BatchRequest(PROMPTS[0], GREEDY, 30))
    assert engine.step()[0].finished is None and engine.solo is not None
    engine.cancel(request_id)
    assert engine.num_running == 0 and [u.finished for u in engine.step()] == ["cancelled"]
    with pytest.raises(ValueError, match="only under gamma 'auto'"):
        BatchEngine(target, factory, gamma=3, solo=solo)


def test_a_request_moving_between_solo_and_the_batch_follows_the_exact_target_law(law_pair, gof):
    """Each request starts alone (solo: the single-request loop), then a companion joins after its
    first step, moving it into the batch (γ auto's rows), and it may end solo again once the companion
    is done: chi-square of its (t1, t2, t3) against the exact law, top-p. A broken solo engine that
    samples the draft's law instead of the target's must be caught by the same test."""
    target, draft = law_pair

    def run(solo_target) -> np.ndarray:
        def solo(context, request, seed, left):
            drafter = FeatureDrafter(draft, target)
            return generate(solo_target, drafter, context, gamma=2, params=request.params, max_new_tokens=left,
                            stop_ids=request.stop_ids, generator=torch.Generator().manual_seed(seed))

        engine = BatchEngine(target, FeatureDrafter(draft, target).rows, gamma="auto", max_batch=4, solo=solo)
        out = np.zeros((LAW_RUNS, 3), dtype=np.int64)
        for i in range(LAW_RUNS):
            subject = engine.add(BatchRequest(LAW_PROMPT, TOP_P, 3, seed=i))
            tokens = []
            for step in range(10):
                if step == 1:
                    engine.add(BatchRequest(LAW_PROMPT, TOP_P, 2, seed=LAW_RUNS + i))
                tokens += [t for u in engine.step() if u.request_id == subject for t in u.tokens]
                if not engine.num_running:
                    break
            out[i] = tokens
        return out @ np.array([VOCAB**2, VOCAB, 1])

    law = exact_law(target, TOP_P, 3, gof).ravel()
    assert gof.chi_square(run(target), law).pvalue >= gof.SIGNIFICANCE
    # the negative control: a solo engine that decodes with another model's law (a bug that hands the
    # lone request the wrong target) moves t1 off the law
    wrong = LeanModel(random_weights(tiny_config(vocab_size=VOCAB, num_layers=2), seed=99, scale=2.0),
                      max_seq_len=target.max_seq_len)
    assert gof.chi_square(run(wrong), law).pvalue < gof.SIGNIFICANCE


def test_the_api_solo_engine_is_the_speculants_single_request_engine(llama):
    """Speculant.batch_engine(solo=True) under auto: a lone request runs Speculant.solo_steps (its own
    drafter and γ policy), greedy tokens equal to plain decoding's; with a fixed γ solo stays off."""
    from pathlib import Path

    from speculant.api import Speculant
    from speculant.models.registry import LoadedModel

    loaded = LoadedModel(name="tiny", source="", source_hash="", folder=Path("."),
                         model=LeanModel(llama, max_seq_len=128), weights=llama, tokenizer=None, config=llama.cfg,
                         arch="llama", context_length=128, num_params=0, weight_bytes=0)
    spec = Speculant(loaded, ["layers:1"], gamma="auto", fused=False)
    engine = spec.batch_engine(max_batch=4, solo=True)
    assert engine.solo_steps is not None and spec.warm_up() > 0  # its step costs measured
    out = run_batch(engine, [BatchRequest(PROMPTS[2], GREEDY, 12)])
    plain = run_batch(BatchEngine(LeanModel(llama, max_seq_len=128), None, gamma=0), [BatchRequest(PROMPTS[2], GREEDY, 12)])
    assert out == plain
    assert Speculant(loaded, ["layers:1"], gamma=3, fused=False).batch_engine(solo=True).solo_steps is None


def test_a_solo_request_that_fills_the_context_ends_with_reason_context_as_generate_does(llama, draft_weights):
    """Solo from the start, then batched beside a short request, then alone again near the end: the
    context fills and the request ends "context" with plain decoding's tokens; a batched row that
    filled it ends the same way, never handed to the single-request engine full."""
    calls = []
    target, _, factory = pair("model", llama, draft_weights, max_seq_len=40)
    engine = BatchEngine(target, factory, gamma="auto", max_batch=2,
                         solo=solo_factory("model", llama, draft_weights, calls, max_seq_len=40))
    requests = [BatchRequest(PROMPTS[0], GREEDY, 100), BatchRequest(PROMPTS[1], GREEDY, 3)]
    out = run_batch(engine, requests, joins={0: [0], 1: [1]})
    plain = run_batch(BatchEngine(LeanModel(llama, max_seq_len=40), None, gamma=0), requests)
    assert out == plain and out[0][1] == "context"
    assert all(context < 40 for context, _ in calls)
