"""The fused Triton kernels of speculant.models.triton_layers, each against the torch ops it replaces
(float32: within 1e-5 of the largest reference value; bfloat16: within 2e-2 of it, a few bf16 ulps,
since the kernels round fewer intermediates than torch does), with a negative control per kernel (a
wrong eps, a rotation the wrong way, an off-by-one position, a tree's mask ignored, ... must fail the
same comparison), and TritonForward (speculant.models.triton_forward) against LeanModel.forward on a
tiny random model: logits, argmax and the KV cache (trees: tests/test_triton_fused.py).
On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py,
float32 -> bf16 casts patched to round as a GPU does), and a last test compiles them for sm_90 in a
process of its own; where triton is missing the tests skip.

Long because each kernel's test sits beside its negative control, and the module's settings (split-K,
PDL, parse_settings) are tested with the kernels they steer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from speculant.acceptance import candidate_tree
from speculant.models import triton_forward as tl_forward
from speculant.models import triton_layers as tl_layers
from speculant.models.transformer import (
    LeanModel,
    RMSNorm,
    apply_rope,
    column_major,
    random_weights,
    rope_tables,
    tiny_config,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # of the largest |reference| value
ROWS = [1, 5, 17]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _bfloat16_rounds_to_nearest(triton_device):
    """Under the interpreter (triton_device "cpu"), float32 -> bfloat16 casts round as a GPU does."""
    if triton_device != "cpu":
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        _round_bfloat16_to_nearest(patch)
        yield


def _round_bfloat16_to_nearest(patch: pytest.MonkeyPatch) -> None:
    """triton 3.9's interpreter casts float32 to bfloat16 (`.to`, a store) by truncation: its cast
    passes no rounding mode to _convert_float. A GPU rounds to nearest even, and truncation doubles
    the kernels' bf16 error, so under the interpreter these tests round as a GPU does, with torch."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data, source, dest, rounding_mode):
        if source == tl.float32 and dest == tl.bfloat16:
            values = torch.from_numpy(np.array(data, dtype=np.float32).reshape(np.shape(data)))
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(data, source, dest, rounding_mode)

    patch.setattr(interpreter, "_convert_float", convert)


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    assert out.shape == ref.shape
    return _error(out, ref) <= TOLERANCE[dtype]


