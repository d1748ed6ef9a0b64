"""Hierarchical drafting (a draft for the draft) and adaptive γ keep the target's law exactly."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from speculant.adaptive import AdaptiveGamma, StepCosts
from speculant.drafters.base import Draft
from speculant.drafters.hierarchical import SpeculativeDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.fused import GraphedModel, GraphedTail
from speculant.models.markov import MarkovModel
from speculant.models.transformer import LeanModel, int8_weights, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams, logits_to_probs
from speculant.step import GenericStepper, chain_tail
from tests.conftest import SIGNIFICANCE, chi_square_power, reference_transform

VOCAB = 4
PROMPT = [0, 1]


def _tables():
    gen = torch.Generator().manual_seed(11)
    target = torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64) * 1.5
    middle = target + torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64) * 1.2
    small = torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64) * 1.5  # unrelated
    return target, middle, small


def _exact_law(table, params, length=3):
    """P(first `length` tokens) of the Markov target after PROMPT: [VOCAB ** length]. The transform
    is the tests' own float64 one (conftest), not the code under test."""
    probs = reference_transform(table.numpy(), params.temperature, params.top_k, params.top_p, params.min_p)
    law = []
    for seq in itertools.product(range(VOCAB), repeat=length):
        prob, prev = 1.0, PROMPT[-1]
        for token in seq:
            prob *= float(probs[prev, token])
            prev = token
        law.append(prob)
    return torch.tensor(law)


def _sample_law(make_drafter, target_table, params, runs, gamma, length=3, target=None, seed=1234):
    target = target if target is not None else MarkovModel(target_table)
    drafter = make_drafter()
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB**length)
    for _ in range(runs):
        out = []
        for step in generate(target, drafter, PROMPT, gamma=gamma() if callable(gamma) else gamma, params=params,
                             max_new_tokens=length, generator=generator):
            out += step.tokens
        index = 0
        for token in out:
            index = index * VOCAB + token
        counts[index] += 1
    return counts


def _three_levels(middle_table, small_table, inner_gamma=2):
    return lambda: SpeculativeDrafter(GenericStepper(MarkovModel(middle_table), ModelDrafter(MarkovModel(small_table))),
                                      inner_gamma)


def _pvalue(counts, law):
    keep = law > 0
    assert counts[~keep].sum() == 0, "a token sequence of probability 0 was emitted"
    law = law[keep].double()  # float32 laws sum to 1 only within rounding: normalised here
    counts, expected = counts[keep].double(), law / law.sum() * counts.sum()
    rare = expected < 5  # pooled into one cell: the chi-square approximation needs expected counts >= 5
    if rare.any():
        counts = torch.cat([counts[~rare], counts[rare].sum().view(1)])
        expected = torch.cat([expected[~rare], expected[rare].sum().view(1)])
    return chisquare(counts.numpy(), expected.numpy()).pvalue


