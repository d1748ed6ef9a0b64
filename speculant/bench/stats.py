"""From timed runs to the numbers of a cell: the pooled counters of several requests (α, τ, c, the
predicted speed-up), a hierarchy's inner levels, one cell per runner and task, and the speed-ups
over plain decoding and transformers' eager decoding."""

from __future__ import annotations

from collections.abc import Sequence

from speculant.bench.plan import method_label, short_method

# a cell whose runs saw a 1-minute load average this much above or below plain decoding's (in runnable
# processes) is flagged: its ratio to plain measures the load as much as the method
LOAD_DIFFERENCE = 1.0
STAT_SUMS = ("new_tokens", "target_calls", "drafted", "accepted", "rejections", "prefill_time", "draft_time",
             "target_time", "decode_time", "prompt_tokens")


def aggregate_stats(stats_list: Sequence[dict]) -> dict:
    """Pool the counters of several requests and recompute α, τ, c and the predicted speed-up."""
    from speculant.analysis import GenerationStats

    pooled = GenerationStats(gamma=stats_list[0].get("gamma", 0) if stats_list else 0)
    for stats in stats_list:
        for name in STAT_SUMS:
            setattr(pooled, name, getattr(pooled, name) + stats.get(name, 0))
        for name in ("drafted_by_position", "accepted_by_position"):
            mine, theirs = getattr(pooled, name), stats.get(name, [])
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, value in enumerate(theirs):
                mine[i] += value
    out = {name: getattr(pooled, name) for name in ("alpha", "tau", "cost_ratio", "predicted_speedup",
                                                     "mean_gamma", "acceptance_by_position",
                                                     "accepted_per_drafted")}
    out.update({name: getattr(pooled, name) for name in STAT_SUMS})
    out["drafted_by_position"] = pooled.drafted_by_position
    out["accepted_by_position"] = pooled.accepted_by_position
    return out


def inner_levels(stats_list: Sequence[dict]) -> list[dict]:
    """Pooled α / τ of a hierarchy's inner levels (weighted by drafted tokens / calls)."""
    levels: list[dict] = []
    for stats in stats_list:
        for i, level in enumerate(stats.get("levels", [])):
            if i >= len(levels):
                levels.append({"draft": level.get("draft"), "drafted": 0, "accepted": 0, "target_calls": 0,
                               "_alpha_w": 0.0, "_tokens": 0.0})
            pooled = levels[i]
            pooled["drafted"] += level.get("drafted", 0)
            pooled["accepted"] += level.get("accepted", 0)
            pooled["target_calls"] += level.get("target_calls", 0)
            pooled["_alpha_w"] += level.get("alpha", 0.0) * level.get("drafted", 0)
            pooled["_tokens"] += level.get("tau", 0.0) * level.get("target_calls", 0)
    for pooled in levels:
        pooled["alpha"] = pooled.pop("_alpha_w") / pooled["drafted"] if pooled["drafted"] else 0.0
        pooled["tau"] = pooled.pop("_tokens") / pooled["target_calls"] if pooled["target_calls"] else 0.0
    return levels


