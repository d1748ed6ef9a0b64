"""The paper's analysis (Leviathan et al. 2023, §3) as functions.

α      expected acceptance rate, E[β] with β = Σ_x min(p(x), q(x)) (Definition 3.1).
γ      tokens drafted per step.
c      cost ratio: time of one draft forward ÷ time of one target forward.
ĉ      ratio of arithmetic operations per token, draft ÷ target (Thm 3.11).

Table 1 of the paper (c = ĉ = 0):

>>> round(expected_speedup(0.8, 5, 0.0), 2), round(operation_increase(0.8, 5, 0.0), 2)
(3.69, 1.63)
>>> round(expected_speedup(0.9, 10, 0.0), 2), round(operation_increase(0.9, 10, 0.0), 2)
(6.86, 1.6)
"""

from __future__ import annotations

import torch


def acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> float:
    """α estimated as the mean of β = Σ min(p, q) over the rows of [n, vocab] (or one [vocab])."""
    return float(torch.minimum(target_probs, draft_probs).sum(-1).mean())


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """E[tokens per target call] = (1 − α^(γ+1)) / (1 − α)  (Eq. 1); γ + 1 when α = 1."""
    _check(alpha, gamma)
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Walltime improvement (Thm 3.8): (1 − α^(γ+1)) / ((1 − α)(γc + 1))."""
    if cost_ratio < 0:
        raise ValueError(f"cost ratio c must be >= 0, got {cost_ratio}")
    return expected_tokens_per_call(alpha, gamma) / (gamma * cost_ratio + 1.0)


def operation_increase(alpha: float, gamma: int, op_ratio: float) -> float:
    """Factor of extra arithmetic (Thm 3.11): (1 − α)(γĉ + γ + 1) / (1 − α^(γ+1))."""
    if op_ratio < 0:
        raise ValueError(f"operation ratio ĉ must be >= 0, got {op_ratio}")
    return (gamma * op_ratio + gamma + 1.0) / expected_tokens_per_call(alpha, gamma)


def optimal_gamma(alpha: float, cost_ratio: float, max_gamma: int = 32) -> int:
    """The γ in 1..max_gamma that maximises `expected_speedup`; 0 if no γ beats plain decoding.

    >>> optimal_gamma(0.8, 0.05), optimal_gamma(0.5, 0.6)
    (8, 0)
    """
    best_gamma, best_speedup = 0, 1.0
    for gamma in range(1, max_gamma + 1):
        speedup = expected_speedup(alpha, gamma, cost_ratio)
        if speedup > best_speedup + 1e-12:
            best_gamma, best_speedup = gamma, speedup
    return best_gamma


def _check(alpha: float, gamma: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
