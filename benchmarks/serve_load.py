"""Load test of `speculant serve`: throughput and per-request latency at several concurrencies,
speculative vs our own plain batching (the same server with --draft none).

For each server configuration the script starts `speculant serve` on a free local port, warms it
up, then for each concurrency C runs C client loops at once, each sending streaming chat requests
(the real `openai` client) one after the other until the round's requests are used up. The clients
are spread over several processes (--client-processes): one event loop parsing the chunks of 64
streams was the load generator's limit, not the server's. Reported per
(server, C): output tok/s summed over requests (completion tokens / wall time of the round),
requests/s, per-request latency p50 / p95 and time to first token p50 / p95.

The single-request reference (skipped with --no-single): before any server starts, each server spec
(and plain, `none`) runs the concurrency-1 round's prompts one at a time through the library's
single-request path (speculant.load(...).generate, the fused step on CUDA), with the server's
settings: the same target, drafter and γ, the same chat template, max_tokens, temperature and seed
0. An untimed pass first (graph captures, compiles, a γ auto calibration), then a timed one. Reported
per spec: its tok/s, its speed-up over single-request plain, the server's speed-up over the plain
server at concurrency 1, and their ratio, `c1_speedup_kept` (the goal: >= 0.90, the single-request
speed-up kept at concurrency 1).

    .venv/bin/python benchmarks/serve_load.py --device cpu --max-tokens 32 --concurrency 1,4     # CPU, small
    python benchmarks/serve_load.py --device cuda --dtype bfloat16 --servers default@4,default@auto,none  # GPU

Prints a table (and the single-request one), then one JSON line; writes $OUT/serve_load.json
(OUT defaults to ./out). The server's row forwards are compiled as `speculant serve` does by default
(on CUDA; --no-compile / --compile to choose).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's speculant, for the single-request reference and the servers

PROMPTS = [
    "Explain what a hash table is.", "Write a haiku about the sea.", "What is the capital of France, and why?",
    "Give three tips for learning to code.", "Summarise the plot of Romeo and Juliet.",
    "How does a bicycle stay upright?", "Write a Python function that reverses a string.",
    "What causes the seasons on Earth?", "Describe a cat to someone who has never seen one.",
    "List five fruits and their colours.", "Why is the sky blue?", "What is recursion? Give an example.",
    "Write a short story about a robot who learns to paint.", "How do vaccines work?",
    "Compare Python lists and tuples.", "What is the difference between weather and climate?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, server: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start `speculant serve` for a server spec DRAFT[@GAMMA][+FLAG...] (gamma: --gamma unless given;
    each +FLAG adds --FLAG to the command, e.g. default@auto+no-solo)."""
    base, *flags = server.split("+")
    draft, _, gamma = base.partition("@")
    port = free_port()
    command = [sys.executable, "-c", "import sys; from speculant.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--target", args.target, "--draft", draft, "--gamma", gamma or args.gamma,
               "--device", args.device,
               "--dtype", args.dtype, "--max-seq-len", str(args.max_seq_len), "--port", str(port),
               "--max-batch", str(max(args.concurrency)), "--max-waiting", "1024",
               "--compile" if args.compile else "--no-compile"] + [f"--{flag}" for flag in flags]
    log = open(log_path, "w")  # noqa: SIM115  (the server writes to it until it is stopped)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + args.start_timeout  # the server warms up (compiles, graphs) before /health
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server ({server}) exited; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server ({server}) did not start; see {log_path}")


def engine_metrics(url: str) -> dict:
    """The server's engine metrics now: steps and their summed seconds (engine_step_seconds), CUDA
    graphs captured and compile fallbacks so far."""
    import httpx

    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("engine_step_seconds_count", "engine_step_seconds_sum", "engine_cuda_graphs_captured",
                    "engine_compile_fallbacks", "engine_warm_up_seconds"):
            values[name] = float(value)
    return values


async def one_request(client, model: str, prompt: str, args) -> dict:
    start = time.perf_counter()
    first = None
    usage = speculative = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
        temperature=args.temperature, seed=0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage, speculative = chunk.usage, (chunk.model_extra or {}).get("speculative")
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": usage.completion_tokens,
            "speculative": speculative}


