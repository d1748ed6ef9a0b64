"""PNG figures for the diffusion sampler: samples side by side, and target calls (NFE) against γ."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError("plots need matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def digit_grid(samples: torch.Tensor, side: int = 8) -> torch.Tensor:
    """The first side² samples [N, 64] as one image [10·side, 10·side] (each 8×8 digit framed by a
    blank pixel), values clipped to [−1, 1]."""
    count = side * side
    samples = samples[:count].float().cpu().clamp(-1, 1)
    if len(samples) < count:
        samples = torch.cat([samples, torch.full((count - len(samples), 64), -1.0)])
    tiles = torch.nn.functional.pad(samples.reshape(side, side, 8, 8), (1, 1, 1, 1), value=-1.0)
    return tiles.permute(0, 2, 1, 3).reshape(10 * side, 10 * side)


def save_samples_png(path: Path, samples: dict[str, torch.Tensor]) -> None:
    """One panel per sampler: an 8×8 grid of digits (64 dimensions) or a scatter of 2-D points."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4.2), squeeze=False)
    for ax, (label, x) in zip(axes[0], samples.items()):
        if x.shape[1] == 64:
            ax.imshow(digit_grid(x).numpy(), cmap="gray_r")
            ax.axis("off")
        else:
            points = x.float().cpu().numpy()
            ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
            ax.set_aspect("equal")
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_nfe_plot(path: Path, curves: dict[str, tuple[list[int], list[int]]], plain_calls: int) -> None:
    """Sequential target calls against γ, one line per curve, plain sampling dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (gammas, calls) in curves.items():
        ax.plot(gammas, calls, marker="o", label=label)
    ax.axhline(plain_calls, ls="--", color="gray", label="plain")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("γ (draft length)")
    ax.set_ylabel("sequential target calls (NFE)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
