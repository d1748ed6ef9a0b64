"""Throughput of the batched engine (speculant.batching) at several concurrencies: speculative against
plain batching (the same engine with γ = 0), the same prompts, one run.

At concurrency c, c requests are in flight at all times (closed loop: a finished request is replaced
by the next) until `--requests-per-slot` × c requests are done. Throughput is the new tokens of all
requests ÷ the wall time; latency is each request's time from add() to its last token. Greedy by
default, so speculative and plain must give the same tokens (checked, printed as `same`). At
concurrency 1 the single-request engine (Speculant.generate: on CUDA its fused CUDA-graph steps) is
measured too, so the batched engine's speed-up at c = 1 can be held against it.

    python benchmarks/batch_throughput.py --device cpu --target smollm2-135m --concurrency 1,4,16 \
        --max-new-tokens 32
    python benchmarks/batch_throughput.py --device cuda --target /root/w/smollm2.gguf --dtype bfloat16 --graphs

--graphs: each batched step runs as ONE CUDA graph per (batch bucket, Γ, set of sampling params) holding
the draft, the target's verification and the acceptance (speculant.row_step), joining requests are
prefilled together from a graph per (rows, tokens) bucket, in both modes; graphs are captured on first
use (under `auto`, while the step costs are timed, once per machine: see speculant.calibrate).

Prints a table, then one JSON line; writes the JSON to $OUT/batch_throughput.json ($OUT: ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speculant import api
from speculant.batching import BatchEngine, BatchRequest
from speculant.sampling import SamplingParams

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works, with an example in Python.",
    "import numpy as np\n\ndef moving_average(x, window):\n",
    "List five tips for writing clear technical documentation.",
    "What is the difference between a process and a thread?",
    "class Stack:\n    def __init__(self):\n",
    "Summarise the causes of the French Revolution in a paragraph.",
]


def run_engine(engine: BatchEngine, prompts: list[list[int]], concurrency: int, total: int, params: SamplingParams,
               max_new_tokens: int, stop_ids: tuple[int, ...]) -> dict:
    """Closed loop at `concurrency` until `total` requests are done."""
    started, latencies, outputs, gammas = {}, [], {}, []
    next_request = 0
    start = time.perf_counter()
    steps, step_seconds = 0, 0.0
    while next_request < total or engine.num_running:
        while next_request < total and engine.num_running < concurrency:
            request = BatchRequest(prompts[next_request % len(prompts)], params, max_new_tokens, stop_ids=stop_ids,
                                   seed=next_request)
            rid = engine.add(request)
            started[rid] = (next_request, time.perf_counter())
            outputs[next_request] = []
            next_request += 1
        step_start = time.perf_counter()
        updates = engine.step()
        step_seconds += time.perf_counter() - step_start
        for update in updates:
            index, t0 = started[update.request_id]
            outputs[index] += update.tokens
            if update.finished:
                latencies.append(time.perf_counter() - t0)
                gammas += update.stats.gamma_history
        steps += 1
    wall = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs.values())
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "steps": steps,
            "mean_step_s": step_seconds / max(steps, 1), "graphs": len(engine.row_step.graphs),
            "cuda_graphs": engine.row_step.captured, "compile_fallbacks": engine.row_step.compile_fallbacks,
            "latency_mean_s": statistics.mean(latencies), "latency_p50_s": statistics.median(latencies),
            "mean_gamma": statistics.mean(gammas) if gammas else 0.0, "outputs": outputs}


def single_request(spec, prompts, total, params, max_new_tokens, plain: bool) -> float:
    """tok/s of the single-request engine over `total` requests one after another (after one untimed
    request: on CUDA the first one captures its graphs)."""
    spec.generate(prompts[0], max_new_tokens=max_new_tokens, temperature=params.temperature, seed=0, plain=plain)
    start, tokens = time.perf_counter(), 0
    for i in range(total):
        out = spec.generate(prompts[i % len(prompts)], max_new_tokens=max_new_tokens, temperature=params.temperature,
                            seed=i, plain=plain)
        tokens += len(out.token_ids)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--dtype", default=None, help="float32 on the CPU, bfloat16 on CUDA by default")
    parser.add_argument("--gamma", default="auto", help="an integer >= 1 or 'auto' (γ from measured step cost)")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests run = this × concurrency")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-single", action="store_true", help="skip the single-request engine at c = 1")
    parser.add_argument("--compile", action="store_true", help="with --graphs: the row forwards through torch.compile")
    parser.add_argument("--graphs", action="store_true",
                        help="each batched step (draft, verify, acceptance) as one CUDA graph, prefills too "
                             "(both modes; on the CPU the same padded functions, eager)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    gamma = args.gamma if args.gamma == "auto" else int(args.gamma)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    spec = api.load(target=args.target, draft=args.draft, gamma=gamma, device=args.device, dtype=dtype,
                    max_seq_len=args.max_seq_len)
    prompts = [spec.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=args.temperature)
    stop_ids = tuple(spec.tokenizer.eos_ids)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"

    # warm-up: first calls allocate and (on CUDA) initialise kernels
    def engine(mode: str, rows: int) -> BatchEngine:
        if mode == "speculative":
            return spec.batch_engine(rows, graphs=args.graphs, compile=args.compile)
        return BatchEngine(spec.target.model, None, gamma=0, max_batch=rows, graphs=args.graphs, compile=args.compile)

    for mode in ("speculative", "plain"):
        run_engine(engine(mode, 4), prompts, 2, 2, params, 8, stop_ids)
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in concurrencies:
        total = max(args.min_requests, args.requests_per_slot * c)
        result = {"concurrency": c, "requests": total}
        for mode in ("speculative", "plain"):
            batch = engine(mode, c)
            run_engine(batch, prompts, c, c, params, args.max_new_tokens, stop_ids)  # untimed: captures its buckets
            result[mode] = run_engine(batch, prompts, c, total, params, args.max_new_tokens, stop_ids)
        same = result["speculative"]["outputs"] == result["plain"]["outputs"]
        for mode in ("speculative", "plain"):
            del result[mode]["outputs"]
        result["same_tokens"] = same
        result["speedup"] = result["speculative"]["tok_s"] / result["plain"]["tok_s"]
        if c == 1 and not args.no_single:
            result["single_request"] = {
                "speculative_tok_s": single_request(spec, prompts, total, params, args.max_new_tokens, False),
                "plain_tok_s": single_request(spec, prompts, total, params, args.max_new_tokens, True)}
            result["single_request"]["speedup"] = (result["single_request"]["speculative_tok_s"]
                                                   / result["single_request"]["plain_tok_s"])
        rows.append(result)
        (out_dir / "batch_throughput_partial.json").write_text(json.dumps(rows, indent=1))  # a stopped run keeps it
        print(f"c={c} done: {result['speculative']['tok_s']:.1f} vs {result['plain']['tok_s']:.1f} tok/s",
              file=sys.stderr, flush=True)

    print(f"\nbatched engine, {args.target} + draft {args.draft}, gamma {args.gamma}, {device_name}, {dtype}, "
          f"{args.max_new_tokens} new tokens, T={args.temperature}, graphs {args.graphs}")
    print("| concurrency | requests | speculative tok/s | plain tok/s | spec ÷ plain | mean γ "
          "| latency spec / plain (s) | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, p = r["speculative"], r["plain"]
        print(f"| {r['concurrency']} | {r['requests']} | {s['tok_s']:.1f} | {p['tok_s']:.1f} | {r['speedup']:.2f} | "
              f"{s['mean_gamma']:.2f} | {s['latency_mean_s']:.2f} / {p['latency_mean_s']:.2f} | {r['same_tokens']} |")
    for r in rows:
        if "single_request" in r:
            s = r["single_request"]
            print(f"single-request engine at c=1: speculative {s['speculative_tok_s']:.1f} tok/s, plain "
                  f"{s['plain_tok_s']:.1f} tok/s, speed-up {s['speedup']:.2f}")
    if len(rows) > 1:
        print(f"speculative tok/s at c={rows[-1]['concurrency']} ÷ at c={rows[0]['concurrency']}: "
              f"{rows[-1]['speculative']['tok_s'] / rows[0]['speculative']['tok_s']:.1f}")
    summary = {"benchmark": "batch_throughput", "device": device_name, "target": args.target, "draft": args.draft,
               "dtype": dtype, "gamma": args.gamma, "max_new_tokens": args.max_new_tokens,
               "temperature": args.temperature, "graphs": args.graphs, "compile": args.compile, "torch": torch.__version__, "rows": rows,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out_dir / "batch_throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
