"""The fused step (speculant.fused): the same law as the generic loop, on the CPU (eager bodies)
and, where CUDA is present, through captured CUDA graphs."""

import pytest
import torch
from scipy.stats import chisquare
from test_features import feature_pair

from speculant.drafters.features import FeatureDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GREEDY = SamplingParams(temperature=0)


def _models(device, vocab=64, seq=96):
    weights = random_weights(tiny_config(vocab_size=vocab), seed=0, scale=3.0).to(device)
    return weights, LeanModel(weights, max_seq_len=seq)


def _run(target, stepper, prompt, gamma, params, max_new, seed=0):
    generator = torch.Generator(device=target.device).manual_seed(seed)
    out, stats = [], None
    for step in generate(target, None, prompt, gamma=gamma, params=params, max_new_tokens=max_new,
                         generator=generator, stepper=stepper):
        out += step.tokens
        stats = step.stats
    return out, stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["layers", "ngram", "none"])
@pytest.mark.parametrize("gamma", [1, 4])
def test_fused_greedy_output_equals_plain_greedy(device, kind, gamma):
    weights, target = _models(device)
    draft = LeanModel(weights, max_seq_len=96, num_layers=2) if kind == "layers" else None
    stepper = FusedStepper(target, draft, ngram=NgramDrafter() if kind == "ngram" else None, compile=False)
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=40)
    for _ in range(2):  # graphs are reused across requests
        out, stats = _run(target, stepper, prompt, gamma if kind != "none" else 0, GREEDY, 40)
        assert out == expected
    assert stats.new_tokens == 40


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["features", "layers"])
def test_a_padded_prefill_fills_the_caches_as_an_exact_one_and_decodes_the_same(device, kind):
    """Prefills padded to 32 (from graphs on CUDA; eager here on the CPU, forced): the target's
    K/V and features and the draft's cache over the text equal an unpadded prefill's, and greedy
    decoding after it equals plain decoding; a prompt whose padding would pass the context's end
    is prefilled unpadded."""
    if kind == "features":
        target, draft = feature_pair(64, seed=2, device=device)
    else:
        weights, target = _models(device)
        draft = LeanModel(weights, max_seq_len=96, num_layers=1)
    prompt = [(7 * i + 3) % 60 for i in range(21)]  # 20 prefilled positions: padded to 32
    snapshots = {}
    for padded in (False, True):
        stepper = FusedStepper(target, draft, compile=False)
        stepper.prefill_graphs = padded
        stepper.begin(prompt, GREEDY)
        valid = stepper.draft_valid
        snapshots[padded] = [target.k_cache[:, :20].clone(), target.v_cache[:, :20].clone(),
                             draft.k_cache[:, :valid].clone(), draft.v_cache[:, :valid].clone()]
        if target.features is not None:
            snapshots[padded].append(target.features[:20].clone())
    assert {key[2] for key in stepper.prefills if key[0] == "prefill"} == {32}
    for exact, padded in zip(snapshots[False], snapshots[True]):
        torch.testing.assert_close(padded, exact, atol=1e-4, rtol=1e-4)
    for text in (prompt, prompt * 3 + [1, 2, 3]):  # 65 prefilled positions: 128 would not fit 96
        expected = reference_generate(target, text, params=GREEDY, max_new_tokens=12)
        out, _ = _run(target, stepper, text, 3, GREEDY, 12)
        assert out == expected
    assert max(key[2] for key in stepper.prefills if key[0] == "prefill") <= 64  # no 128


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sampling_is_reproducible_with_a_seed(device):
    weights, target = _models(device)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    prompt = [3, 1, 4, 1, 5]
    draft_fused = LeanModel(weights, max_seq_len=96, num_layers=1)
    fused, _ = _run(target, FusedStepper(target, draft_fused, compile=False), prompt, 3, params, 30, seed=7)
    # The fused step draws its uniforms in another order than the generic loop, so tokens differ
    # between the two paths; their laws are compared by the chi-square test below.
    again, _ = _run(target, FusedStepper(target, draft_fused, compile=False), prompt, 3, params, 30, seed=7)
    assert fused == again


