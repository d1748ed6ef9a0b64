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
    # k-1 further candidates at each position (see acceptance.verify_candidates), or None:
    alternatives: torch.Tensor | None = None  # [γ', k-1] int64
    # [γ', k-1, vocab]: the law of alternative j given the token and alternatives < j; None = point masses
    alternative_probs: torch.Tensor | None = None
    # a deterministic continuation (prompt lookup) scored beside the tree, see speculant.drafters.lookup
    lookup: torch.Tensor | None = None  # [L] int64, L >= 1


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


class NoDrafter:
    """`none`: proposes nothing, so every step is a plain decoding step."""

    def reset(self) -> None:
        pass

    def propose(self, context, gamma, params, generator):
        raise AssertionError("the engine asks a drafter only for gamma >= 1")


def common_prefix_length(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the common prefix of a and b, given that a[:start] == b[:start]."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def draw_alternatives(logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor, count: int, greedy: bool,
                      noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`count` more candidates beside the token `chosen` [...] at draft positions with logits and
    probs [..., V] (batched over the leading dims: all positions of a draft in one call).

    Greedy: the draft's next most likely tokens, a deterministic choice (laws None: point masses).
    Sampling: drawn without replacement from probs with `chosen` removed (Gumbel-top-k, noise
    [..., V] uniforms in [0, 1)); row j of the laws [..., count, V] is probs without `chosen` and
    candidates < j, renormalised: the law candidate j was drawn from given the ones before it (all
    zero once the support is used up; such a candidate has probability 0 and is never kept).
    Returns the tokens [..., count] and the laws."""
    chosen = chosen[..., None]  # [..., 1]
    if greedy:
        return logits.scatter(-1, chosen, float("-inf")).topk(count).indices, None
    # Gumbel noise; a uniform of exactly 0 would give -inf and tie a token of positive mass with
    # the impossible ones, so the uniforms are kept above 0
    noise = noise.clamp_min(torch.finfo(noise.dtype).tiny)
    scores = probs.log().scatter(-1, chosen, float("-inf")) - torch.log(-torch.log(noise))
    tokens = scores.topk(count).indices  # [..., count], in the order of a sequential draw
    earlier = torch.ones(count, count, dtype=torch.bool, device=probs.device).tril(-1)
    removed = torch.where(earlier, tokens[..., None, :], chosen[..., None])  # [..., count, count]: row j drops tokens < j
    remaining = probs.scatter(-1, chosen, 0.0)[..., None, :]  # [..., 1, V]
    rows = remaining.expand(*removed.shape[:-1], -1).scatter(-1, removed, 0.0)  # [..., count, V]
    mass = rows.sum(-1, keepdim=True)
    return tokens, rows / torch.where(mass > 0, mass, 1.0)


def sample_chain(logits: torch.Tensor, uniforms: torch.Tensor, feed: Callable[[torch.Tensor, int], torch.Tensor],
                 sample: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw γ = len(uniforms) tokens autoregressively from a draft model: logits [V] give the first
    law; sample(logits [V], u []) -> (probs [V], token []) is the sampling transform and one draw
    (logits_to_probs, sample_from); feed(token [], i) feeds draft token i and returns the logits
    after it (never called for the last token: its logits are not needed). Returns the tokens [γ],
    the law each was drawn from [γ, V] and the logits it came from [γ, V].

    The generic drafters and the fused CUDA-graph step both draft through this function: no host
    read and no branch on a tensor's value, so it can be captured."""
    tokens, probs, all_logits = [], [], []
    for i in range(uniforms.shape[0]):
        step_probs, token = sample(logits, uniforms[i])
        tokens.append(token)
        probs.append(step_probs)
        all_logits.append(logits)
        if i + 1 < uniforms.shape[0]:
            logits = feed(token, i)
    return torch.stack(tokens), torch.stack(probs), torch.stack(all_logits)


def sample_draft(logits: torch.Tensor, gamma: int, params: SamplingParams, generator,
                 feed: Callable[[torch.Tensor, int], torch.Tensor], candidates: int = 1) -> Draft:
    """A drafter's `propose` through sample_chain: γ tokens from the draft model with `params`, and
    with `candidates` k > 1 also k-1 alternatives per position (draw_alternatives)."""
    if gamma <= 0:
        return Draft(torch.empty(0, dtype=torch.int64, device=logits.device), None)
    # one draw per token, in the order (and so with the values, on every device) of one draw at a time
    uniforms = torch.stack([torch.rand((), generator=generator, device=logits.device) for _ in range(gamma)])

    def sample(logits: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = logits_to_probs(logits, params)  # [vocab]
        return probs, sample_from(probs, uniform)

    tokens, probs, all_logits = sample_chain(logits, uniforms, feed, sample)
    if candidates == 1:
        return Draft(tokens, probs)
    # the alternatives do not feed the chain: all positions in one batched draw
    noise = None if params.greedy else torch.rand(gamma, logits.shape[-1], generator=generator, device=logits.device)
    alternatives, laws = draw_alternatives(all_logits, probs, tokens, candidates - 1, params.greedy, noise)
    return Draft(tokens, probs, alternatives, laws)


# ---- several requests' rows at once (speculant.batching) -------------------------------------------


class RowDraft(NamedTuple):
    """The drafts of B rows, padded to the longest: row b's first counts[b] tokens are its draft."""

    tokens: torch.Tensor  # [B, Γ] int64
    probs: torch.Tensor | None  # [B, Γ, vocab]: the law each token was drawn from; None = point masses
    counts: list[int]  # [B]: γ'_b <= the γ_b asked for


class RowDrafter(Protocol):
    """A drafter for rows 0..B-1 of a batch (speculant.batching), each row one request with its own
    state (a cache row, an index). Rows stay packed: when a request leaves, the last row moves into
    its place. Row b draws its randomness only from generators[b], in the order the single-request
    drafter does, so a request drafts the same tokens whatever runs beside it."""

    def start(self, row: int, context: list[int]) -> None:
        """A request with `context` (its prompt) takes row `row`; the target's row holds context[:-1]."""
        ...

    def move(self, source: int, dest: int) -> None:
        """Row `source`'s state moves to row `dest`."""
        ...

    def propose(self, contexts: list[list[int]], gammas: list[int], params: list[SamplingParams],
                generators: list[torch.Generator]) -> RowDraft:
        """Draft up to gammas[b] tokens after contexts[b] for rows b = 0..B-1."""
        ...


def probs_by_row(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits_to_probs with row b's own params: logits [B, ..., V] -> probs [B, ..., V]. Rows with the
    same params go through one call (the transform works row by row, so grouping changes nothing)."""
    groups: dict[SamplingParams, list[int]] = {}
    for row, p in enumerate(params):
        groups.setdefault(p, []).append(row)
    if len(groups) == 1:
        return logits_to_probs(logits, params[0])
    out = torch.empty(logits.shape, dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype,
                      device=logits.device)
    for p, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        out[index] = logits_to_probs(logits[index], p)
    return out


def sample_rows(first_logits: torch.Tensor, gammas: list[int], params: list[SamplingParams],
                generators: list[torch.Generator], feed: Callable[[torch.Tensor, int], torch.Tensor]) -> RowDraft:
    """sample_draft over rows: first_logits [B, V] give each row's first law; row b draws gammas[b]
    uniforms from generators[b] (on the CPU, then moved: one copy per step) and its tokens by
    inverse CDF; feed(tokens [B], i) feeds draft token i of every row (rows past their γ_b feed
    padding) and returns the logits after it [B, V] (never called for the last position)."""
    device = first_logits.device
    width = max(gammas)
    uniforms = torch.full((len(gammas), width), 0.5)  # [B, Γ]: padding draws nothing
    for row, (gamma, generator) in enumerate(zip(gammas, generators)):
        uniforms[row, :gamma] = torch.rand(gamma, generator=generator)
    uniforms = uniforms.to(device)
    logits, tokens, probs = first_logits, [], []
    for i in range(width):
        step_probs = probs_by_row(logits, params)  # [B, V]
        tokens.append(sample_from(step_probs, uniforms[:, i]))
        probs.append(step_probs)
        if i + 1 < width:
            logits = feed(tokens[-1], i)
    return RowDraft(torch.stack(tokens, 1), torch.stack(probs, 1), list(gammas))
