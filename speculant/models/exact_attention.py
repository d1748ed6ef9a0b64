"""Bit-exact mode: attention whose bits for a query depend on that query's own keys only.

On a GPU in bfloat16 a position's logits depend on how many rows the forward computes (the GEMM
kernel is chosen by M, attention splits its keys by the number of queries, compiled reductions by
the shapes), so a γ+1-row verification rounds differently from a 1-row plain step and near-ties
flip: speculative greedy output then differs from plain greedy output on some prompts. In bit-exact
mode (speculant.fused.FusedStepper(bit_exact=True)) every target forward after the prompt computes
exactly EXACT_WIDTH rows (padded with dummy rows), so every GEMM and every compiled kernel has the
same shapes and a row's result depends on that row alone; and attention is this module's: query
row r walks ITS OWN keys in POSITION order j = 0..pos(r), reading cache slot j for j < start and
slot table[r, j - start] (its ancestor at that depth in a tree; start + depth in a chain) for
j >= start, in blocks of BLOCK keys aligned to positions, with an online softmax in float32 in a
fixed order. The same position with the same context then meets the same keys in the same order,
however many rows the call has, where in the call the row sits, which tree it belongs to, or in
which slot a tree node's key lies. So its logits are a function of its context only, bit for bit.
The generic step (a hierarchy of drafters, a draft through transformers, logprobs) reaches the same
calls through speculant.exact_target.ExactTarget, so every drafter is covered.

Two implementations of the same math: a Triton kernel (CUDA; `triton` is imported only when it
runs) and plain torch (the CPU, and the reference the kernel is tested against). Each is
row-invariant by itself; they agree with each other up to rounding (their in-block reductions are
grouped differently).

On speculant's own Triton kernels (FusedStepper(bit_exact=True, kernels="triton")) bit-exact mode
needs no fixed width: models.triton_layers.exact_cache_attention walks each row's keys in the same
position order, reading a tree node's through exact_layout's `nodes`, split into chunks of positions
(one program each, merged in order) so that a plain step still spreads over the GPU, and the GEMM
kernels around it give a row the same bits in a call of any number of rows
(models.triton_forward.TritonForward.forward_exact). Not yet run on a GPU.

Shapes: W = EXACT_WIDTH rows, KV = key/value heads, G = query heads per key/value head, D = head
dim, S' = cache slots (the context's S, then EXACT_WIDTH scratch slots the padding rows write to).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EXACT_WIDTH = 32  # rows of every target forward in bit-exact mode: the widest tree it scores
BLOCK = 32  # keys per block of the online softmax, aligned to positions 0, BLOCK, 2·BLOCK, ...
# Which implementation exact_attention runs: None picks the Triton kernel on CUDA and torch elsewhere;
# True forces the kernel (on CPU tensors under TRITON_INTERPRET=1: the tests), False torch.
TRITON: bool | None = None


class ExactKeys(NamedTuple):
    """Which keys each of the W rows of a bit-exact forward reads (it stands in for the mask).

    Rows >= count are padding: they sit at position `start`, write the scratch slots S + row (never
    a slot holding a real key), and their attention is 0 (finite, never read)."""

    positions: torch.Tensor  # [W] int64: each row's position (rope, and its last key)
    slots: torch.Tensor  # [W] int64: the cache slot each row writes its key and value to
    start: torch.Tensor  # [] int64: the first position of this call; keys before it sit at slot = position
    table: torch.Tensor  # [W, W] int64: table[r, d] = slot of row r's ancestor at depth d (position start + d)
    count: torch.Tensor  # [] int64: real rows (the first `count`)
    window: int = 0  # sliding-window layers: keys j > pos - window only (0: every key)


def check_exact_width(gamma: int, candidates: int, lookup: int) -> None:
    """ValueError unless a step's tree, 1 + γ·K nodes + the lookup branch's G, fits one bit-exact
    forward of EXACT_WIDTH rows (γ 0, a plain step, has no lookup branch)."""
    if gamma and 1 + gamma * candidates + lookup > EXACT_WIDTH:
        raise ValueError(f"bit-exact mode scores at most {EXACT_WIDTH} tokens per target forward: 1 + gamma {gamma} × "
                         f"{candidates} candidates + lookup {lookup} do not fit; lower --gamma, --candidates or --lookup")


def exact_layout(depths: torch.Tensor, ancestors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side layout of a call of T <= EXACT_WIDTH tokens, padded to EXACT_WIDTH rows: depths [T]
    (the position offset of each token; a chain: 0..T-1) and, for a tree, ancestors [T, T] bool
    (acceptance.candidate_tree; None: a chain) -> (depths [W], nodes [W, W]): nodes[r, d] = the
    token (row) that is row r's ancestor at depth d, for d <= depths[r]; padding rows have depth 0
    and node 0 (the root) everywhere.

    >>> exact_layout(torch.tensor([0, 1, 1]), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]]).bool())[1][:3, :2]
    tensor([[0, 0],
            [0, 1],
            [0, 2]])
    """
    t = depths.shape[0]
    if t > EXACT_WIDTH:
        raise ValueError(f"bit-exact mode scores at most {EXACT_WIDTH} positions per target forward, got {t}")
    if ancestors is None:
        ancestors = torch.ones(t, t, dtype=torch.bool).tril()
    padded = torch.zeros(EXACT_WIDTH, dtype=torch.int64)
    padded[:t] = depths
    nodes = torch.zeros(EXACT_WIDTH, EXACT_WIDTH, dtype=torch.int64)
    for row in range(t):
        for node in ancestors[row].nonzero().view(-1).tolist():
            nodes[row, int(depths[node])] = node
    return padded, nodes


