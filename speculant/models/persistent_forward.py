"""A one-row forward in ONE kernel launch (issue 22's moonshot): plain decoding's steps and a token draft model's
steps, the calls of one row outside bit-exact mode, run the whole layer stack and the output head as phases of
one persistent Triton kernel, where triton_layers runs 6 kernels a layer (SmolLM2-135M: 182 a forward, each
~3-5 µs on an H100, mostly a launch's and a ramp's fixed cost: its 0.27 GB of weights stream in ~80 µs).

The kernel's P programs (PROGRAMS_PER_SM per SM, fewer where the compiled kernel's registers, threads or shared
memory would not let that many be resident at once: _resident_programs) share each phase's work out in
units, unit u to program u mod P, and meet at a grid barrier between phases (an arrival counter per barrier,
spun on until all P have arrived; a phase reads what the one before it wrote, past L1). Per layer:

    1  RMSNorm -> q|k|v GEMV (+ bias), a unit = a block of ROPE_COLUMNS columns of both halves of one head
       (so that rotary is element-wise) -> rotary on q and k -> q into scratch, k and v into the cache
    2  attention, a unit = (KV head, chunk of CHUNK keys): an online softmax in float32 over the chunk's keys
       <= the position for the head's G queries -> partial max, sum, accumulator; the head's last unit to
       finish (a ticket) merges its chunks in order
    3  attention output · o_projᵀ + residual, a unit = BLOCK_N rows
    4  RMSNorm -> gate|up GEMV -> silu(gate)·up, a unit = BLOCK_N columns of both
    5  · down_projᵀ + residual, a unit = DOWN_BLOCK_N rows

then the final RMSNorm and the head GEMV (HEAD_BLOCK_N rows a unit) into float32 logits. 5 barriers a layer;
the first layer reads the token's embedding row in place of the residual stream. The last program out zeroes
the counters for the next launch (every other program has passed every barrier by then).

The arithmetic is triton_layers' GEMV path's (use_gemv): float32 sums of each row's products with the
normed activations rounded to the model's dtype, the RMSNorm's scale applied after the sum, q|k|v rounded to
the dtype before rotary, float32 softmax with probabilities rounded to the dtype before they weight the
values, every GEMV's output rounded to the dtype (the head's: float32). The sums run in another order than
the separate kernels', so the two agree to float32 rounding (bf16: a few ulps), not bit for bit; like the
GEMV path this is not bit-exact mode's arithmetic (which keeps its own kernels).

Off by default (PERSISTENT; TritonForward then runs the GEMV kernels): on an H100 SmolLM2-135M's forward (random
weights, 512 tokens of context, from a CUDA graph) took 1.305 ms this way against the GEMV kernels' 0.763 with
PDL, and a grid barrier between two one-row GEMVs cost more than a kernel boundary under PDL (3.72 against 2.85
µs a phase at 576 wide; benchmarks/grid_barrier_probe.py, benchmarks/persistent_probe.py, results in
benchmarks/results/gpu-2026-12-07o/). The settings below are there for the next measurements: POLL "load",
PREFETCH (before each barrier a later phase's weights into L2, as megakernels hide a phase's first loads),
BLOCK_K wide enough that a unit's loads of K are in flight at once.

A barrier that waits past `spin_limit` polls (programs not all resident: another kernel holding SMs) gives up,
sets the status word, and its program waits at no later barrier, so the forward finishes, with wrong numbers,
rather than hang the GPU: `check()` raises then. Under triton's interpreter (the CPU tests) programs run one after another, so P is 1 there and every
barrier passes at once: that checks the arithmetic and the phases' work split, not the barrier.

Shapes: E hidden, H query heads, KV key/value heads, G = H / KV, D head_dim (HALF = D / 2), F intermediate,
V vocabulary, L layers.
"""

from __future__ import annotations

import torch

