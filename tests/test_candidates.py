"""Several candidates per draft position (acceptance.verify_candidates): the tree layout, the
target's tree forward, the rule's law (sampled alternatives, deterministic ones, a used-up
support) against negative controls, and end to end through the engine and the fused step.

Long because the tree rule is tested at every level in one place: its pure functions, the tree
forward, its laws with their controls, and the generic, fused and run-ahead steps that use it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_features import PROMPT, FixedSchedule, exact_law, feature_pair, window_pvalue

from speculant.acceptance import candidate_tree, lookup_node, tree_that_fits, tree_tokens, verify, verify_candidates
from speculant.adaptive import AdaptiveGamma, nominal_costs
from speculant.drafters.base import draw_alternatives
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams, sample_from

GREEDY = SamplingParams(temperature=0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on CUDA the fused steps run as graphs


def test_the_tree_that_fits_drops_the_lookup_branch_first_then_the_alternatives():
    # a context of 90 tokens in a cache of 100: γ 3 · k 3 = 9 slots fit, a branch of 2 more does not
    assert tree_that_fits(90, 3, 3, 0, 100) == (3, 0)
    assert tree_that_fits(90, 3, 3, 1, 100) == (3, 1)
    assert tree_that_fits(90, 3, 3, 2, 100) == (3, 0)
    assert tree_that_fits(90, 3, 4, 1, 100) == (1, 0)  # 12 slots: a chain, and no branch
    assert tree_that_fits(97, 3, 1, 5, 100) == (1, 0)


def test_candidate_tree_lays_out_the_chain_then_the_alternatives_depth_by_depth():
    depths, ancestors = candidate_tree(2, 3)
    # nodes: root, chain 1, chain 2, (depth 1: two alternatives), (depth 2: two alternatives)
    assert depths.tolist() == [0, 1, 2, 1, 1, 2, 2]
    parents = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 3], 4: [0, 4], 5: [0, 1, 5], 6: [0, 1, 6]}
    for node, row in parents.items():
        assert ancestors[node].nonzero().view(-1).tolist() == row
    # a lookup branch of 3 after them: its own chain from the root
    depths, ancestors = candidate_tree(2, 3, 3)
    assert depths.tolist() == [0, 1, 2, 1, 1, 2, 2, 1, 2, 3]
    assert [lookup_node(2, 3, i) for i in range(3)] == [7, 8, 9]
    for node, row in {**parents, 7: [0, 7], 8: [0, 7, 8], 9: [0, 7, 8, 9]}.items():
        assert ancestors[node].nonzero().view(-1).tolist() == row
    assert tree_tokens(torch.tensor([5]), torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([7, 8, 9])).tolist() == [
        5, 1, 4, 2, 3, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("gamma, k, size", [(1, 1, 0), (3, 1, 0), (3, 3, 0), (3, 1, 5), (3, 3, 2), (2, 4, 6)])
def test_emitted_tokens_are_a_root_path_of_the_tree_whatever_the_verdict(gamma, k, size):
    """For every verdict verify_candidates can give (chain tokens kept, then maybe one alternative or
    a run of the lookup branch, which it keeps only where the branch agrees with the chain's kept
    tokens), emitted_tokens returns the kept tokens then the next token, and nodes on a path of the
    tree (candidate_tree): the node of token i holds it at depth i + 1 and its parent holds token
    i - 1 (the root's token for i = 0). Checked against the tree's own layout (tree_tokens, ancestors)."""
    from speculant.acceptance import emitted_tokens

    generator = torch.Generator().manual_seed(gamma * 100 + k * 10 + size)
    candidates = torch.randint(0, 50, (gamma, k), generator=generator)
    lookup = torch.randint(50, 99, (size,), generator=generator) if size else None
    depths, ancestors = candidate_tree(gamma, k, size)
    next_token = torch.tensor(123)
    checked = 0
    for kept in range(gamma + 1):
        columns = [0] + (list(range(1, k)) if kept < gamma else [])
        runs = range(size - kept + 1) if size and kept <= size else [0]
        for column in columns:
            for run in (runs if column == 0 else [0]):
                if run:  # the branch grafts onto the chain after its `kept` tokens
                    lookup[:kept] = candidates[:kept, 0]
                layout = tree_tokens(torch.tensor([99]), candidates, lookup)
                out = emitted_tokens(candidates, torch.tensor(kept), next_token, torch.tensor(column), lookup,
                                     torch.tensor(run))
                count = int(out.count)
                assert count == kept + (column > 0) + run + 1
                expected = (candidates[:kept, 0].tolist() + ([int(candidates[kept, column])] if column else [])
                            + (lookup[kept:kept + run].tolist() if run else []) + [123])
                assert out.tokens[:count].tolist() == expected
                assert out.tokens[count:].eq(123).all()  # padding repeats the next token
                for i, node in enumerate(out.nodes[:count - 1].tolist()):
                    assert int(layout[node]) == expected[i] and int(depths[node]) == i + 1
                    [parent] = [a for a in ancestors[node].nonzero()[:, 0].tolist() if int(depths[a]) == i]
                    assert int(layout[parent]) == ([99] + expected)[i]
                checked += 1
    assert checked >= gamma + 1


# ================================================================ the target's tree forward

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_tree_forward_gives_each_node_the_logits_of_its_own_path_and_a_kept_path_decodes_on(arch):
    # gemma3's tiny config has a sliding window of 4: the context is longer, so it is exercised
    cfg = tiny_config(arch, vocab_size=32)
    model = LeanModel(random_weights(cfg, seed=4, scale=2.0), max_seq_len=64)
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    gamma, k = 3, 3
    candidates = torch.randint(0, 32, (gamma, k), generator=torch.Generator().manual_seed(0))
    _, ancestors = candidate_tree(gamma, k)
    nodes = tree_tokens(torch.tensor(context[-1:]), candidates)
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


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_tree_forward_with_a_lookup_branch_scores_its_own_path_and_moves_a_kept_run_as_one_block(arch):
    # gemma3's sliding window (4) is shorter than the branch (6): a branch node's slot is not its
    # position, and the window must go by positions
    cfg = tiny_config(arch, vocab_size=32)
    model = LeanModel(random_weights(cfg, seed=4, scale=2.0), max_seq_len=64)
    model.keep_features()
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    gamma, k, lookup = 2, 2, 6
    candidates = torch.tensor([[7, 8], [9, 10]])
    branch = torch.tensor([7, 11, 12, 13, 14, 15])  # shares the chain's first token, then leaves it
    _, ancestors = candidate_tree(gamma, k, lookup)
    nodes = tree_tokens(torch.tensor(context[-1:]), candidates, branch)
    start = len(context) - 1
    model.forward(torch.tensor(context[:-1]), 0)
    tree_logits = model.forward(nodes, start, ancestors)
    for node in range(nodes.shape[0]):
        path = nodes[ancestors[node]].tolist()
        fresh = LeanModel(model.weights, max_seq_len=64)
        torch.testing.assert_close(tree_logits[node], fresh.forward(torch.tensor(context[:-1] + path), 0)[-1],
                                   atol=1e-4, rtol=1e-4)
    # keep chain token 7 then the branch's 11..15: their slots move in one call, decoding goes on
    source = start + torch.tensor([lookup_node(gamma, k, i) for i in range(1, 6)])
    model.move_slot(source, start + torch.arange(2, 7))
    model.truncate(start + 7)
    after = model.forward(torch.tensor([5]), start + 7)[-1]
    fresh = LeanModel(model.weights, max_seq_len=64)
    fresh.keep_features()
    expected = fresh.forward(torch.tensor(context + [7, 11, 12, 13, 14, 15, 5]), 0)[-1]
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.features[: start + 8], fresh.features[: start + 8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.k_cache[:, : start + 8], fresh.k_cache[:, : start + 8], atol=1e-4, rtol=1e-4)


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
        assert (int(one.num_accepted), int(one.next_token), int(one.alternative), int(one.lookup_kept)) == (
            int(chain.num_accepted), int(chain.next_token), 0, 0)


# A three-depth, four-candidate toy: the target's law at a node depends only on the node's token (a
# Markov chain), so every emitted token must follow markov[previous token] (the first: root) — the
# chain's tokens, a kept alternative at any depth, the bonus after it, the recovered token.
V, GAMMA, K, DRAWS = 6, 3, 4, 60_000


def _toy(seed: int, variant: str):
    gen = torch.Generator().manual_seed(seed)

    def laws(*shape):
        return torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.5, -1)

    def top(law, k):  # keep the k most likely tokens
        kth = law.topk(k, -1).values[..., -1:]
        law = torch.where(law >= kth, law, 0.0)
        return law / law.sum(-1, keepdim=True)

    root, markov = laws(V), laws(V, V)
    draft_root, draft_markov = 0.6 * root + 0.4 * laws(V), 0.6 * markov + 0.4 * laws(V, V)  # a draft like the target
    if variant == "sparse-draft":  # 2 tokens of support, fewer than K: the alternatives run out
        draft_root, draft_markov = top(draft_root, 2), top(draft_markov, 2)
    if variant == "sparse-target":
        root, markov = top(root, 3), top(markov, 3)
    return root, markov, draft_root, draft_markov


LOOKUP = 5  # the lookup branch's size in the toy


def _emitted(mode: str, variant: str = "dense", seed: int = 0, lookup: str | None = None):
    """DRAWS independent steps of the toy (vmapped); returns each step's emitted tokens, how many
    steps kept an alternative and how many kept lookup tokens.

    mode: "sampled" (alternatives without replacement, honest laws), "deterministic" (the draft's
    most likely tokens, point masses: exact for any choice made before the uniforms are read), and
    the broken samplers "stale-laws" (every alternative reported with the draft's full law, the
    earlier candidates not removed) and "uniform-laws" (alternatives reported as uniform draws).
    lookup: None, "honest" (a branch of 1..5 valid tokens fixed before the step: half the steps the
    target's most likely path, which the chain often shares for a while, half a random path), or the
    broken "peeking" (its first token chosen after looking at the uniform that tests it)."""
    root, markov, draft_root, draft_markov = toy = _toy(seed, variant)
    likely = [int(root.argmax())]
    for _ in range(LOOKUP - 1):
        likely.append(int(markov[likely[-1]].argmax()))
    likely = torch.tensor(likely)

    def one_step(chain_u, noise, accept_u, sample_u, branch, branch_length, lookup_u):
        candidates, laws, draft_law = [], [], draft_root
        for depth in range(GAMMA):
            token = sample_from(draft_law, chain_u[depth])
            others, others_laws = draw_alternatives(draft_law.log(), draft_law, token, K - 1, mode == "deterministic",
                                                    noise[depth])
            if mode == "stale-laws":
                others_laws = draft_law.expand(K - 1, V)
            elif mode == "uniform-laws":
                others_laws = torch.full((K - 1, V), 1.0 / V, dtype=draft_law.dtype)
            candidates.append(torch.cat([token.view(1), others]))
            if others_laws is not None:
                laws.append(torch.cat([draft_law[None], others_laws]))
            draft_law = draft_markov.index_select(0, token.view(1))[0]
        candidates = torch.stack(candidates)  # [γ, k]
        laws = torch.stack(laws) if laws else None
        nodes = torch.cat([candidates[:, 0], candidates[:, 1:].reshape(-1)])
        if lookup is None:
            target_probs = torch.cat([root[None], markov.index_select(0, nodes)])  # [1 + γk, V]
            verdict = verify_candidates(candidates, laws, target_probs, accept_u, sample_u)
            return torch.cat([torch.stack(list(verdict)), candidates.reshape(-1), branch])
        if lookup == "peeking":  # the root's most likely token when its test will pass, else the least likely
            branch = torch.cat([torch.where(lookup_u[0] < root.max(), root.argmax(), root.argmin()).view(1), branch[1:]])
        target_probs = torch.cat([root[None], markov.index_select(0, torch.cat([nodes, branch]))])  # [1 + γk + G, V]
        verdict = verify_candidates(candidates, laws, target_probs, accept_u, sample_u, branch, branch_length, lookup_u)
        return torch.cat([torch.stack(list(verdict)), candidates.reshape(-1), branch])

    gen = torch.Generator().manual_seed(seed + 1)
    branches = torch.where(torch.rand(DRAWS, 1, generator=gen) < 0.5, likely,
                           torch.randint(0, V, (DRAWS, LOOKUP), generator=gen))
    verdicts = torch.vmap(one_step)(
        torch.rand(DRAWS, GAMMA, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA, V, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA, K, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA + 1, generator=gen, dtype=torch.float64),
        branches, torch.randint(1, LOOKUP + 1, (DRAWS,), generator=gen),
        torch.rand(DRAWS, LOOKUP, generator=gen, dtype=torch.float64))
    sequences, lookup_kept = [], 0
    for row in verdicts.tolist():
        kept, alternative, next_token, from_lookup = row[:4]
        step = [row[4 + d * K: 4 + (d + 1) * K] for d in range(GAMMA)]
        branch = row[4 + GAMMA * K:]
        tokens = [r[0] for r in step[:kept]] + ([step[kept][alternative]] if alternative else [])
        tokens += branch[kept: kept + from_lookup]
        lookup_kept += from_lookup > 0
        sequences.append(tokens + [next_token])
    return sequences, int((verdicts[:, 1] > 0).sum()), lookup_kept, toy


def _law_pvalue(gof, sequences, toy) -> float:
    """Chi-square of the first tokens against root, and of every later token against markov[the token
    before it] (pooled over positions); Bonferroni over the fits."""
    root, markov = toy[0].numpy(), toy[1].numpy()
    fits = [gof.chi_square(np.array([s[0] for s in sequences]), root)]
    following = {a: [] for a in range(V)}
    for s in sequences:
        for before, token in itertools.pairwise(s):
            following[before].append(token)
    fits += [gof.chi_square(np.array(tokens), markov[a]) for a, tokens in following.items() if len(tokens) > 50]
    return min(1.0, len(fits) * min(f.pvalue for f in fits))


@pytest.mark.parametrize("mode, variant", [("sampled", "dense"), ("deterministic", "dense"),
                                           ("sampled", "sparse-draft"), ("sampled", "sparse-target")])
def test_the_candidate_rule_emits_the_targets_law(mode, variant, gof):
    sequences, alternatives_kept, _, toy = _emitted(mode, variant)
    assert alternatives_kept > DRAWS // 20  # the alternatives are really kept, and their bonuses drawn
    assert sum(len(s) == GAMMA + 1 for s in sequences) > DRAWS // 20  # and whole chains too
    assert _law_pvalue(gof, sequences, toy) >= gof.SIGNIFICANCE


@pytest.mark.parametrize("mode", ["sampled", "deterministic"])
def test_the_rule_with_a_lookup_branch_emits_the_targets_law(mode, gof):
    sequences, alternatives_kept, lookup_kept, toy = _emitted(mode, lookup="honest")
    assert alternatives_kept > DRAWS // 20 and lookup_kept > DRAWS // 20  # both kinds of branch are taken
    assert sum(len(s) > GAMMA + 1 for s in sequences) > DRAWS // 100  # the lookup runs past the chain's end
    assert _law_pvalue(gof, sequences, toy) >= gof.SIGNIFICANCE


@pytest.mark.parametrize("mode, lookup", [("stale-laws", None), ("uniform-laws", None), ("sampled", "peeking")])
def test_a_candidate_sampler_that_misreports_its_laws_is_caught(mode, lookup, gof):
    sequences, _, _, toy = _emitted(mode, lookup=lookup)
    assert _law_pvalue(gof, sequences, toy) < gof.SIGNIFICANCE


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


def with_lookup(drafter, lookup: int):
    """The drafter, with a prompt-lookup branch of `lookup` tokens beside it where lookup > 0."""
    return LookupDrafter(drafter, NgramDrafter(), lookup) if lookup else drafter


def engine_runs(target, drafter, gamma, params, fused: bool, candidates: int, lookup: int = 0, run_ahead: bool = False):
    generator = torch.Generator(device=target.device).manual_seed(0)
    stepper = (FusedStepper(target, drafter.model, compile=False, candidates=candidates, lookup=lookup,
                            run_ahead=run_ahead) if fused else None)
    drafter = with_lookup(drafter, lookup)
    out = np.empty((NUM_RUNS, 6), dtype=np.int64)
    alternatives_kept = lookup_tokens = 0
    for i in range(NUM_RUNS):
        steps = list(generate(target, drafter, PROMPT, gamma=gamma, params=params, max_new_tokens=6,
                              generator=generator, stepper=stepper))
        out[i] = [t for s in steps for t in s.tokens]
        alternatives_kept += steps[-1].stats.alternatives_kept
        lookup_tokens += steps[-1].stats.lookup_tokens
    if run_ahead:  # the first step of a run launched the second before it was read
        assert stepper.ahead_launches >= NUM_RUNS // 2
    return (out, alternatives_kept, lookup_tokens) if lookup else (out, alternatives_kept)


@pytest.mark.parametrize("params, fused, device", [
    (SamplingParams(), False, "cpu"),
    *((SamplingParams(top_p=0.8), True, device) for device in DEVICES),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_feature_draft_with_three_candidates_follows_the_exact_target_law(params, fused, device, gof):
    """1500 seeded runs of 6 tokens, γ = 3, k = 3: the exact law of the tiny transformer target."""
    target, draft = feature_pair(5, seed=3, device=device)
    tokens, alternatives_kept = engine_runs(target, FeatureDrafter(draft, target, candidates=3), 3, params, fused, 3)
    assert alternatives_kept > NUM_RUNS // 10  # the sampled alternatives are kept, not only the chain
    law = exact_law(feature_pair(5, seed=3)[0], params, gof)  # enumerated on the CPU
    pvalue, fits = window_pvalue(gof, tokens, law)
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
def test_a_token_draft_with_three_candidates_follows_the_exact_target_law(fused, gof):
    target = feature_pair(5, seed=3)[0]
    draft = LeanModel(random_weights(tiny_config(vocab_size=5, num_layers=1), seed=9), max_seq_len=96)
    tokens, alternatives_kept = engine_runs(target, ModelDrafter(draft, candidates=3), 3, SamplingParams(), fused, 3)
    assert alternatives_kept > NUM_RUNS // 10
    pvalue, fits = window_pvalue(gof, tokens, exact_law(target, SamplingParams(), gof))
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("k, params, fused, device", [
    (3, SamplingParams(), False, "cpu"),
    *((1, SamplingParams(top_p=0.8), True, device) for device in DEVICES),
    (3, SamplingParams(temperature=0.7), True, "cpu"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_feature_draft_with_a_lookup_branch_follows_the_exact_target_law(k, params, fused, device, gof):
    """As above, with a prompt-lookup branch of 4 tokens beside the draft's tree (k = 3) or chain."""
    target, draft = feature_pair(5, seed=3, device=device)
    drafter = FeatureDrafter(draft, target, candidates=k)
    tokens, _, lookup_tokens = engine_runs(target, drafter, 3, params, fused, k, lookup=4)
    assert lookup_tokens > NUM_RUNS // 5  # the lookup branch's tokens are really kept
    law = exact_law(feature_pair(5, seed=3)[0], params, gof)
    pvalue, fits = window_pvalue(gof, tokens, law)
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
def test_gamma_auto_with_a_lookup_branch_follows_the_exact_target_law(fused, gof):
    """As above (k = 3, a branch of 4) under --gamma auto: one policy for all the runs, so its
    choices move with what it has seen; the law must not."""
    target, draft = feature_pair(5, seed=3)
    policy = AdaptiveGamma(nominal_costs(4, candidates=3, lookup=4), lookup=4, initial_gamma=2)
    tokens, _, lookup_tokens = engine_runs(target, FeatureDrafter(draft, target, candidates=3), policy,
                                           SamplingParams(), fused, 3, lookup=4)
    assert lookup_tokens > NUM_RUNS // 5
    assert len(set(policy.history)) > 2, "the policy hardly changed γ, so the test proves little"
    pvalue, fits = window_pvalue(gof, tokens, exact_law(target, SamplingParams(), gof))
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["features", "model"])
def test_greedy_with_candidates_equals_plain_greedy_generic_and_fused(kind, device):
    if kind == "features":
        target, draft = feature_pair(8, seed=5, kept=6, device=device)
        make = lambda: FeatureDrafter(draft, target, candidates=3)
    else:
        target, draft = token_pair(device)
        make = lambda: ModelDrafter(draft, candidates=3)
    from_lookup = 0
    for prompt in ([7], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]):
        expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=40)
        for lookup in (0, 5):  # and with a lookup branch of 5 tokens
            accepted = {}
            for fused in (False, True, "ahead"):  # generic, fused one replay at a time, fused run ahead
                stepper = FusedStepper(target, draft, compile=False, candidates=3, lookup=lookup, plain_chunk=1,
                                       run_ahead=fused == "ahead") if fused else None
                drafter = with_lookup(make(), lookup)
                steps = list(generate(target, drafter, prompt, gamma=FixedSchedule([3, 0, 2, 5, 1, 0, 4]),
                                      params=GREEDY, max_new_tokens=40, stepper=stepper))
                assert [t for s in steps for t in s.tokens] == expected
                # same steps, same stats (but the first of a one-token prompt: the fused token-draft step
                # wants a token before the last one, so that step is plain there); a step's depth is its
                # longer branch's, so the lookup branch found on the device is the host's length
                accepted[fused] = [s.num_accepted for s in steps] + [s.num_drafted for s in steps[1:]]
                from_lookup += steps[-1].stats.lookup_tokens
                if fused == "ahead":
                    assert stepper.ahead_launches > 0
            assert accepted[True] == accepted[False] == accepted["ahead"]
    assert from_lookup > 0


