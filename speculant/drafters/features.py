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

from speculant.distill.draft_model import FeatureDraft
from speculant.drafters.base import Draft, common_prefix_length, sample_draft
from speculant.models.transformer import LeanModel
from speculant.sampling import SamplingParams


class FeatureDrafter:
    def __init__(self, draft: FeatureDraft, target: LeanModel, candidates: int = 1) -> None:
        if not isinstance(target, LeanModel):
            raise TypeError("a feature draft reads the target's features: it needs a lean target")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.candidates = candidates  # per position: 1 = a chain, k > 1 = k-1 alternatives too
        target.keep_features()
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
