"""What a phase boundary costs inside one persistent kernel against a kernel boundary inside a CUDA graph (issue
22's moonshot: a layer, or a whole forward, per launch). A chain of N dependent one-row GEMVs, x_{i+1} = W_i x_i
(random bf16 W_i [E, E], float32 sums), three ways:

    graph        N Triton GEMV kernels (one program per BLOCK_N rows), captured in one CUDA graph
    graph+pdl    the same kernels launched with programmatic dependent launch (sm_90: griddepcontrol)
    persistent   ONE kernel of P programs (at most one per SM: all resident at once), each taking the GEMV's row
                 blocks P apart, then a grid barrier (an arrival counter per phase, spun on until all P arrived;
                 the last program out resets the counters for the next replay) before the next phase; its programs
                 poll the counter with atomic adds of 0, or (on a GPU) with ld.acquire loads

and reports µs per phase, whether the three give the same x_N (they must: the same sums in the same order), and
its error against torch's chain.
The probe decides whether a persistent layer kernel could beat the 3–5 µs a kernel costs now.

    python benchmarks/grid_barrier_probe.py --width 576 --phases 64          # SmolLM2's hidden size
    python benchmarks/grid_barrier_probe.py --width 1536 --phases 56 --programs 132,264
    python benchmarks/grid_barrier_probe.py --device cpu --width 64 --phases 3   # a check under the interpreter

Under the interpreter (the CPU) programs run one after another, so the persistent kernel runs with one program
there (a barrier of one passes at once): that checks its arithmetic, not its barrier.
"""

from __future__ import annotations

import os
import sys

import common  # benchmarks/common.py (this script runs from benchmarks/)
import torch


def kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_rows(w_ptr, x_ptr, y_ptr, block, E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[block rows] = W[block rows] · x, float32 sums over K in steps of BLOCK_K."""
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, E, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * E + ks[None, :], mask=(rows[:, None] < E) & (ks[None, :] < E),
                        other=0.0).to(tl.float32)
            x = tl.load(x_ptr + ks, mask=ks < E, other=0.0, cache_modifier=".cg").to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < E)

    globals()["gemv_rows"] = gemv_rows  # a kernel finds the helpers it calls among its module's globals

    @triton.jit
    def phase_kernel(w_ptr, x_ptr, y_ptr, E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr):
        if PDL:
            tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r,~{memory}", [], dtype=tl.int32,
                                      is_pure=False, pack=1)
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)
        gemv_rows(w_ptr, x_ptr, y_ptr, tl.program_id(0), E, BLOCK_N, BLOCK_K)

    @triton.jit
    def persistent_kernel(w_ptr, xs_ptr, counters, PHASES: tl.constexpr, E: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, POLL: tl.constexpr, COUNTERS_PAD: tl.constexpr):
        """xs [PHASES + 1, E]: phase i writes xs[i + 1] = W_i · xs[i]; counters [PHASES + 1] int32, zeros at rest."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        blocks = (E + BLOCK_N - 1) // BLOCK_N
        for i in tl.static_range(PHASES):
            for block in range(pid, blocks, programs):
                gemv_rows(w_ptr + i * E * E, xs_ptr + i * E, xs_ptr + (i + 1) * E, block, E, BLOCK_N, BLOCK_K)
            if i + 1 < PHASES:  # the grid barrier, as cooperative groups' grid.sync: the program's threads meet,
                # arrive (release: the program's stores before it), spin until all have (acquire), meet again
                tl.debug_barrier()
                seen = tl.atomic_add(counters + i, 1, sem="acq_rel") + 1
                while seen < programs:  # POLL "atomic": atomic adds of 0; "load": ld.acquire (no read-modify-write)
                    if POLL == "load":
                        seen = tl.inline_asm_elementwise("ld.acquire.gpu.global.u32 $0, [$1];", "=r,l",
                                                         [counters + i], dtype=tl.int32, is_pure=False, pack=1)
                    else:
                        seen = tl.atomic_add(counters + i, 0, sem="acquire")
                tl.debug_barrier()
        # the last program out resets the counters (every other one has passed every barrier by then)
        if tl.atomic_add(counters + PHASES, 1, sem="acq_rel") == programs - 1:
            every = tl.arange(0, COUNTERS_PAD)  # one vector store, not PHASES + 1 atomics one after another
            tl.store(counters + every, every * 0, mask=every < PHASES + 1)

    return phase_kernel, persistent_kernel


def main() -> None:
    parser = common.arguments(__doc__, device="cuda", out_default="bench-out/grid_barrier")
    parser.add_argument("--width", type=int, default=576, help="E: each W_i is [E, E]")
    parser.add_argument("--phases", type=int, default=64)
    parser.add_argument("--block-n", type=int, default=16)
    parser.add_argument("--block-k", type=int, default=256)
    parser.add_argument("--programs", default="", help="persistent programs (comma-separated; default: the SMs)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    cpu = args.device == "cpu"
    if cpu and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: on the CPU run with TRITON_INTERPRET=1 (the triton interpreter)")
    common.setup(args)
    phase_kernel, persistent_kernel = kernels()
    e, n = args.width, args.phases
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, e, e, generator=gen) / e ** 0.5).to(torch.bfloat16).to(device)
    xs = torch.zeros(n + 1, e, dtype=torch.bfloat16, device=device)
    xs[0] = torch.randn(e, generator=gen).to(torch.bfloat16)
    counters = torch.zeros(n + 1, dtype=torch.int32, device=device)
    blocks = -(-e // args.block_n)
    sms = 1 if cpu else torch.cuda.get_device_properties(device).multi_processor_count
    programs = [int(p) for p in args.programs.split(",") if p] or [sms]
    if cpu:
        programs = [1]
    sizes = {"E": e, "BLOCK_N": args.block_n, "BLOCK_K": args.block_k}

    def chain(pdl: bool):
        def call():
            for i in range(n):
                phase_kernel[(blocks,)](w[i], xs[i], xs[i + 1], PDL=pdl, **sizes,
                                        **({"launch_pdl": True} if pdl else {}))
        return call

    def persistent(p: int, poll: str):
        def call():
            persistent_kernel[(p,)](w, xs, counters, PHASES=n, POLL=poll, COUNTERS_PAD=1 << n.bit_length(), **sizes)
        return call

    ways = {"graph": chain(False)}
    if not cpu and torch.cuda.get_device_capability(device)[0] >= 9:
        ways["graph+pdl"] = chain(True)
    for p in programs:
        ways[f"persistent, {p} programs"] = persistent(p, "atomic")
        if not cpu:
            ways[f"persistent, {p} programs, ld.acquire polls"] = persistent(p, "load")
    truth = xs[0].float()  # torch's chain, rounded to bf16 after each phase as the kernels store it
    for i in range(n):
        truth = (w[i].float() @ truth).to(torch.bfloat16).float()
    results, reference = [], None
    for name, call in ways.items():
        xs[1:].zero_()
        if cpu:
            call()
            ms = None
        else:
            ms, _ = common.graph_replay_ms(call, args.repeats)
        out = xs[n].float().clone()
        if reference is None:
            reference = out
        same = bool(torch.equal(out, reference))
        error = float((out - truth).abs().max() / truth.abs().max())
        results.append({"way": name, "ms": ms, "us_per_phase": None if ms is None else 1000 * ms / n, "same_x": same,
                        "error_vs_torch": error})
        print(results[-1], flush=True)
    text = common.table([(r["way"], "-" if r["ms"] is None else f"{r['ms']:.4f}",
                          "-" if r["us_per_phase"] is None else f"{r['us_per_phase']:.2f}", r["same_x"])
                         for r in results], ("way", "ms", "µs a phase", "same x_N"))
    summary = {"device": common.device_name(args.device), "width": e, "phases": n, "block_n": args.block_n,
               "block_k": args.block_k, "rows": results}
    common.finish(args.out, "grid_barrier_probe.json", summary, text, {"rows": len(results)})
    if not all(r["same_x"] for r in results):
        sys.exit("error: the ways disagree on x_N")
    if any(r["error_vs_torch"] > 0.05 for r in results):
        sys.exit("error: x_N is not torch's (relative error above 0.05)")


if __name__ == "__main__":
    main()
