"""Several candidates per draft position (acceptance.verify_candidates): the tree layout, the
target's tree forward, the rule's law (sampled alternatives, deterministic ones, a used-up
support) against negative controls, and end to end through the engine and the fused step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_features import PROMPT, FixedSchedule, exact_law, feature_pair, window_pvalue

from speculant.acceptance import candidate_tree, verify, verify_candidates
from speculant.drafters.base import draw_alternatives
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.model import ModelDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams, sample_from

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
    _, ancestors = candidate_tree(gamma, k)
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


def _emitted(mode: str, variant: str = "dense", seed: int = 0):
    """DRAWS independent steps of the toy (vmapped); returns each step's emitted tokens and how many
    steps kept an alternative.

    mode: "sampled" (alternatives without replacement, honest laws), "deterministic" (the draft's
    most likely tokens, point masses: exact for any choice made before the uniforms are read), and
    the broken samplers "stale-laws" (every alternative reported with the draft's full law, the
    earlier candidates not removed) and "uniform-laws" (alternatives reported as uniform draws)."""
    root, markov, draft_root, draft_markov = toy = _toy(seed, variant)

    def one_step(chain_u, noise, accept_u, sample_u):
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
        nodes = torch.cat([candidates[:, 0], candidates[:, 1:].reshape(-1)])
        target_probs = torch.cat([root[None], markov.index_select(0, nodes)])  # [1 + γk, V]
        verdict = verify_candidates(candidates, torch.stack(laws) if laws else None, target_probs, accept_u, sample_u)
        return torch.stack(list(verdict)), candidates

    gen = torch.Generator().manual_seed(seed + 1)
    verdicts, candidates = torch.vmap(one_step)(
        torch.rand(DRAWS, GAMMA, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA, V, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA, K, generator=gen, dtype=torch.float64),
        torch.rand(DRAWS, GAMMA + 1, generator=gen, dtype=torch.float64))
    sequences = []
    for (kept, alternative, next_token), step in zip(verdicts.tolist(), candidates.tolist()):
        tokens = [row[0] for row in step[:kept]] + ([step[kept][alternative]] if alternative else [])
        sequences.append(tokens + [next_token])
    return sequences, int((verdicts[:, 1] > 0).sum()), toy


def _law_pvalue(gof, sequences, toy) -> float:
    """Chi-square of the first tokens against root, and of every later token against markov[the token
    before it] (pooled over positions); Bonferroni over the fits."""
    root, markov = toy[0].numpy(), toy[1].numpy()
    fits = [gof.chi_square(np.array([s[0] for s in sequences]), root)]
    following = {a: [] for a in range(V)}
    for s in sequences:
        for before, token in zip(s, s[1:]):
            following[before].append(token)
    fits += [gof.chi_square(np.array(tokens), markov[a]) for a, tokens in following.items() if len(tokens) > 50]
    return min(1.0, len(fits) * min(f.pvalue for f in fits))


@pytest.mark.parametrize("mode, variant", [("sampled", "dense"), ("deterministic", "dense"),
                                           ("sampled", "sparse-draft"), ("sampled", "sparse-target")])
def test_the_candidate_rule_emits_the_targets_law(mode, variant, gof):
    sequences, alternatives_kept, toy = _emitted(mode, variant)
    assert alternatives_kept > DRAWS // 20  # the alternatives are really kept, and their bonuses drawn
    assert sum(len(s) == GAMMA + 1 for s in sequences) > DRAWS // 20  # and whole chains too
    assert _law_pvalue(gof, sequences, toy) >= gof.SIGNIFICANCE


@pytest.mark.parametrize("mode", ["stale-laws", "uniform-laws"])
def test_a_candidate_sampler_that_misreports_its_laws_is_caught(mode, gof):
    sequences, _, toy = _emitted(mode)
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


def engine_runs(target, drafter, gamma, params, fused: bool, candidates: int):
    generator = torch.Generator(device=target.device).manual_seed(0)
    stepper = FusedStepper(target, drafter.model, compile=False, candidates=candidates) if fused else None
    out = np.empty((NUM_RUNS, 6), dtype=np.int64)
    alternatives_kept = 0
    for i in range(NUM_RUNS):
        steps = list(generate(target, drafter, PROMPT, gamma=gamma, params=params, max_new_tokens=6,
                              generator=generator, stepper=stepper))
        out[i] = [t for s in steps for t in s.tokens]
        alternatives_kept += steps[-1].stats.alternatives_kept
    return out, alternatives_kept


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["features", "model"])
def test_greedy_with_candidates_equals_plain_greedy_generic_and_fused(kind, device):
    if kind == "features":
        target, draft = feature_pair(8, seed=5, kept=6, device=device)
        make = lambda: FeatureDrafter(draft, target, candidates=3)
    else:
        target = LeanModel(random_weights(tiny_config(vocab_size=8, num_layers=2), seed=5, scale=2.0).to(device),
                           max_seq_len=96)
        draft = LeanModel(random_weights(tiny_config(vocab_size=8, num_layers=1), seed=6, scale=2.0).to(device),
                          max_seq_len=96)
        make = lambda: ModelDrafter(draft, candidates=3)
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
            tau[k, fused] = steps[-1].stats.tau
            if k == 3:  # near the end the 1 + 4·3 tree slots no longer fit: those steps verify a chain
                assert any(len(s.tokens) > 1 for s in steps[-3:]) or steps[-1].stats.alternatives_kept > 0
    assert tau[3, False] > tau[1, False] and tau[3, True] > tau[1, True]


@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
@pytest.mark.parametrize("kind", ["features", "gemma3-model"])
def test_after_every_sampled_step_the_target_cache_and_features_equal_a_fresh_prefill(kind, fused):
    """Kept alternatives move their K/V (and feature) slot to their position: after each step the
    target's cache holds exactly what a fresh prefill of the committed text gives."""
    if kind == "features":
        target, draft = feature_pair(8, seed=5, kept=6)
        drafter = FeatureDrafter(draft, target, candidates=3)
    else:  # sliding-window layers (window 4) under the tree mask
        target = LeanModel(random_weights(tiny_config("gemma3", vocab_size=8), seed=1), max_seq_len=96)
        draft = LeanModel(random_weights(tiny_config("gemma3", vocab_size=8, num_layers=1), seed=11), max_seq_len=96)
        drafter = ModelDrafter(draft, candidates=3)
    fresh = LeanModel(target.weights, max_seq_len=96)
    if target.features is not None:
        fresh.keep_features()
    stepper = FusedStepper(target, draft, compile=False, candidates=3) if fused else None
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
