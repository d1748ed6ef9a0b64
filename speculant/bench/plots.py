"""PNG plots of a benchmark's cells (matplotlib, Agg backend; skipped with a note if it is missing).

    speedup_by_task.png        speed-up over plain decoding, grouped bars: tasks x methods (best γ
                               of each method per task), one panel per temperature; with repeats,
                               error bars span the lowest to highest speed-up of one repeat against
                               plain decoding's same repeat; a cell that ran under another load than
                               plain decoding (`load_differs`) is hatched and grey, not a result
    acceptance_by_position.png acceptance rate of the i-th draft token (greedy if run, else the
                               lowest temperature), one panel per task, one line per method at its
                               largest fixed γ
    predicted_vs_measured.png  the paper's predicted speed-up (from measured α and c) against the
                               measured one, with the y = x line
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DPI = 90


def write_plots(cells: Sequence[dict], out_dir: Path, tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(paths written, notes). Never raises: a plot that fails becomes a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:  # noqa: BLE001 -- ImportError, or a broken backend
        return [], [f"plots skipped: matplotlib unavailable ({type(error).__name__}: {error})"]
    out_dir = Path(out_dir)
    tasks = [t for t in tasks if any(c["task"] == t for c in cells)]
    written, notes = [], []
    for name, draw in (("speedup_by_task.png", _speedup_bars), ("acceptance_by_position.png", _acceptance),
                       ("predicted_vs_measured.png", _predicted_vs_measured)):
        try:
            fig = draw(plt, cells, tasks)
            if fig is None:
                continue
            path = out_dir / name
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
            plt.close(fig)
            written.append(str(path))
        except Exception as error:  # noqa: BLE001 -- a plot that fails must not sink the run
            notes.append(f"plot {name} failed: {type(error).__name__}: {error}")
            plt.close("all")
    return written, notes


def _method_order(cells: Sequence[dict]) -> list[str]:
    ours = [c["method"] for c in cells if c["kind"] == "ours"]
    peers = [c["method"] for c in cells if c["kind"] != "ours"]
    return list(dict.fromkeys(ours + peers))


def _speedup_bars(plt, cells, tasks):
    temperatures = sorted({c["temperature"] for c in cells})
    methods = [m for m in _method_order(cells) if m != "plain"]  # plain is the line at 1
    width_in = max(7.0, 0.5 * len(tasks) * max(1, len(methods)))
    fig, axes = plt.subplots(len(temperatures), 1, figsize=(width_in, 3.2 * len(temperatures) + 0.6), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    width = 0.8 / max(1, len(methods))
    for ax, temperature in zip(axes[:, 0], temperatures):
        for m, method in enumerate(methods):
            heights, labels, low, high, flagged = [], [], [], [], []
            for task in tasks:
                candidates = [c for c in cells if c["task"] == task and c["method"] == method
                              and c["temperature"] == temperature and c.get("speedup_vs_plain") is not None]
                best = max(candidates, key=lambda c: c["speedup_vs_plain"], default=None)
                height = best["speedup_vs_plain"] if best else 0.0
                heights.append(height)
                labels.append(best["gamma"] if best and best["gamma"] not in (None, 0) else "")
                spread = (best or {}).get("speedup_vs_plain_repeats") or [height]
                low.append(max(0.0, height - min(spread)))
                high.append(max(0.0, max(spread) - height))
                flagged.append(bool(best and best.get("load_differs")))
            xs = [t + (m - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
            bars = ax.bar(xs, heights, width, label=method, color=colors[m % len(colors)],
                          yerr=[low, high], capsize=2, error_kw={"elinewidth": 0.8})
            for bar, other_load in zip(bars, flagged):
                if other_load:  # not a result: the machine was busier or idler than for plain decoding
                    bar.set_hatch("///")
                    bar.set_facecolor("lightgrey")
            for bar, label in zip(bars, labels):
                if label != "":
                    ax.annotate(f"{label}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8, label="_plain")
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks)
        ax.set_ylabel("speed-up over plain")
        ax.set_title(f"T={temperature:g}: speed-up over plain decoding (line at 1); best γ of each method "
                     "above its bar; bars: fastest repeat, whiskers: range over repeats; hatched: ran under "
                     "another load", fontsize=8)
    fig.tight_layout()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=min(6, max(1, len(labels))), loc="upper center",
               bbox_to_anchor=(0.5, 0.0))
    return fig


def _acceptance(plt, cells, tasks):
    drafted = [c for c in cells if c.get("acceptance_by_position")]
    if not drafted:
        return None
    temperature = min(c["temperature"] for c in drafted)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        chosen: dict[str, dict] = {}
        for cell in drafted:
            if cell["task"] != task or cell["temperature"] != temperature or not isinstance(cell["gamma"], int):
                continue
            if cell["method"] not in chosen or cell["gamma"] > chosen[cell["method"]]["gamma"]:
                chosen[cell["method"]] = cell
        for method, cell in chosen.items():
            rates = cell["acceptance_by_position"]
            ax.plot(range(1, len(rates) + 1), rates, marker="o", markersize=3, label=f"{method} γ={cell['gamma']}")
        ax.set_title(f"{task} (T={temperature:g})", fontsize=9)
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("accepted / drafted")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        more_handles, more_labels = ax.get_legend_handles_labels()
        for handle, label in zip(more_handles, more_labels):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(5, max(1, len(labels))),
               bbox_to_anchor=(0.5, -0.08 - 0.04 * (len(labels) // 5)))
    fig.tight_layout()
    return fig


def _predicted_vs_measured(plt, cells, tasks):
    points = [c for c in cells if c["kind"] == "ours" and c["method"] != "plain"
              and c.get("predicted_speedup") is not None and c.get("speedup_vs_plain") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    methods = list(dict.fromkeys(c["method"] for c in points))
    markers = dict(zip(tasks, "osD^v<>p"))
    colors = plt.get_cmap("tab10").colors
    for m, method in enumerate(methods):
        for task in tasks:
            mine = [c for c in points if c["method"] == method and c["task"] == task]
            if mine:
                ax.scatter([c["predicted_speedup"] for c in mine], [c["speedup_vs_plain"] for c in mine],
                           color=colors[m % len(colors)], marker=markers.get(task, "o"), s=22,
                           label=method if task == next(t for t in tasks if any(
                               c["method"] == method and c["task"] == t for c in points)) else None)
    values = [c["predicted_speedup"] for c in points] + [c["speedup_vs_plain"] for c in points]
    top = max(values + [1.0]) * 1.08
    ax.plot([0, top], [0, top], color="gray", linewidth=0.8, linestyle="--", label="y = x")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted speed-up (Thm 3.8, measured α and c)")
    ax.set_ylabel("measured speed-up over plain")
    task_note = ", ".join(f"{t}={markers.get(t, 'o')}" for t in tasks)
    ax.set_title(f"markers: {task_note}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
