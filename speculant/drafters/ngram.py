"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the context's
last n tokens (n from `max_ngram` down to `min_ngram`), searching prompt + generated text.

Deterministic, so it passes no probabilities: q is a point mass on each proposed token, and the
acceptance rule stays exact.

>>> drafter = NgramDrafter(max_ngram=3, min_ngram=1)
>>> context = [5, 6, 7, 8, 9, 1, 5, 6, 7]
>>> drafter.propose(context, gamma=3, params=None, generator=None).tokens.tolist()
[8, 9, 1]
>>> drafter.propose([1, 2, 3], gamma=3, params=None, generator=None).tokens.tolist()
[]
"""

from __future__ import annotations

import torch

from speculant.drafters.base import Draft


class NgramDrafter:
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # An index of the context seen last: every n-gram with a continuation -> its latest start.
        # Within a request the context only grows, so each call indexes just the new tokens.
        self._indexed: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}

    def reset(self) -> None:
        self._indexed, self._latest = [], {}

    def propose(self, context, gamma, params, generator) -> Draft:
        self._index(context)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            start = self._latest.get(tuple(context[-n:]))
            if start is not None:  # the latest earlier occurrence whose continuation is non-empty
                return Draft(torch.tensor(context[start + n : start + n + gamma], dtype=torch.int64), None)
        return Draft(torch.empty(0, dtype=torch.int64), None)

    def _index(self, context: list[int]) -> None:
        done = len(self._indexed)
        if done > len(context) or self._indexed != context[:done]:  # another context: start over
            self.reset()
            done = 0
        # an n-gram ending (exclusive) at e has a continuation once e <= len - 1
        for end in range(max(done, 1), len(context)):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._latest[tuple(context[end - n : end])] = end - n
        self._indexed = list(context)
