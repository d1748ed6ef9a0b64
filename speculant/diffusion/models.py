"""Small diffusion models: the DDPM schedule, an ε-predicting MLP, its training loop, the data sets.

Notation (Ho, Jain & Abbeel 2020). Steps s = 1..T; x_T ~ N(0, I); the reverse step from x_s is

    x_{s-1} ~ N(m(x_s, s), σ_s² I),   m(x, s) = (x − β_s / √(1 − ᾱ_s) · ε(x, s)) / √α_s,   σ_s² = β_s,

with α_s = 1 − β_s, ᾱ_s = α_1 ··· α_s, and ε(x, s) a network trained to predict the noise in
x_s = √ᾱ_s x_0 + √(1 − ᾱ_s) ε. σ_s² = β_s (not the posterior variance, which is 0 at s = 1): every
step is a proper Gaussian, which is what the speculative kernel needs.

Two data sets, both with no download: sklearn's bundled 8×8 digits (64 dimensions, scaled to
[−1, 1]) and a 2-D mixture of eight Gaussians on a circle. `GaussianEps` is the exact ε for
Gaussian data (linear in x), so the sampler's output law is known in closed form: the tests use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded" / "diffusion"


class Schedule:
    """β_1..β_T and the quantities derived from them; index s runs 1..T (index 0 is padding)."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.num_steps = betas.numel()
        pad = torch.zeros(1, dtype=torch.float64)
        self.betas = torch.cat([pad, betas])  # [T + 1]
        self.alphas = 1 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        self.sigmas = self.betas.sqrt()  # σ_s, the reverse step's standard deviation
        self._per_device: dict[tuple, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def linear(cls, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """DDPM's linear schedule, rescaled by 1000 / T so that T steps cover the same noise levels."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scale = 1000 / num_steps
        return cls(torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), num_steps))

    def _coefficients(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.device, like.dtype)
        if key not in self._per_device:
            one_minus_bar = (1 - self.alpha_bars).clamp_min(1e-300)
            eps_coef = self.betas / one_minus_bar.sqrt()
            self._per_device[key] = tuple(
                c.to(device=like.device, dtype=like.dtype)
                for c in (1 / self.alphas.sqrt(), eps_coef, self.sigmas, self.alpha_bars.sqrt(), one_minus_bar.sqrt()))
        return self._per_device[key]

    def mean(self, x: torch.Tensor, step: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """m(x, s) for rows x [N, d] at steps s [N] (long) given ε(x, s) [N, d]."""
        inv_sqrt_alpha, eps_coef, _, _, _ = self._coefficients(x)
        return inv_sqrt_alpha[step, None] * (x - eps_coef[step, None] * eps)

    def linear_mean(self, step: torch.Tensor, like: torch.Tensor, given: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each shaped like step with a trailing 1, such that m(x, s) = a x + b v for a fixed v.

        given="eps": v is ε itself; given="x0": v is x̂_0, with ε re-derived from it at x (DDIM-like).
        """
        inv_sqrt_alpha, eps_coef, _, sqrt_bar, sqrt_one_minus_bar = self._coefficients(like)
        step = step[..., None]
        if given == "eps":
            return inv_sqrt_alpha[step], -inv_sqrt_alpha[step] * eps_coef[step]
        ratio = eps_coef[step] / sqrt_one_minus_bar[step]
        return inv_sqrt_alpha[step] * (1 - ratio), inv_sqrt_alpha[step] * ratio * sqrt_bar[step]

    def sigma(self, step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ_s as a column [N, 1] for steps s [N]."""
        return self._coefficients(like)[2][step, None]

    def predicted_x0(self, x: torch.Tensor, step: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x − √(1 − ᾱ_s) ε) / √ᾱ_s."""
        _, _, _, sqrt_bar, sqrt_one_minus_bar = self._coefficients(x)
        return (x - sqrt_one_minus_bar[step, None] * eps) / sqrt_bar[step, None]

    def noised(self, x0: torch.Tensor, step: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_s = √ᾱ_s x_0 + √(1 − ᾱ_s) ε, the forward process used in training."""
        _, _, _, sqrt_bar, sqrt_one_minus_bar = self._coefficients(x0)
        return sqrt_bar[step, None] * x0 + sqrt_one_minus_bar[step, None] * noise


@dataclass(frozen=True)
class MLPConfig:
    dim: int
    hidden: int = 256
    depth: int = 3
    num_steps: int = 200  # T of the schedule it was trained with
    time_features: int = 32


class EpsMLP(nn.Module):
    """ε(x, s): an MLP on [x, sinusoidal features of s / T]; SiLU; residual hidden layers."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        freqs = torch.exp(torch.linspace(0, math.log(1000), config.time_features // 2))
        self.register_buffer("freqs", freqs, persistent=False)  # [time_features / 2]
        self.inp = nn.Linear(config.dim + config.time_features, config.hidden)
        self.hidden = nn.ModuleList(nn.Linear(config.hidden, config.hidden) for _ in range(config.depth - 1))
        self.out = nn.Linear(config.hidden, config.dim)

    def forward(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # x [N, dim], step [N] long in 1..T  ->  ε [N, dim]
        angle = (step.to(x.dtype) / self.config.num_steps)[:, None] * self.freqs.to(x.dtype)
        h = nn.functional.silu(self.inp(torch.cat([x, angle.sin(), angle.cos()], dim=1)))
        for layer in self.hidden:
            h = h + nn.functional.silu(layer(h))
        return self.out(h)


class GaussianEps(nn.Module):
    """The exact ε(x, s) = E[ε | x_s = x] for data N(mean, diag(var)): linear in x.

    x_s = √ᾱ x_0 + √(1 − ᾱ) ε with x_0 ~ N(μ, v) gives E[ε | x_s] = √(1 − ᾱ)(x_s − √ᾱ μ) / (ᾱ v + 1 − ᾱ).
    """

    def __init__(self, schedule: Schedule, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("data_mean", mean.to(torch.float64))  # [d]
        self.register_buffer("data_var", var.to(torch.float64))  # [d]

    def forward(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        bar = self.schedule.alpha_bars.to(x.device)[step, None].to(x.dtype)  # [N, 1]
        mean, var = self.data_mean.to(x.dtype), self.data_var.to(x.dtype)
        return (1 - bar).sqrt() * (x - bar.sqrt() * mean) / (bar * var + 1 - bar)


def digits_data() -> torch.Tensor:
    """sklearn's bundled 8×8 digits, 1797 images as rows [1797, 64] scaled from 0..16 to [−1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ValueError("the digits data set needs scikit-learn: pip install scikit-learn") from error
    return torch.from_numpy(load_digits().data).float() / 8 - 1


def mixture_data(num: int, seed: int = 0, modes: int = 8, radius: float = 1.5, std: float = 0.12) -> torch.Tensor:
    """A 2-D mixture of `modes` equal Gaussians (std `std`) on a circle of `radius`: rows [num, 2]."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.randint(modes, (num,), generator=g) / modes
    centers = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centers + std * torch.randn(num, 2, generator=g)


def train_eps_model(model: nn.Module, data: torch.Tensor, schedule: Schedule, *, steps: int, batch_size: int = 256,
                    lr: float = 2e-3, seed: int = 0) -> list[float]:
    """Train ε(x, s) by the DDPM loss ‖ε − ε̂(x_s, s)‖², s uniform in 1..T; Adam, cosine decay. Returns losses."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    for _ in range(steps):
        x0 = data[torch.randint(len(data), (batch_size,), generator=g)]
        step = torch.randint(1, schedule.num_steps + 1, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (model(schedule.noised(x0, step, noise), step) - noise).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
        if not math.isfinite(loss.item()):
            raise ValueError("training diverged (loss is not finite)")
        losses.append(loss.item())
    return losses


def save_model(model: EpsMLP, folder: Path, **card) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**asdict(model.config), **card}, indent=1) + "\n")


def load_model(folder: str | Path) -> EpsMLP:
    """An `EpsMLP` saved by `save_model`, or an embedded one by name (e.g. 'digits', 'digits-draft')."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        folder = EMBEDDED_DIR / str(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no diffusion model at {folder}")
    config = json.loads((folder / "config.json").read_text())
    model = EpsMLP(MLPConfig(**{k: config[k] for k in MLPConfig.__dataclass_fields__}))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval().requires_grad_(False)
