"""CPU speed of the default draft with 1 and 4 candidates per position against plain decoding:
4 HumanEval prompts at T = 0 and 4 chat prompts at T = 1, 64 new tokens, 1 torch thread, two
interleaved repeats; prints one JSON row per task and method.

    taskset -c 1 python benchmarks/cpu_candidates_speed.py
"""
import time, json, torch
import speculant
from speculant.bench.tasks import code_prompts, chat_prompts
torch.set_num_threads(1)
specs = {k: speculant.load("smollm2-135m", "default", gamma=4, candidates=k) for k in (1, 4)}
plain = specs[1]
enc = lambda t, c: plain.encode(t, c)
rows = []
for task, prompts, temp in (("code", code_prompts(4, enc), 0.0), ("chat", chat_prompts(4, enc), 1.0)):
    tot = {}
    for rep in range(2):
        for name in ("plain", 1, 4):
            spec = plain if name == "plain" else specs[name]
            toks = secs = 0
            for i, p in enumerate(prompts):
                out = spec.generate(list(p.token_ids), max_new_tokens=64, temperature=temp, seed=i, plain=(name == "plain"))
                toks += out.stats["new_tokens"]; secs += out.stats["prefill_time"] + out.stats["decode_time"]
            t = tot.setdefault(name, [0, 0]); t[0] += toks; t[1] += secs
    for name, (toks, secs) in tot.items():
        rows.append({"task": task, "method": str(name), "tok_s": toks / secs, "vs_plain": (toks / secs) / (tot["plain"][0] / tot["plain"][1])})
        print(json.dumps(rows[-1]), flush=True)