@pytest.mark.parametrize("lookup", [0, 5])
@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
def test_gamma_auto_with_candidates_and_a_lookup_branch_keeps_greedy_output_and_learns_from_the_tree(fused, lookup):
    """--gamma auto with 3 candidates a position (and a lookup branch of 5): greedy output is plain
    greedy decoding, generic and fused, and the policy learned the tree's depths and the branch's reach."""
    target, draft = feature_pair(8, seed=5, kept=6)
    for prompt in ([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]):
        expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=60)
        policy = AdaptiveGamma(nominal_costs(6, candidates=3, lookup=lookup), lookup=lookup)
        stepper = FusedStepper(target, draft, compile=False, candidates=3, lookup=lookup) if fused else None
        drafter = with_lookup(FeatureDrafter(draft, target, candidates=3), lookup)
        steps = list(generate(target, drafter, prompt, gamma=policy, params=GREEDY, max_new_tokens=60,
                              stepper=stepper))
        assert [t for s in steps for t in s.tokens] == expected
        assert steps[-1].stats.drafted > 0 and sum(policy.recent["tested"]) > 0
        if lookup:
            assert sum(policy.recent["lookup_tested"]) > 0
    if lookup:
        assert steps[-1].stats.lookup_tokens > 0  # the repeating prompt: the branch's tokens were kept


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
            tau[k, fused] = steps[-1].stats.tau
            if k == 3:  # near the end the 1 + 4·3 tree slots no longer fit: those steps verify a chain
                assert any(len(s.tokens) > 1 for s in steps[-3:]) or steps[-1].stats.alternatives_kept > 0
    assert tau[3, False] > tau[1, False] and tau[3, True] > tau[1, True]


