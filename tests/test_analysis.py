"""The paper's formulas (Leviathan et al. 2023, §3): Eq. 1, Thm 3.8, Thm 3.11, Definition 3.1."""

from __future__ import annotations

import pytest
import torch

from speculant.acceptance import acceptance_probs
from speculant.analysis import (
    acceptance_rate,
    expected_speedup,
    expected_tokens_per_call,
    operation_increase,
    optimal_gamma,
)


@pytest.mark.parametrize(
    "alpha, gamma, speedup, operations",
    [
        (0.8, 5, 3.69, 1.63),  # the paper's worked example (c = ĉ = 0)
        (0.9, 10, 6.86, 1.60),  # the paper's worked example (c = ĉ = 0)
    ],
)
def test_papers_table_values(alpha, gamma, speedup, operations):
    assert round(expected_speedup(alpha, gamma, 0.0), 2) == speedup
    assert round(operation_increase(alpha, gamma, 0.0), 2) == operations


@pytest.mark.parametrize(
    "alpha, gamma, tokens",
    [
        # computed by hand from Eq. 1, (1 - α^(γ+1)) / (1 - α)
        (0.5, 1, 1.5),  # 1 + α
        (0.5, 3, 1.875),  # 1 + .5 + .25 + .125
        (0.6, 3, 2.176),  # (1 - .1296) / .4
        (0.7, 2, 2.19),  # 1 + .7 + .49
        (0.0, 7, 1.0),  # every draft rejected: one token per call
        (1.0, 7, 8.0),  # every draft accepted: γ + 1
        (0.8, 0, 1.0),  # no draft: plain decoding
    ],
)
def test_expected_tokens_per_call_is_the_geometric_sum(alpha, gamma, tokens):
    assert expected_tokens_per_call(alpha, gamma) == pytest.approx(tokens, rel=1e-12)
    # the closed form is the truncated geometric series 1 + α + ... + α^γ
    assert expected_tokens_per_call(alpha, gamma) == pytest.approx(sum(alpha**i for i in range(gamma + 1)), rel=1e-12)


def test_expected_tokens_per_call_is_continuous_at_alpha_one():
    assert expected_tokens_per_call(1 - 1e-9, 4) == pytest.approx(5.0, rel=1e-6)


def test_speedup_divides_by_the_cost_of_drafting():
    # α = .8, γ = 3, c = .1: (1 - .8^4) / .2 = 2.952 tokens per call, cost 1 + 3 * .1 = 1.3
    assert expected_speedup(0.8, 3, 0.1) == pytest.approx(2.952 / 1.3, rel=1e-12)
    # Thm 3.11 with ĉ = .1: (3 * .1 + 3 + 1) / 2.952
    assert operation_increase(0.8, 3, 0.1) == pytest.approx(4.3 / 2.952, rel=1e-12)


def test_a_useless_draft_is_a_slowdown_and_a_free_perfect_one_gives_gamma_plus_one():
    assert expected_speedup(0.0, 4, 0.5) == pytest.approx(1 / 3)
    assert expected_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert operation_increase(1.0, 4, 0.0) == pytest.approx(1.0)


def test_optimal_gamma_maximises_the_speedup():
    for alpha in (0.3, 0.6, 0.8, 0.9, 0.95):
        for cost in (0.01, 0.05, 0.2):
            best = optimal_gamma(alpha, cost)
            speedups = {g: expected_speedup(alpha, g, cost) for g in range(1, 33)}
            if best == 0:
                assert max(speedups.values()) <= 1.0 + 1e-12
            else:
                assert speedups[best] == pytest.approx(max(speedups.values()))
                assert speedups[best] > 1.0


def test_optimal_gamma_grows_with_alpha_and_shrinks_with_cost():
    alphas = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    by_alpha = [optimal_gamma(a, 0.05) for a in alphas]
    assert by_alpha == sorted(by_alpha) and by_alpha[-1] > by_alpha[0]
    costs = [0.001, 0.01, 0.05, 0.1, 0.3, 0.6]
    by_cost = [optimal_gamma(0.8, c) for c in costs]
    assert by_cost == sorted(by_cost, reverse=True) and by_cost[0] > by_cost[-1]


def test_optimal_gamma_edge_cases():
    assert optimal_gamma(0.8, 0.05) == 8  # the module's doctest values
    assert optimal_gamma(0.5, 0.6) == 0  # never worth drafting
    assert optimal_gamma(0.0, 0.01) == 0
    assert optimal_gamma(1.0, 0.0) == 32  # free and perfect: as long as allowed
    assert optimal_gamma(1.0, 0.0, max_gamma=5) == 5


@pytest.mark.parametrize(
    "call",
    [
        lambda: expected_tokens_per_call(-0.1, 3),
        lambda: expected_tokens_per_call(1.1, 3),
        lambda: expected_tokens_per_call(0.5, -1),
        lambda: expected_speedup(0.5, 3, -0.1),
        lambda: expected_speedup(1.5, 3, 0.1),
        lambda: operation_increase(0.5, -2, 0.0),
        lambda: optimal_gamma(-0.5, 0.1),
        lambda: optimal_gamma(0.5, -0.1),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError, match="must be"):
        call()


def test_acceptance_rate_is_the_sum_of_min_p_q():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.3, 0.1, 0.5], dtype=torch.float64)
    assert acceptance_rate(p, q) == pytest.approx(0.1 + 0.3 + 0.1)
    assert acceptance_rate(p, p) == pytest.approx(1.0)
    assert acceptance_rate(p, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64)) == 0.0


def test_acceptance_rate_averages_over_rows_and_matches_the_acceptance_rule():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(10, 7, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(10, 7, generator=g, dtype=torch.float64), -1)
    # α = E_x~q[min(1, p(x)/q(x))], with the acceptance rule's own probabilities
    betas = []
    for p_row, q_row in zip(p, q):
        accept = acceptance_probs(torch.arange(7), q_row.expand(7, 7), p_row.expand(7, 7))
        betas.append(float((q_row * accept).sum()))
    assert acceptance_rate(p, q) == pytest.approx(sum(betas) / len(betas), rel=1e-12)
    # 1 - total variation distance
    assert acceptance_rate(p, q) == pytest.approx(float(1 - 0.5 * (p - q).abs().sum(-1).mean()), rel=1e-12)


def test_position_gains_count_a_position_not_reached_before_from_zero():
    from speculant.analysis import position_gains

    assert position_gains([3, 5, 2], [1, 5]) == [2, 0, 2]
    assert position_gains((4,), ()) == [4]
    assert position_gains([], [1]) == []