def task_cell(runner, task: str, runs: list, plain_outputs: dict, distilled: str | None) -> dict:
    """The cell of one runner (a speculant.bench.run.Runner) on one task: tokens/s, its repeats, α, τ,
    c, memory, and per prompt whether greedy output equals plain decoding's (`plain_outputs`,
    (prompt name, seed) -> ids, filled by the plain runner, which runs first)."""
    method, kind, temperature = runner.method, runner.kind, runner.temperature
    repeats = {id(run[0]): secs for run, secs in zip(runner.runs, runner.all_seconds)}
    new_tokens = sum(len(ids) for _, _, ids, _, _ in runs)
    seconds = sum(s for _, _, _, s, _ in runs)
    stats_list = [st for *_, st in runs if st is not None]
    per_prompt = []
    mismatches = 0 if temperature == 0 else None
    for prompt, seed, ids, secs, stats in runs:
        entry = {"prompt": prompt.name, "seed": seed, "new_tokens": len(ids), "seconds": secs,
                 "tokens_per_s": len(ids) / secs if secs else 0.0,
                 "seconds_all_repeats": repeats.get(id(prompt), [secs])}
        if stats is not None:
            entry.update(alpha=stats.get("alpha"), tau=stats.get("tau"), finish_reason=stats.get("finish_reason"))
        if temperature == 0:
            key = (prompt.name, seed)
            if method == "plain" and kind == "ours":
                plain_outputs[key] = ids
                entry["identical_to_plain"] = True
            elif key in plain_outputs:
                plain_ids = plain_outputs[key]
                same = plain_ids == ids
                entry["identical_to_plain"] = same
                if not same:
                    mismatches += 1
                    entry["first_difference"] = next(
                        (i for i, (a, b) in enumerate(zip(plain_ids, ids)) if a != b),
                        min(len(plain_ids), len(ids)))
            else:
                mismatches = None
        entry["token_ids"] = ids
        per_prompt.append(entry)
    # tokens/s of each repeat over the task's prompts (repeat r of every prompt; same tokens each time)
    seconds_by_repeat = [repeats.get(id(prompt), [secs]) for prompt, _, _, secs, _ in runs]
    num_repeats = min(len(r) for r in seconds_by_repeat)
    tokens_per_s_repeats = [new_tokens / sum(r[i] for r in seconds_by_repeat) for i in range(num_repeats)]
    cell = {
        "task": task, "method": method, "kind": kind, "order": runner.order,
        "tokens_per_s_repeats": tokens_per_s_repeats,
        "load_mean": sum(runner.loads) / len(runner.loads) if runner.loads else None,
        "drafts": [short_method([d], distilled) for d in runner.drafts],
        "gamma": runner.gamma, "temperature": temperature, "prompts": len(runs), "new_tokens": new_tokens,
        "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds else 0.0,
        "greedy_mismatches": mismatches, "warmup_s": runner.warmup_s, "build_s": runner.build_s,
        "fused": runner.fused, "memory": dict(runner.memory), "per_prompt": per_prompt,
    }
    if stats_list:
        pooled = aggregate_stats(stats_list)
        drafted = pooled["drafted"] > 0  # α and c mean nothing where nothing was drafted (plain)
        timed = drafted and runner.draft_timed
        cell.update(alpha=pooled["alpha"] if drafted else None, tau=pooled["tau"],
                    cost_ratio=pooled["cost_ratio"] if timed else None,
                    predicted_speedup=pooled["predicted_speedup"] if timed or not drafted else None,
                    mean_gamma=pooled["mean_gamma"],
                    acceptance_by_position=pooled["acceptance_by_position"], counters=pooled)
        if drafted and not runner.draft_timed:
            cell["cost_ratio_note"] = "fused step: draft and verify run in one CUDA graph, c is not measured"
        levels = inner_levels(stats_list)
        if levels:
            cell["inner_levels"] = levels
    else:
        cell.update(alpha=None, tau=None, cost_ratio=None, predicted_speedup=None, mean_gamma=None,
                    acceptance_by_position=None)
    return cell


def add_speedups(cells: list[dict], notes: list[str]) -> None:
    """Each cell's speed-ups over plain decoding and transformers' eager decoding on the same task and
    temperature (also repeat by repeat), c as the step times imply it, and a note for a cell run
    under another machine load than plain decoding."""
    def reference(method: str, kind: str) -> dict:
        return {(c["task"], c["temperature"]): c["tokens_per_s"] for c in cells
                if c["method"] == method and c["kind"] == kind}

    plain, hf = reference("plain", "ours"), reference("hf-eager", "peer")
    plain_step = {}  # seconds per decoding step of plain decoding, per (task, temperature)
    for cell in cells:
        counters = cell.get("counters")
        if cell["method"] == "plain" and cell["kind"] == "ours" and counters and counters["target_calls"]:
            plain_step[(cell["task"], cell["temperature"])] = counters["decode_time"] / counters["target_calls"]
    plain_cells = {(c["task"], c["temperature"]): c for c in cells
                   if c["method"] == "plain" and c["kind"] == "ours"}
    for cell in cells:
        key = (cell["task"], cell["temperature"])
        cell["speedup_vs_plain"] = cell["tokens_per_s"] / plain[key] if plain.get(key) else None
        base = plain_cells.get(key)
        if base is not None:
            # repeat r of this method against repeat r of plain: interleaved, they ran back to back
            cell["speedup_vs_plain_repeats"] = [a / b for a, b in zip(cell["tokens_per_s_repeats"],
                                                                      base["tokens_per_s_repeats"]) if b]
            if cell["load_mean"] is not None and base["load_mean"] is not None and cell is not base:
                cell["load_differs"] = abs(cell["load_mean"] - base["load_mean"]) > LOAD_DIFFERENCE
                if cell["load_differs"]:
                    notes.append(
                        f"{method_label(cell['method'], cell['gamma'])} on {cell['task']} at T={cell['temperature']:g} "
                        f"ran under a load of {cell['load_mean']:.1f} against {base['load_mean']:.1f} for plain "
                        "decoding: its ratio to plain is not a fair comparison (flagged, hatched in the plot); "
                        "rerun with --interleave on an idle machine")
        cell["speedup_vs_hf_eager"] = cell["tokens_per_s"] / hf[key] if hf.get(key) else None
        # c as the step times imply it: step = (γ c + 1) x plain step (the paper's cost model)
        counters = cell.get("counters")
        if counters and counters["drafted"] and counters["target_calls"] and plain_step.get(key):
            step = counters["decode_time"] / counters["target_calls"]
            cell["cost_ratio_from_step_times"] = (step / plain_step[key] - 1.0) / counters["mean_gamma"]
