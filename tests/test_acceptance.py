"""Exactness of the acceptance rule (Leviathan et al. 2023, Algorithm 1).

Three layers, from instant to statistical:
1. identity: with the implementation's own `acceptance_probs` and `residual_probs`, the law of the
   token emitted at one position, sum_x q(x) a(x) [x] + (1 - sum_x q(x) a(x)) residual, is p
   exactly (float64), on random and degenerate p, q;
2. `verify` is those two functions: its accept decision is `u < a(x)`, its recovered token is a
   draw from `residual_probs`, its bonus token a draw from p_{γ+1};
3. goodness of fit: many seeded draws through the real `verify` (vectorised with torch.vmap),
   chi-square against the exact target law, and negative controls that must fail the same test.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch

from speculant import acceptance
from speculant.acceptance import Verdict, acceptance_probs, point_mass, residual_probs, verify
from speculant.sampling import SamplingParams, logits_to_probs, sample_from
from tests.conftest import TRANSFORMS

F64 = torch.float64


# ================================================================ 1. the identity, float64


def dirichlet(vocab: int, rng: np.random.Generator, concentration: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(rng.dirichlet(np.full(vocab, concentration)))


def dist(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=F64)


def edge_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(p, q) pairs over a vocabulary of 6: random and degenerate."""
    g = np.random.default_rng(0)
    cases = {}
    for i in range(5):
        cases[f"random_{i}"] = (dirichlet(6, g), dirichlet(6, g))
    cases["sparse_random"] = (dirichlet(6, g, 0.2), dirichlet(6, g, 0.2))
    p = dirichlet(6, g)
    cases["p_equals_q"] = (p, p.clone())
    wobbled = p * (1 + 1e-15 * torch.arange(6, dtype=F64))
    cases["p_equals_q_up_to_rounding"] = (p, wobbled / wobbled.sum())
    cases["disjoint_supports"] = (dist(0.5, 0.5, 0, 0, 0, 0), dist(0, 0, 0.2, 0.3, 0.5, 0))
    cases["zeros_in_q_where_p_positive"] = (dist(0.1, 0.2, 0.3, 0.4, 0, 0), dist(0.6, 0, 0.4, 0, 0, 0))
    cases["zeros_in_p_where_q_positive"] = (dist(0, 0.5, 0, 0.5, 0, 0), dist(0.2, 0.2, 0.2, 0.2, 0.1, 0.1))
    cases["p_point_mass"] = (dist(0, 0, 1, 0, 0, 0), dirichlet(6, g))
    cases["q_point_mass_on_p_zero"] = (dist(0.3, 0.7, 0, 0, 0, 0), dist(0, 0, 0, 0, 1, 0))
    cases["both_same_point_mass"] = (dist(0, 1, 0, 0, 0, 0), dist(0, 1, 0, 0, 0, 0))
    cases["both_different_point_masses"] = (dist(0, 1, 0, 0, 0, 0), dist(0, 0, 0, 1, 0, 0))
    cases["q_uniform"] = (dirichlet(6, g, 0.5), torch.full((6,), 1 / 6, dtype=F64))
    cases["tiny_masses"] = (dist(1e-300, 1 - 2e-300, 1e-300, 0, 0, 0), dist(0.5, 1e-300, 0.5 - 1e-300, 0, 0, 0))
    return cases


EDGE_CASES = edge_cases()


