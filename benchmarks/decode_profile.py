"""Where decoding's time goes end to end on the GPU (issue 22), through the public API on held-out prompts: per
generated token, the wall time of the decode (the API's stats), and from a profile of one more generation the
GPU's busy time (the union of its kernels' intervals: what a token costs on the card, the gaps between kernels and
the host's time between graph replays left out), the kernels launched and the kernels that take the most time.

Rows: plain decoding at several chunk lengths (FusedStepper.plain_chunk: tokens per graph replay, each fed back on
the device), then, with --draft, speculative decoding at each γ of --gammas with --candidates and --lookup.

    python benchmarks/decode_profile.py --target /root/w/smollm2.gguf --chunks 1,4,16 --out $OUT
    python benchmarks/decode_profile.py --target /root/w/smollm2.gguf --chunks 4 \
        --draft speculant/embedded/smollm2-135m-draft --gammas 3,4 --candidates 4 --lookup 8
    python benchmarks/decode_profile.py --target /root/w/qwen-1.5b.gguf --kernels triton,triton+exact

Prompts: the held-out tasks as gpu_speed.py builds them (common.heldout_code_texts raw at T 0, heldout_chat_texts
through the chat template at T 1), never tuned on.
"""

from __future__ import annotations

import time
from collections import defaultdict

import common  # benchmarks/common.py (this script runs from benchmarks/)
import torch
from gpu_speed import heldout_chat_prompts, heldout_code_prompts, run_ours

import speculant
from speculant.api import Speculant

KERNEL_SETS = ("torch", "triton", "triton+exact")


def gpu_time(prof) -> tuple[float, float, int, dict[str, float]]:
    """(busy ms, span ms, kernels, µs by kernel name) of a profile's CUDA kernels: the union of their intervals,
    the time from the first one's start to the last one's end, how many ran, and each name's total."""
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    if not spans:
        return 0.0, 0.0, 0, {}
    busy, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > hi:
            busy += hi - lo
            lo, hi = start, end
        else:
            hi = max(hi, end)
    busy += hi - lo
    by_name: dict[str, float] = defaultdict(float)
    for e in events:
        by_name[e.name[:60]] += e.time_range.end - e.time_range.start
    return busy / 1000, (max(e for _, e in spans) - spans[0][0]) / 1000, len(spans), dict(by_name)


def run(spec: Speculant, prompts: list[list[int]], temperature: float, max_new: int) -> dict:
    """gpu_speed.run_ours' totals (each prompt once, seed = its index), with the decode's ms per token."""
    res = run_ours(spec, prompts, temperature=temperature, max_new=max_new)
    ms = res["decode_ms_per_call"] / res["tau"]
    return {"tokens_per_s": res["tokens_per_s"], "decode_ms_per_token": ms, "decode_tokens_per_s": 1000 / ms,
            "tau": res["tau"], "new_tokens": res["new_tokens"]}


