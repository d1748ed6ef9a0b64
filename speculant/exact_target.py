"""Bit-exact mode for the generic step: the target seen through the fused step's exact forward.

A hierarchy (`--draft A --draft B`), a draft model that runs through transformers and the steps that
keep logits (logprobs) run the generic step (speculant.step.GenericStepper), which calls the target's
forward(tokens, start_pos[, ancestors]). `ExactTarget` is a CausalLM over a lean model whose every
call is the one a FusedStepper(bit_exact=True) makes (`score`): EXACT_WIDTH rows, padded, through the
shared compiled `exact_forward`, each row walking its own keys in position order
(speculant.models.exact_attention), in pieces of EXACT_WIDTH tokens for a longer chain; its prefill
is that stepper's own (`FusedStepper.prefill`). Plain bit-exact decoding runs the same stepper, so a
position's logits are the same bits in plain decoding and in any step the generic step runs over
ExactTarget (tests/test_bit_exact_generic.py), and greedy output is plain greedy output token for
token. The drafter's own models (a hierarchy's middle levels) are not wrapped: a draft only proposes,
and the target's logits decide every emitted token.

    >>> plain = FusedStepper(target, None, bit_exact=True)                   # doctest: +SKIP
    >>> stepper = GenericStepper(ExactTarget(plain), hierarchy)              # doctest: +SKIP
"""

from __future__ import annotations

import torch

from speculant.fused import FusedStepper
from speculant.models.base import check_fits
from speculant.models.exact_attention import EXACT_WIDTH


class ExactTarget:
    """A TreeCausalLM (speculant.models.base): `stepper.target`, a LeanModel, whose every forward runs
    `stepper`'s bit-exact forward. The model's cache is the one it writes; its length is kept through
    the cache-length API (set_length, truncate)."""

    def __init__(self, stepper: FusedStepper) -> None:
        if not stepper.bit_exact:
            raise ValueError("ExactTarget runs a bit-exact stepper's forward: FusedStepper(..., bit_exact=True)")
        self.stepper = stepper
        self.model = stepper.target
        self.vocab_size, self.max_seq_len, self.device = self.model.vocab_size, self.model.max_seq_len, self.model.device
        self.layouts: dict[bytes, tuple[torch.Tensor, ...]] = {}  # a tree's layout, by its ancestors' bytes

    @property
    def length(self) -> int:
        return self.model.length

    def truncate(self, length: int) -> None:
        self.model.truncate(length)

    def prefill(self, tokens: torch.Tensor) -> None:
        """tokens [T] -> None: the stepper's prefill (the one its plain decoding starts from)."""
        self.stepper.prefill(tokens.tolist())

    def move_slot(self, source: int | torch.Tensor, dest: int | torch.Tensor) -> None:
        self.model.move_slot(source, dest)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, ancestors: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [T] at positions start_pos.. -> logits [T, vocab] float32, as LeanModel.forward (a
        tree with `ancestors` [T, T] bool: at most EXACT_WIDTH nodes), in calls of EXACT_WIDTH rows."""
        t = tokens.shape[0]
        if start_pos > self.length:
            raise ValueError(f"gap in the cache: start_pos {start_pos} > length {self.length}")
        check_fits(self.model, start_pos + t)
        tokens = tokens.to(self.device)
        if ancestors is None:  # a chain: piece i from position start_pos + i·W reads the pieces before it
            logits = torch.cat([self.stepper.score(tokens[i:i + EXACT_WIDTH],
                                                   torch.tensor(start_pos + i, device=self.device))
                                for i in range(0, t, EXACT_WIDTH)])
        else:
            ancestors = ancestors.cpu()
            key = ancestors.numpy().tobytes()  # T·T bytes: T is in the key too
            if key not in self.layouts:
                self.layouts[key] = self.stepper.layout_of(ancestors.sum(-1) - 1, ancestors)
            logits = self.stepper.exact_score(tokens, torch.tensor(start_pos, device=self.device), self.layouts[key])
        self.model.set_length(start_pos + t)
        return logits
