"""What `speculant bench` prints and records: the table, the speed-up pivot, the environment, and the
summary JSON line (the last line of stdout)."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from speculant.bench.plan import method_label
from speculant.bench.tasks import TASKS


def _fmt(value, spec: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def format_table(cells: Sequence[dict]) -> str:
    header = (f"{'task':<12}{'T':>4}  {'method':<26}{'γ':>5}{'tok/s':>9}{'×plain':>8}{'×hf':>7}{'α':>7}"
              f"{'τ':>6}{'c':>7}{'pred':>7}{'mism':>6}{'mem MB':>8}")
    lines = [header, "-" * len(header)]
    previous = None
    for cell in sorted(cells, key=_cell_order):
        key = (cell["temperature"], cell["task"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        gamma = cell["gamma"] if cell["gamma"] not in (None, 0) else "-"
        if cell["gamma"] == "auto" and cell.get("mean_gamma") is not None:
            gamma = f"a{cell['mean_gamma']:.1f}"
        mem = cell["memory"].get("total_bytes", cell["memory"].get("param_bytes"))
        lines.append(
            f"{cell['task']:<12}{cell['temperature']:>4g}  {cell['method']:<26}{gamma!s:>5}"
            f"{_fmt(cell['tokens_per_s'], '.1f', 9)}{_fmt(cell.get('speedup_vs_plain'), '.2f', 8)}"
            f"{_fmt(cell.get('speedup_vs_hf_eager'), '.2f', 7)}{_fmt(cell.get('alpha'), '.3f', 7)}"
            f"{_fmt(cell.get('tau'), '.2f', 6)}{_fmt(cell.get('cost_ratio'), '.3f', 7)}"
            f"{_fmt(cell.get('predicted_speedup'), '.2f', 7)}{_fmt(cell.get('greedy_mismatches'), 'd', 6)}"
            f"{_fmt(mem / 2**20 if mem else None, '.0f', 8)}"
        )
    return "\n".join(lines)


def _cell_order(cell: dict):
    """Temperature, task, then the order the methods were planned in (plain first, peers last), γ."""
    tasks = {t: i for i, t in enumerate(TASKS)}
    gamma = cell["gamma"]
    gamma_key = 0 if gamma in (None, 0) else (1000 if gamma == "auto" else gamma)
    return cell["temperature"], tasks.get(cell["task"], 99), cell.get("order", 0), gamma_key


def format_pivot(cells: Sequence[dict], tasks: Sequence[str]) -> str:
    """Speed-up over plain decoding: one row per method and γ, one column per task."""
    lines = []
    for temperature in sorted({c["temperature"] for c in cells}):
        rows: dict[str, dict] = {}
        for cell in sorted(cells, key=_cell_order):
            if cell["temperature"] != temperature:
                continue
            rows.setdefault(method_label(cell["method"], cell["gamma"]), {})[cell["task"]] = cell.get("speedup_vs_plain")
        header = f"speed-up over plain decoding, T={temperature:g}: " + "".join(f"{t:>12}" for t in tasks)
        lines += [header]
        width = len(header) - 12 * len(tasks)
        for label, by_task in rows.items():
            lines.append(f"{label:<{width}}" + "".join(_fmt(by_task.get(t), ".2f", 12) for t in tasks))
        lines.append("")
    return "\n".join(lines).rstrip()


def environment(args) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu_threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype}
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def summary_line(bench, results_path: Path, plots: list[str], runtime_s: float) -> dict:
    ours = [c for c in bench.cells if c["kind"] == "ours"]
    mismatches = [c["greedy_mismatches"] for c in ours if c["greedy_mismatches"] is not None]
    best = {}
    for temperature in bench.settings["temperatures"]:
        for task in bench.settings["tasks"]:
            candidates = [c for c in ours if c["task"] == task and c["temperature"] == temperature
                          and c["method"] != "plain" and c.get("speedup_vs_plain") is not None]
            if candidates:
                top = max(candidates, key=lambda c: c["speedup_vs_plain"])
                best[f"{task}@T={temperature:g}"] = {"method": top["method"], "gamma": top["gamma"],
                                                     "speedup_vs_plain": round(top["speedup_vs_plain"], 3),
                                                     "speedup_vs_hf_eager": _round(top.get("speedup_vs_hf_eager"))}
    return {"bench": "speculant", "target": bench.target.name, "device": bench.args.device,
            "dtype": bench.args.dtype, "quick": bool(bench.args.quick), "cells": len(bench.cells),
            "greedy_mismatches": sum(mismatches) if mismatches else 0, "best": best,
            "results": str(results_path), "plots": plots, "runtime_s": round(runtime_s, 1)}


def _round(value, digits: int = 3):
    return round(value, digits) if isinstance(value, float) and math.isfinite(value) else value


def json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
