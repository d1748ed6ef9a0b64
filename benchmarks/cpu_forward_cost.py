"""What one forward of the lean model costs on this CPU by the tokens in the call: a plain decoding
step is 1 token, a verification γ + 1 (or a tree's nodes). Speculation pays where a call of several
tokens costs about what one does.

    .venv/bin/python benchmarks/cpu_forward_cost.py --models smollm2-135m,qwen2.5-coder-1.5b \\
        --dtypes float32,bfloat16 --threads 2 --out bench-out/cpu-forward-cost

For each model and dtype: the model as speculant serves it (float32 column-major with sdpa
attention; bfloat16 row-major with matmul attention and 1-row calls padded to 2, see
speculant.models.transformer), after a context of --context tokens, the best of --repeats calls of
T = 1, 2, 5, 9, 17 tokens, in ms and as a multiple of T = 1. Prints a table, then one JSON line;
writes cpu_forward_cost.json to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

from speculant.models.registry import load_model

TOKENS = (1, 2, 5, 9, 17)


def forward_ms(model, tokens: int, context: int, repeats: int) -> float:
    generator = torch.Generator().manual_seed(tokens)
    model.prefill(torch.randint(0, 1000, (context,), generator=generator))
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        model.truncate(context)
        call = torch.randint(0, 1000, (tokens,), generator=generator)
        start = time.perf_counter()
        model.forward(call, context)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out/cpu-forward-cost"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"# threads {torch.get_num_threads()}, context {args.context}, torch {torch.__version__}")
    print(f"{'model':22s} {'dtype':9s} {'attention':9s} " + " ".join(f"{'T' + str(t) + ' ms':>9s}" for t in TOKENS)
          + "   T5 / T1")
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            model = load_model(name, dtype=getattr(torch, dtype_name), max_seq_len=args.context + 64).model
            ms = {t: forward_ms(model, t, args.context, args.repeats) for t in TOKENS}
            rows.append({"model": name, "dtype": dtype_name, "attention": model.attention,
                         "min_rows": model.min_rows, "ms": ms})
            print(f"{name:22s} {dtype_name:9s} {model.attention:9s} " + " ".join(f"{ms[t]:9.1f}" for t in TOKENS)
                  + f"   {ms[5] / ms[1]:.2f}", flush=True)
            del model
    result = {"threads": torch.get_num_threads(), "context": args.context, "torch": torch.__version__, "rows": rows}
    common.finish(args.out, "cpu_forward_cost.json", result, "(the table above)",
                  {k: v for k, v in result.items() if k != "rows"})

if __name__ == "__main__":
    main()
