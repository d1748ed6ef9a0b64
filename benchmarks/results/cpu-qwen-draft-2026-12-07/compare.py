"""A Qwen 1.5B feature draft against the 0.5B draft and plain decoding on this CPU (2 cores, bf16),
HumanEval T 0 and held-out chat T 0 / T 1, 128 new tokens; compare.json goes to OUT_DIR (default: this folder).
Run from the repository root: the 110-s draft here, the first 320-s run in ../cpu-qwen-draft-2026-12-07b/, the
shipped 650-s draft in ../cpu-qwen-draft-2026-12-07c/.

    .venv/bin/python compare.py DRAFT_FOLDER PROMPTS [OUT_DIR] > compare.txt
    ROWS="plain,features γ4,0.5B chain γ8" CHAT_ROWS=all .venv/bin/python compare.py ...   # other rows, chat for all
"""
import gc, json, os, sys, time, torch, speculant
sys.path.insert(0, "benchmarks")
from qwen_pair import CHAT_PROMPTS
from speculant.bench.tasks import code_prompts
torch.set_num_threads(2)
folder, count = sys.argv[1], int(sys.argv[2])
out_dir = sys.argv[3] if len(sys.argv) > 3 else os.path.dirname(os.path.abspath(__file__))
D = "qwen2.5-coder-0.5b:int8:vocab=65536"
CONFIGS = [("plain", ["none"], 4, {}), ("features γ4", [folder], 4, {}), ("features γ6", [folder], 6, {}),
           ("0.5B chain γ8", [D], 8, {}), ("features γ4 + lookup 8", [folder], 4, {"lookup": 8})]
ROWS = os.environ.get("ROWS")  # config names to run (default: all); CHAT_ROWS=all: chat rows for every config
CONFIGS = [c for c in CONFIGS if ROWS is None or c[0] in ROWS.split(",")]
CHAT_ALL = os.environ.get("CHAT_ROWS") == "all"
out, plain = {}, {}
for name, drafts, gamma, extra in CONFIGS:
    spec = speculant.load("qwen2.5-coder-1.5b", draft=drafts, gamma=gamma, dtype="bfloat16", device="cpu", **extra)
    tasks = {"code": [list(p.token_ids) for p in code_prompts(count, spec.encode, ".gpu/HumanEval.jsonl.gz")],
             "chat": [spec.encode(p, chat=True) for p in CHAT_PROMPTS[:count]]}
    spec.generate(tasks["code"][0][:32], max_new_tokens=8)
    for task, temperature in (("code", 0.0), ("chat", 0.0), ("chat", 1.0)):
        if task == "chat" and not CHAT_ALL and name.startswith(("features γ6", "0.5B", "features γ4 +")):
            continue  # the code rows decide γ and the draft; chat rows for plain and features γ4
        t0 = time.perf_counter(); tokens = 0; alphas = []; outs = []
        for i, p in enumerate(tasks[task]):
            o = spec.generate(list(p), max_new_tokens=128, temperature=temperature, seed=i)
            tokens += len(o.token_ids); outs.append(o.token_ids)
            alphas.append(o.stats.get("alpha"))
        dt = time.perf_counter() - t0
        key = f"{task} T{temperature:g}"
        if name == "plain":
            plain[key] = (tokens / dt, outs)
        row = {"tok_per_s": round(tokens / dt, 2), "seconds": round(dt, 1), "tokens": tokens,
               "speedup": round(tokens / dt / plain[key][0], 3),
               "alpha": None if alphas[0] is None else round(sum(alphas) / len(alphas), 3)}
        if temperature == 0:
            row["same_as_plain"] = f"{sum(a == b for a, b in zip(outs, plain[key][1]))}/{len(outs)}"
        out[f"{name} | {key}"] = row
        print(f"{name:24s} {key:8s} {row['tok_per_s']:6.2f} tok/s x{row['speedup']:.2f} alpha {row['alpha']} "
              f"same {row.get('same_as_plain')}", flush=True)
    del spec; gc.collect()
json.dump(out, open(os.path.join(out_dir, "compare.json"), "w"), indent=1)
