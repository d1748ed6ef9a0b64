"""The probed exact_batch of each model x threads x repacking (speculant.models.llamacpp.probe_exact_batch),
uncached, with its time:  .venv/bin/python probe_widths.py smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b"""
import os, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from speculant.models.llamacpp import LlamaCppModel, probe_exact_batch
from speculant.models.registry import embedded_gguf
for spec in sys.argv[1].split(","):
    for threads in (1, 2):
        for repack in (True, False):
            m = LlamaCppModel(embedded_gguf(spec, progress=False), max_seq_len=512, threads=threads, repack=repack, exact_batch=1)
            t = time.perf_counter(); w = probe_exact_batch(m); dt = time.perf_counter() - t
            print(f"{spec} threads={threads} repack={repack}: W={w} ({dt:.2f} s) load {os.getloadavg()[0]:.2f}", flush=True)
            m.close()
