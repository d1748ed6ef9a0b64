"""Fewer, fatter kernels for a decode step of the lean model (issue 22): Triton kernels of our own
for T = 1..32 query rows of one request (chains and trees); speculant.models.triton_forward runs
LeanModel.forward over them, and the fused step (speculant.fused, kernels="triton") runs that.

On a GPU a decode step of a small model is launch-bound (SmolLM2-135M: ~18 kernels per layer at
~3 µs each inside a CUDA graph), so each kernel here does what several torch ops did:

    norm_qkv_rope_cache   RMSNorm -> q|k|v GEMM (+ bias) -> rotary on q and k -> k, v into the cache
    cache_attention       causal attention over the static cache, split over the keys (flash-decoding):
                          one program per (KV head, chunk of keys) holding all G·T queries of the head
      + its combine       merges the chunks' partial max / sum / accumulator per query
    matmul_residual       attention output · o_projᵀ + residual
    norm_gate_up_silu     RMSNorm -> gate|up GEMM -> silu(gate)·up
    matmul_residual       · down_projᵀ + residual

(in bit-exact mode exact_cache_attention, one program per (row, KV head, chunk of positions), and
the same combine stand for cache_attention), so **6 kernels per layer** (7 with `fuse_rope=False`:
norm_matmul for q|k|v, then rope_qkv_cache_write), plus per forward the embedding gather and one
norm_matmul for the final norm and the output head (float32 logits straight from the kernel):
6·L + 2 launches per MAX_ROWS rows (TritonForward.forward_static, what a CUDA graph captures; 5·L + 2
with FUSE_COMBINE, the chunks merged by their last program). ROPE_SPLIT ("auto": norm_qkv_rope_cache's
few programs take K in ranges) is the default since an H100 measured it; settings that did not pay there
(benchmarks/triton_layers_gpu.py --settings times them; benchmarks/results/gpu-2026-12-07k/): FUSE_COMBINE
(no change at one row, slower at 5), ROPE_COLUMNS (blocks of a head's columns: no gain beside ROPE_SPLIT),
GATE_UP_SPLIT (slower with the 128-wide gate/up tiles). PDL (programmatic dependent launch: a kernel launches
while the one before it finishes and waits for it in its first statement; with PREFETCH its first weights
stream into L2 before the wait) is on for the forwards whose GEMMs run as GEMVs (PDL "gemv", below): with the
tl.dot tiles an H100 measured SmolLM2-135M's forward from 1.032 to 0.882 ms but Qwen2.5-1.5B's from 2.113 to
2.697 ms (benchmarks/results/gpu-2026-12-07l/); beside the GEMVs it took Qwen's one-row forward from 1.819 to
1.744 ms and SmolLM2's from 0.856 to 0.775 (benchmarks/results/gpu-2026-12-07n/). (Four CUDA tests failed under
it in the first run; the same four failed with PDL off in the next session: 512-deep test tiles past the GPU's
shared memory, and a control that torch's cuBLAS no longer breaks; both tests are fixed since.) Stream-K (a
GEMM's blocks × chunks of K shared out evenly over one program per SM) ran slower than split-K there
(Qwen's forward 2.867 ms) and was removed.

A call of one row outside bit-exact mode (plain decoding's steps, a draft model's) runs every GEMM as GEMVs
(GEMV, use_gemv, _gemv_sums): each program reads a block of GEMV_BLOCK_N rows of W, GEMV_BLOCK_K of K a step,
and sums its products with the row in float32 lanes, no tensor cores and no 32-row tile. On an H100 that
took Qwen2.5-1.5B's one-row forward from 2.141 to 1.844 ms and SmolLM2-135M's from 1.023 to 0.855 ms
(benchmarks/results/gpu-2026-12-07m/); at 5 rows the GEMVs were slower than the tl.dot tiles, so calls of more
rows, and every call in bit-exact mode (whose rows must not depend on the call's row count), keep those. The
kernels of a GEMV forward launch with PDL (1.744 and 0.775 ms). Summing each block's products element-wise
across the steps of K and reducing once at the end, rather than reducing every step, was slower there (2.122
and 0.936 ms).

The GEMMs
compute RMSNorm(x)·Wᵀ as (Σ x·g·W) · rsqrt(mean x² + eps), both sums taken in the same loop over K
(the scale is per row, so it factors out); the T rows sit in one tile of ROW_TILE = 32 rows,
whatever T, by masked loads. Every kernel takes strides: on the CPU LeanModel stores its matrices
column-major.

Row invariance (what bit-exact mode, speculant.fused's bit_exact=True with kernels="triton", rests
on): a row's bits depend on that row's inputs, never on how many rows the call has or what they are.
(Outside bit-exact mode a one-row call runs GEMVs, use_gemv: its bits are not a tile's. Everything below is
about the tl.dot kernels, which bit-exact mode runs for every call.)
- The GEMMs (norm_qkv_rope_cache, norm_matmul, matmul_residual, norm_gate_up_silu): every call puts
  its rows in one tile of ROW_TILE rows (rows past T load zeros), never a tile that follows T; BLOCK_N
  and BLOCK_K come from the weight's N and K alone (_block_n, block_k), and so does the grid (one
  program per block of output columns, each looping over all of K in order; or, for a GEMM whose
  blocks leave SMs idle, K in ranges that N, K and the device fix (_split_k), the block's last program
  summing their float32 partials in range order: never a split that depends on T); num_warps
  is fixed; T is never specialised (do_not_specialize: triton compiles T = 1 and multiples of 16
  apart otherwise), nor is any other argument that changes from call to call, and the tensors come
  16-byte aligned in every call (fresh ones, or slices at multiples of 32 rows). So every call of a
  layer's GEMM runs ONE compiled binary on tiles of one shape: the same MMA (or, in float32, FMA)
  instructions in the same K order for every element, whose sum reads only its own row of x, and
  the RMSNorm's Σ x² of a row is reduced in the same layout every time. (Before, the tile was 16 rows
  up to T = 16 and 32 above: under the interpreter that alone changes a row's bits, numpy's OpenBLAS
  rounding a product by its row count (tests/test_exact_triton.py); on a GPU another tile may mean
  another MMA layout.) A plain step's 1 row then costs a 32-row MMA: the GEMMs are bound by reading
  the weights, not by the MMAs (unmeasured on the GPU).
- Attention in bit-exact mode (exact_cache_attention): a program holds ONE row's G query heads and
  walks that row's own keys in position order, in blocks aligned to positions, within chunks of
  positions (not slots, not a split that depends on T or on the tree); the combine merges a row's
  chunks in order. The default cache_attention is not row-invariant (all G·T queries of a head share
  a program and a tile that follows T; a tree node's keys are grouped by the slots they sit in).
- The rest of TritonForward's forward is per row by construction: the embedding is a gather, rotary
  reads its tables at the row's position, the residual adds are the GEMMs' epilogues, the final norm
  and the head are one norm_matmul. The features it records (torch's RMSNorm, outside these kernels)
  are not promised row-invariant: they only steer a feature draft, never the emitted tokens.
What only a GPU shows is that its compiler keeps this (tests/test_exact_triton.py's CUDA tests).

Numerics: float32 accumulation and float32 softmax throughout; where torch rounds an intermediate
to the model's dtype (the normed activations, each GEMM's output before the residual add, the
scores before softmax) these kernels mostly keep float32, so in bfloat16 they agree with
LeanModel.forward to a few bf16 ulps, not bit for bit. In float32 they agree to ~1e-5.

`triton` is imported only when a kernel first runs, so importing this module needs neither triton
nor a GPU; on CPU tensors the kernels run under TRITON_INTERPRET=1 (the tests). The interpreter
(triton 3.9) multiplies bfloat16 tiles in tl.dot as their raw bits, so on the CPU every tl.dot
upcasts its operands to float32 first (the same products: bf16 -> f32 is exact); on a GPU bf16
tiles go to the tensor cores as they are, float32 ones with input_precision="ieee" (no tf32). The
interpreter also truncates float32 -> bfloat16 where a GPU rounds to nearest even (the tests patch
it to round); and it never compiles, so tests/test_triton_layers.py also compiles every kernel
TritonForward launches (chains and trees) for sm_90 (no GPU needed).

Long because every kernel of the forward lives here beside its caller, and the kernels share helpers
(_dot, _x_tile, _w_tile, _gemm_sums, _gemv_sums, _norm_dot_pair, _rope_store, _reach, ...) that triton finds
among this module's globals.

Shapes: T query rows, E hidden, H query heads, KV key/value heads, G = H / KV, D head_dim, S'
cache slots, K a GEMM's inner size, N its output size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MAX_ROWS = 32  # rows per kernel call; TritonForward runs a longer call in pieces of this many
ROW_TILE = MAX_ROWS  # every GEMM kernel's row tile, whatever the call's T (row invariance: see the docstring)
MIN_DOT = 16  # tl.dot's smallest tile side in older triton (3.9 compiles 8 as well)
GEMM_PROGRAMS = 64  # what _block_n aims for
MAX_BLOCK_N = 128  # _block_n's widest tile
_KERNELS: dict = {}


def _pow2(n: int, least: int = MIN_DOT) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def _block_n(n: int, block_n: int | None) -> int:
    """Output columns per GEMM program: as asked, else enough programs (about GEMM_PROGRAMS) to spread a
    skinny, bandwidth-bound GEMM over the GPU (SmolLM2's o_proj and down_proj, N = 576: 16 columns, 36
    programs), at most MAX_BLOCK_N. A wide GEMM takes the widest tile: on an H100 (bf16, one row,
    benchmarks/triton_gemm_sweep.py) Qwen2.5-1.5B's head (N 151936) ran 191 µs in tiles of 128
    columns against 314 µs in tiles of 64, and its gate/up kernel (2 × 8960) 29.7 against 42.5 µs."""
    if block_n is None:
        block_n = min(MAX_BLOCK_N, _pow2(n // GEMM_PROGRAMS))
    return _pow2(block_n)


# programmatic dependent launch (_pdl_wait) where the GPU and triton have it: True for every launch, "gemv" for the
# launches of a forward whose GEMMs run as GEMVs (use_gemv: one row outside bit-exact mode), False for none. "gemv"
# since an H100 measured it (benchmarks/results/gpu-2026-12-07n/): beside the GEMVs PDL took Qwen2.5-1.5B's
# one-row forward from 1.819 to 1.744 ms and SmolLM2-135M's from 0.856 to 0.775, while with the tl.dot tiles it
# had slowed Qwen's from 2.113 to 2.697 ms (gpu-2026-12-07l); bit-exact mode, which runs no GEMVs, never has it
PDL: bool | int | str = "gemv"
_PDL_SUPPORT: dict[str, bool] = {}


def _pdl_flags(device: torch.device, gemv: bool = False) -> dict:
    """A launch's PDL flags: the kernel's constexpr and triton's launch_pdl where PDL is on for this launch (PDL
    True, or "gemv" and a launch of a GEMV forward: `gemv`) and the device and triton have it (sm_90 and later,
    triton's launch_pdl), else off."""
    if PDL == "gemv":
        on = gemv
    elif isinstance(PDL, str):
        raise ValueError(f"triton_layers.PDL is True, False or 'gemv', got {PDL!r}")
    else:
        on = bool(PDL)
    if not on or device.type != "cuda":
        return {"PDL": False}
    if str(device) not in _PDL_SUPPORT:
        _PDL_SUPPORT[str(device)] = _pdl_supported(device)
    return {"PDL": True, "launch_pdl": True} if _PDL_SUPPORT[str(device)] else {"PDL": False}


# blocks of K each GEMM program prefetches into L2 before its _pdl_wait (with PDL only; 0: none): off until a GPU has
# measured it (benchmarks/triton_layers_gpu.py --settings PDL=1,PREFETCH=4)
PREFETCH = 0


def _gemm_flags(device: torch.device, gemv: bool = False) -> dict:
    """_pdl_flags and the GEMM kernels' PREFETCH (PREFETCH where PDL is on, else 0)."""
    flags = _pdl_flags(device, gemv)
    return {**flags, "PREFETCH": PREFETCH if flags["PDL"] else 0}


def _pdl_supported(device: torch.device) -> bool:
    import dataclasses

    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}


