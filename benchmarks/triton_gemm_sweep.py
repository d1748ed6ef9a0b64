"""The Triton GEMMs of speculant.models.triton_layers at one model's widths, by tile shape and split-K,
against cuBLAS: what a decode step's skinny GEMMs (T = 1 or 5 rows against a weight of N × K) reach of
the card's memory bandwidth, and which configuration a width should get; and the GEMVs one-row calls run
(triton_layers.use_gemv; benchmarks/results/gpu-2026-12-07m/ has the probe that chose them). GPU only.

    python benchmarks/triton_gemm_sweep.py --model qwen2.5-1.5b --out $OUT
    python benchmarks/triton_gemm_sweep.py --model smollm2-135m --rows 1,5 --out $OUT

Each GEMM is timed as a decoding forward meets it: one CUDA graph calls it once per layer, on each
layer's own weight (so the weights stream from HBM, not from L2), replayed --repeats times; µs per
call, and GB/s = the weight's bytes ÷ that time. Configurations: the kernels' default (BLOCK_N from
triton_layers.GEMM_PROGRAMS, BLOCK_K 64, 4 warps) without split-K and with the split-K policy
(triton_layers._split_k), a grid of BLOCK_N × BLOCK_K × (warps, stages) without split-K,
and split-K (norm_matmul_split_kernel: K cut in 2, 4 or 8 ranges, the last program of a column block
summing them in order; for the gate/up kernel, norm_gate_up_silu_split_kernel). cuBLAS rows: torch.mm on the call's rows, and torch.addmm with the residual
(o_proj's and down_proj's epilogue). Prints a table per GEMM; writes triton_gemm_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import common  # benchmarks/common.py (this script runs from benchmarks/)
import torch

# name -> (hidden E, intermediate I, qkv output N, vocabulary, layers): the shapes of a decoding forward
MODELS = {"qwen2.5-1.5b": (1536, 8960, 2048, 151936, 28), "qwen2.5-0.5b": (896, 4864, 1152, 151936, 24),
          "smollm2-135m": (576, 1536, 960, 49152, 30)}


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(MODELS))
    parser.add_argument("--rows", default="1,5", help="T values (query rows of a call)")
    parser.add_argument("--repeats", type=int, default=20, help="graph replays timed")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds; configurations past it are skipped")
    parser.add_argument("--bandwidth", type=float, default=0.0,
                        help="the card's HBM GB/s for the %% column (0: 3350 on an H100, 4800 on an H200)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out/gemm-sweep"))
    return parser


def configs() -> list[dict]:
    """The default, a tile grid, and split-K."""
    out = [{"name": "default, no split", "split_k": 1}, {"name": "default (split-K policy)"}]
    tiles = [(n, k, 4, 3) for n in (16, 32, 64) for k in (64, 128, 256)] + [(32, 128, 8, 4), (16, 256, 8, 4)]
    tiles += [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3)]  # wide: the head
    tiles += [(128, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3)]  # wide tiles: the head, 44 % of HBM at 64
    for block_n, block_k, warps, stages in tiles:
        out.append({"name": f"n{block_n} k{block_k} w{warps} s{stages}", "block_n": block_n, "block_k": block_k,
                    "num_warps": warps, "num_stages": stages, "split_k": 1})
    for block_n in (16, 32):
        for block_k in (64, 128):
            for split in (2, 4, 8):
                out.append({"name": f"n{block_n} k{block_k} split{split}", "block_n": block_n, "block_k": block_k,
                            "split_k": split})
    out.append({"name": "gemv default", "gemv": True})  # one-row calls' GEMVs (triton_layers.use_gemv)
    for block_n in (8, 16, 32):
        for block_k in (256, 512):
            for warps in (4, 8):
                out.append({"name": f"gemv n{block_n} k{block_k} w{warps}", "gemv": True, "block_n": block_n,
                            "block_k": block_k, "num_warps": warps})
    return out


def graph_us(calls, repeats: int) -> float:
    """µs per call of `calls` (a list of zero-argument callables), captured in one CUDA graph."""
    ms, _ = common.graph_replay_ms(lambda: [call() for call in calls], repeats)
    return ms * 1000 / len(calls)


def sweep_linear(gemm: str, ws: list[torch.Tensor], kind: str, t: int, gen, repeats: int, record, out_of_budget):
    """One GEMM of `kind` at T rows over the layers' weights `ws`: cuBLAS, then every configuration."""
    from speculant.models import triton_layers as tl

    n, k = ws[0].shape
    dev, bf16 = ws[0].device, ws[0].dtype
    x = torch.randn(t, k, device=dev, dtype=bf16, generator=gen)
    g = torch.rand(k, device=dev, dtype=bf16, generator=gen) + 0.5
    bias = torch.randn(n, device=dev, dtype=bf16, generator=gen) if kind == "norm+bias" else None
    res = torch.randn(t, n, device=dev, dtype=bf16, generator=gen)
    nbytes = n * k * 2
    mm_out = torch.empty(t, n, device=dev, dtype=bf16)
    record(gemm, "cuBLAS mm", t, graph_us([lambda w=w: torch.mm(x, w.t(), out=mm_out) for w in ws], repeats), nbytes)
    if kind == "residual":
        record(gemm, "cuBLAS addmm", t, graph_us([lambda w=w: torch.addmm(res, x, w.t(), out=mm_out) for w in ws],
                                                 repeats), nbytes)
    reference = None
    for config in configs():
        label = config["name"]
        if out_of_budget():
            record(gemm, label, t, None, nbytes, "past --budget")
            continue
        blocks = {key: config[key] for key in ("block_n", "block_k", "num_warps", "num_stages", "split_k", "gemv")
                  if key in config}
        out = torch.empty(t, n, device=dev, dtype=torch.float32 if kind == "norm" else bf16)

        def call(w, blocks=blocks, out=out):
            if kind == "residual":
                return tl._linear(x, w, residual=res, out=out, **blocks)
            return tl._linear(x, w, norm_weight=g, eps=1e-6, bias=bias, out=out, **blocks)

        try:
            us = graph_us([lambda w=w, call=call: call(w) for w in ws], repeats)
        except Exception as error:  # noqa: BLE001 -- a tile the compiler rejects (shared memory, ...): say so, go on
            record(gemm, label, t, None, nbytes, f"{type(error).__name__}: {str(error)[:120]}")
            continue
        value = call(ws[0]).float()
        if reference is None:
            reference = value
        elif not torch.allclose(value, reference, rtol=2e-2, atol=2e-2):
            record(gemm, label, t, None, nbytes, "wrong result: differs from the default's")
            continue
        record(gemm, label, t, us, nbytes)


