"""How much of the Qwen 1.5B's probability mass (T 1) falls on a feature draft's kept ids, per held-out domain
of benchmarks/prompts/ (3 prompts each, the target's own greedy 48-token continuations; CPU, bf16), for:
  shipped   the shipped draft's 32,768 kept ids (picked on its first corpus: documentation, source and the
            target's answers to programming questions)
  text      the 32,768 most frequent ids of a corpus of 2 M tokens of documentation and source plus the target's
            answers to CHAT everyday questions it wrote when asked (speculant.distill.questions), repeated 2x
  balanced  the same corpus with the chat answers counted apart, weighted 0.5 (balanced_kept below: the run used
            the same count as a chat_share option of kept_token_ids, tried for it and not kept)
Run from the repository root:  .venv/bin/python benchmarks/results/cpu-kept-vocab-2026-12-07/kept_mass.py [CHAT]
"""
import json, os, sys, time, torch, speculant
from safetensors import safe_open
sys.path.insert(0, "benchmarks")
import common
from speculant.distill.data import batch_encoder, build_corpus, chat_sequences, kept_token_ids
from speculant.distill.questions import requested_questions

torch.set_num_threads(2)


def balanced_kept(train, vocab_size, k, always, chat_tokens, chat_share):
    """kept_token_ids with the first chat_tokens of train (the chat answers) and the rest each counted as shares of
    their own tokens, weighted chat_share and 1 - chat_share."""
    ids = train.flatten()
    chat = torch.bincount(ids[:chat_tokens], minlength=vocab_size).double()
    rest = torch.bincount(ids, minlength=vocab_size).double() - chat
    counts = chat_share * chat / chat_tokens + (1 - chat_share) * rest / (ids.numel() - chat_tokens)
    counts[sorted(always)] = float("inf")
    return torch.sort(counts, descending=True, stable=True).indices[:k].sort().values

chat_count = int(sys.argv[1]) if len(sys.argv) > 1 else 96
spec = speculant.load("qwen2.5-coder-1.5b", draft="none", dtype="bfloat16", device="cpu")
model, tok = spec.target.model, spec.tokenizer
eos = sorted(int(t) for t in tok.eos_ids)
start = time.perf_counter()
questions = requested_questions(model, tok, chat_count, seed=5, batch_size=32, progress=False)
prompts = [list(tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)) for q in questions]
answers = chat_sequences(model, prompts, max_new_tokens=128, temperature=1.0, stop_ids=eos, seed=5, batch_size=32,
                         progress=False)
print(f"{len(questions)} questions, {sum(map(len, answers))} answer tokens, {time.perf_counter() - start:.0f} s", flush=True)
corpus = build_corpus(tok.encode, encode_batch=batch_encoder(tok), seq_len=1024, train_tokens=2_000_000,
                      heldout_tokens=1024, separator_id=eos[0], extra_train=answers * 2, progress=False)
always = eos
vocab = model.weights.cfg.vocab_size
kept = {"shipped": safe_open("speculant/embedded/qwen2.5-coder-1.5b-draft/model.safetensors", "pt").get_tensor("kept_ids").long(),
        "text": kept_token_ids(corpus.train, vocab, 32768, always),
        "balanced": balanced_kept(corpus.train, vocab, 32768, always, sum(len(a) + 1 for a in answers * 2), 0.5)}
rows = {}
for domain in common.HELD_OUT_DOMAINS:
    chat = common.HELD_OUT_DOMAINS[domain][1]
    probs = []
    for text in common.heldout_texts(domain, 3):
        ids = spec.encode(text, chat=chat)
        out = spec.generate(ids, max_new_tokens=48, temperature=0.0).token_ids
        model.truncate(0)
        with torch.no_grad():
            probs.append(torch.softmax(model.forward(torch.tensor(list(ids) + list(out)), 0)[len(ids) - 1:-1].float(), -1))
    p = torch.cat(probs)
    rows[domain] = {name: round(float(p[:, ids].sum(-1).mean()), 3) for name, ids in kept.items()}
    print(f"{domain:16s}", "  ".join(f"{k} {v:.3f}" for k, v in rows[domain].items()), flush=True)
json.dump({"chat_questions": len(questions), "corpus": corpus.meta, "kept_mass_t1": rows,
           "overlap_with_shipped": {k: int(torch.isin(v, kept["shipped"]).sum()) for k, v in kept.items()}},
          open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kept_mass.json"), "w"), indent=1)