def exact_keys(start: torch.Tensor, depths: torch.Tensor, nodes: torch.Tensor, count: torch.Tensor,
               max_seq_len: int) -> ExactKeys:
    """The ExactKeys of a call at `start` [] whose layout is exact_layout's (depths [W], nodes [W, W],
    count [] on the device); the real rows write slots start + row, the padding S + row."""
    rows = torch.arange(EXACT_WIDTH, device=depths.device)
    slots = torch.where(rows < count, start + rows, max_seq_len + rows)
    return ExactKeys(start + depths, slots, start.clone(), start + nodes, count.clone())


def exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, where: ExactKeys,
                    scale: float) -> torch.Tensor:
    """q [W, KV, G, D] at where.positions over the cache's keys, values [S', KV, D] -> [W, KV, G, D]
    in q's dtype (softmax(q·k·scale)·v per query head, query head kv·G + g reading key head kv).
    The Triton kernel on CUDA, torch elsewhere."""
    return torch.ops.speculant.exact_attention(q, keys, values, where.positions, where.start, where.table,
                                               where.count, scale, where.window)


@torch.library.custom_op("speculant::exact_attention", mutates_args=())
def _exact_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                        start: torch.Tensor, table: torch.Tensor, count: torch.Tensor, scale: float,
                        window: int) -> torch.Tensor:
    # an opaque op to torch.compile: the kernel is the same whatever graph calls it
    triton = q.device.type == "cuda" if TRITON is None else TRITON
    run = exact_attention_triton if triton else exact_attention_torch
    return run(q, keys, values, positions, start, table, count, scale, window)


@_exact_attention_op.register_fake
def _(q, keys, values, positions, start, table, count, scale, window):
    return torch.empty_like(q)


def exact_attention_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                          start: torch.Tensor, table: torch.Tensor, count: torch.Tensor, scale: float,
                          window: int = 0) -> torch.Tensor:
    """The math in torch (see exact_attention for the shapes): the keys of each row gathered block
    by block in position order, then the online softmax in float32. Every reduction runs over a
    fixed-shape tensor in a fixed order (products summed over D, over the block's keys), and a block
    past a row's last key (or before its window) is all -inf and leaves its sums as they were, bit
    for bit: a row's result does not depend on the other rows, nor on how many blocks the call walks."""
    w, kv, g, d = q.shape
    qf = q.float()[:, :, :, None, :]  # [W, KV, G, 1, D]
    rows = torch.arange(w, device=q.device)
    real = rows < count  # [W]
    lo = (positions - window + 1).clamp_min(0) if window else torch.zeros_like(positions)  # first key of each row
    m = torch.full((w, kv, g), float("-inf"), device=q.device)  # running max
    total = torch.zeros(w, kv, g, device=q.device)  # running sum of exp
    acc = torch.zeros(w, kv, g, d, device=q.device)  # running sum of exp · v
    last = int(positions.max())  # the CPU: a host read is cheap, and the loop stops at the last key
    for first in range(0, last + 1, BLOCK):
        j = first + torch.arange(BLOCK, device=q.device)  # [B] positions of this block's keys
        depth = (j[None, :] - start).clamp(0, w - 1).expand(w, BLOCK)  # [W, B]
        slot = torch.where(j[None, :] < start, j[None, :], table.gather(1, depth))  # [W, B]
        valid = (j[None, :] <= positions[:, None]) & (j[None, :] >= lo[:, None]) & real[:, None]  # [W, B]
        slot = torch.where(valid, slot, 0)
        k = keys[slot].permute(0, 2, 1, 3).float()  # [W, KV, B, D]
        v = values[slot].permute(0, 2, 1, 3).float()
        scores = (qf * k[:, :, None, :, :]).sum(-1) * scale  # [W, KV, G, B]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))  # [W, KV, G]
        seen = m_new > float("-inf")  # a row with no key yet keeps its zeros (no -inf - -inf)
        alpha = torch.where(seen, torch.exp(m - torch.where(seen, m_new, 0.0)), 0.0)
        p = torch.where(seen[..., None], torch.exp(scores - torch.where(seen, m_new, 0.0)[..., None]), 0.0)
        total = total * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + (p[..., None] * v[:, :, None, :, :]).sum(-2)  # summed over the block's keys
        m = m_new
    out = torch.where(total[..., None] > 0, acc / total.clamp_min(1e-30)[..., None], 0.0)
    return out.to(q.dtype)