async def client_loops(url: str, model: str, concurrency: int, prompts: list[str], options: dict) -> list[dict]:
    """`concurrency` streaming clients at once in this process, each sending the next of `prompts` when
    its last request ends; the per-request results."""
    import openai

    args = argparse.Namespace(**options)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    queue = list(reversed(prompts))
    results: list[dict] = []

    async def worker():
        while queue:
            results.append(await one_request(client, model, queue.pop(), args))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return results


def client_ready() -> bool:
    import openai  # noqa: F401  (a load generator's imports, done before any round is timed)

    return True


def client_process(url: str, model: str, concurrency: int, prompts: list[str], options: dict) -> tuple:
    """One load-generating process's share of a round: (start, end, results), the times by the wall
    clock that every process shares."""
    start = time.time()
    results = asyncio.run(client_loops(url, model, concurrency, prompts, options))
    return start, time.time(), results


def round_at(url: str, model: str, concurrency: int, num_requests: int, args, pool) -> dict:
    """A round: `num_requests` chat requests (PROMPTS in turn) from `concurrency` clients, spread over
    the pool's processes (one process's event loop parsing every stream's chunks would be the load
    generator's limit, not the server's), each process given its clients' share of the requests."""
    processes = min(concurrency, args.client_processes)
    clients = [concurrency // processes + (w < concurrency % processes) for w in range(processes)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_requests)]
    shares, first = [], 0
    for w, count in enumerate(clients):
        last = num_requests if w == processes - 1 else first + round(num_requests * count / concurrency)
        shares.append(prompts[first:last])
        first = last
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    futures = [pool.submit(client_process, url, model, count, share, options)
               for count, share in zip(clients, shares) if share]
    parts = [future.result() for future in futures]
    wall = max(end for _, end, _ in parts) - min(start for start, _, _ in parts)
    results = [r for _, _, part in parts for r in part]
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    drafted = sum((r["speculative"] or {}).get("drafted", 0) for r in results)
    accepted = sum((r["speculative"] or {}).get("accepted", 0) for r in results)
    calls = sum((r["speculative"] or {}).get("target_calls", 0) for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_per_s": tokens / wall, "req_per_s": len(results) / wall, "client_processes": len(parts),
            "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "accepted_per_drafted": accepted / drafted if drafted else 0.0, "tau": tokens / calls if calls else 0.0}


def round_size(concurrency: int, args) -> int:
    """Requests in the timed round at this concurrency; round_at sends PROMPTS[i % len] for i below it."""
    return max(concurrency * args.requests_per_client, args.min_requests)


PAIR_FLAGS = ("candidates", "lookup")  # +FLAG=N that change what a request runs (the reference's too)


def parse_server(server: str, args) -> tuple[str, int | str, dict[str, int]]:
    """(draft, gamma, pair options) of a server spec DRAFT[@GAMMA][+FLAG...], gamma parsed as `speculant
    serve --gamma` does; +candidates=K and +lookup=G are options of the pair (speculant.load's), other
    flags change only how the server runs it (one single-request reference for them all)."""
    from speculant.adaptive import parse_gamma

    base, *flags = server.split("+")
    draft, _, gamma = base.partition("@")
    options = {}
    for flag in flags:
        name, _, value = flag.partition("=")
        if name in PAIR_FLAGS:
            if not value.isdigit():
                raise ValueError(f"+{name} takes =N (an integer), got {flag!r}")
            options[name] = int(value)
    return draft, parse_gamma(gamma or args.gamma), options


def single_request(args, servers: list[str]) -> dict[str, dict]:
    """Per server spec (plain `none` added if absent): the concurrency-1 round's prompts one at a time
    through speculant.load(...).generate with the server's settings; an untimed pass, then a timed
    one. The model is freed before the next spec (and before any server starts)."""
    import gc

    import torch

    import speculant

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(round_size(1, args))]
    specs = list(dict.fromkeys(servers))
    if not any(s.partition("@")[0] == "none" for s in specs):
        specs.append("none")
    results, done = {}, {}
    for server in specs:
        draft, gamma, options = parse_server(server, args)
        pair = (draft, gamma, tuple(sorted(options.items())))
        if pair in done:  # the same pair, served with other flags
            results[server] = dict(results[done[pair]])
            continue
        done[pair] = server
        # what `speculant serve --target T --draft D --gamma G --device --dtype --max-seq-len` loads: its
        # single-request engine compiles one layer where the server compiles its rows (--compile)
        spec = speculant.load(target=args.target, draft=draft, gamma=gamma, device=args.device, dtype=args.dtype,
                              max_seq_len=args.max_seq_len, compile="layers" if args.compile else None, **options)
        single_pass(spec, prompts, args)  # untimed: graph captures, compiles, a gamma auto calibration
        results[server] = {"draft": spec.draft_specs, "gamma": spec.gamma, **single_pass(spec, prompts, args)}
        row = results[server]
        print(f"{server:>14} single request  {row['tok_per_s']:8.1f} tok/s  tau {row['tau']:.2f}  "
              f"({row['requests']} requests, {row['tokens']} tokens, {row['wall_s']:.2f} s)", file=sys.stderr,
              flush=True)
        del spec
        gc.collect()
        torch.compiler.reset()  # the next load's forwards compile afresh, not against this one's caches
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def single_pass(spec, prompts: list[str], args) -> dict:
    """The prompts one after the other through spec.generate, each as the server renders a chat
    request (one user message through the chat template) with the load test's options and seed 0."""
    import torch

    tokens = calls = 0
    start = time.perf_counter()
    for prompt in prompts:
        out = spec.generate(messages=[{"role": "user", "content": prompt}], max_new_tokens=args.max_tokens,
                            temperature=args.temperature, seed=0)
        tokens += len(out.token_ids)  # what the server counts as completion_tokens
        calls += out.stats["target_calls"]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "tau": tokens / calls if calls else 0.0}


