"""A drafter backed by any `CausalLM` (a small model, the target's first layers, a distilled draft).

Its KV cache holds the tokens it has been fed. Before drafting it truncates the cache to the
longest prefix shared with the new context (everything after the first rejected draft token is
dropped), feeds the missing committed tokens, then samples γ tokens autoregressively through
`logits_to_probs` with the same `SamplingParams` as the target.
"""

from __future__ import annotations

import torch

from speculant.drafters.base import Draft, RowDraft, common_prefix_length, sample_draft, sample_rows
from speculant.models.base import CausalLM
from speculant.models.transformer import LeanModel
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

    def rows(self, max_rows: int, target_cache=None) -> ModelRows:
        """This drafter for a batch of up to `max_rows` requests (speculant.batching)."""
        if not isinstance(self.model, LeanModel) or self.candidates != 1:
            raise ValueError("batched drafting takes a lean draft model proposing one chain (candidates 1)")
        return ModelRows(self.model, max_rows)


class ModelRows:
    """ModelDrafter over the rows of a batch (a RowDrafter): one cache row per request, one batched
    forward per draft position. Row b keeps what ModelDrafter keeps: fed[b], known_good[b]."""

    def __init__(self, model: LeanModel, max_rows: int) -> None:
        self.model = model
        self.cache = model.new_row_cache(max_rows)
        self.fed: list[list[int]] = [[] for _ in range(max_rows)]
        self.known_good = [0] * max_rows

    def start(self, row: int, context: list[int]) -> None:
        # the prompt but its last token, alone: the first propose feeds the rest with the other rows
        self.fed[row], self.known_good[row] = list(context[:-1]), len(context) - 1
        if len(context) > 1:
            self.model.forward_rows(self.cache, torch.tensor([context[:-1]]), [0], [len(context) - 1], first_row=row,
                                    with_logits=False)

    def move(self, source: int, dest: int) -> None:
        self.cache.move_row(source, dest, len(self.fed[source]))
        self.fed[dest], self.known_good[dest] = self.fed[source], self.known_good[source]

    def propose(self, contexts: list[list[int]], gammas: list[int], params: list[SamplingParams],
                generators: list[torch.Generator]) -> RowDraft:
        rows = len(contexts)
        keeps, feeds = [], []
        for b, context in enumerate(contexts):
            keep = min(common_prefix_length(self.fed[b], context, self.known_good[b]), len(context) - 1)
            keeps.append(keep)
            feeds.append(context[keep:] if gammas[b] else [])  # rows drafting nothing catch up later
        width = max(len(f) for f in feeds)
        tokens = torch.zeros(rows, width, dtype=torch.int64)
        for b, f in enumerate(feeds):
            tokens[b, :len(f)] = torch.tensor(f, dtype=torch.int64)
        lengths = [len(f) for f in feeds]
        _, hidden = self.model.forward_rows(self.cache, tokens, keeps, lengths, with_logits=False)
        last = torch.tensor([max(n - 1, 0) for n in lengths], device=hidden.device)
        first = self.model.logits(hidden[torch.arange(rows, device=hidden.device), last])  # [B, V]: at each row's end
        ends = [k + n for k, n in zip(keeps, lengths)]  # where each row's first draft token goes

        def feed(token: torch.Tensor, i: int) -> torch.Tensor:
            more = [int(g > i + 1) for g in gammas]  # rows still drafting after token i
            out, _ = self.model.forward_rows(self.cache, token[:, None], [e + i for e in ends], more)
            return out[:, 0]

        draft = sample_rows(first, gammas, params, generators, feed)
        drafted = draft.tokens.tolist()
        for b, context in enumerate(contexts):
            if gammas[b]:
                self.fed[b] = list(context) + drafted[b][:gammas[b] - 1]
                self.known_good[b] = len(context)
        return draft
