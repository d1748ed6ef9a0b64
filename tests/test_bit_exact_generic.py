"""Bit-exact mode on the generic step (speculant.exact_target.ExactTarget): the drafters the fused step
cannot run (a hierarchy, a draft through transformers) and logprobs. The target's forward there is the
plain bit-exact stepper's own, so a position's logits are plain bit-exact decoding's bits, greedy
output is plain greedy output token for token in bfloat16, and sampling keeps the target's law.
On the CPU in bfloat16, with tiny models (tests/test_bit_exact.py builds them)."""

from __future__ import annotations

import pytest
import torch
from test_bit_exact import CONTEXT, GREEDY, PROMPTS, _greedy, _target, _three_ways, two_token_law, two_token_samples

from speculant.acceptance import candidate_tree, tree_tokens
from speculant.drafters.base import NoDrafter
from speculant.drafters.hierarchical import SpeculativeDrafter
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.exact_target import ExactTarget
from speculant.fused import FusedStepper
from speculant.models.exact_attention import EXACT_WIDTH
from speculant.models.transformer import LeanModel
from speculant.step import GenericStepper


def _plain_logits(stepper: FusedStepper, context: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits plain bit-exact decoding computes at each of `tokens` fed after `context` (the root
    is context's last token): one 1-row score per position, as the plain body's steps make them."""
    stepper.begin(context, GREEDY)
    device = stepper.target.device
    start = torch.tensor(len(context) - 1, device=device)
    with torch.inference_mode():
        rows = [stepper.score(torch.tensor([token], device=device), start + i)[0]
                for i, token in enumerate(context[-1:] + tokens)]
    return torch.stack(rows)


@pytest.mark.parametrize("graphs", [False, True, "cuda"])
def test_the_exact_targets_logits_are_plain_bit_exact_decodings_bits(graphs):
    """A chain of 41 positions (two calls of EXACT_WIDTH rows) and a 17-node tree through ExactTarget,
    over a stepper of their own: each position's logits equal, bit for bit, those plain bit-exact
    decoding computes one position at a time. The control: the lean model's own forward (what the
    generic step ran before) gives other bits (rounding: tests/test_bit_exact.py checks in float32
    that the exact forward computes the model's attention). graphs: every call through the runner of
    its row count over one packed buffer (on the CPU run eagerly: the packing is what is tested; "cuda":
    replayed from a CUDA graph)."""
    if graphs == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    target = _target(device="cuda" if graphs == "cuda" else "cpu")
    chain = [(7 * i + 2) % 64 for i in range(40)]
    expected = _plain_logits(FusedStepper(target, None, compile=False, bit_exact=True), CONTEXT, chain)
    exact = ExactTarget(FusedStepper(target, None, compile=False, bit_exact=True), graphs=bool(graphs))
    exact.prefill(torch.tensor(CONTEXT[:-1]))
    logits = exact.forward(torch.tensor(CONTEXT[-1:] + chain), len(CONTEXT) - 1)
    assert logits.shape[0] == 41 > EXACT_WIDTH and exact.length == len(CONTEXT) + 40
    for position in range(41):
        assert torch.equal(logits[position], expected[position]), position

    # a tree (γ 4, K 4): each node's logits are those of its path decoded alone
    _, _, alone = _three_ways(target, exact=True)
    exact.truncate(len(CONTEXT) - 1)
    candidates = torch.randint(0, target.vocab_size, (4, 4), generator=torch.Generator().manual_seed(1))
    _, ancestors = candidate_tree(4, 4)
    tree = exact.forward(tree_tokens(torch.tensor(CONTEXT[-1:]), candidates), len(CONTEXT) - 1, ancestors)
    assert all(torch.equal(tree[node], alone[node]) for node in range(17))
    assert sorted(exact.runners) == ([EXACT_WIDTH] if graphs else [])  # every call padded: one runner
    if graphs:
        assert (exact.runners[EXACT_WIDTH].graph is not None) == (graphs == "cuda")

    target.prefill(torch.tensor(CONTEXT[:-1], device=target.device))
    default = target.forward(torch.tensor(CONTEXT[-1:] + chain, device=target.device), len(CONTEXT) - 1)
    assert not all(torch.equal(default[p], expected[p]) for p in range(41))


def _hierarchy(target_layers: LeanModel, depth: int) -> SpeculativeDrafter:
    """A hierarchy under the target: a 1-layer model of other weights drafted by n-gram lookup, or
    (depth 3) by the first layer of a third model drafted by n-gram lookup."""
    inner = NgramDrafter()
    if depth == 3:
        small = _target(layers=1, seed=7)
        inner = SpeculativeDrafter(GenericStepper(LeanModel(small.weights, max_seq_len=96), inner), 2)
    return SpeculativeDrafter(GenericStepper(LeanModel(target_layers.weights, max_seq_len=96), inner), 2)


@pytest.mark.parametrize("kind", ["hierarchy", "hierarchy3", "tree", "lookup"])
def test_bit_exact_generic_greedy_output_is_plain_bit_exact_output_in_bfloat16(kind):
    """Greedy speculative output through the generic step over ExactTarget equals bit-exact plain
    decoding token for token, over the prompts of tests/test_bit_exact.py: a hierarchy of two and of
    three levels, and a K 4 tree and a lookup branch (scored as one tree by the generic step). The
    control: the same hierarchy on the lean model's own forward gives other tokens on a prompt (the
    target's logits are not plain bit-exact decoding's)."""
    target, middle = _target(layers=2, seed=5), _target(layers=1, seed=6)
    make = {"hierarchy": lambda: _hierarchy(middle, 2), "hierarchy3": lambda: _hierarchy(middle, 3),
            "tree": lambda: ModelDrafter(middle, candidates=4),
            "lookup": lambda: LookupDrafter(ModelDrafter(middle, candidates=4), NgramDrafter(), 6)}[kind]
    plain = FusedStepper(target, None, compile=False, bit_exact=True)
    differ = 0
    for prompt in PROMPTS:
        expected = _greedy(target, None, plain, prompt, 0, max_new=40)
        drafter = make()
        stepper = GenericStepper(ExactTarget(plain, graphs=kind.startswith("hierarchy")), drafter)  # as the api
        assert _greedy(target, drafter, stepper, prompt, 4, max_new=40) == expected
        if kind == "hierarchy":
            drafter = make()
            differ += _greedy(target, drafter, GenericStepper(target, drafter), prompt, 4, max_new=40) != expected
        if kind.startswith("hierarchy"):
            assert drafter.stats.target_calls > 0
    assert kind != "hierarchy" or differ > 0


def test_bit_exact_hierarchy_sampling_follows_the_target_law_over_two_tokens(gof):
    """Chi-square of 1500 two-token outputs (vocab 8, temperature 1, γ 2) of a two-level hierarchy in
    bit-exact mode against the exact law of the target's standard forward (float32: the two agree to
    rounding). The control: the test has the power to tell the middle model's law from the target's,
    and the same outputs fail against it."""
    target = _target(torch.float32, vocab=8, seed=3, seq=16)
    middle = _target(torch.float32, vocab=8, seed=4, seq=16, layers=1)
    prompt, n = [1, 2, 3], 1500
    exact = ExactTarget(FusedStepper(target, None, compile=False, bit_exact=True))

    def make():
        drafter = SpeculativeDrafter(GenericStepper(LeanModel(middle.weights, max_seq_len=16), NgramDrafter()), 2)
        return drafter, GenericStepper(exact, drafter)

    codes = two_token_samples(target, prompt, n, make)
    law, middle_law = two_token_law(target, prompt), two_token_law(middle, prompt)
    assert gof.chi_square(codes, law).pvalue > gof.SIGNIFICANCE
    assert gof.power(law, middle_law, n).power > 0.99
    assert gof.chi_square(codes, middle_law).pvalue < gof.SIGNIFICANCE


# ================================================================ the API and the command line

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from test_loading import save_folder, tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    return str(save_folder(tiny_hf_model("llama", vocab_size=261, max_position_embeddings=128), folder))


def test_the_api_runs_a_bit_exact_hierarchy_and_logprobs_through_the_exact_target(tiny_folder, tmp_path,
                                                                                   monkeypatch):
    """speculant.load(draft=[model, ngram], bit_exact=True): the hierarchy runs the generic step over
    the plain stepper's exact target and gives plain bit-exact decoding's tokens; logprobs (the generic
    step) are accepted and give the same tokens; --gamma auto too; generate_many runs the hierarchy's
    requests one by one (the batched engine drafts with one level)."""
    from speculant import api

    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))  # --gamma auto's step costs

    spec = api.load(tiny_folder, draft=[tiny_folder, "ngram"], gamma=3, dtype="bfloat16", max_seq_len=128,
                    bit_exact=True)
    assert isinstance(spec.stepper, GenericStepper) and isinstance(spec.stepper.target, ExactTarget)
    assert spec.stepper.target.stepper is spec.plain_stepper and spec.plain_stepper.bit_exact
    assert spec.stepper.target.graphs and not spec.exact_target.graphs  # batched rows swap caches: no graphs
    prompt = "ab cd ab cd ab"
    plain = spec.generate(prompt, max_new_tokens=24, plain=True).token_ids
    out = spec.generate(prompt, max_new_tokens=24)
    assert out.token_ids == plain and out.stats["levels"][0]["draft"] == tiny_folder
    with_logprobs = spec.generate(prompt, max_new_tokens=24, logprobs=2)
    assert with_logprobs.token_ids == plain and len(with_logprobs.logprobs) == len(plain)
    assert spec.generate(prompt, max_new_tokens=24, plain=True, logprobs=0).token_ids == plain
    auto = api.load(tiny_folder, draft=[tiny_folder, "ngram"], gamma="auto", dtype="bfloat16", max_seq_len=128,
                    bit_exact=True)
    assert auto.generate(prompt, max_new_tokens=24).token_ids == plain
    with pytest.raises(ValueError, match="one level"):
        spec.batch_engine()
    assert [r.token_ids for r in spec.generate_many([{"prompt": prompt}] * 2, max_new_tokens=24)] == [plain] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the graphed generic step is for CUDA")
def test_the_api_runs_a_cuda_hierarchy_over_a_graphed_target(tiny_folder):
    """In the default mode on CUDA a hierarchy's generic step verifies through fused.GraphedModel (a
    graph per chain length) over the target's own model: greedy output equals plain greedy output in
    float32; with --kernels triton a hierarchy is still refused outside bit-exact mode."""
    from speculant import api
    from speculant.fused import GraphedModel

    spec = api.load(tiny_folder, draft=[tiny_folder, "ngram"], gamma=3, dtype="float32", device="cuda",
                    max_seq_len=128, bit_exact=False)
    assert isinstance(spec.stepper, GenericStepper) and isinstance(spec.stepper.target, GraphedModel)
    assert spec.stepper.target.model is spec.target.model
    prompt = "ab cd ab cd ab"
    plain = spec.generate(prompt, max_new_tokens=24, plain=True).token_ids
    assert spec.generate(prompt, max_new_tokens=24).token_ids == plain and spec.stepper.target._runners
    with pytest.raises(ValueError, match="one drafter level"):
        api.load(tiny_folder, draft=[tiny_folder, "ngram"], device="cuda", max_seq_len=128, kernels="triton",
                 bit_exact=False)


def test_a_bit_exact_draft_through_transformers_runs_the_generic_step(tiny_folder, tmp_path):
    """A gpt2 draft (transformers: not fusable) for the lean target in bit-exact mode: the generic step
    over the exact target, plain bit-exact decoding's tokens; a gpt2 target is refused in one line."""
    from test_loading import save_folder, tiny_hf_model

    from speculant import api

    gpt2 = str(save_folder(tiny_hf_model("gpt2", vocab_size=261, max_position_embeddings=128), tmp_path / "gpt2"))
    spec = api.load(tiny_folder, draft=gpt2, gamma=3, dtype="bfloat16", max_seq_len=128, bit_exact=True)
    assert isinstance(spec.stepper, GenericStepper) and isinstance(spec.stepper.target, ExactTarget)
    plain = spec.generate("ab cd ab", max_new_tokens=16, plain=True).token_ids
    assert spec.generate("ab cd ab", max_new_tokens=16).token_ids == plain
    with pytest.raises(ValueError, match="lean \\(torch\\) target"):
        api.load(gpt2, draft="ngram", dtype="bfloat16", max_seq_len=128, bit_exact=True)


