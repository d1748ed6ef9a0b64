"""T-token batch time, repacked weights (default) vs use_extra_bufts=False, interleaved in one process."""
import sys, time, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import torch
import speculant.models.llamacpp as L
from speculant.models.llamacpp import load_llamacpp
spec = sys.argv[1]
lib = L._library()
orig = lib.llama_model_default_params
a = load_llamacpp(spec, max_seq_len=512, threads=1, progress=False)
def params():
    p = orig(); p.use_extra_bufts = False; return p
lib.llama_model_default_params = params
b = load_llamacpp(spec, max_seq_len=512, threads=1, progress=False)
ids = a.tokenizer.encode(open(str(__import__("pathlib").Path(__file__).resolve().parents[2] / "prompts" / "heldout_code.jsonl")).read(), add_special_tokens=False)[:240]
for m in (a.model, b.model):
    m.forward(torch.tensor(ids[:200]), 0)
sizes = [1, 2, 3, 4, 5, 8]
t = {(k, s): [] for k in "ab" for s in sizes}
for r in range(8):
    for s in sizes:
        for k, m in (("a", a.model), ("b", b.model)):
            m.truncate(200)
            x = torch.tensor(ids[200:200 + s])
            t0 = time.perf_counter(); m.forward(x, 200); dt = time.perf_counter() - t0
            if r >= 2: t[(k, s)].append(dt)
for s in sizes:
    ra, rb = statistics.median(t[("a", s)]), statistics.median(t[("b", s)])
    print(f"{spec} T={s}: repack {1000*ra:.1f} ms, no repack {1000*rb:.1f} ms, no/yes {rb/ra:.2f}")
