"""The model protocol: what the engine and the drafters need from a language model.

A model owns a position-indexed KV cache. `forward(tokens, start_pos)` writes positions
start_pos .. start_pos+T-1 and returns their logits; `truncate(length)` forgets every position
>= length; `prefill(tokens)` makes the cache hold a prompt without computing its logits. With a
static cache, truncation only moves an integer: rejected draft tokens are overwritten by the next
write and hidden by the causal mask, so rollback is free.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class CausalLM(Protocol):
    vocab_size: int
    max_seq_len: int  # positions the cache can hold
    device: torch.device

    @property
    def length(self) -> int:
        """Number of positions currently in the cache."""
        ...

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens [T] int64 at positions start_pos.. (start_pos <= length) -> logits [T, vocab]."""
        ...

    def truncate(self, length: int) -> None:
        """Drop cached positions >= length (length <= self.length)."""
        ...

    def prefill(self, tokens: torch.Tensor) -> None:
        """tokens [T] int64 (T >= 0) -> None: the cache then holds exactly these tokens at positions
        0..T-1, whatever it held before, as `truncate(0); forward(tokens, 0)` would leave it, but no
        logits are returned, so a model may skip its output head (a prompt's logits are not needed:
        decoding starts with a forward of the prompt's last token)."""
        ...


@runtime_checkable
class TreeCausalLM(CausalLM, Protocol):
    """A CausalLM that also scores a tree of tokens in one forward and keeps a path of it: the lean
    model (models.transformer.LeanModel) and bit-exact mode's target (speculant.exact_target.ExactTarget).
    The generic step verifies candidates and a lookup branch as one tree on such a target."""

    def forward(self, tokens: torch.Tensor, start_pos: int, ancestors: torch.Tensor | None = None) -> torch.Tensor:
        """As CausalLM.forward; with ancestors [T, T] bool the tokens form a tree (token 0 its root,
        acceptance.candidate_tree): token t sits in cache slot start_pos + t at position start_pos + its
        depth, and attends to the cache before start_pos and to its ancestors."""
        ...

    def move_slot(self, source: int | torch.Tensor, dest: int | torch.Tensor) -> None:
        """Copy cache slot `source` to `dest`: a kept tree node moves to the slot of its position."""
        ...


# The dtype names speculant's command line, API, bench and distill accept.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`, so that wall-clock times are honest (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ContextOverflowError(ValueError):
    """A sequence would not fit in the model's context."""


def check_fits(model: CausalLM, end_pos: int) -> None:
    if end_pos > model.max_seq_len:
        raise ContextOverflowError(
            f"sequence of {end_pos} tokens exceeds the model's context of {model.max_seq_len} tokens"
        )


class PositionalCache:
    """The bookkeeping every position-indexed cache shares: how many positions are valid, free
    truncation, and the checks before a write at start_pos."""

    _length = 0
    max_seq_len: int

    @property
    def length(self) -> int:
        return self._length

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate to {length}: cache holds {self._length}")
        self._length = length

    def set_length(self, length: int) -> None:
        """Declare that positions < length hold valid entries: for writers outside `forward`, such as
        a captured CUDA graph (speculant.fused) that writes the cache at positions held on the device."""
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"cannot set the cache length to {length}: it holds at most {self.max_seq_len}")
        self._length = length

    def _write_range(self, start_pos: int, num_tokens: int) -> int:
        """Check a write of num_tokens at start_pos (no gap, fits the context); return its end."""
        if start_pos > self._length:
            raise ValueError(f"gap in the cache: start_pos {start_pos} > length {self._length}")
        end = start_pos + num_tokens
        check_fits(self, end)
        return end
