"""Exact speculative sampling for diffusion models (De Bortoli et al. 2025): a leaf of speculant.

    from speculant.diffusion import Schedule, load_model, FrozenDrift, sample_speculative, sample_plain
    schedule = Schedule.linear(200)
    target = load_model("digits")
    x0, stats = sample_speculative(target, schedule, torch.randn(16, 64), FrozenDrift(schedule), gamma=8)
"""

from speculant.diffusion.drafters import EpsDrafter, FrozenDrift, make_drafter
from speculant.diffusion.models import EpsMLP, GaussianEps, MLPConfig, Schedule, load_model
from speculant.diffusion.sampler import (
    AdaptiveGamma,
    Anchor,
    DiffusionStats,
    accept_or_reflect,
    sample_plain,
    sample_speculative,
)

__all__ = ["AdaptiveGamma", "Anchor", "DiffusionStats", "EpsDrafter", "EpsMLP", "FrozenDrift", "GaussianEps",
           "MLPConfig", "Schedule", "accept_or_reflect", "load_model", "make_drafter", "sample_plain",
           "sample_speculative"]
