"""Drafters for the speculative diffusion sampler: each drafts a block of L steps.

Every drafter turns its guess of ε into a draft mean with the target's own schedule and moves by
the target's σ, so draft and target steps are Gaussians of equal variance, as the exact kernel
requires. The noise is an argument (the sampler draws it), so a block is a function of its inputs.

FrozenDrift   the target's own prediction frozen at the last state it evaluated on the chain's
              verified path (`Anchor`): no training, no network call. mode "x0" freezes the
              predicted clean sample x̂_0 and re-derives ε at each drafted state (DDIM-like), mode
              "eps" freezes ε itself. Either way the draft mean is linear, m = a_s y + b_s v, so a
              block is one multiply-add per step. Valid because the anchor is a function of the
              verified history alone, fixed before the block is drafted.
EpsDrafter    any callable (x [N, d], step [N]) -> ε [N, d]: a small trained draft network
              (`models.load_model("digits-draft")`), or anything else; one call per drafted step.
"""

from __future__ import annotations

import torch

from speculant.diffusion.models import Schedule
from speculant.diffusion.sampler import Anchor, EpsModel


def block_steps(step: torch.Tensor, length: int) -> torch.Tensor:
    """The step index of the state before each draft: [L, A], clamped at 1 past the chain's end."""
    return (step[None] - torch.arange(length, device=step.device)[:, None]).clamp_min(1)


class FrozenDrift:
    needs_anchor = True

    def __init__(self, schedule: Schedule, mode: str = "x0"):
        if mode not in ("eps", "x0"):
            raise ValueError(f"FrozenDrift mode must be 'eps' or 'x0', got {mode!r}")
        self.schedule, self.mode = schedule, mode

    def draft(self, x: torch.Tensor, step: torch.Tensor, anchor: Anchor,
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [A, d] at steps [A], noise [L, A, d] -> (states [L + 1, A, d] from x, draft means [L, A, d])."""
        steps = block_steps(step, len(noise))
        frozen = anchor.eps if self.mode == "eps" else self.schedule.predicted_x0(anchor.x, anchor.step, anchor.eps)
        a, b = self.schedule.linear_mean(steps, x, given=self.mode)  # [L, A, 1] each
        shift = b * frozen + self.schedule.sigma(steps.reshape(-1), x).reshape(a.shape) * noise  # [L, A, d]
        states = [x]
        for k in range(len(noise)):
            states.append(torch.addcmul(shift[k], a[k], states[-1]))
        states = torch.stack(states)
        return states, a * states[:-1] + b * frozen


class EpsDrafter:
    needs_anchor = False

    def __init__(self, eps_model: EpsModel, schedule: Schedule):
        self.eps_model, self.schedule = eps_model, schedule

    def draft(self, x: torch.Tensor, step: torch.Tensor, anchor: Anchor,
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [A, d] at steps [A], noise [L, A, d] -> (states [L + 1, A, d] from x, draft means [L, A, d])."""
        states, means = [x], []
        for s, z in zip(block_steps(step, len(noise)), noise):
            means.append(self.schedule.mean(states[-1], s, self.eps_model(states[-1], s)))
            states.append(means[-1] + self.schedule.sigma(s, x) * z)
        return torch.stack(states), torch.stack(means) if means else noise[:0]


def make_drafter(spec: str, schedule: Schedule, device: str | torch.device = "cpu") -> FrozenDrift | EpsDrafter:
    """'frozen' (= 'frozen-x0') / 'frozen-eps', or an embedded draft network name / folder (e.g. 'digits-draft')."""
    if spec in ("frozen", "frozen-x0"):
        return FrozenDrift(schedule, "x0")
    if spec == "frozen-eps":
        return FrozenDrift(schedule, "eps")
    from speculant.diffusion.models import load_model

    return EpsDrafter(load_model(spec).to(device), schedule)
