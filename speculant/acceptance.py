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
    greedy: bool = False,  # p and q point masses (greedy decoding): every next law is one; its argmax is the draw
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
    next_token = sample_from(next_probs.index_select(0, num_accepted.view(1))[0], sample_uniform, greedy)
    return Verdict(num_accepted, next_token)


# ---- several requests' rows at once (speculant.batching) ------------------------------------


class RowVerdict:
    """verify_rows' result: num_accepted [B] int64 and next_token [B] int64."""

    def __init__(self, num_accepted: torch.Tensor, next_token: torch.Tensor) -> None:
        self.num_accepted, self.next_token = num_accepted, next_token


def verify_rows(
    draft_tokens: torch.Tensor,  # [B, W] int64; row b's first counts[b] are its draft
    draft_probs: torch.Tensor | None,  # [B, W, vocab], or None for a deterministic drafter
    target_probs: torch.Tensor,  # [B, W + 1, vocab]: row b's laws at its counts[b] + 1 positions first
    accept_uniforms: torch.Tensor,  # [B, W] in [0, 1); past counts[b] unused
    sample_uniforms: torch.Tensor,  # [B] in [0, 1)
    counts: torch.Tensor,  # [B] int64, 0..W
    greedy: bool = False,  # every law a point mass (greedy rows): the argmax draws what sample_from would
) -> RowVerdict:
    """acceptance.verify for every row at once: row b gets what verify(draft_tokens[b, :n],
    draft_probs[b, :n], target_probs[b, :n+1], accept_uniforms[b, :n], sample_uniforms[b]) gives, n =
    counts[b] (tests/test_batching.py pins the equality). Positions past a row's count are never
    accepted, and the law after n accepted tokens is p_{n+1} there (the bonus)."""
    rows, width = draft_tokens.shape
    if draft_probs is None:
        draft_probs = torch.zeros(target_probs[:, :width].shape, dtype=target_probs.dtype,
                                  device=target_probs.device).scatter(-1, draft_tokens[..., None], 1.0)
    p_x = target_probs[:, :width].gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, W]
    q_x = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, W]
    drafted = torch.arange(width, device=counts.device)[None, :] < counts[:, None]  # [B, W]
    accepted = (accept_uniforms * q_x < p_x) & drafted
    num_accepted = accepted.to(torch.int64).cumprod(1).sum(1)  # [B]
    # row i of next_probs: the residual at a rejection of draft i, p_i where row b drafted fewer
    residual = torch.where(drafted[..., None], residual_probs(target_probs[:, :width], draft_probs),
                           target_probs[:, :width])
    next_probs = torch.cat([residual, target_probs[:, width:width + 1]], 1)  # [B, W + 1, vocab]
    law = next_probs[torch.arange(rows, device=counts.device), num_accepted]  # [B, vocab]
    # greedy: a rejected point mass's residual is p's point mass (p and q differ), and p itself
    # is one past a row's drafts: every law is a point mass
    return RowVerdict(num_accepted, sample_from(law, sample_uniforms, greedy))


# ---- several candidates per position ------------------------------------------------------------
#
# A drafter may propose k candidates at each of γ depths: column 0 is the chain it continues
# (x_1..x_γ, each drawn from its law as above), columns 1..k-1 are alternatives at the same depth,
# leaves of the tree (the draft is not run on them). The target scores the whole tree in one forward
# pass, the nodes laid out by `candidate_tree`. At each depth the candidates are tried in order by
# recursive rejection sampling: candidate j was drawn from q_j given candidates 0..j-1 (the draft's law
# with the earlier ones removed and renormalised, for draws without replacement; a point mass for a
# deterministic choice); it is kept with probability min(1, r_j(c_j) / q_j(c_j)) where r_0 = p, and
# after a rejection r_{j+1} = norm(max(0, r_j − q_j)). Each round is one step of the rule above
# applied to the law still owed (r_j), so the token emitted at a depth follows p exactly whatever the
# candidates are, as long as q_j is the law candidate j was really drawn from given the ones before.
# If no candidate is kept, the token comes from r_k. A kept chain token moves on to the next depth; a
# kept alternative ends the step, followed by a bonus token drawn from the target at that node.
#
# A lookup branch: a deterministic continuation n_1..n_L (prompt lookup), scored in the same forward
# as a branch of its own from the root. It is grafted where it leaves the chain: with n_1..n_g equal to
# the chain's first g tokens (g <= γ), n_{g+1} is one more candidate at depth g+1, tried right after
# the chain token there (a point mass: kept with probability r(n_{g+1})), and depth γ+1 — after the
# whole chain — has it as its only candidate. Once n_{g+1} is kept, n_{g+2}.. are tried as a chain
# (`verify` with point masses) against the target's laws at the branch's own nodes, and the step ends
# with their recovered or bonus token. Whether a depth gets the lookup candidate depends only on the
# path to it, never on the draws at that depth, so the rule stays exact; and with greedy decoding it
# emits the longest path of the tree that greedy decoding would take.


