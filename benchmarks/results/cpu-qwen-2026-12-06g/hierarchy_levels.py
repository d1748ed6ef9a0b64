import json, time, torch, speculant
from speculant.bench.tasks import code_prompts
torch.set_num_threads(2)
D = "qwen2.5-coder-0.5b:int8:vocab=65536"
rows = {}
for name, drafts in [("chain", [D]), ("hierarchy", [D, "ngram"])]:
    spec = speculant.load("qwen2.5-coder-1.5b", draft=drafts, gamma=8, dtype="bfloat16", device="cpu")
    prompts = [list(p.token_ids) for p in code_prompts(4, spec.encode, ".gpu/HumanEval.jsonl.gz")]
    spec.generate(prompts[0][:32], max_new_tokens=8)  # warm-up
    for p in prompts[:4]:
        out = spec.generate(p, max_new_tokens=128)
        s = out.stats
        keep = {k: s[k] for k in ("alpha", "tau", "cost_ratio", "target_calls", "new_tokens", "draft_time", "target_time") if k in s}
        keep["levels"] = s["levels"]
        rows.setdefault(name, []).append(keep)
        print(name, json.dumps(keep), flush=True)
json.dump(rows, open("benchmarks/results/cpu-qwen-2026-12-06g/hierarchy_levels.json", "w"), indent=1)