def one_position_law(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Law of the token emitted at one position, from the implementation's own functions: [V]."""
    vocab = p.shape[-1]
    every_token = torch.arange(vocab)
    accept = acceptance_probs(every_token, q.expand(vocab, vocab), p.expand(vocab, vocab))  # [V]: a(x)
    accepted_mass = q * accept  # q(x) a(x)
    return accepted_mass + (1.0 - accepted_mass.sum()) * residual_probs(p, q)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_one_position_law_equals_the_target_law(case):
    p, q = EDGE_CASES[case]
    law = one_position_law(p, q)
    torch.testing.assert_close(law, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("vocab", [2, 50, 1000])
def test_one_position_law_equals_the_target_law_on_larger_random_vocabularies(vocab):
    g = np.random.default_rng(vocab)
    for concentration in (0.05, 1.0, 10.0):
        p, q = dirichlet(vocab, g, concentration), dirichlet(vocab, g, concentration)
        torch.testing.assert_close(one_position_law(p, q), p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_deterministic_drafter_law_equals_the_target_law_for_every_proposal(case):
    """A drafter that proposes x deterministically has q = point mass on x: a(x)[x] + (1-a(x)) r = p."""
    p, _ = EDGE_CASES[case]
    for x in range(p.shape[0]):
        q = point_mass(torch.tensor([x]), p.shape[0], F64)[0]
        torch.testing.assert_close(one_position_law(p, q), p, rtol=0, atol=1e-12)


def test_acceptance_probabilities_are_min_one_p_over_q():
    p = torch.tensor([0.5, 0.2, 0.3, 0.0], dtype=F64)
    q = torch.tensor([0.25, 0.4, 0.0, 0.35], dtype=F64)
    accept = acceptance_probs(torch.arange(4), q.expand(4, 4), p.expand(4, 4))
    torch.testing.assert_close(accept, torch.tensor([1.0, 0.5, 1.0, 0.0], dtype=F64))


def test_residual_is_the_normalised_positive_part_and_p_when_empty():
    p = torch.tensor([0.5, 0.2, 0.3, 0.0], dtype=F64)
    q = torch.tensor([0.25, 0.4, 0.0, 0.35], dtype=F64)
    torch.testing.assert_close(residual_probs(p, q), torch.tensor([0.25, 0, 0.3, 0], dtype=F64) / 0.55)
    torch.testing.assert_close(residual_probs(p, p), p)
    assert torch.isfinite(residual_probs(torch.stack([p, p]), torch.stack([q, p]))).all()


def test_acceptance_probabilities_sum_to_the_papers_alpha():
    """sum_x q(x) min(1, p(x)/q(x)) = sum_x min(p(x), q(x)) = β (Definition 3.1)."""
    for p, q in EDGE_CASES.values():
        accept = acceptance_probs(torch.arange(6), q.expand(6, 6), p.expand(6, 6))
        torch.testing.assert_close((q * accept).sum(), torch.minimum(p, q).sum(), rtol=0, atol=1e-12)


# ================================================================ 2. verify uses exactly these


def test_verify_accepts_exactly_when_u_is_below_the_acceptance_probability():
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    for p, q in EDGE_CASES.values():
        accept = acceptance_probs(torch.arange(6), q.expand(6, 6), p.expand(6, 6))
        target = torch.stack([p, dirichlet(6, rng)])
        for x in range(6):
            for u in torch.rand(40, generator=g, dtype=F64).tolist() + [0.0, 0.999999]:
                if abs(u - float(accept[x])) < 1e-9:
                    continue
                verdict = verify(torch.tensor([x]), q[None], target, torch.tensor([u], dtype=F64), torch.tensor(0.5))
                assert int(verdict.num_accepted) == int(u < accept[x]), (p, q, x, u)


def test_verify_draws_the_recovered_token_from_the_residual_and_the_bonus_from_the_last_row():
    g = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(2)
    for p, q in EDGE_CASES.values():
        p_next = dirichlet(6, rng, 0.5)
        target = torch.stack([p, p_next])
        residual = residual_probs(p, q)
        for x in range(6):
            for s in torch.rand(10, generator=g).tolist():
                s = torch.tensor(s)
                rejected = verify(torch.tensor([x]), q[None], target, torch.tensor([1.0 - 1e-12], dtype=F64), s)
                if int(rejected.num_accepted) == 0:
                    assert int(rejected.next_token) == int(sample_from(residual, s))
                accepted = verify(torch.tensor([x]), q[None], target, torch.tensor([0.0], dtype=F64), s)
                if int(accepted.num_accepted) == 1:
                    assert int(accepted.next_token) == int(sample_from(p_next, s))


def test_verify_stops_at_the_first_rejection_and_recovers_at_that_position():
    p = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0.25] * 4, [1.0, 0, 0, 0]], dtype=F64)
    q = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0]], dtype=F64)  # a = 0.5, 0.5, 0.25
    tokens = torch.tensor([0, 2, 1])
    # u = (0.1, 0.9, 0.1): accept, reject at position 2 (its residual is a point mass on token 3),
    # and the third draft is never tested even though 0.1 < 0.25 would accept it
    verdict = verify(tokens, q, p, torch.tensor([0.1, 0.9, 0.1], dtype=F64), torch.tensor(0.0))
    assert (int(verdict.num_accepted), int(verdict.next_token)) == (1, 3)
    verdict = verify(tokens, q, p, torch.tensor([0.1, 0.2, 0.1], dtype=F64), torch.tensor(0.0))
    assert (int(verdict.num_accepted), int(verdict.next_token)) == (3, 0)  # bonus from p_4 = [1,0,0,0]
    verdict = verify(tokens, None, p, torch.tensor([0.6, 0.0, 0.0], dtype=F64), torch.tensor(0.7))
    assert (int(verdict.num_accepted), int(verdict.next_token)) == (0, 1)  # residual at 1: [0, 1, 0, 0]


