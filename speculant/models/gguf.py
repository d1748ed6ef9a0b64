"""GGUF files: reading them (our own reader) and converting them once into a Hugging Face style folder.

The reader is a page of code: gguf-py's reader builds a Python object per vocabulary entry, ten
seconds for Gemma's 262k tokens. `convert_gguf` dequantizes a file into the cache
(speculant.models.cache) as model.safetensors, config.json, generation_config.json, tokenizer.json,
tokenizer_config.json and speculant.json (where it came from, when, with what). The weights are
stored in float32: a dequantized GGUF weight (a 16-bit scale times a small integer, plus an offset)
is exact in float32 and not in bfloat16 or float16.

We map llama / qwen2 / gemma3 tensors to Hugging Face names ourselves (undoing llama.cpp's q/k row
permutation and its 1 + w Gemma norms); other architectures are dequantized by transformers.
Tensors are dequantized with gguf-py, and the tokenizer is built by transformers' GGUF tokenizer
converter; transformers is imported only while converting. A file cut short, not a GGUF or corrupt
is refused with a one-line ModelLoadError naming it.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speculant.models.cache import (
    CACHE_FORMAT,
    ModelLoadError,
    cache_root,
    file_sha256,
    read_json,
    say,
    slug,
    write_json_atomic,
)
from speculant.tokenizer import END_OF_TURN_TOKENS, vocab_fingerprint

_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
               7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (rows first)
    ggml_type: int
    offset: int  # absolute, in the file


def is_gguf(path: Path) -> bool:
    """Whether the file starts with the GGUF magic."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFFile:
    """A GGUF file's metadata (a dict; arrays of numbers as numpy arrays) and its tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 24:
            raise ModelLoadError(f"{self.path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._read_header(size)
        except BaseException:
            self._map.close()
            raise

    def _read_header(self, size: int) -> None:
        buf = self._map
        if buf[:4] != b"GGUF":
            raise ModelLoadError(f"{self.path}: not a GGUF file (it does not start with 'GGUF')")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ModelLoadError(f"{self.path}: corrupt GGUF, or a version this reader does not know "
                                 f"(version {version}; 2 and 3 are read)")
        try:
            self.pos = 24
            self.metadata: dict[str, object] = {}
            for _ in range(n_kv):
                key = self._string()
                (value_type,) = self._unpack("<I")
                self.metadata[key] = self._value(value_type)
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                (n_dims,) = self._unpack("<I")
                dims = self._unpack(f"<{n_dims}Q")
                ggml_type, offset = self._unpack("<IQ")
                infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        except (struct.error, ValueError) as error:  # read past the end (struct.error, numpy's ValueError)
            if self.pos >= size or "buffer" in str(error) or isinstance(error, struct.error):
                raise ModelLoadError(f"{self.path}: truncated GGUF (the file ends inside its header, at "
                                     f"{size} bytes)") from None
            raise ModelLoadError(f"{self.path}: corrupt GGUF header ({error})") from None
        except KeyError as error:
            raise ModelLoadError(f"{self.path}: corrupt GGUF header (unknown value type {error})") from None
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self.pos // alignment) * alignment
        self.tensors = {name: GGUFTensor(name, shape, t, data_start + off) for name, shape, t, off in infos}
        end = max((t.offset + self._nbytes(t) for t in self.tensors.values()), default=data_start)
        if end > size:
            raise ModelLoadError(f"{self.path}: truncated GGUF (its tensors need {end} bytes, the file has {size})")

    def _nbytes(self, info: GGUFTensor) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        except ValueError:
            raise ModelLoadError(f"{self.path}: corrupt GGUF (tensor {info.name} has unknown type "
                                 f"{info.ggml_type})") from None
        return math.prod(info.shape) // block * block_bytes

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._map, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        text = self._map[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def _value(self, value_type: int):
        if value_type == _GGUF_STRING:
            return self._string()
        if value_type == _GGUF_ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in _GGUF_NUMPY:
                array = np.frombuffer(self._map, dtype=_GGUF_NUMPY[item_type], count=count, offset=self.pos).copy()
                self.pos += array.nbytes
                return array
            return [self._value(item_type) for _ in range(count)]
        (value,) = self._unpack(_GGUF_SCALAR[value_type])
        return value

    def read(self, name: str) -> np.ndarray:
        """The tensor, dequantized to float32, in torch order."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        qtype = GGMLQuantizationType(info.ggml_type)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        cols = info.shape[-1]
        rows = math.prod(info.shape[:-1])
        raw = np.frombuffer(self._map, dtype=np.uint8, count=rows * cols // block * block_bytes, offset=info.offset)
        values = np.array(dequantize(raw.reshape(rows, cols // block * block_bytes), qtype), dtype=np.float32)
        if not np.isfinite(values).all():
            raise ModelLoadError(f"{self.path}: corrupt GGUF (tensor {name} holds NaN or infinite values)")
        return values.reshape(info.shape)  # a copy: the map is read-only

    def close(self) -> None:
        self._map.close()


# ---- converting GGUF to a folder --------------------------------------------------------------

# GGUF tensor names -> Hugging Face names, per architecture (blk.N. -> model.layers.N.)
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_OWN_GGUF_ARCHS = ("llama", "qwen2", "gemma3")  # converted here; any other goes through transformers


def convert_gguf(path: str | os.PathLike, *, name: str, sha256: str | None = None, progress: bool = True) -> Path:
    """Dequantize a GGUF file into a Hugging Face style folder in the cache; returns the folder."""
    path = Path(path)
    sha256 = sha256 or file_sha256(path)
    final = cache_root() / f"{sha256[:16]}-{slug(name)}"
    start = time.perf_counter()
    say(progress, f"converting {path.name} once (dequantizing to float32) into {final}")
    with _cache_folder(final) as tmp:
        gguf = GGUFFile(path)
        try:
            meta = gguf.metadata
            arch = str(meta.get("general.architecture", "?"))
            backend = _write_tokenizer_files(tmp, path, meta, progress)
            if arch in _OWN_GGUF_ARCHS:
                config = _gguf_config(gguf, arch)
                tensors = _gguf_weights(gguf, arch, config, progress)
            else:
                config, tensors = _gguf_via_transformers(path, arch)
        finally:
            gguf.close()
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        write_json_atomic(tmp / "config.json", config)
        import gguf as gguf_package
        import transformers

        write_json_atomic(tmp / "speculant.json", {
            "format": CACHE_FORMAT,
            "name": name,
            "source": str(path.resolve()),
            "source_sha256": sha256,
            "source_bytes": path.stat().st_size,
            "architecture": arch,
            "vocab_fingerprint": vocab_fingerprint(backend),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "conversion_seconds": round(time.perf_counter() - start, 2),
            "converted_with": {"transformers": transformers.__version__, "gguf": _version("gguf", gguf_package)},
        })
    say(progress, f"converted in {time.perf_counter() - start:.1f} s")
    return final



def gguf_tokenizer_folder(path: str | os.PathLike, *, name: str, sha256: str | None = None,
                          progress: bool = True) -> Path:
    """A cache folder holding only a GGUF's tokenizer (tokenizer.json, tokenizer_config.json,
    generation_config.json, speculant.json), built from its metadata without touching the weights:
    what the llama.cpp backend needs, which runs the GGUF itself. A full conversion's folder, where
    one exists, serves as well (find_converted)."""
    path = Path(path)
    sha256 = sha256 or file_sha256(path)
    final = cache_root() / "tokenizers" / f"gguf-{sha256[:16]}-{slug(name)}"
    kept = read_json(final / "speculant.json")
    if kept.get("source_sha256") == sha256 and kept.get("format") == CACHE_FORMAT:
        return final
    with _cache_folder(final) as tmp:
        gguf = GGUFFile(path)
        try:
            meta = gguf.metadata
        finally:
            gguf.close()
        backend = _write_tokenizer_files(tmp, path, meta, progress)
        write_json_atomic(tmp / "speculant.json", {
            "format": CACHE_FORMAT, "name": name, "source": str(path.resolve()), "source_sha256": sha256,
            "architecture": str(meta.get("general.architecture", "?")), "tokenizer_only": True,
            "vocab_fingerprint": vocab_fingerprint(backend)})
    return final


@contextmanager
def _cache_folder(final: Path):
    """Yields a fresh temporary folder beside `final`; on success it replaces `final` in one rename (a
    folder there, written meanwhile by another process or in a stale format, is removed first), on any
    error or interrupt it is deleted: a cache folder is always whole or absent."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tokenizer_files(folder: Path, path: Path, meta: dict, progress: bool):
    """Write the GGUF's tokenizer.json, tokenizer_config.json (special tokens, BOS, chat template) and
    generation_config.json (its end-of-turn ids) into `folder`; returns the tokenizers backend."""
    say(progress, "building the tokenizer (transformers)")
    backend = _gguf_tokenizer(path, meta)
    backend.save(str(folder / "tokenizer.json"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    token_types = meta.get("tokenizer.ggml.token_type")
    control = [True] * len(tokens) if token_types is None else (np.asarray(token_types) == 3).tolist()
    eos_ids = sorted(({int(eos_id)} if eos_id is not None else set())
                     | {i for i, t in enumerate(tokens) if control[i] and t in END_OF_TURN_TOKENS})
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": _gguf_add_bos(meta)}
    for key, index in (("bos_token", bos_id), ("eos_token", eos_id),
                       ("unk_token", meta.get("tokenizer.ggml.unknown_token_id")),
                       ("pad_token", meta.get("tokenizer.ggml.padding_token_id"))):
        if index is not None and int(index) < len(tokens):
            tok_config[key] = tokens[int(index)]
    if meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    write_json_atomic(folder / "tokenizer_config.json", tok_config)
    generation = {"eos_token_id": eos_ids}
    if bos_id is not None:
        generation["bos_token_id"] = int(bos_id)
    write_json_atomic(folder / "generation_config.json", generation)
    return backend

def _gguf_config(gguf: GGUFFile, arch: str) -> dict:
    """config.json (Hugging Face keys, readable by transformers 4.50 .. 5.x) from GGUF metadata."""
    m = gguf.metadata

    def get(key, default=None):
        return m.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, np.ndarray):  # per-layer counts: only a uniform count is supported
        if len(set(kv_heads.tolist())) != 1:
            raise ModelLoadError(f"{gguf.path}: per-layer key/value head counts are not supported")
        kv_heads = kv_heads[0]
    hidden = int(get("embedding_length"))
    embed = gguf.tensors["token_embd.weight"]
    config = {
        "vocab_size": int(get("vocab_size", embed.shape[0])),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
        "max_position_embeddings": int(get("context_length", 8192)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding"):
        value = m.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = int(value)
    scaling = None
    if get("rope.scaling.type") == "linear" and float(get("rope.scaling.factor", 1.0)) != 1.0:
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif get("rope.scaling.type") not in (None, "none", "linear"):
        raise ModelLoadError(f"{gguf.path}: rope scaling {get('rope.scaling.type')!r} is not supported")
    if "rope_freqs.weight" in gguf.tensors:  # Llama 3.1+: per-frequency factors, stored as a tensor
        scaling = _llama3_rope_from_factors(gguf.read("rope_freqs.weight"), float(get("rope.freq_base", 10000.0)),
                                            config["head_dim"], gguf.path)
    if arch == "gemma3":
        layers = config["num_hidden_layers"]
        pattern = 6  # llama.cpp's (and transformers') fixed Gemma 3 pattern: 5 local layers, then 1 global
        config.update({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_theta": float(get("rope.freq_base", 1_000_000.0)),
            "rope_local_base_freq": 10000.0,
            "rope_scaling": scaling,
            "sliding_window": int(get("attention.sliding_window", 4096)),
            "sliding_window_pattern": pattern,
            "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)],
            # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B (62 layers): 1/sqrt(hidden/heads)
            "query_pre_attn_scalar": hidden // heads if layers == 62 else config["head_dim"],
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "attention_bias": False,
        })
    else:
        config.update({
            "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
            "model_type": arch,
            "hidden_act": "silu",
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "rope_scaling": scaling,
        })
        if arch == "llama":
            config.update({"attention_bias": False, "mlp_bias": False})
            if any(n.endswith(".bias") for n in gguf.tensors):
                raise ModelLoadError(f"{gguf.path}: a llama GGUF with bias tensors is not supported")
        else:
            config.update({"use_sliding_window": False, "sliding_window": None})
    return config


def _llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int, where) -> dict:
    """llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors; find the Hugging Face
    parameters that give them (the published models use factor 8 or 32, low 1, high 4, context 8192)."""
    from speculant.models.transformer import rope_inv_freq

    base = rope_inv_freq(theta, head_dim)
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048)):
            scaled = rope_inv_freq(theta, head_dim, factor, (low, high, original))
            if np.allclose((base / scaled).numpy(), factors, rtol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    raise ModelLoadError(f"{where}: the rope_freqs tensor matches no known Llama 3 rope scaling")


def _gguf_weights(gguf: GGUFFile, arch: str, config: dict, progress: bool) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    # llama's one norm before the MLP is post_attention_layernorm; Gemma 3 has a norm after attention too
    block_names = dict(_GGUF_BLOCK_NAMES,
                       ffn_norm="pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm")
    tensors = {}
    names = [n for n in gguf.tensors if n != "rope_freqs.weight"]
    for gguf_name in tqdm(names, desc="dequantizing", unit="tensor", disable=not progress, file=sys.stderr):
        stem, suffix = gguf_name.rsplit(".", 1)
        part = stem.split(".", 2)[2] if stem.startswith("blk.") else None
        if part in block_names:
            hf_name = f"model.layers.{stem.split('.')[1]}.{block_names[part]}.{suffix}"
        elif part is None and stem in _GGUF_TOP_NAMES:
            hf_name = f"{_GGUF_TOP_NAMES[stem]}.{suffix}"
        else:
            raise ModelLoadError(f"{gguf.path}: unexpected tensor {gguf_name} for architecture {arch}")
        values = gguf.read(gguf_name)
        if arch == "llama" and part in ("attn_q", "attn_k"):
            # llama.cpp permutes q/k rows for its interleaved rope; undo it for rotate_half.
            n = heads if part == "attn_q" else kv_heads
            values = values.reshape(n, values.shape[0] // n // 2, 2, *values.shape[1:]).swapaxes(1, 2)
            values = values.reshape(-1, *values.shape[3:]) if values.ndim > 3 else values.reshape(-1)
        if arch == "gemma3" and stem.endswith("norm"):
            values = values - 1.0  # llama.cpp stores Gemma's norm weights as 1 + w
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(values))
    return tensors


def _gguf_via_transformers(path: Path, arch: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Architectures we do not convert ourselves: let transformers dequantize and name the weights."""
    from transformers import AutoModelForCausalLM

    from speculant.models.hf import dtype_kwargs

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **dtype_kwargs(torch.float32))
    except Exception as error:  # transformers says which architectures it knows
        raise ModelLoadError(f"{path}: cannot convert a GGUF of architecture {arch!r}: {error}") from error
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return config, tensors


def _gguf_tokenizer(path: Path, metadata: dict):
    """The GGUF's tokenizer as a `tokenizers.Tokenizer`, built by transformers from the metadata.

    transformers >= 5.2x exposes the builder (`transformers.integrations.gguf.convert_gguf_tokenizer`),
    which we feed the metadata we already read; older versions go through
    `AutoTokenizer.from_pretrained(..., gguf_file=...)`, which re-reads the file with gguf-py (slow).
    Whether BOS is prepended follows the file's `tokenizer.ggml.add_bos_token`."""
    import logging

    from tokenizers import processors

    logging.getLogger("transformers").setLevel(logging.ERROR)
    backend = None
    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:
        convert_gguf_tokenizer = None
    if convert_gguf_tokenizer is not None:
        tokenizer_dict = {}
        for key, renamed in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
            value = metadata.get(f"tokenizer.{key}")
            if value is not None:
                tokenizer_dict[renamed] = value.tolist() if isinstance(value, np.ndarray) else value
        try:
            backend, _ = convert_gguf_tokenizer(str(metadata.get("general.architecture")), tokenizer_dict)
        except Exception:  # noqa: BLE001 - an internal API: let the public path try, and report its error
            backend = None
    gemma = metadata.get("general.architecture") in ("gemma", "gemma2", "gemma3")
    if backend is None and gemma and metadata.get("tokenizer.ggml.model") == "llama":
        backend = _gguf_gemma_tokenizer(metadata)
    if backend is None:
        from transformers import AutoTokenizer

        try:
            backend = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer
        except Exception as error:
            raise ModelLoadError(f"{path}: transformers could not build its tokenizer: {error}") from error

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if _gguf_add_bos(metadata) and bos_id is not None:
        bos = backend.id_to_token(int(bos_id))
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))])
    elif bos_id is not None and int(bos_id) in backend.encode("a").ids:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    return backend


