"""Engine α of the default (embedded) draft on more prompts than the GPU run: HumanEval at T = 0 and
chat at T = 1, float32 on the CPU, per γ and per number of candidates per position (k). α =
accepted ÷ tested draft tokens over all steps (with k > 1, a depth counts as accepted when any of
its candidates is kept), and with a prompt-lookup branch of G tokens beside the draft (--lookup;
a depth then counts as accepted when either branch keeps a token there).

    python benchmarks/engine_alpha_cpu.py --prompts 16 --max-new-tokens 64 --gammas 3,4 --candidates 1,2,4 --out bench-out/alpha
    python benchmarks/engine_alpha_cpu.py --gammas 3 --candidates 4 --lookup 0,8 --tasks code
"""

import json
import sys

import common

import speculant
from speculant.bench.tasks import chat_prompts, code_prompts


def main():
    ap = common.arguments(__doc__, out_default="bench-out/alpha")
    ap.set_defaults(threads=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gammas", default="3,4")
    ap.add_argument("--candidates", default="1")
    ap.add_argument("--lookup", default="0", help="lookup branch sizes G (0: none)")
    ap.add_argument("--tasks", default="code,chat")
    ap.add_argument("--draft", default="default", help="the draft: default (embedded) or a draft folder")
    args = ap.parse_args()
    dtype = common.setup(args)
    rows = []
    grid = [(g, k, lookup) for g in map(int, args.gammas.split(",")) for k in map(int, args.candidates.split(","))
            for lookup in map(int, args.lookup.split(","))]
    for gamma, k, lookup in grid:
        spec = speculant.load("smollm2-135m", args.draft, gamma=gamma, candidates=k, lookup=lookup,
                              device=args.device, dtype=dtype)
        encode = spec.encode  # (text, chat) -> token ids

        for task, prompts, temperature in (("code", code_prompts(args.prompts, encode), 0.0),
                                           ("chat", chat_prompts(args.prompts, encode), 1.0)):
            if task not in args.tasks.split(","):
                continue
            accepted = tested = tokens = calls = from_lookup = 0
            by_position = []
            for i, prompt in enumerate(prompts):
                out = spec.generate(list(prompt.token_ids), max_new_tokens=args.max_new_tokens,
                                    temperature=temperature, seed=i)
                s = out.stats
                accepted += s["accepted"]
                tested += s["accepted"] + s["rejections"]
                tokens += s["new_tokens"]
                calls += s["target_calls"]
                from_lookup += s["lookup_tokens"]
                for i, (a, d) in enumerate(zip(s["accepted_by_position"], s["drafted_by_position"])):
                    if i == len(by_position):
                        by_position.append((0, 0))
                    by_position[i] = (by_position[i][0] + a, by_position[i][1] + d)
            row = {"task": task, "temperature": temperature, "gamma": gamma, "candidates": k, "lookup": lookup,
                   "prompts": len(prompts), "alpha": accepted / tested, "tested": tested, "tau": tokens / calls,
                   "tokens_from_lookup": from_lookup, "new_tokens": tokens,
                   "acceptance_by_position": [round(a / d, 3) if d else None for a, d in by_position]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ("task", "T", "gamma", "k", "G", "alpha", "tau", "from lookup", "by position")
    table = common.table([(r["task"], r["temperature"], r["gamma"], r["candidates"], r["lookup"], f"{r['alpha']:.3f}",
                           f"{r['tau']:.2f}", r["tokens_from_lookup"], r["acceptance_by_position"]) for r in rows], header)
    common.finish(args.out, "engine_alpha_cpu.json", {"command": " ".join(sys.argv), "device": args.device,
                                                      "dtype": dtype, "rows": rows}, table, {"rows": len(rows)})

if __name__ == "__main__":
    main()
