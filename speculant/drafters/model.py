"""A drafter backed by any `CausalLM` (a small model, the target's first layers, a distilled draft).

Its KV cache holds the tokens it has been fed. Before drafting it truncates the cache to the
longest prefix shared with the new context (everything after the first rejected draft token is
dropped), feeds the missing committed tokens, then samples γ tokens autoregressively through
`logits_to_probs` with the same `SamplingParams` as the target.
"""

from __future__ import annotations

import torch

from speculant.drafters.base import Draft, RowPlan, common_prefix_length, sample_draft, sample_rows
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

    def rows(self, max_rows: int, target_cache=None, chain: bool = False) -> ModelRows:
        """This drafter for a batch of up to `max_rows` requests (speculant.batching), one chain per
        row: a drafter of several candidates only with `chain` (see FeatureDrafter.rows)."""
        if not isinstance(self.model, LeanModel) or (self.candidates != 1 and not chain):
            raise ValueError("batched drafting takes a lean draft model proposing one chain (candidates 1)")
        return ModelRows(self.model, max_rows)


class ModelRows:
    """ModelDrafter over the rows of a batch (a RowDrafter): one cache row per request, one batched
    forward per draft position. Row b keeps what ModelDrafter keeps: fed[b], known_good[b]."""

    samples = True

    def __init__(self, model: LeanModel, max_rows: int) -> None:
        self.model = model
        self.cache = model.new_row_cache(max_rows)
        self.fed: list[list[int]] = [[] for _ in range(max_rows)]
        self.known_good = [0] * max_rows

    def start(self, row: int, context: list[int]) -> list[int]:
        # the prompt but its last token: the first plan feeds the rest with the other rows
        self.fed[row], self.known_good[row] = list(context[:-1]), len(context) - 1
        return self.fed[row]

    def prefill(self, tokens: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, kv_len: int) -> torch.Tensor:
        """RowDrafter.prefill; returns the final-normed hidden states [B, T, E] (draft reads the last)."""
        return self.model.forward_rows_static(self.cache, tokens, starts, lengths, kv_len, with_logits=False)[1]

    def move(self, source: int, dest: int) -> None:
        self.cache.move_row(source, dest, len(self.fed[source]))
        self.fed[dest], self.known_good[dest] = self.fed[source], self.known_good[source]

    def plan(self, contexts: list[list[int]], gammas: list[int]) -> RowPlan:
        keeps, feeds = [], []
        for b, context in enumerate(contexts):
            # keep the cache up to the last position that still matches, but always re-feed the final
            # context token: its logits give the first draft distribution (rows drafting nothing
            # catch up later)
            keep = min(common_prefix_length(self.fed[b], context, self.known_good[b]), len(context) - 1)
            keeps.append(keep)
            feeds.append(context[keep:] if gammas[b] else [])
        return RowPlan(feeds, keeps, list(gammas))

    def draft(self, tokens, starts, lengths, counts, uniforms, laws, kv_len):
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        hidden = self.prefill(tokens, starts, lengths, kv_len)
        first = self.model.logits(hidden[rows, (lengths - 1).clamp_min(0)])  # [B, V]: at each row's end
        ends = starts + lengths  # where each row's first draft token goes

        def feed(token: torch.Tensor, i: int) -> torch.Tensor:
            more = (counts > i + 1).to(torch.int64)  # rows still drafting after token i
            out, _ = self.model.forward_rows_static(self.cache, token[:, None], ends + i, more, kv_len)
            return out[:, 0]

        return sample_rows(first, uniforms, laws, feed)

    def settle(self, contexts: list[list[int]], counts: list[int], drafted: list[list[int]]) -> None:
        for b, context in enumerate(contexts):
            if counts[b]:
                self.fed[b] = list(context) + drafted[b][:counts[b] - 1]
                self.known_good[b] = len(context)
