"""Exactness of speculative diffusion sampling (De Bortoli et al. 2025): accept, else reflect.

Layers, from instant to statistical:
1. identity: the reflection is the mirror image in the hyperplane half-way between the means, so it
   maps q's density onto p's; the kernel keeps a draft exactly when u < p(y)/q(y);
2. one step: many draws through the real `accept_or_reflect`, whitened; Kolmogorov–Smirnov on every
   coordinate of a basis that starts with the mean difference, on ‖w‖² against χ²_d, and moment
   tests; the acceptance rate against 2Φ(−‖Δ‖/2) (binomial). Negative controls (no reflection,
   residual drawn from the draft, wrong variance) must fail the same battery, each with a power
   computed from its exact law (a lower bound, by the Dvoretzky–Kiefer–Wolfowitz–Massart inequality);
3. whole chain: Gaussian data, for which ε is linear and the plain sampler's output law is a Gaussian
   computed here in closed form (numpy, independent of the code under test); the speculative sampler
   with several drafters and draft lengths must match it in 1-D and 2-D (coordinates and oblique
   projections), and the broken kernels, plugged into the chain, must fail it (power from a pilot run);
4. the real models: the embedded mixture model, speculative vs plain; training runs; bad input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from speculant.diffusion import (
    AdaptiveGamma,
    EpsDrafter,
    FrozenDrift,
    GaussianEps,
    Schedule,
    accept_or_reflect,
    sample_plain,
    sample_speculative,
)
from speculant.diffusion import sampler as sampler_module

SIGNIFICANCE = 1e-4  # as in the rest of the suite
MIN_POWER = 0.99
F64 = torch.float64


# ================================================================ test machinery (numpy, independent)


def ks_power_lower_bound(distance: float, n: int, significance: float) -> float:
    """P(KS rejects at `significance` with n draws) when sup|F_true − F_0| = distance; by DKW–Massart.

    KS rejects when sup|F̂ − F_0| > c/√n; sup|F̂ − F_0| ≥ distance − sup|F̂ − F_true|, and
    P(sup|F̂ − F_true| > t) ≤ 2 exp(−2 n t²).
    """
    critical = stats.kstwo.isf(significance, n)  # on sup|F̂ − F_0| itself
    margin = distance - critical
    return 0.0 if margin <= 0 else max(0.0, 1 - 2 * math.exp(-2 * n * margin**2))


def cdf_distance_to_normal(density: np.ndarray, grid: np.ndarray) -> float:
    """sup |F − Φ| for a density tabulated on a fine grid (trapezoid rule)."""
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    return float(np.max(np.abs(cdf - stats.norm.cdf(grid))))


def whitened_battery(w: np.ndarray, basis: np.ndarray) -> tuple[float, int]:
    """Smallest p-value × number of tests (Bonferroni) of 'w [n, d] ~ N(0, I)'; also the number of tests.

    KS on each coordinate of w·basisᵀ, KS of ‖w‖² against χ²_d, n‖mean‖² against χ²_d, and
    Σ_i w_ij² against χ²_n for each coordinate j (the variances).
    """
    n, d = w.shape
    rotated = w @ basis.T
    pvalues = [stats.kstest(rotated[:, j], "norm").pvalue for j in range(d)]
    pvalues.append(stats.kstest((w**2).sum(1), stats.chi2(d).cdf).pvalue)
    pvalues.append(stats.chi2(d).sf(n * (w.mean(0) ** 2).sum()))
    for j in range(d):
        sum_sq = float((rotated[:, j] ** 2).sum())
        pvalues.append(2 * min(stats.chi2(n).cdf(sum_sq), stats.chi2(n).sf(sum_sq)))
    return min(pvalues) * len(pvalues), len(pvalues)


def basis_from(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An orthonormal basis [d, d] whose first row is direction / ‖direction‖."""
    d = len(direction)
    matrix = np.column_stack([direction, rng.standard_normal((d, d - 1))])
    q, _ = np.linalg.qr(matrix)
    basis = q.T.copy()
    basis[0] *= np.sign(basis[0] @ direction)
    return basis


# ================================================================ broken kernels (negative controls)


def no_reflection(target_mean, draft_mean, sigma, draft_noise, uniform):
    """On rejection, the target mean plus the draft's own noise, not reflected."""
    state, accepted = accept_or_reflect(target_mean, draft_mean, sigma, draft_noise, uniform)
    return torch.where(accepted[:, None], state, target_mean + sigma * draft_noise), accepted