def _two_token_law(model, prompt):
    """P(first two tokens after `prompt`) of a lean model at temperature 1, by plain softmax
    (not the code under test): [V * V]."""
    vocab = model.vocab_size
    law = torch.zeros(vocab, vocab, dtype=torch.float64)
    model.truncate(0)
    first = torch.softmax(model.forward(torch.tensor(prompt), 0)[-1].double(), -1)
    for token in range(vocab):
        model.truncate(0)
        law[token] = first[token] * torch.softmax(model.forward(torch.tensor(prompt + [token]), 0)[-1].double(), -1)
    return law.flatten()


def _fused_two_token_counts(target, draft, prompt, params, n):
    stepper = FusedStepper(target, draft, compile=False)
    generator = torch.Generator().manual_seed(0)
    codes = []
    for _ in range(n):
        tokens = [t for step in generate(target, None, prompt, gamma=2, params=params, max_new_tokens=2,
                                         generator=generator, stepper=stepper) for t in step.tokens]
        codes.append(tokens[0] * target.vocab_size + tokens[1])
    return codes


def test_fused_two_token_law_matches_the_target_law_and_always_accepting_is_caught(gof, monkeypatch):
    """Chi-square of 3000 two-token outputs (vocab 8: 64 cells, temperature 1) against the exact
    target law. The draft (1 layer of 3) is far from the target, so most steps reject and draw
    from the residual. Negative control: the fused step's rule accepting every draft token (all
    acceptance uniforms 0), whose exact law is the draft's own; its power is computed and asserted."""
    from speculant import acceptance, fused

    weights = random_weights(tiny_config(vocab_size=8), seed=3, scale=2.0)
    target = LeanModel(weights, max_seq_len=16)
    draft = LeanModel(weights, max_seq_len=16, num_layers=1)
    prompt = [1, 2, 3]
    params = SamplingParams(temperature=1.0)
    law = _two_token_law(target, prompt).numpy()
    n = 3000
    fit = gof.chi_square(_fused_two_token_counts(target, draft, prompt, params, n), law)
    assert fit.pvalue > gof.SIGNIFICANCE, fit

    always_accept = lambda tokens, draft_probs, target_probs, accept_uniforms, *rest: acceptance.verify(
        tokens, draft_probs, target_probs, torch.zeros_like(accept_uniforms), *rest)
    monkeypatch.setattr(fused, "verify", always_accept)
    bad_law = _two_token_law(draft, prompt).numpy()  # every token is the draft's while all are kept
    power = gof.power(law, bad_law, n)
    assert power.power > 0.99, power
    assert gof.chi_square(_fused_two_token_counts(target, draft, prompt, params, n), law).pvalue < gof.SIGNIFICANCE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_new", [1, 3, 4, 9])
def test_chunked_plain_decoding_honours_stop_tokens_and_max_new_tokens(device, max_new):
    """Plain decoding runs up to 4 target calls per graph replay; what comes after a stop token or
    past max_new_tokens is dropped, and stats count every target call."""
    _, target = _models(device)
    prompt = [5, 9, 2, 7]
    full = reference_generate(target, prompt, params=GREEDY, max_new_tokens=12)
    stop = full[5]  # a stop token in the middle of the second chunk
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=max_new, stop_ids=[stop])
    stepper = FusedStepper(target, None, compile=False, plain_chunk=4)
    generator = torch.Generator(device=target.device).manual_seed(0)
    steps = list(generate(target, None, prompt, gamma=0, params=GREEDY, max_new_tokens=max_new, stop_ids=[stop],
                          generator=generator, stepper=stepper))
    assert [t for s in steps for t in s.tokens] == expected
    stats = steps[-1].stats
    assert stats.target_calls >= stats.new_tokens and len(stats.gamma_history) == stats.target_calls
    # whole chunks of 4 target calls while at least 4 tokens may come, then one at a time;
    # the step with the stop token emits up to it
    sizes, calls = [], 0
    while calls < len(expected):
        chunk = 4 if max_new - calls >= 4 else 1
        sizes.append(min(chunk, len(expected) - calls))
        calls += chunk
    assert [len(s.tokens) for s in steps] == sizes and stats.target_calls == calls


