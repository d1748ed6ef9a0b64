"""The speculative decoding loop.

    prefill the target with prompt[:-1]
    repeat:
        draft γ tokens                       (drafter.propose, its own cache)
        one target forward over the γ+1 positions [last committed, x_1..x_γ]
        accept a prefix, draw one more token  (acceptance.verify)
        truncate the target cache to the committed length (rejected positions are just forgotten)
        commit, honouring stop tokens and max_new_tokens

`generate` is a generator: it yields a `Step` as soon as the step's tokens are fixed, so
streaming is free. A drafter that proposes nothing (`none`, or an n-gram miss) makes the step a
plain decoding step, so plain decoding is the same loop with γ = 0.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, NamedTuple, Protocol, Sequence

import torch

from speculant.acceptance import (alternative_node, candidate_tree, lookup_node, tree_that_fits, tree_tokens, verify,
                                  verify_candidates)
from speculant.analysis import expected_speedup
from speculant.drafters.base import Draft, Drafter
from speculant.models.base import CausalLM, ContextOverflowError
from speculant.models.transformer import LeanModel
from speculant.sampling import SamplingParams, logits_to_probs


class GammaPolicy(Protocol):
    """Chooses γ before each step and learns from what the step did (see speculant.adaptive). With
    a run-ahead stepper the next step's γ may be chosen before this step is observed; `asked` says
    which γ the observed step asked for, and `timed=False` that its time is not what that γ costs
    (a run-ahead stepper ran it alone)."""

    def choose(self) -> int: ...

    def observe(self, drafted: int, accepted: int, draft_time: float, target_time: float,
                asked: int | None = None, timed: bool = True) -> None: ...


@dataclass
class GenerationStats:
    """Counters of one request. `alpha` estimates the paper's α as accepted ÷ tested draft tokens
    (tokens after the first rejection of a step are never tested, so counting them would bias α
    down); `accepted_per_drafted` is accepted ÷ all drafted tokens."""

    gamma: int | str
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    alternatives_kept: int = 0  # steps whose last kept draft token was an alternative (--candidates)
    lookup_tokens: int = 0  # draft tokens kept from the lookup branch (--lookup)
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    gamma_history: list[int] = field(default_factory=list)  # γ chosen at each step
    prefill_time: float = 0.0
    draft_time: float = 0.0
    target_time: float = 0.0  # target forwards + acceptance, prefill excluded
    decode_time: float = 0.0  # wall time of the decoding loop, prefill excluded
    finish_reason: str = ""  # "stop", "length" (max_new_tokens) or "context" (model full)

    @property
    def alpha(self) -> float:
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else 0.0

    @property
    def accepted_per_drafted(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tau(self) -> float:
        """Tokens per target call."""
        return self.new_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    @property
    def cost_ratio(self) -> float:
        """c: time of one draft token ÷ time of one target call, as measured."""
        if not self.drafted or not self.target_calls or not self.target_time:
            return 0.0
        return (self.draft_time / self.drafted) / (self.target_time / self.target_calls)

    @property
    def mean_gamma(self) -> float:
        """Mean draft length actually proposed per step (a drafter may propose fewer than γ)."""
        return self.drafted / self.target_calls if self.target_calls else 0.0

    @property
    def predicted_speedup(self) -> float:
        """Thm 3.8 evaluated at the measured α, c and the mean draft length."""
        gamma = round(self.mean_gamma)
        if gamma == 0:
            return 1.0
        return expected_speedup(min(self.alpha, 1.0), gamma, self.cost_ratio)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_time + self.decode_time
        return self.new_tokens / total if total else 0.0

    def record(self, gamma: int, step: "StepResult") -> None:
        """Add one speculative step to the counters (tokens are counted by the caller)."""
        self.target_calls += step.target_calls
        self.drafted += step.num_drafted
        self.accepted += step.num_accepted
        self.rejections += int(step.num_accepted < step.num_drafted)
        self.alternatives_kept += int(step.kept_alternative)
        self.lookup_tokens += step.lookup_kept
        self.draft_time += step.draft_time
        self.target_time += step.target_time
        self.gamma_history.extend([gamma] * step.target_calls)
        while len(self.drafted_by_position) < step.num_drafted:
            self.drafted_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(step.num_drafted):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < step.num_accepted)

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("alpha", "accepted_per_drafted", "tau", "acceptance_by_position", "cost_ratio",
                     "mean_gamma", "predicted_speedup", "tokens_per_s"):
            out[name] = getattr(self, name)
        return out


class Step(NamedTuple):
    tokens: list[int]  # tokens fixed by this step (after stop / max-new-tokens trimming)
    num_drafted: int
    num_accepted: int
    stats: GenerationStats  # the running totals (the same object every step)
    # [len(tokens), vocab]: the target's raw logits (no sampling transform) at the position of each
    # token, for log-probabilities; None where a fused stepper ran the step (it keeps no logits)
    target_logits: torch.Tensor | None = None


def _check_request(prompt: Sequence[int], max_new_tokens: int, vocab_size: int, max_seq_len: int) -> None:
    if len(prompt) == 0:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range 0..{vocab_size - 1}: {bad[:5]}")
    if len(prompt) >= max_seq_len:
        raise ContextOverflowError(
            f"prompt of {len(prompt)} tokens does not fit the model's context of {max_seq_len} tokens "
            "(at least one position must stay free to generate)"
        )


def _timed(device: torch.device, fn, *args):
    """Run fn(*args) and return (result, seconds); waits for the device so times are honest."""
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def generate(
    target: CausalLM,
    drafter: Drafter,
    prompt: Sequence[int],
    *,
    gamma: int | GammaPolicy = 4,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 64,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    stepper=None,
) -> Iterator[Step]:
    """Speculative decoding of `prompt` (token ids). Yields one `Step` per target call.

    `stepper` (speculant.fused.FusedStepper) replaces `speculative_step` with whole-step CUDA
    graphs; it owns the caches of `target` and of the drafter's model."""
    policy = gamma if not isinstance(gamma, int) else None
    if policy is None and gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    _check_request(prompt, max_new_tokens, target.vocab_size, target.max_seq_len)
    stats = GenerationStats(gamma=gamma if policy is None else "auto", prompt_tokens=len(prompt))
    device = target.device
    stop = set(int(t) for t in stop_ids)
    context = [int(t) for t in prompt]

    start = time.perf_counter()
    if stepper is not None:
        stepper.begin(context, params)
    else:
        target.truncate(0)
        drafter.reset()
        if len(context) > 1:
            prompt_tokens = torch.tensor(context[:-1], device=device)
            # a model that can fill its cache without computing logits says so with `prefill`
            prefill = getattr(target, "prefill", None)
            prefill(prompt_tokens) if prefill is not None else target.forward(prompt_tokens, 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.prefill_time = time.perf_counter() - start

    start = time.perf_counter()
    while stats.new_tokens < max_new_tokens:
        if len(context) >= target.max_seq_len:
            stats.finish_reason = "context"
            break
        # Never draft past what may still be emitted (max_new_tokens) or stored (the context): a step
        # emits up to γ+1 tokens, and the sequence holds at most max_seq_len (as in reference.py).
        room = min(max_new_tokens - stats.new_tokens - 1, target.max_seq_len - len(context) - 1)
        # a stepper that ran ahead has chosen this step's γ already (and launched the step if it could)
        launched = stepper.launched_gamma(len(context)) if stepper is not None else None
        step_gamma = min(launched if launched is not None else policy.choose() if policy else gamma, room)
        if stepper is not None:
            # plain decoding may run several target calls per step (one graph replay for a chunk), and
            # speculative steps several per replay when all they may emit still fits (`room`); under a
            # policy, a stepper that launches the next step ahead asks `choose` for its γ
            plain_tokens = room + 1 if policy is None and gamma == 0 else 1
            results = stepper.steps(context, step_gamma, generator, plain_tokens=plain_tokens, room=room,
                                    choose=policy.choose if policy else None)
        else:
            results = [speculative_step(target, drafter, context, step_gamma, params, generator)]
        for step in results:
            stats.record(step_gamma, step)
            if policy:
                # a step run alone where steps run ahead (a request's first, one cut to the room left,
                # one after a plain step) is 5-15 % slower than its γ costs when chosen: acceptance only
                policy.observe(step.num_drafted, step.num_accepted, step.draft_time, step.target_time,
                               asked=step_gamma, timed=not step.alone)

            emitted = []
            for token in step.tokens:
                emitted.append(token)
                if token in stop:
                    stats.finish_reason = "stop"
                    break
                if stats.new_tokens + len(emitted) == max_new_tokens:
                    break
            context.extend(emitted)
            stats.new_tokens += len(emitted)
            stats.decode_time = time.perf_counter() - start
            logits = None if step.target_logits is None else step.target_logits[:len(emitted)]
            yield Step(emitted, step.num_drafted, step.num_accepted, stats, logits)
            if stats.finish_reason:
                return
            if stats.new_tokens >= max_new_tokens:
                break
    stats.finish_reason = stats.finish_reason or "length"
    stats.decode_time = time.perf_counter() - start


class StepResult(NamedTuple):
    tokens: list[int]  # accepted drafts + the recovered/bonus token: 1..γ'+1 tokens
    num_drafted: int
    num_accepted: int
    target_probs: torch.Tensor  # [γ'+1, vocab]: the target's law at each position of the step
    draft_time: float
    target_time: float
    target_calls: int = 1  # a fused plain step may decode several tokens, one target call each
    kept_alternative: bool = False  # the last kept draft token was an alternative, not the chain's
    lookup_kept: int = 0  # draft tokens kept from the lookup branch (speculant.drafters.lookup)
    alone: bool = False  # a stepper that runs steps ahead ran this one alone: its time is not typical
    target_logits: torch.Tensor | None = None  # [γ'+1, vocab]: raw logits behind target_probs (generic steps)


def speculative_step(
    target: CausalLM,
    drafter: Drafter,
    context: list[int],
    gamma: int,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> StepResult:
    """One draft -> verify -> accept -> truncate step. The target's cache must hold context[:-1];
    on return it holds context + the accepted drafts (the new token is fed by the next step)."""
    device = target.device
    draft, draft_time = _timed(device, _propose, drafter, context, gamma, params, generator)
    num_drafted = draft.tokens.shape[0]
    # a tree of γ·k candidates and/or the lookup branch, if the target can take one and its cache has the slots
    k = 1 if draft.alternatives is None else 1 + draft.alternatives.shape[1]
    size = 0 if draft.lookup is None else draft.lookup.shape[0]
    if isinstance(target, LeanModel) and num_drafted and (k > 1 or draft.lookup is not None):
        fit_k, fit_size = tree_that_fits(len(context), num_drafted, k, size, target.max_seq_len)
        if draft.lookup is not None and fit_size < size:
            draft = draft._replace(lookup=None)  # no room for the lookup branch's slots: the tree without it
        if fit_k == k and (k > 1 or draft.lookup is not None):
            return _candidate_step(target, draft, context, params, generator, draft_time)

    def verify_draft():
        draft_tokens = draft.tokens.to(device)
        inputs = torch.cat([torch.tensor(context[-1:], device=device), draft_tokens])
        logits = target.forward(inputs, len(context) - 1)  # [γ'+1, vocab]
        target_probs = logits_to_probs(logits, params)
        uniforms = torch.rand(num_drafted + 1, generator=generator, device=device)
        verdict = verify(draft_tokens, draft.probs, target_probs, uniforms[:-1], uniforms[-1])
        # the step's one host synchronisation: how many were accepted, and the next token
        return logits, target_probs, int(verdict.num_accepted), int(verdict.next_token)

    (logits, target_probs, num_accepted, next_token), target_time = _timed(device, verify_draft)
    target.truncate(len(context) + num_accepted)  # rejected positions are simply forgotten
    tokens = draft.tokens[:num_accepted].tolist() + [next_token]
    return StepResult(tokens, num_drafted, num_accepted, target_probs, draft_time, target_time,
                      target_logits=logits)


def _candidate_step(target: LeanModel, draft: Draft, context: list[int], params: SamplingParams,
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
        return logits, target_probs, [int(x) for x in verdict]  # the step's one synchronisation

    (logits, target_probs, (num_accepted, alternative, next_token, lookup_kept)), target_time = _timed(
        device, verify_tree)
    tokens = candidates[:num_accepted, 0].tolist()
    path = list(range(num_accepted + 1))  # the nodes whose law gave each emitted token
    if alternative:
        node = alternative_node(gamma, k, num_accepted, alternative)
        target.move_slot(start + node, start + num_accepted + 1)
        tokens.append(int(candidates[num_accepted, alternative]))
        path.append(node)
    if lookup_kept:  # the lookup run after the chain's num_accepted tokens: one block of slots
        nodes = lookup_node(gamma, k, torch.arange(num_accepted, num_accepted + lookup_kept))
        target.move_slot(start + nodes.to(device), start + torch.arange(num_accepted + 1, num_accepted + 1 + lookup_kept,
                                                                        device=device))
        tokens += lookup[num_accepted:num_accepted + lookup_kept].tolist()
        path += nodes.tolist()
    target.truncate(len(context) + len(tokens))
    # a step is as deep as its longer branch; α then counts the depths that kept a token
    return StepResult(tokens + [next_token], max(gamma, size), len(tokens), target_probs[path], draft_time,
                      target_time, kept_alternative=bool(alternative), lookup_kept=lookup_kept,
                      target_logits=logits[path])


def _propose(drafter: Drafter, context: list[int], gamma: int, params, generator) -> Draft:
    if gamma <= 0:
        return Draft(torch.empty(0, dtype=torch.int64), None)
    return drafter.propose(context, gamma, params, generator)

