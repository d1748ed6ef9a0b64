"""`speculant diffusion`: sample an embedded diffusion model with and without speculation.

    speculant diffusion --model digits --draft frozen --gamma 8 --samples 64 --out diffusion-out

Prints the statistics of both samplers (sequential target calls, evaluations, α, steps per call,
wall time), writes samples.png (plain and speculative side by side) and nfe_vs_gamma.png (target
calls of the speculative sampler at several γ) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from speculant.adaptive import parse_gamma


def _gamma(value: str) -> int | str:
    try:
        return parse_gamma(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _gamma_list(value: str) -> list[int]:
    gammas = [_gamma(v) for v in value.split(",") if v]
    if not gammas or "auto" in gammas:
        raise argparse.ArgumentTypeError(f"--nfe-gammas must be integers >= 1 separated by commas, got {value!r}")
    return gammas


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("diffusion", help="speculative sampling of a small diffusion model, vs plain")
    parser.add_argument("--model", default="digits", help="embedded model: digits | mixture, or a model folder")
    parser.add_argument("--draft", default="frozen",
                        help="frozen (the target's x̂0 frozen at the last verified state) | frozen-eps | "
                             "an embedded draft network (digits-draft, mixture-draft) or folder (default frozen)")
    parser.add_argument("--gamma", type=_gamma, default=8, help="draft length, or 'auto' (default 8)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("diffusion-out"), help="folder for the PNG files")
    parser.add_argument("--nfe-gammas", type=_gamma_list, default=[1, 2, 4, 8, 16], metavar="G,G,...",
                        help="γ values for the NFE plot (default 1,2,4,8,16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def run(args: argparse.Namespace) -> int:
    from speculant.diffusion import AdaptiveGamma, Schedule, load_model, make_drafter, sample_plain, sample_speculative
    from speculant.diffusion.plots import save_nfe_plot, save_samples_png

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    target = load_model(args.model).to(args.device)
    schedule = Schedule.linear(target.config.num_steps)
    drafter = make_drafter(args.draft, schedule, args.device)
    if getattr(drafter, "eps_model", None) is not None and getattr(drafter.eps_model, "config", None) is not None \
            and drafter.eps_model.config.dim != target.config.dim:
        raise ValueError(f"draft {args.draft!r} is for {drafter.eps_model.config.dim} dimensions, "
                         f"the target has {target.config.dim}")

    def speculative(gamma, seed):
        g = torch.Generator(device=args.device).manual_seed(seed)
        x_T = torch.randn(args.samples, target.config.dim, generator=g, device=args.device)
        return sample_speculative(target, schedule, x_T, drafter, gamma=AdaptiveGamma() if gamma == "auto" else gamma,
                                  generator=g)

    g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    plain_x, plain = sample_plain(target, schedule, torch.randn(args.samples, target.config.dim, generator=g,
                                                                device=args.device), generator=g)
    spec_x, spec = speculative(args.gamma, args.seed)
    curve = [speculative(gamma, args.seed)[1].target_calls for gamma in args.nfe_gammas]

    args.out.mkdir(parents=True, exist_ok=True)
    save_samples_png(args.out / "samples.png", {f"plain ({plain.target_calls} target calls)": plain_x,
                                               f"speculative γ={args.gamma} ({spec.target_calls} calls)": spec_x})
    save_nfe_plot(args.out / "nfe_vs_gamma.png", {f"{args.model}, draft {args.draft}": (args.nfe_gammas, curve)},
                  plain.target_calls)
    if args.json:
        print(json.dumps({"plain": plain.as_dict(), "speculative": spec.as_dict(),
                          "nfe_vs_gamma": dict(zip(args.nfe_gammas, curve)), "out": str(args.out)}))
        return 0
    print(f"{args.model}: {args.samples} samples, T = {schedule.num_steps} steps, draft {args.draft}, "
          f"γ = {args.gamma}, device {args.device}")
    print(f"{'sampler':12} {'target calls':>12} {'evals/sample':>12} {'α':>6} {'steps/call':>10} {'wall s':>8}")
    for label, s in [("plain", plain), ("speculative", spec)]:
        alpha = "" if s.judged == 0 else f"{s.alpha:.3f}"
        print(f"{label:12} {s.target_calls:12d} {s.target_rows / s.num_samples:12.1f} {alpha:>6} "
              f"{s.steps_per_call:10.2f} {s.wall_time:8.3f}")
    print(f"{plain.target_calls / spec.target_calls:.2f}x fewer sequential target calls; "
          f"NFE vs γ {dict(zip(args.nfe_gammas, curve))}")
    print(f"wrote {args.out / 'samples.png'} and {args.out / 'nfe_vs_gamma.png'}")
    return 0