def test_verify_with_no_draft_samples_the_target():
    p = torch.tensor([[0.1, 0.6, 0.3]], dtype=F64)
    for s, token in ((0.05, 0), (0.5, 1), (0.95, 2)):
        verdict = verify(torch.empty(0, dtype=torch.int64), None, p, torch.empty(0), torch.tensor(s))
        assert (int(verdict.num_accepted), int(verdict.next_token)) == (0, token)


def test_verify_law_integrated_over_a_grid_of_uniforms_is_the_target_law():
    """The real `verify`, driven by every u and s of a 4096-point midpoint grid, reproduces p to 1e-3.

    This closes the loop between the identity (which uses `acceptance_probs`/`residual_probs`)
    and the function the engine calls."""
    grid = (torch.arange(4096, dtype=F64) + 0.5) / 4096
    batched = torch.vmap(verify, in_dims=(None, None, None, 0, None))
    for name, (p, q) in EDGE_CASES.items():
        target = torch.stack([p, p])
        law = torch.zeros(6, dtype=F64)
        for x in range(6):
            if q[x] == 0:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # vmap fallbacks: slower, still correct
                accepted = batched(torch.tensor([x]), q[None], target, grid[:, None], torch.tensor(0.5)).num_accepted
            accept_rate = accepted.to(F64).mean()
            # the recovered token's law, by inverse CDF over the same grid
            recovered = sample_from(residual_probs(p, q).expand(4096, 6), grid)
            recovered_law = torch.bincount(recovered, minlength=6).to(F64) / 4096
            emitted_x = torch.nn.functional.one_hot(torch.tensor(x), 6)
            law += q[x] * (accept_rate * emitted_x + (1 - accept_rate) * recovered_law)
        torch.testing.assert_close(law, p, rtol=0, atol=1e-3, msg=name)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_verify_never_returns_nan_or_a_zero_probability_token(case):
    p, q = EDGE_CASES[case]
    for dtype in (F64, torch.float32):
        p_, q_ = p.to(dtype), q.to(dtype)
        assert torch.isfinite(residual_probs(p_, q_)).all()
        ends = [0.0, 0.5, float(torch.tensor(1.0, dtype=dtype).nextafter(torch.tensor(0.0, dtype=dtype)))]
        p_next = torch.tensor([0, 0, 0, 0.5, 0.5, 0], dtype=dtype)
        target = torch.stack([p_, p_next])
        for x in range(6):  # every draft token, even ones q never proposes
            for probs in (q_[None], None):
                for u in ends:
                    for s in ends:
                        u_, s_ = torch.tensor([u], dtype=dtype), torch.tensor(s, dtype=dtype)
                        verdict = verify(torch.tensor([x]), probs, target, u_, s_)
                        n, token = int(verdict.num_accepted), int(verdict.next_token)
                        assert n in (0, 1)
                        if n == 1:
                            assert p_[x] > 0, "accepted a token the target never emits"
                            assert p_next[token] > 0, "bonus token outside the target's support"
                        else:
                            assert p_[token] > 0, "recovered token outside the target's support"


def test_verify_accepts_everything_when_p_equals_q_even_in_float32():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0.8, top_k=5)
    p = logits_to_probs(logits, params)
    tokens = sample_from(p[:4], torch.rand(4, generator=torch.Generator().manual_seed(4)))
    nearly_one = torch.full((4,), 1.0).nextafter(torch.tensor(0.0))
    verdict = verify(tokens, p[:4].clone(), p, nearly_one, torch.tensor(0.3))
    assert int(verdict.num_accepted) == 4


# ================================================================ 3. goodness of fit