def compare_single(single: dict[str, dict], rows: list[dict]) -> dict[str, float | None]:
    """Adds to each single-request entry its speed-up over single-request plain, the server's speed-up
    over the plain server at concurrency 1 (None without a C=1 row) and their ratio, c1_speedup_kept;
    returns the ratios of the speculative specs."""
    plain = next(v for s, v in single.items() if s.partition("@")[0] == "none")
    server_c1 = {r["server"]: r for r in rows if r["concurrency"] == 1}
    kept = {}
    for server, entry in single.items():
        entry["speedup"] = entry["tok_per_s"] / plain["tok_per_s"]
        ratio = server_c1[server]["vs_plain"] if server in server_c1 else None
        entry["server_c1_tok_per_s"] = server_c1[server]["tok_per_s"] if server in server_c1 else None
        entry["server_c1_speedup"] = ratio
        entry["c1_speedup_kept"] = ratio / entry["speedup"] if ratio is not None else None
        if server.partition("@")[0] != "none":
            kept[server] = entry["c1_speedup_kept"]
    return kept


def percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--servers", default="default,none",
                        help="comma-separated servers to run, each DRAFT[@GAMMA] (e.g. default@auto,none)")
    parser.add_argument("--gamma", default="4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests in a round: this many per client, at least --min-requests")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="serve --compile / --no-compile: the row forwards through torch.compile (default: as "
                             "the server's, on for CUDA, off for the CPU)")
    parser.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                        help="first the single-request reference: each server's pair, the C=1 prompts one at a "
                             "time through speculant.load(...).generate (--no-single: skip it)")
    parser.add_argument("--client-processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="processes the clients of a round are spread over (default: half the cores, at most 8)")
    parser.add_argument("--start-timeout", type=float, default=1800,
                        help="seconds to wait for a server's /health (it warms up first: compiles, graphs)")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.client_processes < 1:
        parser.error(f"--client-processes must be at least 1, got {args.client_processes}")
    if args.compile is None:  # as `speculant serve` decides by default: where its steps are CUDA graphs
        args.compile = args.device.startswith("cuda")
    servers = args.servers.split(",")
    for server in servers:
        try:
            parse_server(server, args)
        except ValueError as error:
            parser.error(f"--servers {server}: {error}")
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)

    # before any server: the GPU (and the CPU's cores) are this process's alone
    single = single_request(args, servers) if args.single else {}

    rows = []
    # the load generators: processes started (and their imports done) before any round is timed
    pool = ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn"))
    for future in [pool.submit(client_ready) for _ in range(args.client_processes)]:
        future.result()
    for server in servers:
        process, url = start_server(args, server, out / f"serve_load-{re.sub(r'[^A-Za-z0-9._-]', '_', server.replace('@', '-at-'))}.log")
        try:
            round_at(url, args.target, 1, 2, args, pool)  # warm-up: first-call costs, allocations
            for concurrency in args.concurrency:
                num_requests = round_size(concurrency, args)
                # untimed, at this concurrency: graphs of its batch buckets are captured on first use
                round_at(url, args.target, concurrency, concurrency, args, pool)
                before = engine_metrics(url)
                row = {"server": server, **round_at(url, args.target, concurrency, num_requests, args, pool)}
                after = engine_metrics(url)
                steps = after["engine_step_seconds_count"] - before["engine_step_seconds_count"]
                row.update(steps=int(steps), mean_step_s=(after["engine_step_seconds_sum"]
                                                          - before["engine_step_seconds_sum"]) / max(steps, 1),
                           graphs_captured=int(after["engine_cuda_graphs_captured"]),
                           compile_fallbacks=int(after["engine_compile_fallbacks"]),
                           warm_up_s=after["engine_warm_up_seconds"])
                rows.append(row)
                (out / "serve_load_partial.json").write_text(json.dumps(rows, indent=1))  # what a stopped run keeps
                print(f"{server:>14} C={concurrency:<3} {row['tok_per_s']:8.1f} tok/s  "
                      f"latency p50 {row['latency_p50_s']:.2f}s p95 {row['latency_p95_s']:.2f}s  "
                      f"ttft p50 {row['ttft_p50_s']:.3f}s  tau {row['tau']:.2f}  step {1e3 * row['mean_step_s']:.1f} ms  "
                      f"graphs {row['graphs_captured']}", file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)

    pool.shutdown()
    header = (f"{'server':>14} {'C':>3} {'requests':>8} {'tok/s':>9} {'req/s':>7} {'lat p50':>8} {'lat p95':>8} "
              f"{'ttft p50':>9} {'ttft p95':>9} {'tau':>5} {'vs plain':>8}")
    print(header)
    plain = {r["concurrency"]: r["tok_per_s"] for r in rows if r["server"].partition("@")[0] == "none"}
    for r in rows:
        ratio = r["tok_per_s"] / plain[r["concurrency"]] if r["concurrency"] in plain else None
        r["vs_plain"] = ratio  # None: no plain server in this run
        print(f"{r['server']:>14} {r['concurrency']:>3} {r['requests']:>8} {r['tok_per_s']:>9.1f} "
              f"{r['req_per_s']:>7.2f} "
              f"{r['latency_p50_s']:>8.2f} {r['latency_p95_s']:>8.2f} {r['ttft_p50_s']:>9.3f} {r['ttft_p95_s']:>9.3f} "
              f"{r['tau']:>5.2f} {'-' if ratio is None else f'{ratio:.2f}':>8}")
    kept = compare_single(single, rows) if single else {}
    if single:
        print("\nsingle request (speculant.load(...).generate, one at a time, C=1 prompts) vs the server at C=1; "
              "kept = server C=1 speed-up / single-request speed-up (goal >= 0.90)")
        print(f"{'server':>14} {'single tok/s':>12} {'tau':>5} {'speed-up':>8} {'server C=1':>10} {'speed-up':>8} "
              f"{'kept':>6}")
        def number(value, form):
            return "-" if value is None else format(value, form)
        for server, entry in single.items():
            print(f"{server:>14} {entry['tok_per_s']:>12.1f} {entry['tau']:>5.2f} {entry['speedup']:>8.2f} "
                  f"{number(entry['server_c1_tok_per_s'], '.1f'):>10} {number(entry['server_c1_speedup'], '.2f'):>8} "
                  f"{number(entry['c1_speedup_kept'], '.2f'):>6}")
    import torch

    result = {"benchmark": "serve_load", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "target": args.target, "gamma": args.gamma, "device": args.device, "dtype": args.dtype,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "max_tokens": args.max_tokens, "temperature": args.temperature, "compile": args.compile,
              "rows": rows, "single_request": single, "c1_speedup_kept": kept}
    (out / "serve_load.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
