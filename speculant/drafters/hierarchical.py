"""Hierarchical drafting: a drafter that is itself a speculative engine (the paper's §6 idea).

    target  <- drafted by  SpeculativeDrafter(GenericStepper(middle model, inner drafter))
    middle  <- drafted by  inner drafter (n-gram lookup, the middle's first layers, a smaller model,
                           or another SpeculativeDrafter: any depth)

Why it stays exact. The outer acceptance rule needs, for each draft token x_i, the law q_i it was
drawn from given the tokens before it. Speculative sampling of the middle model M is itself exact:
the token sequence it produces has exactly M's autoregressive law, whatever the inner drafter
proposes (that is the theorem this library tests). So, conditionally on the prefix, x_i ~ M(·|prefix),
and M(·|prefix) is precisely row i of the middle model's verification pass, which this drafter
returns as `probs`. The inner drafter's own q never reaches the outer level; the outer level sees
"a drafter that samples from M", which is the plain model drafter's situation. Truncating the
produced run to γ tokens keeps the law of the first γ tokens. Each level draws its randomness from
the same generator, but independently of the outer level's uniforms, which are drawn after the
draft is fixed.

The middle level's steps are run by a stepper it is given (speculant.step.GenericStepper over the
middle model and the inner drafter): drafters sit below the step in the layers, so this module
does not import it.

Cost: each call runs the middle model about γ / τ_inner times instead of γ times (τ_inner = tokens
per middle call), and the inner drafter's work besides.
"""

from __future__ import annotations

import torch

from speculant.analysis import GenerationStats
from speculant.drafters.base import Draft
from speculant.sampling import SamplingParams


class SpeculativeDrafter:
    def __init__(self, stepper, inner_gamma: int = 4) -> None:
        """stepper: a speculant.step.GenericStepper over the middle model and the inner drafter."""
        if inner_gamma < 1:
            raise ValueError(f"inner_gamma must be >= 1, got {inner_gamma}")
        self.stepper = stepper
        self.model = stepper.target  # the middle model
        self.inner = stepper.drafter
        self.inner_gamma = inner_gamma
        self.vocab_size = self.model.vocab_size
        self.stats = GenerationStats(gamma=inner_gamma)  # this level's α, τ over the request

    def reset(self) -> None:
        self.stepper.reset()
        self.stats = GenerationStats(gamma=self.inner_gamma)

    def propose(self, context: list[int], gamma: int, params: SamplingParams, generator) -> Draft:
        self.stepper.follow(context, params)  # the middle model's cache must hold context[:-1]
        local = list(context)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        while len(tokens) < gamma:
            room = min(gamma - len(tokens) - 1, self.model.max_seq_len - len(local))
            step_gamma = min(self.inner_gamma, room)
            step = self.stepper.step(local, step_gamma, generator, room=room)
            self.stats.record(step_gamma, step)
            self.stats.new_tokens += len(step.tokens)
            tokens.extend(step.tokens)
            probs.append(step.target_probs[: step.num_accepted + 1])  # M's law at each emitted position
            local.extend(step.tokens)
        return Draft(
            torch.tensor(tokens[:gamma], dtype=torch.int64, device=self.model.device),
            torch.cat(probs)[:gamma],
        )
