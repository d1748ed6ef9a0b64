"""A lean decoder-only transformer for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2 with
q/k/v bias) and Gemma 3 (local/global sliding-window layers, q/k norms, (1 + w) RMSNorm, embedding
scale, pre- and post-norms), with a static, position-indexed KV cache.

Shapes: T = tokens in this call, S = cache capacity (max_seq_len), H = query heads,
KV = key/value heads, D = head_dim, E = hidden size.

Weights (`TransformerWeights`) and state (`LeanModel`: a KV cache + how many layers to run) are
separate, so the self-drafter `layers:N` is just a second `LeanModel` over the same weights with a
cache of its own: no extra weight memory. `int8_weights` makes the self-drafter `int8`: the same
model with its matrices held as int8 (a quarter of float32's bytes, so about half the time of a
memory-bound decode step on a CPU), its norms and embedding shared.

Frozen weights are served fused (q|k|v, gate|up: Block.fuse_projections) and, in float32 on the CPU,
column-major (serves_column_major). One row (forward) and several (forward_rows) run the same layer
code (_layers), and so does bit-exact mode (exact_hidden_states: fixed-width calls, speculant.models.exact_attention).

Long because one model class holds every way its layers run (one row, a tree, several rows, bit-exact
calls) over the one cache they share; the attention of bit-exact mode lives in its own module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from speculant.models.base import PositionalCache, check_fits
from speculant.models.exact_attention import EXACT_WIDTH, ExactKeys, exact_attention


@dataclass(frozen=True)
class TransformerConfig:
    arch: str  # "llama" or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2: bias on q, k, v
    # Gemma 3 only
    rope_local_theta: float = 10000.0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default_factory=tuple)  # "sliding_attention"/"full_attention"
    query_pre_attn_scalar: float | None = None
    # Scaling of the global layers' rope (all layers of a Llama): the frequencies are divided by
    # rope_scaling_factor ("linear": Gemma 3 >= 4B), or, when rope_llama3 = (low_freq_factor,
    # high_freq_factor, original_max_position_embeddings) is set, scaled per frequency as Llama 3.1+ does.
    rope_scaling_factor: float = 1.0
    rope_llama3: tuple[float, float, int] | None = None

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gemma3"):
            raise ValueError(f"unknown architecture {self.arch!r}; the lean model knows llama, gemma3")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool) -> None:
        super().__init__()
        # Gemma stores w and scales by (1 + w); Llama stores the scale itself.
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma: scale in float32, then cast
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)  # Llama: cast, then scale


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        gemma = cfg.arch == "gemma3"
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(e, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(e, kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(e, kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, e, bias=False)
        self.gate_proj = nn.Linear(e, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(e, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, e, bias=False)
        self.input_layernorm = RMSNorm(e, cfg.rms_norm_eps, gemma)
        self.post_attention_layernorm = RMSNorm(e, cfg.rms_norm_eps, gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(e, cfg.rms_norm_eps, True)
            self.post_feedforward_layernorm = RMSNorm(e, cfg.rms_norm_eps, True)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, True)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, True)
        # set by fuse_projections (frozen weights): the matrices forward() multiplies by, as tensors
        # or, in an int8 copy (int8_weights), as Int8Matrix
        self.qkv: tuple[torch.Tensor | Int8Matrix, torch.Tensor | None] | None = None
        self.gate_up: torch.Tensor | Int8Matrix | None = None
        self.o: torch.Tensor | Int8Matrix | None = None
        self.down: torch.Tensor | Int8Matrix | None = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Hold q|k|v and gate|up as one matrix each, the separate weights becoming views of it:
        one GEMM instead of three and one instead of two, so fewer kernels per token (on a GPU a
        decode step is launch-bound). Float32 matrices on the CPU are stored column-major (see
        serves_column_major). No extra memory. Only for frozen weights (serving)."""
        if self.gate_up is not None:
            return
        layout = column_major if serves_column_major(self.q_proj.weight) else (lambda w: w)
        qkv = layout(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        biases = [p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]
        bias = torch.cat(biases) if biases[0] is not None else None
        gate_up = layout(torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        for proj in (self.o_proj, self.down_proj):
            proj.weight = nn.Parameter(layout(proj.weight), requires_grad=False)
        rows = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        for proj, w, b in zip((self.q_proj, self.k_proj, self.v_proj), qkv.split(rows),
                              bias.split(rows) if bias is not None else (None,) * 3):
            proj.weight = nn.Parameter(w, requires_grad=False)
            if b is not None:
                proj.bias = nn.Parameter(b, requires_grad=False)
        inter = self.gate_proj.out_features
        self.gate_proj.weight = nn.Parameter(gate_up[:inter], requires_grad=False)
        self.up_proj.weight = nn.Parameter(gate_up[inter:], requires_grad=False)
        self.qkv, self.gate_up = (qkv, bias), gate_up
        self.o, self.down = self.o_proj.weight.detach(), self.down_proj.weight.detach()  # views, not parameters


class TransformerWeights(nn.Module):
    """The parameters, named as in Hugging Face checkpoints (minus the `model.` prefix)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.arch == "gemma3")
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_int8: Int8Matrix | None = None  # the output head of an int8 copy (int8_weights)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def head(self) -> torch.Tensor | Int8Matrix:
        """What logits() multiplies by: the head's weight [V, E], or its int8 copy."""
        return self.head_int8 if self.head_int8 is not None else self.head_weight()

    @torch.no_grad()
    def store_head_column_major(self) -> None:
        """Store the head [V, E] (the tied embedding too) column-major; frozen weights (replaces the parameter)."""
        module = self.embed_tokens if self.lm_head is None else self.lm_head
        if module.weight.stride(0) != 1:
            module.weight = nn.Parameter(column_major(module.weight), requires_grad=False)


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] with the same values and shape, stored as its transpose [in, out] is: torch's
    CPU GEMM multiplies a few rows by it faster than by the row-major matrix (measured on the
    lean model: benchmarks/lean_vs_transformers_cpu.py). The product may differ in the last bits."""
    return weight.t().contiguous().t()


CPU_MAX_ROWS = 32  # rows per call on the CPU in bfloat16 / float16 (row_invariant_on_cpu)
ATTENTION_BLOCK = 256  # keys per block of LeanModel._blocked_attention (the CPU in bfloat16 / float16)


def row_invariant_on_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the lean model keeps a row's logits independent of the call's other rows on this device
    and dtype: the CPU in bfloat16 or float16. There torch's (oneDNN's) GEMM of 2 or more rows gives
    each row the bits it would get in any other call of 2 or more rows, but a 1-row call takes
    another kernel (different bits for Qwen2.5-Coder-1.5B's MLP matrices, 17920 × 1536 and 1536 ×
    8960), a call of more than 32 rows another again on some CPUs (oneDNN with AMX: a row of a
    40-row call differs from the same row in a 2-row call), and sdpa's CPU kernel rounds a row by
    where it sits in the call. So attention runs as
    matmul, softmax, matmul over fixed blocks of keys (each row's bits its own, whatever the call's
    rows and keys: benchmarks/cpu_layout.py, tests/test_cpu_bfloat16.py), a 1-row call is padded to 2 rows and a chain (a
    prefill too) of more than CPU_MAX_ROWS runs in pieces of that many: a chain's verification then computes
    what plain decoding computes, and greedy speculative output is plain greedy output. A tree's nodes
    sit in other slots than plain decoding's keys, and the attention GEMM may group them otherwise
    (close values, other bits; past a block of 512 keys on one CPU, at any length on another with
    AMX): trees are covered by bit-exact mode. Float32 on
    the CPU keeps sdpa and 1-row calls (its greedy outputs agree as it is)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def serves_column_major(weight: torch.Tensor) -> bool:
    """Whether frozen `weight` is served column-major: float32 on the CPU only. In bfloat16 torch's CPU
    GEMM (oneDNN) multiplies 1 to 9 rows by the row-major matrix in about the time of one row where
    the CPU has bfloat16 instructions, and faster than by the column-major one (benchmarks/cpu_layout.py)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


INT8_MAX_ROWS = 4  # calls of more rows (a prompt) multiply by the float matrix the int8 one was made from


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> (q int8 [R, C], float32 scales [R]): q = round(w / scale) in -127..127, scale = max |row| /
    127 (symmetric, per row). Int8Matrix's and a draft saved in int8's (feature_draft.stored_tensors)."""
    matrix = matrix.detach().float()
    scale = matrix.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(matrix / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale


class Int8Matrix:
    """A frozen weight [out, in] held as int8 with one scale per output row: w ≈ q · scale, q =
    round(w / scale) in -127..127, scale = max |row| / 127 (symmetric, per channel). A quarter of
    float32's bytes. On a CPU with bfloat16 instructions torch's weight-only int8 kernel multiplies
    by it directly (it takes bfloat16 activations); elsewhere it is dequantized per call: the same
    product up to rounding, but no faster than the float matrix.

    That kernel is fast for a few rows (decoding: about 2.5× the bfloat16 GEMM at one row on this
    repository's CPU) and slow for many (2.6× slower at 150: a prompt), so a call of more than
    INT8_MAX_ROWS rows multiplies by `source`, the float matrix itself (a reference, not a copy: for
    `--draft int8` the target's own weight). A draft's law may depend on how it was computed; the
    acceptance rule uses the law it drafted with, so the output stays exact."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.source = weight.detach()  # [out, in], the model's own dtype and layout
        self.q, scale = quantize_rows(self.source)  # [out, in], [out]
        self.scale = scale.to(torch.bfloat16)
        self.shape = self.source.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x · wᵀ [..., out] in x's dtype."""
        if x.numel() > INT8_MAX_ROWS * x.shape[-1]:
            return F.linear(x, self.source.to(x.dtype))
        if x.device.type == "cpu":
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            out = torch._weight_int8pack_mm(flat, self.q, self.scale)
            return out.view(*x.shape[:-1], self.shape[0]).to(x.dtype)
        return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)

    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.scale.numel()


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear that also takes an Int8Matrix."""
    if isinstance(weight, Int8Matrix):
        out = weight(x)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


@torch.no_grad()
def int8_weights(weights: TransformerWeights) -> TransformerWeights:
    """An int8 copy of frozen `weights` (the drafter `int8`): every layer's matrices and the output
    head become Int8Matrix; the embedding, the norms, any biases and the float matrices a prompt is
    multiplied by (Int8Matrix.source) are the same tensors as in `weights`, so the copy adds about
    a quarter of the matrices' float32 bytes."""
    if any(p.requires_grad for p in weights.parameters()):
        raise ValueError("int8_weights needs frozen weights (requires_grad_(False))")
    with torch.device("meta"):  # the skeleton only: every tensor it holds is replaced below
        out = TransformerWeights(weights.cfg)
    out.embed_tokens, out.norm, out.lm_head = weights.embed_tokens, weights.norm, None
    for new, old in zip(out.layers, weights.layers):
        old.fuse_projections()
        for name, module in old.named_children():
            if "norm" in name:
                setattr(new, name, module)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            delattr(new, name)  # meta modules: forward() uses the fused matrices below
        new.qkv = (Int8Matrix(old.qkv[0]), old.qkv[1])
        new.gate_up, new.o, new.down = Int8Matrix(old.gate_up), Int8Matrix(old.o), Int8Matrix(old.down)
    out.head_int8 = Int8Matrix(weights.head_weight())
    return out


def rope_inv_freq(
    theta: float, head_dim: int, scaling: float = 1.0, llama3: tuple[float, float, int] | None = None, device=None
) -> torch.Tensor:
    """Rotary frequencies [D/2] float32, computed as Hugging Face does (so float32 rounding agrees)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if llama3 is None:
        return inv_freq / scaling if scaling != 1.0 else inv_freq
    # Llama 3.1: long wavelengths are slowed by `scaling`, short ones kept, the band between blended.
    low_freq_factor, high_freq_factor, original_context = llama3
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(
    theta: float, head_dim: int, length: int, scaling: float = 1.0, device=None,
    llama3: tuple[float, float, int] | None = None,
) -> torch.Tensor:
    """cos/sin for positions 0..length-1: [2, length, D] float32 (Hugging Face rotate_half layout)."""
    inv_freq = rope_inv_freq(theta, head_dim, scaling, llama3, device)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [length, D]
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, D]; cos, sin [..., T, 1, D] float32."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class LeanModel(PositionalCache):
    """`CausalLM` over `TransformerWeights`, running the first `num_layers` layers (all by default).

    The KV cache is [layers, S + EXACT_WIDTH, KV, D] for keys and values, allocated once: slots S..
    are scratch for the padding rows of bit-exact calls, which nothing else reads. forward() writes
    the new positions in place; truncate() only moves `length`."""

    # "sdpa": torch's fused attention; "matmul": q·Kᵀ, softmax, ·V as separate ops; "blocked": the
    # same over fixed blocks of ATTENTION_BLOCK keys with an online softmax (_blocked_attention). All
    # compute the same function. None picks per device: matmul on CUDA (on the H100, compiled and
    # captured, faster than sdpa: benchmarks/gpu_kernels.py); on the CPU sdpa in float32 and blocked
    # in bfloat16 / float16 (see row_invariant_on_cpu).
    attention: str | None = None

    def __init__(self, weights: TransformerWeights, max_seq_len: int | None = None,
                 num_layers: int | None = None) -> None:
        cfg = weights.cfg
        self.weights = weights
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.num_layers = cfg.num_layers if num_layers is None else num_layers
        if not 1 <= self.num_layers <= cfg.num_layers:
            raise ValueError(f"num_layers must be in 1..{cfg.num_layers}, got {self.num_layers}")
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        param = weights.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        # On the CPU in bfloat16 / float16 a position's logits are kept a function of its context
        # alone (row_invariant_on_cpu): matmul attention, no target call of a single row, and no
        # chain call (prefill included) of more than CPU_MAX_ROWS rows: longer ones run in pieces.
        # (Not an int8 copy's: it only drafts, and its kernel costs more for 2 rows than for 1.)
        int8 = getattr(weights, "head_int8", None) is not None
        invariant = row_invariant_on_cpu(self.device, self.dtype) and not int8
        self.min_rows = 2 if invariant else 1
        self.max_rows = CPU_MAX_ROWS if invariant else None
        if self.attention is None:
            self.attention = "matmul" if self.device.type == "cuda" else "blocked" if self.min_rows > 1 else "sdpa"
        shape = (self.num_layers, self.max_seq_len + EXACT_WIDTH, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.rope_global = rope_tables(
            cfg.rope_theta, cfg.head_dim, self.max_seq_len, cfg.rope_scaling_factor, self.device, cfg.rope_llama3
        )
        self.rope_local = rope_tables(cfg.rope_local_theta, cfg.head_dim, self.max_seq_len, 1.0, self.device)
        if cfg.arch == "gemma3":
            self.attn_scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
            # Gemma multiplies embeddings by sqrt(E), rounded to the model's dtype as HF does.
            self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=self.dtype).item()
        else:
            self.attn_scale = cfg.head_dim**-0.5
            self.embed_scale = 1.0
        self.features: torch.Tensor | None = None  # see keep_features
        self.feature_taps: tuple[int, ...] = ()  # see keep_features
        self.feature_combine: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None
        self.kept_vocab: tuple[torch.Tensor, torch.Tensor | Int8Matrix] | None = None  # see keep_vocab
        if not any(p.requires_grad for p in weights.parameters()):
            for layer in weights.layers:
                layer.fuse_projections()
            if serves_column_major(param) and isinstance(weights, TransformerWeights):  # not a distilled draft's
                weights.store_head_column_major()
        self._length = 0

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, ancestors: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [T] at positions start_pos.. -> logits [T, vocab] (float32).

        With `ancestors` [T, T] bool the tokens form a tree (token 0 its root, see
        acceptance.candidate_tree): token t sits in cache slot start_pos + t, at position
        start_pos + its depth, and attends to the cache before start_pos and to its row's tokens.
        Keep a path with `move_slot`, then `truncate`."""
        if tokens.shape[0] < self.min_rows and ancestors is None and start_pos + self.min_rows <= self.max_seq_len:
            return self._forward_padded(tokens, start_pos)
        if self.max_rows is not None and ancestors is None and tokens.shape[0] > self.max_rows:
            # pieces of max_rows, each causal over the cache the ones before it wrote
            return torch.cat([self.forward(tokens[first:first + self.max_rows], start_pos + first)
                              for first in range(0, tokens.shape[0], self.max_rows)])
        end = self._write_range(start_pos, tokens.shape[0])
        slots = torch.arange(start_pos, end, device=self.device)
        positions = slots
        if ancestors is not None:
            ancestors = ancestors.to(self.device)
            positions = start_pos + ancestors.sum(-1) - 1  # depth of each node
        taps = self.new_taps()
        hidden = self.hidden_states(tokens.to(self.device), positions, kv_len=end, ancestors=ancestors, taps=taps)
        self.record_features(hidden, slots, taps)
        self._length = end
        return self.logits(hidden)

    def _forward_padded(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """forward of fewer than min_rows tokens (one: a plain step) as a call of min_rows rows: each
        padding row is a sibling of the first token (a tree whose other nodes see only the cache
        before start_pos), at slots past the call's end that later writes overwrite; only the real
        rows' logits are returned and only they count towards the cache's length."""
        count = tokens.shape[0]
        rows = self.min_rows
        padded = torch.cat([tokens.to(self.device), tokens.new_zeros(rows - count).to(self.device)])
        ancestors = torch.eye(rows, dtype=torch.bool)
        ancestors[:count, :count] = torch.ones(count, count, dtype=torch.bool).tril()
        logits = self.forward(padded, start_pos, ancestors)
        self._length = start_pos + count
        return logits[:count]

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor) -> None:
        """Fill the cache with tokens [T] at positions 0..T-1, as `forward(tokens, 0)` does but
        without the output head: a prompt's logits are not needed, and with a 150k-token vocabulary
        the head over a long prompt costs as much as many decoding steps."""
        self.truncate(0)
        end = self._write_range(0, tokens.shape[0])
        tokens = tokens.to(self.device)
        piece = self.max_rows or max(end, 1)  # on the CPU in bfloat16, pieces of max_rows (see __init__)
        for first in range(0, end, piece):
            slots = torch.arange(first, min(first + piece, end), device=self.device)
            taps = self.new_taps()
            hidden = self.hidden_states(tokens[first:first + piece], slots, kv_len=int(slots[-1]) + 1, taps=taps)
            self.record_features(hidden, slots, taps)
        self._length = end

    def move_slot(self, source: int | torch.Tensor, dest: int | torch.Tensor) -> None:
        """Copy cache slot `source` (keys and values of every layer, and the feature) to `dest`: a
        kept tree node moves to the slot of its position."""
        self.k_cache[:, dest] = self.k_cache[:, source]
        self.v_cache[:, dest] = self.v_cache[:, source]
        if self.features is not None:
            self.features[dest] = self.features[source]

    def keep_features(self, taps: Sequence[int] | None = None,
                      combine: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None) -> None:
        """From now on every forward also stores its "features" in `self.features` [S + EXACT_WIDTH, E],
        position-indexed like the KV cache: a feature-reading draft (speculant.drafters.features)
        reads them for the committed positions. A position's feature is its final-normed hidden state
        (taps ()), or with `taps` (layer indices) combine(final-normed hidden [T, E], the residual
        stream after each tapped layer [T, E] each) -> [T, E], the function of the draft that reads
        them (EAGLE-3's features from low, middle and high layers); taps None keeps the kind set last.
        A model keeps one kind, the last asked for (a feature draft's read_from asks; another draft
        reading them stays exact, only its α suffers); a forward compiled for it is keyed on
        feature_kind."""
        if taps is not None:
            taps = tuple(int(i) for i in taps)
            if bool(taps) != (combine is not None) or any(not 0 <= i < self.num_layers for i in taps):
                raise ValueError(f"feature taps are layer indices in 0..{self.num_layers - 1}, given with their "
                                 f"combine function; got {taps}")
            self.feature_taps, self.feature_combine = taps, combine
        if self.features is None:
            slots = self.k_cache.shape[1]  # the scratch slots too, as in the KV cache
            self.features = torch.zeros(slots, self.cfg.hidden_size, dtype=self.dtype, device=self.device)

    def feature_kind(self) -> tuple[int, ...] | None:
        """What a forward records: None (no features), () (final-normed hidden states) or the taps. A
        compiled forward is keyed on it (speculant.fused)."""
        return None if self.features is None else self.feature_taps

    def new_taps(self, cache: RowKVCache | None = None) -> list[torch.Tensor] | None:
        """The list a forward's tapped layers append to (hidden_states' `taps`), or None when the
        features it records (in this model, or in `cache`'s rows) need none."""
        return [] if (self if cache is None else cache).features is not None and self.feature_taps else None

    def feature_values(self, hidden: torch.Tensor, taps: list[torch.Tensor] | None) -> torch.Tensor:
        """The features of final-normed hidden [..., E] and the tapped layers' outputs (new_taps)."""
        return hidden if not self.feature_taps else self.feature_combine(hidden, taps).to(hidden.dtype)

    def record_features(self, hidden: torch.Tensor, positions: torch.Tensor,
                        taps: list[torch.Tensor] | None = None) -> None:
        """Store the features of hidden [T, E] (final-normed; `taps` the tapped layers' [T, E] outputs,
        see new_taps) at `positions` [T], when this model keeps features."""
        if self.features is not None:
            self.features.index_copy_(0, positions, self.feature_values(hidden, taps))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., E] after the final norm -> logits [..., vocab] float32 (with keep_vocab: the
        kept tokens' logits, -inf at every other token)."""
        if self.kept_vocab is None:
            return linear(hidden, self.weights.head()).float()
        ids, head = self.kept_vocab
        out = torch.full((*hidden.shape[:-1], self.vocab_size), float("-inf"), device=hidden.device)
        return out.index_copy_(-1, ids, linear(hidden, head).float())

    @torch.no_grad()
    def keep_vocab(self, token_ids: torch.Tensor | None) -> None:
        """From now on score only the tokens `token_ids` [N] (distinct): the output head's N rows, every
        other token's logit -inf, so probability 0 under every sampling transform (a draft model:
        models.frequent_tokens). None: the whole vocabulary again. The rows are copies (an int8 head's
        quantized alike), so the weights, which other models may share, stay whole."""
        if token_ids is None:
            self.kept_vocab = None
            return
        ids = token_ids.to(self.device, torch.int64)
        if ids.dim() != 1 or len(set(ids.tolist())) != len(ids) or not 0 < len(ids) <= self.vocab_size \
                or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"keep_vocab takes distinct token ids in 0..{self.vocab_size - 1}")
        head = self.weights.head()
        if isinstance(head, Int8Matrix):
            rows = Int8Matrix(head.source.index_select(0, ids))
        else:
            rows = head.index_select(0, ids)
            rows = column_major(rows) if serves_column_major(head) else rows
        self.kept_vocab = (ids, rows)

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                      inputs: torch.Tensor | None = None, ancestors: torch.Tensor | None = None,
                      taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run the layers over tokens [T] at positions [T]; attend to cache slots < kv_len.

        `inputs` [T, E] replaces the token embeddings when given (a draft that reads the target's
        features builds its own input). Writes K/V in place, at `positions` (slot = position), or
        for a tree (`ancestors` [T, T] bool, see forward) at slots positions[0] + 0..T-1. Returns
        the final-normed hidden states [T, E]; `taps` (a list, see new_taps) gets the tapped layers'
        outputs [T, E].
        """
        cfg = self.cfg
        x = self.embed(tokens) if inputs is None else inputs  # [T, E]
        # Additive masks [G·T, kv_len] in the model's dtype, built once per call for all layers
        # (a boolean mask would be converted inside every attention call: more kernels per layer).
        key_pos = torch.arange(kv_len, device=self.device)  # [kv_len]: slots
        key_positions = key_pos  # the position each slot's key was written at
        if ancestors is None:
            slots = positions
            allowed = key_pos[None, :] <= positions[:, None]  # [T, kv_len]: causal
        else:
            t = x.shape[0]
            slots = positions[0] + torch.arange(t, device=self.device)
            tree_index = key_pos - positions[0]  # [kv_len]: which tree node a slot holds, if any
            in_tree = (tree_index >= 0) & (tree_index < t)
            allowed = (tree_index < 0)[None, :] | (in_tree[None, :] & ancestors[:, tree_index.clamp(0, t - 1)])
            # a tree node's slot is not its position (the lookup branch sits after the alternatives)
            key_positions = torch.where(in_tree, positions[tree_index.clamp(0, t - 1)], key_pos)
        masks = {False: self._additive(allowed)}
        if cfg.sliding_window:
            masks[True] = self._additive(allowed & (positions[:, None] - key_positions[None, :] < cfg.sliding_window))
        return self._one_row(x, positions, slots, masks, taps)

    def exact_hidden_states(self, tokens: torch.Tensor, keys: ExactKeys,
                            taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Bit-exact mode: tokens [W] at keys.positions, written at keys.slots, each row attending to
        its own keys in position order (exact_attention) -> final-normed hidden states [W, E] (taps:
        as hidden_states')."""
        masks = {False: keys, True: keys._replace(window=self.cfg.sliding_window or 0)}
        return self._one_row(self.embed(tokens), keys.positions, keys.slots, masks, taps)

    def _one_row(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, masks: dict,
                 taps: list[torch.Tensor] | None) -> torch.Tensor:
        """The layers over one row, x [T, E] -> final-normed [T, E] (taps [T, E] each): this model's
        cache [S, KV, D] seen as [1, KV, S, D] per layer, every token at its own slot."""
        x = self._layers(x[None], positions[None], slots, masks, self._single_row_cache, taps)
        if taps:
            taps[:] = [tap[0] for tap in taps]
        return self.weights.norm(x[0])

    def _single_row_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer` of this model's cache [S, KV, D] as _layers takes it: views [1, KV, S, D]."""
        return self.k_cache[layer, None].transpose(1, 2), self.v_cache[layer, None].transpose(1, 2)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., T] -> [..., T, E] (scaled by sqrt(E) for Gemma)."""
        x = self.weights.embed_tokens(tokens)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool [..., T, kv_len] -> 0 / -inf [..., G·T, kv_len] in the model's dtype, each query's row
        repeated for the G query heads of a key/value head (see _attention's grouped layout)."""
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
        return mask.repeat(*(1,) * (mask.dim() - 2), groups, 1) if groups > 1 else mask

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, masks: dict[bool, torch.Tensor],
                layer_cache: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder layers over B rows: x [B, T, E] at positions [B, T] -> [B, T, E] (before the
        final norm). layer_cache(i) gives this call's rows of layer i's cache, keys and values
        [B, KV, slots, D] (views; a RowKVCache's rows are stored so, heads before slots, so that the
        attention's batched GEMMs read them in place); `slots` [T] (the same for every row) or [B, T]
        says where the new keys and values go; masks[sliding] is additive, [G·T, kv_len] or
        [B, 1, G·T, kv_len]. `taps` (a list) gets the output [B, T, E] of each layer in feature_taps."""
        ropes = {local: (self.rope_local if local else self.rope_global)[:, positions, None, :]  # [2, B, T, 1, D]
                 for local in masks}
        for i in range(self.num_layers):
            local = self.cfg.is_sliding(i)
            x = self._layer(self.weights.layers[i], x, slots, ropes[local], masks[local], *layer_cache(i))
            if taps is not None and i in self.feature_taps:
                taps.append(x)
        return x

    def compile_layers(self, enabled: bool = True) -> None:
        """The decoder layer (_layer) through torch.compile from now on (enabled) or eager again
        ("regional compilation"): every layer's call shares ONE compiled function, since the layer's
        weights and cache views are its arguments (inputs to the graph, not constants), so a compile
        costs one layer's time, not the whole model's (dynamo would unroll all the layers). What runs
        around the layers (embedding, masks, final norm, head) stays eager. The instance's attribute
        shadows the method, so every caller (speculant.row_step's row forwards, the row drafters over
        this model, any forward of the model from then on) gets the same compiled function. (The
        single-request fused step compiles its whole forwards instead: measured on the GPU; per
        layer it would lose the fusion of a layer's last residual add with the next layer's norm,
        not yet measured there.) dynamic=None
        (torch.compile's default): the first shape compiles static, the next one once with symbolic
        batch and length; bit-exact calls (an ExactKeys mask) compile once more."""
        if not enabled:
            self.__dict__.pop("_layer", None)
        elif "_layer" not in self.__dict__:
            self._layer = torch.compile(self._layer)

    def _layer(self, layer: Block, x: torch.Tensor, slots: torch.Tensor, rope: torch.Tensor,
               mask: torch.Tensor | ExactKeys, keys_cache: torch.Tensor, values_cache: torch.Tensor) -> torch.Tensor:
        """One decoder layer, residuals included: x [B, T, E] -> [B, T, E] (see _layers, _attention)."""
        x = x + self._attention(layer, x, slots, rope, mask, keys_cache, values_cache)
        return x + self._mlp(layer, x)

    def _attention(self, layer: Block, x: torch.Tensor, slots: torch.Tensor, rope: torch.Tensor,
                   mask: torch.Tensor | ExactKeys, keys_cache: torch.Tensor, values_cache: torch.Tensor) -> torch.Tensor:
        """The attention half of a layer, residual excluded: x [B, T, E] -> [B, T, E]. Writes the new
        keys and values at `slots` of keys_cache, values_cache [B, KV, slots, D] (views of the cache)
        and attends to their first kv_len = mask.shape[-1] slots, or in bit-exact mode (mask an
        ExactKeys) to the keys it names; see _layers for the shapes."""
        cfg = self.cfg
        b, t = x.shape[:2]
        kv, groups, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        h = layer.input_layernorm(x)
        if layer.qkv is not None:
            q, k, v = linear(h, *layer.qkv).split([cfg.num_heads * d, kv * d, kv * d], -1)
        else:
            q, k, v = layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)
        q, k, v = q.reshape(b, t, cfg.num_heads, d), k.reshape(b, t, kv, d), v.reshape(b, t, kv, d)
        if cfg.arch == "gemma3":
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = apply_rope(q, rope[0], rope[1]), apply_rope(k, rope[0], rope[1])
        if slots.dim() == 1:  # every row writes the same slots
            keys_cache.index_copy_(2, slots, k.transpose(1, 2))
            values_cache.index_copy_(2, slots, v.transpose(1, 2))
        else:  # (the advanced indices' [B, T] come first: the value is k [B, T, KV, D] as it is)
            rows = torch.arange(b, device=x.device)[:, None]  # [B, 1]
            keys_cache[rows, :, slots] = k
            values_cache[rows, :, slots] = v
        if isinstance(mask, ExactKeys):  # bit-exact mode (one row, W tokens): each walks its own keys [slots, KV, D]
            out = exact_attention(q.view(t, kv, groups, d), keys_cache[0].transpose(0, 1),
                                  values_cache[0].transpose(0, 1), mask, self.attn_scale)
            out = out.reshape(b, t, cfg.num_heads * d)  # [1, W, H·D]
        else:
            out = self._cache_attention(q, keys_cache, values_cache, mask)
        out = linear(out, layer.o) if layer.o is not None else layer.o_proj(out)
        if cfg.arch == "gemma3":
            out = layer.post_attention_layernorm(out)
        return out

    def _cache_attention(self, q: torch.Tensor, keys_cache: torch.Tensor, values_cache: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, D] over the first kv_len = mask.shape[-1] slots of keys_cache, values_cache
        [B, KV, slots, D] under the additive mask -> [B, T, H·D]."""
        cfg = self.cfg
        b, t = q.shape[:2]
        kv, groups, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        kv_len = mask.shape[-1]
        # [B, KV, kv_len, D], views. A RowKVCache's rows hold each head's slots together, so B·KV
        # fold into one batch stride and the GEMMs read the cache in place; slots before heads (the
        # single-row cache, [S, KV, D]) would make matmul copy the whole view first.
        keys, values = keys_cache[:, :, :kv_len], values_cache[:, :, :kv_len]
        # Grouped-query attention without copying the cache per query head: query head
        # j·groups + g reads key/value head j (Hugging Face's repeat_interleave order), so the
        # queries are laid out as [B, KV, groups·T, D] and each KV head serves its group in one call.
        q = q.view(b, t, kv, groups, d).permute(0, 2, 3, 1, 4).reshape(b, kv, groups * t, d)
        if self.attention == "matmul":  # two GEMMs and a softmax: parallel over the keys on a GPU
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.attn_scale + mask.float()
            out = torch.matmul(torch.softmax(scores, -1).to(q.dtype), values)
        elif self.attention == "blocked":
            out = self._blocked_attention(q, keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.attn_scale)
        return out.view(b, kv, groups, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads * d)  # [B, T, H·D]

    def _blocked_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """Attention over fixed blocks of ATTENTION_BLOCK keys: q [B, KV, M, D] over keys, values
        [B, KV, kv_len, D] under the additive mask [..., M, kv_len] -> [B, KV, M, D]. Each block is
        scored and summed by GEMMs of one shape (the last block padded, its padding masked), and the
        blocks are merged in order by an online softmax (running max, rescaled sums). So a row's bits
        do not depend on kv_len, i.e. on how many rows the call holds: a key block the row cannot see
        adds exact zeros and rescales by exactly 1 (one GEMM over all kv_len keys sums them in an
        order that depends on kv_len on some CPUs: avx512_bf16 oneDNN, 291 against 292 keys)."""
        kv_len = keys.shape[-2]
        short = -kv_len % ATTENTION_BLOCK  # the last block's padding: zero keys, masked
        bias = mask.float()
        if short:
            bias = F.pad(bias, (0, short), value=float("-inf"))
            keys, values = F.pad(keys, (0, 0, 0, short)), F.pad(values, (0, 0, 0, short))
        q = q * self.attn_scale
        top = acc = total = None
        for first in range(0, kv_len, ATTENTION_BLOCK):
            end = first + ATTENTION_BLOCK
            scores = torch.matmul(q, keys[..., first:end, :].transpose(-1, -2)).float() + bias[..., first:end]
            block_top = scores.amax(-1, keepdim=True)  # [B, KV, M, 1]
            new_top = block_top if top is None else torch.maximum(top, block_top)
            shift = new_top.clamp_min(-1e30)  # a row that sees no key yet (a sliding window): no inf - inf
            weights = torch.exp(scores - shift)
            part = torch.matmul(weights.to(q.dtype), values[..., first:end, :]).float()
            if acc is None:
                acc, total = part, weights.sum(-1, keepdim=True)
            else:
                rescale = torch.exp(top - shift)
                acc, total = acc * rescale + part, total * rescale + weights.sum(-1, keepdim=True)
            top = new_top
        return (acc / total).to(q.dtype)

    def _mlp(self, layer: Block, x: torch.Tensor) -> torch.Tensor:
        gemma = self.cfg.arch == "gemma3"
        h = layer.pre_feedforward_layernorm(x) if gemma else layer.post_attention_layernorm(x)
        if layer.gate_up is not None:
            gate, up = linear(h, layer.gate_up).chunk(2, dim=-1)
        else:
            gate, up = layer.gate_proj(h), layer.up_proj(h)
        down = (lambda v: linear(v, layer.down)) if layer.down is not None else layer.down_proj
        if gemma:
            return layer.post_feedforward_layernorm(down(F.gelu(gate, approximate="tanh") * up))
        return down(F.silu(gate) * up)

    # ---- several rows at once (speculant.batching) -------------------------------------------------
    # B = rows in the call, T = the longest row's tokens; row b holds lengths[b] tokens at positions
    # starts[b].., the rest of its T is padding. Each row reads and writes only its own cache row
    # (a RowKVCache), so rows never see each other; _layers is the single row's, with slots per row.

    def new_row_cache(self, rows: int, features: bool = False) -> RowKVCache:
        """A cache of `rows` independent rows for forward_rows (features: also the final-normed
        hidden states, for a draft that reads them)."""
        return RowKVCache(self, rows, features)

    @torch.inference_mode()
    def forward_rows(self, cache: RowKVCache, tokens: torch.Tensor, starts: list[int], lengths: list[int],
                     first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows first_row..first_row+B-1 of `cache`: tokens [B, T] (row b valid up to lengths[b], 0..T)
        at positions starts[b].. -> (logits [B, T, vocab] float32, final-normed hidden [B, T, E]);
        padded positions give garbage and write only the scratch slot. Checked, and keys read only up
        to the furthest row's end: forward_rows_static is the call a graph captures."""
        ends = [s + n for s, n in zip(starts, lengths) if n]
        if min(lengths) < 0 or min(starts) < 0 or not ends:
            raise ValueError("rows need lengths >= 0 (one at least > 0) at positions >= 0")
        check_fits(self, max(ends))
        return self.forward_rows_static(cache, tokens.to(self.device), torch.tensor(starts, device=self.device),
                                        torch.tensor(lengths, device=self.device), max(ends), first_row=first_row)

    def forward_rows_static(self, cache: RowKVCache, tokens: torch.Tensor, starts: torch.Tensor,
                            lengths: torch.Tensor, kv_len: int, inputs: torch.Tensor | None = None,
                            first_row: int = 0, with_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """forward_rows with starts, lengths [B] as device tensors and the keys read fixed at
        `kv_len` (>= every row's end, unchecked): no host synchronisation and static shapes, so a
        CUDA graph can capture it (speculant.row_step). `inputs` [B, T, E] replaces the embeddings (a
        feature-reading draft); with_logits=False skips the output head (logits None: a prefill, or a
        draft that needs one position's logits: self.logits(hidden[...]))."""
        b, t = tokens.shape
        offsets = torch.arange(t, device=self.device)  # [T]
        start = starts[:, None]
        valid = offsets[None, :] < lengths[:, None]  # [B, T]
        positions = torch.where(valid, start + offsets, self.max_seq_len - 1)  # [B, T]: padding reads any rope
        slots = torch.where(valid, start + offsets, self.max_seq_len)  # padding writes the scratch slot
        key_pos = torch.arange(kv_len, device=self.device)  # [kv_len]: slot = position
        # [B, 1, T, kv_len] (1: the same for every KV head): causal within the row; padding queries
        # may read all (never NaN, never used)
        allowed = ((key_pos[None, None, :] <= positions[:, :, None]) | ~valid[:, :, None])[:, None]
        masks = {False: self._additive(allowed)}
        if self.cfg.sliding_window:
            near = (positions[:, :, None] - key_pos[None, None, :] < self.cfg.sliding_window)[:, None]
            masks[True] = self._additive(allowed & near)
        x = self.embed(tokens) if inputs is None else inputs  # [B, T, E]
        rows = slice(first_row, first_row + b)
        taps = self.new_taps(cache)
        hidden = self.weights.norm(self._layers(x, positions, slots, masks,
                                                lambda i: (cache.k[i, rows], cache.v[i, rows]), taps))
        if cache.features is not None:
            features = self.feature_values(hidden, taps)
            cache.features[torch.arange(first_row, first_row + b, device=self.device)[:, None], slots] = features
        if not with_logits:
            return None, hidden
        return self.logits(hidden.reshape(b * t, -1)).view(b, t, -1), hidden


class RowKVCache:
    """The caches of several independent rows (requests) of one LeanModel, for forward_rows: keys and
    values [layers, rows, KV, S + 1, D] (heads before slots: see LeanModel._cache_attention), features
    [rows, S + 1, E] (or None). Slot S is scratch: padding writes there and nothing reads it. Like the
    single-row cache it is position-indexed, so rollback is free: the caller keeps each row's length,
    later writes overwrite, the mask hides."""

    def __init__(self, model: LeanModel, rows: int, features: bool = False) -> None:
        cfg = model.cfg
        shape = (model.num_layers, rows, cfg.num_kv_heads, model.max_seq_len + 1, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.hidden_size = cfg.hidden_size
        self.features: torch.Tensor | None = None
        if features:
            self.keep_features()

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def keep_features(self) -> None:
        """From now on forward_rows also stores each row's features (a feature-reading draft reads
        them; the model's taps say which, see LeanModel.keep_features), as the model does for one row."""
        if self.features is None:
            rows, slots = self.k.shape[1], self.k.shape[3]
            self.features = torch.zeros(rows, slots, self.hidden_size, dtype=self.k.dtype, device=self.k.device)

    def move_row(self, source: int, dest: int, length: int) -> None:
        """Copy row `source`'s first `length` slots to row `dest` (rows stay packed when one leaves)."""
        self.k[:, dest, :, :length] = self.k[:, source, :, :length]
        self.v[:, dest, :, :length] = self.v[:, source, :, :length]
        if self.features is not None:
            self.features[dest, :length] = self.features[source, :length]


def tiny_config(arch: str = "llama", vocab_size: int = 64, **overrides) -> TransformerConfig:
    """A few-kilobyte config for unit tests."""
    base = {
        "arch": arch, "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_layers": 3,
        "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "max_position_embeddings": 512, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
    }
    if arch == "gemma3":
        base.update(sliding_window=4, layer_types=("sliding_attention", "sliding_attention", "full_attention"),
                    query_pre_attn_scalar=8.0)
    base.update(overrides)
    return TransformerConfig(**base)


def random_weights(cfg: TransformerConfig, seed: int = 0, scale: float = 1.0, dtype=torch.float32) -> TransformerWeights:
    """Deterministic random weights (for tests and for benchmarks of shape, not quality)."""
    generator = torch.Generator().manual_seed(seed)
    weights = TransformerWeights(cfg)
    with torch.no_grad():
        for name, param in weights.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (0.0 if cfg.arch == "gemma3" else 1.0))
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else 1
                param.copy_(torch.randn(param.shape, generator=generator) * scale / math.sqrt(fan_in))
    return weights.to(dtype).eval().requires_grad_(False)