def sweep_gate_up(gate_up: list[torch.Tensor], t: int, gen, repeats: int, record, out_of_budget):
    """The fused RMSNorm + gate/up + SiLU kernel by tile and split-K, against cuBLAS's mm."""
    from speculant.models import triton_layers as tl

    n2, k = gate_up[0].shape
    dev, bf16 = gate_up[0].device, gate_up[0].dtype
    x = torch.randn(t, k, device=dev, dtype=bf16, generator=gen)
    g = torch.rand(k, device=dev, dtype=bf16, generator=gen) + 0.5
    nbytes = n2 * k * 2
    mm_out = torch.empty(t, n2, device=dev, dtype=bf16)
    record("gate_up", "cuBLAS mm", t, graph_us([lambda w=w: torch.mm(x, w.t(), out=mm_out) for w in gate_up],
                                                repeats), nbytes)
    tiles = [(n, k, 1, False) for n in (None, 16, 32, 64, 128) for k in (64, 128)]
    tiles += [(n, k, split, False) for n in (32, 64, 128) for k in (64, 128) for split in (2, 4)]  # the split kernel
    tiles += [(n, k, 1, True) for n in (None, 4, 8, 16) for k in (256, 512)]  # one-row calls' GEMVs (n: of each half)
    reference = None
    for block_n, block_k, split, gemv in tiles:
        label = ("gemv " if gemv else "") + f"n{block_n or 'auto'} k{block_k}" + (f" split{split}" if split > 1 else "")
        if out_of_budget():
            record("gate_up", label, t, None, nbytes, "past --budget")
            continue
        blocks = {"block_n": block_n, "block_k": block_k, "split_k": split, "gemv": gemv}
        try:
            us = graph_us([lambda w=w, b=blocks: tl.norm_gate_up_silu(x, g, 1e-6, w, **b) for w in gate_up], repeats)
        except Exception as error:  # noqa: BLE001 -- as in sweep_linear
            record("gate_up", label, t, None, nbytes, f"{type(error).__name__}: {str(error)[:120]}")
            continue
        value = tl.norm_gate_up_silu(x, g, 1e-6, gate_up[0], **blocks).float()
        if reference is None:
            reference = value
        elif not torch.allclose(value, reference, rtol=2e-2, atol=2e-2):
            record("gate_up", label, t, None, nbytes, "wrong result: differs from the first configuration's")
            continue
        record("gate_up", label, t, us, nbytes)


