"""Decode speed of a SmolLM2-135M-shaped lean model with random weights on CUDA (no weights
needed): generic eager loop vs fused CUDA-graph steps, without and with torch.compile.
Speed depends on shapes, not on weight values; outputs are meaningless here.

    python benchmarks/gpu_shape_speed.py
"""

import json
import time

import torch

from speculant.api import NoDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.models.transformer import LeanModel, TransformerConfig, random_weights
from speculant.sampling import SamplingParams

SMOLLM2 = TransformerConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                            num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                            rope_theta=100000.0, rms_norm_eps=1e-5)


def tokens_per_s(target, stepper, gamma=0, drafter=None, n=128, params=None):
    params = params or SamplingParams(temperature=0)
    prompt = list(range(1, 40))
    gen = torch.Generator(device="cuda").manual_seed(0)
    stats = None
    for step in generate(target, drafter or NoDrafter(), prompt, gamma=gamma, params=params, max_new_tokens=n,
                         generator=gen, stepper=stepper):
        stats = step.stats
    return stats.new_tokens / stats.decode_time, stats


def main():
    weights = random_weights(SMOLLM2, seed=0, dtype=torch.bfloat16).cuda()
    target = LeanModel(weights, max_seq_len=1024)
    rows = {}
    rows["eager_plain"] = tokens_per_s(target, None, n=32)[0]
    for compile in (False, True):
        start = time.perf_counter()
        st = FusedStepper(target, None, compile=compile)
        tokens_per_s(target, st, n=4)
        rows[f"graph_plain_compile={compile}_capture_s"] = time.perf_counter() - start
        rows[f"graph_plain_compile={compile}"] = tokens_per_s(target, st)[0]
        draft = LeanModel(weights, max_seq_len=1024, num_layers=2)
        st = FusedStepper(target, draft, compile=compile)
        start = time.perf_counter()
        tokens_per_s(target, st, gamma=4, n=8)
        rows[f"graph_layers2_g4_compile={compile}_capture_s"] = time.perf_counter() - start
        tps, stats = tokens_per_s(target, st, gamma=4)
        rows[f"graph_layers2_g4_compile={compile}"] = tps
        rows[f"graph_layers2_g4_compile={compile}_tau"] = stats.tau
        rows[f"graph_layers2_g4_compile={compile}_step_ms"] = stats.decode_time / stats.target_calls * 1000
        print(json.dumps(rows), flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **rows}))


if __name__ == "__main__":
    main()
