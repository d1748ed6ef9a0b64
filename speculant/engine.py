"""The speculative decoding loop, over a Stepper (speculant.step).

    stepper.begin(prompt)                  prefill the caches with prompt[:-1]
    repeat:
        choose γ                           a fixed int, or a policy (speculant.adaptive)
        stepper.step(context, γ)           draft -> verify in one target forward -> accept -> truncate
        commit                             honouring stop tokens and max_new_tokens

`generate` is a generator: it yields a `Step` as soon as the step's tokens are fixed, so
streaming is free. A drafter that proposes nothing (`none`, or an n-gram miss) makes the step a
plain decoding step, so plain decoding is the same loop with γ = 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

import torch

from speculant.analysis import GenerationStats
from speculant.drafters.base import Drafter
from speculant.models.base import CausalLM, ContextOverflowError, synchronize
from speculant.sampling import SamplingParams
from speculant.step import GenericStepper, Stepper


class GammaPolicy(Protocol):
    """Chooses γ before each step and learns from what the step drafted and kept, never from its time
    (see speculant.adaptive: step costs come from a fixed table, so the choices are reproducible).
    With a run-ahead stepper the next step's γ is chosen before this step is observed; `asked` says
    which γ the observed step asked for, `lookup` and `lookup_reach` how long its lookup branch was
    and how far the emitted tokens followed it."""

    def choose(self) -> int: ...

    def observe(self, drafted: int, accepted: int, asked: int | None = None, lookup: int = 0,
                lookup_reach: int = 0) -> None: ...


class Step(NamedTuple):
    tokens: list[int]  # tokens fixed by this step (after stop / max-new-tokens trimming)
    num_drafted: int
    num_accepted: int
    stats: GenerationStats  # the running totals (the same object every step)
    # [len(tokens), vocab]: the target's raw logits (no sampling transform) at the position of each
    # token, for log-probabilities; None where a fused stepper ran the step (it keeps no logits)
    target_logits: torch.Tensor | None = None


def check_request(prompt: Sequence[int], max_new_tokens: int, vocab_size: int, max_seq_len: int) -> None:
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


def generate(
    target: CausalLM,
    drafter: Drafter,
    prompt: Sequence[int],
    *,
    gamma: int | GammaPolicy = 4,
    params: SamplingParams = SamplingParams(),  # noqa: B008  (frozen: one shared default is safe)
    max_new_tokens: int = 64,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    stepper: Stepper | None = None,
) -> Iterator[Step]:
    """Speculative decoding of `prompt` (token ids) by `target` with `drafter`. Yields one `Step`
    per target call. `stepper` runs the steps (speculant.fused.FusedStepper: whole-step CUDA
    graphs over the same target and drafter); by default a GenericStepper(target, drafter)."""
    yield from decode(stepper if stepper is not None else GenericStepper(target, drafter), prompt, gamma=gamma,
                      params=params, max_new_tokens=max_new_tokens, stop_ids=stop_ids, generator=generator)


def decode(stepper: Stepper, prompt: Sequence[int], *, gamma: int | GammaPolicy = 4,
           params: SamplingParams = SamplingParams(),  # noqa: B008  (frozen: one shared default is safe)
           max_new_tokens: int = 64, stop_ids: Sequence[int] = (),
           generator: torch.Generator | None = None) -> Iterator[Step]:
    """The loop of `generate` over a stepper."""
    policy = gamma if not isinstance(gamma, int) else None
    if policy is None and gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    target = stepper.target
    check_request(prompt, max_new_tokens, target.vocab_size, target.max_seq_len)
    stats = GenerationStats(gamma=gamma if policy is None else "auto", prompt_tokens=len(prompt))
    stop = {int(t) for t in stop_ids}
    context = [int(t) for t in prompt]

    start = time.perf_counter()
    stepper.begin(context, params)
    synchronize(target.device)
    stats.prefill_time = time.perf_counter() - start

    start = time.perf_counter()
    chosen_ahead = None  # under a policy, for a stepper that runs ahead: the next step's γ, chosen already
    while stats.new_tokens < max_new_tokens:
        if len(context) >= target.max_seq_len:
            stats.finish_reason = "context"
            break
        # Never draft past what may still be emitted (max_new_tokens) or stored (the context): a step
        # emits up to γ+1 tokens, and the sequence holds at most max_seq_len (as in reference.py).
        room = min(max_new_tokens - stats.new_tokens - 1, target.max_seq_len - len(context) - 1)
        if policy is None:
            step_gamma, next_gamma = min(gamma, room), gamma
        else:
            step_gamma = min(chosen_ahead if chosen_ahead is not None else policy.choose(), room)
            # a stepper that launches the next step before it reads this one needs that step's γ now,
            # before this step is observed (the policy's choices then lag its evidence by one step)
            chosen_ahead = next_gamma = policy.choose() if stepper.runs_ahead else None
        # a plain step may decode a chunk of tokens in one call (a fused stepper: one graph replay), under
        # `auto` too: its γ 0 is priced per token of such a chunk (speculant.calibrate)
        plain_tokens = room + 1 if step_gamma == 0 else 1
        step = stepper.step(context, step_gamma, generator, room=room, next_gamma=next_gamma,
                            plain_tokens=plain_tokens)
        stats.record(step_gamma, step)
        if policy:
            policy.observe(step.num_drafted, step.num_accepted, asked=step_gamma, lookup=step.lookup_drafted,
                           lookup_reach=step.lookup_reach)

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
    stats.finish_reason = stats.finish_reason or "length"
    stats.decode_time = time.perf_counter() - start