def residual_from_draft(target_mean, draft_mean, sigma, draft_noise, uniform):
    """On rejection, a fresh draw from the draft q instead of the reflection."""
    state, accepted = accept_or_reflect(target_mean, draft_mean, sigma, draft_noise, uniform)
    fresh = draft_mean + sigma * torch.randn_like(draft_noise)  # the tests seed torch's global generator
    return torch.where(accepted[:, None], state, fresh), accepted


WRONG_SCALE = 1.5


def wrong_variance(target_mean, draft_mean, sigma, draft_noise, uniform):
    """Draft and reflection at σ' = 1.5 σ (as if the drafter's variance were the target's)."""
    return accept_or_reflect(target_mean, draft_mean, WRONG_SCALE * sigma, draft_noise, uniform)


BROKEN_KERNELS = {"no_reflection": no_reflection, "residual_from_draft": residual_from_draft,
                  "wrong_variance": wrong_variance}


def broken_kernel_distance(name: str, delta: float) -> tuple[float, int]:
    """sup|F − Φ| of the broken kernel's law along one whitened coordinate, and which coordinate.

    Along e (coordinate 0): target N(0, 1), draft N(−δ, 1); kept mass min(p, q). Orthogonal
    coordinates are untouched by reflection: there only the wrong variance shows, as N(0, s²).
    """
    grid = np.linspace(-12, 12, 200_001)
    p, q = stats.norm.pdf(grid), stats.norm.pdf(grid + delta)
    kept = np.minimum(p, q)
    if name == "no_reflection":  # rejected draft at w moves to w + δ
        rejected = np.maximum(p - stats.norm.pdf(grid - delta), 0)  # (q − p)⁺ at w − δ
        return cdf_distance_to_normal(kept + rejected, grid), 0
    if name == "residual_from_draft":
        rejection = 1 - 2 * stats.norm.cdf(-delta / 2)
        return cdf_distance_to_normal(kept + rejection * q, grid), 0
    if name == "wrong_variance":
        return float(np.max(np.abs(stats.norm.cdf(grid / WRONG_SCALE) - stats.norm.cdf(grid)))), 1
    raise KeyError(name)


# ================================================================ 1. identities


def test_reflection_is_the_mirror_in_the_bisecting_hyperplane_and_maps_q_onto_p():
    g = torch.Generator().manual_seed(0)
    m_p, m_q = torch.randn(50, 5, generator=g, dtype=F64), torch.randn(50, 5, generator=g, dtype=F64)
    sigma = 0.3 + torch.rand(50, 1, generator=g, dtype=F64)
    z = torch.randn(50, 5, generator=g, dtype=F64)
    reflected, accepted = accept_or_reflect(m_p, m_q, sigma, z, torch.full((50,), 1 - 1e-12, dtype=F64))
    y = m_q + sigma * z
    normal = (m_p - m_q) / (m_p - m_q).norm(dim=1, keepdim=True)
    middle = (m_p + m_q) / 2
    mirror = y - 2 * ((y - middle) * normal).sum(1, keepdim=True) * normal
    rejected = ~accepted
    assert rejected.sum() > 10
    torch.testing.assert_close(reflected[rejected], mirror[rejected])
    # q(y) = p(y'): the reflected point is exactly as likely under p as the draft was under q
    torch.testing.assert_close((y - m_q)[rejected].norm(dim=1), (reflected - m_p)[rejected].norm(dim=1))


def test_kernel_keeps_a_draft_exactly_when_u_is_below_the_density_ratio():
    g = torch.Generator().manual_seed(1)
    m_p, m_q = torch.randn(2000, 3, generator=g, dtype=F64), torch.randn(2000, 3, generator=g, dtype=F64)
    sigma, z = torch.full((2000, 1), 0.7, dtype=F64), torch.randn(2000, 3, generator=g, dtype=F64)
    u = torch.rand(2000, generator=g, dtype=F64)
    state, accepted = accept_or_reflect(m_p, m_q, sigma, z, u)
    y = (m_q + sigma * z).numpy()
    ratio = np.exp(stats.multivariate_normal.logpdf(y - m_p.numpy(), cov=0.49 * np.eye(3))
                   - stats.multivariate_normal.logpdf(y - m_q.numpy(), cov=0.49 * np.eye(3)))
    np.testing.assert_array_equal(accepted.numpy(), u.numpy() < np.minimum(1, ratio))
    torch.testing.assert_close(state[accepted], (m_q + sigma * z)[accepted])


def test_equal_means_always_keep_the_draft():
    m = torch.randn(100, 4, dtype=F64)
    z = torch.randn(100, 4, dtype=F64)
    state, accepted = accept_or_reflect(m, m.clone(), torch.ones(100, 1, dtype=F64), z, torch.rand(100, dtype=F64))
    assert bool(accepted.all())
    torch.testing.assert_close(state, m + z)