@pytest.mark.parametrize("device", DEVICES)
def test_run_ahead_gives_the_text_of_one_replay_at_a_time_over_requests_ended_by_stops(device):
    """Run-ahead launches the next feature-draft replay before reading this one. Seven requests in
    a row on one stepper, greedy and sampled, several ended by a stop token (the replay launched
    ahead is dropped, the next request starts clean) or by max_new_tokens: the same tokens and
    per-step stats as a stepper without run-ahead."""
    target, draft = feature_pair(8, seed=5, kept=6, device=device)
    gamma, make_drafter = 3, lambda: FeatureDrafter(draft, target, candidates=3)
    prompts = [[1, 2, 3, 4, 5], [7, 0, 1], [2, 2, 2, 2, 2, 2, 6], [5, 1]]
    stop = [reference_generate(target, prompts[0], params=GREEDY, max_new_tokens=12)[9]]
    runs = {}
    for run_ahead in (False, True):
        stepper = FusedStepper(target, draft, compile=False, candidates=3, run_ahead=run_ahead)
        runs[run_ahead] = []
        for i, (prompt, params, max_new) in enumerate(zip(prompts + prompts[:3], [GREEDY, SamplingParams()] * 4,
                                                          [40, 40, 27, 40, 33, 40, 40])):
            steps = list(generate(target, make_drafter(), prompt, gamma=gamma, params=params, max_new_tokens=max_new,
                                  stop_ids=stop if i % 2 == 0 else [], generator=torch.Generator(device=device).manual_seed(i),
                                  stepper=stepper))
            runs[run_ahead].append(([t for s in steps for t in s.tokens], [(s.num_drafted, s.num_accepted) for s in steps],
                                    steps[-1].stats.finish_reason, steps[-1].stats.target_calls))
        assert (stepper.ahead_launches > 0) == run_ahead
    assert runs[True] == runs[False]
    reasons = [run[2] for run in runs[True]]
    assert reasons.count("stop") >= 2 and "length" in reasons


def test_chunked_plain_sampling_follows_the_target_law_over_two_tokens():
    """Chi-square of 4000 (t1, t2) pairs, both from one chunk (t1 is fed back on the device),
    against the exact two-token law of the target (vocab 8: 64 cells)."""
    weights = random_weights(tiny_config(vocab_size=8), seed=3, scale=2.0)
    target = LeanModel(weights, max_seq_len=16)
    prompt = [1, 2, 3]
    target.truncate(0)
    first = torch.softmax(target.forward(torch.tensor(prompt), 0)[-1].double(), -1)  # [8]
    law = torch.zeros(8, 8, dtype=torch.float64)
    for t1 in range(8):
        target.truncate(0)
        law[t1] = first[t1] * torch.softmax(target.forward(torch.tensor(prompt + [t1]), 0)[-1].double(), -1)
    stepper = FusedStepper(target, None, compile=False, plain_chunk=2)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(64)
    n = 4000
    for _ in range(n):
        [step] = list(generate(target, None, prompt, gamma=0, params=SamplingParams(), max_new_tokens=2,
                               generator=generator, stepper=stepper))
        counts[step.tokens[0] * 8 + step.tokens[1]] += 1
    def pvalue(candidate_law):
        expected = (candidate_law.flatten() * n).numpy()
        keep = expected >= 5  # pool cells expected to hold fewer than 5 draws
        observed = counts.numpy()
        return chisquare(list(observed[keep]) + [observed[~keep].sum()],
                         list(expected[keep]) + [expected[~keep].sum()]).pvalue

    assert pvalue(law) > 1e-4
    # Negative control: the law a chunk would have if it did not feed t1 back (t2 drawn after the
    # prompt's last token again). The same draws must reject it.
    target.truncate(0)
    stale = torch.softmax(target.forward(torch.tensor(prompt + [prompt[-1]]), 0)[-1].double(), -1)
    assert pvalue(first[:, None] * stale[None, :]) < 1e-4


