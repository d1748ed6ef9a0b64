"""The drafter protocol.

A drafter proposes up to γ tokens that continue the committed context, and says which law each
was drawn from. It owns its state (a KV cache, an index) and keeps it consistent with whatever
context it is shown next: the engine never tells it what was rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

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
        return probs, sample_from(probs, uniform, params.greedy)  # greedy: its argmax, no scan over the vocabulary

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


class RowPlan(NamedTuple):
    """A row drafter's part of a step, decided on the host before any forward: row b feeds tokens[b]
    at positions starts[b].. (the committed tokens its state lacks; a deterministic drafter: its
    draft itself) and drafts counts[b] tokens."""

    tokens: list[list[int]]
    starts: list[int]
    counts: list[int]  # γ'_b <= the γ_b asked for


class RowDrafter(Protocol):
    """A drafter for rows 0..B-1 of a batch (speculant.batching), each row one request with its own
    state (a cache row, an index). Row b draws its randomness only from its own generator, in the
    order the single-request drafter does, so a request drafts the same tokens whatever runs beside it.

    The host decides, the device computes, so that a step's device part can be captured as a CUDA
    graph (speculant.row_step): `plan` (host) says what each row feeds and drafts; `draft` (device, no
    host read, shapes fixed by its inputs) feeds and drafts; `settle` (host) records what was drafted.
    `propose_rows` runs the three eagerly. A request joins with `start` (host) and `prefill` (device)."""

    samples: bool  # draws its tokens from laws (counts[b] uniforms per row); False: deterministic, no laws

    def start(self, row: int, context: list[int]) -> list[int]:
        """A request with `context` (its prompt) takes row `row`; the target's row holds context[:-1].
        Returns the tokens `prefill` must feed the row from position 0 (possibly none)."""
        ...

    def prefill(self, tokens: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, kv_len: int) -> None:
        """Feed rows 0..B-1: tokens [B, T], row b's first lengths[b] (0: none) at positions starts[b]..,
        keys read up to kv_len (>= every row's end). A join, or rows catching up before a fixed window."""
        ...

    def move(self, source: int, dest: int) -> None:
        """Row `source`'s state moves to row `dest`."""
        ...

    def plan(self, contexts: list[list[int]], gammas: list[int]) -> RowPlan:
        """What rows b = 0..B-1 feed and draft to draft up to gammas[b] tokens after contexts[b]."""
        ...

    def draft(self, tokens: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor,
              uniforms: torch.Tensor, laws: RowLaws, kv_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A plan on the device: tokens [B, T] (row b's first lengths[b], at starts[b]..), counts [B],
        uniforms [B, Γ] (row b's first counts[b] its own), laws the rows' sampling transforms (RowLaws)
        -> draft tokens [B, Γ] and their laws [B, Γ, V] (None: deterministic). Rows may be padding
        (lengths 0, counts 0): they write only scratch slots."""
        ...

    def settle(self, contexts: list[list[int]], counts: list[int], drafted: list[list[int]]) -> None:
        """After the step: row b drafted drafted[b] (counts[b] tokens) after contexts[b]."""
        ...


def propose_rows(drafter: RowDrafter, contexts: list[list[int]], gammas: list[int], params: list[SamplingParams],
                 generators: list[torch.Generator]) -> RowDraft:
    """Draft up to gammas[b] tokens after contexts[b] for rows b = 0..B-1, eagerly: the drafter's plan,
    row b's counts[b] uniforms from generators[b], its draft with shapes as small as the plan allows
    (keys read up to the furthest position written), its settle."""
    plan = drafter.plan(contexts, gammas)
    width = max(plan.counts)
    device = _drafter_device(drafter)
    if width == 0:
        return RowDraft(torch.zeros(len(contexts), 0, dtype=torch.int64, device=device), None, plan.counts)
    lengths = [len(t) for t in plan.tokens]
    tokens = torch.zeros(len(contexts), max(max(lengths), 1), dtype=torch.int64)
    for b, row in enumerate(plan.tokens):
        tokens[b, :len(row)] = torch.tensor(row, dtype=torch.int64)
    uniforms = row_uniforms(generators, [[n if drafter.samples else 0] for n in plan.counts], [width])
    kv_len = max(s + n + max(c - 1, 0) for s, n, c in zip(plan.starts, lengths, plan.counts))
    draft_tokens, laws = drafter.draft(
        tokens.to(device), torch.tensor(plan.starts, device=device), torch.tensor(lengths, device=device),
        torch.tensor(plan.counts, device=device), uniforms.to(device), RowLaws(*param_groups(params)), kv_len)
    drafter.settle(contexts, plan.counts, draft_tokens.tolist())
    return RowDraft(draft_tokens, laws, plan.counts)


def _drafter_device(drafter: RowDrafter) -> torch.device:
    """Where a row drafter's tensors live: its model's device (the CPU for a deterministic one)."""
    model = getattr(drafter, "model", None)
    return model.device if model is not None else torch.device("cpu")


def param_groups(params: list[SamplingParams]) -> tuple[tuple[SamplingParams, ...], list[int]]:
    """The distinct params of the rows, in a fixed order (not the rows'), and the index of each row's
    among them. A captured step's graph is keyed by the first and fed the second."""
    sets = tuple(sorted(set(params), key=lambda p: (p.temperature, p.top_k, p.top_p, p.min_p)))
    return sets, [sets.index(p) for p in params]


def probs_by_row(logits: torch.Tensor, sets: tuple[SamplingParams, ...], group: list[int] | torch.Tensor
                 ) -> torch.Tensor:
    """logits_to_probs with row b's own params sets[group[b]] (param_groups): logits [B, ..., V] ->
    probs [B, ..., V]. The transform works row by row, so how rows are grouped changes nothing:
    group a list (known on the host): each set goes over its own rows only;
    group a [B] int64 tensor on the logits' device: each set goes over every row and each row keeps its
    own (torch.where), with no host read and no shape that depends on the rows, so a captured step
    runs it; G sets then cost G transforms of the whole batch."""
    if len(sets) == 1:
        return logits_to_probs(logits, sets[0])
    if isinstance(group, torch.Tensor):
        out = logits_to_probs(logits, sets[0])
        shape = (-1,) + (1,) * (logits.dim() - 1)
        for index, params in enumerate(sets[1:], 1):
            out = torch.where((group == index).view(shape), logits_to_probs(logits, params), out)
        return out
    out = torch.empty(logits.shape, dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype,
                      device=logits.device)
    for index, params in enumerate(sets):
        rows = torch.tensor([b for b, g in enumerate(group) if g == index], device=logits.device)
        out[rows] = logits_to_probs(logits[rows], params)
    return out


def row_uniforms(generators: list[torch.Generator], counts: list[list[int]], widths: list[int]) -> torch.Tensor:
    """Row b's random draws, from generators[b] alone: region by region (widths[r] columns each),
    counts[b][r] uniforms at the start of region r, 0.5 elsewhere (padding draws nothing). [B,
    sum(widths)] float32 on the CPU. A row's draws for all regions come from one torch.rand call: on a
    CPU generator that gives the values of one call per region in turn (the single-request engine's
    calls; tests/test_row_step.py pins it), at one call per row, and the whole is assembled in one copy."""
    out = torch.full((len(generators), sum(widths)), 0.5)
    draws, index = [], []
    for b, (generator, row) in enumerate(zip(generators, counts)):
        if sum(row):
            draws.append(torch.rand(sum(row), generator=generator))
            offset = b * out.shape[1]
            for count, width in zip(row, widths):
                index.extend(range(offset, offset + count))
                offset += width
    if draws:
        out.view(-1)[torch.tensor(index)] = torch.cat(draws)
    return out


class RowLaws:
    """The rows' sampling transforms (probs_by_row over param_groups' sets and group) and the draw from
    the laws they give: sample_from's inverse-CDF draw, told where every set is greedy (every law a
    point mass: the argmax, without a scan over the vocabulary)."""

    def __init__(self, sets: tuple[SamplingParams, ...], group: list[int] | torch.Tensor) -> None:
        self.sets, self.group = sets, group
        self.greedy = all(params.greedy for params in sets)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, ..., V] -> each row's law [B, ..., V]."""
        return probs_by_row(logits, self.sets, self.group)

    def draw(self, probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """Tokens [...] from laws probs [..., V] this transform gave, uniform [...] in [0, 1)."""
        return sample_from(probs, uniform, self.greedy)


def sample_rows(first_logits: torch.Tensor, uniforms: torch.Tensor, laws: RowLaws,
                feed: Callable[[torch.Tensor, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_draft over rows: first_logits [B, V] give each row's first law, laws(logits [B, V]) ->
    [B, V] is each row's sampling transform, uniforms [B, Γ] (on the device) drive its draws
    (laws.draw); feed(tokens [B], i) feeds draft token i of every row (rows past their γ_b feed
    padding) and returns the logits after it [B, V] (never called for the last position). Returns the tokens
    [B, Γ] and the law each was drawn from [B, Γ, V]; no host read."""
    logits, tokens, drawn_from = first_logits, [], []
    width = uniforms.shape[1]
    for i in range(width):
        step_probs = laws(logits)  # [B, V]
        tokens.append(laws.draw(step_probs, uniforms[:, i]))
        drawn_from.append(step_probs)
        if i + 1 < width:
            logits = feed(tokens[-1], i)
    return torch.stack(tokens, 1), torch.stack(drawn_from, 1)
