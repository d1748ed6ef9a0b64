"""Logits -> probabilities. ONE function (`logits_to_probs`) serves target and draft alike.

Speculative sampling is exact only when the draft's q and the target's p are "the distribution
after the same transform", so both sides go through `logits_to_probs` with the same
`SamplingParams`. The transforms are applied in this order (the same order as Hugging Face's
logits processors):

1. temperature: logits / T. T == 0 means greedy: a point mass on the argmax (ties -> lowest id).
2. top-k: keep the k largest probabilities (k == 0: off).
3. top-p (nucleus): keep the smallest set of most likely tokens whose mass reaches top_p
   (computed after top-k; the most likely token is always kept; top_p == 1: off).
4. min-p: keep tokens whose probability is at least min_p times the largest probability
   (computed after top-k and top-p; min_p == 0: off).
5. renormalise.

>>> import torch
>>> probs = logits_to_probs(torch.tensor([2.0, 1.0, 0.0]), SamplingParams(temperature=0))
>>> probs.tolist()
[1.0, 0.0, 0.0]
>>> probs = logits_to_probs(torch.tensor([2.0, 1.0, 0.0]), SamplingParams(top_k=2))
>>> [round(x, 4) for x in probs.tolist()]
[0.7311, 0.2689, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a distribution. Defaults: plain sampling at temperature 1.

    temperature: 0 = greedy, else > 0.   top_k: 0 = off, else >= 1.
    top_p: in (0, 1], 1 = off.           min_p: in [0, 1), 0 = off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply the sampling transform to `logits` [..., vocab] and return probabilities [..., vocab].

    Works on any leading shape, in the dtype given (float32 at least; float64 stays float64).
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if params.greedy:  # scatter, not one_hot: one_hot checks its input on the host (a CUDA sync)
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k and params.top_k < probs.shape[-1]:
        kth_largest = probs.topk(params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        probs = torch.where(probs >= kth_largest, probs, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        total = sorted_probs.sum(-1, keepdim=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        keep_sorted = mass_before < params.top_p * total  # first token always kept (mass_before 0)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    if params.min_p > 0.0:
        threshold = params.min_p * probs.amax(-1, keepdim=True)
        probs = torch.where(probs >= threshold, probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_from(probs: torch.Tensor, uniform: torch.Tensor, greedy: bool = False) -> torch.Tensor:
    """Inverse-CDF draw: for probs [..., vocab] and uniform [...] in [0, 1), the token ids [...].

    The draw is a pure function of `uniform`, so tests can fix it. Tokens of probability 0 are
    never returned (the first index whose cumulative mass exceeds u * total). `greedy`: every law is
    a point mass (greedy decoding's, or a residual of two), whose token is its argmax: the same draw
    without the cumulative sum over the vocabulary (5 of them over 64 rows × 49,152 tokens cost
    0.38 ms of a batched step on an H100).
    """
    if greedy:
        return probs.argmax(-1)
    # Under torch.compile the cumulative sum over a large vocabulary becomes a "split scan" kernel,
    # and inductor 2.11 fails when it fuses a reduction (the greedy argmax, a residual's mass) into
    # it ("NYI TritonSplitDimKernel reductions", seen on the lent H200). A graph break here keeps
    # the draw in a graph of its own; inside a CUDA graph it costs nothing. Only while compiling:
    # called eagerly, graph_break() costs ~1 ms.
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break()
    cumulative = probs.cumsum(-1)  # [..., vocab]
    threshold = (uniform * cumulative[..., -1]).unsqueeze(-1)  # [..., 1]
    token = torch.searchsorted(cumulative, threshold, right=True).squeeze(-1)
    return token.clamp(max=probs.shape[-1] - 1)
