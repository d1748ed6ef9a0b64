"""Distilled drafts (`speculant distill` trains them) and their folder format.

A draft is a few decoder layers over the TARGET'S embedding, with a truncated-vocabulary head:

    target embedding (shared, frozen)   tokens [T] -> [T, E]   (not stored in the draft's files)
    num_layers llama blocks             [T, E] -> [T, E]       (the draft's own weights)
    final RMSNorm                       [T, E]
    head over K kept token ids          [T, E] -> [T, K]       ("shared": rows of the target's own
                                                                output head, frozen, zero storage;
                                                                "own": a trained K x E matrix)
    + a learned bias [K]
    scatter into the full vocabulary    [T, K] -> [T, V], -inf outside the kept ids

`forward` returns logits over the FULL target vocabulary, so the draft is an ordinary `CausalLM`:
`logits_to_probs` turns the -inf entries into probability 0 for every sampling transform, and q
stays exactly the law the draft samples from, so speculative sampling stays exact; a token outside
the kept ids is simply never proposed. A `FeatureDraft` (EAGLE-style) also reads the target's hidden
states.

Serving runs through `LeanModel` (static, position-indexed KV cache, rollback by `truncate`).
Training runs through `batched_hidden_states`: the cached path writes one shared cache in place and
takes one sequence, which autograd and batching do not like; both compute the same function, and
tests/test_distill.py pins that they agree.

A draft folder (`save_draft`, `load_draft`) holds config.json (format, the target's name and sha256,
the architecture) and model.safetensors (the draft's own weights and kept ids; no embedding).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from speculant.models.base import DTYPES
from speculant.models.transformer import (
    Block,
    LeanModel,
    RMSNorm,
    TransformerConfig,
    TransformerWeights,
    apply_rope,
    quantize_rows,
)

FORMAT = "speculant-draft"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class DraftFolderError(ValueError):
    """A draft folder that cannot be used (not a draft, damaged); the message says why and what to do."""


class TargetMismatchError(DraftFolderError):
    """A draft was loaded for a target other than the one it was distilled from."""


@dataclass(frozen=True)
class DraftConfig:
    """Sizes of a distilled draft. The attention and MLP shapes default to the target's own."""

    vocab_size: int  # the target's full vocabulary
    hidden_size: int  # the target's hidden size (the embedding is shared)
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_kept: int  # K: size of the truncated output vocabulary
    head: str = "shared"  # "shared": target's output rows for the kept ids; "own": a trained matrix
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    embed_scale: float = 1.0  # Gemma targets scale embeddings by sqrt(E)
    # "tokens": the draft reads tokens only. "features": it also reads the target's final hidden
    # state at the previous position (EAGLE-style; see FeatureDraft).
    inputs: str = "tokens"
    # a feature draft: the target layers whose outputs it also reads (EAGLE-3's low, middle and high
    # layers), mixed into the final-normed feature (DraftWeights.combine_features); () = none
    feature_layers: tuple[int, ...] = ()
    feature_rank: int = 0  # the taps' mix: 0 = one [n·E -> E] matrix; r = through r dimensions (fewer bytes)

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))  # JSON gives a list
        if self.inputs not in ("tokens", "features"):
            raise ValueError(f"inputs must be 'tokens' or 'features', got {self.inputs!r}")
        if self.feature_layers and (self.inputs != "features" or min(self.feature_layers) < 0
                                    or len(set(self.feature_layers)) != len(self.feature_layers)):
            raise ValueError(f"feature layers are distinct target layer indices of a feature draft, got "
                             f"{list(self.feature_layers)}")
        if self.feature_rank < 0 or (self.feature_rank and not self.feature_layers):
            raise ValueError(f"a feature rank is >= 0 and mixes feature layers, got {self.feature_rank}")
        if self.head not in ("shared", "own"):
            raise ValueError(f"head must be 'shared' or 'own', got {self.head!r}")
        if self.num_layers < 1:
            raise ValueError(f"a draft needs at least one layer, got {self.num_layers}")
        if not 1 <= self.num_kept <= self.vocab_size:
            raise ValueError(f"num_kept must be in 1..{self.vocab_size}, got {self.num_kept}")

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            arch="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=True,
        )

    @staticmethod
    def for_target(target_cfg: TransformerConfig, num_layers: int = 2, num_kept: int = 8192,
                   head: str = "shared", intermediate_size: int | None = None, inputs: str = "tokens",
                   feature_layers: tuple[int, ...] = (), feature_rank: int = 0) -> DraftConfig:
        """A draft shaped like one layer of `target_cfg` (so target layers can initialise it)."""
        gemma = target_cfg.arch == "gemma3"
        if any(i >= target_cfg.num_layers for i in feature_layers):
            raise ValueError(f"feature layers {list(feature_layers)}: the target has layers 0..{target_cfg.num_layers - 1}")
        return DraftConfig(
            vocab_size=target_cfg.vocab_size, hidden_size=target_cfg.hidden_size,
            intermediate_size=intermediate_size or target_cfg.intermediate_size, num_layers=num_layers,
            num_heads=target_cfg.num_heads, num_kv_heads=target_cfg.num_kv_heads, head_dim=target_cfg.head_dim,
            num_kept=min(num_kept, target_cfg.vocab_size), head=head, rope_theta=target_cfg.rope_theta,
            rms_norm_eps=target_cfg.rms_norm_eps, max_position_embeddings=target_cfg.max_position_embeddings,
            embed_scale=float(target_cfg.hidden_size**0.5) if gemma else 1.0, inputs=inputs,
            feature_layers=tuple(feature_layers), feature_rank=feature_rank,
        )


