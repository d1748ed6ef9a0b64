"""A Hugging Face config.json -> the lean model's TransformerConfig, or the reason it cannot run lean.

Reads both layouts (transformers 4.50 .. 5.x): `rope_theta` + `rope_scaling`, or `rope_parameters`
(flat, or per layer type). Llama-family (llama, mistral, qwen2) and Gemma 3 text configs map;
anything else raises ValueError naming what the lean model does not implement.
"""

from __future__ import annotations

from speculant.models.transformer import TransformerConfig

_LLAMA_FAMILY = ("llama", "mistral", "qwen2")


class _NotLean(Exception):
    """The lean model cannot run this config (the message says why); transformers will."""


def config_from_hf(hf: dict) -> TransformerConfig:
    """The lean config for a Hugging Face config.json (transformers 4.50 .. 5.x layouts).

    Raises ValueError (with the reason) for what the lean model does not implement."""
    try:
        return _config_from_hf(hf)
    except _NotLean as reason:
        raise ValueError(str(reason)) from None


def _config_from_hf(hf: dict) -> TransformerConfig:
    model_type = hf.get("model_type")
    if model_type not in (*_LLAMA_FAMILY, "gemma3_text"):
        raise _NotLean(f"architecture {model_type!r}")
    heads = hf["num_attention_heads"]
    gemma = model_type == "gemma3_text"
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    act = hf.get("hidden_activation") or hf.get("hidden_act")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise _NotLean(f"activation {act!r}")
    if hf.get("mlp_bias"):
        raise _NotLean("MLP biases")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise _NotLean("attention output bias")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key):
            raise _NotLean(key)
    if hf.get("use_bidirectional_attention"):
        raise _NotLean("bidirectional attention")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _NotLean("partial rotary embeddings")

    layers = hf["num_hidden_layers"]
    sliding_window = hf.get("sliding_window")
    layer_types = tuple(hf.get("layer_types") or ())
    if gemma and not layer_types:
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        layer_types = tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers))
    elif model_type == "mistral" and sliding_window and not layer_types:
        layer_types = ("sliding_attention",) * layers
    elif model_type == "qwen2" and not layer_types:
        window_layers = hf.get("max_window_layers", layers)
        use = hf.get("use_sliding_window", False) and sliding_window
        layer_types = tuple("sliding_attention" if use and i >= window_layers else "full_attention" for i in range(layers))
    if not any(t == "sliding_attention" for t in layer_types):
        layer_types, sliding_window = (), None
    elif len(layer_types) != layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise _NotLean(f"layer types {sorted(set(layer_types))}")

    theta, factor, llama3 = _rope(hf, "full_attention", default_theta=1_000_000.0 if gemma else 10000.0)
    local_theta = 10000.0
    if gemma:
        local_theta, local_factor, local_llama3 = _rope(hf, "sliding_attention", default_theta=10000.0)
        if "rope_local_base_freq" in hf:
            local_theta = hf["rope_local_base_freq"]
        if local_factor != 1.0 or local_llama3:
            raise _NotLean("rope scaling on the local layers")
    elif layer_types:  # a sliding llama-family model: both kinds of layers share one rope
        local_theta = theta
        if factor != 1.0 or llama3:
            raise _NotLean("rope scaling with sliding-window layers")
    return TransformerConfig(
        arch="gemma3" if gemma else "llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        attention_bias=model_type == "qwen2",
        rope_local_theta=float(local_theta),
        sliding_window=sliding_window if layer_types else None,
        layer_types=layer_types,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", head_dim) if gemma else None,
        rope_scaling_factor=float(factor),
        rope_llama3=llama3,
    )


def _rope(hf: dict, layer_type: str, default_theta: float) -> tuple[float, float, tuple | None]:
    """(theta, factor, llama3 parameters) for one kind of layer, from either config layout:
    transformers 5 `rope_parameters` (flat, or per layer type), or `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = params.get(layer_type)
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
        scaling = params
    else:
        theta = hf.get("rope_theta", default_theta)
        scaling = hf.get("rope_scaling") or {}
        if layer_type == "sliding_attention":
            scaling = {}  # Gemma 3: the legacy rope_scaling applies to the global layers only
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, 1.0, None
    if kind == "linear":
        return theta, float(scaling["factor"]), None
    if kind == "llama3":
        llama3 = (float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"]),
                  int(scaling["original_max_position_embeddings"]))
        return theta, float(scaling["factor"]), llama3
    raise _NotLean(f"rope scaling {kind!r}")

