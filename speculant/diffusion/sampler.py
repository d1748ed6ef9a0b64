"""Exact speculative sampling of diffusion models whose reverse steps are Gaussians of equal variance.

De Bortoli, Galashov, Gretton & Doucet, "Accelerated Diffusion Models via Speculative Sampling"
(ICML 2025, arXiv 2501.05370). Glossary, for one chain at verified state x_0 (at step s):

draft      the drafter proposes L steps one after the other (cheap): y_k = m_q,k + σ_k z_k, z_k ~ N(0, I),
           where m_q,k is the draft mean at the state before, x_{k−1} (x_k = y_k), σ_k the target's σ at
           that step. m_q,k may depend on anything already verified and on y_1..y_{k−1}.
verify     the target's ε at all L + 1 states x_0..x_L in ONE batched forward gives m_p,1..m_p,L+1.
accept     y_k is kept with probability min(1, p(y_k) / q(y_k)), p = N(m_p,k, σ_k²I), q = N(m_q,k, σ_k²I):
           log p/q = z·Δ − ‖Δ‖²/2 with Δ = (m_p,k − m_q,k) / σ_k. P(accept) = 2Φ(−‖Δ‖/2) = 1 − TV(p, q).
reflect    at the first rejection k the state is y' = m_p,k + σ_k (I − 2eeᵀ) z_k, e = Δ / ‖Δ‖: the mirror
           image of y_k in the hyperplane half-way between the two means. The mirror swaps q and p, so the
           rejected mass (q − p)⁺ lands as (p − q)⁺: kept + reflected = min(p, q) + (p − q)⁺ = p, exactly.
           No residual is sampled. The chain moves k steps; the drafts after k are discarded.
bonus      when all L drafts are kept, one more step is drawn from the target: x_{L+1} ~ N(m_p,L+1, σ²I),
           from the mean the verification already computed. The chain moves L + 1 steps.

So one target call (one batched forward, L + 1 states per chain) moves a chain 1..L+1 steps, and the
law of every state is the plain ancestral sampler's. The draft length L may be fixed or chosen
before each block from what is already verified (`AdaptiveGamma`): still exact.

`accept_or_reflect` is the whole kernel, a pure function with the random draws as arguments. Many
chains run at once (a batch); each has its own step index, and a batch's target call evaluates
the (L + 1) states of every unfinished chain in one forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from speculant.diffusion.models import Schedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [N, d], step [N] long) -> ε [N, d]


def log_acceptance_ratio(target_mean: torch.Tensor, draft_mean: torch.Tensor, sigma: torch.Tensor,
                         draft_noise: torch.Tensor) -> torch.Tensor:
    """log p(y) / q(y) at y = draft_mean + sigma · draft_noise; rows [N, d], sigma [N, 1] -> [N]."""
    delta = (target_mean - draft_mean) / sigma
    return (draft_noise * delta).sum(-1) - 0.5 * delta.square().sum(-1)


def accept_or_reflect(target_mean: torch.Tensor, draft_mean: torch.Tensor, sigma: torch.Tensor,
                      draft_noise: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the kernel: the draft y = m_q + σz kept if u < p(y)/q(y), else its reflection.

    target_mean, draft_mean, draft_noise [N, d]; sigma [N, 1]; uniform [N] in [0, 1).
    Returns (state [N, d], accepted [N] bool); the state's law is N(target_mean, σ²I) exactly.

    >>> m_p, m_q, z = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[-2.0, 0.5]])
    >>> accept_or_reflect(m_p, m_q, torch.ones(1, 1), z, torch.tensor([0.5]))  # p(y)/q(y) = e^-2.5
    (tensor([[3.0000, 0.5000]]), tensor([False]))
    """
    delta = (target_mean - draft_mean) / sigma  # [N, d]
    log_ratio = (draft_noise * delta).sum(-1) - 0.5 * delta.square().sum(-1)
    accepted = torch.log(uniform) < log_ratio  # u < min(1, r); when Δ = 0, log r = 0 > log u: always kept
    direction = delta / delta.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(delta.dtype).tiny)
    reflected = draft_noise - 2 * (draft_noise * direction).sum(-1, keepdim=True) * direction
    state = torch.where(accepted[:, None], draft_mean + sigma * draft_noise, target_mean + sigma * reflected)
    return state, accepted


@dataclass(frozen=True)
class Anchor:
    """The target's latest evaluation on each chain's verified path: ε(x, s) at state x, step s."""

    x: torch.Tensor  # [B, d]
    step: torch.Tensor  # [B] long
    eps: torch.Tensor  # [B, d]