def _gguf_gemma_tokenizer(metadata: dict):
    """Gemma's tokenizer from GGUF metadata on transformers 5.0 .. 5.1x, built as transformers >= 5.2x
    builds it (older versions made a Unigram model from the scores, which tokenizes differently):
    a byte-fallback BPE whose merges follow the order of the vocabulary, with whitespace-only
    tokens spelled with U+2581. None where transformers lacks the pieces (4.x)."""
    try:
        from tokenizers import AddedToken
        from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        return None
    original = metadata["tokenizer.ggml.tokens"]
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in original]
    vocab = {token: index for index, token in enumerate(tokens)}
    try:
        merges = generate_merges(vocab, {token: -index for index, token in enumerate(tokens)})
        backend = GemmaTokenizer(vocab=vocab, merges=merges).backend_tokenizer
    except TypeError:  # a GemmaTokenizer that does not take a vocabulary (transformers 4.x)
        return None
    types = metadata.get("tokenizer.ggml.token_type")
    types = [] if types is None else np.asarray(types).tolist()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(original, types) if kind == 3])  # CONTROL
    backend.add_tokens([AddedToken(t, normalized=False, special=False)  # USER_DEFINED: matched whole
                        for t, kind in zip(original, types) if kind == 4 and t in vocab])
    return backend


def _gguf_add_bos(metadata: dict) -> bool:
    """Whether encoding prepends BOS: the file says, else llama.cpp's default (yes for SentencePiece)."""
    return bool(metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama"))


def _version(distribution: str, module) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return getattr(module, "__version__", "?")

