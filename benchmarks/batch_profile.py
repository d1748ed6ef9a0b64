"""Where a batched step's time goes: the batched engine (speculant.batching, as `speculant serve` runs
it) at a fixed number of rows, steps timed after a warm-up, then a few steps under torch.profiler.

    python benchmarks/batch_profile.py --device cuda --target /root/w/smollm2.gguf --dtype bfloat16 \\
        --rows 1,8 --gamma 4 --graphs
    .venv/bin/python benchmarks/batch_profile.py --device cpu --rows 1 --steps 8 --profile-steps 2

Per row count: ms per step (mean and median of --steps, after --warm-up steps: graphs captured,
forwards compiled), tokens per step, the graphs the engine holds, dynamo's compile counters, and from
the profiler per step: CUDA graph replays, kernel launches outside graphs, and the top ops by host
time. A step that replays one graph launches few kernels outside it; hundreds of launches mean the
step runs eagerly. Prints the tables; writes batch_profile.json into --out ($OUT, else ./out).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # after the repository is on the path: it imports speculant

from speculant import api
from speculant.batching import BatchRequest
from speculant.models.base import synchronize
from speculant.sampling import SamplingParams

PROMPT = "Write a Python function that merges two sorted lists, and explain how it works."


def profile_steps(engine, steps: int, device: torch.device) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        synchronize(device)
    events = prof.key_averages()
    count = {e.key: e.count for e in events}
    launches = sum(n for key, n in count.items() if key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]

    def device_us(event) -> float:  # torch >= 2.4 names it self_device_time_total
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))

    kernels = sorted((e for e in events if device_us(e) > 0), key=device_us, reverse=True)[:20]
    return {"graph_replays_per_step": count.get("cudaGraphLaunch", 0) / steps,
            "device_ms_per_step": sum(device_us(e) for e in events) / 1000 / steps,
            "top_device_kernels": [{"kernel": e.key[:120], "count_per_step": e.count / steps,
                                    "device_us_per_step": device_us(e) / steps} for e in kernels],
            "kernel_launches_per_step": launches / steps,
            "top_host_ops": [{"op": e.key, "count_per_step": e.count / steps,
                              "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps} for e in top],
            "table": events.table(sort_by="self_cpu_time_total", row_limit=15)}


def main() -> None:
    parser = common.arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--gamma", default="4", help="an integer >= 0 or 'auto'")
    parser.add_argument("--rows", default="1,8", help="rows in the batch, comma-separated")
    parser.add_argument("--graphs", action="store_true", help="captured steps (as `speculant serve` on CUDA)")
    parser.add_argument("--compile", action="store_true", help="with --graphs: the row forwards through torch.compile")
    parser.add_argument("--warm-up", type=int, default=16, help="untimed steps first (captures, compiles)")
    parser.add_argument("--steps", type=int, default=48, help="timed steps")
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    args = parser.parse_args()
    dtype = common.setup(args)
    if args.gamma != "auto" and not args.gamma.isdigit():
        raise SystemExit(f"error: --gamma takes an integer >= 0 or 'auto', got {args.gamma!r}")
    if not all(r.isdigit() and int(r) > 0 for r in args.rows.split(",")):
        raise SystemExit(f"error: --rows takes comma-separated integers >= 1, got {args.rows!r}")
    gamma = args.gamma if args.gamma == "auto" else int(args.gamma)
    device = torch.device(args.device)
    spec = api.load(target=args.target, draft=args.draft, gamma=gamma, device=args.device, dtype=dtype,
                    max_seq_len=args.max_seq_len)
    prompt = spec.encode(PROMPT, chat=True)
    budget = args.warm_up + args.steps + args.profile_steps
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        start = time.perf_counter()
        engine = spec.batch_engine(max_batch=rows, graphs=args.graphs, compile=args.compile)
        for i in range(rows):  # greedy, long enough never to finish during the run (min_new_tokens: no stop)
            engine.add(BatchRequest(prompt, SamplingParams(temperature=0), max_new_tokens=min(args.max_seq_len // 2, 9 * budget),
                                    stop_ids=(), seed=i))
        for _ in range(args.warm_up):
            engine.step()
        synchronize(device)
        warm_up_s = time.perf_counter() - start
        times, tokens = [], 0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            updates = engine.step()
            times.append(time.perf_counter() - t0)  # a step reads its result back: it is synchronised
            tokens += sum(len(u.tokens) for u in updates)
        counters = {kind: dict(values) for kind, values in torch._dynamo.utils.counters.items()
                    if kind in ("stats", "frames", "recompiles")}
        graphs = getattr(getattr(engine, "row_step", None), "graphs", {})
        row = {"rows": rows, "warm_up_s": warm_up_s, "step_ms_mean": 1000 * statistics.mean(times),
               "step_ms_median": 1000 * statistics.median(times), "tokens_per_step": tokens / args.steps,
               "tok_s": tokens / sum(times), "graphs": len(graphs), "dynamo": counters,
               **profile_steps(engine, args.profile_steps, device)}
        results.append(row)
        print(f"\nrows {rows}: {row['step_ms_mean']:.2f} ms/step mean ({row['step_ms_median']:.2f} median), "
              f"{row['tokens_per_step']:.2f} tokens/step, {row['tok_s']:.1f} tok/s, {row['graphs']} graphs, "
              f"warm-up {warm_up_s:.1f} s; per step: {row['graph_replays_per_step']:.1f} graph replays, "
              f"{row['kernel_launches_per_step']:.1f} kernel launches outside graphs; dynamo {counters}")
        print(row.pop("table"), flush=True)
        for kernel in row["top_device_kernels"]:
            print(f"  {kernel['device_us_per_step']:9.1f} us/step  {kernel['count_per_step']:6.1f}x  {kernel['kernel']}")
    summary = {"benchmark": "batch_profile", "device": common.device_name(args.device), "target": args.target,
               "draft": args.draft, "gamma": args.gamma, "dtype": dtype, "graphs": args.graphs, "compile": args.compile,
               "torch": torch.__version__, "rows": results, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    common.write_json(args.out, "batch_profile.json", summary)

if __name__ == "__main__":
    main()
