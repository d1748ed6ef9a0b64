"""A drafter backed by any `CausalLM` (a small model, the target's first layers, a distilled draft).

Its KV cache holds the tokens it has been fed. Before drafting it truncates the cache to the
longest prefix shared with the new context (everything after the first rejected draft token is
dropped), feeds the missing committed tokens, then samples γ tokens autoregressively through
`logits_to_probs` with the same `SamplingParams` as the target.
"""

from __future__ import annotations

import torch

from speculant.drafters.base import Draft, common_prefix_length, sample_draft
from speculant.models.base import CausalLM
from speculant.sampling import SamplingParams


class ModelDrafter:
    def __init__(self, model: CausalLM, candidates: int = 1) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.model = model
        self.candidates = candidates  # per position: 1 = a chain, k > 1 = k-1 alternatives too
        self.vocab_size = model.vocab_size
        self.fed: list[int] = []  # tokens whose K/V sit in the model's cache, position-aligned
        self.known_good = 0  # self.fed[:known_good] is known to match the committed context

    def reset(self) -> None:
        self.model.truncate(0)
        self.fed, self.known_good = [], 0

    def propose(self, context: list[int], gamma: int, params: SamplingParams, generator) -> Draft:
        # Keep the cache up to the last position that still matches, but always re-feed the
        # final context token: its logits give the first draft distribution.
        keep = min(common_prefix_length(self.fed, context, self.known_good), len(context) - 1)
        self.model.truncate(keep)
        self.fed = list(context)
        self.known_good = len(context)
        device = self.model.device
        logits = self.model.forward(torch.tensor(context[keep:], device=device), keep)[-1]

        def feed(token: torch.Tensor, i: int) -> torch.Tensor:
            logits = self.model.forward(token.view(1), len(self.fed))[-1]
            self.fed.append(int(token))
            return logits

        return sample_draft(logits, gamma, params, generator, feed, self.candidates)
