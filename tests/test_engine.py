"""The whole engine: exact law end to end (toy Markov models), greedy equality with the reference
(tiny Llama and Gemma 3), cache rollback, determinism, statistics, context limits."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from speculant.analysis import expected_speedup
from speculant.drafters.base import Draft
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.models.base import ContextOverflowError
from speculant.models.markov import MarkovModel
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams, logits_to_probs

GREEDY = SamplingParams(temperature=0)


def speculate(target, drafter, prompt, **kwargs):
    """Run the engine to the end: (emitted tokens, steps)."""
    steps = list(generate(target, drafter, prompt, **kwargs))
    return [t for step in steps for t in step.tokens], steps


# ================================================================ end to end: the exact law

VOCAB = 5
_g = torch.Generator().manual_seed(12)
TARGET_TABLE = torch.randn(VOCAB, VOCAB, generator=_g) * 1.5  # row c: the target's logits after c
DRAFT_TABLE = TARGET_TABLE + torch.randn(VOCAB, VOCAB, generator=_g) * 0.8  # a perturbed copy
# ends in [.., 1, 2]: the n-gram drafter finds [1, 2] at index 1 and proposes 3, 4, 2, 1
MARKOV_PROMPT = [0, 1, 2, 3, 4, 2, 1, 0, 3, 1, 2]
START = MARKOV_PROMPT[-1]
NUM_RUNS = 1500
NUM_TOKENS = 6  # the engine runs 6 tokens; the laws of tokens 1-3 and of tokens 4-6 are tested
TOP_P = SamplingParams(top_p=0.8)
PLAIN = SamplingParams()


class MisreportingDrafter:
    """A model drafter that samples from its law but reports uniform probabilities."""

    def __init__(self, inner: ModelDrafter) -> None:
        self.inner = inner

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, context, gamma, params, generator) -> Draft:
        draft = self.inner.propose(context, gamma, params, generator)
        if draft.probs is None:
            return draft
        return Draft(draft.tokens, torch.full_like(draft.probs, 1.0 / draft.probs.shape[-1]))


def markov_runs(drafter, gamma: int, params: SamplingParams, seed: int = 0) -> np.ndarray:
    """NUM_RUNS full engine runs (prefill, caches, truncation, bonus tokens): [NUM_RUNS, 6]."""
    target = MarkovModel(TARGET_TABLE)
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((NUM_RUNS, NUM_TOKENS), dtype=np.int64)
    calls = 0
    for i in range(NUM_RUNS):
        tokens, steps = speculate(target, drafter, MARKOV_PROMPT, gamma=gamma, params=params,
                                  max_new_tokens=NUM_TOKENS, generator=generator)
        out[i] = tokens
        calls += 1 + steps[-1].stats.target_calls
    assert target.forward_calls == calls  # one target forward per step, plus the prefill
    return out


def window_fit(gof, tokens: np.ndarray, params: SamplingParams):
    """THE end-to-end test: chi-square of (t1, t2, t3) and of (t4, t5, t6), 125 cells each,
    against the exact law of the target chain (float64, by hand from the table); Bonferroni over
    the two windows. Returns (adjusted p-value, fits)."""
    target = gof.transform(TARGET_TABLE.numpy(), **asdict(params))
    law = gof.chain_law(START, NUM_TOKENS, target)  # [V]^6
    windows = [law.sum(axis=(3, 4, 5)), law.sum(axis=(0, 1, 2))]
    fits = []
    for k, window in enumerate(windows):
        codes = tokens[:, 3 * k] * VOCAB**2 + tokens[:, 3 * k + 1] * VOCAB + tokens[:, 3 * k + 2]
        fits.append(gof.chi_square(codes, window.ravel()))
    return min(1.0, 2 * min(f.pvalue for f in fits)), fits


def test_the_markov_setup_is_not_degenerate(gof):
    target = gof.transform(TARGET_TABLE.numpy())
    draft = gof.transform(DRAFT_TABLE.numpy())
    beta = np.minimum(target, draft).sum(-1)
    assert 0.5 < beta.min() and beta.max() < 0.97  # drafts are accepted often, rejected often
    top_p = gof.transform(TARGET_TABLE.numpy(), top_p=0.8)
    assert (top_p == 0).any() and (top_p > 0).sum(-1).min() >= 2  # top-p cuts, yet leaves a choice


@pytest.mark.parametrize(
    "drafter_kind, gamma, params",
    [
        ("model", 1, PLAIN),
        ("model", 2, TOP_P),
        ("model", 4, PLAIN),
        ("ngram", 1, TOP_P),
        ("ngram", 2, PLAIN),
        ("ngram", 4, TOP_P),
    ],
    ids=["model-g1-plain", "model-g2-top_p", "model-g4-plain", "ngram-g1-top_p", "ngram-g2-plain", "ngram-g4-top_p"],
)
def test_engine_output_follows_the_exact_target_law(drafter_kind, gamma, params, gof):
    """1500 seeded engine runs on a 5-token Markov target; level 1e-4."""
    drafter = ModelDrafter(MarkovModel(DRAFT_TABLE)) if drafter_kind == "model" else NgramDrafter()
    pvalue, fits = window_fit(gof, markov_runs(drafter, gamma, params), params)
    assert pvalue >= gof.SIGNIFICANCE, fits


def test_engine_with_a_drafter_that_misreports_its_probabilities_is_caught(gof):
    """The drafter samples from its own law but tells the verifier 'uniform'. Same test, γ = 1.
    Its exact law (engine rule: a step that may emit one token drafts nothing) gives the first
    window, with 1500 runs, a noncentrality of ~2500 against a critical value of ~106 (56 pooled
    cells, level 0.5e-4: the Bonferroni share): power 1.0 for that window alone, a lower bound for
    the test (computed and asserted below)."""
    target = gof.transform(TARGET_TABLE.numpy())
    draft = gof.transform(DRAFT_TABLE.numpy())
    uniform = np.full_like(draft, 1.0 / VOCAB)
    bad = gof.speculative_law_gamma1(START, NUM_TOKENS, target, draft, gof.honest_accept(target, uniform),
                                     gof.honest_residual(target, uniform), plain_last_token=True)
    good = gof.chain_law(START, NUM_TOKENS, target)
    power = gof.power(good.sum(axis=(3, 4, 5)), bad.sum(axis=(3, 4, 5)), NUM_RUNS, gof.SIGNIFICANCE / 2)
    assert power.power > 0.999, power
    honest = gof.speculative_law_gamma1(START, NUM_TOKENS, target, draft, gof.honest_accept(target, draft),
                                        gof.honest_residual(target, draft), plain_last_token=True)
    np.testing.assert_allclose(honest, good, atol=1e-12)  # the calculator itself is sound
    drafter = MisreportingDrafter(ModelDrafter(MarkovModel(DRAFT_TABLE)))
    pvalue, _ = window_fit(gof, markov_runs(drafter, 1, PLAIN), PLAIN)
    assert pvalue < gof.SIGNIFICANCE


# ================================================================ greedy equality (tiny transformers)

LEAN_PROMPT = [1, 2, 3, 4, 5, 6, 7]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def llama():
    # scale 4: random weights whose greedy continuation does not collapse into a loop at once
    return random_weights(tiny_config("llama"), seed=0, scale=4.0)


@pytest.fixture(scope="module")
def gemma():
    # untied head: with tied embeddings the tiny Gemma repeats its input token forever
    return random_weights(tiny_config("gemma3", tie_word_embeddings=False), seed=0, scale=4.0)


@pytest.fixture(scope="module")
def references(llama, gemma):
    out = {}
    for name, weights in (("llama", llama), ("gemma3", gemma)):
        out[name] = reference_generate(LeanModel(weights, max_seq_len=128), LEAN_PROMPT, params=GREEDY,
                                       max_new_tokens=NEW_TOKENS)
        assert len(set(out[name])) > 10, out[name]  # not trivially repetitive
    return out


class CorruptingDrafter:
    """Proposes what `inner` (an always-right drafter) proposes, except that each token is replaced,
    with probability `rate` (or at the given positions), by a different token: a drafter that is
    right at a controllable rate. Under greedy decoding p is a point mass, so any q is exact; the
    drafter reports point masses (probs None)."""

    def __init__(self, inner, vocab_size: int, rate: float = 0.0, positions=(), seed: int = 0) -> None:
        self.inner, self.vocab_size, self.rate, self.positions = inner, vocab_size, rate, set(positions)
        self.generator = torch.Generator().manual_seed(seed)  # its own: the engine's draws stay intact

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, context, gamma, params, generator) -> Draft:
        tokens = self.inner.propose(context, gamma, params, generator).tokens.clone()
        for i in range(tokens.shape[0]):
            if i in self.positions or float(torch.rand((), generator=self.generator)) < self.rate:
                shift = 1 + int(torch.randint(self.vocab_size - 1, (), generator=self.generator))
                tokens[i] = (tokens[i] + shift) % self.vocab_size
        return Draft(tokens, None)


def make_drafter(kind: str, weights, max_seq_len: int = 128):
    if kind == "ngram":
        return NgramDrafter()
    right = ModelDrafter(LeanModel(weights, max_seq_len=max_seq_len))  # the target itself: always right
    if kind == "right":
        return right
    if kind == "wrong":
        return CorruptingDrafter(right, weights.cfg.vocab_size, rate=1.0)
    if kind == "rate_0.3":
        return CorruptingDrafter(right, weights.cfg.vocab_size, rate=0.3, seed=1)
    raise ValueError(kind)


@pytest.mark.parametrize("gamma", [1, 4])
@pytest.mark.parametrize("kind", ["right", "wrong", "rate_0.3", "ngram"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_speculation_equals_plain_greedy_token_for_token(arch, kind, gamma, llama, gemma, references):
    weights = llama if arch == "llama" else gemma
    target = LeanModel(weights, max_seq_len=128)
    tokens, steps = speculate(target, make_drafter(kind, weights), LEAN_PROMPT, gamma=gamma, params=GREEDY,
                              max_new_tokens=NEW_TOKENS)
    assert tokens == references[arch]
    stats = steps[-1].stats
    assert stats.finish_reason == "length" and stats.new_tokens == NEW_TOKENS
    if kind == "right":
        assert stats.rejections == 0 and stats.alpha == 1.0
    if kind == "wrong":
        assert stats.accepted == 0 and stats.alpha == 0.0 and stats.tau == 1.0


def test_plain_decoding_through_the_engine_equals_the_reference(llama, references):
    tokens, steps = speculate(LeanModel(llama, max_seq_len=128), NgramDrafter(), LEAN_PROMPT, gamma=0,
                              params=GREEDY, max_new_tokens=NEW_TOKENS)
    assert tokens == references["llama"]
    assert steps[-1].stats.drafted == 0 and steps[-1].stats.target_calls == NEW_TOKENS


def test_a_drafter_right_at_a_set_rate_is_measured_at_that_rate(llama):
    """Each drafted token is corrupted with probability 0.3, so α = 0.7 in expectation. Over 150
    tokens about 130 draft tokens are tested: the standard error of α is ~0.04; tolerance 0.12."""
    target = LeanModel(llama, max_seq_len=256)
    drafter = CorruptingDrafter(make_drafter("right", llama, 256), 64, rate=0.3, seed=2)
    tokens, steps = speculate(target, drafter, LEAN_PROMPT, gamma=3, params=GREEDY, max_new_tokens=150)
    stats = steps[-1].stats
    assert stats.accepted + stats.rejections > 100
    assert abs(stats.alpha - 0.7) < 0.12, stats.alpha
    assert tokens == reference_generate(LeanModel(llama, max_seq_len=256), LEAN_PROMPT, params=GREEDY,
                                        max_new_tokens=150)


def test_stop_token_inside_an_accepted_draft_ends_the_output_there(llama, references):
    reference = references["llama"]
    _, steps = speculate(LeanModel(llama, max_seq_len=128), make_drafter("right", llama), LEAN_PROMPT, gamma=4,
                         params=GREEDY, max_new_tokens=NEW_TOKENS)
    # find a token whose first occurrence is an accepted draft token with more tokens after it in its step
    position, stop = None, None
    offset = 0
    for step in steps:
        for i, token in enumerate(step.tokens[: step.num_accepted]):
            if i + 1 < len(step.tokens) and reference.index(token) == offset + i and offset + i > 0:
                position, stop = offset + i, token
                break
        if stop is not None:
            break
        offset += len(step.tokens)
    assert stop is not None

    tokens, steps = speculate(LeanModel(llama, max_seq_len=128), make_drafter("right", llama), LEAN_PROMPT,
                              gamma=4, params=GREEDY, max_new_tokens=NEW_TOKENS, stop_ids=[stop])
    assert tokens == reference[: position + 1]  # ends at the stop token, nothing after
    assert tokens == reference_generate(LeanModel(llama, max_seq_len=128), LEAN_PROMPT, params=GREEDY,
                                        max_new_tokens=NEW_TOKENS, stop_ids=[stop])
    last = steps[-1]
    assert last.tokens[-1] == stop
    assert len(last.tokens) <= last.num_accepted  # the stop token was an accepted draft token...
    assert last.num_accepted + 1 > len(last.tokens)  # ...and what followed it in the step was dropped
    assert last.stats.finish_reason == "stop" and last.stats.new_tokens == len(tokens)


@pytest.mark.parametrize("kind, gamma", [("right", 4), ("wrong", 4), ("right", 1), ("ngram", 3)])
@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 3, 4, 5, 6, 9, 10, 11])
def test_max_new_tokens_is_exact(kind, gamma, max_new_tokens, llama, references):
    tokens, steps = speculate(LeanModel(llama, max_seq_len=128), make_drafter(kind, llama), LEAN_PROMPT,
                              gamma=gamma, params=GREEDY, max_new_tokens=max_new_tokens)
    assert tokens == references["llama"][:max_new_tokens]
    if max_new_tokens == 0:
        assert steps == []
    else:
        assert steps[-1].stats.finish_reason == "length"
        assert steps[-1].stats.new_tokens == max_new_tokens
        # never drafted past what could be emitted
        assert all(s.num_drafted <= max_new_tokens - 1 for s in steps)


# ---------------------------------------------------------------- context limits


def test_a_prompt_that_fills_the_context_raises_context_overflow(llama):
    target = LeanModel(llama, max_seq_len=16)
    for length in (16, 17, 40):
        with pytest.raises(ContextOverflowError, match="context"):
            next(generate(target, NgramDrafter(), list(range(1, length + 1)), max_new_tokens=4))
    assert issubclass(ContextOverflowError, ValueError)


@pytest.mark.parametrize("kind, gamma", [("right", 4), ("right", 2), ("wrong", 3), ("ngram", 4), ("right", 0)])
@pytest.mark.parametrize("prompt_length", [10, 14, 15])
def test_generation_stops_with_reason_context_when_the_model_is_full(kind, gamma, prompt_length, llama):
    """The output is the reference's: at most max_seq_len tokens in all, never one more."""
    prompt = [(3 * i + 1) % 64 for i in range(prompt_length)]
    target = LeanModel(llama, max_seq_len=16)
    tokens, steps = speculate(target, make_drafter(kind, llama, max_seq_len=16), prompt, gamma=gamma,
                              params=GREEDY, max_new_tokens=100)
    reference = reference_generate(LeanModel(llama, max_seq_len=16), prompt, params=GREEDY, max_new_tokens=100)
    assert len(prompt) + len(reference) == 16
    assert tokens == reference
    assert steps[-1].stats.finish_reason == "context"


