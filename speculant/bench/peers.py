"""Peers run in the same benchmark, on the same weights and prompts.

    hf-eager   transformers' own `generate` (eager PyTorch, its default attention), greedy or sampling
    hf-pld     the same with prompt-lookup assisted generation (`prompt_lookup_num_tokens` = γ)
    llama.cpp  llama-cpp-python on the target's GGUF file, if the package is installed and the target
               came from a GGUF file (optional: skipped with a reason otherwise)

The transformers model is read with `AutoModelForCausalLM.from_pretrained` from the folder that
speculant loaded the target from (or converted it into); when there is none, it is built from the
very tensors speculant runs (Llama family), so both sides always compute with the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from speculant.models.base import synchronize


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message says why (recorded in results.json)."""


def hf_folder(loaded) -> Path | None:
    """A Hugging Face model folder (config.json + weights) holding the target's weights, or None."""
    candidates = []
    for name in ("hf_folder", "folder", "cache_dir", "path", "source"):
        value = getattr(loaded, name, None)
        if isinstance(value, (str, Path)):
            candidates.append(Path(value))
    for path in candidates:
        folder = path if path.is_dir() else path.parent
        if (folder / "config.json").exists() and (
            any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
        ):
            return folder
    return None


def _from_lean_weights(weights, torch_dtype):
    """A transformers Llama model holding exactly the lean model's tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = weights.cfg
    if cfg.arch != "llama":
        raise PeerUnavailable(f"no Hugging Face folder for this {cfg.arch} target, and only Llama-family "
                              "weights can be handed to transformers directly")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
    )
    model = LlamaForCausalLM(hf_cfg)
    state = {f"model.{k}": v for k, v in weights.state_dict().items() if not k.startswith("lm_head")}
    if weights.lm_head is not None:
        state["lm_head.weight"] = weights.lm_head.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise PeerUnavailable(f"lean weights do not map onto transformers' Llama: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(torch_dtype)


def load_hf_model(loaded, torch_dtype: torch.dtype, device: str):
    """(model, how it was loaded) for the target in `loaded` (a speculant LoadedModel)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise PeerUnavailable(f"transformers is not importable: {error}") from None
    folder = hf_folder(loaded)
    if folder is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch_dtype)
        how = f"from_pretrained({folder})"
    elif getattr(loaded, "weights", None) is not None:
        model = _from_lean_weights(loaded.weights, torch_dtype)
        how = "built from speculant's own tensors (no Hugging Face folder found)"
    else:
        raise PeerUnavailable("no Hugging Face folder for the target and no lean weights to build one from")
    model = model.to(device).eval()
    return model, how


def hf_generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float, seed: int,
                eos_ids: Sequence[int], prompt_lookup: int | None = None) -> tuple[list[int], float]:
    """One `generate` call: (new token ids, up to and including a stop token; wall seconds).

    Every sampling option is set explicitly (top_k=0: transformers would otherwise default to 50),
    so the law is the same as speculant's plain sampling at `temperature`."""
    from transformers import GenerationConfig

    device = model.device
    eos = [int(t) for t in eos_ids]
    options = {"max_new_tokens": max_new_tokens, "eos_token_id": eos or None,
               "pad_token_id": eos[0] if eos else 0, "num_beams": 1}
    if temperature > 0:
        options.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        options.update(do_sample=False)
    if prompt_lookup:
        options["prompt_lookup_num_tokens"] = int(prompt_lookup)
    config = GenerationConfig(**options)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=attention_mask, generation_config=config)
    synchronize(device)
    seconds = time.perf_counter() - start
    new = out[0, input_ids.shape[1]:].tolist()
    for i, token in enumerate(new):
        if token in eos:
            new = new[: i + 1]
            break
    return new, seconds


# ---- llama.cpp (optional) ------------------------------------------------------------------------


def llama_cpp_available() -> str | None:
    """None if llama-cpp-python can be imported, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as error:  # noqa: BLE001 -- ImportError, or a broken shared library
        return f"llama-cpp-python is not installed ({type(error).__name__})"
    return None


def gguf_source(loaded) -> Path | None:
    """The GGUF file the target came from: a path it was loaded from, or an embedded model's file."""
    source = getattr(loaded, "source", None)
    if isinstance(source, (str, Path)) and str(source).endswith(".gguf") and Path(source).exists():
        return Path(source)
    try:
        import importlib.util

        from speculant.models.registry import EMBEDDED

        entry = EMBEDDED.get(getattr(loaded, "name", ""))
        spec = importlib.util.find_spec(entry.package) if entry is not None else None
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                path = Path(folder) / entry.gguf_file
                if path.exists():
                    return path
    except Exception:  # noqa: BLE001 -- an optional peer: never fail the benchmark over it
        return None
    return None


class LlamaCppPeer:
    """llama-cpp-python on a GGUF file: plain decoding, or its prompt-lookup drafter (γ tokens)."""

    def __init__(self, gguf: Path, n_ctx: int, device: str, prompt_lookup: int | None = None) -> None:
        from llama_cpp import Llama

        draft = None
        if prompt_lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup)
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_gpu_layers=-1 if device == "cuda" else 0,
                         draft_model=draft, verbose=False, seed=0)

    def generate(self, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float, seed: int,
                 eos_ids: Sequence[int]) -> tuple[list[int], float]:
        eos = {int(t) for t in eos_ids}
        self.llm.reset()
        self.llm.set_seed(seed)
        start = time.perf_counter()
        new: list[int] = []
        for token in self.llm.generate(list(prompt_ids), temp=float(temperature), top_k=0, top_p=1.0,
                                       min_p=0.0, repeat_penalty=1.0, reset=True):
            new.append(int(token))
            if token in eos or len(new) >= max_new_tokens:
                break
        return new, time.perf_counter() - start


def param_bytes(module, seen: set | None = None) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once; pass one `seen`
    set across modules to count tensors they share (a draft over the target's embedding) once."""
    seen = set() if seen is None else seen
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total
