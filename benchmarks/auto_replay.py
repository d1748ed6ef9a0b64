"""`--gamma auto` replayed on recorded greedy steps: why it fell short of fixed γ with a lookup branch (issue 23).

At T 0 a step's outcome is a function of where it starts: from position p of the greedy output, a step asking for
γ reaches depth D(p, γ) = max(min(γ, A(p)), R(p)), A(p) the draft tree's reach (its first γ depths do not depend on
deeper ones) and R(p) the lookup branch's (which does not depend on γ). So one step at the longest γ from EVERY
position p (the generic stepper following the greedy context back and forth: position-indexed caches) gives every
γ's outcome everywhere, and any γ policy can be replayed on it without the model: from p, a step of γ emits
D(p, γ) + 1 tokens and costs C[γ] (a plain step emits a chunk of CHUNK tokens, each C[0]). The policy replayed is
speculant.adaptive.AdaptiveGamma itself, fed what the engine feeds it (drafted, accepted, lookup length and
reach); C is a step-cost table: given (`--costs`, ms: C[0] per plain token, then C[1..]), or from a gpu_speed.py
JSON row that kept its table (`--costs-from FILE`: the first row with step_costs).

    python benchmarks/auto_replay.py --prompts 8 --costs 0.819,1.403,1.650,1.897,2.144,2.391,2.638

The trace (CPU, float32, SmolLM2-135M with the shipped feature draft, K 4 + lookup 8, held-out code) is kept in
--out and read back on the next run with the same settings. Replayed tok/s are the table's, not a machine's.
"""

from __future__ import annotations

import json
from pathlib import Path

import common  # benchmarks/common.py (this script runs from benchmarks/)

CHUNK = 4  # tokens a plain step decodes in one replay (the fused stepper's)


def collect(args) -> list[dict]:
    """Per prompt: the greedy output, and per position p: D (depth the longest-γ step reached), R and L (the
    lookup branch's reach and length), whether the step's tokens were the greedy output's."""
    import speculant
    from speculant.sampling import SamplingParams
    from speculant.step import GenericStepper

    spec = speculant.load(args.target, draft=args.draft, gamma=args.max_gamma, candidates=args.candidates,
                          lookup=args.lookup, device="cpu", dtype="float32", max_seq_len=1024)
    greedy = SamplingParams(temperature=0)
    traces = []
    for text in common.heldout_code_texts(args.prompts):
        prompt = spec.encode(text)
        out = spec.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=0, plain=True).token_ids
        stepper = GenericStepper(spec.target.model, spec.drafter)
        stepper.begin(prompt, greedy)
        depth, reach, length, agree = [], [], [], 0
        for p in range(len(out)):
            context = prompt + out[:p]
            stepper.follow(context, greedy)
            room = len(out) - p - 1
            step = stepper.step(context, min(args.max_gamma, room), None, room=room)
            depth.append(step.num_accepted)
            reach.append(step.lookup_reach)
            length.append(step.lookup_drafted)
            agree += step.tokens == out[p: p + len(step.tokens)]
        traces.append({"prompt_tokens": len(prompt), "output": out, "depth": depth, "reach": reach,
                       "lookup": length, "agree": agree})
        print(f"prompt {len(traces)}: {len(out)} positions, steps matching greedy {agree}/{len(out)}", flush=True)
    return traces


def replay(trace: dict, costs: list[float], choose, observe, max_gamma: int) -> tuple[int, int, float, list[int]]:
    """(tokens, steps, seconds, γ chosen per step) of one request under a policy (choose() -> γ; observe(...))."""
    n = len(trace["output"])
    p = steps = 0
    seconds = 0.0
    chosen = []
    while p < n:
        room = n - p - 1
        gamma = min(choose(), room, max_gamma)
        chosen.append(gamma)
        steps += 1
        if gamma == 0:
            emitted = min(CHUNK, n - p)
            seconds += emitted * costs[0]
            observe(0, 0, 0, 0, 0)
        else:
            d_max, r = trace["depth"][p], trace["reach"][p]
            a = d_max if d_max > r else 0  # the tree's reach where the branch did not reach as far (else any
            depth = max(min(gamma, a), r)  # a <= r gives the same depth)
            depth = min(depth, room)
            emitted = depth + 1
            seconds += costs[gamma]
            observe(gamma, depth, gamma, trace["lookup"][p], min(r, depth + 1))
        p += emitted
    return n, steps, seconds, chosen


def main() -> None:
    parser = common.arguments(__doc__, out_default="bench-out/auto_replay")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft", default="smollm2-135m-draft")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-gamma", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--lookup", type=int, default=8)
    parser.add_argument("--costs", default="", help="ms: C[0] per plain token, then C[1..max_gamma] per step")
    parser.add_argument("--costs-from", default="", help="a gpu_speed.json whose first auto row kept step_costs")
    args = parser.parse_args()
    common.setup(args)
    from speculant.adaptive import AdaptiveGamma, StepCosts

    out = Path(args.out)
    name = f"trace_{args.prompts}x{args.max_new_tokens}_g{args.max_gamma}_k{args.candidates}_l{args.lookup}.json"
    path = out / name
    if path.exists():
        traces = json.loads(path.read_text())
    else:
        traces = collect(args)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(traces))
    if args.costs_from:
        rows = json.loads(Path(args.costs_from).read_text())
        rows = rows["results"] if isinstance(rows, dict) else rows
        table = next(r["step_costs"]["greedy"] for r in rows if r.get("step_costs"))
        costs = [1000 * t for t in table][: args.max_gamma + 1]
    else:
        costs = [float(c) for c in args.costs.split(",")]
    if len(costs) < args.max_gamma + 1:
        raise SystemExit(f"error: {args.max_gamma + 1} costs needed (C[0..max_gamma]), got {len(costs)}")

    results = []

    def run(name: str, make) -> None:
        tokens = steps = 0
        seconds = 0.0
        histogram: dict[int, int] = {}
        for trace in traces:
            choose, observe = make()
            t, s, sec, chosen = replay(trace, costs, choose, observe, args.max_gamma)
            tokens, steps, seconds = tokens + t, steps + s, seconds + sec
            for g in chosen:
                histogram[g] = histogram.get(g, 0) + 1
        results.append({"policy": name, "tokens_per_ms": tokens / seconds, "tau": tokens / steps,
                        "gamma_chosen": dict(sorted(histogram.items()))})

    for gamma in range(1, args.max_gamma + 1):
        run(f"fixed γ {gamma}", lambda gamma=gamma: (lambda: gamma, lambda *a: None))

    def auto(**options):
        def make():
            policy = AdaptiveGamma(StepCosts(tuple(c / 1000 for c in costs), "given"), lookup=args.lookup,
                                   max_gamma=args.max_gamma, **options)
            return policy.choose, lambda drafted, accepted, asked, lookup, reach: policy.observe(
                drafted, accepted, asked=asked, lookup=lookup, lookup_reach=reach)
        return make

    run("auto", auto())
    best = max(r["tokens_per_ms"] for r in results if r["policy"].startswith("fixed"))
    text = common.table([(r["policy"], f"{r['tokens_per_ms']:.3f}", f"{r['tau']:.2f}",
                          f"{r['tokens_per_ms'] / best:.3f}", r["gamma_chosen"]) for r in results],
                        ("policy", "tokens a ms", "τ", "÷ best fixed", "γ chosen (steps)"))
    summary = {"costs_ms": costs, "trace": name, "agree": [t["agree"] for t in traces], "rows": results}
    common.finish(out, "auto_replay.json", summary, text, {"rows": len(results)})


if __name__ == "__main__":
    main()
