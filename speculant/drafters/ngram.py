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

    def reset(self) -> None:
        pass  # stateless: the context carries everything

    def propose(self, context, gamma, params, generator) -> Draft:
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            suffix = context[-n:]
            # latest earlier occurrence whose continuation is non-empty
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == suffix:
                    follow = context[start + n : start + n + gamma]
                    return Draft(torch.tensor(follow, dtype=torch.int64), None)
        return Draft(torch.empty(0, dtype=torch.int64), None)