def _randn(*shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _matrix(n, k, dtype, device, seed, layout):
    """A weight [n, k] stored row-major (the GPU's) or column-major (LeanModel's on the CPU)."""
    w = _randn(n, k, dtype=dtype, device=device, seed=seed, scale=k ** -0.5)
    return column_major(w) if layout == "column" else w


def _layout(dtype):  # column-major as LeanModel holds float32 CPU weights, row-major otherwise
    return "column" if dtype == torch.float32 else "row"


def _norm(k, eps, dtype, device, seed, unit_offset=False):
    norm = RMSNorm(k, eps, unit_offset).to(device)
    with torch.no_grad():
        norm.weight.copy_(_randn(k, dtype=torch.float32, device=device, seed=seed, scale=0.1) + (0.0 if unit_offset else 1.0))
    return norm.to(dtype).requires_grad_(False)


# ---- the GEMM kernels --------------------------------------------------------------------------------

K, N = 72, 40  # neither a multiple of the blocks the tests use (block_k 32, block_n 16)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_matmul_is_rmsnorm_then_linear(triton_device, t, dtype):
    x = _randn(t, K, dtype=dtype, device=triton_device, seed=t)
    norm = _norm(K, 1e-6, dtype, triton_device, seed=1)
    w = _matrix(N, K, dtype, triton_device, 2, _layout(dtype))
    bias = _randn(N, dtype=dtype, device=triton_device, seed=3)  # Qwen2's q|k|v bias
    ref = F.linear(norm(x), w, bias)
    out = tl_layers.norm_matmul(x, norm.weight, norm.eps, w, bias, block_n=16, block_k=32)
    assert out.dtype == dtype and _close(out, ref, dtype), _error(out, ref)
    no_bias = tl_layers.norm_matmul(x, norm.weight, norm.eps, w, block_n=16, block_k=32, out_dtype=torch.float32)
    assert no_bias.dtype == torch.float32 and _close(no_bias, F.linear(norm(x), w), dtype)
    wrong_eps = tl_layers.norm_matmul(x, norm.weight, 0.5, w, bias, block_n=16, block_k=32)
    assert not _close(wrong_eps, ref, dtype)


@pytest.mark.parametrize("layout", ["row", "column"])
def test_norm_matmul_reads_both_weight_layouts_and_gemma_norms(triton_device, layout):
    x = _randn(5, K, dtype=torch.float32, device=triton_device, seed=0)
    norm = _norm(K, 1e-6, torch.float32, triton_device, seed=1, unit_offset=True)  # Gemma: (1 + w)
    w = _matrix(N, K, torch.float32, triton_device, 2, layout)
    ref = F.linear(norm(x), w)
    out = tl_layers.norm_matmul(x, norm.weight, norm.eps, w, unit_offset=True, block_n=16, block_k=32)
    assert _close(out, ref, torch.float32)
    assert not _close(tl_layers.norm_matmul(x, norm.weight, norm.eps, w, block_n=16, block_k=32), ref, torch.float32)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_residual_is_linear_plus_residual(triton_device, t, dtype):
    x = _randn(t, K, dtype=dtype, device=triton_device, seed=t)
    w = _matrix(N, K, dtype, triton_device, 2, _layout(dtype))
    residual = _randn(t, N, dtype=dtype, device=triton_device, seed=4)
    ref = residual + F.linear(x, w)
    out = tl_layers.matmul_residual(x, w, residual, block_n=16, block_k=32)
    assert _close(out, ref, dtype), _error(out, ref)
    assert not _close(tl_layers.matmul_residual(x, w, torch.zeros_like(residual), block_n=16, block_k=32), ref, dtype)
    in_place = residual.clone()
    tl_layers.matmul_residual(x, w, in_place, out=in_place, block_n=16, block_k=32)
    assert torch.equal(in_place, out)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gemv_path_is_each_gemm(triton_device, split, dtype):
    """gemv=True (_gemv_sums: W's blocks times each row, no tensor cores), which one-row calls outside
    bit-exact mode take: norm_matmul with a bias, matmul_residual in place (K whole and in `split` ranges),
    norm_gate_up_silu and norm_qkv_rope_cache against torch's ops, for one row and for 5; use_gemv's policy.
    Negative control: the GEMV of a weight with one column block zeroed is not the GEMM."""
    norm = _norm(K, 1e-6, dtype, triton_device, seed=1)
    w = _matrix(N, K, dtype, triton_device, 2, _layout(dtype))
    bias = _randn(N, dtype=dtype, device=triton_device, seed=3)
    gate_up = _matrix(2 * N, K, dtype, triton_device, 6, _layout(dtype))
    for t in (1, 5):
        x = _randn(t, K, dtype=dtype, device=triton_device, seed=5)
        normed = norm(x)
        ref = F.linear(normed, w, bias)
        out = tl_layers.norm_matmul(x, norm.weight, norm.eps, w, bias, gemv=True, split_k=split)
        assert _close(out, ref, dtype), _error(out, ref)
        residual = _randn(t, N, dtype=dtype, device=triton_device, seed=4)
        ref = residual + F.linear(x, w)
        tl_layers.matmul_residual(x, w, residual, out=residual, gemv=True, split_k=split)
        assert _close(residual, ref, dtype), _error(residual, ref)
        gate, up = F.linear(normed, gate_up).chunk(2, dim=-1)
        ref = F.silu(gate) * up
        out = tl_layers.norm_gate_up_silu(x, norm.weight, norm.eps, gate_up, gemv=True)
        assert _close(out, ref, dtype), _error(out, ref)
        broken = w.clone()
        broken[:16] = 0
        assert not _close(tl_layers.norm_matmul(x, norm.weight, norm.eps, broken, bias, gemv=True),
                          F.linear(normed, w, bias), dtype)
    heads, kv, d = 3, 1, 64
    w_qkv = _matrix((heads + 2 * kv) * d, K, dtype, triton_device, 7, _layout(dtype))
    cos, sin = (_randn(16, d, dtype=dtype, device=triton_device, seed=s) for s in (8, 9))
    x = _randn(1, K, dtype=dtype, device=triton_device, seed=10)
    caches = [torch.zeros(16, kv, d, dtype=dtype, device=triton_device) for _ in range(4)]
    position = torch.tensor([7], device=triton_device)
    outs = [tl_layers.norm_qkv_rope_cache(x, norm.weight, norm.eps, w_qkv, None, cos, sin, position, *caches[2 * i:2 * i + 2],
                                          position, heads, kv, d, gemv=gemv) for i, gemv in enumerate((False, True))]
    assert _close(outs[1], outs[0], dtype), _error(outs[1], outs[0])
    for dot, gemv in zip(caches[:2], caches[2:]):
        assert _close(gemv[7], dot[7], dtype), _error(gemv[7], dot[7])
    assert tl_layers.use_gemv(1, exact=False) == bool(tl_layers.GEMV)
    assert not tl_layers.use_gemv(1, exact=True) and not tl_layers.use_gemv(2, exact=False)


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_gemm_is_the_gemm_and_keeps_a_row_to_itself(triton_device, split, dtype):
    """norm_matmul_split_kernel (K in `split` ranges, the last program of a column block summing them in
    order): the same function as the one-range kernel, with every epilogue (norm, bias, residual in
    place); a row's bits the same alone and among 17 rows; the tickets back at zero after each call.
    The same for norm_gate_up_silu_split_kernel against the one-range gate/up kernel.
    Negative control: a split whose ranges leave out K's tail (K_PER one block short) must fail."""
    t = 17
    x = _randn(t, K, dtype=dtype, device=triton_device, seed=5)
    norm = _norm(K, 1e-6, dtype, triton_device, seed=1)
    w = _matrix(N, K, dtype, triton_device, 2, _layout(dtype))
    bias = _randn(N, dtype=dtype, device=triton_device, seed=3)
    residual = _randn(t, N, dtype=dtype, device=triton_device, seed=4)
    blocks = {"block_n": 16, "block_k": 16, "split_k": split}
    ref = F.linear(norm(x), w, bias)
    out = tl_layers.norm_matmul(x, norm.weight, norm.eps, w, bias, **blocks)
    assert _close(out, ref, dtype), _error(out, ref)
    alone = torch.cat([tl_layers.norm_matmul(x[i:i + 1], norm.weight, norm.eps, w, bias, **blocks) for i in range(t)])
    assert torch.equal(alone, out)
    in_place = residual.clone()
    tl_layers.matmul_residual(x, w, in_place, out=in_place, **blocks)
    assert _close(in_place, residual + F.linear(x, w), dtype)
    assert int(tl_layers._tickets(w, -(-N // 16)).abs().sum()) == 0
    gate_up = _matrix(2 * N, K, dtype, triton_device, 6, _layout(dtype))
    whole = tl_layers.norm_gate_up_silu(x, norm.weight, norm.eps, gate_up, block_n=16, block_k=16)
    split_up = tl_layers.norm_gate_up_silu(x, norm.weight, norm.eps, gate_up, block_n=16, block_k=16, split_k=split)
    assert _close(split_up, whole, dtype), _error(split_up, whole)
    alone = torch.cat([tl_layers.norm_gate_up_silu(x[i:i + 1], norm.weight, norm.eps, gate_up, block_n=16,
                                                   block_k=16, split_k=split) for i in range(t)])
    assert torch.equal(alone, split_up)
    kernel = tl_layers._kernels()["norm_matmul_split"]
    short = torch.empty_like(out)
    k_per = -(-K // (split * 16)) * 16 - 16  # each range one block short: K's last columns never summed
    part = torch.empty(split, tl_layers.ROW_TILE, N, dtype=torch.float32, device=x.device)
    sums = torch.empty(-(-N // 16), split, tl_layers.ROW_TILE, dtype=torch.float32, device=x.device)
    kernel[(-(-N // 16), split)](x, norm.weight, w, bias, short, short, part, sums, tl_layers._tickets(w, -(-N // 16)),
                                 t, K, N, x.stride(0), x.stride(1), w.stride(0), w.stride(1), short.stride(0),
                                 short.stride(1), short.stride(0), short.stride(1), float(norm.eps), NORM=True,
                                 UNIT=False, HAS_BIAS=True, HAS_RES=False, F32=tl_layers._f32_dots(x, w), SPLIT=split,
                                 K_PER=k_per, BLOCK_T=tl_layers.ROW_TILE, BLOCK_N=16, BLOCK_K=16, GEMV=False,
                                 **tl_layers._gemm_flags(x.device))
    assert not _close(short, ref, dtype)


def test_pdl_is_on_for_gemv_forwards_only_and_never_on_the_cpu(monkeypatch):
    """_pdl_flags, _gemm_flags: programmatic dependent launch by default only for the launches of a GEMV forward
    (PDL "gemv": one row outside bit-exact mode), for every launch with PDL on, for none with it off, and never on
    the CPU (the interpreter cannot run griddepcontrol) or where the GPU or triton lacks it; the GEMMs' PREFETCH
    only with PDL; any other word is an error."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    on, off = {"PDL": True, "launch_pdl": True}, {"PDL": False}
    monkeypatch.setitem(tl_layers._PDL_SUPPORT, str(cuda), True)
    assert tl_layers.PDL == "gemv"
    assert [tl_layers._pdl_flags(cuda, gemv) for gemv in (False, True)] == [off, on]
    assert tl_layers._pdl_flags(cpu, True) == off
    monkeypatch.setattr(tl_layers, "PDL", 1)
    monkeypatch.setattr(tl_layers, "PREFETCH", 4)
    assert tl_layers._gemm_flags(cpu) == {"PDL": False, "PREFETCH": 0}
    assert tl_layers._gemm_flags(cuda) == {**on, "PREFETCH": 4}
    monkeypatch.setitem(tl_layers._PDL_SUPPORT, str(cuda), False)  # an older GPU or triton
    assert tl_layers._gemm_flags(cuda, True) == {"PDL": False, "PREFETCH": 0}
    monkeypatch.setitem(tl_layers._PDL_SUPPORT, str(cuda), True)
    monkeypatch.setattr(tl_layers, "PDL", False)
    assert [tl_layers._pdl_flags(cuda, gemv) for gemv in (False, True)] == [off, off]
    monkeypatch.setattr(tl_layers, "PDL", "always")
    with pytest.raises(ValueError, match="gemv"):
        tl_layers._pdl_flags(cuda)


def test_settings_parse_check_their_names_and_come_back():
    """parse_settings: NAME=VALUE pairs, integers where they parse; an unknown name is a ValueError naming it.
    settings(): set while the block runs, restored after it, also on an error."""
    assert tl_layers.parse_settings("PDL=1, PREFETCH=4,SPLIT_K=off") == {"PDL": 1, "PREFETCH": 4, "SPLIT_K": "off"}
    assert tl_layers.parse_settings("") == {}
    with pytest.raises(ValueError, match="NO_SUCH"):
        tl_layers.parse_settings("PDL=1,NO_SUCH=2")
    before = (tl_layers.PDL, tl_layers.PREFETCH)
    with pytest.raises(RuntimeError), tl_layers.settings({"PDL": 1, "PREFETCH": 4}):
        assert (tl_layers.PDL, tl_layers.PREFETCH) == (1, 4)
        raise RuntimeError
    assert (tl_layers.PDL, tl_layers.PREFETCH) == before


def test_a_gemms_tile_width_follows_its_outputs_up_to_128():
    """_block_n: about GEMM_PROGRAMS column blocks, at least 16 and at most MAX_BLOCK_N columns each (the
    widths measured best on an H100: Qwen2.5-1.5B's head and gate/up in 128, its q/k/v in 32)."""
    assert tl_layers._block_n(151936, None) == 128  # a head
    assert tl_layers._block_n(8960, None) == 128  # Qwen2.5-1.5B's gate/up (I outputs)
    assert tl_layers._block_n(2048, None) == 32  # its q|k|v
    assert tl_layers._block_n(1536, None) == 32  # its o_proj and down_proj
    assert tl_layers._block_n(576, None) == 16  # SmolLM2's
    assert tl_layers._block_n(151936, 48) == 64  # asked for: a power of two


def test_split_k_is_chosen_from_the_weight_and_the_gpu_never_from_the_rows(monkeypatch):
    """_split_k: no split on the CPU or where the column blocks fill the SMs; on 132 SMs Qwen2.5-1.5B's
    down_proj (48 blocks of 32, K 8960) gets 8 ranges, its o_proj 4, SmolLM2's o_proj (36 blocks, K 576)
    2, as long as every range keeps MIN_SPLIT_K of K; SPLIT_K = "off" turns it off."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setitem(tl_layers._SMS, cuda, 132)
    assert tl_layers._split_k(1536, 8960, 32, torch.device("cpu")) == 1
    assert tl_layers._split_k(1536, 8960, 32, cuda) == 8  # 384 programs, ranges of 1120
    assert tl_layers._split_k(1536, 1536, 32, cuda) == 4
    assert tl_layers._split_k(576, 576, 16, cuda) == 2
    assert tl_layers._split_k(576, 1536, 16, cuda) == 4
    assert tl_layers._split_k(151936, 1536, 64, cuda) == 1  # the head: 2374 blocks
    assert tl_layers._split_k(8960, 1536, 64, cuda) == 1  # 140 blocks fill the SMs
    # norm_qkv_rope_cache's programs (a head each, ROPE_SPLIT "auto", ranges down to ROPE_MIN_RANGE of K):
    # Qwen2.5-1.5B's 16, SmolLM2's 15
    rope = tl_layers.ROPE_MIN_RANGE
    assert tl_layers._split_k(12 + 2 * 2, 1536, 1, cuda, min_range=rope) == 8
    assert tl_layers._split_k(9 + 2 * 3, 576, 1, cuda, min_range=rope) == 4
    assert tl_layers._split_k(9 + 2 * 3, 576, 1, cuda) == 2  # the GEMMs' MIN_SPLIT_K
    monkeypatch.setattr(tl_layers, "SPLIT_BELOW", 2)  # ... unless they must fill them twice
    assert tl_layers._split_k(8960, 1536, 64, cuda) == 2  # 280 programs; 4 ranges would be 560 > 4 × 132
    monkeypatch.setattr(tl_layers, "SPLIT_BELOW", 1)
    assert tl_layers._split_k(1536, 300, 32, cuda) == 1  # ranges would be shorter than MIN_SPLIT_K
    monkeypatch.setattr(tl_layers, "SPLIT_K", "off")
    assert tl_layers._split_k(1536, 8960, 32, cuda) == 1


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_gate_up_silu_is_the_mlp_up_to_down(triton_device, t, dtype):
    inter = 24  # not a multiple of block_n 16
    x = _randn(t, K, dtype=dtype, device=triton_device, seed=t)
    norm = _norm(K, 1e-6, dtype, triton_device, seed=1)
    gate_up = _matrix(2 * inter, K, dtype, triton_device, 5, _layout(dtype))
    gate, up = F.linear(norm(x), gate_up).chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = tl_layers.norm_gate_up_silu(x, norm.weight, norm.eps, gate_up, block_n=16, block_k=32)
    assert _close(out, ref, dtype), _error(out, ref)
    swapped = torch.cat([gate_up[inter:], gate_up[:inter]])  # up | gate: silu on the wrong half
    assert not _close(tl_layers.norm_gate_up_silu(x, norm.weight, norm.eps, swapped, block_n=16, block_k=32), ref, dtype)


# ---- rotary and the cache write ----------------------------------------------------------------------

SLOTS = 48  # cache slots in the rotary and attention tests


def _qkv_case(t, dtype, device, heads, kv_heads, d, start=7):
    qkv = _randn(t, (heads + 2 * kv_heads) * d, dtype=dtype, device=device, seed=t)
    rope = rope_tables(10000.0, d, SLOTS, device=device)
    positions = torch.arange(start, start + t, device=device)
    caches = [_randn(SLOTS, kv_heads, d, dtype=dtype, device=device, seed=s) for s in (8, 9)]
    return qkv, rope, positions, caches


def _rope_reference(qkv, rope, positions, caches, heads, kv_heads, d):
    """LeanModel._attention's split, rotary and index_copy_ -> (q [T, H, D], k cache, v cache)."""
    t = qkv.shape[0]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k, v = q.reshape(t, heads, d), k.reshape(t, kv_heads, d), v.reshape(t, kv_heads, d)
    cos, sin = rope[:, positions, None, :]
    k_cache, v_cache = caches[0].clone(), caches[1].clone()
    k_cache.index_copy_(0, positions, apply_rope(k, cos, sin))
    v_cache.index_copy_(0, positions, v)
    return apply_rope(q, cos, sin), k_cache, v_cache


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, d", [(4, 2, 8), (6, 2, 12)])  # groups 2 and 3; half 6: padded
def test_rope_qkv_cache_write_is_split_rotate_and_index_copy(triton_device, t, dtype, heads, kv_heads, d):
    qkv, rope, positions, caches = _qkv_case(t, dtype, triton_device, heads, kv_heads, d)
    q_ref, k_ref, v_ref = _rope_reference(qkv, rope, positions, caches, heads, kv_heads, d)
    for per_row in (True, False):  # cos, sin [T, D] per row, or the tables read at positions
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        cos, sin = (rope[0, positions], rope[1, positions]) if per_row else (rope[0], rope[1])
        q = tl_layers.rope_qkv_cache_write(qkv, cos, sin, k_cache, v_cache, positions, heads, kv_heads, d,
                                           positions=None if per_row else positions)
        assert _close(q, q_ref, dtype) and _close(k_cache, k_ref, dtype), (_error(q, q_ref), _error(k_cache, k_ref))
        assert torch.equal(v_cache, v_ref)  # moved, not computed
    k_cache = caches[0].clone()
    q = tl_layers.rope_qkv_cache_write(qkv, rope[0], -rope[1], k_cache, caches[1].clone(), positions, heads,
                                       kv_heads, d, positions=positions)  # rotated the other way
    assert not _close(q, q_ref, dtype) and not _close(k_cache, k_ref, dtype)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, d, bias, columns, split", [
    (4, 2, 8, False, None, 1), (6, 2, 12, True, None, 1), (2, 1, 64, False, 16, 1), (3, 1, 40, True, 16, 1),
    (3, 1, 40, True, 16, 2), (4, 2, 8, False, None, 3)])
def test_norm_qkv_rope_cache_is_the_two_kernels_in_one(triton_device, t, dtype, heads, kv_heads, d, bias, columns,
                                                       split):
    """columns 16: each head's halves in blocks of 16 columns, a program each (the last one masked where
    the half, 20, is not a multiple of it); split > 1: K (40) in ranges of 32, the last one's program
    summing them (norm_qkv_rope_cache_split_kernel)."""
    e = 40  # hidden size, not a multiple of block_k 32
    x = _randn(t, e, dtype=dtype, device=triton_device, seed=t)
    norm = _norm(e, 1e-6, dtype, triton_device, seed=1)
    w = _matrix((heads + 2 * kv_heads) * d, e, dtype, triton_device, 2, _layout(dtype))
    b = _randn(w.shape[0], dtype=dtype, device=triton_device, seed=3) if bias else None
    _, rope, positions, caches = _qkv_case(t, dtype, triton_device, heads, kv_heads, d)
    q_ref, k_ref, v_ref = _rope_reference(F.linear(norm(x), w, b), rope, positions, caches, heads, kv_heads, d)
    k_cache, v_cache = caches[0].clone(), caches[1].clone()
    q = tl_layers.norm_qkv_rope_cache(x, norm.weight, norm.eps, w, b, rope[0], rope[1], positions, k_cache, v_cache,
                                      positions, heads, kv_heads, d, block_k=32, columns=columns, split_k=split)
    for out, ref in ((q, q_ref), (k_cache, k_ref), (v_cache, v_ref)):
        assert _close(out, ref, dtype), _error(out, ref)
    q_wrong = tl_layers.norm_qkv_rope_cache(x, norm.weight, norm.eps, w, b, rope[0], rope[1], positions + 1,
                                            caches[0].clone(), caches[1].clone(), positions, heads, kv_heads, d)
    assert not _close(q_wrong, q_ref, dtype)  # rotated for the next position


# ---- attention over the cache ------------------------------------------------------------------------


def _attention_reference(q, k_cache, v_cache, positions, scale):
    """Per query row and head, softmax over keys 0..positions[t] of key head h // G, in float64."""
    h = q.shape[1]
    g = h // k_cache.shape[1]
    kv_len = int(positions.max()) + 1
    keys = k_cache[:kv_len].double().repeat_interleave(g, dim=1)  # [kv_len, H, D]
    values = v_cache[:kv_len].double().repeat_interleave(g, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), keys) * scale
    allowed = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]  # [T, kv_len]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return torch.einsum("hts,shd->thd", probs, values)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, d", [(4, 2, 8), (6, 2, 12)])
def test_cache_attention_is_causal_grouped_attention(triton_device, t, dtype, heads, kv_heads, d):
    start = 23  # keys in two chunks of 16 and more (the combine merges them)
    q = _randn(t, heads, d, dtype=dtype, device=triton_device, seed=t)
    k_cache, v_cache = (_randn(SLOTS, kv_heads, d, dtype=dtype, device=triton_device, seed=s, scale=2.0)
                        for s in (8, 9))
    positions = torch.arange(start, start + t, device=triton_device)
    # the slot after the last query: a key every query would pick, which causality must hide
    k_cache[start + t] = 3 * q[-1, ::heads // kv_heads]
    v_cache[start + t] = 10.0
    scale = d ** -0.5
    ref = _attention_reference(q, k_cache, v_cache, positions, scale)
    out = tl_layers.cache_attention(q, k_cache, v_cache, start + t, positions, scale, chunk=16, block_n=16)
    assert out.dtype == dtype and _close(out, ref, dtype), _error(out, ref)
    # the whole cache as kv_len (a CUDA graph's fixed shape): the chunks past the last query do nothing
    static = tl_layers.cache_attention(q, k_cache, v_cache, SLOTS, positions, scale, chunk=16, block_n=16)
    assert _close(static, ref, dtype)
    off_by_one = tl_layers.cache_attention(q, k_cache, v_cache, start + t + 1, positions + 1, scale, chunk=16,
                                           block_n=16)
    assert not _close(off_by_one, ref, dtype)


def _tree_attention_reference(q, k_cache, v_cache, start, ancestors, scale):
    """Node t of a tree at slots start.. reads the keys before `start` and its ancestors' slots, in float64."""
    h = q.shape[1]
    g = h // k_cache.shape[1]
    n = ancestors.shape[1]
    keys = k_cache[: start + n].double().repeat_interleave(g, dim=1)  # [start + N, H, D]
    values = v_cache[: start + n].double().repeat_interleave(g, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), keys) * scale
    allowed = torch.cat([torch.ones(q.shape[0], start, dtype=torch.bool, device=q.device), ancestors], 1)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return torch.einsum("hts,shd->thd", probs, values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_attention_over_a_tree_reads_the_cache_and_its_ancestors_only(triton_device, dtype):
    """A 12-node tree (γ 3, K 3, a lookup branch of 2) at slots 23..34, across a chunk boundary: each
    node against the float64 reference, whole and in pieces of rows (a tree longer than MAX_ROWS runs
    so); every non-ancestor slot holds a key its queries would pick, so ignoring the mask must fail."""
    heads, kv_heads, d, start = 4, 2, 8, 23
    _, ancestors = candidate_tree(3, 3, 2)
    n = ancestors.shape[0]
    ancestors = ancestors.to(triton_device)
    q = _randn(n, heads, d, dtype=dtype, device=triton_device, seed=1)
    k_cache, v_cache = (_randn(SLOTS, kv_heads, d, dtype=dtype, device=triton_device, seed=s, scale=2.0)
                        for s in (8, 9))
    k_cache[start + n] = 3 * q[-1, ::heads // kv_heads]  # past the tree
    v_cache[start + n] = 10.0
    tree_start = torch.tensor([start], device=triton_device)
    positions = torch.zeros(n, dtype=torch.long, device=triton_device)  # unused by a tree's attention
    scale = d ** -0.5
    ref = _tree_attention_reference(q, k_cache, v_cache, start, ancestors, scale)
    out = tl_layers.cache_attention(q, k_cache, v_cache, SLOTS, positions, scale, chunk=16, block_n=16,
                                    ancestors=ancestors, tree_start=tree_start)
    assert out.dtype == dtype and _close(out, ref, dtype), _error(out, ref)
    pieces = [tl_layers.cache_attention(q[first:first + 5], k_cache, v_cache, SLOTS, positions[first:first + 5], scale,
                                        chunk=16, block_n=16, ancestors=ancestors[first:first + 5],
                                        tree_start=tree_start, first_node=first) for first in range(0, n, 5)]
    assert _close(torch.cat(pieces), ref, dtype)
    every = torch.ones_like(ancestors)
    unmasked = tl_layers.cache_attention(q, k_cache, v_cache, SLOTS, positions, scale, chunk=16, block_n=16,
                                         ancestors=every, tree_start=tree_start)
    assert not _close(unmasked, ref, dtype)


# ---- the whole forward -------------------------------------------------------------------------------


def _models(device, dtype, layers=2, **overrides):
    """(reference, model, truth): LeanModels over the same weights, each with its own cache; truth
    runs them in float32 (None for float32 weights: the reference is the truth)."""
    cfg = tiny_config(num_layers=layers, **overrides)
    weights = random_weights(cfg, seed=0, scale=2.0, dtype=dtype).to(device)
    truth = None if dtype == torch.float32 else \
        LeanModel(random_weights(cfg, seed=0, scale=2.0, dtype=dtype).to(device, torch.float32), max_seq_len=64)
    assert weights.embed_tokens.weight.dtype == dtype
    return LeanModel(weights, max_seq_len=64), LeanModel(weights, max_seq_len=64), truth


@pytest.mark.parametrize("dtype, bias, fuse_rope", [(torch.float32, False, True), (torch.float32, True, False),
                                                    (torch.bfloat16, True, True)])
def test_triton_forward_is_lean_model_forward(triton_device, dtype, bias, fuse_rope):
    """float32: the same logits and cache as LeanModel.forward within 1e-5. bfloat16, where both round
    differently: no farther from the float32 forward of the same weights than LeanModel's bf16
    forward is (1.5x, at least 1e-2 of the largest logit), and the same argmax wherever the
    reference has no near tie."""
    reference, model, truth = _models(triton_device, dtype, attention_bias=bias)
    forward = tl_forward.TritonForward(model, chunk=16, fuse_rope=fuse_rope)
    prompt = torch.tensor([(7 * i + 3) % 64 for i in range(35)])  # > MAX_ROWS: two pieces
    calls = [(prompt, 0), (torch.tensor([5]), 35), (torch.tensor([9, 1, 4, 4, 2]), 36),  # a verify of 5
             (torch.tensor([8, 3]), 38)]  # 2 kept of the 5: rewrite from 38
    for tokens, start in calls:
        for m in (reference, model, truth):
            if m is not None:
                m.truncate(min(m.length, start))
        want, got = reference.forward(tokens, start), forward(tokens, start)
        assert got.dtype == torch.float32 and model.length == reference.length == start + tokens.shape[0]
        end = reference.length
        if truth is None:
            assert _close(got, want, dtype), _error(got, want)
            for cache, ref in ((model.k_cache, reference.k_cache), (model.v_cache, reference.v_cache)):
                assert _close(cache[:, :end], ref[:, :end], dtype)
        else:
            exact = truth.forward(tokens, start)
            assert _error(got, exact) <= max(1.5 * _error(want, exact), 1e-2), (_error(got, exact), _error(want, exact))
            for cache, ref, true in ((model.k_cache, reference.k_cache, truth.k_cache),
                                     (model.v_cache, reference.v_cache, truth.v_cache)):
                assert _error(cache[:, :end], true[:, :end]) <= max(1.5 * _error(ref[:, :end], true[:, :end]), 1e-2)
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * TOLERANCE[dtype] * want.abs().max()  # no near tie
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]) and clear.any()


def count_launches(monkeypatch, kernels: dict, launched: list | None = None) -> list:
    """From now on each launch of a kernel in `kernels` (a name -> kernel table such as triton_layers._kernels())
    appends its name to `launched` (returned; a new list by default)."""
    launched = [] if launched is None else launched

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for name, kernel in list(kernels.items()):
        monkeypatch.setitem(kernels, name, Counting(name, kernel))
    return launched


def test_triton_forward_launches_six_kernels_per_layer(triton_device, monkeypatch):
    """6 per layer and the head (7 per layer without the rope fusion); the embedding is torch's gather."""
    _, model, _ = _models(triton_device, torch.float32, layers=3)
    launched = count_launches(monkeypatch, tl_layers._kernels())
    tokens, positions = torch.tensor([1, 2, 3], device=triton_device), torch.arange(3, device=triton_device)
    for fuse_rope, per_layer in ((True, 6), (False, 7)):
        launched.clear()
        tl_forward.TritonForward(model, chunk=16, fuse_rope=fuse_rope).forward_static(tokens, positions, kv_len=3)
        assert len(launched) == per_layer * 3 + 1


def test_triton_forward_refuses_what_it_does_not_run(triton_device):
    with pytest.raises(ValueError, match="Llama"):
        cfg = tiny_config("gemma3")
        tl_forward.TritonForward(LeanModel(random_weights(cfg).to(triton_device), max_seq_len=16))
    with pytest.raises(ValueError, match="sliding"):
        cfg = tiny_config(sliding_window=4)
        tl_forward.TritonForward(LeanModel(random_weights(cfg).to(triton_device), max_seq_len=16))
    with pytest.raises(ValueError, match="frozen"):
        cfg = tiny_config()
        tl_forward.TritonForward(LeanModel(random_weights(cfg).requires_grad_(True).to(triton_device), max_seq_len=16))


# ---- what the interpreter cannot check: the compiler -------------------------------------------------

HOPPER_COMPILE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from speculant.acceptance import candidate_tree
from speculant.models import triton_forward as tl_forward
from speculant.models import triton_layers as tl_layers
from speculant.models.exact_attention import exact_layout
from speculant.models.transformer import LeanModel, TransformerConfig, random_weights

TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64", torch.uint8: "*u8", torch.int32: "*i32"}
done = set()

class Compile:  # stands in for kernel[grid](...): compiles the call's specialisation for sm_90
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        def launch(*args, num_warps=4, launch_pdl=False, **constexprs):
            signature, constants = {}, dict(constexprs)
            for name, arg in zip(self.fn.arg_names, args):
                if isinstance(arg, torch.Tensor):
                    signature[name] = TYPES[arg.dtype]
                elif isinstance(arg, float):
                    signature[name] = "fp32"
                elif arg == 1 and name not in self.fn.do_not_specialize:  # triton specialises an int equal to 1
                    constants[name] = 1
                else:
                    signature[name] = "i32"
            signature.update(dict.fromkeys(constants, "constexpr"))
            key = (self.fn.__name__, str(sorted(constants.items())))
            if key not in done:
                done.add(key)
                triton.compile(ASTSource(self.fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": num_warps, "launch_pdl": launch_pdl})
        return launch

kernels = tl_layers._kernels()
for name in list(kernels):
    kernels[name] = Compile(kernels[name])
tl_layers._f32_dots = lambda *ts: any(t.dtype == torch.float32 for t in ts)  # as on a GPU
cfg = TransformerConfig(arch="llama", vocab_size=256, hidden_size=576, intermediate_size=1536, num_heads=9,
                        num_kv_heads=3, head_dim=64, num_layers=1, attention_bias=True)  # SmolLM2-135M's layer
model = LeanModel(random_weights(cfg, dtype=torch.bfloat16), max_seq_len=256)
for fuse_rope in (True, False):
    for t in (1, 17):
        tl_forward.TritonForward(model, fuse_rope=fuse_rope).forward_static(torch.zeros(t, dtype=torch.long),
                                                                            torch.arange(t))
depths, ancestors = candidate_tree(4, 4, 8)  # 25 nodes: a tree of the fused step
tl_forward.TritonForward(model).forward_static(torch.zeros(25, dtype=torch.long), 40 + depths, ancestors)
nodes = exact_layout(depths, ancestors)[1][:25]  # bit-exact mode: a chain of 1 and of 40 rows, the tree
for t in (1, 40):
    tl_forward.TritonForward(model).forward_exact(torch.zeros(t, dtype=torch.long), torch.arange(t))
tl_forward.TritonForward(model).forward_exact(torch.zeros(25, dtype=torch.long), 40 + depths, nodes)
x = torch.zeros(1, 1536, dtype=torch.bfloat16)  # the split-K GEMM: ranges of K
tl_layers._linear(x, torch.zeros(576, 1536, dtype=torch.bfloat16), residual=torch.zeros(1, 576, dtype=torch.bfloat16),
                  block_n=16, block_k=64, split_k=4)
tl_layers.norm_matmul(x, torch.ones(1536, dtype=torch.bfloat16), 1e-6, torch.zeros(64, 1536, dtype=torch.bfloat16),
                      torch.zeros(64, dtype=torch.bfloat16), block_n=16, split_k=2)
tl_layers.norm_gate_up_silu(x, torch.ones(1536, dtype=torch.bfloat16), 1e-6, torch.zeros(256, 1536, dtype=torch.bfloat16),
                            block_n=32, split_k=2)
tl_layers.ROPE_COLUMNS, tl_layers.ROPE_SPLIT = 16, 2  # the fused q/k/v + rotary kernel in column blocks and ranges
tl_layers.FUSE_COMBINE = True  # attention's chunks merged by their last program
tl_forward.TritonForward(model).forward_static(torch.zeros(1, dtype=torch.long), torch.arange(1))
tl_forward.TritonForward(model).forward_exact(torch.zeros(25, dtype=torch.long), 40 + depths, nodes)
tl_layers.FUSE_COMBINE, tl_layers.ROPE_COLUMNS, tl_layers.ROPE_SPLIT = False, None, "auto"
tl_layers._linear(x, torch.zeros(576, 1536, dtype=torch.bfloat16), residual=torch.zeros(1, 576, dtype=torch.bfloat16),
                  split_k=4, gemv=True)  # a split GEMV (one row: forward_static's are above)
tl_layers._pdl_flags = lambda device, gemv=False: {"PDL": True, "launch_pdl": True}  # programmatic dependent launch, as on sm_90
tl_layers.PREFETCH = 4  # the GEMMs' first weights into L2 before the wait
tl_forward.TritonForward(model).forward_static(torch.zeros(1, dtype=torch.long), torch.arange(1))
tl_forward.TritonForward(model).forward_exact(torch.zeros(25, dtype=torch.long), 40 + depths, nodes)
tl_layers._linear(x, torch.zeros(576, 1536, dtype=torch.bfloat16), residual=torch.zeros(1, 576, dtype=torch.bfloat16),
                  block_n=16, block_k=64, split_k=4)  # split-K with the prefetch of a range's weights
tl_layers.norm_gate_up_silu(x, torch.ones(1536, dtype=torch.bfloat16), 1e-6, torch.zeros(256, 1536, dtype=torch.bfloat16),
                            block_n=32, split_k=2)
from speculant.models import persistent_forward as pf  # the one-launch forward: both polls, and the prefetch
pf._kernel()
pf._KERNELS["forward"] = Compile(pf._KERNELS["forward"])
pf.PERSISTENT = True
pf._inline_asm = lambda device: True  # as on a GPU
for poll, prefetch in (("atomic", 0), ("load", 1)):
    pf.POLL, pf.PREFETCH = poll, prefetch
    tl_forward.TritonForward(model).forward_static(torch.zeros(1, dtype=torch.long), torch.arange(1))
print(len(done), "kernels compiled")
"""


def test_the_kernels_compile_for_hopper(triton_device, tmp_path):
    """The interpreter runs the kernels as Python: it never sees a type the compiler would reject
    (a loop-carried value changing type, a tl.dot tile under 16, ...). So every kernel TritonForward
    launches (SmolLM2-135M's layer, bfloat16, T 1 and 17, both rope paths, a tree, and bit-exact mode's
    forward_exact: chains of 1 and 40 rows, a tree; split-K GEMMs; with programmatic dependent launch, PDL,
    and the GEMMs' prefetch, as on a GPU that has it; the one-launch forward of persistent_forward) is compiled here for sm_90 with triton's own ptxas,
    in a process without TRITON_INTERPRET; no GPU is needed."""
    if triton_device == "cuda":
        pytest.skip("on a GPU the other tests compile and run them")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], check=False, env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "kernels compiled" in done.stdout
