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

`device_continuation` finds the same continuation on the device, in static shapes (the fused step's
lookup branch, found inside its CUDA graph: no host round trip):

>>> history = torch.tensor(context + [0] * 7)  # a buffer: only its first `length` tokens count
>>> device_continuation(history, torch.tensor(len(context)), 3).tolist()  # the tokens, then how many
[8, 9, 1, 3]
>>> device_continuation(torch.tensor([4, 5, 4, 9, 9]), torch.tensor(3), 4).tolist()  # short: padded
[5, 4, 0, 0, 2]
"""

from __future__ import annotations

import torch

from speculant.drafters.base import Draft, RowPlan, common_prefix_length


class NgramDrafter:
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # An index of the context seen last: every n-gram with a continuation -> the starts of its
        # occurrences, latest last. Each call indexes only what changed: new tokens are added, and
        # after a rollback (a hierarchy's inner context) the entries past the common prefix are popped.
        self._indexed: list[int] = []
        self._starts: dict[tuple[int, ...], list[int]] = {}

    def reset(self) -> None:
        self._indexed, self._starts = [], {}

    def propose(self, context, gamma, params, generator) -> Draft:
        return Draft(torch.tensor(self.continuation(context, gamma), dtype=torch.int64), None)

    def continuation(self, context: list[int], gamma: int) -> list[int]:
        """The draft `propose` makes, as a list (no tensor: the batched rows' plan stays on the host)."""
        self._index(context)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            starts = self._starts.get(tuple(context[-n:]))
            if starts:  # the latest earlier occurrence whose continuation is non-empty
                start = starts[-1]
                return context[start + n : start + n + gamma]
        return []

    def rows(self, max_rows: int, target_cache=None) -> NgramRows:
        """This drafter for a batch of up to `max_rows` requests (speculant.batching)."""
        return NgramRows(self.max_ngram, self.min_ngram, max_rows)

    def _index(self, context: list[int]) -> None:
        # an n-gram ending (exclusive) at e is indexed once it has a continuation: 1 <= e <= len - 1
        old = self._indexed
        same = len(old) if len(old) <= len(context) and old == context[: len(old)] else common_prefix_length(old, context)
        keep = min(same, len(context) - 1)  # ends <= keep read unchanged tokens and still have a continuation
        for end in range(len(old) - 1, max(keep, 0), -1):  # drop the others, latest first
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                key = tuple(old[end - n : end])
                starts = self._starts[key]
                starts.pop()
                if not starts:
                    del self._starts[key]
        for end in range(max(min(keep, len(old) - 1) + 1, 1), len(context)):  # then index the new ones
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._starts.setdefault(tuple(context[end - n : end]), []).append(end - n)
        self._indexed = list(context)


class NgramRows:
    """Prompt lookup over the rows of a batch (a RowDrafter): one index per row, no randomness. Its
    plan is the draft (found on the host); `draft` only hands the plan's tokens on."""

    samples = False

    def __init__(self, max_ngram: int, min_ngram: int, max_rows: int) -> None:
        self.drafters = [NgramDrafter(max_ngram, min_ngram) for _ in range(max_rows)]

    def start(self, row: int, context: list[int]) -> list[int]:
        self.drafters[row].reset()
        return []

    def prefill(self, tokens, starts, lengths, kv_len) -> None:
        pass  # the index is built on the host, by plan

    def move(self, source: int, dest: int) -> None:
        self.drafters[source], self.drafters[dest] = self.drafters[dest], self.drafters[source]

    def plan(self, contexts: list[list[int]], gammas: list[int]) -> RowPlan:
        drafts = [self.drafters[b].continuation(c, g) if g else []
                  for b, (c, g) in enumerate(zip(contexts, gammas))]
        return RowPlan(drafts, [0] * len(drafts), [len(d) for d in drafts])

    def draft(self, tokens, starts, lengths, counts, uniforms, laws, kv_len):
        return tokens[:, :uniforms.shape[1]], None

    def settle(self, contexts, counts, drafted) -> None:
        pass  # the next plan indexes the context it is shown


def device_continuation(history: torch.Tensor, length: torch.Tensor, size: int, max_ngram: int = 3,
                        min_ngram: int = 1) -> torch.Tensor:
    """NgramDrafter(max_ngram, min_ngram).continuation(history[:length].tolist(), size) found on the
    device: history [L] int64 (a buffer: its tokens from `length` on are not read), length [] int64
    -> [size + 1] int64: the continuation padded with 0, then its length. Static shapes, no host
    sync: it runs inside a CUDA graph (and through torch.compile).

    The n-gram ending (exclusively) at e (its start e - n) matches the context's last n tokens when
    the tokens before e agree with the context's last ones, backwards, n in a row. With agree[e] such
    tokens (at most max_ngram, and only for e <= length - 1: an occurrence has a continuation), the
    longest n that has a match is max(agree), and its latest occurrence ends at the last e whose
    run reaches it; the continuation starts there."""
    buffer = history.shape[0]
    ends = torch.arange(buffer, device=history.device)  # e [L]
    back = torch.arange(max_ngram, device=history.device)  # j [M]
    before = ends - 1 - back[:, None]  # [M, L]: position e-1-j, compared with the context's length-1-j
    last = (length - 1 - back).clamp(min=0)  # [M]; a j past the context's start is past e's too (e < length)
    same = (history[before.clamp(min=0)] == history[last][:, None]) & (before >= 0)  # [M, L]
    agree = same.long().cumprod(0).sum(0)  # [L]: the run of agreeing tokens before each end
    agree = torch.where(ends < length, agree, 0)
    n = agree.max()  # the longest n-gram with an earlier occurrence (0: none)
    end = torch.where(agree >= n, ends, -1).max()  # its latest occurrence's end
    count = torch.where(n >= min_ngram, (length - end).clamp(max=size), 0)  # >= 1 where found: end < length
    offsets = torch.arange(size + 1, device=history.device)  # no concatenation (see fused.NO_POINTWISE_CAT)
    tokens = torch.where(offsets < count, history[(end + offsets).clamp(0, buffer - 1)], 0)
    return torch.where(offsets == size, count, tokens)