def test_the_cli_generates_with_bit_exact_and_two_drafts(tiny_folder, capsys):
    """`speculant generate --bit-exact --draft MODEL --draft ngram --compare`: the output is plain
    decoding's (identical) and the level's stats are reported."""
    import json

    from speculant.cli import main

    code = main(["generate", "--target", tiny_folder, "--draft", tiny_folder, "--draft", "ngram", "--bit-exact",
                 "--dtype", "bfloat16", "--max-seq-len", "128", "--max-new-tokens", "16", "--compare", "--json",
                 "ab cd ab cd"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["identical"] is True and len(result["stats"]["levels"]) == 1


def test_plain_decoding_on_the_exact_target_is_the_fused_plain_step():
    """NoDrafter through the generic step over ExactTarget (what logprobs run) gives the fused plain
    bit-exact step's tokens."""
    target = _target(layers=2, seed=5)
    plain = FusedStepper(target, None, compile=False, bit_exact=True)
    for prompt in PROMPTS:
        expected = _greedy(target, None, plain, prompt, 0, max_new=40)
        assert _greedy(target, NoDrafter(), GenericStepper(ExactTarget(plain), NoDrafter()), prompt, 0,
                       max_new=40) == expected


# ================================================================ batched requests

def _batched(engine, prompts, max_new: list[int]) -> list[list[int]]:
    """Greedy tokens of each prompt, all added at once (more than the engine's rows: some wait)."""
    from speculant.batching import BatchRequest

    ids = {engine.add(BatchRequest(prompt, GREEDY, n)): i for i, (prompt, n) in enumerate(zip(prompts, max_new))}
    out = [[] for _ in prompts]
    while engine.num_running:
        for update in engine.step():
            out[ids[update.request_id]] += update.tokens
    return out


@pytest.mark.parametrize("kind", ["ngram", "model", "features"])
def test_a_bit_exact_batched_requests_greedy_tokens_are_its_tokens_alone_in_bfloat16(kind):
    """BatchEngine(exact=...): each request's greedy tokens are the same alone and batched with others
    (3 rows for 5 requests of different lengths: rows wait, finish and move), and are plain bit-exact
    decoding's (the fused step, alone). A feature draft reads the rows' features from the exact caches.
    The control: the default engine's tokens are not plain bit-exact decoding's on some request."""
    from test_bit_exact import _feature_pair_bf16

    from speculant.batching import BatchEngine
    from speculant.drafters.features import FeatureDrafter

    if kind == "features":
        target, draft = _feature_pair_bf16()
        factory = FeatureDrafter(draft, target, candidates=1).rows
    else:
        target = _target(layers=2, seed=5)
        factory = NgramDrafter().rows if kind == "ngram" else ModelDrafter(_target(layers=1, seed=6)).rows
    plain = FusedStepper(target, None, compile=False, bit_exact=True)
    prompts = PROMPTS + [[(3 * i + 1) % 64 for i in range(12)], [5, 9, 5, 9, 5]]
    max_new = [30, 20, 40, 12, 25]
    expected = [_greedy(target, None, plain, prompt, 0, max_new=n) for prompt, n in zip(prompts, max_new)]
    exact = ExactTarget(plain)
    alone = [_batched(BatchEngine(target, factory, gamma=4, max_batch=3, exact=exact), [p], [n])[0]
             for p, n in zip(prompts, max_new)]
    batched = _batched(BatchEngine(target, factory, gamma=4, max_batch=3, exact=exact), prompts, max_new)
    assert alone == batched == expected
    if kind == "model":
        default = _batched(BatchEngine(target, factory, gamma=4, max_batch=3), prompts, max_new)
        assert default != expected


def test_the_api_batches_bit_exact_requests_and_refuses_graphs(tiny_folder):
    """generate_many in bit-exact mode runs the batched engine over the exact target: each request
    gets plain bit-exact decoding's tokens; graphs are refused in one line."""
    from speculant import api

    spec = api.load(tiny_folder, draft=tiny_folder, gamma=3, dtype="bfloat16", max_seq_len=128, bit_exact=True)
    engine = spec.batch_engine(max_batch=2)
    assert engine.exact is not None and engine.cache is engine.exact
    prompts = ["ab cd ab cd ab", "xy", "hello hello hel"]
    results = spec.generate_many([{"prompt": p} for p in prompts], max_new_tokens=16, max_batch=2)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == spec.generate(prompt, max_new_tokens=16, plain=True).token_ids
    with pytest.raises(ValueError, match="no graphs"):
        spec.batch_engine(graphs=True)