class DraftWeights(nn.Module):
    """The draft's own parameters, plus references (not registered, not saved) to the target's
    embedding and output head. Duck-types `TransformerWeights` for `LeanModel`."""

    def __init__(self, cfg: DraftConfig, target_embedding: nn.Embedding, kept_ids: torch.Tensor,
                 shared_head_rows: torch.Tensor | None = None) -> None:
        super().__init__()
        if kept_ids.shape != (cfg.num_kept,):
            raise ValueError(f"kept_ids must have shape [{cfg.num_kept}], got {tuple(kept_ids.shape)}")
        if target_embedding.weight.shape != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"target embedding {tuple(target_embedding.weight.shape)} does not match the draft's "
                             f"vocabulary {cfg.vocab_size} x hidden size {cfg.hidden_size}")
        self.draft_cfg = cfg
        self.cfg = cfg.transformer_config()
        self._shared = (target_embedding,)  # a tuple: nn.Module does not register it
        self.layers = nn.ModuleList(Block(self.cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, False)
        self.head_bias = nn.Parameter(torch.zeros(cfg.num_kept))
        self.head = nn.Linear(cfg.hidden_size, cfg.num_kept, bias=False) if cfg.head == "own" else None
        if cfg.inputs == "features":
            # [embedding of x_{i+1} | target feature f_i], each RMS-normalised, mixed down to E
            self.embed_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, False)
            self.feature_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, False)
            self.fuse_in = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)
        if cfg.feature_layers:
            # each tapped layer's output RMS-normalised, mixed down to E and added to the final-normed
            # feature: at zero mix (a fresh mix starts there) the draft reads what a tapless one does
            self.tap_norms = nn.ModuleList(RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, False)
                                           for _ in cfg.feature_layers)
            width = len(cfg.feature_layers) * cfg.hidden_size
            self.tap_down = nn.Linear(width, cfg.feature_rank, bias=False) if cfg.feature_rank else None
            self.tap_mix = nn.Linear(cfg.feature_rank or width, cfg.hidden_size, bias=False)
        self.register_buffer("kept_ids", kept_ids.to(torch.int64).clone())
        if (cfg.head == "shared") != (shared_head_rows is not None):
            raise ValueError("shared_head_rows [K, E] is needed exactly when head == 'shared'")
        rows = shared_head_rows.detach() if shared_head_rows is not None else torch.empty(0)
        self.register_buffer("shared_head_rows", rows, persistent=False)  # [K, E] (frozen) or empty

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._shared[0]

    def head_weight(self) -> torch.Tensor:
        """[K, E]: the kept rows of the output head."""
        return self.head.weight if self.head is not None else self.shared_head_rows

    def kept_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., E] after the final norm -> logits over the kept ids [..., K], float32."""
        weight = self.head_weight()
        return (F.linear(hidden, weight.to(hidden.dtype)).float() + self.head_bias.float())

    def combine_features(self, hidden: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """The target's feature at a position: final-normed hidden [..., E] plus the mix of the tapped
        layers' outputs taps [..., E] each (in feature_layers' order) -> [..., E]. The target's
        forward calls it (LeanModel.keep_features), training calls it on the target's batch."""
        normed = torch.cat([norm(tap.to(hidden.dtype)) for norm, tap in zip(self.tap_norms, taps)], -1)
        normed = normed.to(self.tap_mix.weight.dtype)
        if self.tap_down is not None:
            normed = self.tap_down(normed)
        return hidden + self.tap_mix(normed).to(hidden.dtype)

    def feature_inputs(self, embedded: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """embedded [..., E] (token embeddings), features [..., E] (target features) -> [..., E]."""
        both = torch.cat([self.embed_norm(embedded), self.feature_norm(features.to(embedded.dtype))], -1)
        return self.fuse_in(both)

    def own_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of what the draft stores (everything in its state dict), saved in `dtype` (save_draft's;
        None: as the tensors are now)."""
        tensors = stored_tensors(self, dtype) if dtype is not None else self.state_dict()
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def init_from_target(self, target: TransformerWeights) -> None:
        """Copy the target's first layers and final norm (the `layers:N` self-draft as a start)."""
        if target.cfg.arch != "llama":
            raise ValueError("only llama-family targets can initialise a draft with their layers")
        with torch.no_grad():
            for mine, theirs in zip(self.layers, target.layers):
                for name, p_mine in mine.named_parameters():  # a target's q/k/v biases (Qwen2) are left out
                    p_theirs = theirs.get_parameter(name)
                    if p_mine.shape != p_theirs.shape:
                        raise ValueError(f"layer shapes differ at {name}: {tuple(p_mine.shape)} vs "
                                         f"{tuple(p_theirs.shape)}")
                    p_mine.copy_(p_theirs)
            self.norm.weight.copy_(target.norm.weight)


def init_random(weights: DraftWeights, seed: int, scale: float = 1.0) -> None:
    """Deterministic small random init (norms at 1, linear weights ~ N(0, scale^2 / fan_in))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in weights.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name in ("head_bias", "fuse_in.bias", "tap_mix.weight"):
                param.zero_()
            else:
                std = scale / param.shape[-1] ** 0.5
                param.copy_((torch.randn(param.shape, generator=generator) * std).to(param.dtype))


class DistilledDraft(LeanModel):
    """`CausalLM` over `DraftWeights`: the lean model's cache and layers, a truncated head.

    forward(tokens [T], start_pos) -> logits [T, V] float32, -inf outside the kept ids.
    """

    def __init__(self, weights: DraftWeights, max_seq_len: int | None = None) -> None:
        super().__init__(weights, max_seq_len=max_seq_len)  # type: ignore[arg-type]
        self.embed_scale = weights.draft_cfg.embed_scale
        self.draft_weights = weights

    @property
    def kept_ids(self) -> torch.Tensor:
        return self.draft_weights.kept_ids

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        kept = self.draft_weights.kept_logits(hidden)  # [T, K]
        full = torch.full((hidden.shape[0], self.vocab_size), float("-inf"), device=hidden.device)
        return full.index_copy_(1, self.kept_ids, kept)  # [T, V]

    def train_kept_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Batched, cache-free, differentiable: tokens [B, T] -> kept logits [B, T, K] float32."""
        w = self.draft_weights
        # The residual stream in the draft's own dtype (float32 master weights while training).
        x = w.embed_tokens(tokens.to(self.device)).to(w.head_bias.dtype)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        hidden = batched_hidden_states(w.layers, w.norm, w.cfg, x, self.rope_global)
        return w.kept_logits(hidden)


class FeatureDraft(DistilledDraft):
    """An EAGLE-style draft (Li et al., 2024): at draft position i it reads the token x_{i+1} AND the
    target's final-normed hidden state ("feature") f_i at position i, and predicts both the next
    feature f_{i+1} (its own final-normed hidden state) and the distribution of x_{i+2}:

        [T] tokens, [T, E] features -> fuse_in(norm(embed) | norm(feature)) -> layers -> norm
        -> hidden [T, E] (the predicted features) -> truncated head -> logits [T, V]

    While drafting past the committed text the true feature is not known yet, so the draft feeds
    its own predicted feature back (speculant.drafters.features). The target's features come for
    free from its verification pass (LeanModel.keep_features). q is still exactly the law the
    draft samples from, so speculative sampling stays exact.
    """

    def read_from(self, target: LeanModel) -> None:
        """Make `target` keep the features this draft reads (its final-normed hidden states, and the
        outputs of the draft's feature layers mixed in: LeanModel.keep_features)."""
        layers = self.draft_weights.draft_cfg.feature_layers  # keep_features checks them against the target
        target.keep_features(layers, self.draft_weights.combine_features if layers else None)

    def prefill(self, tokens: torch.Tensor) -> None:
        """A draft's own forward (not LeanModel's head-less one: its layers read more than tokens)."""
        self.truncate(0)
        self.forward(tokens, 0)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        raise TypeError("a feature draft needs the target's features: use forward_features (or "
                        "speculant.drafters.features.FeatureDrafter)")

    @torch.inference_mode()
    def forward_features(self, tokens: torch.Tensor, features: torch.Tensor,
                         start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [T], features [T, E] at positions start_pos.. -> (logits [T, V], hidden [T, E])."""
        end = self._write_range(start_pos, tokens.shape[0])
        positions = torch.arange(start_pos, end, device=self.device)
        hidden = self.feature_hidden(tokens.to(self.device), features.to(self.device), positions, kv_len=end)
        self._length = end
        return self.logits(hidden), hidden

    def feature_hidden(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                       kv_len: int) -> torch.Tensor:
        """The cached path (serving and the fused step): writes K/V at positions, returns [T, E]."""
        inputs = self.draft_weights.feature_inputs(self.embed(tokens), features)
        return self.hidden_states(tokens, positions, kv_len, inputs=inputs)

    def forward_features_rows(self, cache, tokens: torch.Tensor, features: torch.Tensor, starts: torch.Tensor,
                              lengths: torch.Tensor, kv_len: int,
                              with_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """forward_features over rows (speculant.batching), as LeanModel.forward_rows_static: tokens
        [B, T], features [B, T, E], row b valid up to lengths[b] at positions starts[b].. (device
        tensors), keys read up to kv_len, in rows 0..B-1 of `cache` (a RowKVCache) -> (logits [B, T, V]
        or None without with_logits, predicted features [B, T, E]). No host read: a graph captures it."""
        inputs = self.draft_weights.feature_inputs(self.embed(tokens), features)
        return self.forward_rows_static(cache, tokens, starts, lengths, kv_len, inputs=inputs, with_logits=with_logits)

    def train_feature_outputs(self, tokens: torch.Tensor,
                              features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched, cache-free, differentiable: tokens [B, T], features [B, T, E] ->
        (kept logits [B, T, K] float32, predicted features [B, T, E])."""
        w = self.draft_weights
        dtype = w.head_bias.dtype
        embedded = w.embed_tokens(tokens.to(self.device)).to(dtype)
        if self.embed_scale != 1.0:
            embedded = embedded * self.embed_scale
        x = w.feature_inputs(embedded, features.to(dtype))
        hidden = batched_hidden_states(w.layers, w.norm, w.cfg, x, self.rope_global)
        return w.kept_logits(hidden), hidden


def batched_hidden_states(layers, norm: nn.Module, cfg: TransformerConfig, x: torch.Tensor,
                          rope: torch.Tensor, key_valid: torch.Tensor | None = None,
                          cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                          start: int = 0, tap_layers: Sequence[int] = (),
                          taps: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Llama blocks over a batch: x [B, T, E] at positions start..start+T-1 -> final-normed [B, T, E].

    The same arithmetic as `LeanModel.hidden_states` (llama branch), batched and autograd-safe.
    rope is the model's [2, S, D] table (S >= start + T). key_valid [B, start + T] (optional) masks
    out left padding: RoPE is relative, so a left-padded row computes what the unpadded row does.
    cache (optional, no autograd): per layer (keys, values) [B, KV, S, D]; the new K/V are written at
    start..start+T-1 and attention spans 0..start+T-1 (batched generation); without it start is 0.
    `taps` (a list) gets the output [B, T, E] of each layer in `tap_layers`, in order.
    """
    if cfg.arch != "llama" or cfg.sliding_window:
        raise ValueError("batched_hidden_states handles llama-family layers without sliding windows")
    b, t, _ = x.shape
    end = start + t
    h_, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = rope[0, start:end, None, :], rope[1, start:end, None, :]  # [T, 1, D]
    groups = h_ // kv
    mask = None
    if key_valid is not None or start:
        queries = torch.arange(start, end, device=x.device)[:, None]
        keys_at = torch.arange(end, device=x.device)[None, :]
        valid = key_valid[:, None, :end] if key_valid is not None else True
        # [B, 1, T, end]; pad rows attend to themselves (no NaN)
        mask = ((keys_at <= queries) & valid | (keys_at == queries)).view(-1, 1, t, end)
    for i, layer in enumerate(layers):
        h = layer.input_layernorm(x)
        q = apply_rope(layer.q_proj(h).view(b, t, h_, d), cos, sin)
        k = apply_rope(layer.k_proj(h).view(b, t, kv, d), cos, sin)
        v = layer.v_proj(h).view(b, t, kv, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:
            cache[i][0][:, :, start:end] = k
            cache[i][1][:, :, start:end] = v
            k, v = cache[i][0][:, :, :end], cache[i][1][:, :, :end]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=d**-0.5)  # [B, H, T, D]
        x = x + layer.o_proj(out.transpose(1, 2).reshape(b, t, h_ * d))
        h = layer.post_attention_layernorm(x)
        x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
        if taps is not None and i in tap_layers:
            taps.append(x)
    return norm(x)


def build_draft(cfg: DraftConfig, target_weights: TransformerWeights, kept_ids: torch.Tensor,
                max_seq_len: int | None = None) -> DistilledDraft:
    """A draft over `target_weights`' embedding and head, on the target's device and dtype."""
    param = target_weights.embed_tokens.weight
    head = target_weights.head_weight()
    rows = head.detach()[kept_ids.to(head.device)] if cfg.head == "shared" else None
    weights = DraftWeights(cfg, target_weights.embed_tokens, kept_ids, rows)
    weights = weights.to(device=param.device, dtype=param.dtype).requires_grad_(False)  # frozen: q|k|v fused
    return draft_class(cfg)(weights, max_seq_len=max_seq_len)


def draft_class(cfg: DraftConfig) -> type[DistilledDraft]:
    return FeatureDraft if cfg.inputs == "features" else DistilledDraft


# ---- the output folder ------------------------------------------------------------------------


INT8_SCALE = ".int8_scale"  # the name of an int8 matrix's row scales: the matrix's name + this
SAVE_DTYPES = {**DTYPES, "int8": torch.int8}  # what a draft's weights may be saved in


def stored_tensors(weights: DraftWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors save_draft writes for `weights` (on the CPU): floating ones in `dtype`; with
    torch.int8, each matrix as int8 with its row scales beside it (quantize_rows) and the rest (norms,
    biases) in bfloat16. Integer tensors (the kept ids) as they are."""
    tensors = {}
    for name, tensor in weights.state_dict().items():
        tensor = tensor.detach().cpu()
        if not tensor.is_floating_point():
            tensors[name] = tensor.contiguous()
        elif dtype is torch.int8 and tensor.dim() == 2:
            tensors[name], tensors[name + INT8_SCALE] = quantize_rows(tensor)
        else:
            tensors[name] = tensor.to(torch.bfloat16 if dtype is torch.int8 else dtype).contiguous()
    return tensors


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """stored_tensors' output -> a state dict: each int8 matrix times its row scales (float32)."""
    out = {name: t for name, t in tensors.items() if not name.endswith(INT8_SCALE)}
    for name, tensor in out.items():
        if tensor.dtype == torch.int8:
            out[name] = tensor.float() * tensors[name + INT8_SCALE][:, None]
    return out


def save_draft(out_dir: str | Path, weights: DraftWeights, *, target_name: str, target_hash: str,
               dtype: torch.dtype = torch.bfloat16, metadata: dict | None = None) -> Path:
    """Write model.safetensors (the draft's own weights in `dtype`, one of SAVE_DTYPES: stored_tensors;
    kept ids as int64; no embedding) and config.json. Files are written to a temporary name and renamed,
    so a crash leaves the old pair."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = stored_tensors(weights, dtype)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target_name": target_name,
        "target_hash": target_hash,
        "architecture": asdict(weights.draft_cfg),
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "training": metadata or {},
    }
    _atomic(out_dir / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": FORMAT}))
    _atomic(out_dir / CONFIG_FILE, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def is_draft_folder(path: str | Path) -> bool:
    """True if `path` is a folder written by `save_draft`."""
    config_path = Path(path) / CONFIG_FILE
    try:
        return config_path.is_file() and json.loads(config_path.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_draft_config(path: str | Path) -> dict:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise DraftFolderError(f"{path} is not a distilled draft: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise DraftFolderError(f"{config_path} has format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_draft(path: str | Path, target, max_seq_len: int | None = None) -> DistilledDraft:
    """Load a draft folder for `target`: a LoadedModel (speculant.models.registry) or a pair
    (TransformerWeights, source_hash). Refuses a target whose source hash differs from the one the
    draft was distilled from. The target's embedding is shared (same tensor, no copy); the draft's
    weights take the target's device and dtype; its cache holds `max_seq_len` positions (default:
    the loaded target's)."""
    if isinstance(target, tuple):
        target_weights, target_hash = target
    else:
        target_weights, target_hash = target.weights, target.source_hash
        if max_seq_len is None and getattr(target, "model", None) is not None:
            max_seq_len = target.model.max_seq_len
    if target_weights is None:
        raise TargetMismatchError("a distilled draft needs a lean target (its embedding is shared); "
                                  "this target runs through transformers")
    config = read_draft_config(path)
    if config["target_hash"] != target_hash:
        raise TargetMismatchError(
            f"the draft in {path} was distilled from {config['target_name']!r} (sha256 {config['target_hash'][:12]}…), "
            f"not from this target (sha256 {str(target_hash)[:12]}…): distill a draft for this target "
            "with `speculant distill`"
        )
    cfg = DraftConfig(**config["architecture"])
    tcfg = target_weights.cfg
    if (cfg.vocab_size, cfg.hidden_size) != (tcfg.vocab_size, tcfg.hidden_size):
        raise TargetMismatchError(f"the draft in {path} expects vocabulary {cfg.vocab_size} and hidden size "
                                  f"{cfg.hidden_size}; the target has {tcfg.vocab_size} and {tcfg.hidden_size}")
    try:
        tensors = dequantized(load_file(str(Path(path) / WEIGHTS_FILE)))
        draft = build_draft(cfg, target_weights, tensors["kept_ids"], max_seq_len=max_seq_len)
        param = target_weights.embed_tokens.weight
        draft.draft_weights.load_state_dict({k: v.to(param.device) for k, v in tensors.items()})
    except (OSError, RuntimeError, KeyError, ValueError) as error:  # a weights file cut short or overwritten
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DraftFolderError(f"the draft folder {path} is damaged: its {WEIGHTS_FILE} does not load "
                               f"({first_line[:160]}); copy the folder again or re-run `speculant distill`") from None
    return draft
