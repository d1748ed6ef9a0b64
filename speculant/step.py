"""One speculative step, behind one protocol (a `Stepper`).

    draft     γ tokens from the drafter (its own cache), each with the law it was drawn from
    verify    one target forward over [last committed token, x_1..x_γ] (or the candidate tree)
    accept    acceptance.verify / verify_candidates: a prefix of the draft and one more token
    truncate  the target's cache back to the committed length (rejected positions are forgotten)

Two implementations: `GenericStepper` here (any CausalLM target, any Drafter, eager) and
speculant.fused.FusedStepper (a lean target and a one-level drafter, each step one CUDA-graph
replay). Both draft through drafters.base.sample_chain, sample through sampling.logits_to_probs and
decide through acceptance.verify / verify_candidates / emitted_tokens, so exactness is argued once.

The engine (speculant.engine) drives a stepper and nothing else:

    stepper.begin(prompt, params)                   the caches then hold prompt[:-1]
    stepper.step(context, γ, generator, room=...)   -> StepResult; the caches then hold context +
                                                       the accepted drafts (the new token is fed by
                                                       the next step)

Run-ahead. A stepper with `runs_ahead` True (the fused one on CUDA) may launch the next step before
it reads this one's output, so that the host's work overlaps the device's. It can only do so if it
is told the next step's γ together with this step's (`next_gamma`); the engine then chooses that γ
before it observes this step. γ flows one way: policy -> engine -> stepper.

A stepper holds one request. The batched engine (speculant.batching) steps several requests' rows
with its own row-wise step (verify_rows, pinned by its tests to acceptance.verify); it is not behind
this protocol yet.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Protocol

import torch

from speculant.acceptance import candidate_tree, emitted_tokens, tree_that_fits, tree_tokens, verify, verify_candidates
from speculant.drafters.base import Draft, Drafter, common_prefix_length
from speculant.models.base import CausalLM, TreeCausalLM, synchronize
from speculant.sampling import SamplingParams, logits_to_probs


class StepResult(NamedTuple):
    tokens: list[int]  # accepted drafts + the recovered/bonus token: 1..γ'+1 tokens
    num_drafted: int
    num_accepted: int
    target_probs: torch.Tensor | None  # [γ'+1, vocab]: the target's law at each emitted token (generic steps)
    draft_time: float
    target_time: float
    target_calls: int = 1  # a fused plain step may decode several tokens, one target call each
    kept_alternative: bool = False  # the last kept draft token was an alternative, not the chain's
    lookup_kept: int = 0  # draft tokens kept from the lookup branch (speculant.drafters.lookup)
    # a stepper that runs steps ahead ran this one alone: slower than its γ costs in a run of steps
    # (speculant.calibrate leaves its time out)
    alone: bool = False
    target_logits: torch.Tensor | None = None  # [γ'+1, vocab]: raw logits behind target_probs (generic steps)
    # the lookup branch's length L (0: none or a miss) and how many of its first tokens the emitted
    # tokens begin with: --gamma auto learns the branch's reach from them (speculant.adaptive)
    lookup_drafted: int = 0
    lookup_reach: int = 0


class Stepper(Protocol):
    target: CausalLM
    # launches the next step before this one's output is read: wants `next_gamma` with each step
    runs_ahead: bool

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        """Start a request sampled with `params`: prefill the target (and the drafter) with prompt[:-1]."""
        ...

    def step(self, context: list[int], gamma: int, generator: torch.Generator | None, *, room: int,
             next_gamma: int | None = None, plain_tokens: int = 1) -> StepResult:
        """One step after `context` (prompt + committed output; the caches hold context[:-1]).

        gamma         draft length asked for (0: a plain step); the drafter may propose fewer
        room          the request may still emit room + 1 tokens (gamma <= room): a step launched
                      ahead must fit in it with this one
        next_gamma    the next step's γ, if already chosen (only a stepper that runs ahead uses it)
        plain_tokens  how many tokens a plain step may emit: more than one lets a stepper decode a
                      chunk in one call (plain decoding; tokens past a stop token are dropped)"""
        ...


class GenericStepper:
    """The eager step for any target and drafter (a hierarchy's levels included); on a target that
    scores trees (a lean model, bit-exact mode's ExactTarget: models.base.TreeCausalLM) a draft with
    candidates or a lookup branch is scored as one tree."""

    runs_ahead = False

    def __init__(self, target: CausalLM, drafter: Drafter, tail=None) -> None:
        """tail: how a chain step's tail runs after the target's forward (fused.GraphedTail: from CUDA
        graphs); None: op by op."""
        self.target = target
        self.drafter = drafter
        self.tail = tail
        self.params = SamplingParams()
        self.cached: list[int] = []  # the tokens in the target's cache, position-aligned

    def reset(self) -> None:
        """Forget the request: empty caches, the drafter reset."""
        self.target.truncate(0)
        self.drafter.reset()
        self.cached = []

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.reset()
        self.params = params
        if len(prompt) > 1:
            tokens = torch.tensor(prompt[:-1], device=self.target.device)
            self.target.prefill(tokens)
        self.cached = list(prompt[:-1])

    def follow(self, context: list[int], params: SamplingParams) -> None:
        """For a caller whose context may roll back between steps (a hierarchy's middle level sees the
        outer level's context): the target's cache keeps what it shares with context[:-1] and is fed
        the rest. The drafter is not reset: it reconciles its own state with the context it is shown."""
        self.params = params
        keep = min(common_prefix_length(self.cached, context), len(context) - 1)
        self.target.truncate(keep)
        if keep < len(context) - 1:
            self.target.forward(torch.tensor(context[keep:-1], device=self.target.device), keep)
        self.cached = list(context[:-1])

    def step(self, context: list[int], gamma: int, generator: torch.Generator | None, *, room: int | None = None,
             next_gamma: int | None = None, plain_tokens: int = 1) -> StepResult:
        result = speculative_step(self.target, self.drafter, context, gamma, self.params, generator, self.tail)
        self.cached = context + result.tokens[:-1]
        return result


def _timed(device: torch.device, fn, *args):
    """Run fn(*args) and return (result, seconds); waits for the device so times are honest."""
    start = time.perf_counter()
    result = fn(*args)
    synchronize(device)
    return result, time.perf_counter() - start


def speculative_step(
    target: CausalLM,
    drafter: Drafter,
    context: list[int],
    gamma: int,
    params: SamplingParams,
    generator: torch.Generator | None,
    tail=None,
) -> StepResult:
    """One draft -> verify -> accept -> truncate step. The target's cache must hold context[:-1];
    on return it holds context + the accepted drafts (the new token is fed by the next step).
    tail(params, logits, draft tokens, draft probs, uniforms) -> (target probs, [count, tokens]):
    a chain's transform, rule and emitted tokens in one call (fused.GraphedTail); None: op by op."""
    device = target.device
    draft, draft_time = _timed(device, _propose, drafter, context, gamma, params, generator)
    num_drafted = draft.tokens.shape[0]
    # a tree of γ·k candidates and/or the lookup branch, if the target can take one and its cache has the slots
    k = 1 if draft.alternatives is None else 1 + draft.alternatives.shape[1]
    size = 0 if draft.lookup is None else draft.lookup.shape[0]
    if isinstance(target, TreeCausalLM) and num_drafted and (k > 1 or draft.lookup is not None):
        fit_k, fit_size = tree_that_fits(len(context), num_drafted, k, size, target.max_seq_len)
        if draft.lookup is not None and fit_size < size:
            draft = draft._replace(lookup=None)  # no room for the lookup branch's slots: the tree without it
        if fit_k == k and (k > 1 or draft.lookup is not None):
            return _candidate_step(target, draft, context, params, generator, draft_time)

    def verify_draft():
        draft_tokens = draft.tokens.to(device)
        inputs = torch.cat([torch.tensor(context[-1:], device=device), draft_tokens])
        logits = target.forward(inputs, len(context) - 1)  # [γ'+1, vocab]
        uniforms = torch.rand(num_drafted + 1, generator=generator, device=device)
        target_probs, packed = (tail or chain_tail)(params, logits, draft_tokens, draft.probs, uniforms)
        out = packed.tolist()  # the step's one host synchronisation: how many were accepted, and the tokens
        return logits, target_probs, out[1:1 + out[0]]

    (logits, target_probs, tokens), target_time = _timed(device, verify_draft)
    num_accepted = len(tokens) - 1
    target.truncate(len(context) + num_accepted)  # rejected positions are simply forgotten
    return StepResult(tokens, num_drafted, num_accepted, target_probs, draft_time, target_time,
                      target_logits=logits)


def chain_tail(params: SamplingParams, target_logits: torch.Tensor, draft_tokens: torch.Tensor,
               draft_probs: torch.Tensor | None, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chain step's tail after the target's forward, op by op: target_logits [γ+1, V], draft_tokens
    [γ], draft_probs [γ, V] or None (a point mass), uniforms [γ+1] -> (the target's probs [γ+1, V],
    [count, emitted tokens [γ+1]]: the first `count` are emitted)."""
    gamma = draft_tokens.shape[0]
    target_probs = logits_to_probs(target_logits, params)
    verdict = verify(draft_tokens, draft_probs, target_probs, uniforms[:gamma], uniforms[gamma])
    emitted = emitted_tokens(draft_tokens[:, None], verdict.num_accepted, verdict.next_token)
    return target_probs, torch.cat([emitted.count.view(1), emitted.tokens])


def _candidate_step(target: TreeCausalLM, draft: Draft, context: list[int], params: SamplingParams,
                    generator: torch.Generator | None, draft_time: float) -> StepResult:
    """speculative_step for a draft with k candidates per position and/or a lookup branch: the target
    scores the tree of acceptance.candidate_tree in one forward; kept nodes off the chain move their
    cache slots to their positions."""
    device = target.device
    gamma = draft.tokens.shape[0]
    columns = [draft.tokens[:, None]] + ([] if draft.alternatives is None else [draft.alternatives])
    candidates = torch.cat(columns, 1).to(device)  # [γ, k]
    k = candidates.shape[1]
    if draft.alternatives is None:
        laws = None if draft.probs is None else draft.probs[:, None]
    else:
        laws = None if draft.alternative_probs is None else torch.cat([draft.probs[:, None], draft.alternative_probs], 1)
    lookup = None if draft.lookup is None else draft.lookup.to(device)  # [L]
    size = 0 if lookup is None else lookup.shape[0]
    start = len(context) - 1  # the root (the last committed token) sits at slot and position `start`

    def verify_tree():
        _, ancestors = candidate_tree(gamma, k, size)
        inputs = tree_tokens(torch.tensor(context[-1:], device=device), candidates, lookup)
        logits = target.forward(inputs, start, ancestors)  # [1 + γk + L, vocab]
        target_probs = logits_to_probs(logits, params)
        accept_uniforms = torch.rand(gamma, k, generator=generator, device=device)
        sample_uniforms = torch.rand(gamma + 1, generator=generator, device=device)
        lookup_uniforms = None if lookup is None else torch.rand(size, generator=generator, device=device)
        verdict = verify_candidates(candidates, laws, target_probs, accept_uniforms, sample_uniforms, lookup, size,
                                    lookup_uniforms)
        emitted = emitted_tokens(candidates, verdict.num_accepted, verdict.next_token, verdict.alternative, lookup,
                                 verdict.lookup_kept)
        # the step's one synchronisation: [count, chain kept, alternative, lookup kept, tokens, nodes]
        out = torch.cat([torch.stack([emitted.count, verdict.num_accepted, verdict.alternative, verdict.lookup_kept]),
                         emitted.tokens, emitted.nodes]).tolist()
        return logits, target_probs, out

    (logits, target_probs, out), target_time = _timed(device, verify_tree)
    count, num_accepted, alternative, lookup_kept = out[:4]
    depth = max(gamma, size)
    tokens, nodes = out[4:4 + count], out[5 + depth:5 + depth + count - 1]
    if count - 1 > num_accepted:  # a kept alternative or lookup run: its slots move to their positions
        target.move_slot(start + torch.tensor(nodes[num_accepted:], device=device),
                         start + torch.arange(num_accepted + 1, count, device=device))
    target.truncate(len(context) + count - 1)
    path = [0] + nodes  # the nodes whose law gave each emitted token
    # a step is as deep as its longer branch; α then counts the depths that kept a token
    return StepResult(tokens, depth, count - 1, target_probs[path], draft_time, target_time,
                      kept_alternative=bool(alternative), lookup_kept=lookup_kept, target_logits=logits[path],
                      lookup_drafted=size,
                      lookup_reach=0 if lookup is None else common_prefix_length(lookup.tolist(), tokens))


def _propose(drafter: Drafter, context: list[int], gamma: int, params, generator) -> Draft:
    if gamma <= 0:
        return Draft(torch.empty(0, dtype=torch.int64), None)
    return drafter.propose(context, gamma, params, generator)