def exact_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                           start: torch.Tensor, table: torch.Tensor, count: torch.Tensor, scale: float,
                           window: int = 0) -> torch.Tensor:
    """The same math as one Triton program per (row, key/value head): it walks the row's blocks of
    keys in order, the G query heads of the group together. Runs on CPU tensors under
    TRITON_INTERPRET=1 (the tests)."""
    import triton

    w, kv, g, d = q.shape
    out = torch.empty_like(q)
    kernel = _triton_kernel()
    kernel[(w, kv)](
        q, keys, values, out, positions, start, table, count,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        out.stride(0), out.stride(1), out.stride(2), table.stride(0), float(scale), int(window),
        G=g, G_PAD=triton.next_power_of_2(g), D=d, D_PAD=triton.next_power_of_2(d), BLOCK=BLOCK, num_warps=4)
    return out


_KERNEL = None


def _triton_kernel():
    """The kernel, defined on first use (triton is imported only then)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def exact_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, start_ptr, table_ptr, count_ptr,
                               sq_row, sq_kv, sq_g, sk_slot, sk_kv, sv_slot, sv_kv, so_row, so_kv, so_g, st_row,
                               scale, window, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                               D_PAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        gs = tl.arange(0, G_PAD)
        ds = tl.arange(0, D_PAD)
        gd_mask = (gs[:, None] < G) & (ds[None, :] < D)  # [G_PAD, D_PAD]
        pos = tl.load(pos_ptr + row)
        start = tl.load(start_ptr)
        count = tl.load(count_ptr)
        q = tl.load(q_ptr + row * sq_row + head * sq_kv + gs[:, None] * sq_g + ds[None, :], mask=gd_mask,
                    other=0.0).to(tl.float32)  # [G_PAD, D_PAD]
        lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)  # the row's first key
        first_block = (lo // BLOCK).to(tl.int32)
        end_block = tl.where(row < count, pos // BLOCK + 1, first_block).to(tl.int32)  # padding rows walk no block
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for block in range(first_block, end_block):
            j = block * BLOCK + tl.arange(0, BLOCK)  # [B] positions
            valid = (j <= pos) & (j >= lo)
            depth = j - start
            ancestor = tl.load(table_ptr + row * st_row + depth, mask=valid & (depth >= 0), other=0)
            slot = tl.where(depth >= 0, ancestor, j)
            kv_mask = valid[:, None] & (ds[None, :] < D)  # [B, D_PAD]
            k = tl.load(k_ptr + slot[:, None] * sk_slot + head * sk_kv + ds[None, :], mask=kv_mask,
                        other=0.0).to(tl.float32)
            v = tl.load(v_ptr + slot[:, None] * sv_slot + head * sv_kv + ds[None, :], mask=kv_mask,
                        other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G_PAD, B]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: the first block holds the row's first key
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = tl.where(total[:, None] > 0, acc / tl.maximum(total, 1e-30)[:, None], 0.0)
        tl.store(out_ptr + row * so_row + head * so_kv + gs[:, None] * so_g + ds[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gd_mask)

    _KERNEL = exact_attention_kernel
    return _KERNEL