# ---------------------------------------------------------------- cache rollback


def test_caches_after_a_rejection_equal_a_fresh_model_fed_the_accepted_tokens(llama):
    """Sampling at temperature 1 with a draft model of other weights, so rejections happen. After
    every step the target's KV cache (up to its length) and its next logits equal those of a fresh
    model fed only the committed tokens; the draft model's cache equals a fresh one fed what the
    drafter says it fed."""
    draft_weights = random_weights(tiny_config("llama"), seed=1, scale=4.0)
    target = LeanModel(llama, max_seq_len=128)
    drafter = ModelDrafter(LeanModel(draft_weights, max_seq_len=128))
    context = list(LEAN_PROMPT)
    rejections = 0
    for step in generate(target, drafter, LEAN_PROMPT, gamma=4, params=PLAIN, max_new_tokens=40,
                         generator=torch.Generator().manual_seed(0)):
        context += step.tokens
        if step.num_accepted == step.num_drafted or step.stats.finish_reason:
            continue
        rejections += 1
        length = target.length
        assert length == len(context) - 1  # committed context minus the token the next step feeds
        fresh = LeanModel(llama, max_seq_len=128)
        fresh_logits = fresh.forward(torch.tensor(context), 0)[-1]
        torch.testing.assert_close(target.k_cache[:, :length], fresh.k_cache[:, :length], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(target.v_cache[:, :length], fresh.v_cache[:, :length], atol=1e-4, rtol=1e-4)
        # the rejected draft's K/V still sit at `length` (rollback only moves the length) ...
        assert target.k_cache[:, length].abs().sum() > 0
        # ... and are overwritten / masked: the next logits are the fresh model's
        next_logits = target.forward(torch.tensor(context[-1:]), length)[-1]
        target.truncate(length)  # leave the engine's state as it was
        torch.testing.assert_close(next_logits, fresh_logits, atol=1e-4, rtol=1e-4)

        model = drafter.model
        assert drafter.fed[: len(context) - len(step.tokens)] == context[: len(context) - len(step.tokens)]
        fresh_draft = LeanModel(draft_weights, max_seq_len=128)
        fresh_draft.forward(torch.tensor(drafter.fed), 0)
        torch.testing.assert_close(model.k_cache[:, : model.length], fresh_draft.k_cache[:, : model.length],
                                   atol=1e-4, rtol=1e-4)
        assert model.length == len(drafter.fed)
    assert rejections >= 3


# ---------------------------------------------------------------- determinism


def test_same_seed_same_output_and_different_seed_different_output(llama):
    draft_weights = random_weights(tiny_config("llama"), seed=1, scale=4.0)

    def run(seed):
        drafter = ModelDrafter(LeanModel(draft_weights, max_seq_len=128))
        tokens, _ = speculate(LeanModel(llama, max_seq_len=128), drafter, LEAN_PROMPT, gamma=3, params=PLAIN,
                              max_new_tokens=30, generator=torch.Generator().manual_seed(seed))
        return tokens

    first = run(0)
    assert run(0) == first
    assert run(1) != first


# ---------------------------------------------------------------- statistics


def test_stats_of_an_always_right_drafter(llama):
    """γ = 4, 23 tokens: steps of 5, 5, 5, 5 and a last one of 3 (drafting only 2: never past
    max_new_tokens). α = 1, every position always accepted."""
    tokens, steps = speculate(LeanModel(llama, max_seq_len=128), make_drafter("right", llama), LEAN_PROMPT,
                              gamma=4, params=GREEDY, max_new_tokens=23)
    stats = steps[-1].stats
    assert [len(s.tokens) for s in steps] == [5, 5, 5, 5, 3]
    assert [s.num_drafted for s in steps] == [4, 4, 4, 4, 2]
    assert stats.target_calls == 5 and stats.new_tokens == 23 and len(tokens) == 23
    assert stats.drafted == 18 and stats.accepted == 18 and stats.rejections == 0
    assert stats.alpha == 1.0 and stats.accepted_per_drafted == 1.0
    assert stats.tau == pytest.approx(23 / 5)
    assert stats.drafted_by_position == [5, 5, 4, 4] and stats.accepted_by_position == [5, 5, 4, 4]
    assert stats.acceptance_by_position == [1.0, 1.0, 1.0, 1.0]
    assert stats.gamma_history == [4, 4, 4, 4, 2]
    assert stats.mean_gamma == pytest.approx(18 / 5)
    assert stats.predicted_speedup == pytest.approx(expected_speedup(1.0, 4, stats.cost_ratio))
    assert stats.prompt_tokens == len(LEAN_PROMPT) and stats.finish_reason == "length"
    assert stats.cost_ratio > 0 and stats.tokens_per_s > 0
    as_dict = stats.to_dict()
    for name in ("alpha", "tau", "acceptance_by_position", "predicted_speedup", "mean_gamma", "new_tokens"):
        assert as_dict[name] == getattr(stats, name)


def test_stats_of_an_always_wrong_drafter(llama):
    """γ = 3, 10 tokens: one token per call; the last steps draft 2, 1 and 0 tokens."""
    _, steps = speculate(LeanModel(llama, max_seq_len=128), make_drafter("wrong", llama), LEAN_PROMPT, gamma=3,
                         params=GREEDY, max_new_tokens=10)
    stats = steps[-1].stats
    assert [s.num_drafted for s in steps] == [3] * 7 + [2, 1, 0]
    assert stats.target_calls == 10 and stats.tau == 1.0
    assert stats.drafted == 24 and stats.accepted == 0 and stats.rejections == 9
    assert stats.alpha == 0.0
    assert stats.drafted_by_position == [9, 8, 7] and stats.acceptance_by_position == [0.0, 0.0, 0.0]


def test_alpha_counts_only_tested_draft_tokens(llama):
    """Position 2 of every draft is wrong: each step accepts 1, rejects 1 and never tests the rest,
    so α = 1/2 while accepted/drafted = 1/4."""
    drafter = CorruptingDrafter(make_drafter("right", llama), 64, positions=[1])
    _, steps = speculate(LeanModel(llama, max_seq_len=128), drafter, LEAN_PROMPT, gamma=4, params=GREEDY,
                         max_new_tokens=21)
    stats = steps[-1].stats
    full = [s for s in steps if s.num_drafted == 4]
    assert all(s.num_accepted == 1 and len(s.tokens) == 2 for s in full)
    assert len(full) >= 9
    assert stats.alpha == pytest.approx(0.5)
    assert stats.accepted_per_drafted == pytest.approx(stats.accepted / stats.drafted)
    assert stats.acceptance_by_position[0] == 1.0 and stats.acceptance_by_position[1:] == [0.0, 0.0, 0.0]


def test_stats_add_up_under_sampling(llama):
    draft_weights = random_weights(tiny_config("llama"), seed=1, scale=4.0)
    drafter = ModelDrafter(LeanModel(draft_weights, max_seq_len=128))
    tokens, steps = speculate(LeanModel(llama, max_seq_len=128), drafter, LEAN_PROMPT, gamma=3, params=PLAIN,
                              max_new_tokens=33, generator=torch.Generator().manual_seed(5))
    stats = steps[-1].stats
    assert stats.new_tokens == len(tokens) == 33
    assert stats.target_calls == len(steps)
    assert stats.drafted == sum(s.num_drafted for s in steps) == sum(stats.drafted_by_position)
    assert stats.accepted == sum(s.num_accepted for s in steps) == sum(stats.accepted_by_position)
    assert stats.rejections == sum(s.num_accepted < s.num_drafted for s in steps)
    assert all(len(s.tokens) == s.num_accepted + 1 for s in steps[:-1])
    assert 1 <= len(steps[-1].tokens) <= steps[-1].num_accepted + 1
    assert 0 < stats.alpha < 1
    assert stats.drafted_by_position == sorted(stats.drafted_by_position, reverse=True)
    assert stats.tau == pytest.approx(33 / len(steps))


def test_stats_without_drafts_predict_no_speedup(llama):
    _, steps = speculate(LeanModel(llama, max_seq_len=128), make_drafter("right", llama), LEAN_PROMPT,
                         gamma=0, params=GREEDY, max_new_tokens=3)
    stats = steps[-1].stats
    assert stats.drafted == 0 and stats.target_calls == 3 and stats.tau == 1.0
    assert stats.predicted_speedup == 1.0 and stats.mean_gamma == 0.0 and stats.alpha == 0.0
    assert stats.acceptance_by_position == []


# ---------------------------------------------------------------- request validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": []}, "at least one token"),
        ({"prompt": [1, 64]}, "out of range"),
        ({"prompt": [-1, 2]}, "out of range"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"gamma": -1}, "gamma"),
    ],
)
def test_bad_requests_raise_value_error(kwargs, message, llama):
    args = {"prompt": [1, 2, 3], "max_new_tokens": 4, "gamma": 2}
    args.update(kwargs)
    prompt = args.pop("prompt")
    with pytest.raises(ValueError, match=message):
        next(generate(LeanModel(llama, max_seq_len=32), NgramDrafter(), prompt, **args))


def test_logits_to_probs_is_what_the_engine_verifies_against(llama):
    """Each step's target law is logits_to_probs of the target's logits: a top-k=1 target makes
    sampling deterministic and equal to greedy."""
    tokens, _ = speculate(LeanModel(llama, max_seq_len=128), make_drafter("rate_0.3", llama), LEAN_PROMPT, gamma=3,
                          params=SamplingParams(top_k=1), max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    reference = reference_generate(LeanModel(llama, max_seq_len=128), LEAN_PROMPT, params=GREEDY, max_new_tokens=20)
    assert tokens == reference
    probs = logits_to_probs(torch.tensor([[0.0, 2.0, 1.0]]), SamplingParams(top_k=1))
    assert probs.tolist() == [[0.0, 1.0, 0.0]]