def parse_settings(text: str) -> dict:
    """"PDL=1,PREFETCH=4" -> {"PDL": 1, "PREFETCH": 4}: this module's settings (integers where they parse as
    such), for benchmarks and tests that try values that are not the defaults; ValueError names any setting
    the module does not have."""
    values = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        values[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    unknown = [name for name in values if name not in globals()]
    if unknown:
        raise ValueError(f"speculant.models.triton_layers has no setting {', '.join(unknown)}")
    return values


@contextlib.contextmanager
def settings(values: dict) -> Iterator[None]:
    """This module's settings set to `values` (parse_settings') while the block runs, then restored: kernels
    launched inside compile and capture their own binaries with them."""
    kept = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(kept)


def _f32_dots(*tensors: torch.Tensor) -> bool:
    """Whether tl.dot runs in float32: float32 data, or the interpreter (see the module docstring)."""
    return any(t.dtype == torch.float32 or t.device.type == "cpu" for t in tensors)


def _check_rows(x: torch.Tensor) -> int:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"expected [T, features] with 1 <= T <= {MAX_ROWS}, got {tuple(x.shape)}")
    return x.shape[0]


def _kernels():
    """All kernels, defined on first use (triton is imported only then)."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, acc, F32: tl.constexpr):
        if F32:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def _x_tile(x_ptr, g_ptr, rows, ks, T, K, sx_t, sx_k, NORM: tl.constexpr, UNIT: tl.constexpr):
        """x[rows, ks] · g[ks] in float32 [BLOCK_T, BLOCK_K] and Σ x² over the tile per row."""
        x = tl.load(x_ptr + rows[:, None] * sx_t + ks[None, :] * sx_k,
                    mask=(rows[:, None] < T) & (ks[None, :] < K), other=0.0).to(tl.float32)
        sq = tl.sum(x * x, axis=1)
        if NORM:
            g = tl.load(g_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            if UNIT:
                g = g + 1.0
            x = x * g[None, :]
        return x, sq

    @triton.jit
    def _w_tile(w_ptr, cols, cols_ok, ks, K, sw_n, sw_k):
        """W[cols, ks]ᵀ: [BLOCK_K, BLOCK_N], zeros outside."""
        return tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :] * sw_n,
                       mask=(ks[:, None] < K) & cols_ok[None, :], other=0.0)

    @triton.jit
    def _gemm_sums(x_ptr, g_ptr, w_ptr, rows, T, cols, cols_ok, second, k_lo, k_hi, K, sx_t, sx_k, sw_n, sw_k,
                   NORM: tl.constexpr, UNIT: tl.constexpr, PAIR: tl.constexpr, F32: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GEMV: tl.constexpr):
        """(x·g or x) · W[cols]ᵀ over K in k_lo .. k_hi - 1, float32 [BLOCK_T, BLOCK_N], with PAIR also
        · W[cols + second]ᵀ from the same loop (else zeros: two blocks of one matrix, gate and up or a head's two
        rotary halves), and the rows' Σ x² over it: tl.dot on tiles of all BLOCK_T rows, or with GEMV _gemv_sums'."""
        if GEMV:
            return _gemv_sums(x_ptr, g_ptr, w_ptr, rows, T, cols, cols_ok, second, k_lo, k_hi, K, sx_t, sx_k, sw_n,
                              sw_k, NORM, UNIT, PAIR, BLOCK_T, BLOCK_N, BLOCK_K)
        a = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
        b = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
        ss = tl.zeros([BLOCK_T], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x, sq = _x_tile(x_ptr, g_ptr, rows, ks, T, K, sx_t, sx_k, NORM, UNIT)
            ss += sq
            x = x.to(w_ptr.dtype.element_ty)
            a = _dot(x, _w_tile(w_ptr, cols, cols_ok, ks, K, sw_n, sw_k), a, F32)
            if PAIR:
                b = _dot(x, _w_tile(w_ptr, cols + second, cols_ok, ks, K, sw_n, sw_k), b, F32)
        return a, b, ss

    @triton.jit
    def _norm_dot_pair(x_ptr, g_ptr, w_ptr, rows, cols, cols_ok, second, T, K, sx_t, sx_k, sw_n, sw_k, eps,
                       UNIT: tl.constexpr, F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GEMV: tl.constexpr):
        """RMSNorm(x) · W[cols]ᵀ and RMSNorm(x) · W[cols + second]ᵀ: _gemm_sums over all of K, scaled."""
        a, b, ss = _gemm_sums(x_ptr, g_ptr, w_ptr, rows, T, cols, cols_ok, second, 0, K, K, sx_t, sx_k, sw_n, sw_k,
                              True, UNIT, True, F32, BLOCK_T, BLOCK_N, BLOCK_K, GEMV)
        scale = tl.rsqrt(ss / K + eps)[:, None]
        return a * scale, b * scale

    @triton.jit
    def _store_pair_partials(a, b, ss, part, stride, second, mask, sums, row_ok, count, split,
                             BLOCK_T: tl.constexpr):
        """A split program's share of a pair: a at part + split · stride, b `second` after it, the rows' Σ x²
        at sums + split · BLOCK_T; then its ticket: SPLIT - 1 for the block's last program."""
        tl.store(part + split * stride, a, mask=mask)
        tl.store(part + split * stride + second, b, mask=mask)
        tl.store(sums + split * BLOCK_T, ss, mask=row_ok)
        return tl.atomic_add(count, 1, sem="acq_rel")

    @triton.jit
    def _sum_pair_partials(part, stride, second, mask, sums, row_ok, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        """The block's last program: the pair's partials and the rows' Σ x² (_store_pair_partials'), each
        summed over the SPLIT ranges in range order."""
        a = _range_sum(tl.zeros([BLOCK_T, BLOCK_N], tl.float32), part, stride, mask, SPLIT)
        b = _range_sum(tl.zeros([BLOCK_T, BLOCK_N], tl.float32), part + second, stride, mask, SPLIT)
        ss = _range_sum(tl.zeros([BLOCK_T], tl.float32), sums, BLOCK_T, row_ok, SPLIT)
        return a, b, ss

    @triton.jit
    def _range_sum(total, ptr, stride, mask, SPLIT: tl.constexpr):
        """total + Σ_r ptr[r · stride], r = 0 .. SPLIT-1 in order: the float32 partials a split GEMM's
        programs stored, read past L1 (other programs wrote them)."""
        for r in tl.static_range(SPLIT):
            total += tl.load(ptr + r * stride, mask=mask, other=0.0, cache_modifier=".cg")
        return total

    @triton.jit
    def _merge_chunks(m_ptr, l_ptr, acc_ptr, at0, row_stride, rows_ok, last, out_ptrs, ds, d_ok, D: tl.constexpr,
                      BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
        """The merge of attention's chunks for a block of rows (the combine kernel's one row, a fused chunk
        kernel's last program's rows), read past L1 (other programs stored the chunks): row i merges
        chunks 0 .. last[i] of the partials at at0[i] + c · row_stride in that order (a chunk past a
        row's last one adds exactly nothing), then acc / l into out_ptrs [BLOCK_R, D_PAD]."""
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D_PAD], tl.float32)
        for c in range(tl.max(tl.where(rows_ok, last, 0)) + 1):
            ok = rows_ok & (c <= last)
            at = at0 + c * row_stride
            m_c = tl.load(m_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
            m_new = tl.maximum(m, m_c)
            base = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m - base)
            beta = tl.exp(m_c - base)
            total = total * alpha + tl.load(l_ptr + at, mask=ok, other=0.0, cache_modifier=".cg") * beta
            acc = acc * alpha[:, None] + tl.load(acc_ptr + at[:, None] * D + ds[None, :],
                                                 mask=ok[:, None] & d_ok[None, :], other=0.0,
                                                 cache_modifier=".cg") * beta[:, None]
            m = m_new
        total = tl.where(rows_ok, total, 1.0)  # a row past the call's: no 0 / 0 (it stores nothing)
        tl.store(out_ptrs, (acc / total[:, None]).to(out_ptrs.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _pdl_wait(PDL: tl.constexpr):
        """A kernel's first statement. PDL (launched with launch_pdl, programmatic dependent launch): wait
        until the kernel before it in the stream has finished and its writes are visible, then let the
        next one launch (it starts once every program of this one has passed here, and waits in turn). So a
        launch's latency overlaps the kernel before it; every kernel touches memory only after this."""
        if PDL:  # the wait with a memory clobber: else the compiler may hoist the kernel's loads above it (as
            # triton 3.6's tl.extra.cuda.gdc_wait let it: bit-exact rows broke on an H100)
            tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r,~{memory}", [], dtype=tl.int32, is_pure=False,
                                      pack=1)
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _prefetch_weights(w_ptr, cols, cols_ok, second, k_lo, k_hi, K, sw_n, sw_k, PAIR: tl.constexpr,
                          PREFETCH: tl.constexpr, BLOCK_K: tl.constexpr):
        """Before _pdl_wait (a GEMM's weights are never written, so they may be read while the kernel before
        runs): PREFETCH blocks of K from k_lo (below k_hi and K) of W[cols] (and of W[cols + second] with
        PAIR) into L2, a 128-byte line (64 bf16 of a row, K contiguous) per instruction, nothing into
        registers: the weights' first bytes stream from HBM while the kernel before this one finishes."""
        if PREFETCH > 0:
            ks = k_lo + tl.arange(0, PREFETCH * BLOCK_K // 64) * 64
            ok = (ks[:, None] < k_hi) & (ks[:, None] < K) & cols_ok[None, :]
            at = tl.where(ok, w_ptr + ks[:, None] * sw_k + cols[None, :] * sw_n, w_ptr)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [at], dtype=tl.int32,
                                      is_pure=False, pack=1)
            if PAIR:
                at = tl.where(ok, w_ptr + ks[:, None] * sw_k + (cols + second)[None, :] * sw_n, w_ptr)
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [at], dtype=tl.int32,
                                          is_pure=False, pack=1)

    @triton.jit
    def _gemv_sums(x_ptr, g_ptr, w_ptr, rows, T, cols, cols_ok, second, k_lo, k_hi, K, sx_t, sx_k, sw_n, sw_k,
                   NORM: tl.constexpr, UNIT: tl.constexpr, PAIR: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(x·g) · W[cols]ᵀ over K in k_lo .. k_hi - 1 as GEMVs, float32 [BLOCK_T, BLOCK_N] (and · W[cols + second]ᵀ
        with PAIR, else zeros), and the rows' Σ x² over it [BLOCK_T]. Each block of W [BLOCK_N, BLOCK_K] is read
        once; then row by row its products with the row's block of x are summed over BLOCK_K (no tensor cores)
        and added to that row's sums (a row's sums never read another row). For one-row calls (use_gemv): at
        more rows the tl.dot tiles stream the weights faster."""
        a = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
        b = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
        ss = tl.zeros([BLOCK_T], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w_mask = cols_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + cols[:, None] * sw_n + ks[None, :] * sw_k, mask=w_mask, other=0.0).to(tl.float32)
            if PAIR:
                w2 = tl.load(w_ptr + (cols + second)[:, None] * sw_n + ks[None, :] * sw_k, mask=w_mask,
                             other=0.0).to(tl.float32)
            if NORM:
                g = tl.load(g_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                if UNIT:
                    g = g + 1.0
            for t in range(T):
                x = tl.load(x_ptr + t * sx_t + ks * sx_k, mask=k_ok, other=0.0).to(tl.float32)
                here = rows == t
                ss = tl.where(here, ss + tl.sum(x * x, axis=0), ss)
                if NORM:
                    x = x * g
                x = x.to(w_ptr.dtype.element_ty).to(tl.float32)[None, :]  # rounded as the tl.dot kernels round it
                a = tl.where(here[:, None], a + tl.sum(w * x, axis=1)[None, :], a)
                if PAIR:
                    b = tl.where(here[:, None], b + tl.sum(w2 * x, axis=1)[None, :], b)
        return a, b, ss

    # a kernel finds the helpers it calls among its module's globals
    globals().update(_dot=_dot, _x_tile=_x_tile, _w_tile=_w_tile, _gemm_sums=_gemm_sums,
                     _norm_dot_pair=_norm_dot_pair, _store_pair_partials=_store_pair_partials,
                     _sum_pair_partials=_sum_pair_partials, _range_sum=_range_sum, _merge_chunks=_merge_chunks,
                     _pdl_wait=_pdl_wait, _prefetch_weights=_prefetch_weights, _gemv_sums=_gemv_sums)

    @triton.jit(do_not_specialize=["T"])
    def norm_matmul_kernel(x_ptr, g_ptr, w_ptr, b_ptr, r_ptr, out_ptr, T, K, N, sx_t, sx_k, sw_n, sw_k,
                           sr_t, sr_n, so_t, so_n, eps, NORM: tl.constexpr, UNIT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, F32: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                           PREFETCH: tl.constexpr, GEMV: tl.constexpr):
        """out[:, block] = (RMSNorm(x) or x) · W[block]ᵀ (+ bias) (+ residual), all T rows."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < N
        _prefetch_weights(w_ptr, cols, cols_ok, 0, 0, K, K, sw_n, sw_k, False, PREFETCH, BLOCK_K)
        _pdl_wait(PDL)
        rows = tl.arange(0, BLOCK_T)
        acc, _, ss = _gemm_sums(x_ptr, g_ptr, w_ptr, rows, T, cols, cols_ok, 0, 0, K, K, sx_t, sx_k, sw_n, sw_k, NORM,
                                UNIT, False, F32, BLOCK_T, BLOCK_N, BLOCK_K, GEMV)
        if NORM:
            acc = acc * tl.rsqrt(ss / K + eps)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
        out_mask = (rows[:, None] < T) & cols_ok[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + rows[:, None] * sr_t + cols[None, :] * sr_n, mask=out_mask,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * so_t + cols[None, :] * so_n, acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)

    @triton.jit(do_not_specialize=["T"])
    def norm_matmul_split_kernel(x_ptr, g_ptr, w_ptr, b_ptr, r_ptr, out_ptr, part_ptr, ss_ptr, count_ptr, T, K, N,
                                 sx_t, sx_k, sw_n, sw_k, sr_t, sr_n, so_t, so_n, eps, NORM: tl.constexpr,
                                 UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                                 F32: tl.constexpr, SPLIT: tl.constexpr, K_PER: tl.constexpr,
                                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                                 PREFETCH: tl.constexpr, GEMV: tl.constexpr):
        """norm_matmul_kernel with K cut in SPLIT ranges of K_PER, one program per (column block, range),
        for a GEMM too narrow to fill the GPU with column blocks alone. Each program stores its float32
        partial [T, BLOCK_N] (and its rows' partial Σ x²); the block's last program to arrive (an atomic
        ticket) sums the SPLIT partials in range order, applies the epilogue and resets the ticket. The
        order of every sum is fixed by N, K and SPLIT, never by T or by which program came last."""
        block = tl.program_id(0)
        split = tl.program_id(1)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < N
        _prefetch_weights(w_ptr, cols, cols_ok, 0, split * K_PER, split * K_PER + K_PER, K, sw_n, sw_k, False,
                          PREFETCH, BLOCK_K)
        _pdl_wait(PDL)
        rows = tl.arange(0, BLOCK_T)
        row_ok = rows < T
        acc, _, ss = _gemm_sums(x_ptr, g_ptr, w_ptr, rows, T, cols, cols_ok, 0, split * K_PER, split * K_PER + K_PER,
                                K, sx_t, sx_k, sw_n, sw_k, NORM, UNIT, False, F32, BLOCK_T, BLOCK_N, BLOCK_K, GEMV)
        out_mask = row_ok[:, None] & cols_ok[None, :]
        part = part_ptr + rows[:, None] * N + cols[None, :]  # + range · BLOCK_T · N
        tl.store(part + split * BLOCK_T * N, acc, mask=out_mask)
        if NORM:
            tl.store(ss_ptr + (block * SPLIT + split) * BLOCK_T + rows, ss, mask=row_ok)
        ticket = tl.atomic_add(count_ptr + block, 1, sem="acq_rel")
        if ticket == SPLIT - 1:
            acc = _range_sum(tl.zeros([BLOCK_T, BLOCK_N], tl.float32), part, BLOCK_T * N, out_mask, SPLIT)
            if NORM:
                ss = _range_sum(tl.zeros([BLOCK_T], tl.float32), ss_ptr + block * SPLIT * BLOCK_T + rows, BLOCK_T,
                                row_ok, SPLIT)
                acc = acc * tl.rsqrt(ss / K + eps)[:, None]
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_RES:
                acc += tl.load(r_ptr + rows[:, None] * sr_t + cols[None, :] * sr_n, mask=out_mask,
                               other=0.0).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * so_t + cols[None, :] * so_n, acc.to(out_ptr.dtype.element_ty),
                     mask=out_mask)
            tl.atomic_xchg(count_ptr + block, 0)

    @triton.jit(do_not_specialize=["T"])
    def norm_gate_up_silu_kernel(x_ptr, g_ptr, w_ptr, out_ptr, T, K, N, sx_t, sx_k, sw_n, sw_k, so_t, so_n, eps,
                                 UNIT: tl.constexpr, F32: tl.constexpr, BLOCK_T: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                                 PREFETCH: tl.constexpr, GEMV: tl.constexpr):
        """out[:, block] = silu(h · W[block]ᵀ) · (h · W[N + block]ᵀ), h = RMSNorm(x); W = [gate; up]."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < N
        _prefetch_weights(w_ptr, cols, cols_ok, N, 0, K, K, sw_n, sw_k, True, PREFETCH, BLOCK_K)
        _pdl_wait(PDL)
        rows = tl.arange(0, BLOCK_T)
        gate, up = _norm_dot_pair(x_ptr, g_ptr, w_ptr, rows, cols, cols_ok, N, T, K, sx_t, sx_k, sw_n, sw_k, eps,
                                  UNIT, F32, BLOCK_T, BLOCK_N, BLOCK_K, GEMV)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + rows[:, None] * so_t + cols[None, :] * so_n, out.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < T) & cols_ok[None, :])

    @triton.jit(do_not_specialize=["T"])
    def norm_gate_up_silu_split_kernel(x_ptr, g_ptr, w_ptr, out_ptr, part_ptr, ss_ptr, count_ptr, T, K, N, sx_t,
                                       sx_k, sw_n, sw_k, so_t, so_n, eps, UNIT: tl.constexpr, F32: tl.constexpr,
                                       SPLIT: tl.constexpr, K_PER: tl.constexpr, BLOCK_T: tl.constexpr,
                                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                                       PREFETCH: tl.constexpr, GEMV: tl.constexpr):
        """norm_gate_up_silu_kernel with K in SPLIT ranges, as norm_matmul_split_kernel: each program
        stores its gate and up partials ([T, BLOCK_N] each, float32, at columns c and N + c of a [T, 2N]
        range buffer) and its rows' partial Σ x²; the block's last program sums them in range order,
        scales by the norm and applies silu(gate) · up."""
        block = tl.program_id(0)
        split = tl.program_id(1)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < N
        _prefetch_weights(w_ptr, cols, cols_ok, N, split * K_PER, split * K_PER + K_PER, K, sw_n, sw_k, True,
                          PREFETCH, BLOCK_K)
        _pdl_wait(PDL)
        rows = tl.arange(0, BLOCK_T)
        row_ok = rows < T
        gate, up, ss = _gemm_sums(x_ptr, g_ptr, w_ptr, rows, T, cols, cols_ok, N, split * K_PER, split * K_PER + K_PER,
                                  K, sx_t, sx_k, sw_n, sw_k, True, UNIT, True, F32, BLOCK_T, BLOCK_N, BLOCK_K, GEMV)
        mask = row_ok[:, None] & cols_ok[None, :]
        part = part_ptr + rows[:, None] * (2 * N) + cols[None, :]  # + range · BLOCK_T · 2N (+ N: up)
        sums = ss_ptr + block * SPLIT * BLOCK_T + rows
        ticket = _store_pair_partials(gate, up, ss, part, BLOCK_T * 2 * N, N, mask, sums, row_ok, count_ptr + block,
                                      split, BLOCK_T)
        if ticket == SPLIT - 1:
            gate, up, ss = _sum_pair_partials(part, BLOCK_T * 2 * N, N, mask, sums, row_ok, SPLIT, BLOCK_T, BLOCK_N)
            scale = tl.rsqrt(ss / K + eps)[:, None]
            gate = gate * scale
            up = up * scale
            out = gate / (1.0 + tl.exp(-gate)) * up
            tl.store(out_ptr + rows[:, None] * so_t + cols[None, :] * so_n, out.to(out_ptr.dtype.element_ty),
                     mask=mask)
            tl.atomic_xchg(count_ptr + block, 0)

    @triton.jit
    def _rope_store(lo, hi, p, rows, T, halves, half_ok, pos_ptr, slot_ptr, cos_ptr, sin_ptr, sc_t, sc_d,
                    ss_t, ss_d, q_ptr, sq_t, sq_h, sq_d, k_ptr, v_ptr, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d,
                    H, KV, HALF, BY_POSITION: tl.constexpr):
        """Head p's halves lo, hi [BLOCK_T, HALF_PAD] (float32): rotary on q and k heads (p < H + KV),
        then q into q_ptr[t, p], k and v into the caches at slots[t]."""
        row_ok = rows < T
        mask = row_ok[:, None] & half_ok[None, :]
        if p < H + KV:
            if BY_POSITION:
                at = tl.load(pos_ptr + rows, mask=row_ok, other=0)
            else:
                at = rows
            at = at[:, None]
            cos_lo = tl.load(cos_ptr + at * sc_t + halves[None, :] * sc_d, mask=mask, other=0.0)
            cos_hi = tl.load(cos_ptr + at * sc_t + (halves[None, :] + HALF) * sc_d, mask=mask, other=0.0)
            sin_lo = tl.load(sin_ptr + at * ss_t + halves[None, :] * ss_d, mask=mask, other=0.0)
            sin_hi = tl.load(sin_ptr + at * ss_t + (halves[None, :] + HALF) * ss_d, mask=mask, other=0.0)
            lo, hi = lo * cos_lo.to(tl.float32) - hi * sin_lo.to(tl.float32), \
                hi * cos_hi.to(tl.float32) + lo * sin_hi.to(tl.float32)
        if p < H:
            base = q_ptr + rows[:, None] * sq_t + p * sq_h
            tl.store(base + halves[None, :] * sq_d, lo.to(q_ptr.dtype.element_ty), mask=mask)
            tl.store(base + (halves[None, :] + HALF) * sq_d, hi.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            slot = tl.load(slot_ptr + rows, mask=row_ok, other=0)[:, None]
            if p < H + KV:
                base = k_ptr + slot * sk_s + (p - H) * sk_h
                tl.store(base + halves[None, :] * sk_d, lo.to(k_ptr.dtype.element_ty), mask=mask)
                tl.store(base + (halves[None, :] + HALF) * sk_d, hi.to(k_ptr.dtype.element_ty), mask=mask)
            else:
                base = v_ptr + slot * sv_s + (p - H - KV) * sv_h
                tl.store(base + halves[None, :] * sv_d, lo.to(v_ptr.dtype.element_ty), mask=mask)
                tl.store(base + (halves[None, :] + HALF) * sv_d, hi.to(v_ptr.dtype.element_ty), mask=mask)

    globals()["_rope_store"] = _rope_store

    @triton.jit(do_not_specialize=["T"])
    def rope_qkv_cache_write_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, T, H, KV,
                                    HALF, s_t, s_n, sc_t, sc_d, ss_t, ss_d, sq_t, sq_h, sq_d, sk_s, sk_h, sk_d,
                                    sv_s, sv_h, sv_d, BY_POSITION: tl.constexpr, BLOCK_T: tl.constexpr,
                                    HALF_PAD: tl.constexpr, PDL: tl.constexpr):
        """Program p: head p of q|k|v (q heads, then k, then v) for all T rows."""
        _pdl_wait(PDL)
        p = tl.program_id(0)
        rows = tl.arange(0, BLOCK_T)
        halves = tl.arange(0, HALF_PAD)
        half_ok = halves < HALF
        mask = (rows[:, None] < T) & half_ok[None, :]
        base = qkv_ptr + rows[:, None] * s_t + (p * 2 * HALF + halves[None, :]) * s_n
        lo = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(base + HALF * s_n, mask=mask, other=0.0).to(tl.float32)
        _rope_store(lo, hi, p, rows, T, halves, half_ok, pos_ptr, slot_ptr, cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d,
                    q_ptr, sq_t, sq_h, sq_d, k_ptr, v_ptr, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d, H, KV, HALF, BY_POSITION)

    @triton.jit(do_not_specialize=["T"])
    def norm_qkv_rope_cache_kernel(x_ptr, g_ptr, w_ptr, b_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr,
                                   v_ptr, T, K, H, KV, HALF, sx_t, sx_k, sw_n, sw_k, sc_t, sc_d, ss_t, ss_d,
                                   sq_t, sq_h, sq_d, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d, eps,
                                   HAS_BIAS: tl.constexpr, F32: tl.constexpr, BLOCK_T: tl.constexpr,
                                   HALF_PAD: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                                   PREFETCH: tl.constexpr, GEMV: tl.constexpr):
        """Program (p, s): columns s·HALF_PAD .. (s+1)·HALF_PAD - 1 of each half of head p of
        RMSNorm(x)·[Wq; Wk; Wv]ᵀ (+ bias) (two accumulators, so that rotary is elementwise; HALF_PAD here
        is the block of a half a program holds), rounded to the model's dtype as the q|k|v GEMM's output
        is, then _rope_store."""
        p = tl.program_id(0)
        rows = tl.arange(0, BLOCK_T)
        halves = tl.program_id(1) * HALF_PAD + tl.arange(0, HALF_PAD)
        half_ok = halves < HALF
        cols_lo = p * 2 * HALF + halves
        _prefetch_weights(w_ptr, cols_lo, half_ok, HALF, 0, K, K, sw_n, sw_k, True, PREFETCH, BLOCK_K)
        _pdl_wait(PDL)
        lo, hi = _norm_dot_pair(x_ptr, g_ptr, w_ptr, rows, cols_lo, half_ok, HALF, T, K, sx_t, sx_k, sw_n, sw_k, eps,
                                False, F32, BLOCK_T, HALF_PAD, BLOCK_K, GEMV)
        if HAS_BIAS:
            lo += tl.load(b_ptr + cols_lo, mask=half_ok, other=0.0).to(tl.float32)[None, :]
            hi += tl.load(b_ptr + cols_lo + HALF, mask=half_ok, other=0.0).to(tl.float32)[None, :]
        lo = lo.to(w_ptr.dtype.element_ty).to(tl.float32)
        hi = hi.to(w_ptr.dtype.element_ty).to(tl.float32)
        _rope_store(lo, hi, p, rows, T, halves, half_ok, pos_ptr, slot_ptr, cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d,
                    q_ptr, sq_t, sq_h, sq_d, k_ptr, v_ptr, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d, H, KV, HALF, True)

    @triton.jit(do_not_specialize=["T"])
    def norm_qkv_rope_cache_split_kernel(x_ptr, g_ptr, w_ptr, b_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr,
                                         v_ptr, part_ptr, ss_ptr, count_ptr, T, K, H, KV, HALF, sx_t, sx_k, sw_n, sw_k,
                                         sc_t, sc_d, ss_t, ss_d, sq_t, sq_h, sq_d, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d,
                                         eps, HAS_BIAS: tl.constexpr, F32: tl.constexpr, SPLIT: tl.constexpr,
                                         K_PER: tl.constexpr, BLOCK_T: tl.constexpr, HALF_PAD: tl.constexpr,
                                         BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, GEMV: tl.constexpr):
        """norm_qkv_rope_cache_kernel with K in SPLIT ranges of K_PER, program (p, s, r): as
        norm_matmul_split_kernel, each program stores its float32 partials of the two halves' blocks
        (at their columns of a [T, (H + 2·KV)·D] range buffer) and its rows' partial Σ x²; the
        block's last program sums them in range order, then bias, rounding and _rope_store."""
        p = tl.program_id(0)
        s = tl.program_id(1)
        split = tl.program_id(2)
        block = p * tl.num_programs(1) + s
        rows = tl.arange(0, BLOCK_T)
        row_ok = rows < T
        halves = s * HALF_PAD + tl.arange(0, HALF_PAD)
        half_ok = halves < HALF
        cols_lo = p * 2 * HALF + halves
        _prefetch_weights(w_ptr, cols_lo, half_ok, HALF, split * K_PER, split * K_PER + K_PER, K, sw_n, sw_k, True,
                          PREFETCH, BLOCK_K)
        _pdl_wait(PDL)
        n = (H + 2 * KV) * 2 * HALF
        lo, hi, ss = _gemm_sums(x_ptr, g_ptr, w_ptr, rows, T, cols_lo, half_ok, HALF, split * K_PER,
                                split * K_PER + K_PER, K, sx_t, sx_k, sw_n, sw_k, True, False, True, F32, BLOCK_T,
                                HALF_PAD, BLOCK_K, GEMV)
        mask = row_ok[:, None] & half_ok[None, :]
        part = part_ptr + rows[:, None] * n + cols_lo[None, :]  # + range · BLOCK_T · n (+ HALF: hi)
        sums = ss_ptr + block * SPLIT * BLOCK_T + rows
        ticket = _store_pair_partials(lo, hi, ss, part, BLOCK_T * n, HALF, mask, sums, row_ok, count_ptr + block, split,
                                      BLOCK_T)
        if ticket == SPLIT - 1:
            lo, hi, ss = _sum_pair_partials(part, BLOCK_T * n, HALF, mask, sums, row_ok, SPLIT, BLOCK_T, HALF_PAD)
            scale = tl.rsqrt(ss / K + eps)[:, None]
            lo = lo * scale
            hi = hi * scale
            if HAS_BIAS:
                lo += tl.load(b_ptr + cols_lo, mask=half_ok, other=0.0).to(tl.float32)[None, :]
                hi += tl.load(b_ptr + cols_lo + HALF, mask=half_ok, other=0.0).to(tl.float32)[None, :]
            lo = lo.to(w_ptr.dtype.element_ty).to(tl.float32)
            hi = hi.to(w_ptr.dtype.element_ty).to(tl.float32)
            _rope_store(lo, hi, p, rows, T, halves, half_ok, pos_ptr, slot_ptr, cos_ptr, sin_ptr, sc_t, sc_d, ss_t,
                        ss_d, q_ptr, sq_t, sq_h, sq_d, k_ptr, v_ptr, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d, H, KV, HALF,
                        True)
            tl.atomic_xchg(count_ptr + block, 0)

    @triton.jit
    def _reach(pos_ptr, start_ptr, t, row_ok, node0, TREE: tl.constexpr):
        """The last cache slot each query row may read: its position (a chain), or its own tree slot
        start + node0 + t (a tree: a node's ancestors come before it)."""
        if TREE:
            reach = tl.where(row_ok, tl.load(start_ptr) + node0 + t, -1)
        else:
            reach = tl.load(pos_ptr + t, mask=row_ok, other=-1)
        return reach

    globals()["_reach"] = _reach

    @triton.jit
    def attention_chunk_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, anc_ptr, start_ptr, m_ptr, l_ptr, acc_ptr, count_ptr,
                               out_ptr, T, kv_len, scale, node0, nodes, sq_t, sq_h, sq_d, sk_s, sk_h, sk_d, sv_s, sv_h,
                               sv_d, sa_t, sa_n, so_t, so_h, so_d, chunks, G: tl.constexpr, D: tl.constexpr,
                               CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                               F32: tl.constexpr, TREE: tl.constexpr, FUSE: tl.constexpr, PDL: tl.constexpr):
        """Program (kv, c): the G·T queries of KV head kv (row r: query t = r // G, head kv·G + r % G)
        over keys c·CHUNK .. (c+1)·CHUNK - 1, an online softmax in float32 -> partial max m, sum l
        and accumulator acc, stored at [kv, c, r(, d)]. A chain's query reads the keys <= its
        position; a tree's (TREE) the keys before the tree's first slot start_ptr[0] and the nodes j
        (at slots start + j) with anc[t, j] (its row of the tree's nodes-many columns)."""
        _pdl_wait(PDL)
        kv = tl.program_id(0)
        c = tl.program_id(1)
        rs = tl.arange(0, BLOCK_R)
        ds = tl.arange(0, D_PAD)
        t = rs // G
        row_ok = rs < G * T
        reach = _reach(pos_ptr, start_ptr, t, row_ok, node0, TREE)
        q = tl.load(q_ptr + t[:, None] * sq_t + (kv * G + rs % G)[:, None] * sq_h + ds[None, :] * sq_d,
                    mask=row_ok[:, None] & (ds[None, :] < D), other=0.0)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D_PAD], tl.float32)
        first = c * CHUNK
        stop = tl.minimum(tl.minimum(first + CHUNK, kv_len), tl.max(reach) + 1)  # empty past the last query
        for j0 in range(first, stop, BLOCK_N):
            js = j0 + tl.arange(0, BLOCK_N)
            key_mask = (js[:, None] < stop) & (ds[None, :] < D)
            k = tl.load(k_ptr + js[:, None] * sk_s + kv * sk_h + ds[None, :] * sk_d, mask=key_mask, other=0.0)
            v = tl.load(v_ptr + js[:, None] * sv_s + kv * sv_h + ds[None, :] * sv_d, mask=key_mask, other=0.0)
            scores = _dot(q, tl.trans(k), tl.zeros([BLOCK_R, BLOCK_N], tl.float32), F32) * scale
            if TREE:
                node = js - tl.load(start_ptr)  # [BLOCK_N]: the tree node a slot holds (< 0: the cache before it)
                in_tree = (node >= 0) & (node < nodes)
                ancestor = tl.load(anc_ptr + t[:, None] * sa_t + node[None, :] * sa_n,
                                   mask=row_ok[:, None] & in_tree[None, :], other=0)
                allowed = (node[None, :] < 0) | (ancestor != 0)
            else:
                allowed = js[None, :] <= reach[:, None]
            scores = tl.where(allowed & (js[None, :] < stop), scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            base = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with no key yet: no -inf - -inf
            alpha = tl.exp(m - base)
            p = tl.exp(scores - base[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            acc = _dot(p.to(v_ptr.dtype.element_ty), v, acc * alpha[:, None], F32)
            m = m_new
        at = (kv * chunks + c) * G * T + rs
        live = row_ok & (rs * 0 + first <= tl.max(reach))  # no query reads a chunk past its reach: nothing to store
        tl.store(m_ptr + at, m, mask=live)
        tl.store(l_ptr + at, total, mask=live)
        tl.store(acc_ptr + at[:, None] * D + ds[None, :], acc, mask=live[:, None] & (ds[None, :] < D))
        if FUSE:  # the head's last chunk program to arrive merges every chunk (attention_combine_kernel's work)
            ticket = tl.atomic_add(count_ptr + kv, 1, sem="acq_rel")
            if ticket == chunks - 1:
                out = out_ptr + t[:, None] * so_t + (kv * G + rs % G)[:, None] * so_h + ds[None, :] * so_d
                _merge_chunks(m_ptr, l_ptr, acc_ptr, kv * chunks * G * T + rs, G * T, row_ok,
                              tl.where(row_ok, reach, 0) // CHUNK, out, ds, ds < D, D, BLOCK_R, D_PAD)
                tl.atomic_xchg(count_ptr + kv, 0)

    @triton.jit(do_not_specialize=["T", "node0", "chunks"])
    def attention_combine_kernel(pos_ptr, start_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, T, node0, chunks, so_t, so_h,
                                 so_d, G: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, D_PAD: tl.constexpr,
                                 TREE: tl.constexpr, PDL: tl.constexpr):
        """Program (t, h): query t, head h: merges the chunks up to the one holding its reach (_reach),
        as a block of one row (_merge_chunks)."""
        _pdl_wait(PDL)
        t = tl.program_id(0)
        h = tl.program_id(1)
        kv = h // G
        one = tl.arange(0, 1)
        ds = tl.arange(0, D_PAD)
        last = _reach(pos_ptr, start_ptr, t + one, t + one < T, node0, TREE) // CHUNK
        _merge_chunks(m_ptr, l_ptr, acc_ptr, kv * chunks * G * T + t * G + h % G + one, G * T, t + one < T, last,
                      out_ptr + t * so_t + h * so_h + ds[None, :] * so_d + one[:, None], ds, ds < D, D, 1, D_PAD)

    @triton.jit(do_not_specialize=["T", "chunks"])
    def exact_attention_chunk_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, nodes_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, out_ptr,
                                     T, scale, chunks, sq_t, sq_h, sq_d, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d, sn_t, sn_d,
                                     so_t, so_h, so_d, G: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                                     G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                                     F32: tl.constexpr, FUSE: tl.constexpr, PDL: tl.constexpr):
        """Program (t, kv, c): the G query heads of KV head kv of ONE row t over that row's own keys at
        positions c·CHUNK .. (c+1)·CHUNK - 1 up to its position, in position order, in blocks of BLOCK_N
        aligned to positions (exact_cache_attention says which slot holds which key), an online softmax
        in float32 -> the chunk's m, l and acc at [kv, c, t·G + g(, d)], where attention_chunk_kernel
        stores its own, so that attention_combine_kernel (by position) merges them."""
        _pdl_wait(PDL)
        t = tl.program_id(0)
        kv = tl.program_id(1)
        c = tl.program_id(2)
        gs = tl.arange(0, G_PAD)
        ds = tl.arange(0, D_PAD)
        g_ok = gs < G
        pos = tl.load(pos_ptr + t)
        start = tl.load(pos_ptr)  # the call's first position: keys before it lie at slot = position
        q = tl.load(q_ptr + t * sq_t + (kv * G + gs)[:, None] * sq_h + ds[None, :] * sq_d,
                    mask=g_ok[:, None] & (ds[None, :] < D), other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        first = c * CHUNK
        for j0 in range(first, tl.minimum(first + CHUNK, pos + 1), BLOCK_N):  # none past the row's position
            js = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]: positions
            valid = js <= pos
            depth = js - start
            node = tl.load(nodes_ptr + t * sn_t + depth * sn_d, mask=valid & (depth >= 0), other=0)
            slot = tl.where(depth >= 0, start + node, js)
            key_mask = valid[:, None] & (ds[None, :] < D)
            k = tl.load(k_ptr + slot[:, None] * sk_s + kv * sk_h + ds[None, :] * sk_d, mask=key_mask, other=0.0)
            v = tl.load(v_ptr + slot[:, None] * sv_s + kv * sv_h + ds[None, :] * sv_d, mask=key_mask, other=0.0)
            scores = _dot(q, tl.trans(k), tl.zeros([G_PAD, BLOCK_N], tl.float32), F32) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: key j0 <= pos is in the block
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            acc = _dot(p.to(v_ptr.dtype.element_ty), v, acc * alpha[:, None], F32)
            m = m_new
        at = (kv * chunks + c) * G * T + t * G + gs
        live = g_ok & (gs * 0 + first <= pos)  # a chunk past the row's position stores nothing
        tl.store(m_ptr + at, m, mask=live)
        tl.store(l_ptr + at, total, mask=live)
        tl.store(acc_ptr + at[:, None] * D + ds[None, :], acc, mask=live[:, None] & (ds[None, :] < D))
        if FUSE:  # the (row, KV head)'s last chunk program to arrive merges the row's chunks
            ticket = tl.atomic_add(count_ptr + t * tl.num_programs(1) + kv, 1, sem="acq_rel")
            if ticket == chunks - 1:
                out = out_ptr + t * so_t + (kv * G + gs)[:, None] * so_h + ds[None, :] * so_d
                _merge_chunks(m_ptr, l_ptr, acc_ptr, kv * chunks * G * T + t * G + gs, G * T, g_ok,
                              gs * 0 + pos // CHUNK, out, ds, ds < D, D, G_PAD, D_PAD)
                tl.atomic_xchg(count_ptr + t * tl.num_programs(1) + kv, 0)

    _KERNELS.update(norm_matmul=norm_matmul_kernel, norm_matmul_split=norm_matmul_split_kernel,
                    gate_up=norm_gate_up_silu_kernel, gate_up_split=norm_gate_up_silu_split_kernel,
                    rope=rope_qkv_cache_write_kernel, qkv_rope=norm_qkv_rope_cache_kernel,
                    qkv_rope_split=norm_qkv_rope_cache_split_kernel,
                    attention=attention_chunk_kernel, combine=attention_combine_kernel,
                    exact_attention=exact_attention_chunk_kernel)
    return _KERNELS


# ---- the kernels' callers --------------------------------------------------------------------------


def _linear(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            unit_offset: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, block_n: int | None = None,
            block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
            split_k: int | None = None, gemv: bool = False) -> torch.Tensor:
    """The GEMM kernels' launcher. block_n: from N (_block_n; GEMV_BLOCK_N with gemv) unless given; split_k: from
    N, K and the device (_split_k) unless given; block_k: 64, or 128 where the policy splits K in ranges of at
    least LONG_RANGE (GEMV_BLOCK_K with gemv). gemv: the GEMVs of _gemv_sums instead of tl.dot (see use_gemv)."""
    t = _check_rows(x)
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, the weight [{n}, {k}] takes {k}")
    if out is None:
        out = torch.empty(t, n, dtype=out_dtype or x.dtype, device=x.device)
    res = residual if residual is not None else out
    if gemv:
        block_n = _pow2(block_n or GEMV_BLOCK_N, 1)
        if split_k is None:
            split_k = _split_k(n, k, block_n, x.device, programs_per_sm=GEMV_PROGRAMS_PER_SM)
        block_k = block_k or GEMV_BLOCK_K
    else:
        block_n = _block_n(n, block_n)
        if split_k is None:
            split_k = _split_k(n, k, block_n, x.device)
            if block_k is None and split_k > 1 and k // split_k >= LONG_RANGE:
                block_k = 128
        block_k = block_k or 64
    block_k = _pow2(block_k)
    dummy = weight  # an unused pointer argument (the constexpr flags drop its loads)
    sizes = (t, k, n, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), res.stride(0), res.stride(1),
             out.stride(0), out.stride(1), float(eps))
    flags = dict(NORM=norm_weight is not None, UNIT=bool(unit_offset), HAS_BIAS=bias is not None,
                 HAS_RES=residual is not None, F32=_f32_dots(x, weight), BLOCK_T=_row_tile(t, gemv), BLOCK_N=block_n,
                 BLOCK_K=block_k, num_warps=num_warps or (GEMV_WARPS if gemv else 4), GEMV=gemv,
                 **({} if num_stages is None else {"num_stages": num_stages}), **_gemm_flags(x.device, gemv))
    pointers = (x, norm_weight if norm_weight is not None else dummy, weight, bias if bias is not None else dummy,
                res, out)
    blocks = -(-n // block_n)
    if split_k <= 1:
        _kernels()["norm_matmul"][(blocks,)](*pointers, *sizes, **flags)
        return out
    split_k, k_per, part, sums = _split_buffers(k, n, blocks, split_k, block_k, x.device)
    _kernels()["norm_matmul_split"][(blocks, split_k)](*pointers, part, sums, _tickets(weight, blocks), *sizes,
                                                       SPLIT=split_k, K_PER=k_per, **flags)
    return out


def _split_buffers(k: int, columns: int, blocks: int, split_k: int, block_k: int, device: torch.device
                   ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """A split-K launch's ranges and K_PER (K ÷ split_k, rounded up to whole blocks of K; ranges that would
    start past K are dropped) and its scratch: the ranges' partials [ranges, ROW_TILE, columns] and rows'
    partial Σ x² [blocks, ranges, ROW_TILE]."""
    k_per = -(-k // (split_k * block_k)) * block_k
    ranges = -(-k // k_per)
    return (ranges, k_per, torch.empty(ranges, ROW_TILE, columns, dtype=torch.float32, device=device),
            torch.empty(blocks, ranges, ROW_TILE, dtype=torch.float32, device=device))


_TICKETS: dict[torch.device, torch.Tensor] = {}  # a device's split-K arrival counters
_TICKET_SLICES: dict[tuple[torch.device, int], tuple[int, int]] = {}  # (device, weight address) -> its counters
TICKETS = 1 << 20  # counters per device (4 MiB): every split weight gets its own blocks of them


def reserve_tickets(device: torch.device) -> None:
    """Allocate the device's split-K counters (zeros) now: a CUDA graph capture cannot allocate them."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # keyed as a weight's device is: with its index
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _TICKETS:
        _TICKETS[device] = torch.zeros(TICKETS, dtype=torch.int32, device=device)


def _tickets(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """The split-K arrival counters of `weight`'s GEMM: one per column block, zeros at rest (a call's last
    program of each block resets its own). Each weight has its own, so split GEMMs on other streams
    never share one."""
    device = weight.device
    if device not in _TICKETS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K GEMM counters are allocated outside CUDA graph capture: call "
                               "triton_layers.reserve_tickets(device) before capturing")
        reserve_tickets(device)
    key = (device, weight.data_ptr())
    start, count = _TICKET_SLICES.get(key, (0, 0))
    if count < blocks:
        start = sum(c for (d, _), (_, c) in _TICKET_SLICES.items() if d == device)
        if start + blocks > TICKETS:
            raise RuntimeError(f"split-K GEMMs: more than {TICKETS} counters on {device}")
        _TICKET_SLICES[key] = (start, blocks)
    return _TICKETS[device][start:start + blocks]


SPLIT_K = "auto"  # "auto": _split_k's choice; "off": every GEMM in one range of K
MAX_SPLIT = 8
MIN_SPLIT_K = 256  # the least of K a range gets
PROGRAMS_PER_SM = 4  # a split GEMM's programs: at most this many per SM
SPLIT_BELOW = 1  # split K while the column blocks are fewer than this many per SM
LONG_RANGE = 1024  # a split range at least this long loops over K in blocks of 128, not 64
_SMS: dict[torch.device, int] = {}


def _sm_count(device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    return _SMS[device]


def _split_k(n: int, k: int, block_n: int, device: torch.device, min_range: int | None = None,
             programs_per_sm: int | None = None) -> int:
    """Ranges of K for a GEMM of N outputs: 1 where its column blocks fill SPLIT_BELOW × the GPU's SMs
    (and on the CPU), else the largest power of two up to MAX_SPLIT that keeps programs <= PROGRAMS_PER_SM per SM
    and every range >= min_range (default MIN_SPLIT_K) long. On an H100's 132 SMs: Qwen2.5-1.5B's down_proj (N 1536 in 48
    blocks, K 8960) 8 ranges, its o_proj (K 1536) 4, SmolLM2's o_proj (36 blocks, K 576) 2. A function
    of N, K and the device alone, never of T (row invariance). The choice follows
    benchmarks/triton_gemm_sweep.py on an H100: down_proj 52.9 µs in one range, 14.2 µs in 8 of
    them with 128-wide K blocks (cuBLAS: 14.3)."""
    sms = _sm_count(device) if SPLIT_K == "auto" else 0
    blocks = -(-n // block_n)
    split = 1
    per_sm = programs_per_sm or PROGRAMS_PER_SM
    while (blocks < SPLIT_BELOW * sms and split * 2 <= MAX_SPLIT and blocks * split * 2 <= per_sm * sms
           and k // (split * 2) >= (MIN_SPLIT_K if min_range is None else min_range)):
        split *= 2
    return split


def norm_matmul(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None, unit_offset: bool = False, out_dtype: torch.dtype | None = None,
                **blocks) -> torch.Tensor:
    """RMSNorm(x) · weightᵀ (+ bias) in one kernel: x [T, K], norm_weight [K] (unit_offset: Gemma's
    (1 + w)), weight [N, K] (any strides), bias [N] -> [T, N] in out_dtype (default x's)."""
    return _linear(x, weight, norm_weight=norm_weight, eps=eps, unit_offset=unit_offset, bias=bias,
                   out_dtype=out_dtype, **blocks)


def matmul_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None,
                    **blocks) -> torch.Tensor:
    """x [T, K] · weight [N, K]ᵀ + residual [T, N] in one kernel (o_proj's and down_proj's epilogue);
    `out` may be `residual` itself (each program reads its block of it before writing it)."""
    return _linear(x, weight, residual=residual, out=out, **blocks)


# GEMV: calls of one row outside bit-exact mode (plain decoding, a draft's steps) run their GEMMs as GEMVs
# (_gemv_sums: GEMV_BLOCK_N rows of W a program, GEMV_BLOCK_K of K a step, GEMV_WARPS warps, q/k/v in blocks of
# GEMV_ROPE_COLUMNS of each half, split GEMMs up to GEMV_PROGRAMS_PER_SM programs a SM) instead of tl.dot tiles of
# ROW_TILE rows. On an H100 (benchmarks/gemv_probe.py, random weights at Qwen2.5-1.5B's widths, one row) they
# streamed the head at 93 % of HBM (cuBLAS 89 %, the tl.dot kernel 74 %) and gate/up at 84 % (55 %), but at five
# rows they fell behind the tl.dot kernels, so a call of more rows keeps those.
GEMV = True
GEMV_BLOCK_N = 16
GEMV_BLOCK_K = 256
GEMV_WARPS = 4
GEMV_ROPE_COLUMNS = 8
GEMV_PROGRAMS_PER_SM = 8


def use_gemv(rows: int, exact: bool) -> bool:
    """Whether a call of `rows` rows runs its GEMMs as GEMVs: one row, outside bit-exact mode (whose rows must
    not depend on the call's row count: it keeps the tl.dot kernels for every call), where GEMV is on."""
    return bool(GEMV) and rows == 1 and not exact


def _row_tile(rows: int, gemv: bool) -> int:
    """A GEMM kernel's BLOCK_T: ROW_TILE for the tl.dot kernels, whatever the rows (row invariance); a GEMV's
    rows padded to a power of two."""
    return _pow2(rows, 1) if gemv else ROW_TILE


GATE_UP_SPLIT = 1  # norm_gate_up_silu's ranges of K unless asked (benchmarks vary it through triton_layers_gpu)


def norm_gate_up_silu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor,
                      unit_offset: bool = False, block_n: int | None = None, block_k: int | None = None,
                      num_warps: int | None = None, split_k: int | None = None, gemv: bool = False) -> torch.Tensor:
    """silu(h · gateᵀ) · (h · upᵀ), h = RMSNorm(x), in one kernel: x [T, K], gate_up_weight [2I, K]
    (gate rows, then up rows) -> [T, I] in x's dtype. split_k > 1 (default GATE_UP_SPLIT): K in that
    many ranges (norm_gate_up_silu_split_kernel), a fixed number whatever the rows; 1 for now: on an H100 Qwen2.5-1.5B's gate/up ran 29.7 µs in 70 tiles
    of 128 columns over all of K, 35.9 µs in 140 tiles of 64 in 2 ranges (benchmarks/triton_gemm_sweep.py),
    and the whole forward took 2.385 ms with 128 columns in 2 ranges against 2.320 ms in one
    (benchmarks/results/gpu-2026-12-07k/)."""
    t = _check_rows(x)
    n2, k = gate_up_weight.shape
    n = n2 // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if gemv:
        block_n = _pow2(block_n or GEMV_BLOCK_N // 2, 1)  # GEMV_BLOCK_N rows of W a program: half gate, half up
        block_k = _pow2(block_k or GEMV_BLOCK_K)
    else:
        block_n = _block_n(n, block_n)
        block_k = _pow2(block_k or 64)
    split_k = GATE_UP_SPLIT if split_k is None else split_k
    blocks = -(-n // block_n)
    sizes = (t, k, n, x.stride(0), x.stride(1), gate_up_weight.stride(0), gate_up_weight.stride(1), out.stride(0),
             out.stride(1), float(eps))
    flags = {"UNIT": bool(unit_offset), "F32": _f32_dots(x, gate_up_weight), "BLOCK_T": _row_tile(t, gemv),
             "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps or (GEMV_WARPS if gemv else 4),
             "GEMV": gemv, **_gemm_flags(x.device, gemv)}
    if split_k <= 1:
        _kernels()["gate_up"][(blocks,)](x, norm_weight, gate_up_weight, out, *sizes, **flags)
        return out
    split_k, k_per, part, sums = _split_buffers(k, 2 * n, blocks, split_k, block_k, x.device)
    _kernels()["gate_up_split"][(blocks, split_k)](x, norm_weight, gate_up_weight, out, part, sums,
                                                   _tickets(gate_up_weight, blocks), *sizes, SPLIT=split_k,
                                                   K_PER=k_per, **flags)
    return out


def _rope_args(cos, sin, q, k_cache, v_cache):
    return (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2))


def rope_qkv_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                         positions: torch.Tensor | None = None, num_warps: int = 1, gemv: bool = False) -> torch.Tensor:
    """One kernel: qkv [T, (H + 2·KV)·D] -> q [T, H, D] with rotary (Hugging Face rotate_half layout,
    float32 math, rounded to qkv's dtype) on q and k; the rotated k and v written into k_cache,
    v_cache [S', KV, D] at `slots` [T]. cos, sin: [T, D] per row, or with `positions` [T] the tables
    [S, D] (LeanModel.rope_global[0], [1]) read at positions[t]. gemv: a launch of a GEMV forward (PDL's)."""
    t = _check_rows(qkv)
    if qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv [T, {qkv.shape[1]}] is not (heads + 2·kv_heads)·head_dim with an even head_dim")
    q = torch.empty(t, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    half = head_dim // 2
    _kernels()["rope"][(heads + 2 * kv_heads,)](
        qkv, positions if positions is not None else slots, slots, cos, sin, q, k_cache, v_cache, t, heads, kv_heads,
        half, qkv.stride(0), qkv.stride(1), *_rope_args(cos, sin, q, k_cache, v_cache),
        BY_POSITION=positions is not None, BLOCK_T=ROW_TILE, HALF_PAD=_pow2(half, 1), num_warps=num_warps,
        **_pdl_flags(qkv.device, gemv))
    return q


ROPE_COLUMNS: int | None = None  # columns of each half a norm_qkv_rope_cache program holds; None: the whole half
# norm_qkv_rope_cache's ranges of K unless asked; "auto": _split_k's choice for its programs (a head and block of
# columns each), with ranges down to ROPE_MIN_RANGE of K (and off with SPLIT_K "off"): Qwen2.5-1.5B's 16 programs,
# K 1536 -> 8 ranges on an H100, SmolLM2's 15, K 576 -> 4 (ranges of 192 at block_k 64: 3 hold K, the 4th is
# masked). Measured on an H100 (benchmarks/results/gpu-2026-12-07k/): the 1.5B's forward 2.525 ms in one range,
# 2.120 in 4, 2.121 in 8 (with SPLIT_BELOW=2, which alone changed 2.525 to 2.498), 2.260 in 2 (SPLIT_BELOW=2);
# SmolLM2's 1.096 ms in one, 1.062 in 2, 1.021 in 4, 1.033 in 8
ROPE_MIN_RANGE = 128
ROPE_SPLIT: int | str = "auto"


def norm_qkv_rope_cache(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, heads: int,
                        kv_heads: int, head_dim: int, block_k: int | None = None, num_warps: int | None = None,
                        columns: int | None = None, split_k: int | None = None, gemv: bool = False) -> torch.Tensor:
    """norm_matmul then rope_qkv_cache_write as ONE kernel (a program per head and block of `columns` of
    its halves, default ROPE_COLUMNS, the two halves in two accumulators): x [T, E], weight [(H + 2·KV)·D,
    E] (q|k|v), cos, sin tables [S, D] read at positions [T] -> q [T, H, D]; k, v written into the caches
    at slots [T]. A program per head is H + 2·KV programs (16 for Qwen2.5-1.5B: 25.7 µs on an H100,
    where its q|k|v GEMM alone ran 10.1 µs on 256 programs): blocks of 16 columns give it 4× as many,
    and split_k > 1 K in that many ranges (norm_qkv_rope_cache_split_kernel, the ranges summed in order by
    each block's last program: still a function of the weight's shape alone); split_k None: ROPE_SPLIT
    ("auto": as _split_k would split a GEMM with this many column blocks, ranges down to ROPE_MIN_RANGE)."""
    t = _check_rows(x)
    if weight.shape[0] != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"weight [{weight.shape[0]}, K] is not (heads + 2·kv_heads)·head_dim with an even head_dim")
    q = torch.empty(t, heads, head_dim, dtype=x.dtype, device=x.device)
    half = head_dim // 2
    block = _pow2(min(half, columns or (GEMV_ROPE_COLUMNS if gemv else ROPE_COLUMNS) or half), 1 if gemv else MIN_DOT)
    grid = (heads + 2 * kv_heads, -(-half // block))
    split_k = ROPE_SPLIT if split_k is None else split_k
    if split_k == "auto":
        split_k = _split_k(grid[0] * grid[1], x.shape[1], 1, x.device, min_range=ROPE_MIN_RANGE)
    pointers = (x, norm_weight, weight, bias if bias is not None else weight, positions, slots, cos, sin, q, k_cache,
                v_cache)
    sizes = (t, x.shape[1], heads, kv_heads, half, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
             *_rope_args(cos, sin, q, k_cache, v_cache), float(eps))
    flags = {"HAS_BIAS": bias is not None, "F32": _f32_dots(x, weight), "BLOCK_T": _row_tile(t, gemv),
             "HALF_PAD": block, "BLOCK_K": _pow2(block_k or (GEMV_BLOCK_K if gemv else 64)),
             "num_warps": num_warps or (GEMV_WARPS if gemv else 4), "GEMV": gemv, **_gemm_flags(x.device, gemv)}
    if split_k <= 1:
        _kernels()["qkv_rope"][grid](*pointers, *sizes, **flags)
        return q
    blocks = grid[0] * grid[1]
    split_k, k_per, part, sums = _split_buffers(x.shape[1], weight.shape[0], blocks, split_k, flags["BLOCK_K"],
                                                x.device)
    _kernels()["qkv_rope_split"][(*grid, split_k)](*pointers, part, sums, _tickets(weight, blocks), *sizes,
                                                   SPLIT=split_k, K_PER=k_per, **flags)
    return q


# The chunk kernels' last program per head (per row and head in bit-exact mode) merges the chunks itself,
# with the combine's operations in its order, instead of a second kernel: one launch a layer less, opt-in: on an
# H100 the Qwen 1.5B's forward took the same time with it at one row and 8 % longer at 5
# (benchmarks/results/gpu-2026-12-07k/; benchmarks/triton_layers_gpu.py --settings FUSE_COMBINE=1).
FUSE_COMBINE = False


def _attention_shapes(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(T, H, D, KV) of q [T, H, D] over k_cache [S', KV, D], checked."""
    t, h, d = q.shape
    if not 1 <= t <= MAX_ROWS:
        raise ValueError(f"1 <= T <= {MAX_ROWS} query rows, got {t}")
    kv = k_cache.shape[1]
    if h % kv or k_cache.shape[2] != d:
        raise ValueError(f"q [T, {h}, {d}] does not fit the cache's [S, {kv}, {k_cache.shape[2]}]")
    return t, h, d, kv


def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int,
                    positions: torch.Tensor, scale: float, chunk: int = 64, block_n: int = 64,
                    out: torch.Tensor | None = None, num_warps: int | None = None,
                    ancestors: torch.Tensor | None = None, tree_start: torch.Tensor | None = None,
                    first_node: int = 0, gemv: bool = False) -> torch.Tensor:
    """Causal grouped-query attention of q [T, H, D] (query t at positions[t], reading keys at slots
    0..positions[t], all < kv_len) over k_cache, v_cache [S', KV, D] -> [T, H, D] in q's dtype; query
    head h reads key head h // G. Two kernels: the keys split into chunks of `chunk` (one program per
    (KV head, chunk)), then the combine. kv_len only bounds the chunks launched (a CUDA graph passes
    the cache's length): chunks past the last query's reach return at once.

    A tree instead (LeanModel.forward's `ancestors`): its N nodes sit at slots tree_start + 0..N-1
    (tree_start [1], on the device), the queries are nodes first_node..first_node + T - 1, and
    ancestors [T, N] (bool) holds their rows: query t reads the keys before tree_start and the nodes
    j with ancestors[t, j]. A node's ancestors come before it (acceptance.candidate_tree's order), so
    a tree may run in pieces of rows; `positions` is then unused (rotary was applied before). gemv: a launch of
    a forward whose GEMMs run as GEMVs (PDL "gemv" launches its kernels with PDL)."""
    t, h, d, kv = _attention_shapes(q, k_cache)
    tree = ancestors is not None
    if tree and (tree_start is None or ancestors.shape[0] != t):
        raise ValueError(f"a tree's attention takes ancestors [T={t}, N] and tree_start")
    g = h // kv
    block_r = _pow2(g * t)
    if num_warps is None:  # a [128, D] accumulator and [128, block_n] scores: spread over 8 warps
        num_warps = 8 if block_r >= 128 else 4
    block_n = min(_pow2(block_n), _pow2(chunk))
    chunk = -(-chunk // block_n) * block_n  # a whole number of key blocks
    chunks = max(1, -(-kv_len // chunk))
    m = torch.empty(kv, chunks, g * t, dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    acc = torch.empty(kv, chunks, g * t, d, dtype=torch.float32, device=q.device)
    # bool as bytes (a view: no copy, no launch); a chain passes unused pointers
    anc = ancestors.view(torch.uint8) if tree and ancestors.dtype == torch.bool else ancestors if tree else positions
    start = tree_start if tree else positions
    nodes, sa_t, sa_n = (anc.shape[1], anc.stride(0), anc.stride(1)) if tree else (0, 0, 0)
    kernels = _kernels()
    if out is None:
        out = torch.empty_like(q)
    counts = _tickets(k_cache, MAX_ROWS * kv) if FUSE_COMBINE else m  # m: an unused pointer
    kernels["attention"][(kv, chunks)](
        q, k_cache, v_cache, positions, anc, start, m, total, acc, counts, out, t, kv_len, float(scale), first_node,
        nodes, q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), sa_t, sa_n, out.stride(0), out.stride(1),
        out.stride(2), chunks, G=g, D=d, CHUNK=chunk, BLOCK_R=block_r, BLOCK_N=block_n, D_PAD=_pow2(d),
        F32=_f32_dots(q, k_cache), TREE=tree, FUSE=FUSE_COMBINE, num_warps=num_warps, **_pdl_flags(q.device, gemv))
    if not FUSE_COMBINE:
        kernels["combine"][(t, h)](positions, start, m, total, acc, out, t, first_node, chunks, out.stride(0),
                                   out.stride(1), out.stride(2), G=g, D=d, CHUNK=chunk, D_PAD=_pow2(d, 1), TREE=tree,
                                   num_warps=1, **_pdl_flags(q.device, gemv))
    return out


def exact_cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int,
                          positions: torch.Tensor, nodes: torch.Tensor, scale: float, chunk: int = 64,
                          block_n: int = 64, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bit-exact attention (bit-exact mode's; speculant.models.exact_attention's walk, split into
    chunks of positions): query t of q [T, H, D] at positions[t] reads its keys at positions
    0..positions[t] in position order over k_cache, v_cache [S', KV, D] -> [T, H, D] in q's dtype. The
    key at position j < positions[0] (the call's first row: a chain's first token, a tree's root) is
    in slot j; at j >= positions[0] in slot positions[0] + nodes[t, j - positions[0]], nodes [T, W]
    holding each row's node at every depth up to its own (exact_attention.exact_layout's: a tree's
    ancestors; a chain's row t: 0..t, so every key of a chain is at slot = position). Query head h
    reads key head h // G.

    Two kernels: one program per (row, KV head, chunk of `chunk` positions) walks the row's keys of
    that chunk in blocks of block_n aligned to positions; attention_combine_kernel then merges a row's
    chunks 0, 1, .. up to its position's in that order. A row's bits are thus a function of its
    query, its keys and values in position order, and the model's shapes: not of T, of the other rows,
    of the tree, of the slots its keys sit in, or of kv_len (which only bounds the chunks launched:
    chunks past a row's position store nothing)."""
    t, h, d, kv = _attention_shapes(q, k_cache)
    if nodes.dim() != 2 or nodes.shape[0] != t:
        raise ValueError(f"nodes must be [T={t}, W] (each row's node at every depth), got {tuple(nodes.shape)}")
    g = h // kv
    block_n = min(_pow2(block_n), _pow2(chunk))
    chunk = -(-chunk // block_n) * block_n  # a whole number of key blocks
    chunks = max(1, -(-kv_len // chunk))
    m = torch.empty(kv, chunks, g * t, dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    acc = torch.empty(kv, chunks, g * t, d, dtype=torch.float32, device=q.device)
    kernels = _kernels()
    if out is None:
        out = torch.empty_like(q)
    counts = _tickets(k_cache, MAX_ROWS * kv) if FUSE_COMBINE else m  # m: an unused pointer
    kernels["exact_attention"][(t, kv, chunks)](
        q, k_cache, v_cache, positions, nodes, m, total, acc, counts, out, t, float(scale), chunks, q.stride(0),
        q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), nodes.stride(0), nodes.stride(1), out.stride(0), out.stride(1),
        out.stride(2), G=g, D=d, CHUNK=chunk, G_PAD=_pow2(g), BLOCK_N=block_n, D_PAD=_pow2(d),
        F32=_f32_dots(q, k_cache), FUSE=FUSE_COMBINE, num_warps=4, **_pdl_flags(q.device))
    if not FUSE_COMBINE:
        kernels["combine"][(t, h)](positions, positions, m, total, acc, out, t, 0, chunks, out.stride(0),
                                   out.stride(1), out.stride(2), G=g, D=d, CHUNK=chunk, D_PAD=_pow2(d, 1), TREE=False,
                                   num_warps=1, **_pdl_flags(q.device))
    return out
