"""CPU: what one llama.cpp batch of T tokens costs against one token, for a target and its draft.

    .venv/bin/python benchmarks/llamacpp_batch_cost.py          # the Qwen2.5-Coder pair, 1 and 2 threads
    .venv/bin/python benchmarks/llamacpp_batch_cost.py --models smollm2-135m --threads 1 --repeats 9

For each model (an embedded name or a .gguf path, loaded with speculant.models.llamacpp.load_llamacpp)
and each thread count: a context of --context tokens is evaluated once, then for every repeat and
every T in --sizes (interleaved: T 1, T 2, ..., then the next repeat, so that a machine shared with
other work slows every size alike) the last batch is dropped (truncate) and `forward` evaluates T
tokens at the same positions: llama_decode with logits for every position, the logits copied back as
a torch tensor, as a speculative verify step does. The time is the median over --repeats, after
--warmup passes. With 1 thread the process is pinned to one core (os.sched_setaffinity), with more
to the first N cores. --no-repack loads the weights without llama.cpp's repacked CPU layouts
(use_extra_bufts = false: for Q4_K, a batch of T >= 4 then no longer takes another kernel than T 1).
A batch is one llama_decode of T tokens (the model loaded with exact_batch 512, not probed); --exact
measures what speculant's verify step pays instead: `forward` in calls of at most the probed
exact_batch tokens (speculant.models.llamacpp: the width whose logits are one-token decoding's bits).

Reported: ms per batch, its cost relative to T 1, the cost per token relative to T 1, and c = the
second model's T 1 time over the first's (the draft/target cost ratio, when the list is target, draft).
Prints a table, then one JSON line; writes it to --out/llamacpp_batch_cost.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common
import torch

from speculant.models.llamacpp import MAX_BATCH, llama_cpp_available, load_llamacpp

TEXT = (Path(__file__).resolve().parent / "prompts" / "heldout_code.jsonl")


def context_ids(tokenizer, count: int) -> list[int]:
    """`count` token ids of real text (held-out code, repeated if short)."""
    text = TEXT.read_text()
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def measure(spec: str, threads: int, sizes: list[int], context: int, repeats: int, warmup: int,
            repack: bool = True, exact: bool = False) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    saved = set(cores)
    os.sched_setaffinity(0, set(cores[:threads]))  # llama.cpp's workers start from this thread: they inherit it
    try:
        loaded = load_llamacpp(spec, max_seq_len=context + max(sizes) + 8, threads=threads, progress=False,
                               repack=repack, exact_batch=None if exact else MAX_BATCH)
        model = loaded.model
        ids = context_ids(loaded.tokenizer, context + max(sizes))
        model.forward(torch.tensor(ids[:context]), 0)
        times: dict[int, list[float]] = {t: [] for t in sizes}
        for repeat in range(warmup + repeats):
            for t in sizes:
                model.truncate(context)
                batch = torch.tensor(ids[context:context + t])
                start = time.perf_counter()
                logits = model.forward(batch, context)
                seconds = time.perf_counter() - start
                assert logits.shape[0] == t
                if repeat >= warmup:
                    times[t].append(seconds)
        model.close()
    finally:
        os.sched_setaffinity(0, saved)
    median = {t: statistics.median(v) for t, v in times.items()}
    one = median[sizes[0]] if sizes[0] == 1 else None
    rows = []
    for t in sizes:
        rel = median[t] / one if one else None
        rows.append({"T": t, "ms": round(1000 * median[t], 2),
                     "ms_min": round(1000 * min(times[t]), 2),
                     "vs_T1": round(rel, 3) if rel else None,
                     "per_token_vs_T1": round(rel / t, 3) if rel else None})
    return {"model": spec, "threads": threads, "context": context, "repeats": repeats,
            "exact_batch": model.exact_batch,
            "weight_bytes": loaded.weight_bytes, "num_params": loaded.num_params,
            "load_at_end": round(os.getloadavg()[0], 2), "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"],
                        help="embedded names or .gguf paths (target first, then its draft)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 5, 9, 17], help="batch sizes T")
    parser.add_argument("--context", type=int, default=200, help="tokens already in the cache")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-repack", action="store_true",
                        help="use_extra_bufts = false (no repacked weight layouts), for every model")
    parser.add_argument("--exact", action="store_true",
                        help="forward in calls of at most the probed exact_batch tokens, as speculant verifies")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the JSON summary")
    args = parser.parse_args()
    if not llama_cpp_available():
        print("llama-cpp-python is not installed: bash scripts/setup.sh --llama-cpp", file=sys.stderr)
        return 2
    available = len(os.sched_getaffinity(0))
    if max(args.threads) > available:
        raise SystemExit(f"error: --threads {max(args.threads)} but only {available} cores are usable")
    load_before = round(os.getloadavg()[0], 2)
    results = []
    for threads in args.threads:
        for spec in args.models:
            results.append(measure(spec, threads, sorted(args.sizes), args.context, args.repeats, args.warmup,
                                   repack=not args.no_repack, exact=args.exact))
            r = results[-1]
            print(f"{spec} threads {threads}: " + ", ".join(f"T{x['T']} {x['ms']} ms" for x in r["rows"])
                  + f" (load {r['load_at_end']})", file=sys.stderr, flush=True)
    ratios = {}
    if len(args.models) >= 2:
        for threads in args.threads:
            by = {r["model"]: r for r in results if r["threads"] == threads}
            t1 = [by[m]["rows"][0]["ms"] for m in args.models[:2]]
            ratios[str(threads)] = round(t1[1] / t1[0], 3)
    lines = [f"{'model':<22} {'thr':>3} {'T':>3} {'ms':>9} {'vs T1':>7} {'/token':>7}"]
    for r in results:
        for x in r["rows"]:
            lines.append(f"{r['model']:<22} {r['threads']:>3} {x['T']:>3} {x['ms']:>9.2f} "
                         f"{x['vs_T1'] or 0:>7.2f} {x['per_token_vs_T1'] or 0:>7.3f}")
    for threads, c in ratios.items():
        lines.append(f"c ({args.models[1]} / {args.models[0]} at T 1, {threads} thread(s)): {c}")
    import llama_cpp

    summary = {"benchmark": "llamacpp_batch_cost", "cpu_count": available, "repack": not args.no_repack,
               "exact": args.exact, "llama_cpp": getattr(llama_cpp, "__version__", "?"),
               "system_info": " ".join(llama_cpp.llama_print_system_info().decode(errors="replace").split()),
               "load_before": load_before,
               "load_after": round(os.getloadavg()[0], 2), "context": args.context, "repeats": args.repeats,
               "warmup": args.warmup, "cost_ratio_c": ratios, "results": results}
    common.finish(args.out, "llamacpp_batch_cost.json", summary, "\n".join(lines), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
