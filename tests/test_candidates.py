"""Several candidates per draft position (acceptance.verify_candidates): the tree layout, the
target's tree forward, the rule's law (sampled alternatives, deterministic ones, a used-up
support) against negative controls, and end to end through the engine and the fused step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speculant.acceptance import candidate_tree, verify, verify_candidates
from speculant.drafters.base import draw_alternatives
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.model import ModelDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams, sample_from

from test_features import (PROMPT, FixedSchedule, exact_law, feature_pair, window_pvalue)

GREEDY = SamplingParams(temperature=0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on CUDA the fused steps run as graphs


def test_candidate_tree_lays_out_the_chain_then_the_alternatives_depth_by_depth():
    depths, ancestors = candidate_tree(2, 3)
    # nodes: root, chain 1, chain 2, (depth 1: two alternatives), (depth 2: two alternatives)
    assert depths.tolist() == [0, 1, 2, 1, 1, 2, 2]
    parents = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 3], 4: [0, 4], 5: [0, 1, 5], 6: [0, 1, 6]}
    for node, row in parents.items():
        assert ancestors[node].nonzero().view(-1).tolist() == row


# ================================================================ the target's tree forward

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_tree_forward_gives_each_node_the_logits_of_its_own_path_and_a_kept_path_decodes_on(arch):
    # gemma3's tiny config has a sliding window of 4: the context is longer, so it is exercised
    cfg = tiny_config(arch, vocab_size=32)
    model = LeanModel(random_weights(cfg, seed=4, scale=2.0), max_seq_len=64)
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    gamma, k = 3, 3
    candidates = torch.randint(0, 32, (gamma, k), generator=torch.Generator().manual_seed(0))
    depths, ancestors = candidate_tree(gamma, k)
    nodes = torch.cat([torch.tensor(context[-1:]), candidates[:, 0], candidates[:, 1:].reshape(-1)])
    model.forward(torch.tensor(context[:-1]), 0)
    tree_logits = model.forward(nodes, len(context) - 1, ancestors)
    for node in range(nodes.shape[0]):
        path = nodes[ancestors[node]].tolist()  # the root, the chain above the node, the node
        model.truncate(0)
        plain = model.forward(torch.tensor(context[:-1] + path), 0)[-1]
        torch.testing.assert_close(tree_logits[node], plain, atol=1e-4, rtol=1e-4)
    # keep chain 1 and the alternative at depth 2: its slot moves, then decoding goes on as plain
    model.truncate(0)
    model.forward(torch.tensor(context[:-1]), 0)
    model.forward(nodes, len(context) - 1, ancestors)
    start, node = len(context) - 1, 1 + gamma + 1 * (k - 1) + 0  # depth 2, column 1
    model.move_slot(start + node, start + 2)
    model.truncate(start + 3)
    kept = context + [int(candidates[0, 0]), int(candidates[1, 1])]
    after = model.forward(torch.tensor([7]), start + 3)[-1]
    model.truncate(0)
    expected = model.forward(torch.tensor(kept + [7]), 0)[-1]
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)


# ================================================================ the rule, on its own

def test_one_candidate_per_position_is_the_chain_rule_draw_for_draw():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        gamma, vocab = int(torch.randint(1, 5, (), generator=gen)), 6
        target_probs = torch.softmax(torch.randn(gamma + 1, vocab, generator=gen, dtype=torch.float64) * 2, -1)
        draft_probs = torch.softmax(torch.randn(gamma, vocab, generator=gen, dtype=torch.float64) * 2, -1)
        tokens = torch.multinomial(draft_probs, 1, generator=gen).view(-1)
        accept, sample = torch.rand(gamma, generator=gen, dtype=torch.float64), torch.rand((), generator=gen)
        chain = verify(tokens, draft_probs, target_probs, accept, sample)
        one = verify_candidates(tokens[:, None], draft_probs[:, None], target_probs, accept[:, None],
                                sample.expand(gamma + 1))
        assert (int(one.num_accepted), int(one.next_token), int(one.alternative)) == (
            int(chain.num_accepted), int(chain.next_token), 0)


# A two-depth, three-candidate toy: the target's law at a node depends on the node's token (a
# Markov chain), so the emitted pair (t1, t2) must follow root(t1) * markov[t1](t2).
V, GAMMA, K, DRAWS = 6, 2, 3, 60_000


def _toy(seed: int, sparse: bool):
    gen = torch.Generator().manual_seed(seed)
    root = torch.softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 1.5, -1)
    markov = torch.softmax(torch.randn(V, V, generator=gen, dtype=torch.float64) * 1.5, -1)
    draft_root = torch.softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 1.5, -1)
    draft_markov = torch.softmax(torch.randn(V, V, generator=gen, dtype=torch.float64) * 1.5, -1)
    if sparse:  # the draft's first law has 2 tokens of support, fewer than K: candidates run out
        draft_root = torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0, 0.0], dtype=torch.float64)
    return root, markov, draft_root, draft_markov


def _emitted_pairs(mode: str, seed: int = 0, sparse: bool = False) -> tuple[np.ndarray, np.ndarray, tuple]:
    """DRAWS independent steps of the toy (vmapped); returns t1 and t2 (-1 where the step emitted one token).

    mode: "sampled" (alternatives without replacement, honest laws), "deterministic" (the draft's
    most likely tokens, point masses: exact for any choice made before the uniforms are read), and
    the broken samplers "stale-laws" (every alternative reported with the draft's full law, the
    earlier candidates not removed) and "uniform-laws" (alternatives reported as uniform draws)."""
    root, markov, draft_root, draft_markov = toy = _toy(seed, sparse)

    def one_step(chain_u, noise, accept_u, sample_u):
        candidates, laws, draft_law = [], [], draft_root
        for depth in range(GAMMA):
            token = sample_from(draft_law, chain_u[depth])
            if mode == "deterministic":
                others, others_laws = draw_alternatives(draft_law.log(), draft_law, token, K - 1, True, noise[depth])
            else:
                others, others_laws = draw_alternatives(draft_law.log(), draft_law, token, K - 1, False, noise[depth])
                if mode == "stale-laws":
                    others_laws = draft_law.expand(K - 1, V)
                elif mode == "uniform-laws":
                    others_laws = torch.full((K - 1, V), 1.0 / V, dtype=draft_law.dtype)
            candidates.append(torch.cat([token.view(1), others]))
            laws.append(torch.cat([draft_law[None], others_laws]) if others_laws is not None else None)
            draft_law = draft_markov.index_select(0, token.view(1))[0]
        candidates = torch.stack(candidates)  # [γ, k]
        laws = None if mode == "deterministic" else torch.stack(laws)
        nodes = torch.cat([candidates[:, 0], candidates[:, 1:].reshape(-1)])
        target_probs = torch.cat([root[None], markov.index_select(0, nodes)])  # [1 + γk, V]
        verdict = verify_candidates(candidates, laws, target_probs, accept_u, sample_u)
        return torch.stack(list(verdict)), candidates

    gen = torch.Generator().manual_seed(seed + 1)
    verdicts, candidates = torch.vmap(one_step)(
        torch.rand(DRAWS, GAMMA, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA, V, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA, K, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA + 1, generator=gen, dtype=torch.float64))
    kept, alternative, next_token = verdicts.T
    rows = torch.arange(DRAWS)
    # t1: the first chain token if kept, else the alternative kept at depth 1, else the recovered token
    t1 = torch.where(kept > 0, candidates[:, 0, 0],
                     torch.where(alternative > 0, candidates[rows, 0, alternative], next_token))
    # t2: the second chain token, the alternative kept at depth 2, or the token after depth 1's kept one
    second = torch.where(alternative > 0, candidates[rows, 1, alternative], candidates[:, 1, 0])
    t2 = torch.where(kept >= 2, candidates[:, 1, 0],
                     torch.where(kept == 1, torch.where(alternative > 0, second, next_token),
                                 torch.where(alternative > 0, next_token, -1)))
    return t1.numpy(), t2.numpy(), toy


def _pair_pvalue(gof, t1, t2, toy) -> float:
    root, markov = toy[0].numpy(), toy[1].numpy()
    fits = [gof.chi_square(t1, root)]
    for token in range(V):
        following = t2[(t1 == token) & (t2 >= 0)]
        if following.size:
            fits.append(gof.chi_square(following, markov[token]))
    return min(1.0, len(fits) * min(f.pvalue for f in fits))  # Bonferroni over the fits


@pytest.mark.parametrize("mode, sparse", [("sampled", False), ("deterministic", False), ("sampled", True)],
                         ids=["sampled", "deterministic", "used-up-support"])
def test_the_candidate_rule_emits_the_targets_law(mode, sparse, gof):
    t1, t2, toy = _emitted_pairs(mode, sparse=sparse)
    assert (t2 >= 0).mean() > 0.15  # second tokens come from every path: chain, alternative, bonus
    assert _pair_pvalue(gof, t1, t2, toy) >= gof.SIGNIFICANCE


@pytest.mark.parametrize("mode", ["stale-laws", "uniform-laws"])
def test_a_candidate_sampler_that_misreports_its_laws_is_caught(mode, gof):
    t1, t2, toy = _emitted_pairs(mode)
    assert _pair_pvalue(gof, t1, t2, toy) < gof.SIGNIFICANCE


def test_alternatives_are_distinct_and_follow_sequential_draws_without_replacement(gof):
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0], dtype=torch.float64)
    chosen = torch.tensor(0)
    draws = torch.vmap(lambda noise: draw_alternatives(probs.log(), probs, chosen, 2, False, noise))(
        torch.rand(40_000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    tokens, laws = draws
    assert (tokens[:, 0] != tokens[:, 1]).all() and (tokens != 0).all()
    first = np.array([0, 0.5, 1 / 3, 1 / 6, 0])  # probs without token 0, renormalised
    assert gof.chi_square(tokens[:, 0].numpy(), first).pvalue >= gof.SIGNIFICANCE
    torch.testing.assert_close(laws[0, 0], torch.tensor(first, dtype=torch.float64))
    second_given_1 = tokens[tokens[:, 0] == 1, 1].numpy()
    assert gof.chi_square(second_given_1, np.array([0, 0, 2 / 3, 1 / 3, 0])).pvalue >= gof.SIGNIFICANCE
    greedy, none = draw_alternatives(torch.tensor([1.0, 3.0, 2.0, 0.0]), None, torch.tensor(1), 2, True, None)
    assert greedy.tolist() == [2, 0] and none is None


# ================================================================ end to end

NUM_RUNS = 1500


def engine_runs(target, drafter, gamma, params, fused: bool, candidates: int):
    generator = torch.Generator(device=target.device).manual_seed(0)
    stepper = FusedStepper(target, drafter.model, compile=False, candidates=candidates) if fused else None
    out = np.empty((NUM_RUNS, 6), dtype=np.int64)
    for i in range(NUM_RUNS):
        steps = list(generate(target, drafter, PROMPT, gamma=gamma, params=params, max_new_tokens=6,
                              generator=generator, stepper=stepper))
        out[i] = [t for s in steps for t in s.tokens]
    return out


@pytest.mark.parametrize("params, fused, device", [
    (SamplingParams(), False, "cpu"),
    *((SamplingParams(top_p=0.8), True, device) for device in DEVICES),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_feature_draft_with_three_candidates_follows_the_exact_target_law(params, fused, device, gof):
    """1500 seeded runs of 6 tokens, γ = 3, k = 3: the exact law of the tiny transformer target."""
    target, draft = feature_pair(5, seed=3, device=device)
    tokens = engine_runs(target, FeatureDrafter(draft, target, candidates=3), 3, params, fused, 3)
    law = exact_law(feature_pair(5, seed=3)[0], params, gof)  # enumerated on the CPU
    pvalue, fits = window_pvalue(gof, tokens, law)
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["features", "model"])
def test_greedy_with_candidates_equals_plain_greedy_generic_and_fused(kind, device):
    if kind == "features":
        target, draft = feature_pair(8, seed=5, kept=6, device=device)
        make = lambda: FeatureDrafter(draft, target, candidates=3)  # noqa: E731
    else:
        target = LeanModel(random_weights(tiny_config(vocab_size=8, num_layers=2), seed=5, scale=2.0).to(device),
                           max_seq_len=96)
        draft = LeanModel(random_weights(tiny_config(vocab_size=8, num_layers=1), seed=6, scale=2.0).to(device),
                          max_seq_len=96)
        make = lambda: ModelDrafter(draft, candidates=3)  # noqa: E731
    for prompt in ([7], [1, 2, 3, 4, 5, 6, 7]):
        expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=40)
        accepted = {}
        for fused in (False, True):
            stepper = FusedStepper(target, draft, compile=False, candidates=3) if fused else None
            steps = list(generate(target, make(), prompt, gamma=FixedSchedule([3, 0, 2, 5, 1, 0, 4]), params=GREEDY,
                                  max_new_tokens=40, stepper=stepper))
            assert [t for s in steps for t in s.tokens] == expected
            accepted[fused] = [s.num_accepted for s in steps]
        assert accepted[True] == accepted[False]


def test_candidates_raise_greedy_acceptance_and_fall_back_to_a_chain_at_the_end_of_the_context():
    target = LeanModel(random_weights(tiny_config(vocab_size=8, num_layers=2), seed=5, scale=2.0), max_seq_len=48)
    draft = LeanModel(random_weights(tiny_config(vocab_size=8, num_layers=1), seed=6, scale=2.0), max_seq_len=48)
    prompt = [1, 2, 3]
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=44)  # up to the last position
    tau = {}
    for k in (1, 3):
        for fused in (False, True):
            stepper = FusedStepper(target, draft, compile=False, candidates=k) if fused else None
            steps = list(generate(target, ModelDrafter(draft, candidates=k), prompt, gamma=4, params=GREEDY,
                                  max_new_tokens=44, stepper=stepper))
            assert [t for s in steps for t in s.tokens] == expected
            tau[k] = steps[-1].stats.tau
    assert tau[3] > tau[1]
