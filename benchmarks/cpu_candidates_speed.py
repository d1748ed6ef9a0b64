"""CPU speed of the default draft in several configurations against plain decoding: 4 HumanEval
prompts at T = 0 and 4 chat prompts at T = 1, 64 new tokens, 1 torch thread, two interleaved
repeats; prints one JSON row per task and method. A configuration is γ:K:G (draft length,
candidates per position, lookup branch size).

    taskset -c 1 python benchmarks/cpu_candidates_speed.py                      # 4:1:0 and 4:4:0
    taskset -c 1 python benchmarks/cpu_candidates_speed.py --configs 4:1:0,3:1:8,3:4:8 --tasks code
"""
import argparse
import json

import torch

import speculant
from speculant.bench.tasks import chat_prompts, code_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--configs", default="4:1:0,4:4:0")
ap.add_argument("--tasks", default="code,chat")
args = ap.parse_args()
torch.set_num_threads(1)
configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
specs = {c: speculant.load("smollm2-135m", "default", gamma=c[0], candidates=c[1], lookup=c[2]) for c in configs}
plain = specs[configs[0]]
enc = lambda t, c: plain.encode(t, c)
rows = []
for task, prompts, temp in (("code", code_prompts(4, enc), 0.0), ("chat", chat_prompts(4, enc), 1.0)):
    if task not in args.tasks.split(","):
        continue
    tot = {}
    for rep in range(2):
        for name in ["plain", *configs]:
            spec = plain if name == "plain" else specs[name]
            toks = secs = 0
            for i, p in enumerate(prompts):
                out = spec.generate(list(p.token_ids), max_new_tokens=64, temperature=temp, seed=i, plain=(name == "plain"))
                toks += out.stats["new_tokens"]
                secs += out.stats["prefill_time"] + out.stats["decode_time"]
            t = tot.setdefault(name, [0, 0])
            t[0] += toks
            t[1] += secs
    for name, (toks, secs) in tot.items():
        label = name if name == "plain" else "gamma {}, K {}, lookup {}".format(*name)
        rows.append({"task": task, "method": label, "tok_s": toks / secs,
                     "vs_plain": (toks / secs) / (tot["plain"][0] / tot["plain"][1])})
        print(json.dumps(rows[-1]), flush=True)
