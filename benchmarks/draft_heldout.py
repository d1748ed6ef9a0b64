"""How well a drafter predicts its target on held-out prompts, per domain (benchmarks/prompts/, see
common.HELD_OUT_DOMAINS): everyday chat in English and in other languages, math word problems, Python
library code, code in other languages, science / history prose. None of it was a distillation source.

For each domain at each temperature (default 0 and 1), with γ fixed (a K = 1 chain unless
--candidates):
    alpha     accepted ÷ tested draft tokens (GenerationStats.alpha: tokens after a step's first
              rejection are never tested); acc/drafted: accepted ÷ all drafted tokens
    tau       new tokens per target call
    a_k       acceptance at draft position k GIVEN positions 1..k-1 were accepted (conditional): of
              the steps that drafted position k after accepting k-1 tokens, the share that kept it
    P(>=k)    the share of steps drafting position k that kept positions 1..k (cumulative,
              GenerationStats.acceptance_by_position)
The per-position counts are read per step from Speculant.steps (what generate runs), so a_k counts
only steps that reached position k, also for drafters that propose fewer than γ tokens (ngram) and
at a request's end. α and τ do not depend on timing: the machine may be loaded.

    python benchmarks/draft_heldout.py --prompts 4 --max-new-tokens 48 --threads 1   # 1 thread on a loaded CPU
    python benchmarks/draft_heldout.py --draft ngram --domains code,code_languages
    python benchmarks/draft_heldout.py --draft layers:8 --gamma 3 --candidates 2
    python benchmarks/draft_heldout.py --device cuda --dtype bfloat16 --prompts 16 --max-new-tokens 128
    python benchmarks/draft_heldout.py --device cuda --dtype bfloat16 --target /root/w/qwen-1.5b.gguf \
        --draft speculant/embedded/qwen2.5-coder-1.5b-draft --compile layers     # the Qwen 1.5B's feature draft
"""

from __future__ import annotations

import json
import platform
import sys
import time

import common
import torch

import speculant


def main() -> None:
    ap = common.arguments(__doc__, out_default="bench-out/draft-heldout")
    ap.add_argument("--target", default="smollm2-135m", help="embedded name, HF folder or GGUF file")
    ap.add_argument("--draft", action="append", default=None,
                    help="a draft spec speculant.load accepts (default: the embedded draft); repeat for a hierarchy")
    ap.add_argument("--gamma", type=int, default=4, help="draft tokens per step, fixed (default %(default)s)")
    ap.add_argument("--candidates", type=int, default=1, help="candidates per draft position (1: a chain)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per domain (default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--domains", default=",".join(common.HELD_OUT_DOMAINS),
                    help="comma-separated, from: %(default)s")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--compile", choices=["whole", "layers", "off"], default=None,
                    help="how the fused step's forwards compile on a GPU (speculant.load's compile; default its own)")
    args = ap.parse_args()
    dtype = common.setup(args)
    domains = [d for d in args.domains.split(",") if d]
    unknown = [d for d in domains if d not in common.HELD_OUT_DOMAINS]
    if unknown or not domains:
        raise SystemExit(f"error: --domains: unknown {unknown}; choose from {', '.join(common.HELD_OUT_DOMAINS)}")
    if args.gamma < 1 or args.candidates < 1 or args.prompts < 1 or args.max_new_tokens < 1:
        raise SystemExit("error: --gamma, --candidates, --prompts and --max-new-tokens must be >= 1")
    temperatures = [float(t) for t in args.temperatures.split(",")]
    drafts = args.draft or ["default"]

    start = time.perf_counter()
    spec = speculant.load(args.target, drafts, gamma=args.gamma, candidates=args.candidates,
                          device=args.device, dtype=dtype,
                          compile={None: None, "off": False, "whole": True, "layers": "layers"}[args.compile])
    rows = []
    for domain in domains:
        texts = common.heldout_texts(domain, args.prompts)
        chat = common.HELD_OUT_DOMAINS[domain][1]
        prompts = [spec.encode(text, chat=chat) for text in texts]
        for temperature in temperatures:
            row = measure(spec, prompts, args.gamma, temperature, args.max_new_tokens)
            rows.append({"domain": domain, "temperature": temperature, "prompts": len(prompts), **row})
            print(json.dumps({k: rows[-1][k] for k in ("domain", "temperature", "alpha", "tau",
                                                        "acceptance_conditional")}), flush=True)
    wall = time.perf_counter() - start

    tables = []
    for temperature in temperatures:
        header = ("domain", "alpha", "acc/drafted", "tau", *(f"a_{k}" for k in range(1, args.gamma + 1)),
                  *(f"P(>={k})" for k in range(1, args.gamma + 1)))
        body = [(r["domain"], f"{r['alpha']:.3f}", f"{r['accepted_per_drafted']:.3f}", f"{r['tau']:.2f}",
                 *map(_rate, r["acceptance_conditional"]), *map(_rate, r["acceptance_cumulative"]))
                for r in rows if r["temperature"] == temperature]
        tables.append(f"T = {temperature:g}, draft {'+'.join(drafts)}, gamma {args.gamma}, "
                      f"k {args.candidates}\n" + common.table(body, header))
    summary = {"command": " ".join(sys.argv), "target": args.target, "drafts": drafts, "gamma": args.gamma,
               "candidates": args.candidates, "prompts_per_domain": args.prompts,
               "max_new_tokens": args.max_new_tokens, "device": common.device_name(args.device), "dtype": dtype,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.node(),
               "wall_s": round(wall, 1), "rows": rows}
    last = {f"{key}_t{t:g}": {r["domain"]: round(r[key], 4) for r in rows if r["temperature"] == t}
            for key in ("alpha", "tau") for t in temperatures}
    common.finish(args.out, "draft_heldout.json", summary, "\n\n".join(tables), {"drafts": drafts, **last})


def measure(spec, prompts: list[list[int]], gamma: int, temperature: float, max_new_tokens: int) -> dict:
    """Run every prompt (seed = its index) and count, per draft position k = 1..γ: the steps that
    drafted k tokens or more (drafted), of those the ones that had accepted k−1 (reached), and the
    ones that accepted k or more (accepted)."""
    drafted, reached, accepted = [0] * gamma, [0] * gamma, [0] * gamma
    totals = {"accepted": 0, "tested": 0, "drafted": 0, "new_tokens": 0, "target_calls": 0}
    for seed, prompt in enumerate(prompts):
        _, steps = spec.steps(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        stats = None
        for step in steps:
            stats = step.stats  # the running GenerationStats (the same object every step)
            for k in range(min(step.num_drafted, gamma)):  # position k + 1
                drafted[k] += 1
                reached[k] += int(step.num_accepted >= k)
                accepted[k] += int(step.num_accepted > k)
        if stats is None:
            continue
        totals["accepted"] += stats.accepted
        totals["tested"] += stats.accepted + stats.rejections
        totals["drafted"] += stats.drafted
        totals["new_tokens"] += stats.new_tokens
        totals["target_calls"] += stats.target_calls
    return {
        "alpha": totals["accepted"] / totals["tested"] if totals["tested"] else 0.0,
        "accepted_per_drafted": totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0,
        "tau": totals["new_tokens"] / totals["target_calls"] if totals["target_calls"] else 0.0,
        "acceptance_conditional": [a / r if r else None for a, r in zip(accepted, reached)],
        "acceptance_cumulative": [a / d if d else None for a, d in zip(accepted, drafted)],
        "drafted_by_position": drafted, "reached_by_position": reached, "accepted_by_position": accepted,
        **totals,
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
