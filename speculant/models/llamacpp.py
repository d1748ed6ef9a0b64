"""A CausalLM whose forward passes run in llama.cpp (through llama-cpp-python's low-level API).

    loaded = load_llamacpp("smollm2-135m")        # an embedded model, or a path to a .gguf file
    logits = loaded.model.forward(torch.tensor(ids), 0)   # [T, vocab] float32: one batch, every position
    loaded.model.truncate(n)                     # llama_memory_seq_rm: positions >= n are dropped

The GGUF file is read by llama.cpp as it is (its quantized kernels, no dequantization); speculant's
drafters and its exact acceptance rule run on top, so the output law is the target's as llama.cpp
computes it. The tokenizer is speculant's own, built once from the GGUF's metadata into the cache (the
weights are not converted; the same ids as llama.cpp's tokenizer; tests/test_llamacpp.py checks a
few prompts).

Exactness: greedy speculative output equals llama.cpp's own plain decoding (one token per llama_decode)
token for token, because every logit speculant reads is the same bits as one-token decoding gives
for that position (the prompt aside: it goes in one batch, as llama.cpp's own loop evaluates it). That
does not hold for a llama_decode of any size: llama.cpp's CPU kernels round differently by batch size.
- Matrix products: past some width a batch takes another kernel than one token (with Q4_K weights
  repacked, the default, Qwen2.5-Coder differs from T = 4 on, by up to 0.6 in a logit; not repacked, from
  T = 8). So at load the model probes `exact_batch`, the widest batch W <= 32 whose logits are bit-equal
  to one-token evaluation (a short prefix, then up to 32 tokens one at a time against batches of 2, 3,
  ... from the same prefix; stops at the first width that differs; about a second for a 1.5B model),
  kept in the cache (`$SPECULANT_CACHE/llamacpp-exact-batch/`, keyed by the GGUF's sha256, the
  llama-cpp-python version and build features, threads, repacking and flash attention). `forward` then
  evaluates a verify batch in llama_decode calls of at most W tokens each.
- Attention: with flash attention (on here, as in llama.cpp's own default) a batch row rounds like a
  lone token, except that from position SPLIT_KV_FROM on (a context of >= 512 cells) one token with more
  than one thread splits the cache across the threads (ggml's split-KV path), which no batch of >= 2
  takes: there `forward` goes one token per call (exact, but a verify step then costs T one-token
  decodes: with threads > 1, speculation gains nothing past that position; with 1 thread it does).

Optional: `bash scripts/setup.sh --llama-cpp` compiles llama-cpp-python; without it, loading says so
in one line (LlamaCppUnavailable). Not supported on this backend: the distilled feature draft
(it reads the target's hidden states, which llama.cpp gives only as pooled or per-token
embeddings from a second context mode), `layers:N` and `int8` (they slice or requantize the lean
torch weights), candidate trees and batched decoding (lean targets only).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import torch

from speculant.models.base import PositionalCache

BACKEND = "llama.cpp"
SETUP_STEP = "bash scripts/setup.sh --llama-cpp"
MAX_BATCH = 512  # tokens per llama_decode call (and per micro-batch): longer prompts go in chunks
EXACT_BATCH_LIMIT = 32  # the widest batch probed (verify batches are gamma + 1 <= 13 tokens with --gamma auto)
PROBE_PREFIX = 8  # tokens in the cache before the probed positions
PROBE_STAGES = (4, 8, 16, 32)  # one-token references computed for this many positions, then widths up to it
PROBE_FORMAT = 1  # bump when the probe or its file changes: cached widths are probed again
PROBE_TEXT = ("def merge_sorted(left: list[int], right: list[int]) -> list[int]:\n"
              "    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    out, i, j = [], 0, 0\n"
              "    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n"
              "            out.append(left[i]); i += 1\n        else:\n            out.append(right[j]); j += 1\n"
              "    return out + left[i:] + right[j:]\n")
# ggml's CPU flash attention, for one query row, splits the KV cache across threads once the cache
# view holds >= 512 cells (llama.cpp pads the view to a multiple of 256 cells): a lone token at a
# position >= 256 of a context of >= 512 cells, with threads > 1
SPLIT_KV_FROM, SPLIT_KV_CELLS = 256, 512


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

    forward(tokens [T] int64, start_pos) -> logits [T, vocab] float32 (CPU): llama_decode calls of at
    most `exact_batch` tokens (1 past SPLIT_KV_FROM with threads > 1; see the module docstring), logits
    asked for every position, so each row has the bits of one-token decoding. Positions >= start_pos
    are first removed from llama.cpp's KV cache (llama_memory_seq_rm), so a rejected draft is forgotten
    as in the lean model. llama.cpp keeps the cache in its own memory: nothing is copied back but the
    logits.

    repack: llama.cpp's repacked CPU weight layouts (use_extra_bufts; its default). exact_batch: None
    probes it (cached); an int forces it (measurements of whole batches only: a width past the probed
    one breaks the equality with one-token decoding). sha256: the GGUF's, if known (else hashed, once)."""

    backend = BACKEND
    device = torch.device("cpu")

    def __init__(self, gguf_path: str | os.PathLike, *, max_seq_len: int | None = None,
                 threads: int | None = None, flash_attention: bool = True, repack: bool = True,
                 exact_batch: int | None = None, sha256: str | None = None, progress: bool = False) -> None:
        lib = _library()
        self._lib = lib
        self.path = Path(gguf_path)
        self.repack = bool(repack)
        self.flash_attention = bool(flash_attention)
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        if hasattr(model_params, "use_extra_bufts"):
            model_params.use_extra_bufts = self.repack
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
        self._ctx = lib.llama_init_from_model(self._model, self._context_params(self.max_seq_len))
        if not self._ctx:
            raise MemoryError(f"llama.cpp could not make a context of {self.max_seq_len} positions for {self.path}")
        self._batch_size = min(MAX_BATCH, self.max_seq_len)  # the context's n_batch
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
        # from this position on, a lone token takes ggml's split-KV attention (None: never, in this context)
        self.split_kv_from = (SPLIT_KV_FROM if self.threads > 1 and int(lib.llama_n_ctx(self._ctx)) >= SPLIT_KV_CELLS
                              else None)
        self.sha256 = sha256
        if exact_batch is None:
            exact_batch = probed_exact_batch(self, progress=progress)
        elif not 1 <= int(exact_batch) <= MAX_BATCH:
            raise ValueError(f"exact_batch must be 1..{MAX_BATCH}, not {exact_batch}")
        self.exact_batch = int(exact_batch)

    def _context_params(self, n_ctx: int):
        """llama_context_params for one sequence of n_ctx positions, as every context here has them."""
        params = self._lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(MAX_BATCH, n_ctx)
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        # With flash attention (llama.cpp's own default on a CPU: "auto") a batch row's attention rounds
        # like a lone token's (but see SPLIT_KV_FROM); without it (llama_cpp.Llama's default) it does not
        # (a logit moved by 0.4 in tests/test_llamacpp.py's rollback case), at any batch width.
        params.flash_attn_type = 1 if self.flash_attention else 0
        return params

    def _width_at(self, position: int) -> int:
        """The widest llama_decode starting at `position` whose rows round like one-token decoding."""
        if self.split_kv_from is None:
            return self.exact_batch
        if position >= self.split_kv_from:
            return 1
        return min(self.exact_batch, self.split_kv_from - position)

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
        while ids:  # the verify batch, in calls no wider than rounds like one-token decoding
            width = self._width_at(start_pos)
            out.append(self._decode(ids[:width], start_pos, last_only=False))
            ids, start_pos = ids[width:], start_pos + width
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
        split = f", one token per call from position {self.split_kv_from}" if self.split_kv_from is not None else ""
        return (f"LlamaCppModel({self.path.name}, vocab={self.vocab_size}, max_seq_len={self.max_seq_len}, "
                f"threads={self.threads}, repack={self.repack}, exact_batch={self.exact_batch}{split})")


