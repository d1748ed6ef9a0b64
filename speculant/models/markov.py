"""A toy model for tests: a first-order Markov chain given by a [vocab, vocab] logit table.

logits at a position depend only on the token at that position, so the exact law of any
continuation is computable by hand; the "cache" is the list of tokens fed so far, kept so that
misuse of the protocol (a gap, a stale position) raises instead of passing silently.
"""

from __future__ import annotations

import torch

from speculant.models.base import check_fits


class MarkovModel:
    def __init__(self, logit_table: torch.Tensor, max_seq_len: int = 4096) -> None:
        self.logit_table = logit_table  # [vocab, vocab]: row = current token
        self.vocab_size = logit_table.shape[0]
        self.max_seq_len = max_seq_len
        self.device = logit_table.device
        self.tokens: list[int] = []
        self.forward_calls = 0

    @property
    def length(self) -> int:
        return len(self.tokens)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if start_pos > self.length:
            raise ValueError(f"gap in the cache: start_pos {start_pos} > length {self.length}")
        check_fits(self, start_pos + tokens.shape[0])
        self.forward_calls += 1
        self.tokens[start_pos:] = tokens.tolist()
        return self.logit_table[tokens]  # [T, vocab]

    def truncate(self, length: int) -> None:
        if length > self.length:
            raise ValueError(f"cannot truncate to {length} > length {self.length}")
        del self.tokens[length:]

    def prefill(self, tokens: torch.Tensor) -> None:
        self.truncate(0)
        self.forward(tokens, 0)
