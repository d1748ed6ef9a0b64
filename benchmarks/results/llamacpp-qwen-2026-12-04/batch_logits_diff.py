"""Do llama.cpp's logits for a position depend on the batch it is evaluated in? (Qwen Q4_K_M)"""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import torch
import speculant.models.llamacpp as L
from speculant.models.llamacpp import load_llamacpp

spec = sys.argv[1]
extra = sys.argv[2] == "1" if len(sys.argv) > 2 else True
if not extra:  # patch: no repacked (extra) buffer types
    lib = L._library()
    orig = lib.llama_model_default_params
    def params():
        p = orig(); p.use_extra_bufts = False; return p
    lib.llama_model_default_params = params
loaded = load_llamacpp(spec, max_seq_len=512, threads=1, progress=False)
m = loaded.model
text = open(str(__import__("pathlib").Path(__file__).resolve().parents[2] / "prompts" / "heldout_code.jsonl")).read()
ids = loaded.tokenizer.encode(text, add_special_tokens=False)[:240]
ctx = 200
m.forward(torch.tensor(ids[:ctx]), 0)
single = []
for i in range(ctx, ctx + 17):
    single.append(m.forward(torch.tensor(ids[i:i+1]), i)[0])
single = torch.stack(single)
for T in [int(x) for x in sys.argv[3].split(",")]:
    m.truncate(ctx)
    b = m.forward(torch.tensor(ids[ctx:ctx+T]), ctx)
    d = (b - single[:T]).abs().max().item()
    flips = int((b.argmax(-1) != single[:T].argmax(-1)).sum())
    print(f"{spec} extra_bufts={extra} T={T}: max|diff| {d:.4g}, argmax flips {flips}")
# timing without/with