def _build_id(lib) -> str:
    """llama-cpp-python's version and its CPU build's features (AVX2, AVX512, REPACK, ...): two builds of
    one version can take different kernels."""
    import llama_cpp

    info = lib.llama_print_system_info()
    info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    return f"{getattr(llama_cpp, '__version__', '?')} {' '.join(info.split())}"


def exact_batch_key(model: LlamaCppModel) -> dict:
    """What the probed width depends on: the weights, the build, threads, repacking, flash attention."""
    from speculant.models.cache import file_sha256

    if not getattr(model, "sha256", None):
        model.sha256 = file_sha256(model.path)
    return {"format": PROBE_FORMAT, "model_sha256": model.sha256, "llama_cpp": _build_id(model._lib),
            "threads": model.threads, "repack": model.repack, "flash_attention": model.flash_attention,
            "limit": EXACT_BATCH_LIMIT}


def exact_batch_path(key: dict) -> Path:
    from speculant.models.cache import keyed_file

    return keyed_file("llamacpp-exact-batch", key, prefix=f"{key['model_sha256'][:16]}-")


def read_exact_batch(path: Path, key: dict) -> int:
    """The width kept in `path` for `key`; ValueError saying what is wrong with the file."""
    from speculant.models.cache import read_keyed_json

    record = read_keyed_json(path)
    if not isinstance(record, dict) or record.get("key") != key:
        raise ValueError("written for another model, build or setting")
    width = record.get("exact_batch")
    if type(width) is not int or not 1 <= width <= EXACT_BATCH_LIMIT:
        raise ValueError(f"exact_batch is not a width 1..{EXACT_BATCH_LIMIT}")
    return width


