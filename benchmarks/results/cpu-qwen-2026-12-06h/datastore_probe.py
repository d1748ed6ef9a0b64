"""Would a code datastore (the standard library's source, tokenized) propose tokens the 0.5B accepts
more often than prompt lookup? Teacher-forced on the 0.5B's own greedy continuations of HumanEval."""
import glob, json, os, sys, time
import numpy as np, torch, speculant
from tokenizers import Tokenizer
from speculant.bench.tasks import code_prompts
from speculant.drafters.ngram import NgramDrafter
torch.set_num_threads(2)
tok = Tokenizer.from_file("/root/.cache/speculant/models/1d9614638d18024d-qwen2.5-coder-0.5b/tokenizer.json")
root = "/root/.pyenv/versions/3.11.7/lib/python3.11"
files = [f for f in glob.glob(root + "/**/*.py", recursive=True)
         if "/site-packages/" not in f and "/test/" not in f and "/tests/" not in f and "/idlelib/" not in f]
t0 = time.time()
texts = [open(f, encoding="utf-8", errors="replace").read() for f in sorted(files)]
ids = []
for enc in tok.encode_batch(texts):
    ids.extend(enc.ids); ids.append(151643)
corpus = np.array(ids, dtype=np.int64)
print("corpus tokens", len(corpus), "in", round(time.time() - t0, 1), "s", flush=True)
# the datastore: for n = 4, 3, 2 the n-gram -> its most frequent continuation of up to G tokens
G = 4
def index(n):
    t = time.time()
    keys = np.zeros(len(corpus) - n - G, dtype=np.int64)
    for j in range(n):
        keys = keys * 151936 + corpus[j:j + len(keys)] if j == 0 else keys * 151936 + corpus[j:j + len(keys)]
    # hash the n-gram + its continuation's first token, keep the most frequent first token per n-gram
    return keys
best = {}
for n in (4, 3, 2):
    t = time.time()
    m = len(corpus) - n - G
    grams = np.stack([corpus[j:j + m] for j in range(n)], 1)
    nxt = np.stack([corpus[n + j:n + j + m] for j in range(G)], 1)
    # most frequent continuation (all G tokens) per n-gram
    rows = np.concatenate([grams, nxt], 1)
    uniq, counts = np.unique(rows, axis=0, return_counts=True)
    order = np.lexsort((-counts, *[uniq[:, j] for j in reversed(range(n))]))
    uniq = uniq[order]
    first = np.ones(len(uniq), bool); first[1:] = np.any(uniq[1:, :n] != uniq[:-1, :n], 1)
    table = {tuple(r[:n]): tuple(r[n:]) for r in uniq[first]}
    best[n] = table
    print("n", n, "grams", len(table), round(time.time() - t, 1), "s", flush=True)

def store_propose(context, gamma):
    for n in (4, 3, 2):
        c = best[n].get(tuple(context[-n:]))
        if c is not None:
            return list(c[:gamma])
    return []

spec = speculant.load("qwen2.5-coder-0.5b", draft="none", dtype="bfloat16", device="cpu")
prompts = [list(p.token_ids) for p in code_prompts(int(sys.argv[1]) if len(sys.argv) > 1 else 8, spec.encode)]
res = {k: [0, 0, 0] for k in ("ngram", "store", "ngram-then-store", "longer")}  # proposals, accepted, positions
for p in prompts:
    out = spec.generate(p, max_new_tokens=128).token_ids
    ng = NgramDrafter()
    seq = p + out
    for i in range(len(p), len(seq) - 1):
        ctx = seq[:i]
        truth = seq[i:i + G]
        a = ng.continuation(ctx, G)
        b = store_propose(ctx, G)
        c = a if a else b
        # longer: the one whose match (n) is longer: approximate by ngram if its match n>=3 else store
        for name, prop in (("ngram", a), ("store", b), ("ngram-then-store", c)):
            r = res[name]; r[2] += 1
            if prop:
                r[0] += 1
                k = 0
                while k < len(prop) and k < len(truth) and prop[k] == truth[k]:
                    k += 1
                r[1] += k
for name, (props, acc, pos) in res.items():
    if name == "longer": continue
    print(f"{name:18s} proposes at {props / pos:.2f} of positions, accepted {acc / max(props, 1):.2f} tokens per proposal, {acc / pos:.2f} per position")
