import sys, time
_root = __import__("pathlib").Path(__file__).resolve().parents[3]; sys.path.insert(0, str(_root)); sys.path.insert(0, str(_root / "benchmarks"))
import llamacpp_cpu as B
from speculant.models.llamacpp import gguf_source
gguf = gguf_source("qwen2.5-coder-1.5b", progress=False)[0]
own = B.LlamaCppOwn(gguf, 0, 1, 2048)
ours = B.Ours("qwen2.5-coder-1.5b", "none", 1, "llama.cpp", 2048)
tok = ours.spec.tokenizer; eos = set(tok.eos_ids)
sets = B.prompt_sets(1)
for name, [(text, chat)] in sets.items():
    ids = tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text, add_special_tokens=True)
    for r in (own, ours): r.run(ids, 4, 0.0, 0, eos)
    res = {"own": [], "ours": []}
    for rep in range(3):
        for k, r in (("own", own), ("ours", ours)):
            t0 = time.perf_counter(); out = r.run(ids, 64, 0.0, 0, eos); res[k].append(time.perf_counter() - t0)
    print(name, len(ids), "prompt tokens;", {k: [round(x, 2) for x in v] for k, v in res.items()}, flush=True)