def probed_exact_batch(model: LlamaCppModel, progress: bool = False) -> int:
    """`model`'s exact batch width: from the cache, else probed (probe_exact_batch) and kept there.
    SPECULANT_RECALIBRATE=1 probes again."""
    from speculant.models.cache import recalibrate_requested, say, write_json_atomic

    key = exact_batch_key(model)
    path = exact_batch_path(key)
    if not recalibrate_requested() and path.exists():
        try:
            return read_exact_batch(path, key)
        except ValueError as error:
            say(progress, f"the llama.cpp batch-width cache {path} is damaged ({error}); probing again")
    start = time.perf_counter()
    try:
        width = probe_exact_batch(model)
    except (RuntimeError, MemoryError) as error:  # one token per call is always exact
        say(progress, f"{model.path.name}: the llama.cpp batch-width probe failed ({error}); verifying one "
                      "token per call")
        return 1
    seconds = time.perf_counter() - start
    try:
        write_json_atomic(path, {"key": key, "exact_batch": width, "seconds": round(seconds, 2),
                                 "model": model.path.name})
    except OSError as error:
        say(progress, f"cannot keep the llama.cpp batch width in {path} ({error.strerror or error}); "
                      "it is probed again at the next load")
    say(progress, f"{model.path.name}: llama.cpp batches of up to {width} tokens round like one-token decoding "
                  f"(probed in {seconds:.1f} s, kept in {path})")
    return width