def test_which_drafters_fuse_is_read_from_the_drafters_own_settings():
    """fused_stepper decides alone: a lean target with no drafter, n-gram, or one lean draft model
    (its candidates, and the lookup branch beside it) fuses; a hierarchy or a target through another
    implementation does not."""
    from speculant.drafters.base import NoDrafter
    from speculant.drafters.hierarchical import SpeculativeDrafter
    from speculant.drafters.lookup import LookupDrafter
    from speculant.fused import fused_stepper
    from speculant.models.markov import MarkovModel
    from speculant.step import GenericStepper

    weights, target = _models("cpu")
    draft = LeanModel(weights, max_seq_len=96, num_layers=1)
    feature_target, feature_draft = feature_pair(8, seed=5, kept=6)
    ngram = NgramDrafter()
    cases = [
        (target, NoDrafter(), None, None, 1, 0),
        (target, ngram, None, ngram, 1, 0),
        (target, ModelDrafter(draft, candidates=3), draft, None, 3, 0),
        (target, LookupDrafter(ModelDrafter(draft, candidates=2), ngram, 5), draft, ngram, 2, 5),
        (feature_target, FeatureDrafter(feature_draft, feature_target), feature_draft, None, 1, 0),
    ]
    for model, drafter, draft_model, lookup_ngram, candidates, lookup in cases:
        stepper = fused_stepper(model, drafter, compile=False)
        assert stepper.target is model and stepper.draft_model is draft_model
        assert (stepper.candidates, stepper.lookup) == (candidates, lookup)
        assert lookup_ngram is None or stepper.ngram is lookup_ngram
    assert fused_stepper(target, LookupDrafter(ModelDrafter(draft), ngram, 4), compile=False).ngram is ngram
    assert fused_stepper(target, SpeculativeDrafter(GenericStepper(draft, NgramDrafter()), 2)) is None
    assert fused_stepper(MarkovModel(torch.zeros(4, 4)), NgramDrafter()) is None


@pytest.mark.parametrize("device", DEVICES)
def test_the_compiled_sampling_tail_of_a_candidate_tree_gives_the_eager_tokens(device):
    """The K 4 tree without a lookup branch, its sampling functions through torch.compile (the
    configuration whose compile failed on CUDA under torch 2.11: pointwise concatenation): no
    function fell back to eager, and greedy and seeded sampled tokens equal the eager stepper's."""
    target, draft = feature_pair(8, seed=5, kept=6, device=device)
    prompt = [1, 2, 3, 4, 5, 1, 2]
    runs = {}
    for compile in (False, True):
        stepper = FusedStepper(target, draft, compile=compile, use_graphs=False, candidates=4)
        runs[compile] = [_run(target, stepper, prompt, 3, params, 24, seed=3)[0]
                         for params in (GREEDY, SamplingParams(temperature=0.8, top_k=6))]
        assert not stepper.eager_sampling
    assert runs[True] == runs[False]


def test_a_sampling_function_whose_compile_fails_runs_eagerly_and_says_why(monkeypatch):
    from speculant import fused

    def broken(*args):
        raise RuntimeError("InductorError: no kernel for you\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda function, **options: broken)
    failures: dict[str, str] = {}
    double = fused._compiled_or_eager(lambda x: 2 * x, failures)
    with pytest.warns(UserWarning, match="runs eagerly"):
        assert double(torch.tensor(3)).item() == 6
    assert double(torch.tensor(4)).item() == 8  # no second try, no second warning
    assert failures == {"<lambda>": "RuntimeError: InductorError: no kernel for you"}


def test_after_a_sampling_function_falls_back_the_graphs_captured_before_are_dropped(monkeypatch):
    """Lengths priced against each other must run the same functions: when `finish` fails to
    compile at γ 3, the step of γ 2 captured before with its compiled form is dropped (recaptured on
    use with the eager one), and the tokens stay plain greedy's."""
    def fake_compile(function, **options):
        if function.__name__ != "finish":
            return function

        def compiled(target_logits, draft_tokens, *rest):
            if draft_tokens.shape[0] == 3:
                raise RuntimeError("InductorError: not this shape")
            return function(target_logits, draft_tokens, *rest)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    weights, target = _models("cpu")
    draft = LeanModel(weights, max_seq_len=96, num_layers=2)
    stepper = FusedStepper(target, draft, compile=True, use_graphs=False)
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=16)
    assert _run(target, stepper, prompt, 2, GREEDY, 16)[0] == expected
    runners_before = [runner for key, runner in stepper.graphs.items() if key[0] == "model"]
    with pytest.warns(UserWarning, match="finish failed"):
        assert _run(target, stepper, prompt, 3, GREEDY, 16)[0] == expected
    assert set(stepper.eager_sampling) == {"finish"}
    assert runners_before and not any(runner in stepper.graphs.values() for runner in runners_before)