def candidate_tree(gamma: int, k: int, lookup: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout of the 1 + γ·k (+ lookup) nodes the target scores: node 0 is the last committed token,
    nodes 1..γ the chain (node d at depth d), then the alternatives depth by depth (depth d, column
    j >= 1 at node 1 + γ + (d-1)(k-1) + (j-1)), each a child of chain node d-1, then the lookup
    branch (its token i at node γ·k + i, depth i, a chain of its own from the root).

    Returns depths [N] int64 (the position offset of each node) and ancestors [N, N] bool (row i:
    the nodes node i attends to, itself included)."""
    n = 1 + gamma * k + lookup
    parents = (list(range(-1, gamma)) + [d for d in range(gamma) for _ in range(k - 1)]
               + [0] + list(range(1 + gamma * k, gamma * k + lookup)))[:n]
    depths, ancestors = [0] * n, torch.zeros(n, n, dtype=torch.bool)
    for node in range(n):
        ancestors[node, node] = True
        if parents[node] >= 0:
            depths[node] = depths[parents[node]] + 1
            ancestors[node] |= ancestors[parents[node]]
    return torch.tensor(depths), ancestors


def tree_that_fits(context_length: int, gamma: int, k: int, lookup: int, max_seq_len: int) -> tuple[int, int]:
    """(k, G) of the tree a step may score: its 1 + γk + G nodes sit in cache slots from the
    context's last position on, so the lookup branch goes first when it does not fit, then the
    alternatives (k = 1: a chain)."""
    if context_length + gamma * k > max_seq_len:
        return 1, 0
    return k, lookup if context_length + gamma * k + lookup <= max_seq_len else 0


def alternative_node(gamma: int, k: int, kept, column):
    """The node (in candidate_tree(γ, k)) of the alternative in `column` >= 1 at the depth after
    `kept` chain tokens. Ints or tensors."""
    return 1 + gamma + kept * (k - 1) + column - 1


def lookup_node(gamma: int, k: int, index):
    """The node (in candidate_tree(γ, k, lookup)) of the lookup branch's token n_{index+1}."""
    return 1 + gamma * k + index


def tree_tokens(root: torch.Tensor, candidates: torch.Tensor, lookup: torch.Tensor | None = None) -> torch.Tensor:
    """The target's input for candidate_tree: root [1] (the last committed token), candidates
    [γ, k] (and the lookup branch [L]) -> [1 + γ·k (+ L)], the chain first, then the alternatives
    depth by depth, then the lookup branch."""
    parts = [root, candidates[:, 0], candidates[:, 1:].reshape(-1)]
    return torch.cat(parts if lookup is None else parts + [lookup])


class CandidateVerdict(NamedTuple):
    num_accepted: torch.Tensor  # [] int64, 0..γ: chain tokens kept
    alternative: torch.Tensor  # [] int64: column j >= 1 kept at depth num_accepted + 1, or 0 if none
    next_token: torch.Tensor  # [] int64: recovered token, or bonus after the last kept token
    lookup_kept: torch.Tensor  # [] int64: lookup tokens kept after the chain's num_accepted (0 if none)


def verify_candidates(
    candidates: torch.Tensor,  # [γ, k] int64; column 0 is the chain
    candidate_probs: torch.Tensor | None,  # [γ, k, vocab]: law of candidate j given 0..j-1; None = point masses
    target_probs: torch.Tensor,  # [1 + γ·k (+ G), vocab] at the nodes of candidate_tree(γ, k, G)
    accept_uniforms: torch.Tensor,  # [γ, k] in [0, 1)
    sample_uniforms: torch.Tensor,  # [γ + 1] in [0, 1): the draw after the step's last kept token
    lookup: torch.Tensor | None = None,  # [G] int64: the lookup branch, its first `lookup_length` valid
    lookup_length: torch.Tensor | int = 0,  # [] int64 or int, 0..G
    lookup_uniforms: torch.Tensor | None = None,  # [G] in [0, 1)
    greedy: bool = False,  # every law a point mass (greedy decoding): the next token is its argmax
) -> CandidateVerdict:
    """Keep a prefix of the chain, then maybe one alternative or a run of the lookup branch, and draw
    one more token. With k = 1 and no lookup this is `verify` (same decisions for the same uniforms).
    A candidate whose own law gives it probability 0 (draws without replacement past the end of a
    small support) is never kept.

    All depths are processed at once (their uniforms are independent), then the first depth whose
    chain token was not kept decides the step: no host synchronisation."""
    gamma, k = candidates.shape
    vocab = target_probs.shape[-1]
    device = candidates.device
    depth_index = torch.arange(gamma + 1, device=device)
    # owed[d]: the law still owed at depth d+1, r_0 = p at chain node d; row γ follows the whole chain
    owed = target_probs[: gamma + 1]  # [γ+1, vocab]
    # first kept column per depth: k = none, -1 = the lookup candidate
    kept = torch.full((gamma + 1,), k, dtype=torch.int64, device=device)
    if lookup is not None:
        size = lookup.shape[0]
        shared = min(gamma, size)
        agree = (lookup[:shared] == candidates[:shared, 0]) & (depth_index[:shared] < lookup_length)
        graft = agree.to(torch.int64).cumprod(0).sum()  # g: the lookup's first g tokens are the chain's
        lookup_index = torch.arange(size, device=device)
        first = lookup.index_select(0, graft.clamp(max=size - 1).view(1))  # [1]: n_{g+1}
        tries_lookup = (depth_index == graft) & (graft < lookup_length)  # [γ+1]: depth g+1 only
    for j in range(k):
        tokens = candidates[:, j]  # [γ]
        if candidate_probs is None:
            law = point_mass(tokens, vocab, target_probs.dtype)
        else:
            law = candidate_probs[:, j]  # [γ, vocab]
        r_x = owed[:gamma].gather(-1, tokens[:, None]).squeeze(-1)
        q_x = law.gather(-1, tokens[:, None]).squeeze(-1)
        open_ = kept[:gamma] == k
        keep = open_ & (accept_uniforms[:, j] * q_x < r_x) & ((q_x > 0) | (j == 0))
        kept = torch.cat([torch.where(keep, j, kept[:gamma]), kept[gamma:]])
        owed = torch.cat([torch.where((open_ & ~keep)[:, None], residual_probs(owed[:gamma], law), owed[:gamma]),
                          owed[gamma:]])
        if j == 0 and lookup is not None:  # the lookup candidate, right after the chain token
            open_ = kept == k
            r_x = owed.gather(-1, first.expand(gamma + 1)[:, None]).squeeze(-1)
            u = lookup_uniforms.index_select(0, graft.clamp(max=size - 1).view(1))
            keep = tries_lookup & open_ & (u < r_x)
            kept = torch.where(keep, -1, kept)
            rejected = tries_lookup & open_ & ~keep
            owed = torch.where(rejected[:, None], residual_probs(owed, point_mass(first, vocab, owed.dtype)), owed)
    num_accepted = (kept[:gamma] == 0).to(torch.int64).cumprod(0).sum()

    # the law of the token after the step's last kept one: bonus at the kept alternative's node, what
    # is still owed after the chain's num_accepted tokens (the target itself after the whole chain)
    column = kept.index_select(0, num_accepted.view(1))[0]
    has_alternative = (column > 0) & (column < k)
    node = alternative_node(gamma, k, num_accepted, column.clamp(min=1)).clamp(max=gamma * k)  # in range if unused
    next_probs = torch.where(has_alternative, target_probs.index_select(0, node.view(1))[0],
                             owed.index_select(0, num_accepted.view(1))[0])
    lookup_kept = torch.zeros((), dtype=torch.int64, device=device)
    if lookup is not None:
        # after n_{g+1}: n_{g+2}.. against the target at the branch's nodes, as a deterministic chain
        in_lookup = column == -1
        # [G, vocab]: row i the target's law before n_{i+1}, at the branch's node of n_i (the root for i = 0)
        before = target_probs.index_select(0, torch.where(lookup_index > 0, lookup_node(gamma, k, lookup_index - 1), 0))
        p_x = before.gather(-1, lookup[:, None]).squeeze(-1)
        later = (lookup_index > graft) & (lookup_index < lookup_length)
        run = torch.where(lookup_index <= graft, True, later & (lookup_uniforms < p_x))
        lookup_kept = torch.where(in_lookup, run.to(torch.int64).cumprod(0).sum() - graft, 0)
        stop = (graft + lookup_kept).clamp(max=size - 1).view(1)  # the first lookup token not kept
        rejected_law = residual_probs(before.index_select(0, stop)[0], point_mass(lookup.index_select(0, stop), vocab,
                                                                                 before.dtype)[0])
        bonus = target_probs.index_select(0, lookup_node(gamma, k, graft + lookup_kept - 1).view(1))[0]
        lookup_law = torch.where(graft + lookup_kept == lookup_length, bonus, rejected_law)
        next_probs = torch.where(in_lookup, lookup_law, next_probs)
    next_token = sample_from(next_probs, sample_uniforms.index_select(0, num_accepted.view(1))[0], greedy)
    alternative = torch.where(has_alternative, column, 0)
    return CandidateVerdict(num_accepted, alternative, next_token, lookup_kept)


class Emitted(NamedTuple):
    """What a step emits, as device tensors of static shape (a CUDA graph captures them)."""

    tokens: torch.Tensor  # [D + 1] int64, D = max(γ, G): tokens[:count] are emitted, the rest repeat the next token
    nodes: torch.Tensor  # [D] int64: the tree node of emitted token i < count - 1 (candidate_tree); i + 1 past them
    count: torch.Tensor  # [] int64, 1..D + 1: kept draft tokens + the next token


def emitted_tokens(candidates: torch.Tensor, num_accepted: torch.Tensor, next_token: torch.Tensor,
                   alternative: torch.Tensor | None = None, lookup: torch.Tensor | None = None,
                   lookup_kept: torch.Tensor | None = None) -> Emitted:
    """The tokens a step emits, from its verdict (verify's, or verify_candidates' with the kept
    alternative and lookup run): the chain's num_accepted tokens, then the kept alternative or the
    kept lookup run, then the next token. candidates [γ, k] (column 0 the chain; [γ, 1] for a chain),
    lookup [G] | None. Shapes never depend on the verdict and nothing is read on the host.

    A kept node off the chain sits in cache slot start + nodes[i] and belongs at start + i + 1, its
    position; the target's law of emitted token i was computed at node 0 (i = 0) or nodes[i - 1].

    >>> chain = torch.tensor([[5], [6], [7]])
    >>> out = emitted_tokens(chain, torch.tensor(2), torch.tensor(9))
    >>> out.tokens[:int(out.count)].tolist(), out.nodes.tolist()
    ([5, 6, 9], [1, 2, 3])
    """
    gamma, k = candidates.shape
    size = 0 if lookup is None else lookup.shape[0]
    depth = max(gamma, size)
    index = torch.arange(depth, device=candidates.device)  # [D]
    zero = torch.zeros((), dtype=torch.int64, device=candidates.device)
    alternative = zero if alternative is None else alternative
    lookup_kept = zero if lookup_kept is None else lookup_kept
    tokens = next_token.expand(depth)
    nodes = index + 1  # a chain token's node is its slot: it stays where it is
    if size:
        in_run = (index >= num_accepted) & (index < num_accepted + lookup_kept)
        tokens = torch.where(in_run, lookup.gather(0, index.clamp(max=size - 1)), tokens)
        nodes = torch.where(in_run, lookup_node(gamma, k, index), nodes)
    if gamma:
        # gather, not [0-dim tensor]: indexing with a 0-dim tensor reads it on the host
        where = (num_accepted.clamp(max=gamma - 1) * k + alternative).view(1)
        kept_alternative = (alternative > 0) & (index == num_accepted)
        tokens = torch.where(kept_alternative, candidates.reshape(-1).gather(0, where), tokens)
        nodes = torch.where(kept_alternative, alternative_node(gamma, k, num_accepted, alternative), nodes)
        chain = candidates[:, 0].gather(0, index.clamp(max=gamma - 1))
        tokens = torch.where(index < num_accepted, chain, tokens)
    count = num_accepted + (alternative > 0).to(torch.int64) + lookup_kept + 1
    return Emitted(torch.cat([tokens, next_token.view(1)]), nodes, count)