PERSISTENT = False  # TritonForward runs one-row forwards here where unsupported() allows (slower: see above)
PROGRAMS_PER_SM = 1
WARPS = 8
BLOCK_K = 256  # the K of a GEMV's weight tile
BLOCK_N = 16  # rows a unit of o_proj and of gate|up (each) computes
DOWN_BLOCK_N = 8
HEAD_BLOCK_N = 32
ROPE_COLUMNS = 8  # columns of each half of a head a q|k|v unit computes
CHUNK = 64  # keys an attention unit reads
BLOCK_J = 16  # keys an attention unit scores at a time
SPIN_LIMIT = 1 << 16  # polls of a barrier's counter before it gives up (see the docstring)
POLL = "atomic"  # how a barrier polls its counter: "atomic" or "load" (ld.acquire; see _grid_barrier)
PREFETCH = 0  # 1: before each barrier, a later phase's weights into L2 (_prefetch_share; on a GPU only)
PHASES = 5  # barriers a layer

_KERNELS: dict = {}
_TABLE = ("qkv", "qkv_bias", "norm1", "o", "norm2", "gate_up", "down")  # a layer's row of the pointer table


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rope_columns(head_dim: int) -> int:
    """Columns of each half of a head a q|k|v unit computes: ROPE_COLUMNS, or the half if it is narrower."""
    return min(ROPE_COLUMNS, _pow2(head_dim // 2))


def _inline_asm(device: torch.device) -> bool:
    """Whether the kernel may use inline PTX on this device (POLL "load", PREFETCH): on a GPU, not under the
    interpreter."""
    return device.type == "cuda"


def _kernel():
    """The kernel, defined on first use (triton is imported only then)."""
    if _KERNELS:
        return _KERNELS["forward"]
    import triton
    import triton.language as tl

    @triton.jit
    def _grid_barrier(counter_ptr, programs, status_ptr, spin_limit, POLL: tl.constexpr):
        """Every program waits here until all `programs` have arrived at this counter: arrival releases the
        program's stores before it, the poll that sees the last arrival acquires everyone's (as cooperative
        groups' grid.sync). POLL "atomic" polls with atomic adds of 0, "load" with ld.acquire loads (no
        read-modify-write on the one address all programs poll; sm_70 and later, not under the interpreter).
        Gives up after spin_limit polls, setting status to 1, and returns the limit for the program's next
        barriers: 0 once one gave up (so that a forward whose programs are not all resident ends after one
        wait, not one per barrier)."""
        tl.debug_barrier()
        seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel") + 1
        spins = 0
        while (seen < programs) & (spins < spin_limit):
            if POLL == "load":
                seen = tl.inline_asm_elementwise("ld.acquire.gpu.global.u32 $0, [$1];", "=r,l", [counter_ptr],
                                                 dtype=tl.int32, is_pure=False, pack=1)
            else:
                seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
            spins += 1
        if seen < programs:
            tl.atomic_xchg(status_ptr, 1)
            spin_limit = 0
        tl.debug_barrier()
        return spin_limit

    @triton.jit
    def _pointer(table_ptr, layer, index: tl.constexpr, like):
        """The address in the pointer table's row `layer`, column `index`, as a pointer of like's type."""
        return tl.load(table_ptr + layer * 7 + index).to(tl.pointer_type(like.dtype.element_ty))

    @triton.jit
    def _rstd(x_ptr, sx, eps, E: tl.constexpr, E_PAD: tl.constexpr):
        """1 / sqrt(mean x² + eps) of the row x [E] (stride sx; read past L1: other programs wrote it)."""
        es = tl.arange(0, E_PAD)
        x = tl.load(x_ptr + es * sx, mask=es < E, other=0.0, cache_modifier=".cg").to(tl.float32)
        return tl.rsqrt(tl.sum(x * x, axis=0) / E + eps)

    @triton.jit
    def _gemv(w_ptr, sw_n, sw_k, cols, cols_ok, second, x_ptr, sx, g_ptr, K, NORM: tl.constexpr,
              PAIR: tl.constexpr, BLOCK_K: tl.constexpr):
        """Σ_k W[cols, k] · x'[k] and (PAIR) Σ_k W[cols + second, k] · x'[k], float32 [BLOCK]: x' = x (stride sx;
        · g with NORM) rounded to W's dtype, as triton_layers' GEMVs round it; x read past L1."""
        a = cols.to(tl.float32) * 0.0
        b = a
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            mask = cols_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + cols[:, None] * sw_n + ks[None, :] * sw_k, mask=mask, other=0.0).to(tl.float32)
            if PAIR:
                w2 = tl.load(w_ptr + (cols + second)[:, None] * sw_n + ks[None, :] * sw_k, mask=mask,
                             other=0.0).to(tl.float32)
            x = tl.load(x_ptr + ks * sx, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            if NORM:
                x = x * tl.load(g_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            x = x.to(w_ptr.dtype.element_ty).to(tl.float32)[None, :]
            a += tl.sum(w * x, axis=1)
            if PAIR:
                b += tl.sum(w2 * x, axis=1)
        return a, b

    @triton.jit
    def _prefetch_share(w_ptr, sw_n, sw_k, N, K, pid, programs, K_LINES: tl.constexpr, PREFETCH: tl.constexpr):
        """PREFETCH: this program's share (blocks of 16 rows, P apart) of W [N, K] into L2, a 128-byte line (64
        bf16 of a row, K contiguous) an instruction, nothing into registers. Issued before a barrier for a later
        phase's weights, which no phase writes: they stream from HBM while the other programs finish."""
        if PREFETCH:
            ks = tl.arange(0, K_LINES) * 64
            for u in range(pid, tl.cdiv(N, 16), programs):
                rows = u * 16 + tl.arange(0, 16)
                ok = (ks[:, None] < K) & (rows[None, :] < N)
                at = tl.where(ok, w_ptr + ks[:, None] * sw_k + rows[None, :] * sw_n, w_ptr)
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [at], dtype=tl.int32,
                                          is_pure=False, pack=1)

    globals().update(_grid_barrier=_grid_barrier, _pointer=_pointer, _rstd=_rstd, _gemv=_gemv,
                     _prefetch_share=_prefetch_share)

    @triton.jit
    def persistent_forward_kernel(
            tok_ptr, pos_ptr, embed_ptr, se_v, se_e, table_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, norm_ptr, head_ptr,
            x_ptr, q_ptr, attn_ptr, h_ptr, m_ptr, l_ptr, acc_ptr, taps_ptr, logits_ptr, counters_ptr, tickets_ptr,
            status_ptr, eps, scale, spin_limit,
            sk_l, sk_s, sk_h, sk_d, sv_l, sv_s, sv_h, sv_d, sc_t, sc_d, ss_t, ss_d,
            sqkv_n, sqkv_k, so_n, so_k, sgu_n, sgu_k, sdn_n, sdn_k, shd_n, shd_k,
            E: tl.constexpr, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
            L: tl.constexpr, HAS_BIAS: tl.constexpr, TAPS: tl.constexpr, E_PAD: tl.constexpr,
            G_PAD: tl.constexpr, D_PAD: tl.constexpr, COUNTERS_PAD: tl.constexpr, MAX_CHUNKS: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOWN_BLOCK_N: tl.constexpr, HEAD_BLOCK_N: tl.constexpr,
            ROPE_COLUMNS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_J: tl.constexpr, POLL: tl.constexpr,
            PREFETCH: tl.constexpr, E_LINES: tl.constexpr, F_LINES: tl.constexpr):
        """The forward of token tok_ptr[0] at position pos_ptr[0] (its K/V into cache slot pos) -> logits [V]
        float32. table_ptr [L, 7] int64: each layer's weight addresses (_TABLE's order). Scratch: x [E] (the
        residual stream), q [H·D], attn [H·D], h [F] in the model's dtype; m, l [KV, MAX_CHUNKS, G_PAD] and
        acc [KV, MAX_CHUNKS, G_PAD, D] float32; taps [L, E] (TAPS: each layer's output); counters [L·5 + 1],
        tickets [KV] int32, zeros at rest."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        tok = tl.load(tok_ptr)
        pos = tl.load(pos_ptr)
        HALF: tl.constexpr = D // 2
        G: tl.constexpr = H // KV
        QKV_UNITS: tl.constexpr = (H + 2 * KV) * (HALF // ROPE_COLUMNS)
        chunks = pos // CHUNK + 1
        gs = tl.arange(0, G_PAD)
        g_ok = gs < G
        ds = tl.arange(0, D_PAD)
        d_ok = ds < D
        for layer in range(L):
            if layer == 0:  # the residual stream before the first layer: the token's embedding row
                src = embed_ptr + tok * se_v
                sx = se_e
            else:
                src = x_ptr
                sx = 1
            barriers = counters_ptr + layer * 5
            # 1: RMSNorm -> q|k|v (+ bias) -> rotary -> q, cache
            w = _pointer(table_ptr, layer, 0, embed_ptr)
            g = _pointer(table_ptr, layer, 2, embed_ptr)
            rstd = _rstd(src, sx, eps, E, E_PAD)
            for u in range(pid, QKV_UNITS, programs):
                p = u // (HALF // ROPE_COLUMNS)
                halves = (u % (HALF // ROPE_COLUMNS)) * ROPE_COLUMNS + tl.arange(0, ROPE_COLUMNS)
                lo, hi = _gemv(w, sqkv_n, sqkv_k, p * D + halves, halves < HALF, HALF, src, sx, g, E, True,
                               True, BLOCK_K)
                lo = lo * rstd
                hi = hi * rstd
                if HAS_BIAS:
                    bias = _pointer(table_ptr, layer, 1, embed_ptr)
                    lo += tl.load(bias + p * D + halves).to(tl.float32)
                    hi += tl.load(bias + p * D + HALF + halves).to(tl.float32)
                lo = lo.to(embed_ptr.dtype.element_ty).to(tl.float32)  # q|k|v rounded as the GEMM's output is
                hi = hi.to(embed_ptr.dtype.element_ty).to(tl.float32)
                if p < H + KV:  # rotary on q and k heads
                    cos_lo = tl.load(cos_ptr + pos * sc_t + halves * sc_d).to(tl.float32)
                    cos_hi = tl.load(cos_ptr + pos * sc_t + (halves + HALF) * sc_d).to(tl.float32)
                    sin_lo = tl.load(sin_ptr + pos * ss_t + halves * ss_d).to(tl.float32)
                    sin_hi = tl.load(sin_ptr + pos * ss_t + (halves + HALF) * ss_d).to(tl.float32)
                    lo, hi = lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi
                if p < H:
                    tl.store(q_ptr + p * D + halves, lo.to(q_ptr.dtype.element_ty))
                    tl.store(q_ptr + p * D + HALF + halves, hi.to(q_ptr.dtype.element_ty))
                elif p < H + KV:
                    base = k_ptr + layer * sk_l + pos * sk_s + (p - H) * sk_h
                    tl.store(base + halves * sk_d, lo.to(k_ptr.dtype.element_ty))
                    tl.store(base + (halves + HALF) * sk_d, hi.to(k_ptr.dtype.element_ty))
                else:
                    base = v_ptr + layer * sv_l + pos * sv_s + (p - H - KV) * sv_h
                    tl.store(base + halves * sv_d, lo.to(v_ptr.dtype.element_ty))
                    tl.store(base + (halves + HALF) * sv_d, hi.to(v_ptr.dtype.element_ty))
            _prefetch_share(_pointer(table_ptr, layer, 3, embed_ptr), so_n, so_k, E, H * D, pid, programs, E_LINES,
                            PREFETCH)  # phase 3's weights
            spin_limit = _grid_barrier(barriers, programs, status_ptr, spin_limit, POLL)
            # 2: attention, (KV head, chunk) units; a head's last unit merges its chunks
            for u in range(pid, KV * chunks, programs):
                kv = u // chunks
                c = u % chunks
                q = tl.load(q_ptr + (kv * G + gs)[:, None] * D + ds[None, :], mask=g_ok[:, None] & d_ok[None, :],
                            other=0.0, cache_modifier=".cg").to(tl.float32)
                m = tl.full([G_PAD], float("-inf"), tl.float32)
                total = tl.zeros([G_PAD], tl.float32)
                acc = tl.zeros([G_PAD, D_PAD], tl.float32)
                stop = tl.minimum(c * CHUNK + CHUNK, pos + 1)
                for j0 in range(c * CHUNK, stop, BLOCK_J):
                    js = j0 + tl.arange(0, BLOCK_J)
                    key_ok = js < stop
                    mask = key_ok[:, None] & d_ok[None, :]
                    k = tl.load(k_ptr + layer * sk_l + js[:, None] * sk_s + kv * sk_h + ds[None, :] * sk_d,
                                mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                    v = tl.load(v_ptr + layer * sv_l + js[:, None] * sv_s + kv * sv_h + ds[None, :] * sv_d,
                                mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                    scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G_PAD, BLOCK_J]
                    scores = tl.where(key_ok[None, :], scores, float("-inf"))
                    m_new = tl.maximum(m, tl.max(scores, axis=1))
                    alpha = tl.exp(m - m_new)
                    probs = tl.exp(scores - m_new[:, None])
                    total = total * alpha + tl.sum(probs, axis=1)
                    probs = probs.to(v_ptr.dtype.element_ty).to(tl.float32)  # as they meet the values in a GEMM
                    acc = acc * alpha[:, None] + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
                    m = m_new
                at = (kv * MAX_CHUNKS + c) * G_PAD + gs
                tl.store(m_ptr + at, m)
                tl.store(l_ptr + at, total)
                tl.store(acc_ptr + at[:, None] * D_PAD + ds[None, :], acc)
                if tl.atomic_add(tickets_ptr + kv, 1, sem="acq_rel") == chunks - 1:  # the head's last chunk
                    m = tl.full([G_PAD], float("-inf"), tl.float32)
                    total = tl.zeros([G_PAD], tl.float32)
                    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
                    for c2 in range(chunks):
                        at = (kv * MAX_CHUNKS + c2) * G_PAD + gs
                        m_c = tl.load(m_ptr + at, cache_modifier=".cg")
                        m_new = tl.maximum(m, m_c)
                        alpha = tl.exp(m - m_new)
                        beta = tl.exp(m_c - m_new)
                        total = total * alpha + tl.load(l_ptr + at, cache_modifier=".cg") * beta
                        acc = acc * alpha[:, None] + tl.load(acc_ptr + at[:, None] * D_PAD + ds[None, :],
                                                             cache_modifier=".cg") * beta[:, None]
                        m = m_new
                    out = (acc / tl.where(g_ok, total, 1.0)[:, None]).to(attn_ptr.dtype.element_ty)
                    tl.store(attn_ptr + (kv * G + gs)[:, None] * D + ds[None, :], out,
                             mask=g_ok[:, None] & d_ok[None, :])
                    tl.atomic_xchg(tickets_ptr + kv, 0)
            _prefetch_share(_pointer(table_ptr, layer, 5, embed_ptr), sgu_n, sgu_k, 2 * F, E, pid, programs, E_LINES,
                            PREFETCH)  # phase 4's
            spin_limit = _grid_barrier(barriers + 1, programs, status_ptr, spin_limit, POLL)
            # 3: attention output · o_projᵀ + residual
            w = _pointer(table_ptr, layer, 3, embed_ptr)
            for u in range(pid, tl.cdiv(E, BLOCK_N), programs):
                rows = u * BLOCK_N + tl.arange(0, BLOCK_N)
                ok = rows < E
                o, _ = _gemv(w, so_n, so_k, rows, ok, 0, attn_ptr, 1, attn_ptr, H * D, False, False, BLOCK_K)
                o += tl.load(src + rows * sx, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                tl.store(x_ptr + rows, o.to(x_ptr.dtype.element_ty), mask=ok)
            _prefetch_share(_pointer(table_ptr, layer, 6, embed_ptr), sdn_n, sdn_k, E, F, pid, programs, F_LINES,
                            PREFETCH)  # phase 5's
            spin_limit = _grid_barrier(barriers + 2, programs, status_ptr, spin_limit, POLL)
            # 4: RMSNorm -> gate|up -> silu(gate)·up
            w = _pointer(table_ptr, layer, 5, embed_ptr)
            g = _pointer(table_ptr, layer, 4, embed_ptr)
            rstd = _rstd(x_ptr, 1, eps, E, E_PAD)
            for u in range(pid, tl.cdiv(F, BLOCK_N), programs):
                cols = u * BLOCK_N + tl.arange(0, BLOCK_N)
                ok = cols < F
                gate, up = _gemv(w, sgu_n, sgu_k, cols, ok, F, x_ptr, 1, g, E, True, True, BLOCK_K)
                gate = gate * rstd
                up = up * rstd
                tl.store(h_ptr + cols, (gate / (1.0 + tl.exp(-gate)) * up).to(h_ptr.dtype.element_ty), mask=ok)
            if layer + 1 < L:  # the next layer's q|k|v
                _prefetch_share(_pointer(table_ptr, layer + 1, 0, embed_ptr), sqkv_n, sqkv_k, (H + 2 * KV) * D, E, pid,
                                programs, E_LINES, PREFETCH)
            spin_limit = _grid_barrier(barriers + 3, programs, status_ptr, spin_limit, POLL)
            # 5: · down_projᵀ + residual
            w = _pointer(table_ptr, layer, 6, embed_ptr)
            for u in range(pid, tl.cdiv(E, DOWN_BLOCK_N), programs):
                rows = u * DOWN_BLOCK_N + tl.arange(0, DOWN_BLOCK_N)
                ok = rows < E
                y, _ = _gemv(w, sdn_n, sdn_k, rows, ok, 0, h_ptr, 1, h_ptr, F, False, False, BLOCK_K)
                y = (y + tl.load(x_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32))
                y = y.to(x_ptr.dtype.element_ty)
                tl.store(x_ptr + rows, y, mask=ok)
                if TAPS:
                    tl.store(taps_ptr + layer * E + rows, y, mask=ok)
            spin_limit = _grid_barrier(barriers + 4, programs, status_ptr, spin_limit, POLL)
        # the final RMSNorm and the head, float32 logits
        rstd = _rstd(x_ptr, 1, eps, E, E_PAD)
        for u in range(pid, tl.cdiv(V, HEAD_BLOCK_N), programs):
            cols = u * HEAD_BLOCK_N + tl.arange(0, HEAD_BLOCK_N)
            ok = cols < V
            y, _ = _gemv(head_ptr, shd_n, shd_k, cols, ok, 0, x_ptr, 1, norm_ptr, E, True, False, BLOCK_K)
            tl.store(logits_ptr + cols, y * rstd, mask=ok)
        # the last program out zeroes the barriers' counters for the next launch
        if tl.atomic_add(counters_ptr + L * 5, 1, sem="acq_rel") == programs - 1:
            every = tl.arange(0, COUNTERS_PAD)
            tl.store(counters_ptr + every, every * 0, mask=every < L * 5 + 1)

    _KERNELS["forward"] = persistent_forward_kernel
    return persistent_forward_kernel


def unsupported(model) -> str | None:
    """Why PersistentForward cannot run `model` (a LeanModel that triton_forward.unsupported accepts), or None."""
    cfg = model.cfg
    layers = model.weights.layers[: model.num_layers]
    first = layers[0]
    if cfg.head_dim % 2 or (cfg.head_dim // 2) % _rope_columns(cfg.head_dim):
        return f"half of head_dim {cfg.head_dim} is not a multiple of {_rope_columns(cfg.head_dim)} columns"
    shapes = [(layer.qkv[0].stride(), layer.o.stride(), layer.gate_up.stride(), layer.down.stride(),
               layer.qkv[1] is None) for layer in layers]
    if any(s != shapes[0] for s in shapes):
        return "the layers' weights differ in strides or biases"
    if first.qkv[0].dtype != model.weights.embed_tokens.weight.dtype:
        return "the weights' dtypes differ"
    return None


class PersistentForward:
    """One-row forwards of a LeanModel in one launch each (see the module docstring): forward(tokens [1],
    positions [1]) -> logits [1, V] float32, K/V written at slot = position, the model's length left alone
    (TritonForward.forward_static's contract for one row of a chain). Fixed shapes and no host synchronisation,
    so a CUDA graph can capture it; its scratch lives here, one set a model."""

    def __init__(self, model, programs: int | None = None) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        cfg, device = model.cfg, model.device
        layers = model.weights.layers[: model.num_layers]
        columns = {"qkv": lambda lay: lay.qkv[0], "qkv_bias": lambda lay: lay.qkv[1] if lay.qkv[1] is not None
                   else lay.qkv[0], "norm1": lambda lay: lay.input_layernorm.weight, "o": lambda lay: lay.o,
                   "norm2": lambda lay: lay.post_attention_layernorm.weight, "gate_up": lambda lay: lay.gate_up,
                   "down": lambda lay: lay.down}
        self.table = torch.tensor([[columns[name](layer).data_ptr() for name in _TABLE] for layer in layers],
                                  dtype=torch.int64, device=device)
        self.weights = [[columns[name](layer) for name in _TABLE] for layer in layers]  # kept alive with the table
        if programs is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
            programs = sms * PROGRAMS_PER_SM if device.type == "cuda" else 1
        self.programs = programs  # asked for; _resident_programs may launch fewer
        self._programs: dict[tuple, int] = {}  # programs launched, per compiled specialisation
        e, kv, d, dtype = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, model.dtype
        g_pad = _pow2(cfg.num_heads // kv)
        self.max_chunks = -(-model.k_cache.shape[1] // CHUNK)
        self.x = torch.zeros(e, dtype=dtype, device=device)
        self.q = torch.zeros(cfg.num_heads * d, dtype=dtype, device=device)
        self.attn = torch.zeros_like(self.q)
        self.h = torch.zeros(cfg.intermediate_size, dtype=dtype, device=device)
        self.m = torch.zeros(kv, self.max_chunks, g_pad, dtype=torch.float32, device=device)
        self.l = torch.zeros_like(self.m)
        self.acc = torch.zeros(kv, self.max_chunks, g_pad, _pow2(d), dtype=torch.float32, device=device)
        self.taps = torch.zeros(model.num_layers, e, dtype=dtype, device=device)
        self.counters = torch.zeros(model.num_layers * PHASES + 1, dtype=torch.int32, device=device)
        self.tickets = torch.zeros(kv, dtype=torch.int32, device=device)
        self.status = torch.zeros(1, dtype=torch.int32, device=device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [1], positions [1] (device tensors) -> logits [1, V] float32; with the model's features kept,
        each layer's output lands in self.taps [L, E] and the last layer's in self.x."""
        model, cfg = self.model, self.model.cfg
        weights = model.weights
        head = weights.head()
        first = self.weights[0]
        logits = torch.empty(1, head.shape[0], dtype=torch.float32, device=model.device)
        cos, sin = model.rope_global[0], model.rope_global[1]
        kc, vc = model.k_cache, model.v_cache
        args = (tokens, positions, weights.embed_tokens.weight, *weights.embed_tokens.weight.stride(), self.table, kc,
                vc, cos, sin, weights.norm.weight, head, self.x, self.q, self.attn, self.h, self.m, self.l, self.acc,
                self.taps, logits, self.counters, self.tickets, self.status, float(cfg.rms_norm_eps),
                float(model.attn_scale), SPIN_LIMIT, *kc.stride(), *vc.stride(), *cos.stride(), *sin.stride(),
                *first[0].stride(), *first[3].stride(), *first[5].stride(), *first[6].stride(), *head.stride())
        constexprs = {
            "E": cfg.hidden_size, "H": cfg.num_heads, "KV": cfg.num_kv_heads, "D": cfg.head_dim,
            "F": cfg.intermediate_size, "V": head.shape[0], "L": model.num_layers, "HAS_BIAS": first[1] is not first[0],
            "TAPS": model.features is not None, "E_PAD": _pow2(cfg.hidden_size),
            "G_PAD": _pow2(cfg.num_heads // cfg.num_kv_heads), "D_PAD": _pow2(cfg.head_dim),
            "COUNTERS_PAD": _pow2(self.counters.numel()), "MAX_CHUNKS": self.max_chunks, "BLOCK_K": BLOCK_K,
            "BLOCK_N": BLOCK_N, "DOWN_BLOCK_N": DOWN_BLOCK_N, "HEAD_BLOCK_N": HEAD_BLOCK_N,
            "ROPE_COLUMNS": _rope_columns(cfg.head_dim), "CHUNK": CHUNK, "BLOCK_J": BLOCK_J,
            "POLL": POLL if _inline_asm(model.device) else "atomic",
            "PREFETCH": bool(PREFETCH) and _inline_asm(model.device),
            "E_LINES": _pow2(-(-max(cfg.hidden_size, cfg.num_heads * cfg.head_dim) // 64)),
            "F_LINES": _pow2(-(-cfg.intermediate_size // 64)), "num_warps": WARPS}
        key = tuple(sorted(constexprs.items()))
        if key not in self._programs:
            self._programs[key] = self._resident_programs(_kernel(), args, constexprs)
        _kernel()[(self._programs[key],)](*args, **constexprs)
        return logits

    __call__ = forward

    def _resident_programs(self, kernel, args, constexprs) -> int:
        """self.programs, or fewer where that many of this compiled kernel cannot all be resident at once (its
        registers, threads or shared memory a block, against an SM's): a grid barrier waits for every program."""
        if self.model.device.type != "cuda":
            return self.programs
        props = torch.cuda.get_device_properties(self.model.device)
        try:
            compiled = kernel.warmup(*args, grid=(1,), **constexprs)
            compiled._init_handles()
            regs, shared = compiled.n_regs, compiled.metadata.shared
        except (AttributeError, TypeError):  # a triton without these: one program an SM always fits
            return props.multi_processor_count
        warps = constexprs["num_warps"]
        per_warp = -(-max(regs, 1) * 32 // 256) * 256  # registers are allocated a warp at a time, 256 at once
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * warps)
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
        by_shared = getattr(props, "shared_memory_per_multiprocessor", 232448) // shared if shared else by_threads
        return min(self.programs, props.multi_processor_count * max(1, min(by_regs, by_threads, by_shared)))

    def check(self) -> None:
        """RuntimeError if a launch's grid barrier gave up (its forward's numbers are wrong), then clears it.
        Synchronises with the device."""
        if int(self.status.item()):
            self.status.zero_()
            raise RuntimeError(f"the persistent forward's grid barrier timed out: its {self.programs} programs were "
                               "not all resident at once (set speculant.models.persistent_forward.PERSISTENT = False)")
