"""Speculative vs plain DDPM sampling on the embedded digits and 2-D mixture models.

    .venv/bin/python benchmarks/diffusion_speed.py --device cpu          # this machine
    python3 benchmarks/diffusion_speed.py --device cuda                  # a GPU (needs only the repository)

For each model: plain ancestral sampling, and speculative sampling with the frozen-drift drafter
(x̂_0 frozen) at several γ and adaptive γ, the ε-frozen variant, and the small trained draft network.
Measured: sequential target calls (the batched forwards that bound latency), target evaluations
(states evaluated in all, per sample), acceptance α, steps per call, wall time (median of
--repeats runs after a warm-up). Law check, speculative (frozen x̂_0, γ = 8) vs plain, independent
seeds: an energy-distance permutation test on the samples (pixels / points) and a chi-square test
on the class histogram (digits: a logistic-regression classifier trained on the real digits;
mixture: the nearest of the eight modes). Prints a table, then one JSON line; writes
diffusion_speed.json, diffusion_samples.png and diffusion_nfe_vs_gamma.png to --out ($OUT, else ./out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speculant.diffusion import AdaptiveGamma, Schedule, load_model, make_drafter, sample_plain, sample_speculative
from speculant.diffusion.plots import save_nfe_plot, save_samples_png

GAMMAS = (2, 4, 8, 16)
CHECK_GAMMA = 8


def energy_permutation_test(a: torch.Tensor, b: torch.Tensor, permutations: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Energy distance between samples a [n, d] and b [m, d] and its permutation p-value.

    With s = 1_a / n − 1_b / m and D the pairwise distances, energy = −sᵀ D s; all permutations at once.
    """
    z = torch.cat([a, b]).double().cpu()
    dist = torch.cdist(z, z)
    n, total = len(a), len(z)
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.arange(total)] + [torch.randperm(total, generator=g) for _ in range(permutations)])
    signs = torch.where(orders < n, 1.0 / n, -1.0 / (total - n)).double()  # [P + 1, N]: position i of a permutation
    energies = -((signs @ dist) * signs).sum(1)
    observed = energies[0].item()
    pvalue = (1 + (energies[1:] >= observed).sum().item()) / (permutations + 1)
    return observed, pvalue


def histogram_test(labels_a: np.ndarray, labels_b: np.ndarray, num_classes: int) -> float:
    """Chi-square test of homogeneity of two label histograms (2 × K table, empty classes dropped)."""
    table = np.stack([np.bincount(labels_a, minlength=num_classes), np.bincount(labels_b, minlength=num_classes)])
    table = table[:, table.sum(0) > 0]
    return float(stats.chi2_contingency(table)[1])


def labeller(model_name: str):
    if model_name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        digits = load_digits()
        classifier = LogisticRegression(max_iter=2000).fit(digits.data / 8 - 1, digits.target)
        return lambda x: classifier.predict(x.clip(-1, 1).cpu().numpy()), 10
    angles = 2 * math.pi * torch.arange(8) / 8
    centers = 1.5 * torch.stack([angles.cos(), angles.sin()], 1)
    return lambda x: torch.cdist(x.cpu().float(), centers).argmin(1).numpy(), 8


def timed(fn, repeats: int, device: str):
    fn()  # warm-up: allocator, kernels, caches
    runs = []
    for _ in range(repeats):
        result = fn()
        runs.append(result)
    wall = statistics.median(r[1].wall_time for r in runs)
    return runs[-1][0], runs[-1][1], wall


def all_methods(name: str) -> dict:
    methods = {"plain": None}
    methods.update({f"frozen-x0 γ={g}": ("frozen-x0", g) for g in GAMMAS})
    methods["frozen-x0 γ=auto"] = ("frozen-x0", "auto")
    methods["frozen-eps γ=4"] = ("frozen-eps", 4)
    methods[f"{name}-draft γ=4"] = (f"{name}-draft", 4)
    methods[f"{name}-draft γ=8"] = (f"{name}-draft", 8)
    return methods


SMALL_BATCH_METHODS = {"plain": None, "frozen-x0 γ=4": ("frozen-x0", 4), "frozen-x0 γ=8": ("frozen-x0", 8),
                       "frozen-x0 γ=auto": ("frozen-x0", "auto")}