def _assert_control_caught(sample, law, runs):
    """A negative control's law has no closed form here, so its power is estimated honestly: one
    half of the runs estimates the broken sampler's law, the power of the chi-square test with the
    other half's size is computed against that estimate (noncentral chi-square, conftest), and the
    other half must fail the test. `sample(runs, seed)` -> counts over the cells."""
    estimate = sample(runs // 2, 99)
    power = chi_square_power(law.numpy(), (estimate / estimate.sum()).numpy(), runs // 2)
    assert power.power > 0.99, power
    assert _pvalue(sample(runs // 2, 1234), law) < SIGNIFICANCE


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.8)],
                         ids=["t1", "top_p"])
def test_three_level_hierarchy_emits_the_target_law(params):
    """target <- middle <- small, 3000 runs of 3 tokens (64 cells) against the exact law."""
    target, middle, small = _tables()
    counts = _sample_law(_three_levels(middle, small), target, params, runs=3000, gamma=3)
    assert _pvalue(counts, _exact_law(target, params)) > SIGNIFICANCE


def test_three_level_hierarchy_with_adaptive_gamma_emits_the_target_law():
    target, middle, small = _tables()
    params = SamplingParams(temperature=1.0)
    policy = AdaptiveGamma(max_gamma=4, initial_gamma=2)  # shared across runs: a prior that moves
    counts = _sample_law(_three_levels(middle, small), target, params, runs=3000, gamma=lambda: policy)
    assert _pvalue(counts, _exact_law(target, params)) > SIGNIFICANCE
    assert len(set(policy.history)) > 1, "the policy never changed γ, so the test proves little"


class ReportsInnerLaw(SpeculativeDrafter):
    """Negative control: passes up the SMALL model's law instead of the middle's (a plausible bug)."""

    def __init__(self, middle, small, inner_gamma):
        super().__init__(GenericStepper(MarkovModel(middle), ModelDrafter(MarkovModel(small))), inner_gamma)
        self.small_table = small

    def propose(self, context, gamma, params, generator):
        draft = super().propose(context, gamma, params, generator)
        previous = torch.tensor([context[-1]] + draft.tokens.tolist()[:-1])
        return Draft(draft.tokens, logits_to_probs(self.small_table[previous], params).to(draft.probs.dtype))


def test_hierarchy_reporting_the_inner_law_is_caught():
    """The wrong q changes the acceptance of every draft token: 1500 runs against the exact law,
    with the power estimated from another 1500 (asserted > 0.99)."""
    target, middle, small = _tables()
    params = SamplingParams(temperature=1.0)
    sample = lambda runs, seed: _sample_law(lambda: ReportsInnerLaw(middle, small, 2), target, params, runs=runs,
                                            gamma=3, seed=seed)
    _assert_control_caught(sample, _exact_law(target, params), runs=3000)


def _lean_law(model, length=3):
    """P(first `length` tokens after PROMPT) of a lean model at temperature 1: [VOCAB ** length]."""
    law = []
    for seq in itertools.product(range(VOCAB), repeat=length):
        model.truncate(0)
        probs = model.forward(torch.tensor(PROMPT + list(seq[:-1])), 0).softmax(-1)[len(PROMPT) - 1:]
        law.append(float(torch.prod(probs[torch.arange(length), torch.tensor(seq)])))
    return torch.tensor(law, dtype=torch.float64)


@pytest.mark.parametrize("graphed", [False, True])
def test_a_hierarchy_of_lean_models_with_an_int8_middle_emits_the_target_law(graphed):
    """target <- int8 copy of another model <- that model's first layer, sampled: the real
    components of `--draft int8 --draft ...`. The middle differs from the target (its own weights),
    so about a third of its tokens are rejected and a wrong law would show. graphed: the middle's
    verifications through fused.GraphedModel (static_forward, as on CUDA; here without graphs)."""
    cfg = tiny_config(vocab_size=VOCAB)
    target = LeanModel(random_weights(cfg, seed=0, scale=1.5))
    other = random_weights(cfg, seed=1, scale=1.5)
    params = SamplingParams(temperature=1.0)
    middle = (lambda m: GraphedModel(m, use_graphs=False)) if graphed else (lambda m: m)
    make = lambda: SpeculativeDrafter(GenericStepper(middle(LeanModel(int8_weights(other))),
                                                     ModelDrafter(LeanModel(other, num_layers=1))), 2)
    law = _lean_law(target)
    counts = _sample_law(make, None, params, runs=2000, gamma=3, target=target)
    assert _pvalue(counts, law) > SIGNIFICANCE

    class ReportsTheFirstLayersLaw(SpeculativeDrafter):
        """Negative control: passes up the inner drafter's law (the first layer's) for the middle's."""

        def propose(self, context, gamma, params, generator):
            draft = super().propose(context, gamma, params, generator)
            first = LeanModel(other, num_layers=1)
            logits = first.forward(torch.tensor(context + draft.tokens.tolist()[:-1]), 0)[len(context) - 1:]
            return Draft(draft.tokens, logits_to_probs(logits, params).to(draft.probs.dtype))

    bad = lambda: ReportsTheFirstLayersLaw(GenericStepper(LeanModel(int8_weights(other)),
                                                          ModelDrafter(LeanModel(other, num_layers=1))), 2)
    sample = lambda runs, seed: _sample_law(bad, None, params, runs=runs, gamma=3, target=target, seed=seed)
    _assert_control_caught(sample, law, runs=2000)


@pytest.mark.parametrize("middle", ["layers", "int8", "graphed", "graphed+model", "graphed+target"])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("gamma", [1, 4, "auto"])
def test_hierarchical_greedy_output_equals_plain_greedy(depth, gamma, middle):
    """graphed: the middle levels through fused.GraphedModel and their steps' tails through
    fused.GraphedTail (on CUDA CUDA graphs, here the same functions run eagerly); +model: the last level a
    model drafter over a GraphedModel too (its one-token forwards); +target: the target's verifications
    and tails too (what speculant.api runs for a hierarchy on CUDA)."""
    device = "cuda" if middle.startswith("graphed") and torch.cuda.is_available() else "cpu"
    weights = random_weights(tiny_config(), seed=0, scale=3.0).to(device)
    target = LeanModel(weights)
    graphed = (lambda m: GraphedModel(m)) if middle.startswith("graphed") else (lambda m: m)
    tail = GraphedTail if middle.startswith("graphed") else (lambda: None)
    inner = ModelDrafter(graphed(LeanModel(weights, num_layers=1))) if middle == "graphed+model" else NgramDrafter()
    if depth == 3:
        inner = SpeculativeDrafter(GenericStepper(graphed(LeanModel(weights, num_layers=1)), inner, tail()), 2)
    middle_model = LeanModel(int8_weights(weights)) if middle == "int8" else graphed(LeanModel(weights, num_layers=2))
    drafter = SpeculativeDrafter(GenericStepper(middle_model, inner, tail()), 3)
    prompt = [1, 2, 3, 4, 5, 1, 2]
    greedy = SamplingParams(temperature=0)
    expected = reference_generate(target, prompt, params=greedy, max_new_tokens=50)
    policy = AdaptiveGamma() if gamma == "auto" else gamma
    out = []
    stepper = GenericStepper(GraphedModel(target), drafter, GraphedTail()) if middle == "graphed+target" else None
    for step in generate(target, drafter, prompt, gamma=policy, params=greedy, max_new_tokens=50, stepper=stepper):
        out += step.tokens
    assert out == expected
    assert drafter.stats.target_calls > 0 and 0 <= drafter.stats.alpha <= 1


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=20)])
def test_a_graphed_tail_is_the_chain_tail_bit_for_bit(params):
    """fused.GraphedTail against step.chain_tail on the same inputs: the same probs and emitted tokens,
    bit for bit, for drafts with laws and without (a point mass), over calls that reuse one runner per
    draft length (its static buffers refilled). On CUDA from graphs, here eagerly."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tail, gen = GraphedTail(), torch.Generator().manual_seed(0)
    for call in range(12):  # 6 keys (length, laws or not), each met twice: the second call refills its buffers
        gamma = 1 + call % 3
        logits = (3 * torch.randn(gamma + 1, 40, generator=gen)).to(device)
        tokens = torch.randint(0, 40, (gamma,), generator=gen).to(device)
        laws = torch.softmax(torch.randn(gamma, 40, generator=gen), -1).to(device) if call % 2 else None
        uniforms = torch.rand(gamma + 1, generator=gen).to(device)
        probs, out = tail(params, logits, tokens, laws, uniforms)
        expected_probs, expected_out = chain_tail(params, logits, tokens, laws, uniforms)
        assert torch.equal(probs, expected_probs) and torch.equal(out, expected_out)
    assert len(tail.runners) == 6 and all((r.graph is not None) == (device == "cuda") for r in tail.runners.values())


def test_a_hierarchy_with_graphed_tails_samples_the_eager_steps_tokens():
    """At T 1, seed by seed, a hierarchy whose levels' tails run through GraphedTail emits the tokens of
    the same hierarchy stepped op by op: the same uniforms meet the same functions (the law is the
    eager step's, which the chi-square tests above check)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = random_weights(tiny_config(), seed=0, scale=1.0).to(device)
    target, params = LeanModel(weights), SamplingParams(temperature=1.0)

    def run(tail, seed):
        middle = SpeculativeDrafter(GenericStepper(LeanModel(weights, num_layers=1), NgramDrafter(), tail()), 2)
        generator = torch.Generator(device=device).manual_seed(seed)
        steps = generate(target, middle, [1, 2, 3, 1, 2], gamma=3, params=params, max_new_tokens=40,
                         generator=generator, stepper=GenericStepper(target, middle, tail()))
        return [t for step in steps for t in step.tokens]

    for seed in range(3):
        assert run(GraphedTail, seed) == run(lambda: None, seed)


class _Perfect:
    """A drafter that is always right (it asks an oracle), at no cost."""

    def __init__(self, continuation):
        self.continuation = continuation

    def reset(self):
        pass

    def propose(self, context, gamma, params, generator):
        done = len(context) - len(PROMPT)
        return Draft(torch.tensor(self.continuation[done : done + gamma]), None)


def _costs(step_seconds, max_gamma):
    """The step-cost table of a step that drafts n tokens (speculant.calibrate measures it)."""
    return StepCosts(tuple(step_seconds(n) for n in range(max_gamma + 1)))


def test_adaptive_gamma_grows_when_drafts_are_always_right():
    policy = AdaptiveGamma(_costs(lambda n: 1e-5 * n + 1e-3, 8), initial_gamma=2)
    for _ in range(40):
        gamma = policy.choose()
        policy.observe(gamma, gamma)
    assert policy.history[-1] == 8


def test_adaptive_gamma_switches_off_when_drafts_always_fail_and_probes_again():
    policy = AdaptiveGamma(_costs(lambda n: 5e-4 * n + 1e-3 + 1e-4 * n, 8), initial_gamma=4, probe_every=4)
    for _ in range(200):
        gamma = policy.choose()
        policy.observe(gamma, 0)
    tail = policy.history[50:]
    assert tail.count(0) > 0.9 * len(tail), "speculation should be off almost always"
    assert any(g > 0 for g in tail), "it must probe now and then"


def test_adaptive_gamma_prefers_short_drafts_when_verification_grows_with_gamma():
    """On a CPU the target's cost grows with the positions verified; the policy must see that."""
    policy = AdaptiveGamma(_costs(lambda n: 1e-4 * n + 1e-3 * (1 + n), 12), initial_gamma=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        gamma = policy.choose()
        accepted = 0
        while accepted < gamma and torch.rand((), generator=gen) < 0.6:
            accepted += 1
        policy.observe(gamma, accepted)
    # α = 0.6 and verification costing (1+γ) ms: long drafts are a loss; best γ is 1 or 0
    assert max(policy.history[100:]) <= 2


def test_a_graphed_middle_models_forward_is_the_models_forward():
    """fused.GraphedModel.forward against LeanModel.forward on the same weights: the same logits (to
    rounding: static_forward attends over the whole cache, masked by position), the cache length set,
    after a roll-back too (the slots past it are stale and masked); a tree goes to the model itself.
    On CUDA through one graph per row count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = random_weights(tiny_config(), seed=0, scale=1.0).to(device)
    plain, graphed = LeanModel(weights), GraphedModel(LeanModel(weights))
    tokens = torch.tensor([1, 5, 2, 7, 3, 9, 4, 6, 8, 2], device=device)
    calls = [(tokens, 0), (tokens[:3], 10), (tokens[:2], 13), (tokens[4:8], 11), (tokens[:1], 15)]  # 11: rolled back
    for chunk, start in calls:
        plain.truncate(min(plain.length, start))
        graphed.truncate(min(graphed.length, start))
        expected, got = plain.forward(chunk, start), graphed.forward(chunk, start)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())
        assert graphed.length == plain.length == start + chunk.shape[0]
    ancestors = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    tree = graphed.forward(tokens[:3], 16, ancestors)  # LeanModel.forward over a cache static_forward wrote
    assert torch.allclose(tree, plain.forward(tokens[:3], 16, ancestors), atol=1e-4, rtol=1e-4)
    assert graphed.vocab_size == plain.vocab_size and graphed.max_seq_len == plain.max_seq_len
    if device == "cuda":
        assert sorted(graphed._runners) == [1, 2, 3, 4, 10]
