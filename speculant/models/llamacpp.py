"""A CausalLM whose forward passes run in llama.cpp (through llama-cpp-python's low-level API).

    loaded = load_llamacpp("smollm2-135m")        # an embedded model, or a path to a .gguf file
    logits = loaded.model.forward(torch.tensor(ids), 0)   # [T, vocab] float32: one batch, every position
    loaded.model.truncate(n)                     # llama_memory_seq_rm: positions >= n are dropped

The GGUF file is read by llama.cpp as it is (its quantized kernels, no dequantization); speculant's
drafters and its exact acceptance rule run on top, so the output law is the target's as llama.cpp
computes it. The tokenizer is speculant's own, built once from the GGUF's metadata into the cache (the
weights are not converted; the same ids as llama.cpp's tokenizer; tests/test_llamacpp.py checks a
few prompts).

Optional: `bash scripts/setup.sh --llama-cpp` compiles llama-cpp-python; without it, loading says so
in one line (LlamaCppUnavailable). Not supported on this backend: the distilled feature draft
(it reads the target's hidden states, which llama.cpp gives only as pooled or per-token
embeddings from a second context mode), `layers:N` and `int8` (they slice or requantize the lean
torch weights), candidate trees and batched decoding (lean targets only).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

from speculant.models.base import PositionalCache

BACKEND = "llama.cpp"
SETUP_STEP = "bash scripts/setup.sh --llama-cpp"
MAX_BATCH = 512  # tokens per llama_decode call (and per micro-batch): longer prompts go in chunks


class LlamaCppUnavailable(ValueError):
    """llama-cpp-python is not installed; the message names the setup step."""


def llama_cpp_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except ValueError:  # a module entry set to None: imports of it fail
        return False


def _library():
    """llama_cpp's ctypes bindings, the backend initialised once and its log silenced."""
    try:
        import llama_cpp
    except ImportError as error:
        raise LlamaCppUnavailable(
            f"the llama.cpp backend needs llama-cpp-python, which is not installed ({error}); install it "
            f"with `{SETUP_STEP}` (compiles llama.cpp for the CPU), or use --backend torch") from None
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        llama_cpp.llama_backend_init()
        # a reference must outlive the library's use of it; llama.cpp otherwise logs every load on stderr
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return llama_cpp