@pytest.mark.parametrize("lookup", [0, 6])
@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
@pytest.mark.parametrize("kind", ["features", "gemma3-model"])
def test_after_every_sampled_step_the_target_cache_and_features_equal_a_fresh_prefill(kind, fused, lookup):
    """Kept alternatives and lookup runs move their K/V (and feature) slots to their positions: after
    each step the target's cache holds exactly what a fresh prefill of the committed text gives."""
    if kind == "features":
        target, draft = feature_pair(8, seed=5, kept=6)
        drafter = FeatureDrafter(draft, target, candidates=3)
    else:  # sliding-window layers (window 4) under the tree mask
        target = LeanModel(random_weights(tiny_config("gemma3", vocab_size=8), seed=1, scale=2.0), max_seq_len=96)
        draft = LeanModel(random_weights(tiny_config("gemma3", vocab_size=8, num_layers=1), seed=11), max_seq_len=96)
        drafter = ModelDrafter(draft, candidates=3)
    if lookup:
        drafter = LookupDrafter(drafter, NgramDrafter(), lookup)
    fresh = LeanModel(target.weights, max_seq_len=96)
    if target.features is not None:
        fresh.keep_features()
    stepper = FusedStepper(target, draft, compile=False, candidates=3, lookup=lookup) if fused else None
    context = [1, 2, 3, 4, 5, 6, 7, 0, 1]
    steps = generate(target, drafter, context, gamma=FixedSchedule([3, 4, 2, 0, 3, 1]), params=SamplingParams(),
                     max_new_tokens=60, generator=torch.Generator().manual_seed(0), stepper=stepper)
    context = list(context)
    for step in steps:
        context += step.tokens
        if step.stats.finish_reason:
            break
        length = len(context) - 1  # the last token is fed by the next step
        assert target.length == length
        fresh.truncate(0)
        fresh.forward(torch.tensor(context[:-1]), 0)
        torch.testing.assert_close(target.k_cache[:, :length], fresh.k_cache[:, :length], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(target.v_cache[:, :length], fresh.v_cache[:, :length], atol=1e-4, rtol=1e-4)
        if target.features is not None:
            torch.testing.assert_close(target.features[:length], fresh.features[:length], atol=1e-4, rtol=1e-4)
    assert step.stats.alternatives_kept > 0
    assert (step.stats.lookup_tokens > 0) == bool(lookup)  # runs of the lookup branch were kept and moved


@pytest.mark.parametrize("k, params, device, lookup", [
    (1, SamplingParams(), "cpu", 0),
    *((3, SamplingParams(), device, 0) for device in DEVICES if device == "cuda"),
    *((3, SamplingParams(top_p=0.8), device, 0) for device in DEVICES),
    *((1, SamplingParams(), device, 2) for device in DEVICES),
    *((3, SamplingParams(top_p=0.8), device, 2) for device in DEVICES),
], ids=lambda v: v if isinstance(v, (str, int)) else None)
def test_run_ahead_feature_steps_follow_the_exact_target_law(k, params, device, lookup, gof):
    """1500 seeded runs of 6 tokens, γ = 2, with run-ahead: the second step's replay is launched
    before the first one's output is read, from the inputs the first advanced on the device (with a
    lookup branch of 2, found on the device from the history the first step's replay extended: two steps of
    up to 3 tokens each fit in the 6, so the second is launched ahead)."""
    target, draft = feature_pair(5, seed=3, device=device)
    drafter = FeatureDrafter(draft, target, candidates=k)
    tokens, *_, lookup_tokens = engine_runs(target, drafter, 2, params, True, k, lookup=lookup, run_ahead=True)
    if lookup:
        assert lookup_tokens > NUM_RUNS // 5  # the lookup branch's tokens are really kept
    law = exact_law(feature_pair(5, seed=3)[0], params, gof)
    pvalue, fits = window_pvalue(gof, tokens, law)
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("device", DEVICES)
def test_run_ahead_under_a_gamma_policy_follows_the_exact_target_law(device, gof):
    """1500 seeded runs of 6 tokens under a γ schedule (2, 1, 2, 0, 3, ...): with run-ahead the
    next step's γ is chosen when that step is launched, before this one is read, and a step of
    another γ starts from the inputs this one advanced on the device."""
    target, draft = feature_pair(5, seed=3, device=device)
    tokens, _ = engine_runs(target, FeatureDrafter(draft, target, candidates=3), FixedSchedule([2, 1, 2, 0, 3]),
                            SamplingParams(top_k=4), True, 3, run_ahead=True)
    law = exact_law(feature_pair(5, seed=3)[0], SamplingParams(top_k=4), gof)
    pvalue, fits = window_pvalue(gof, tokens, law)
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("device", DEVICES)
def test_run_ahead_under_a_gamma_policy_takes_the_steps_chosen_ahead(device):
    """A γ schedule (γ 0 and lengths longer than any before among them: those are chosen ahead but
    launched only when reached) gives the same steps and tokens with run-ahead as without, to the
    end of the request (where γ is capped as the engine caps it); greedy output equals plain
    decoding."""
    target, draft = feature_pair(8, seed=5, kept=6, device=device)
    prompt = [1, 2, 3, 4, 5, 6, 7, 0, 1]
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=60)
    for params in (GREEDY, SamplingParams(temperature=0.8)):
        runs = {}
        for ahead in (False, True):
            stepper = FusedStepper(target, draft, compile=False, candidates=3, run_ahead=ahead)
            steps = list(generate(target, FeatureDrafter(draft, target, candidates=3), prompt,
                                  gamma=FixedSchedule([2, 3, 0, 1, 5, 4, 2, 0, 3, 5, 1]), params=params,
                                  max_new_tokens=60, generator=torch.Generator(device=device).manual_seed(2),
                                  stepper=stepper))
            runs[ahead] = [(s.tokens, s.num_drafted, s.num_accepted) for s in steps]
            if params is GREEDY:
                assert [t for s in steps for t in s.tokens] == expected
            assert (stepper.ahead_launches > 5) == ahead
        assert runs[True] == runs[False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, lookup", [(1, 0), (3, 0), (1, 4), (3, 4)])
def test_run_ahead_steps_are_the_same_steps_one_at_a_time(k, lookup, device):
    """Greedy: the same tokens as plain decoding. Sampled (a step launched ahead draws its uniforms
    as it would alone, and finds the lookup branch it would alone): the same tokens and the same
    per-step stats with run-ahead (the next replay launched before this one is read) as without; with
    run-ahead, after each step the target's cache and features equal a fresh prefill."""
    target, draft = feature_pair(8, seed=5, kept=6, device=device)
    prompt = [1, 2, 3, 4, 5, 6, 7, 0, 1]
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=50)
    for params in (GREEDY, SamplingParams(), SamplingParams(temperature=0.7, top_k=5)):
        runs = {}
        for run_ahead in (False, True):
            stepper = FusedStepper(target, draft, compile=False, candidates=k, lookup=lookup, run_ahead=run_ahead)
            generator = torch.Generator(device=device).manual_seed(4)
            steps = list(generate(target, with_lookup(FeatureDrafter(draft, target, candidates=k), lookup), prompt,
                                  gamma=3, params=params, max_new_tokens=50, generator=generator, stepper=stepper))
            runs[run_ahead] = ([t for s in steps for t in s.tokens], [(s.num_drafted, s.num_accepted) for s in steps],
                               steps[-1].stats.lookup_tokens)
            assert (stepper.ahead_launches > 0) == run_ahead
        if params is GREEDY:
            assert runs[True][0] == expected
        assert runs[True] == runs[False]
        assert (runs[True][2] > 0) == bool(lookup)  # the lookup branch's tokens were kept
    fresh = LeanModel(target.weights, max_seq_len=96)
    fresh.keep_features()
    stepper = FusedStepper(target, draft, compile=False, candidates=k, lookup=lookup, run_ahead=True)
    context, checked = list(prompt), 0
    for step in generate(target, with_lookup(FeatureDrafter(draft, target, candidates=k), lookup), prompt, gamma=3,
                         params=SamplingParams(), max_new_tokens=50, generator=torch.Generator(device=device).manual_seed(1),
                         stepper=stepper):
        context += step.tokens
        if step.stats.finish_reason:
            continue
        length = len(context) - 1
        assert target.length == length
        fresh.truncate(0)
        fresh.forward(torch.tensor(context[:-1], device=device), 0)
        torch.testing.assert_close(target.k_cache[:, :length], fresh.k_cache[:, :length], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(target.v_cache[:, :length], fresh.v_cache[:, :length], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(target.features[:length], fresh.features[:length], atol=1e-4, rtol=1e-4)
        checked += 1
    # the run-ahead graphs (γ 3, and the shorter γs the room left cuts the last steps to) took most steps
    assert any(key[:2] == ("features-ahead", 3) for key in stepper.graphs)
    assert checked >= 3 and stepper.ahead_launches > checked // 2
    if k > 1:
        assert step.stats.alternatives_kept > 0


def token_pair(device: str = "cpu") -> tuple[LeanModel, LeanModel]:
    """A tiny target (vocab 8, 2 layers) and a one-layer token draft of it."""
    target = LeanModel(random_weights(tiny_config(vocab_size=8, num_layers=2), seed=5, scale=2.0).to(device),
                       max_seq_len=96)
    draft = LeanModel(random_weights(tiny_config(vocab_size=8, num_layers=1), seed=6, scale=2.0).to(device),
                      max_seq_len=96)
    return target, draft


@pytest.mark.parametrize("k, lookup", [(1, 0), (3, 0), (1, 2), (3, 2)])
def test_run_ahead_token_draft_steps_follow_the_exact_target_law(k, lookup, gof):
    """1500 seeded runs of 6 tokens, γ = 2, a token draft with run-ahead: the second step's replay is launched
    before the first one's output is read, from the window the first advanced on the device (and a lookup branch
    of 2 found on the device)."""
    target = feature_pair(5, seed=3)[0]
    draft = LeanModel(random_weights(tiny_config(vocab_size=5, num_layers=1), seed=9), max_seq_len=96)
    tokens, *_, lookup_tokens = engine_runs(target, ModelDrafter(draft, candidates=k), 2, SamplingParams(), True, k,
                                            lookup=lookup, run_ahead=True)
    if lookup:
        assert lookup_tokens > NUM_RUNS // 5
    pvalue, fits = window_pvalue(gof, tokens, exact_law(target, SamplingParams(), gof))
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, lookup", [(1, 0), (3, 0), (1, 4), (3, 4)])
def test_run_ahead_token_draft_steps_are_the_same_steps_one_at_a_time(k, lookup, device):
    """A token draft with run-ahead (its window of the last W tokens re-read every step, so a step launched
    ahead reads what it would alone): over requests in a row on one stepper, greedy and sampled, some ended by a
    stop token, some under a γ schedule, the same tokens and per-step stats as one replay at a time, and greedy
    output equals plain decoding. With a lookup branch, each request's history starts from its own prompt,
    whatever the replay launched ahead of a stop token wrote."""
    target, draft = token_pair(device)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 0, 1], [7, 0, 1], [2, 2, 2, 2, 2, 6], [5, 1, 4]]
    stop = [reference_generate(target, prompts[0], params=GREEDY, max_new_tokens=12)[9]]
    runs = {}
    for ahead in (False, True):
        gammas = [3, 3, FixedSchedule([2, 3, 0, 1, 3, 3, 2, 0, 3]), 3]  # a schedule has a state: one per run
        stepper = FusedStepper(target, draft, compile=False, candidates=k, lookup=lookup, run_ahead=ahead)
        runs[ahead] = []
        for i, params in enumerate([GREEDY, SamplingParams(), SamplingParams(temperature=0.7, top_k=5), GREEDY]):
            prompt = prompts[i]
            steps = list(generate(target, with_lookup(ModelDrafter(draft, candidates=k), lookup), prompt,
                                  gamma=gammas[i], params=params,
                                  max_new_tokens=40, stop_ids=stop if i == 0 else [], stepper=stepper,
                                  generator=torch.Generator(device=device).manual_seed(i)))
            tokens = [t for s in steps for t in s.tokens]
            if params is GREEDY:
                expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=40)
                assert tokens == (expected[:expected.index(stop[0]) + 1] if i == 0 else expected)
            runs[ahead].append((tokens, [(s.num_drafted, s.num_accepted) for s in steps],
                                steps[-1].stats.finish_reason, steps[-1].stats.lookup_tokens))
        assert (stepper.ahead_launches > 5) == ahead
        if ahead:
            assert any(key[:2] == ("model-ahead", 3) for key in stepper.graphs)
    assert runs[True] == runs[False]
    assert runs[True][0][2] == "stop"
    assert (sum(run[3] for run in runs[True]) > 0) == bool(lookup)