VOCAB = 6
START = 0  # the last committed token before the first step
NUM_DRAWS = 20_000
_g = torch.Generator().manual_seed(0)
TARGET_LOGITS = torch.randn(VOCAB, VOCAB, generator=_g, dtype=F64).float() * 1.2  # row c: logits after c
DRAFT_LOGITS = 0.5 * TARGET_LOGITS + torch.randn(VOCAB, VOCAB, generator=_g, dtype=F64).float()  # related, wrong
# An n-gram-style deterministic drafter: after c it proposes the target's rank (c mod 3) token,
# so some proposals are the argmax, some are dropped by top-k / top-p / min-p (probability 0).
NGRAM_PROPOSAL = TARGET_LOGITS.argsort(-1, descending=True)[torch.arange(VOCAB), torch.arange(VOCAB) % 3]



class ModelStyleDrafter:
    """Samples x_i ~ sampled[x_{i-1}] and tells the verifier reported[x_{i-1}] (both [V, V]).

    Honest when reported is sampled; the controls break that on purpose."""

    def __init__(self, sampled: torch.Tensor, reported: torch.Tensor | None = None) -> None:
        self.sampled = sampled
        self.reported = sampled if reported is None else reported

    def run(self, verify_fn, last, target_table, gamma, uniforms, generator):
        tokens, probs, previous = [], [], last
        for _ in range(gamma):
            token = sample_from(self.sampled[previous], torch.rand(last.shape[0], generator=generator))
            tokens.append(token)
            probs.append(self.reported[previous])
            previous = token
        draft_tokens = torch.stack(tokens, 1)  # [B, γ]
        draft_probs = torch.stack(probs, 1)  # [B, γ, V]
        target_probs = target_table[torch.cat([last[:, None], draft_tokens], 1)]  # [B, γ+1, V]
        verdict = torch.vmap(verify_fn)(draft_tokens, draft_probs, target_probs, uniforms[:, :-1], uniforms[:, -1])
        return draft_tokens, verdict.num_accepted, verdict.next_token


class NgramStyleDrafter:
    """Deterministic: proposes proposal[c], proposal[proposal[c]], ...; passes draft_probs=None."""

    def __init__(self, proposal: torch.Tensor) -> None:
        self.proposal = proposal

    def run(self, verify_fn, last, target_table, gamma, uniforms, generator):
        chain = [last]
        for _ in range(gamma):
            chain.append(self.proposal[chain[-1]])
        draft_tokens = torch.stack(chain[1:], 1)  # [B, γ]
        num_accepted = torch.empty_like(last)
        next_token = torch.empty_like(last)
        # The draft is a function of `last`: one vmap over the uniforms per distinct last token.
        batched = torch.vmap(verify_fn, in_dims=(None, None, None, 0, 0))
        for value in last.unique():
            rows = (last == value).nonzero().squeeze(1)
            draft = draft_tokens[rows[0]]
            target_probs = target_table[torch.cat([value.view(1), draft])]
            verdict = batched(draft, None, target_probs, uniforms[rows, :-1], uniforms[rows, -1])
            num_accepted[rows] = verdict.num_accepted
            next_token[rows] = verdict.next_token
        return draft_tokens, num_accepted, next_token