_LOG_CALLBACK = None


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaCppModel(PositionalCache):
    """One llama.cpp context (one sequence) over a GGUF file, as a speculant CausalLM.

    forward(tokens [T] int64, start_pos) -> logits [T, vocab] float32 (CPU): one llama_decode per
    MAX_BATCH tokens, logits asked for every position. Positions >= start_pos are first removed from
    llama.cpp's KV cache (llama_memory_seq_rm), so a rejected draft is forgotten as in the lean
    model. llama.cpp keeps the cache in its own memory: nothing is copied back but the logits."""

    backend = BACKEND
    device = torch.device("cpu")

    def __init__(self, gguf_path: str | os.PathLike, *, max_seq_len: int | None = None,
                 threads: int | None = None, flash_attention: bool = True) -> None:
        lib = _library()
        self._lib = lib
        self.path = Path(gguf_path)
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            from speculant.models.cache import ModelLoadError

            raise ModelLoadError(f"{self.path}: llama.cpp could not load this GGUF file (damaged, or an "
                                 "architecture this llama.cpp build does not know)")
        self._ctx = None
        self._batch = None
        vocab = lib.llama_model_get_vocab(self._model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(vocab))
        self.context_length = int(lib.llama_model_n_ctx_train(self._model))
        self.num_params = int(lib.llama_model_n_params(self._model))
        self.weight_bytes = int(lib.llama_model_size(self._model))
        self.max_seq_len = min(max_seq_len or self.context_length, self.context_length)
        self.threads = threads or _default_threads()
        params = lib.llama_context_default_params()
        params.n_ctx = self.max_seq_len
        params.n_batch = params.n_ubatch = min(MAX_BATCH, self.max_seq_len)
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        # With flash attention (llama.cpp's own default on a CPU: "auto") a position's logits are the same
        # bits whether it is evaluated alone or in a batch of several; without it (llama_cpp.Llama's
        # default) they are not (a logit moved by 0.4 in tests/test_llamacpp.py's rollback case), and a
        # verify batch would then not reproduce token-by-token decoding, even greedily.
        params.flash_attn_type = 1 if flash_attention else 0
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise MemoryError(f"llama.cpp could not make a context of {self.max_seq_len} positions for {self.path}")
        self._batch_size = int(params.n_batch)
        self._batch = lib.llama_batch_init(self._batch_size, 0, 1)
        # the batch's arrays as numpy views: filling them costs a slice assignment, not T ctypes calls
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(self._batch_size,))
        self._positions = np.ctypeslib.as_array(self._batch.pos, shape=(self._batch_size,))
        self._wants_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self._batch_size,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self._batch_size,))[:] = 1
        for i in range(self._batch_size):
            self._batch.seq_id[i][0] = 0  # one sequence: id 0
        # llama.cpp renamed the KV-cache calls (llama_kv_self_* -> llama_memory_*); this build's name
        if hasattr(lib, "llama_memory_seq_rm"):
            memory = lib.llama_get_memory(self._ctx)
            self._seq_rm = lambda start: lib.llama_memory_seq_rm(memory, 0, start, -1)
        else:
            self._seq_rm = lambda start: lib.llama_kv_self_seq_rm(self._ctx, 0, start, -1)
        self._length = 0  # positions held: evaluated (self._decoded) + prefilled, not yet evaluated (self._pending)
        self._decoded = 0
        self._pending: list[int] = []

    def truncate(self, length: int) -> None:
        super().truncate(length)
        if length < self._decoded:
            if not self._seq_rm(length):
                raise RuntimeError(f"llama.cpp could not drop positions >= {length} of {self.path.name}'s cache "
                                   "(a recurrent or sliding-window model cannot be truncated)")
            self._decoded, self._pending = length, []
        else:
            self._pending = self._pending[:length - self._decoded]

    def prefill(self, tokens: torch.Tensor) -> None:
        """Take tokens [T] as positions 0.. without evaluating them yet: the next forward evaluates them
        in one batch with its first token, as llama.cpp's own loop evaluates a prompt. (Its logits
        depend on a batch's shape beyond some sizes: a prompt split as [T-1] + [1] would round
        differently from the [T] batch llama.cpp's own decoding runs.)"""
        ids = tokens.detach().cpu().reshape(-1).tolist()
        self._write_range(0, len(ids))
        self.truncate(0)
        self._pending, self._length = ids, len(ids)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens [T] int64 at positions start_pos.. -> logits [T, vocab] float32."""
        ids = tokens.detach().cpu().reshape(-1).tolist()
        self._write_range(start_pos, len(ids))
        if start_pos < self._length:
            self.truncate(start_pos)
        out = []
        if self._pending and ids:  # the prefilled prompt and the first token, as one batch
            out.append(self._decode(self._pending + ids[:1], self._decoded, last_only=True))
            self._pending, ids, start_pos = [], ids[1:], start_pos + 1
        if ids:
            out.append(self._decode(ids, start_pos, last_only=False))
        return torch.cat(out)

    def _decode(self, ids: list[int], start_pos: int, last_only: bool) -> torch.Tensor:
        """Evaluate ids at start_pos.. (= self._decoded) in chunks of MAX_BATCH -> logits [T or 1, vocab]."""
        out = []
        for chunk_start in range(0, len(ids), self._batch_size):
            chunk = ids[chunk_start:chunk_start + self._batch_size]
            n = len(chunk)
            self._tokens[:n] = chunk
            self._positions[:n] = np.arange(start_pos + chunk_start, start_pos + chunk_start + n, dtype=np.int32)
            self._wants_logits[:n] = 0 if last_only else 1
            self._wants_logits[n - 1] = 1
            self._batch.n_tokens = n
            status = self._lib.llama_decode(self._ctx, self._batch)
            if status != 0:
                self._seq_rm(start_pos + chunk_start)
                self._decoded = self._length = start_pos + chunk_start
                self._pending = []
                raise RuntimeError(f"llama_decode failed with status {status} at position {start_pos + chunk_start}")
            self._decoded = start_pos + chunk_start + n
            rows = 1 if last_only else n
            logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(rows, self.vocab_size))
            out.append(torch.from_numpy(logits.copy()))  # llama.cpp overwrites the buffer on the next decode
        self._length = max(self._length, self._decoded)
        return out[-1] if last_only else torch.cat(out)

    def close(self) -> None:
        """Free llama.cpp's context, batch and weights (also done when the object is collected)."""
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        if getattr(self, "_lib", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return (f"LlamaCppModel({self.path.name}, vocab={self.vocab_size}, max_seq_len={self.max_seq_len}, "
                f"threads={self.threads})")


def gguf_source(spec: str | os.PathLike, progress: bool = True) -> tuple[Path, Path, str, str]:
    """(the GGUF file, a cache folder holding its tokenizer, its sha256, a name) for an embedded model
    name or a .gguf path. The tokenizer (speculant's, with the chat template and stop ids) is built
    from the GGUF's metadata once; the weights stay in the file, for llama.cpp to read."""
    from speculant.models.cache import ModelLoadError, file_sha256, find_converted, slug
    from speculant.models.gguf import gguf_tokenizer_folder, is_gguf
    from speculant.models.registry import EMBEDDED, embedded_gguf, embedded_sha256

    text = str(spec)
    if text in EMBEDDED:
        path, name = embedded_gguf(text, progress), text
        sha = embedded_sha256(text) or file_sha256(path)
    else:
        path = Path(text).expanduser()
        if not (path.is_file() and (path.suffix.lower() == ".gguf" or is_gguf(path))):
            raise ModelLoadError(
                f"{text!r}: the llama.cpp backend reads GGUF files: give an embedded model name "
                f"({', '.join(EMBEDDED)}) or a path to a .gguf file (a Hugging Face folder runs on --backend torch)")
        sha, name = file_sha256(path), slug(path.stem)
    folder = find_converted(sha) or gguf_tokenizer_folder(path, name=name, sha256=sha, progress=progress)
    return path, folder, sha, name


def load_llamacpp(spec: str | os.PathLike, *, max_seq_len: int | None = None, threads: int | None = None,
                  progress: bool = True):
    """An embedded model or a GGUF file on llama.cpp, as a LoadedModel (weights and config None)."""
    from speculant.models.cache import read_json
    from speculant.models.registry import LoadedModel
    from speculant.tokenizer import Tokenizer

    _library()  # the one-line error before any conversion
    gguf, folder, sha, name = gguf_source(spec, progress)
    model = LlamaCppModel(gguf, max_seq_len=max_seq_len, threads=threads)
    tokenizer = Tokenizer.from_folder(folder, name=name)
    arch = read_json(folder / "speculant.json").get("architecture", "?")
    return LoadedModel(name=name, source=str(gguf.resolve()), source_hash=sha, folder=folder, model=model,
                       weights=None, tokenizer=tokenizer, config=None, arch=arch,
                       context_length=model.context_length, num_params=model.num_params,
                       weight_bytes=model.weight_bytes)
