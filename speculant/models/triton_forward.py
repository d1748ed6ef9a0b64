"""LeanModel.forward over speculant.models.triton_layers' kernels (6 per layer), and which models and
machines may run it: the fused step's `kernels="triton"` (speculant.fused) goes through here.

What runs where under kernels="triton": the target's every forward in the fused step (plain steps
and chunks, chain and tree verification, the prompt's prefill, in pieces of MAX_ROWS rows) runs
TritonForward.forward_static, inside the step's CUDA graph, never through torch.compile (its
kernels are fused already); a token draft model (layers:N, a small model) too where TritonForward
runs it, else on torch's kernels with a warning (a distilled draft's truncated head, an int8 copy);
a feature draft always on torch's (its layers read the target's features). The sampling and
acceptance functions are the same either way. Refused in one line: a target TritonForward cannot
run (Gemma 3's sliding windows, int8 weights), no triton installed, and CPU tensors outside
triton's interpreter (TRITON_INTERPRET=1: slow, for the tests).

Bit-exact mode (bit_exact=True with kernels="triton"): the target's every forward, the prompt's
prefill included, runs TritonForward.forward_exact, in which a row's logits are a function of its
token, its position and its context's keys and values, bit for bit, whatever else the call
computes: the GEMM kernels are row-invariant (one compiled binary, one tile shape for every call:
speculant.models.triton_layers' docstring) and attention is triton_layers.exact_cache_attention
(each row walks its own keys in position order, in fixed chunks of positions). So a position's K/V
and logits are the same bits whether it is prefilled, decoded alone, verified in a chain or scored
as a tree node, and greedy speculative output is plain greedy output token for token. The calls are
not padded to EXACT_WIDTH rows (bit-exact mode on torch's kernels pads them so that torch.compile's
kernels always see one shape): those kernels need no fixed shape, and a call's cost then grows with
its own rows only. CPU-tested under the interpreter (tests/test_exact_triton.py); not yet measured
or run on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from speculant.models import persistent_forward
from speculant.models.exact_attention import EXACT_WIDTH
from speculant.models.feature_draft import FeatureDraft
from speculant.models.transformer import LeanModel, TransformerWeights
from speculant.models.triton_layers import (
    MAX_ROWS,
    cache_attention,
    exact_cache_attention,
    matmul_residual,
    norm_gate_up_silu,
    norm_matmul,
    norm_qkv_rope_cache,
    reserve_tickets,
    rope_qkv_cache_write,
    use_gemv,
)


def unsupported(model) -> str | None:
    """Why TritonForward cannot run `model` (a LeanModel), or None: Llama and Qwen2 layers with frozen
    float weights only."""
    cfg = model.cfg
    if getattr(model, "kept_vocab", None) is not None:
        return "TritonForward scores the whole vocabulary, not a kept part of it (:vocab=N)"
    if not isinstance(model.weights, TransformerWeights):
        return "TritonForward runs a model's own output head, not a distilled draft's truncated one"
    if cfg.arch != "llama":
        return f"TritonForward runs Llama and Qwen2 layers only, not {cfg.arch!r}"
    if cfg.sliding_window or any(cfg.is_sliding(i) for i in range(model.num_layers)):
        return "TritonForward has no sliding-window attention"
    if model.embed_scale != 1.0:
        return "TritonForward does not scale embeddings"
    layers = model.weights.layers[: model.num_layers]
    if any(layer.qkv is None or not isinstance(layer.qkv[0], torch.Tensor) for layer in layers) or \
            not isinstance(model.weights.head(), torch.Tensor):
        return ("TritonForward needs frozen float weights (LeanModel fuses q|k|v and gate|up for those; "
                "no int8 copies)")
    return None


def target_kernels(kernels: str, target: LeanModel) -> str:
    """`kernels` ("torch" or "triton") if the fused step's target forwards can run on them here,
    else ValueError in one line."""
    if kernels not in ("torch", "triton"):
        raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
    if kernels == "triton":
        reason = unsupported(target)
        if reason is not None:
            raise ValueError(f"kernels='triton': {reason} (use kernels='torch')")
        if importlib.util.find_spec("triton") is None:
            raise ValueError("kernels='triton' needs the triton package (pip install triton)")
        if target.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernels='triton' runs on a GPU; on the CPU only under triton's interpreter "
                             "(TRITON_INTERPRET=1 set before triton is imported; slow, for tests)")
        if target.device.type not in ("cpu", "cuda"):
            raise ValueError(f"kernels='triton' runs on CUDA, not {target.device.type}")
    return kernels


def draft_kernels(kernels: str, draft_model: LeanModel | None) -> str:
    """The kernels of a token draft model's forwards: triton where asked and TritonForward runs the
    model, else torch, said once in a warning; a feature draft's are always torch's."""
    if kernels != "triton" or draft_model is None or isinstance(draft_model, FeatureDraft):
        return "torch"
    reason = unsupported(draft_model)
    if reason is not None:
        warnings.warn(f"kernels='triton': the draft model runs on torch's kernels ({reason})", stacklevel=3)
        return "torch"
    return "triton"


class TritonForward:
    """LeanModel.forward(tokens, start_pos[, ancestors]) for Llama and Qwen2 layers, run over the
    kernels above with the model's own weights and KV cache: the cache (and the features, where the
    model keeps them) is written where LeanModel.forward writes it, the model's length moves the same
    way, logits come back float32 [T, vocab]. `fuse_rope=False` runs norm_matmul +
    rope_qkv_cache_write instead of norm_qkv_rope_cache (7 kernels per layer instead of 6). A call of
    more than MAX_ROWS tokens runs in pieces of MAX_ROWS (the same kernels: each piece reads the keys
    the pieces before it wrote), a tree too (its nodes' ancestors come before them). With
    persistent_forward.PERSISTENT on (off by default: slower on an H100), a chain's one-row call outside
    bit-exact mode runs as one launch (persistent_forward.PersistentForward) instead."""

    def __init__(self, model, chunk: int = 64, fuse_rope: bool = True) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        self.model, self.chunk, self.fuse_rope = model, chunk, fuse_rope
        reserve_tickets(model.device)  # the split-K GEMMs' counters, before any graph captures a forward
        self.offsets = torch.arange(model.k_cache.shape[1], device=model.device)  # a tree's slots, from its first
        # forward_exact's chain layout: row t's node at depth d is d (exact_attention.exact_layout of a chain)
        self.chain = torch.arange(EXACT_WIDTH, device=model.device).repeat(MAX_ROWS, 1)  # [MAX_ROWS, W]
        # one-row forwards outside bit-exact mode in one launch (persistent_forward), where the model allows
        self.persistent = (persistent_forward.PersistentForward(model)
                           if persistent_forward.PERSISTENT and persistent_forward.unsupported(model) is None else None)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, ancestors: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [T] at positions start_pos.. (or a tree: ancestors [T, T] bool, see LeanModel.forward)
        -> logits [T, vocab] float32, as LeanModel.forward."""
        model = self.model
        end = model._write_range(start_pos, tokens.shape[0])
        positions = torch.arange(start_pos, end, device=model.device)
        if ancestors is not None:
            ancestors = ancestors.to(model.device)
            positions = start_pos + ancestors.sum(-1) - 1  # depth of each node
        logits = self.forward_static(tokens.to(model.device), positions, ancestors, kv_len=end)
        model._length = end
        return logits

    __call__ = forward

    def forward_static(self, tokens: torch.Tensor, positions: torch.Tensor, ancestors: torch.Tensor | None = None,
                       *, kv_len: int | None = None) -> torch.Tensor:
        """fused.static_forward's contract: tokens [T], positions [T] (device tensors; slot = position)
        or a tree (ancestors [T, T] bool, its nodes at slots positions[0] + 0..T-1) -> logits [T, vocab]
        float32. No host synchronisation and fixed shapes (kv_len defaults to the cache's length), so a
        CUDA graph can capture it. Leaves the model's length alone (see PositionalCache.set_length)."""
        t = tokens.shape[0]
        kv_len = self.model.max_seq_len if kv_len is None else kv_len
        slots = positions if ancestors is None else positions[:1] + self.offsets[:t]
        pieces = [self._piece(tokens[first: first + MAX_ROWS], positions[first: first + MAX_ROWS],
                              slots[first: first + MAX_ROWS], kv_len,
                              None if ancestors is None else ancestors[first: first + MAX_ROWS], slots[:1], first)
                  for first in range(0, t, MAX_ROWS)]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def forward_exact(self, tokens: torch.Tensor, positions: torch.Tensor, nodes: torch.Tensor | None = None,
                      *, kv_len: int | None = None) -> torch.Tensor:
        """Bit-exact mode's forward (speculant.fused, bit_exact=True with kernels="triton"), with
        forward_static's contract otherwise: tokens [T] at positions [T] (device tensors) -> logits
        [T, vocab] float32, each row attending to its own keys in position order
        (triton_layers.exact_cache_attention), so that a row's logits are a function of its token, its
        position and the keys and values of its context, bit for bit, whatever else the call computes.
        nodes None: a chain (slot = position), in pieces of MAX_ROWS rows, each a chain from its first
        position; nodes [T, W] (exact_attention.exact_layout's, T <= MAX_ROWS): a tree rooted at
        positions[0], node i at slot positions[0] + i. The rows are not padded: the kernels give a row
        the same bits in a call of any number of rows (triton_layers' docstring)."""
        t = tokens.shape[0]
        kv_len = self.model.max_seq_len if kv_len is None else kv_len
        if nodes is not None:  # one piece (exact_cache_attention refuses more than MAX_ROWS rows)
            return self._piece(tokens, positions, positions[:1] + self.offsets[:t], kv_len, nodes=nodes)
        pieces = [self._piece(tokens[first: first + MAX_ROWS], positions[first: first + MAX_ROWS],
                              positions[first: first + MAX_ROWS], kv_len, nodes=self.chain[: min(MAX_ROWS, t - first)])
                  for first in range(0, t, MAX_ROWS)]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _piece(self, tokens, positions, slots, kv_len, ancestors=None, tree_start=None, first_node=0,
               nodes=None) -> torch.Tensor:
        """Up to MAX_ROWS rows: tokens [T] at positions [T], K/V and features into slots [T]; a tree's
        rows first_node.. (ancestors [T, N]) -> logits [T, vocab] float32. With `nodes` (forward_exact)
        the bit-exact attention instead."""
        model, cfg = self.model, self.model.cfg
        t = tokens.shape[0]
        gemv = use_gemv(t, exact=nodes is not None)
        if gemv and ancestors is None and self.persistent is not None and persistent_forward.PERSISTENT:
            logits = self.persistent(tokens, positions)
            if model.features is not None:  # the last layer's output and the tapped layers' (persistent.taps)
                taps = [self.persistent.taps[i: i + 1] for i in model.feature_taps] or None
                model.record_features(model.weights.norm(self.persistent.x[None]), slots, taps)
            return logits
        heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = model.rope_global[0], model.rope_global[1]
        x = model.embed(tokens)  # [T, E]: the residual stream, updated in place below
        taps = model.new_taps()  # copies: x is updated in place
        for i in range(model.num_layers):
            layer = model.weights.layers[i]
            (w_qkv, b_qkv), norm1 = layer.qkv, layer.input_layernorm
            k_cache, v_cache = model.k_cache[i], model.v_cache[i]
            if self.fuse_rope:
                q = norm_qkv_rope_cache(x, norm1.weight, norm1.eps, w_qkv, b_qkv, cos, sin, positions,
                                        k_cache, v_cache, slots, heads, kv, d, gemv=gemv)
            else:
                qkv = norm_matmul(x, norm1.weight, norm1.eps, w_qkv, b_qkv, gemv=gemv)
                q = rope_qkv_cache_write(qkv, cos, sin, k_cache, v_cache, slots, heads, kv, d, positions, gemv=gemv)
            if nodes is None:
                attn = cache_attention(q, k_cache, v_cache, kv_len, positions, model.attn_scale, self.chunk,
                                       ancestors=ancestors, tree_start=tree_start, first_node=first_node, gemv=gemv)
            else:
                attn = exact_cache_attention(q, k_cache, v_cache, kv_len, positions, nodes, model.attn_scale,
                                             self.chunk)
            x = matmul_residual(attn.view(t, heads * d), layer.o, x, out=x, gemv=gemv)
            norm2 = layer.post_attention_layernorm
            x = matmul_residual(norm_gate_up_silu(x, norm2.weight, norm2.eps, layer.gate_up, gemv=gemv), layer.down, x,
                                out=x, gemv=gemv)
            if taps is not None and i in model.feature_taps:
                taps.append(x.clone())
        norm = model.weights.norm
        if model.features is not None:
            model.record_features(norm(x), slots, taps)
        return norm_matmul(x, norm.weight, norm.eps, model.weights.head(), out_dtype=torch.float32, gemv=gemv)
