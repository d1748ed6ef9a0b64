"""Verification of a draft: Leviathan, Kalman & Matias (2023), Algorithm 1, as pure functions.

Glossary
--------
draft tokens     x_1..x_γ proposed by the drafter; x_i was sampled from q_i = draft_probs[i].
                 A deterministic drafter (n-gram lookup) passes draft_probs=None: q_i is then a
                 point mass on x_i, which is exactly the law it "sampled" from.
target_probs     p_1..p_{γ+1}: the target's distributions at the γ+1 positions, from ONE forward
                 pass over [last committed token, x_1..x_γ]; p_{γ+1} follows x_γ.
accepted         x_i is kept with probability min(1, p_i(x_i) / q_i(x_i)), tested in order until
                 the first rejection. Implemented as `u_i * q_i(x_i) < p_i(x_i)` so that
                 q_i(x_i) = 0 (never sampled) and p == q give no division and no NaN.
recovered        at the first rejection (position n), one token drawn from
                 norm(max(0, p_n − q_n)); the "residual" distribution.
bonus            if all γ are accepted, one token drawn from p_{γ+1}.

Either way a step emits n accepted tokens plus one more (recovered or bonus): between 1 and γ+1
tokens per target call, and every emitted token follows the target's law exactly. The random
draws are arguments (`accept_uniforms`, `sample_uniform`), so the whole rule is a deterministic
function that tests can drive, and it runs on the device without host synchronisation: only
`num_accepted` ever needs to be read back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from speculant.sampling import sample_from

# Residual mass at or below this counts as "no residual": p <= q everywhere (p == q up to
# rounding). Then a rejection has probability ~0, and p itself is the safe distribution.
_EMPTY_RESIDUAL = 1e-12


class Verdict(NamedTuple):
    num_accepted: torch.Tensor  # [] int64, 0..γ, on the device of the inputs
    next_token: torch.Tensor  # [] int64: recovered token if num_accepted < γ, else bonus token


def point_mass(tokens: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The law of a deterministic drafter: one-hot rows. tokens [γ] -> [γ, vocab_size].
    Built by scatter: one_hot validates its input on the host, a device sync on CUDA."""
    rows = torch.zeros(tokens.shape[0], vocab_size, dtype=dtype, device=tokens.device)
    return rows.scatter(-1, tokens[:, None], 1.0)


def acceptance_probs(
    draft_tokens: torch.Tensor,  # [γ] int64
    draft_probs: torch.Tensor,  # [γ, vocab]
    target_probs: torch.Tensor,  # [γ(+1), vocab]; extra rows ignored
) -> torch.Tensor:
    """min(1, p_i(x_i) / q_i(x_i)) for each draft position: [γ]. 1 where q_i(x_i) = 0 < p_i(x_i)."""
    gamma = draft_tokens.shape[0]
    p_x = target_probs[:gamma].gather(-1, draft_tokens[:, None]).squeeze(-1)
    q_x = draft_probs.gather(-1, draft_tokens[:, None]).squeeze(-1)
    ratio = torch.where(q_x > 0, p_x / q_x.clamp_min(torch.finfo(q_x.dtype).tiny), (p_x > 0).to(p_x.dtype))
    return ratio.clamp(max=1.0)


def residual_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)) row by row: [..., vocab]. Where the residual is empty (p == q), p."""
    residual = (target_probs - draft_probs).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    empty = mass <= _EMPTY_RESIDUAL
    return torch.where(empty, target_probs, residual / torch.where(empty, 1.0, mass))


def verify(
    draft_tokens: torch.Tensor,  # [γ] int64, γ >= 0
    draft_probs: torch.Tensor | None,  # [γ, vocab], or None for a deterministic drafter
    target_probs: torch.Tensor,  # [γ + 1, vocab]
    accept_uniforms: torch.Tensor,  # [γ] in [0, 1)
    sample_uniform: torch.Tensor,  # [] in [0, 1): drives the recovered / bonus draw
) -> Verdict:
    """Accept a prefix of the draft and draw the next token (recovered or bonus).

    >>> import torch
    >>> p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    >>> q = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    >>> x = torch.tensor([0])
    >>> # accept with probability min(1, 0.5/1) = 0.5: u = 0.3 accepts, then the bonus is token 2
    >>> [int(t) for t in verify(x, q, p, torch.tensor([0.3]), torch.tensor(0.9))]
    [1, 2]
    >>> # u = 0.7 rejects; the residual norm(max(0, p - q)) is a point mass on token 1
    >>> [int(t) for t in verify(x, q, p, torch.tensor([0.7]), torch.tensor(0.1))]
    [0, 1]
    """
    gamma = draft_tokens.shape[0]
    vocab = target_probs.shape[-1]
    if draft_probs is None:
        draft_probs = point_mass(draft_tokens, vocab, target_probs.dtype)
    p_x = target_probs[:gamma].gather(-1, draft_tokens[:, None]).squeeze(-1)  # [γ]
    q_x = draft_probs.gather(-1, draft_tokens[:, None]).squeeze(-1)  # [γ]
    accepted = accept_uniforms * q_x < p_x  # [γ] bool: u < p/q without dividing
    num_accepted = accepted.to(torch.int64).cumprod(0).sum()  # length of the accepted prefix

    # Row n of `next_probs` is the law of the token after n accepted drafts: the residual at a
    # rejection (n < γ), the target itself after full acceptance (n == γ).
    next_probs = torch.cat([residual_probs(target_probs[:gamma], draft_probs), target_probs[gamma:]])
    next_token = sample_from(next_probs.index_select(0, num_accepted.view(1))[0], sample_uniform)
    return Verdict(num_accepted, next_token)