def emitted_tokens(verify_fn, drafter, target_table, gamma, num_tokens, num_draws=NUM_DRAWS, seed=0):
    """The first `num_tokens` tokens emitted after START by repeated draft -> verify steps, for
    `num_draws` independent runs at once: int64 [num_draws, num_tokens].

    `verify_fn` has verify's signature (the sampler under test); `target_table` [V, V] float32
    holds the target's transformed law after each token."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.full((num_draws, num_tokens), -1, dtype=torch.int64)
    filled = torch.zeros(num_draws, dtype=torch.int64)
    last = torch.full((num_draws,), START, dtype=torch.int64)
    active = torch.arange(num_draws)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap fallbacks (clamp_, scatter_): slower, correct
        while active.numel():
            b = active.numel()
            uniforms = torch.rand(b, gamma + 1, generator=generator)
            draft_tokens, num_accepted, next_token = drafter.run(
                verify_fn, last[active], target_table, gamma, uniforms, generator
            )
            emitted = torch.cat([draft_tokens, torch.zeros(b, 1, dtype=torch.int64)], 1)  # [B, γ+1]
            emitted[torch.arange(b), num_accepted] = next_token
            for j in range(gamma + 1):
                position = filled[active] + j
                keep = (j <= num_accepted) & (position < num_tokens)
                out[active[keep], position[keep]] = emitted[keep, j]
            filled[active] += num_accepted + 1
            last[active] = next_token
            active = active[filled[active] < num_tokens]
    return out


def pair_fit(gof, tokens: torch.Tensor, target_law: np.ndarray):
    """Chi-square of each adjacent pair (t_j, t_j+1) against the chain's exact pair law;
    Bonferroni over the pairs. Returns (adjusted p-value, fits)."""
    num_tokens = tokens.shape[1]
    fits = [
        gof.chi_square((tokens[:, j] * VOCAB + tokens[:, j + 1]).numpy(), law)
        for j, law in enumerate(gof.pair_laws(START, num_tokens, target_law))
    ]
    return min(1.0, min(f.pvalue for f in fits) * len(fits)), fits


def run_fit(gof, verify_fn, drafter, params: SamplingParams, gamma: int, target_table=None):
    """THE goodness-of-fit test of this file: the first γ+1 emitted tokens (so that with γ = 4 the
    deepest draft position and the bonus token are covered), pair by pair, against the exact law
    of the target (computed independently in float64). Returns the Bonferroni-adjusted p-value."""
    if target_table is None:
        target_table = logits_to_probs(TARGET_LOGITS, params)
    tokens = emitted_tokens(verify_fn, drafter, target_table, gamma, num_tokens=gamma + 1)
    target_law = gof.transform(TARGET_LOGITS.numpy(), **asdict(params))
    pvalue, fits = pair_fit(gof, tokens, target_law)
    return pvalue, fits


def model_drafter(params: SamplingParams) -> ModelStyleDrafter:
    return ModelStyleDrafter(logits_to_probs(DRAFT_LOGITS, params))


@pytest.mark.parametrize("gamma", [1, 4])
@pytest.mark.parametrize("drafter_kind", ["model", "ngram"])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_emitted_tokens_follow_the_target_law(name, drafter_kind, gamma, gof):
    """20000 seeded runs through the real `verify`; each adjacent pair of the first γ+1 tokens is
    chi-square tested (level 1e-4, Bonferroni) against the target's exact law."""
    params = SamplingParams(**TRANSFORMS[name])
    drafter = model_drafter(params) if drafter_kind == "model" else NgramStyleDrafter(NGRAM_PROPOSAL)
    pvalue, fits = run_fit(gof, verify, drafter, params, gamma)
    assert pvalue >= gof.SIGNIFICANCE, fits


def test_an_honest_but_untransformed_draft_is_still_exact(gof):
    """Exactness needs only that the verifier is told the law the draft was really drawn from: a
    draft sampling from its raw softmax (temperature 1) while the target uses 0.7 is slower
    (lower acceptance) but exact. Contrast with the transform controls below."""
    params = SamplingParams(temperature=0.7)
    raw = logits_to_probs(DRAFT_LOGITS, SamplingParams())
    pvalue, fits = run_fit(gof, verify, ModelStyleDrafter(raw, raw), params, gamma=4)
    assert pvalue >= gof.SIGNIFICANCE, fits


# ---------------------------------------------------------------- negative controls
#
# Each control breaks one thing and runs the SAME test (`run_fit`, γ = 1: the first two emitted
# tokens jointly, 36 cells, 20000 draws, level 1e-4). Its exact law is computed by
# `gof.speculative_law_gamma1` with the broken rule plugged in; the power is the noncentral
# chi-square approximation at that law, computed and asserted in each test.


def always_accept(draft_tokens, draft_probs, target_probs, accept_uniforms, sample_uniform) -> Verdict:
    gamma = draft_tokens.shape[0]
    num_accepted = (accept_uniforms >= 0).sum()  # = γ, batched under vmap
    return Verdict(num_accepted, sample_from(target_probs[gamma], sample_uniform))


def residual_without_clamp(target_probs, draft_probs):
    """norm(|p - q|): what a residual that forgets max(0, .) looks like once made a distribution."""
    residual = (target_probs - draft_probs).abs()
    return residual / residual.sum(-1, keepdim=True)


def residual_is_p(target_probs, draft_probs):
    return target_probs


def control_power(gof, params, bad_law):
    p = gof.transform(TARGET_LOGITS.numpy(), **asdict(params))
    return gof.power(gof.chain_law(START, 2, p), bad_law, NUM_DRAWS)


def honest_pieces(gof, params):
    p = gof.transform(TARGET_LOGITS.numpy(), **asdict(params))
    q = gof.transform(DRAFT_LOGITS.numpy(), **asdict(params))
    return p, q


