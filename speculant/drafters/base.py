"""The drafter protocol.

A drafter proposes up to γ tokens that continue the committed context, and says which law each
was drawn from. It owns its state (a KV cache, an index) and keeps it consistent with whatever
context it is shown next: the engine never tells it what was rejected.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch

from speculant.sampling import SamplingParams, logits_to_probs, sample_from


class Draft(NamedTuple):
    tokens: torch.Tensor  # [γ'] int64, 0 <= γ' <= γ
    probs: torch.Tensor | None  # [γ', vocab]: the law each token was drawn from; None = point masses


class Drafter(Protocol):
    def reset(self) -> None:
        """Forget everything: a new request starts."""
        ...

    def propose(
        self,
        context: list[int],
        gamma: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        """Draft up to `gamma` tokens after `context` (prompt + committed output)."""
        ...


def common_prefix_length(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the common prefix of a and b, given that a[:start] == b[:start]."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def sample_draft(logits: torch.Tensor, gamma: int, params: SamplingParams, generator,
                 feed: Callable[[torch.Tensor, int], torch.Tensor]) -> Draft:
    """Draw γ tokens autoregressively from a draft model: logits [vocab] give the first law;
    feed(token [], i) feeds draft token i and returns the logits after it (never called for the
    last token: its logits are not needed). Returns the tokens and the law each was drawn from."""
    tokens, probs = [], []
    for i in range(gamma):
        step_probs = logits_to_probs(logits, params)  # [vocab]
        token = sample_from(step_probs, torch.rand((), generator=generator, device=logits.device))
        tokens.append(token)
        probs.append(step_probs)
        if i + 1 < gamma:
            logits = feed(token, i)
    if not tokens:
        return Draft(torch.empty(0, dtype=torch.int64, device=logits.device), None)
    return Draft(torch.stack(tokens), torch.stack(probs))