# ================================================================ 2. one step: goodness of fit, with power

DIM, DELTA, NUM_DRAWS = 4, 1.5, 100_000


def one_step_draws(kernel, seed: int = 0):
    """NUM_DRAWS draws of the kernel with Δ = DELTA along a random direction; whitened w [n, d] and basis."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(DIM)
    direction /= np.linalg.norm(direction)
    sigma = 0.4
    m_q = rng.standard_normal(DIM)
    m_p = m_q + DELTA * sigma * direction
    g = torch.Generator().manual_seed(seed)
    n = NUM_DRAWS
    state, accepted = kernel(torch.tensor(m_p).expand(n, DIM), torch.tensor(m_q).expand(n, DIM),
                             torch.full((n, 1), sigma, dtype=F64), torch.randn(n, DIM, generator=g, dtype=F64),
                             torch.rand(n, generator=g, dtype=F64))
    w = (state.numpy() - m_p) / sigma
    return w, accepted.numpy(), basis_from(direction, rng)


def test_one_step_output_is_the_target_gaussian():
    w, accepted, basis = one_step_draws(accept_or_reflect)
    pvalue, _ = whitened_battery(w, basis)
    assert pvalue > SIGNIFICANCE, pvalue
    expected = 2 * stats.norm.cdf(-DELTA / 2)
    assert stats.binomtest(int(accepted.sum()), len(accepted), expected).pvalue > SIGNIFICANCE


@pytest.mark.parametrize("name", list(BROKEN_KERNELS))
def test_one_step_negative_control_fails(name):
    torch.manual_seed(0)
    w, _, basis = one_step_draws(BROKEN_KERNELS[name], seed=1)
    _, num_tests = whitened_battery(w, basis)
    distance, coordinate = broken_kernel_distance(name, DELTA)
    power = ks_power_lower_bound(distance, NUM_DRAWS, SIGNIFICANCE / num_tests)
    assert power >= MIN_POWER, f"the battery cannot catch {name} on coordinate {coordinate}: power {power:.3f}"
    pvalue, _ = whitened_battery(w, basis)
    assert pvalue < SIGNIFICANCE, f"{name} passed: p = {pvalue:.3g} (power ≥ {power:.4f})"


# ================================================================ 3. whole chain vs the closed-form law

CHAIN_STEPS = 30
DATA_MEAN, DATA_VAR = np.array([1.0, -0.5]), np.array([0.3, 2.0])


def closed_form_output_law(num_steps: int, data_mean: np.ndarray, data_var: np.ndarray):
    """Mean and variance of the plain DDPM sampler's x_0 per coordinate, for Gaussian data (numpy).

    ε(x, s) = c_s (x − √ᾱ_s μ), c_s = √(1 − ᾱ_s) / (ᾱ_s v + 1 − ᾱ_s), so each step is
    x ← a_s x + b_s + √β_s ξ with a_s = (1 − β_s c_s / √(1 − ᾱ_s)) / √α_s, b_s = β_s c_s √ᾱ_s μ / (√(1 − ᾱ_s) √α_s).
    """
    scale = 1000 / num_steps
    betas = np.linspace(1e-4 * scale, min(0.02 * scale, 0.999), num_steps)
    alpha_bars = np.cumprod(1 - betas)
    mean, var = np.zeros_like(data_mean), np.ones_like(data_var)
    for s in range(num_steps - 1, -1, -1):
        beta, bar = betas[s], alpha_bars[s]
        c = np.sqrt(1 - bar) / (bar * data_var + 1 - bar)
        a = (1 - beta * c / np.sqrt(1 - bar)) / np.sqrt(1 - beta)
        b = beta * c * np.sqrt(bar) * data_mean / (np.sqrt(1 - bar) * np.sqrt(1 - beta))
        mean, var = a * mean + b, a**2 * var + beta
    return mean, var


def gaussian_chain(dim: int):
    schedule = Schedule.linear(CHAIN_STEPS)
    target = GaussianEps(schedule, torch.tensor(DATA_MEAN[:dim]), torch.tensor(DATA_VAR[:dim]))
    wrong = GaussianEps(schedule, torch.tensor(DATA_MEAN[:dim] + 0.4), torch.tensor(DATA_VAR[:dim] * 2.5))
    return schedule, target, wrong


def projections(dim: int) -> np.ndarray:
    if dim == 1:
        return np.ones((1, 1))
    return np.array([[1, 0], [0, 1], [1, 1], [1, -1], [1, 2]]) / np.linalg.norm([[1, 0], [0, 1], [1, 1], [1, -1],
                                                                                  [1, 2]], axis=1, keepdims=True)


def chain_pvalue(x: np.ndarray) -> float:
    """Bonferroni over KS tests of projections u·x against N(u·M, Σ u_j² V_j), the closed-form law."""
    dim = x.shape[1]
    mean, var = closed_form_output_law(CHAIN_STEPS, DATA_MEAN[:dim], DATA_VAR[:dim])
    units = projections(dim)
    pvalues = [stats.kstest(x @ u, stats.norm(u @ mean, np.sqrt((u**2) @ var)).cdf).pvalue for u in units]
    return min(pvalues) * len(pvalues)


def run_chain(dim: int, drafter_name: str, gamma, num_chains: int, seed: int):
    schedule, target, wrong = gaussian_chain(dim)
    drafter = {"wrong_gaussian": EpsDrafter(wrong, schedule), "frozen_x0": FrozenDrift(schedule, "x0"),
               "frozen_eps": FrozenDrift(schedule, "eps")}[drafter_name]
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(num_chains, dim, generator=g, dtype=F64)
    gamma = AdaptiveGamma(max_gamma=6) if gamma == "auto" else gamma
    return sample_speculative(target, schedule, x_T, drafter, gamma=gamma, generator=g)


def test_closed_form_law_matches_the_plain_sampler():
    schedule, target, _ = gaussian_chain(2)
    g = torch.Generator().manual_seed(5)
    x, stats_ = sample_plain(target, schedule, torch.randn(40_000, 2, generator=g, dtype=F64), generator=g)
    assert stats_.target_calls == CHAIN_STEPS
    assert chain_pvalue(x.numpy()) > SIGNIFICANCE


@pytest.mark.parametrize("dim,drafter_name,gamma", [
    (1, "wrong_gaussian", 1), (1, "wrong_gaussian", 4), (1, "frozen_eps", 3), (2, "wrong_gaussian", 3),
    (2, "frozen_x0", 5), (2, "frozen_eps", "auto"),
])
def test_speculative_chain_matches_the_closed_form_law(dim, drafter_name, gamma):
    x, stats_ = run_chain(dim, drafter_name, gamma, num_chains=40_000, seed=11)
    assert 0 < stats_.alpha < 1, stats_.alpha  # drafts are both kept and reflected: both paths tested
    assert stats_.target_calls < CHAIN_STEPS
    assert chain_pvalue(x.numpy()) > SIGNIFICANCE


@pytest.mark.parametrize("name", list(BROKEN_KERNELS))
def test_chain_negative_control_fails(name, monkeypatch):
    """The broken kernels inside the whole 1-D chain; power from a pilot run of the broken chain.

    D̂ = sup|F̂_pilot − F_exact| from n_pilot independent chains; with probability ≥ 1 − 1e-4 the
    true distance exceeds D̂ − √(log(2e4) / 2 n_pilot) (DKW–Massart), and the power bound uses that.
    """
    monkeypatch.setattr(sampler_module, "accept_or_reflect", BROKEN_KERNELS[name])
    torch.manual_seed(0)
    mean, var = closed_form_output_law(CHAIN_STEPS, DATA_MEAN[:1], DATA_VAR[:1])
    exact = stats.norm(mean[0], np.sqrt(var[0]))
    num_pilot, num_test = 100_000, 40_000
    pilot, _ = run_chain(1, "wrong_gaussian", 4, num_chains=num_pilot, seed=21)
    distance = stats.kstest(pilot.numpy()[:, 0], exact.cdf).statistic - math.sqrt(math.log(2e4) / (2 * num_pilot))
    power = ks_power_lower_bound(distance, num_test, SIGNIFICANCE)
    assert power >= MIN_POWER, f"the chain test cannot catch {name}: power {power:.3f}"
    x, _ = run_chain(1, "wrong_gaussian", 4, num_chains=num_test, seed=22)
    assert chain_pvalue(x.numpy()) < SIGNIFICANCE


# ================================================================ 4. counts, determinism, real models, bad input


def test_a_drafter_equal_to_the_target_keeps_every_draft_and_moves_gamma_plus_one_steps_per_call():
    schedule, target, _ = gaussian_chain(2)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(500, 2, generator=g, dtype=F64)
    _, stats_ = sample_speculative(target, schedule, x_T, EpsDrafter(target, schedule), gamma=4, generator=g)
    assert stats_.alpha == 1.0
    assert stats_.target_calls == math.ceil(CHAIN_STEPS / 5)
    assert stats_.target_rows == 500 * 5 * stats_.target_calls


def test_same_seed_same_samples_and_gamma_zero_is_plain_sampling():
    schedule, target, wrong = gaussian_chain(2)
    x_T = torch.randn(300, 2, dtype=F64)
    runs = [sample_speculative(target, schedule, x_T, EpsDrafter(wrong, schedule), gamma=3,
                               generator=torch.Generator().manual_seed(9))[0] for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    plain, _ = sample_plain(target, schedule, x_T, generator=torch.Generator().manual_seed(4))
    as_plain, stats_ = sample_speculative(target, schedule, x_T, EpsDrafter(wrong, schedule), gamma=0,
                                          generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(as_plain, plain)
    assert stats_.target_calls == CHAIN_STEPS and stats_.drafted == 0


def test_embedded_mixture_model_speculative_halves_the_target_calls_and_keeps_the_law():
    """Energy-distance two-sample test, speculative vs plain, on the embedded 2-D mixture model.

    A permutation test would be slow; instead the statistic is compared with its spread between two
    independent plain runs of the same size (same law): speculative must not exceed 3× that.
    """
    from speculant.diffusion import load_model

    target = load_model("mixture")
    schedule = Schedule.linear(target.config.num_steps)
    g = torch.Generator().manual_seed(0)
    n = 1000
    x_T = torch.randn(n, 2, generator=g)
    spec, spec_stats = sample_speculative(target, schedule, x_T, FrozenDrift(schedule), gamma=8, generator=g)
    plain_a, _ = sample_plain(target, schedule, torch.randn(n, 2, generator=g), generator=g)
    plain_b, _ = sample_plain(target, schedule, torch.randn(n, 2, generator=g), generator=g)
    assert spec_stats.target_calls * 2 <= schedule.num_steps, spec_stats.as_dict()
    baseline = stats.energy_distance(plain_a[:, 0], plain_b[:, 0]) + stats.energy_distance(plain_a[:, 1], plain_b[:, 1])
    observed = stats.energy_distance(spec[:, 0], plain_a[:, 0]) + stats.energy_distance(spec[:, 1], plain_a[:, 1])
    assert observed < 3 * baseline + 0.02, (observed, baseline)


def test_training_a_small_model_lowers_the_loss():
    from speculant.diffusion.models import EpsMLP, MLPConfig, mixture_data, train_eps_model

    schedule = Schedule.linear(50)
    model = EpsMLP(MLPConfig(dim=2, hidden=32, depth=2, num_steps=50))
    losses = train_eps_model(model, mixture_data(2000), schedule, steps=300, batch_size=128, seed=0)
    assert np.mean(losses[-50:]) < 0.8 * np.mean(losses[:20])


def test_bad_input_raises_a_clear_error():
    schedule, target, wrong = gaussian_chain(1)
    with pytest.raises(ValueError, match="gamma"):
        sample_speculative(target, schedule, torch.zeros(2, 1, dtype=F64), EpsDrafter(wrong, schedule), gamma=-1)
    with pytest.raises(ValueError, match="betas"):
        Schedule(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="mode"):
        FrozenDrift(schedule, "velocity")
    with pytest.raises(ValueError, match="NaN"):
        sample_plain(lambda x, s: torch.full_like(x, float("nan")), schedule, torch.zeros(2, 1))


def diffusion_args(*argv: str):
    import argparse

    from speculant.diffusion import cli

    parser = argparse.ArgumentParser(prog="speculant")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return cli, parser.parse_args(["diffusion", *argv])


def test_cli_samples_both_ways_prints_the_statistics_and_writes_the_pngs(tmp_path, capsys):
    cli, args = diffusion_args("--model", "mixture", "--samples", "100", "--gamma", "4", "--nfe-gammas", "2",
                               "--out", str(tmp_path), "--json")
    assert cli.run(args) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["plain"]["target_calls"] == 200 and out["plain"]["alpha"] is None
    assert out["speculative"]["target_calls"] < 100 and 0 < out["speculative"]["alpha"] <= 1
    assert set(out["nfe_vs_gamma"]) == {"2"}
    assert (tmp_path / "samples.png").stat().st_size > 1000 and (tmp_path / "nfe_vs_gamma.png").stat().st_size > 1000


def test_cli_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        diffusion_args("--gamma", "0")
    cli, args = diffusion_args("--samples", "0", "--out", str(tmp_path))
    with pytest.raises(ValueError, match="--samples"):
        cli.run(args)
    cli, args = diffusion_args("--model", "no-such-model", "--out", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no diffusion model"):
        cli.run(args)
    cli, args = diffusion_args("--model", "mixture", "--draft", "digits-draft", "--out", str(tmp_path))
    with pytest.raises(ValueError, match="dimensions"):
        cli.run(args)
