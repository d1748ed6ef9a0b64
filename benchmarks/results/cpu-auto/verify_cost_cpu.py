"""Time of one target forward over n + 1 positions (verifying n drafted tokens) on the CPU.

    taskset -c 1 .venv/bin/python benchmarks/results/cpu-auto/verify_cost_cpu.py

SmolLM2-135M, float32, 1 thread, 250 positions already in the cache; 5 rounds x 3 forwards per n.
"""
import time

import torch

from speculant.models.registry import load_model

torch.set_num_threads(1)
model = load_model("smollm2-135m", device="cpu", dtype=torch.float32, max_seq_len=1024).model
context = torch.randint(0, 1000, (250,))
model.truncate(0)
model.forward(context, 0)
times: dict[int, list[float]] = {}
for _ in range(5):
    for n in range(13):
        tokens = torch.randint(0, 1000, (n + 1,))
        start = time.perf_counter()
        for _ in range(3):
            model.forward(tokens, 250)
            model.truncate(250)
        times.setdefault(n, []).append((time.perf_counter() - start) / 3)
for n, values in times.items():
    print(f"n={n:2d} ({n + 1:2d} positions): min {1e3 * min(values):6.1f} ms  median {1e3 * sorted(values)[2]:6.1f} ms")
