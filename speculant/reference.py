"""Plain autoregressive sampling, slow and obviously correct: the oracle for the fast path.

Each token re-reads the whole sequence from position 0 (no cache reuse), takes the last
position's logits through the same `logits_to_probs`, and draws with `sample_from`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from speculant.models.base import CausalLM
from speculant.sampling import SamplingParams, logits_to_probs, sample_from


def reference_generate(
    model: CausalLM,
    prompt: Sequence[int],
    *,
    params: SamplingParams = SamplingParams(),  # noqa: B008  (frozen: one shared default is safe)
    max_new_tokens: int = 64,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[int]:
    tokens = [int(t) for t in prompt]
    out: list[int] = []
    while len(out) < max_new_tokens and len(tokens) < model.max_seq_len:
        model.truncate(0)
        logits = model.forward(torch.tensor(tokens, device=model.device), 0)[-1]
        probs = logits_to_probs(logits, params)
        token = int(sample_from(probs, torch.rand((), generator=generator, device=model.device)))
        tokens.append(token)
        out.append(token)
        if token in stop_ids:
            break
    return out