def main() -> None:
    args = arguments().parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this sweep needs a CUDA GPU")
    hidden, inter, qkv, vocab, layers = MODELS[args.model]
    name = torch.cuda.get_device_name()
    bandwidth = args.bandwidth or (4800.0 if "H200" in name else 3350.0)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def weights(n, k, count):
        return [torch.randn(n, k, device=dev, dtype=bf16, generator=gen) * 0.02 for _ in range(count)]

    # name -> (weights, kind): kind picks the epilogue: norm+bias (q/k/v), residual (o, down), norm (the head)
    gemms = {"qkv": (weights(qkv, hidden, layers), "norm+bias"), "o": (weights(hidden, hidden, layers), "residual"),
             "down": (weights(hidden, inter, layers), "residual"),
             "head": (weights(vocab, hidden, 1) * 4, "norm")}  # one head, called 4 times: it is larger than L2
    gate_up = weights(2 * inter, hidden, layers)
    rows = [int(t) for t in args.rows.split(",")]
    began = time.perf_counter()
    results: list[dict] = []

    def record(gemm, config, t, us, nbytes, skipped=""):
        row = {"gemm": gemm, "config": config, "rows": t, "us": us, "bytes": nbytes,
               "gb_per_s": nbytes / us / 1e3 if us else None, "skipped": skipped}
        results.append(row)
        if us:
            print(f"{gemm:8s} T {t:2d}  {config:24s} {us:8.2f} µs  {nbytes / us / 1e3:7.1f} GB/s "
                  f"({100 * nbytes / us / 1e3 / bandwidth:4.1f} %)", flush=True)
        else:
            print(f"{gemm:8s} T {t:2d}  {config:24s} skipped: {skipped}", flush=True)

    def out_of_budget() -> bool:
        return time.perf_counter() - began > args.budget

    for t in rows:
        for gemm, (ws, kind) in gemms.items():
            sweep_linear(gemm, ws, kind, t, gen, args.repeats, record, out_of_budget)
        sweep_gate_up(gate_up, t, gen, args.repeats, record, out_of_budget)

    best = {}
    for row in results:
        if row["us"] and not row["config"].startswith("cuBLAS"):
            key = f"{row['gemm']} T{row['rows']}"
            if key not in best or row["us"] < best[key]["us"]:
                best[key] = row
    print("\nbest Triton configuration per GEMM (against the default and cuBLAS):")
    for key, row in best.items():
        same = [r for r in results if f"{r['gemm']} T{r['rows']}" == key and r["us"]]
        default = next((r["us"] for r in same if r["config"] == "default, no split"), None)
        cublas = min((r["us"] for r in same if r["config"].startswith("cuBLAS")), default=None)
        print(f"  {key:12s} {row['config']:24s} {row['us']:8.2f} µs ({row['gb_per_s']:.0f} GB/s); default "
              f"{default and f'{default:.2f}'} µs; cuBLAS {cublas and f'{cublas:.2f}'} µs", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": name, "torch": torch.__version__, "model": args.model, "bandwidth_gb_per_s": bandwidth,
               "layers": layers, "results": results, "best": best, "seconds": time.perf_counter() - began}
    (out / "triton_gemm_sweep.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"device": name, "seconds": round(summary["seconds"], 1),
                      "json": str(out / "triton_gemm_sweep.json")}))


if __name__ == "__main__":
    main()
