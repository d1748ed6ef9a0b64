"""Blocked attention (the CPU in bfloat16: LeanModel._blocked_attention) against one GEMM over all keys
("matmul"): ms per target call of 1 and 5 rows after contexts of 100 and 600 tokens, SmolLM2-135M,
median of 20, the two modes alternating twice in one run.

    .venv/bin/python benchmarks/cpu_attention_blocks.py
"""
import statistics
import time

import torch

from speculant.models.registry import load_model

torch.manual_seed(0)
m = load_model("smollm2-135m", dtype=torch.bfloat16, max_seq_len=1024).model
ctx = torch.randint(0, 40000, (700,))
for length in (100, 600):
    for rows in (1, 5):
        row = []
        for mode in ("matmul", "blocked", "matmul", "blocked"):
            m.attention = mode
            m.prefill(ctx[:length])
            times = []
            for _ in range(20):
                t = time.perf_counter(); m.forward(ctx[length:length + rows], length); times.append(time.perf_counter() - t)
            row.append((mode, 1000 * statistics.median(times)))
        print(f"context {length}, {rows} rows: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row), flush=True)
