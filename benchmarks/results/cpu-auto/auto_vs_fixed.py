"""auto vs the best fixed γ per task and drafter, from a `speculant bench` results.json.

    .venv/bin/python benchmarks/results/cpu-auto/auto_vs_fixed.py benchmarks/results/cpu-auto/results.json
"""
import json, sys
r = json.load(open(sys.argv[1]))
cells = [c for c in r["cells"] if c["kind"] == "ours"]
tasks = ["code", "docs", "chat", "adversarial"]
by = {(c["method"], c["gamma"], c["task"]): c for c in cells}
plain = {t: by[("plain", 0, t)] if ("plain", 0, t) in by else [c for c in cells if c["method"] == "plain" and c["task"] == t][0] for t in tasks}
methods = []
for c in cells:
    k = (c["method"], c["gamma"])
    if k not in methods: methods.append(k)
print("| method | " + " | ".join(tasks) + " |")
print("|---|" + "---|" * len(tasks))
for m, g in methods:
    row = []
    for t in tasks:
        c = by.get((m, g, t))
        if c is None: row.append("-"); continue
        sp = c["tokens_per_s"] / plain[t]["tokens_per_s"]
        row.append(f"{sp:.2f}" + (f" ({c['tokens_per_s']:.1f} tok/s)" if m == "plain" else f" α {c['alpha']:.2f} γ̄ {c['mean_gamma']:.1f}" if c.get("alpha") is not None else ""))
    print(f"| {m}{'' if m == 'plain' else '@' + str(g)} | " + " | ".join(row) + " |")
print()
print("| drafter | task | best fixed γ (speed-up) | auto speed-up | auto ÷ best fixed | auto ÷ max(best fixed, plain) |")
print("|---|---|---|---|---|---|")
for d in ("ngram", "distilled"):
    for t in tasks:
        fixed = [(g, by[(d, g, t)]["tokens_per_s"] / plain[t]["tokens_per_s"]) for (m, g) in methods if m == d and g != "auto" and (d, g, t) in by]
        if not fixed or (d, "auto", t) not in by: continue
        bg, bs = max(fixed, key=lambda x: x[1])
        a = by[(d, "auto", t)]["tokens_per_s"] / plain[t]["tokens_per_s"]
        print(f"| {d} | {t} | γ={bg} ({bs:.2f}) | {a:.2f} | {a / bs:.3f} | {a / max(bs, 1.0):.3f} |")
mism = sum(c.get("greedy_mismatches") or 0 for c in cells)
print("\ngreedy mismatches (ours):", mism)