def profile_one(spec: Speculant, prompt: list[int], temperature: float, max_new: int, top: int) -> dict:
    """One generation under torch.profiler, per generated token (the prefill's share is counted in): wall ms,
    the GPU's busy ms, its kernels, and the `top` kernels by time (µs a token)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        stats = spec.generate(prompt, max_new_tokens=max_new, temperature=temperature, seed=0).stats
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    busy, span, kernels, by_name = gpu_time(prof)
    n = stats["new_tokens"]
    largest = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return {"profiled_wall_ms_per_token": 1000 * wall / n, "gpu_busy_ms_per_token": busy / n,
            "gpu_span_ms_per_token": span / n, "kernels_per_token": kernels / n,
            "gpu_idle_share": 1 - busy / span if span else None,
            "top_kernels_us_per_token": {name: round(us / n, 2) for name, us in largest}}


def csv_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated integers, got {text!r}") from None


def main() -> None:
    parser = common.arguments(__doc__, device="cuda", out_default="bench-out/decode_profile")
    parser.add_argument("--target", required=True, help="an embedded name, a GGUF file or an HF folder")
    parser.add_argument("--kernels", default="triton", help=f"comma-separated from {', '.join(KERNEL_SETS)}")
    parser.add_argument("--chunks", default="1,4,16", help="plain rows: chunk lengths (tokens per graph replay)")
    parser.add_argument("--draft", default=None, help="speculative rows with this draft (a drafter spec or folder)")
    parser.add_argument("--gammas", default="4", help="the speculative rows' γ")
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--lookup", type=int, default=0)
    parser.add_argument("--tasks", default="code-heldout,chat-heldout")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--top", type=int, default=8, help="kernels listed per row, the most time first")
    args = parser.parse_args()
    dtype = common.setup(args)
    kernel_sets = args.kernels.split(",")
    if any(k not in KERNEL_SETS for k in kernel_sets):
        raise SystemExit(f"error: --kernels takes some of {', '.join(KERNEL_SETS)}, got {args.kernels!r}")
    chunks, gammas = csv_ints(args.chunks, "--chunks"), csv_ints(args.gammas, "--gammas")
    base = speculant.load(args.target, draft="none", device=args.device, dtype=dtype, max_seq_len=args.max_seq_len)
    makers = {"code-heldout": (lambda n: heldout_code_prompts(n, base), 0.0),
              "chat-heldout": (lambda n: heldout_chat_prompts(n, base), 1.0)}
    tasks = {}
    for name in args.tasks.split(","):
        if name not in makers:
            raise SystemExit(f"error: --tasks: unknown {name!r}; choose from {', '.join(makers)}")
        tasks[name] = (makers[name][0](args.prompts), makers[name][1])
    configs = [("plain", 0, chunk) for chunk in chunks] + [(args.draft, gamma, None) for gamma in gammas if args.draft]
    rows = []
    for kernel_set in kernel_sets:
        made: dict[tuple, Speculant] = {}
        for task, (prompts, temperature) in tasks.items():
            for draft, gamma, chunk in configs:
                key = (draft, gamma)
                if key not in made:
                    made[key] = Speculant(base.target, ["none" if draft == "plain" else draft], gamma=gamma or 4,
                                          candidates=1 if draft == "plain" else args.candidates,
                                          lookup=0 if draft == "plain" else args.lookup,
                                          kernels=kernel_set.split("+")[0], bit_exact=kernel_set.endswith("+exact"),
                                          fused=True)
                spec = made[key]
                if chunk is not None:
                    for stepper in {id(s): s for s in (spec.stepper, spec.plain_stepper) if s is not None}.values():
                        stepper.plain_chunk = chunk
                begin = time.perf_counter()
                run(spec, prompts[:1], temperature, args.max_new_tokens)  # captures this row's graphs
                warm = time.perf_counter() - begin
                row = {"kernels": kernel_set, "task": task, "draft": draft, "gamma": gamma, "chunk": chunk,
                       "candidates": 1 if draft == "plain" else args.candidates,
                       "lookup": 0 if draft == "plain" else args.lookup, "warm_up_s": warm,
                       **run(spec, prompts, temperature, args.max_new_tokens)}
                if args.device.startswith("cuda"):  # the CPU rows (a check of this script) have no profile
                    row.update(profile_one(spec, prompts[0], temperature, args.max_new_tokens, args.top))
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                common.write_json(args.out, "decode_profile_partial.json", rows)
    header = ("kernels", "task", "row", "tok/s (decode)", "ms/token", "τ", "GPU busy ms/token", "idle share",
              "kernels/token")
    def name(r: dict) -> str:
        if r["draft"] == "plain":
            return f"plain, {r['chunk']} a replay"
        return f"γ {r['gamma']} K {r['candidates']} lookup {r['lookup']}"

    text = common.table([(r["kernels"], r["task"], name(r), f"{r['decode_tokens_per_s']:.1f}",
                          f"{r['decode_ms_per_token']:.3f}", f"{r['tau']:.2f}",
                          *(f"{r[key]:{form}}" if r.get(key) is not None else "-"
                            for key, form in (("gpu_busy_ms_per_token", ".3f"), ("gpu_idle_share", ".2f"),
                                              ("kernels_per_token", ".0f")))) for r in rows], header)
    summary = {"device": common.device_name(args.device), "torch": torch.__version__, "target": args.target,
               "draft": args.draft, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rows": rows}
    common.finish(args.out, "decode_profile.json", summary, text, {"rows": len(rows)})


if __name__ == "__main__":
    main()