@pytest.mark.parametrize("device", DEVICES)
def test_regionally_compiled_forwards_give_the_eager_tokens(device):
    """compile="layers" (one compiled decoder layer for all layers of the target and of a draft model,
    the forwards eager around it: the mode that keeps a large pair's compiles short): the target and
    the draft hold a compiled layer, and greedy and seeded sampled tokens equal the eager stepper's."""
    weights, _ = _models(device)
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    runs = {}
    for compile in (False, "layers"):
        target, draft = LeanModel(weights, max_seq_len=96), LeanModel(weights, max_seq_len=96, num_layers=2)
        stepper = FusedStepper(target, draft, compile=compile, use_graphs=False)
        runs[compile] = [_run(target, stepper, prompt, 3, params, 20, seed=4)[0]
                         for params in (GREEDY, SamplingParams(temperature=0.8))]
        assert ("_layer" in target.__dict__) == ("_layer" in draft.__dict__) == (compile == "layers")
    assert runs["layers"] == runs[False]
    with pytest.raises(ValueError, match="compile must be False, True or 'layers'"):
        FusedStepper(target, draft, compile="whole")


def test_a_sampling_function_compiles_its_concatenations_to_copy_kernels(monkeypatch):
    """torch 2.11's inductor may lower a small torch.cat to one pointwise kernel whose Identity index
    its Triton printer fails on (fused.NO_POINTWISE_CAT): while a sampling function compiles, cat is
    lowered to copy kernels. Here inductor is told to lower every cat pointwise (force_pointwise_cat,
    the CUDA choice forced on the CPU): the pointwise lowering never runs, the result is eager's, and
    the lowering is restored afterwards."""
    import torch._inductor.config as inductor_config
    from torch._inductor import lowering

    from speculant import fused

    pointwise = []
    original = lowering.pointwise_cat

    def watched(*args, **kwargs):
        pointwise.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(lowering, "pointwise_cat", watched)
    failures = {}

    def tail(a, b):
        return torch.cat([torch.stack([a.sum(), b.max()]), a * 2, b[:1] + 1])

    compiled = fused._compiled_or_eager(tail, failures)
    a, b = torch.arange(5.0), torch.tensor([3.0, -1.0])
    with inductor_config.patch(force_pointwise_cat=True):  # torch's own config patch: restored after
        assert torch.equal(compiled(a, b), tail(a, b))
    assert not failures and not pointwise and lowering.pointwise_cat is watched


def test_every_tensor_the_fused_forwards_read_is_an_inference_tensor():
    """dynamo guards on a tensor's dispatch keys: a compiled forward that reads a normal tensor in one
    call (an eager prefill, a view of the target's feature buffer) and an inference tensor in the next
    (a step) compiles twice. Over two requests of a feature draft with candidates (prefills, steps,
    the draft's catch-up), every tensor the target's and the draft's forwards get is an inference
    tensor, whatever mode the caller is in."""
    target, draft = feature_pair(8, seed=5, kept=6)
    stepper = FusedStepper(target, draft, compile=False, candidates=3)
    seen = []

    def spy(fn):
        def call(*args):
            seen.extend((fn.__name__, a.is_inference()) for a in args if isinstance(a, torch.Tensor))
            return fn(*args)
        call.__name__ = fn.__name__
        return call

    stepper.target_fn, stepper.draft_fn = spy(stepper.target_fn), spy(stepper.draft_fn)
    for i, prompt in enumerate([[1, 2, 3, 4, 5, 6, 7], [7, 0, 1]]):
        list(generate(target, FeatureDrafter(draft, target, candidates=3), prompt, gamma=3, params=GREEDY,
                      max_new_tokens=12, generator=torch.Generator().manual_seed(i), stepper=stepper))
    assert len(seen) > 20 and {inference for _, inference in seen} == {True}, [s for s in seen if not s[1]][:3]