@pytest.mark.parametrize("device", DEVICES)
def test_steps_run_alone_are_flagged_alone_and_only_those(device):
    """A run-ahead stepper launches most steps before the one in flight is read; those it runs alone
    (the request's first, one after a plain step, one longer than any before, one cut to the room
    left) are slower, so they say so (calibration leaves their times out). One at a time: none is."""

    class Recording(FixedSchedule):
        def __init__(self, gammas):
            super().__init__(gammas)
            self.seen = []  # (γ asked, timed) per observed step

        def observe(self, drafted, accepted, asked=None, **branch):
            self.seen.append((asked, not stepper.last_alone))

    class RecordingStepper(FusedStepper):
        last_alone = False

        def step(self, *args, **kwargs):
            result = super().step(*args, **kwargs)
            self.last_alone = result.alone
            return result

    target, draft = feature_pair(8, seed=5, kept=6, device=device)
    prompt = [1, 2, 3, 4, 5, 6, 7, 0, 1]
    for ahead in (False, True):
        policy = Recording([3, 3, 3, 0, 3, 3, 5, 5, 3, 3])
        stepper = RecordingStepper(target, draft, compile=False, candidates=3, run_ahead=ahead)
        list(generate(target, FeatureDrafter(draft, target, candidates=3), prompt, gamma=policy, params=GREEDY,
                      max_new_tokens=40, generator=torch.Generator(device=device).manual_seed(2), stepper=stepper))
        untimed = [i for i, (_, timed) in enumerate(policy.seen) if not timed]
        if not ahead:
            assert untimed == []
            continue
        # the first; after the plain steps 3 and 13; the first γ 5 (the second was launched ahead)
        assert untimed[:4] == [0, 4, 6, 14], policy.seen
        assert all(policy.seen[i][0] != 0 for i in untimed)  # plain steps are never "alone"
        assert len(untimed) < len(policy.seen) / 2
