"""Repacked weights (exact_batch probed: 3 for Q4_K) against not repacked (7), with verify batches split
into exact_batch-wide calls, on the Qwen2.5-Coder 1.5B target, 1 thread pinned to one core: plain greedy
decoding and n-gram gamma 4, tokens/s. Configurations interleaved within every round (their order
turned each round); also repacked with whole verify batches (exact_batch 512: NOT exact, the speed the
split costs). Greedy outputs checked against plain decoding of the same load.

    .venv/bin/python benchmarks/results/llamacpp-qwen-2026-12-04/exact_batch_ab.py [ROUNDS] [NEW_TOKENS]
"""
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from speculant.api import Speculant
from speculant.models.llamacpp import load_llamacpp

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
new = int(sys.argv[2]) if len(sys.argv) > 2 else 48
os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
models = {"repack": load_llamacpp("qwen2.5-coder-1.5b", max_seq_len=512, threads=1, progress=True),
          "no-repack": load_llamacpp("qwen2.5-coder-1.5b", max_seq_len=512, threads=1, progress=True, repack=False),
          "repack-whole": load_llamacpp("qwen2.5-coder-1.5b", max_seq_len=512, threads=1, progress=False,
                                        exact_batch=512)}
for name, loaded in models.items():
    print(name, repr(loaded.model), flush=True)
tok = models["repack"].tokenizer
prompts = [("from typing import List\n\n\ndef below_zero(operations: List[int]) -> bool:\n"
           '    """ Given a list of deposit and withdrawal operations on a bank account that starts with\n'
           '    zero balance, detect if at any point the balance falls below zero. """\n'),
           "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n"]
runs = [(m, d) for m in models for d in ("none", "ngram") if not (m == "repack-whole" and d == "none")]
speed = {r: [] for r in runs}
outputs = {}
print(f"load before: {os.getloadavg()}", flush=True)
for r in range(rounds):
    order = runs if r % 2 == 0 else runs[::-1]
    for text in prompts:
        ids = tok.encode(text, add_special_tokens=True)
        for m, d in order:
            spec = Speculant(models[m], [d], gamma=4, fused=False)
            t0 = time.perf_counter()
            out = spec.generate(ids, max_new_tokens=new, stop_ids=[])
            dt = time.perf_counter() - t0
            speed[(m, d)].append(len(out.token_ids) / dt)
            outputs.setdefault((m, text), {})[d] = out.token_ids
    print(f"round {r}: load {os.getloadavg()[0]:.2f}", flush=True)
for (m, d), v in speed.items():
    print(f"{m:<13} {d:<6} median {statistics.median(v):6.2f} tok/s  (all: {', '.join(f'{x:.2f}' for x in v)})")
for (m, text), outs in outputs.items():
    if "none" in outs:
        print(m, repr(text[:24]), "ngram == plain:", outs["ngram"] == outs["none"])
print(f"load after: {os.getloadavg()}")
