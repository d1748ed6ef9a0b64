"""The Qwen hierarchy's middle level on the CPU: the n-gram sizes and the inner γ, against the chain.

    .venv/bin/python sweep.py 4 sizes     # every config once, 4 prompts (sweep.txt, sweep.json)
    .venv/bin/python sweep.py 8 repeat    # inner γ 2-4 and the chain, 8 prompts, two repeated late (sweep8.*)
"""
import gc, json, sys, time, torch, speculant
from speculant.bench.tasks import code_prompts
torch.set_num_threads(2)
D = "qwen2.5-coder-0.5b:int8:vocab=65536"
CONFIGS = {
    "sizes": [("chain", [D], 4), ("ngram inner4", [D, "ngram"], 4), ("ngram inner2", [D, "ngram"], 2),
              ("ngram inner3", [D, "ngram"], 3), ("ngram:3:2 inner4", [D, "ngram:3:2"], 4),
              ("ngram:4:2 inner3", [D, "ngram:4:2"], 3), ("ngram:3:3 inner4", [D, "ngram:3:3"], 4)],
    "repeat": [("ngram inner3", [D, "ngram"], 3), ("chain", [D], 4), ("ngram inner2", [D, "ngram"], 2),
               ("ngram inner4", [D, "ngram"], 4), ("ngram inner3 again", [D, "ngram"], 3), ("chain again", [D], 4)],
}
count, configs = int(sys.argv[1]), CONFIGS[sys.argv[2]]
out = {}
for name, drafts, inner in configs:
    spec = speculant.load("qwen2.5-coder-1.5b", draft=drafts, gamma=8, inner_gamma=inner, dtype="bfloat16", device="cpu")
    prompts = [list(p.token_ids) for p in code_prompts(count, spec.encode, "/work/main/.gpu/HumanEval.jsonl.gz")]
    spec.generate(prompts[0][:32], max_new_tokens=8)
    t0 = time.perf_counter(); tokens = 0; levels = []
    for p in prompts:
        o = spec.generate(p, max_new_tokens=128)
        tokens += len(o.token_ids)
        levels.append(o.stats.get("levels"))
    dt = time.perf_counter() - t0
    out[name] = {"seconds": dt, "tokens": tokens, "tok_per_s": tokens / dt, "levels": levels}
    print(f"{name:20s} {tokens / dt:6.2f} tok/s  {dt:6.1f} s", flush=True)
    del spec; gc.collect()
json.dump(out, open(f"/tmp/sweep/sweep{'' if count == 4 else count}.json", "w"), indent=1)
