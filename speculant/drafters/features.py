"""A drafter for a `FeatureDraft` (EAGLE-style): it reads the target's features.

Indexing. Draft position i reads the token x_{i+1} and the target's feature f_i (the target's
final-normed hidden state at position i, the one that predicts x_{i+1}); its output predicts
f_{i+1} and x_{i+2}. With the committed context x_0..x_n, the target's cache holds positions
0..n-1 (the engine feeds x_n with the next verification), so the true features f_0..f_{n-1} are
in `target.features`, written by the target's own forward passes (prefill and verification;
rejected positions are overwritten before they are read, as in the KV cache).

Drafting: feed draft positions keep..n-1 with the true (x_{i+1}, f_i) (positions before `keep`
are still valid from the previous step), take the output at n-1 (-> the law of x_{n+1} and the
predicted feature f̂_n), then for each further draft token feed (x̂, f̂) at the next position.
Positions fed with predicted features are recomputed next step, when the true ones exist.

The law each token is drawn from is returned with it, so speculative sampling stays exact.
"""

from __future__ import annotations

import torch

from speculant.drafters.base import Draft, RowPlan, common_prefix_length, sample_draft, sample_rows
from speculant.models.feature_draft import FeatureDraft
from speculant.models.transformer import LeanModel
from speculant.sampling import SamplingParams


class FeatureDrafter:
    def __init__(self, draft: FeatureDraft, target: LeanModel, candidates: int = 1) -> None:
        if not isinstance(target, LeanModel):
            raise TypeError("a feature draft reads the target's features: it needs a lean target")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.candidates = candidates  # per position: 1 = a chain, k > 1 = k-1 alternatives too
        draft.read_from(target)
        self.model = draft
        self.target = target
        self.vocab_size = draft.vocab_size
        self.fed: list[int] = []  # fed[i] = the token read at draft position i (x_{i+1})
        self.true_len = 0  # draft positions < true_len were computed from the target's true features

    def reset(self) -> None:
        self.model.truncate(0)
        self.fed, self.true_len = [], 0

    def propose(self, context: list[int], gamma: int, params: SamplingParams, generator) -> Draft:
        device = self.model.device
        n = len(context) - 1  # the target holds positions 0..n-1 and their features
        if gamma <= 0 or n < 1:
            return Draft(torch.empty(0, dtype=torch.int64, device=device), None)
        if self.target.length < n:
            raise RuntimeError(f"the target's cache holds {self.target.length} positions, the feature draft "
                               f"needs the features of {n}")
        shifted = context[1:]  # draft position i reads x_{i+1}
        # within a request the context only grows: fed[:true_len - 1] still matches (checked from there)
        keep = min(self.true_len, common_prefix_length(self.fed, shifted, max(self.true_len - 1, 0)), n - 1)
        self.model.truncate(keep)
        tokens = torch.tensor(shifted[keep:n], device=device)
        logits, hidden = self.model.forward_features(tokens, self.target.features[keep:n], keep)
        self.fed, self.true_len = shifted[:n], n
        feature = hidden[-1:]  # f̂_n: read with the first draft token

        def feed(token: torch.Tensor, i: int) -> torch.Tensor:
            # draft position n+i reads (x̂_{n+i+1}, f̂_{n+i}) and predicts f̂_{n+i+1}
            nonlocal feature
            logits, feature = self.model.forward_features(token.view(1), feature, n + i)
            self.fed.append(int(token))
            return logits[-1]

        return sample_draft(logits[-1], gamma, params, generator, feed, self.candidates)

    def rows(self, max_rows: int, target_cache, chain: bool = False) -> FeatureRows:
        """This drafter for a batch of up to `max_rows` requests (speculant.batching); `target_cache`
        is the target's RowKVCache, told here to keep features. The batch drafts one chain: a drafter
        of several candidates only with `chain` (its candidates are then the single-request engine's)."""
        if self.candidates != 1 and not chain:
            raise ValueError("batched drafting proposes one chain (candidates 1)")
        target_cache.keep_features()
        return FeatureRows(self.model, target_cache, max_rows)


class FeatureRows:
    """FeatureDrafter over the rows of a batch (a RowDrafter): draft row b reads the target's row b
    features; one batched forward per draft position. Row b keeps what FeatureDrafter keeps."""

    samples = True

    def __init__(self, draft: FeatureDraft, target_cache, max_rows: int) -> None:
        self.model = draft
        self.target_cache = target_cache
        self.cache = draft.new_row_cache(max_rows)
        self.fed: list[list[int]] = [[] for _ in range(max_rows)]
        self.true_len = [0] * max_rows

    def start(self, row: int, context: list[int]) -> list[int]:
        # draft positions 0..n-2 from the prefilled target's features; the first plan feeds position n-1
        n = len(context) - 1
        self.fed[row], self.true_len[row] = list(context[1:n]), max(n - 1, 0)
        return self.fed[row]

    def prefill(self, tokens: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, kv_len: int) -> torch.Tensor:
        """RowDrafter.prefill: draft position i of row b reads token tokens[b, i - starts[b]] (x_{i+1})
        and the target's feature f_i of row b; returns the predicted features [B, T, E]."""
        rows, width = tokens.shape
        offsets = torch.arange(width, device=tokens.device)
        # [B, T]: the target's features at the fed positions (padding reads slot 0)
        index = torch.where(offsets[None, :] < lengths[:, None], starts[:, None] + offsets, 0)
        features = self.target_cache.features[torch.arange(rows, device=tokens.device)[:, None], index]
        return self.model.forward_features_rows(self.cache, tokens, features, starts, lengths, kv_len,
                                                with_logits=False)[1]

    def move(self, source: int, dest: int) -> None:
        self.cache.move_row(source, dest, len(self.fed[source]))
        self.fed[dest], self.true_len[dest] = self.fed[source], self.true_len[source]

    def plan(self, contexts: list[list[int]], gammas: list[int]) -> RowPlan:
        # a row whose target holds no feature yet (a one-token prompt) drafts nothing, as FeatureDrafter
        counts = [g if len(c) > 1 else 0 for g, c in zip(gammas, contexts)]
        keeps, feeds = [], []
        for b, context in enumerate(contexts):
            n = len(context) - 1  # the target holds positions 0..n-1 and their features
            keep = min(self.true_len[b], common_prefix_length(self.fed[b], context[1:], max(self.true_len[b] - 1, 0)),
                       n - 1) if counts[b] else 0
            keeps.append(keep)
            feeds.append(context[1 + keep:1 + n] if counts[b] else [])
        return RowPlan(feeds, keeps, counts)

    def draft(self, tokens, starts, lengths, counts, uniforms, laws, kv_len):
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        hidden = self.prefill(tokens, starts, lengths, kv_len)
        feature = hidden[rows, (lengths - 1).clamp_min(0)]  # [B, E]: f̂_n, read with the first draft token
        ends = starts + lengths  # n: where each row's first draft token goes

        def feed(token: torch.Tensor, i: int) -> torch.Tensor:
            nonlocal feature
            more = (counts > i + 1).to(torch.int64)
            out, hidden = self.model.forward_features_rows(self.cache, token[:, None], feature[:, None], ends + i,
                                                           more, kv_len)
            feature = hidden[:, 0]
            return out[:, 0]

        return sample_rows(self.model.logits(feature), uniforms, laws, feed)

    def settle(self, contexts: list[list[int]], counts: list[int], drafted: list[list[int]]) -> None:
        for b, context in enumerate(contexts):
            if counts[b]:
                n = len(context) - 1
                self.fed[b], self.true_len[b] = context[1:n + 1] + drafted[b][:counts[b] - 1], n