def misreported_law(gof, target, sampled, reported):
    """Exact law of the first two tokens when the verifier uses `target` and is told `reported`
    while the draft really samples from `sampled` (all [V, V])."""
    accept, residual = gof.honest_accept(target, reported), gof.honest_residual(target, reported)
    return gof.speculative_law_gamma1(START, 2, target, sampled, accept, residual, False)


def test_the_honest_law_of_the_control_harness_is_the_target_law(gof):
    """Sanity of the exact-law calculator the powers rely on: honest pieces give p ⊗ p."""
    for params in (SamplingParams(), SamplingParams(temperature=0.7)):
        p, q = honest_pieces(gof, params)
        np.testing.assert_allclose(misreported_law(gof, p, q, q), gof.chain_law(START, 2, p), atol=1e-12)


def test_always_accept_control_is_caught(gof):
    """Always accepting emits the draft's law: q ⊗ p instead of p ⊗ p. With 20000 draws the
    noncentrality is ~47000 against a critical value of ~73.5 (35 pooled cells, df 34): power 1.0."""
    params = SamplingParams()
    p, q = honest_pieces(gof, params)
    bad = gof.speculative_law_gamma1(START, 2, p, q, np.ones_like(p), gof.honest_residual(p, q), False)
    power = control_power(gof, params, bad)
    assert power.power > 0.999, power
    pvalue, _ = run_fit(gof, always_accept, model_drafter(params), params, gamma=1)
    assert pvalue < gof.SIGNIFICANCE


def test_residual_without_max_zero_control_is_caught(gof, monkeypatch):
    """A residual norm(|p − q|) instead of norm(max(0, p − q)) moves the first token's law to
    p + (q − p)/2. With 20000 draws: noncentrality ~16000, critical value ~73.5 (df 34): power 1.0."""
    params = SamplingParams()
    p, q = honest_pieces(gof, params)
    absolute = np.abs(p - q) / np.abs(p - q).sum(-1, keepdims=True)
    bad = gof.speculative_law_gamma1(START, 2, p, q, gof.honest_accept(p, q), absolute, False)
    power = control_power(gof, params, bad)
    assert power.power > 0.999, power
    monkeypatch.setattr(acceptance, "residual_probs", residual_without_clamp)
    pvalue, _ = run_fit(gof, verify, model_drafter(params), params, gamma=1)
    assert pvalue < gof.SIGNIFICANCE


def test_residual_equal_to_p_control_is_caught(gof, monkeypatch):
    """Drawing the recovered token from p instead of norm(max(0, p − q)) gives
    min(p, q) + (1 − β) p. With 20000 draws: noncentrality ~2100, critical value ~73.5 (df 34):
    power 1.0."""
    params = SamplingParams()
    p, q = honest_pieces(gof, params)
    bad = gof.speculative_law_gamma1(START, 2, p, q, gof.honest_accept(p, q), p, False)
    power = control_power(gof, params, bad)
    assert power.power > 0.999, power
    monkeypatch.setattr(acceptance, "residual_probs", residual_is_p)
    pvalue, _ = run_fit(gof, verify, model_drafter(params), params, gamma=1)
    assert pvalue < gof.SIGNIFICANCE


def test_transform_applied_to_the_draft_sample_but_not_to_the_reported_q_is_caught(gof):
    """Temperature 0.7 on one side only: the draft samples through the transform but the verifier
    is told the raw softmax (temperature 1) of the draft logits. (Telling it the law really sampled
    from would be exact: see test_an_honest_but_untransformed_draft_is_still_exact.) With 20000
    draws: noncentrality ~490 over 29 pooled cells, critical value ~64.7 (df 28): power 1.0."""
    params = SamplingParams(temperature=0.7)
    p, q = honest_pieces(gof, params)
    q_raw = gof.transform(DRAFT_LOGITS.numpy())
    bad = misreported_law(gof, p, q, q_raw)
    power = control_power(gof, params, bad)
    assert power.power > 0.999, power
    drafter = ModelStyleDrafter(
        sampled=logits_to_probs(DRAFT_LOGITS, params), reported=logits_to_probs(DRAFT_LOGITS, SamplingParams())
    )
    pvalue, _ = run_fit(gof, verify, drafter, params, gamma=1)
    assert pvalue < gof.SIGNIFICANCE