def bench_model(name: str, device: str, num_samples: int, repeats: int, methods: dict, label: str,
                law_check: bool = True, dtype=torch.float32) -> dict:
    target = load_model(name).to(device=device, dtype=dtype)
    schedule = Schedule.linear(target.config.num_steps)
    dim = target.config.dim
    rows, samples = [], {}
    for method, spec in methods.items():
        def run(seed=0, spec=spec):
            g = torch.Generator(device=device).manual_seed(seed)
            x_T = torch.randn(num_samples, dim, generator=g, device=device, dtype=dtype)
            if spec is None:
                return sample_plain(target, schedule, x_T, generator=g)
            drafter = make_drafter(spec[0], schedule, device)
            if isinstance(drafter.__dict__.get("eps_model"), torch.nn.Module):
                drafter.eps_model.to(dtype=dtype)
            gamma = AdaptiveGamma() if spec[1] == "auto" else spec[1]
            return sample_speculative(target, schedule, x_T, drafter, gamma=gamma, generator=g)

        x, stats_, wall = timed(run, repeats, device)
        samples[method] = x
        rows.append({"model": label, "batch": num_samples, "method": method, "target_calls": stats_.target_calls,
                     "target_evals_per_sample": stats_.target_rows / num_samples,
                     "alpha": None if math.isnan(stats_.alpha) else round(stats_.alpha, 4),
                     "steps_per_call": round(stats_.steps_per_call, 3), "wall_s": wall})
        if law_check and method == "plain":  # the law check needs independent seeds for the two samplers
            plain_law_sample = run(seed=101)[0]
        if law_check and spec == ("frozen-x0", CHECK_GAMMA):
            spec_law_sample = run(seed=202)[0]
    plain_calls, plain_wall = rows[0]["target_calls"], rows[0]["wall_s"]
    for row in rows:
        row["calls_ratio"] = round(plain_calls / row["target_calls"], 3)
        row["wall_speedup"] = round(plain_wall / row["wall_s"], 3)
    if not law_check:
        return {"rows": rows, "law": None, "samples": samples, "schedule_steps": schedule.num_steps}
    label, num_classes = labeller(name)
    energy, energy_p = energy_permutation_test(spec_law_sample, plain_law_sample)
    law = {"model": name, "compared": f"frozen-x0 γ={CHECK_GAMMA} vs plain", "samples_each": num_samples,
           "energy_distance": round(energy, 5), "energy_pvalue": round(energy_p, 4),
           "class_hist_pvalue": round(histogram_test(label(spec_law_sample), label(plain_law_sample), num_classes), 4)}
    return {"rows": rows, "law": law, "samples": samples, "schedule_steps": schedule.num_steps}


def plot(results: dict, out: Path) -> None:
    check = f"frozen-x0 γ={CHECK_GAMMA}"
    panels = {f"{name}: {method}": results[name]["samples"][method] for name in results for method in ("plain", check)}
    save_samples_png(out / "diffusion_samples.png", panels)
    curves = {}
    for name in results:
        rows = {r["method"]: r for r in results[name]["rows"]}
        curves[f"{name}: frozen x̂0"] = (list(GAMMAS), [rows[f"frozen-x0 γ={g}"]["target_calls"] for g in GAMMAS])
    save_nfe_plot(out / "diffusion_nfe_vs_gamma.png", curves, results["digits"]["schedule_steps"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--digits-samples", type=int, default=512)
    parser.add_argument("--mixture-samples", type=int, default=2000)
    parser.add_argument("--small-batch", type=int, default=16, help="batch of the latency-bound digits run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("diffusion_speed: error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: more threads only contend
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (1 thread)"
    start = time.perf_counter()
    results = {"digits": bench_model("digits", args.device, args.digits_samples, args.repeats, all_methods("digits"),
                                     "digits"),
               "mixture": bench_model("mixture", args.device, args.mixture_samples, args.repeats,
                                      all_methods("mixture"), "mixture")}
    # A small batch: the latency-bound regime, where a target call costs about the same for 1 or L + 1 rows.
    small = bench_model("digits", args.device, args.small_batch, args.repeats, SMALL_BATCH_METHODS,
                        f"digits/{args.small_batch}", law_check=False)
    header = f"{'model':10} {'batch':>5} {'method':22} {'calls':>6} {'×fewer':>7} {'evals/smp':>9} {'α':>6} {'steps/call':>10} {'wall s':>8} {'wall ×':>7}"
    print(f"device: {device_name}")
    print(header)
    for r in [row for name in results for row in results[name]["rows"]] + small["rows"]:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:.3f}"
        print(f"{r['model']:10} {r['batch']:5d} {r['method']:22} {r['target_calls']:6d} {r['calls_ratio']:7.2f} "
              f"{r['target_evals_per_sample']:9.1f} {alpha:>6} {r['steps_per_call']:10.2f} {r['wall_s']:8.3f} "
              f"{r['wall_speedup']:7.2f}")
    for name in results:
        law = results[name]["law"]
        print(f"law {name}: {law['compared']}, {law['samples_each']} each: energy {law['energy_distance']} "
              f"(permutation p = {law['energy_pvalue']}), class histogram p = {law['class_hist_pvalue']}")
    summary = {"device": device_name, "seconds": round(time.perf_counter() - start, 1),
               "rows": [r for name in results for r in results[name]["rows"]] + small["rows"],
               "law": [results[name]["law"] for name in results]}
    (args.out / "diffusion_speed.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    plot(results, args.out)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
