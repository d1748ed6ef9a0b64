"""CPU GEMM cost by rows, dtype and layout: what a decode step (1 row) and a verification (γ + 1 rows)
cost on this machine, and whether a row's product depends on how many rows the call has.

    .venv/bin/python benchmarks/cpu_layout.py --threads 1 --out bench-out/cpu-layout

For each matrix shape (SmolLM2-135M's and Qwen2.5-Coder-1.5B's largest: the fused gate|up, down and
the output head), each dtype (float32, bfloat16) and layout (row-major [out, in] as stored; column-major:
the transpose made contiguous, see speculant.models.transformer.column_major), the best of several
F.linear calls at 1, 2, 3, 5, 9, 17 and 33 rows, in ms and as a multiple of the 1-row call. Then the
row-invariance check: do rows of a T-row call equal (bit for bit) the same rows computed in 1-row and
in 2-row calls? Prints a table, then one JSON line; writes cpu_layout.json to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

SHAPES = {  # name: (out, in)
    "smollm2 gate|up": (3072, 576),
    "smollm2 down": (576, 1536),
    "smollm2 head": (49152, 576),
    "qwen-1.5b gate|up": (17920, 1536),
    "qwen-1.5b down": (1536, 8960),
    "qwen-1.5b head": (151936, 1536),
}
ROWS = (1, 2, 3, 5, 9, 17, 33)


def best_ms(call, repeats: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out/cpu-layout"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    print(f"# threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'shape':20s} {'dtype':9s} {'layout':7s} " + " ".join(f"{'T' + str(t):>8s}" for t in ROWS)
          + "   invariant (vs 1 row / vs 2 rows)")
    for name in args.shapes.split(","):
        out_features, in_features = SHAPES[name]
        weight32 = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
        x32 = torch.randn(max(ROWS), in_features, generator=generator)
        for dtype in (torch.float32, torch.bfloat16):
            weight, x = weight32.to(dtype), x32.to(dtype)
            for layout, matrix in (("row", weight), ("column", weight.t().contiguous().t())):
                ms = {t: best_ms(lambda t=t, x=x, matrix=matrix: F.linear(x[:t], matrix), args.repeats) for t in ROWS}
                singles = torch.cat([F.linear(x[i:i + 1], matrix) for i in range(max(ROWS))])
                pairs = torch.cat([F.linear(x[i:i + 2], matrix)[:1] for i in range(max(ROWS))])
                vs_one = [t for t in ROWS if t > 1 and not torch.equal(F.linear(x[:t], matrix), singles[:t])]
                vs_two = [t for t in ROWS if t > 2 and not torch.equal(F.linear(x[:t], matrix), pairs[:t])]
                rows_out.append({"shape": name, "out": out_features, "in": in_features, "dtype": str(dtype)[6:],
                                 "layout": layout, "ms": ms, "rows_differing_from_1_row_calls": vs_one,
                                 "rows_differing_from_2_row_calls": vs_two})
                print(f"{name:20s} {str(dtype)[6:]:9s} {layout:7s} " + " ".join(f"{ms[t]:8.2f}" for t in ROWS)
                      + f"   {'yes' if not vs_one else 'no'} / {'yes' if not vs_two else 'no'}", flush=True)
    result = {"threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows_out}
    common.finish(args.out, "cpu_layout.json", result, "(the table above)",
                  {k: v for k, v in result.items() if k != "rows"})

if __name__ == "__main__":
    main()