def test_transform_applied_to_the_draft_but_not_to_the_target_is_caught(gof):
    """Temperature 0.7 on the draft side only: the verifier's p is the raw softmax, so the output
    follows the untempered target. With 20000 draws: noncentrality ~7800 over 29 pooled cells,
    critical value ~64.7 (df 28): power 1.0."""
    params = SamplingParams(temperature=0.7)
    _, q = honest_pieces(gof, params)
    p_raw = gof.transform(TARGET_LOGITS.numpy())
    bad = misreported_law(gof, p_raw, q, q)
    power = control_power(gof, params, bad)
    assert power.power > 0.999, power
    untempered_target = logits_to_probs(TARGET_LOGITS, SamplingParams())
    pvalue, _ = run_fit(gof, verify, model_drafter(params), params, gamma=1, target_table=untempered_target)
    assert pvalue < gof.SIGNIFICANCE


def test_reported_q_that_is_not_the_sampled_law_is_caught(gof):
    """The drafter samples from its law after c but reports its law after c+1 (an off-by-one in
    its bookkeeping). With 20000 draws: noncentrality ~48000, critical value ~73.5 (df 34): power 1.0."""
    params = SamplingParams()
    p, q = honest_pieces(gof, params)
    shifted = np.roll(q, -1, axis=0)  # shifted[c] = q[c + 1]
    bad = misreported_law(gof, p, q, shifted)
    power = control_power(gof, params, bad)
    assert power.power > 0.999, power
    sampled = logits_to_probs(DRAFT_LOGITS, params)
    drafter = ModelStyleDrafter(sampled=sampled, reported=sampled.roll(-1, dims=0))
    pvalue, _ = run_fit(gof, verify, drafter, params, gamma=1)
    assert pvalue < gof.SIGNIFICANCE


@pytest.mark.parametrize("seed", range(40))
def test_greedy_flag_draws_what_the_inverse_cdf_draws_when_the_target_is_a_point_mass(seed):
    """greedy=True (the fused step at T 0) takes the next law's argmax instead of the inverse-CDF draw: the same
    token whenever p is a point mass, whatever q, the lookup branch and the uniforms; a p that is not one (the
    negative control) is drawn differently for some uniforms."""
    from speculant.acceptance import candidate_tree, verify_candidates

    g = torch.Generator().manual_seed(seed)
    vocab, gamma, k, size = 6, 3, 2, 3
    nodes = candidate_tree(gamma, k, size)[0].shape[0]
    hot = torch.randint(0, vocab, (nodes,), generator=g)
    p = torch.zeros(nodes, vocab, dtype=torch.float64).scatter_(1, hot[:, None], 1.0)  # greedy: one-hots
    q = torch.rand(gamma, k, vocab, generator=g, dtype=torch.float64)
    q = q / q.sum(-1, keepdim=True)
    chain = torch.randint(0, vocab, (gamma, k), generator=g)
    chain[:, 0] = torch.where(torch.rand(gamma, generator=g) < 0.5, hot[:gamma], chain[:, 0])  # some kept
    lookup = torch.randint(0, vocab, (size,), generator=g)
    uniforms = [torch.rand(gamma, k, generator=g), torch.rand(gamma + 1, generator=g)]
    rest = {"lookup": lookup, "lookup_length": int(torch.randint(0, size + 1, (), generator=g)),
                "lookup_uniforms": torch.rand(size, generator=g)}
    for laws in (q, None):
        drawn = verify_candidates(chain, laws, p, *uniforms, **rest)
        greedy = verify_candidates(chain, laws, p, *uniforms, **rest, greedy=True)
        assert [int(t) for t in greedy] == [int(t) for t in drawn]
    one = verify(chain[:, 0], q[:, 0], p[: gamma + 1], uniforms[0][:, 0], uniforms[1][0])
    assert [int(t) for t in verify(chain[:, 0], q[:, 0], p[: gamma + 1], uniforms[0][:, 0], uniforms[1][0],
                                   greedy=True)] == [int(t) for t in one]
    # control: p not a point mass: the argmax is not the draw for every uniform
    soft = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    empty = torch.empty(0, dtype=torch.int64)
    draws = {int(verify(empty, None, soft, torch.empty(0), torch.tensor(u))[1]) for u in (0.1, 0.4, 0.9)}
    assert draws == {0, 1, 2} and int(verify(empty, None, soft, torch.empty(0), torch.tensor(0.1), greedy=True)[1]) == 2
