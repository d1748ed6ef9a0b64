"""The paper's analysis (Leviathan et al. 2023, §3) as functions.

α      expected acceptance rate, E[β] with β = Σ_x min(p(x), q(x)) (Definition 3.1).
γ      tokens drafted per step.
c      cost ratio: time of one draft forward ÷ time of one target forward.
ĉ      ratio of arithmetic operations per token, draft ÷ target (Thm 3.11).

`GenerationStats` counts what one request measured (α, τ, c per step) and evaluates Thm 3.8 at
those values; the engine, the batched engine and a hierarchy's levels keep one each.

Table 1 of the paper (c = ĉ = 0):

>>> round(expected_speedup(0.8, 5, 0.0), 2), round(operation_increase(0.8, 5, 0.0), 2)
(3.69, 1.63)
>>> round(expected_speedup(0.9, 10, 0.0), 2), round(operation_increase(0.9, 10, 0.0), 2)
(6.86, 1.6)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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


def position_gains(now: list[int] | tuple[int, ...], before: list[int] | tuple[int, ...]) -> list[int]:
    """What per-position counters (GenerationStats.drafted_by_position, accepted_by_position) gained
    since `before`: now[i] - before[i], a position `before` has not reached counting from 0."""
    return [value - (before[i] if i < len(before) else 0) for i, value in enumerate(now)]


def _check(alpha: float, gamma: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")


@dataclass
class GenerationStats:
    """Counters of one request. `alpha` estimates the paper's α as accepted ÷ tested draft tokens
    (tokens after the first rejection of a step are never tested, so counting them would bias α
    down); `accepted_per_drafted` is accepted ÷ all drafted tokens."""

    gamma: int | str
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    alternatives_kept: int = 0  # steps whose last kept draft token was an alternative (--candidates)
    lookup_tokens: int = 0  # draft tokens kept from the lookup branch (--lookup)
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    gamma_history: list[int] = field(default_factory=list)  # γ chosen at each step
    prefill_time: float = 0.0
    draft_time: float = 0.0
    target_time: float = 0.0  # target forwards + acceptance, prefill excluded
    decode_time: float = 0.0  # wall time of the decoding loop, prefill excluded
    finish_reason: str = ""  # "stop", "length" (max_new_tokens) or "context" (model full)

    @property
    def alpha(self) -> float:
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else 0.0

    @property
    def accepted_per_drafted(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tau(self) -> float:
        """Tokens per target call."""
        return self.new_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    @property
    def cost_ratio(self) -> float:
        """c: time of one draft token ÷ time of one target call, as measured."""
        if not self.drafted or not self.target_calls or not self.target_time:
            return 0.0
        return (self.draft_time / self.drafted) / (self.target_time / self.target_calls)

    @property
    def mean_gamma(self) -> float:
        """Mean draft length actually proposed per step (a drafter may propose fewer than γ)."""
        return self.drafted / self.target_calls if self.target_calls else 0.0

    @property
    def predicted_speedup(self) -> float:
        """Thm 3.8 evaluated at the measured α, c and the mean draft length."""
        gamma = round(self.mean_gamma)
        if gamma == 0:
            return 1.0
        return expected_speedup(min(self.alpha, 1.0), gamma, self.cost_ratio)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_time + self.decode_time
        return self.new_tokens / total if total else 0.0

    def record(self, gamma: int, step) -> None:
        """Add one step (a speculant.step.StepResult) to the counters (tokens are counted by the caller)."""
        self.target_calls += step.target_calls
        self.drafted += step.num_drafted
        self.accepted += step.num_accepted
        self.rejections += int(step.num_accepted < step.num_drafted)
        self.alternatives_kept += int(step.kept_alternative)
        self.lookup_tokens += step.lookup_kept
        self.draft_time += step.draft_time
        self.target_time += step.target_time
        self.gamma_history.extend([gamma] * step.target_calls)
        while len(self.drafted_by_position) < step.num_drafted:
            self.drafted_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(step.num_drafted):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < step.num_accepted)

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("alpha", "accepted_per_drafted", "tau", "acceptance_by_position", "cost_ratio",
                     "mean_gamma", "predicted_speedup", "tokens_per_s"):
            out[name] = getattr(self, name)
        return out