class Drafter(Protocol):
    """Drafts a block: from states x [A, d] at steps [A], with the noise [L, A, d] it is given, returns
    the states [L + 1, A, d] (x first; state k + 1 = draft mean k + σ · noise k, σ the target's) and
    the draft means [L, A, d]. Each draft mean may depend on the anchor and the states before it.

    `needs_anchor`: the drafter reads `Anchor`, so a chain's first block must be a plain step.
    """

    needs_anchor: bool

    def draft(self, x: torch.Tensor, step: torch.Tensor, anchor: Anchor,
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class AdaptiveGamma:
    """Chooses the draft length L before each block from the acceptance seen so far (so still exact).

    Per-step acceptance α is estimated with exponential forgetting (half-life `half_life` judged
    drafts, prior α = 0.5 worth 4 drafts); a block of length L moves E(L) = (1 − α^(L+1)) / (1 − α)
    steps and costs 1 + `draft_cost` · L target calls (`draft_cost`: one draft step plus one more
    verified state, relative to a target call); L = argmax E(L) / cost(L) in 1..max_gamma.
    """

    def __init__(self, max_gamma: int = 16, draft_cost: float = 0.05, half_life: float = 200.0):
        if max_gamma < 1 or draft_cost < 0 or half_life <= 0:
            raise ValueError("AdaptiveGamma needs max_gamma >= 1, draft_cost >= 0, half_life > 0")
        self.max_gamma, self.draft_cost = max_gamma, draft_cost
        self.decay = 0.5 ** (1 / half_life)
        self.accepted, self.judged = 2.0, 4.0

    def choose(self) -> int:
        alpha = min(self.accepted / self.judged, 1 - 1e-6)
        lengths = range(1, self.max_gamma + 1)
        return max(lengths, key=lambda n: (1 - alpha ** (n + 1)) / (1 - alpha) / (1 + self.draft_cost * n))

    def update(self, accepted: int, judged: int) -> None:
        forget = self.decay ** judged
        self.accepted = forget * self.accepted + accepted
        self.judged = forget * self.judged + judged


@dataclass
class DiffusionStats:
    num_samples: int
    num_steps: int  # T, steps per chain
    target_calls: int = 0  # sequential batched target forwards: the NFE that bounds latency
    target_rows: int = 0  # states the target evaluated in all (per chain: L + 1 per call)
    chain_calls: int = 0  # Σ over chains of the target calls it took part in
    draft_steps: int = 0  # sequential drafter steps
    drafted: int = 0  # drafts proposed (within each chain's remaining steps)
    judged: int = 0  # drafts whose accept/reject was decided (up to and including the first rejection)
    accepted: int = 0
    wall_time: float = 0.0

    @property
    def alpha(self) -> float:
        """Per-step acceptance rate: accepted / judged drafts."""
        return self.accepted / self.judged if self.judged else math.nan

    @property
    def steps_per_call(self) -> float:
        """Steps one chain moves per target call it takes part in (1 for plain sampling)."""
        return self.num_samples * self.num_steps / self.chain_calls if self.chain_calls else math.nan

    def as_dict(self) -> dict:
        """The counts and rates, JSON-ready (α is None when nothing was drafted, e.g. plain sampling)."""
        return {**asdict(self), "alpha": self.alpha if self.judged else None, "steps_per_call": self.steps_per_call}


def _finish(stats: DiffusionStats, x: torch.Tensor, start: float) -> tuple[torch.Tensor, DiffusionStats]:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    stats.wall_time = time.perf_counter() - start
    if not bool(torch.isfinite(x).all()):
        raise ValueError("sampling produced a NaN or infinite value")
    return x, stats


@torch.no_grad()
def sample_plain(target: EpsModel, schedule: Schedule, x_T: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiffusionStats]:
    """DDPM ancestral sampling from x_T [B, d]: T sequential target calls. Returns (x_0 [B, d], stats)."""
    start = time.perf_counter()
    x = x_T
    stats = DiffusionStats(num_samples=len(x), num_steps=schedule.num_steps)
    for s in range(schedule.num_steps, 0, -1):
        step = torch.full((len(x),), s, dtype=torch.long, device=x.device)
        mean = schedule.mean(x, step, target(x, step))
        x = mean + schedule.sigma(step, x) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        stats.target_calls += 1
        stats.target_rows += len(x)
        stats.chain_calls += len(x)
    return _finish(stats, x, start)


@torch.no_grad()
def sample_speculative(target: EpsModel, schedule: Schedule, x_T: torch.Tensor, drafter: Drafter,
                       gamma: int | AdaptiveGamma = 4,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiffusionStats]:
    """Speculative DDPM sampling from x_T [B, d] with the same output law as `sample_plain`.

    gamma: the draft length L per block, or an `AdaptiveGamma` that picks it before each block.
    Returns (x_0 [B, d], stats).
    """
    if isinstance(gamma, int) and gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    start = time.perf_counter()
    num_chains, dim = x_T.shape
    device, dtype = x_T.device, x_T.dtype
    stats = DiffusionStats(num_samples=num_chains, num_steps=schedule.num_steps)
    x = x_T.clone()
    step = torch.full((num_chains,), schedule.num_steps, dtype=torch.long, device=device)  # state x is x_step
    anchor = Anchor(x.clone(), step.clone(), torch.zeros_like(x))
    anchored = not drafter.needs_anchor

    counts = torch.zeros(3, dtype=torch.long, device=device)  # drafted, judged, accepted

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    while True:
        active = (step > 0).nonzero().squeeze(1)  # [A]
        if active.numel() == 0:
            break
        x_a, step_a = x[active], step[active]
        anchor_a = Anchor(anchor.x[active], anchor.step[active], anchor.eps[active])
        length = (gamma.choose() if isinstance(gamma, AdaptiveGamma) else gamma) if anchored else 0
        usable = (step_a - 1).clamp(max=length)  # [A] drafts that fit before step 0 (a bonus step follows)

        # Draft: L sequential cheap steps. states[k] is the state before draft k + 1, at step s − k.
        draft_noise = noise(length, len(active), dim)  # [L, A, d]
        states, draft_means = drafter.draft(x_a, step_a, anchor_a, draft_noise)
        row_steps = (step_a[None] - torch.arange(length + 1, device=device)[:, None]).clamp_min(1)  # [L + 1, A]
        stats.draft_steps += length

        # Verify: the target's ε at all L + 1 states of every active chain, one forward.
        eps = target(states.reshape(-1, dim), row_steps.reshape(-1)).reshape(states.shape)
        target_means = schedule.mean(states.reshape(-1, dim), row_steps.reshape(-1), eps.reshape(-1, dim))
        target_means = target_means.reshape(states.shape)  # [L + 1, A, d]
        stats.target_calls += 1
        stats.target_rows += states.shape[0] * states.shape[1]
        stats.chain_calls += len(active)

        # Accept: drafts 1..n kept, n the first rejection's index (or `usable`); a rejection is reflected.
        arange = torch.arange(len(active), device=device)
        if length:
            kernel_states, accepted = accept_or_reflect(
                target_means[:length].reshape(-1, dim), draft_means.reshape(-1, dim),
                schedule.sigma(row_steps[:length].reshape(-1), x_a), draft_noise.reshape(-1, dim),
                torch.rand(length * len(active), generator=generator, device=device, dtype=dtype))
            kernel_states, accepted = kernel_states.reshape(length, -1, dim), accepted.reshape(length, -1)
            num_accepted = torch.minimum(accepted.long().cumprod(0).sum(0), usable)  # [A]
            rejected_state = kernel_states[num_accepted.clamp(max=length - 1), arange]
        else:
            num_accepted = torch.zeros_like(step_a)
            rejected_state = x_a
        at = num_accepted  # the block ends with a step from state `at`: a reflection, or the bonus step
        bonus_state = target_means[at, arange] + schedule.sigma(row_steps[at, arange], x_a) * noise(len(active), dim)
        was_rejected = (num_accepted < usable)[:, None]
        x[active] = torch.where(was_rejected, rejected_state, bonus_state)
        step[active] = step_a - num_accepted - 1
        anchor.x[active], anchor.step[active], anchor.eps[active] = states[at, arange], row_steps[at, arange], eps[at, arange]
        anchored = True

        judged = torch.minimum(num_accepted + 1, usable)
        counts += torch.stack([usable.sum(), judged.sum(), num_accepted.sum()])  # on the device: no sync
        if isinstance(gamma, AdaptiveGamma) and length:
            gamma.update(int(num_accepted.sum()), int(judged.sum()))
    stats.drafted, stats.judged, stats.accepted = (int(c) for c in counts.tolist())
    return _finish(stats, x, start)