def probe_exact_batch(model: LlamaCppModel) -> int:
    """The widest batch W <= EXACT_BATCH_LIMIT whose logits are bit-equal to one-token evaluation of the
    same positions, in a context of its own (same threads, flash attention and weights as `model`).

    PROBE_PREFIX tokens in one batch, then for n in PROBE_STAGES: the next n tokens one at a time
    (references [n, vocab]), then for each width w not yet checked, up to n: those w tokens as one
    batch from the same prefix, compared bit for bit with the first w references; the first width
    that differs ends the probe (W = w - 1). A stage recomputes its references (a batch overwrote
    their cache cells). Cost, in one-token decodes: W=3 about 13, W=7 about 47."""
    lib = model._lib
    n_ctx = PROBE_PREFIX + EXACT_BATCH_LIMIT  # < SPLIT_KV_FROM: no split-KV attention in the probe
    ctx = lib.llama_init_from_model(model._model, model._context_params(n_ctx))
    if not ctx:
        raise MemoryError(f"llama.cpp could not make a probe context for {model.path}")
    batch = lib.llama_batch_init(n_ctx, 0, 1)
    try:
        tokens = np.ctypeslib.as_array(batch.token, shape=(n_ctx,))
        positions = np.ctypeslib.as_array(batch.pos, shape=(n_ctx,))
        wants = np.ctypeslib.as_array(batch.logits, shape=(n_ctx,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n_ctx,))[:] = 1
        for i in range(n_ctx):
            batch.seq_id[i][0] = 0
        if hasattr(lib, "llama_memory_seq_rm"):
            memory = lib.llama_get_memory(ctx)
            drop = lambda start: lib.llama_memory_seq_rm(memory, 0, start, -1)
        else:
            drop = lambda start: lib.llama_kv_self_seq_rm(ctx, 0, start, -1)
        ids = _probe_tokens(lib, model._model, n_ctx, model.vocab_size)

        def decode(chunk: list[int], start: int, every: bool) -> np.ndarray:
            """chunk at positions start.. -> logits as int32 bit patterns [len or 1, vocab]."""
            n = len(chunk)
            tokens[:n] = chunk
            positions[:n] = np.arange(start, start + n, dtype=np.int32)
            wants[:n] = 1 if every else 0
            wants[n - 1] = 1
            batch.n_tokens = n
            status = lib.llama_decode(ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status} while probing {model.path.name}")
            rows = n if every else 1
            return np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(rows, model.vocab_size)).view(np.int32).copy()

        decode(ids[:PROBE_PREFIX], 0, every=False)
        span = ids[PROBE_PREFIX:]
        checked = 1  # width 1 is the reference itself
        for n in PROBE_STAGES:
            drop(PROBE_PREFIX)
            reference = np.concatenate([decode([t], PROBE_PREFIX + i, every=False) for i, t in enumerate(span[:n])])
            for width in range(checked + 1, n + 1):
                drop(PROBE_PREFIX)
                if not np.array_equal(decode(span[:width], PROBE_PREFIX, every=True), reference[:width]):
                    return width - 1
            checked = n
        return checked
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)


def _probe_tokens(lib, model, count: int, vocab_size: int) -> list[int]:
    """`count` token ids of PROBE_TEXT (repeated if short) in this model's vocabulary."""
    vocab = lib.llama_model_get_vocab(model)
    data = PROBE_TEXT.encode()
    buffer = (lib.llama_token * (len(data) + 8))()
    n = lib.llama_tokenize(vocab, data, len(data), buffer, len(buffer), False, False)
    ids = [int(t) for t in buffer[:max(n, 0)] if 0 <= int(t) < vocab_size] or list(range(100, 100 + count))
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


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
                  progress: bool = True, repack: bool = True, exact_batch: int | None = None):
    """An embedded model or a GGUF file on llama.cpp, as a LoadedModel (weights and config None).
    repack, exact_batch: as LlamaCppModel's."""
    from speculant.models.cache import read_json
    from speculant.models.registry import LoadedModel
    from speculant.tokenizer import Tokenizer

    _library()  # the one-line error before any conversion
    gguf, folder, sha, name = gguf_source(spec, progress)
    model = LlamaCppModel(gguf, max_seq_len=max_seq_len, threads=threads, repack=repack, exact_batch=exact_batch,
                          sha256=sha, progress=progress)
    tokenizer = Tokenizer.from_folder(folder, name=name)
    arch = read_json(folder / "speculant.json").get("architecture", "?")
    return LoadedModel(name=name, source=str(gguf.resolve()), source_hash=sha, folder=folder, model=model,
                       weights=None, tokenizer=tokenizer, config=None, arch=arch,
                       context_length=model.context_length, num_params=model.num_params,
                       weight_bytes=model.weight_bytes)
