"""A draft model's tokens plus a prompt-lookup branch, verified together in one target forward.

Prompt lookup (n-gram) and a draft model are good at different text: lookup copies long runs that
already occurred (code that repeats a name, a signature, a line), the model predicts new text. This
drafter proposes both: the model's chain (and its alternatives, with `candidates`) and the tokens
that followed the latest earlier occurrence of the context's last n-gram, up to `length` of them. The
target scores both branches in one tree-masked forward (`acceptance.candidate_tree(γ, k, length)`),
and `acceptance.verify_candidates` grafts the lookup branch where it leaves the chain. It is a point
mass, chosen from the committed context alone, so the rule stays exact at every temperature; greedy,
the step keeps whichever branch greedy decoding follows further.

>>> from speculant.drafters.ngram import NgramDrafter
>>> class Fixed:  # a stand-in draft model that always proposes [9, 9]
...     def reset(self): pass
...     def propose(self, context, gamma, params, generator):
...         return Draft(torch.tensor([9, 9]), None)
>>> draft = LookupDrafter(Fixed(), NgramDrafter(), length=3).propose([1, 2, 3, 1, 2], 2, None, None)
>>> draft.tokens.tolist(), draft.lookup.tolist()
([9, 9], [3, 1, 2])
"""

from __future__ import annotations

import torch  # noqa: F401 - the doctest uses it

from speculant.drafters.base import Draft, Drafter
from speculant.drafters.ngram import NgramDrafter


class LookupDrafter:
    def __init__(self, inner: Drafter, ngram: NgramDrafter, length: int) -> None:
        if length < 1:
            raise ValueError(f"the lookup branch needs length >= 1, got {length}")
        self.inner = inner
        self.ngram = ngram
        self.length = length

    @property
    def model(self):
        """The draft model of the inner drafter (the fused step runs it itself)."""
        return self.inner.model

    def reset(self) -> None:
        self.inner.reset()
        self.ngram.reset()

    def propose(self, context: list[int], gamma: int, params, generator) -> Draft:
        draft = self.inner.propose(context, gamma, params, generator)
        if draft.tokens.shape[0] == 0:
            return draft
        lookup = self.ngram.propose(context, self.length, None, None).tokens
        return draft._replace(lookup=lookup.to(draft.tokens.device)) if lookup.shape[0] else draft
