"""Target mass on the shipped Qwen draft's kept ids, per held-out domain (CPU, bf16): the target's own
greedy continuation of each prompt, then Σ p(kept) at T 1 over the generated positions."""
import sys, torch, speculant
from safetensors import safe_open
sys.path.insert(0, "benchmarks")
import common
torch.set_num_threads(2)
kept = safe_open("speculant/embedded/qwen2.5-coder-1.5b-draft/model.safetensors", "pt").get_tensor("kept_ids").long()
spec = speculant.load("qwen2.5-coder-1.5b", draft="none", dtype="bfloat16", device="cpu")
model = spec.target.model
for domain in common.HELD_OUT_DOMAINS:
    chat = common.HELD_OUT_DOMAINS[domain][1]
    masses = []
    for i, text in enumerate(common.heldout_texts(domain, 3)):
        ids = spec.encode(text, chat=chat)
        out = spec.generate(ids, max_new_tokens=48, temperature=0.0).token_ids
        seq = torch.tensor(list(ids) + list(out))
        model.truncate(0)
        with torch.no_grad():
            logits = model.forward(seq, 0)[len(ids) - 1:-1].float()
        p = torch.softmax(logits, -1)
        masses.append(p[:, kept].sum(-1))
    m = torch.cat(masses)
    print(f"{domain:16s} kept mass T1 mean {m.mean():.3f}  share of positions < 0.5: {(m < 0.5).float().mean():.3f}", flush=True)
