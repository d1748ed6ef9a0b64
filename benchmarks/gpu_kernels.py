"""Where a target forward's time goes on the GPU, per weight layout and attention variant (random
weights, SmolLM2-135M shapes, bfloat16): the forward over T positions is compiled as the fused step
compiles it, captured as one CUDA graph and replayed; a profiler pass over the compiled (not
captured) forward counts the kernels it launches (kernels per forward and per layer).

    python benchmarks/gpu_kernels.py --layers 6 --out $OUT
    python benchmarks/gpu_kernels.py --layouts fused,unfused --variants matmul   # the fused GEMMs' effect

Layouts: "fused" is how frozen weights are served (q|k|v and gate|up one GEMM each); "unfused" runs
the separate projections (a copy of the weights left trainable, which LeanModel does not fuse).
Fewer layers than the real 30 keep compilation short; the per-layer figures scale.
"""

import argparse
import json
from pathlib import Path

import common
import torch

from speculant.fused import static_forward
from speculant.models.transformer import LeanModel, TransformerConfig, random_weights


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--variants", default="sdpa,matmul", help="attention variants (LeanModel.attention)")
    parser.add_argument("--layouts", default="fused", help="weight layouts: fused, unfused or both")
    parser.add_argument("--positions", default="1,6")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cfg = TransformerConfig(num_layers=args.layers, **common.SMOLLM2_SHAPES)
    rows = []
    for layout in args.layouts.split(","):
        if layout not in ("fused", "unfused"):
            parser.error(f"--layouts: unknown layout {layout!r}; use fused, unfused or both")
        weights = random_weights(cfg, seed=0, dtype=torch.bfloat16).cuda().requires_grad_(layout == "unfused")
        for variant in args.variants.split(","):
            model = LeanModel(weights, max_seq_len=args.max_seq_len)
            assert (model.weights.layers[0].qkv is not None) == (layout == "fused")
            model.attention = variant
            fn = static_forward(model, compile=True)
            for t in map(int, args.positions.split(",")):
                tokens = torch.arange(1, t + 1, device="cuda")
                positions = torch.arange(100, 100 + t, device="cuda")
                call = lambda fn=fn, tokens=tokens, positions=positions: fn(tokens, positions)
                ms, compile_s = common.graph_replay_ms(call)
                counts, times = common.cuda_kernel_profile(call)
                kernels = sum(counts.values())
                top = sorted(times, key=times.get, reverse=True)[:12]
                row = {"layout": layout, "variant": variant, "positions": t, "layers": args.layers,
                       "graph_ms": round(ms, 4), "ms_per_layer_upper": round(ms / args.layers, 4),
                       "kernels_per_forward": kernels,
                       "kernels_per_layer": round(kernels / args.layers, 2),
                       "compile_and_capture_s": round(compile_s, 1),
                       "top_kernels": [(name, counts[name], round(times[name], 1)) for name in top]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
