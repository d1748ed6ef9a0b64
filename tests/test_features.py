"""Feature drafts (EAGLE-style: the draft reads the target's last hidden state): exact law end to
end, greedy equality (generic loop and fused step, with γ changing and dropping to 0), serving vs
training forward, distillation and the folder round trip."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from speculant.distill.data import TokenCorpus
from speculant.distill.evaluate import heldout_alpha
from speculant.distill.objective import target_outputs_batch
from speculant.distill.options import DistillOptions
from speculant.distill.train import train_draft
from speculant.drafters.base import Draft
from speculant.drafters.features import FeatureDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.models.feature_draft import DraftConfig, FeatureDraft, build_draft, init_random, load_draft
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams, logits_to_probs, sample_from

GREEDY = SamplingParams(temperature=0)


def feature_pair(vocab: int, seed: int = 0, target_scale: float = 2.0, draft_scale: float = 1.0,
                 kept: int | None = None, max_seq_len: int = 96, device: str = "cpu"):
    """A tiny llama target and a random one-layer feature draft over its embedding."""
    weights = random_weights(tiny_config(vocab_size=vocab, num_layers=2), seed=seed, scale=target_scale)
    target = LeanModel(weights.to(device), max_seq_len=max_seq_len)
    cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=kept or vocab, inputs="features")
    kept_ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[: cfg.num_kept]
    draft = build_draft(cfg, target.weights, kept_ids, max_seq_len=max_seq_len)
    init_random(draft.draft_weights, seed + 1, scale=draft_scale)
    return target, draft


class FixedSchedule:
    """A γ policy that replays a fixed schedule (with zeros: steps without drafting)."""

    def __init__(self, gammas) -> None:
        self.gammas = itertools.cycle(gammas)

    def choose(self) -> int:
        return next(self.gammas)

    def observe(self, *args, **kwargs) -> None:
        pass


# ================================================================ the exact law, end to end

VOCAB = 5
PROMPT = [0, 3, 1, 4, 2, 2, 0, 1]
NUM_RUNS = 1500
NUM_TOKENS = 6


def exact_law(target: LeanModel, params: SamplingParams, gof) -> np.ndarray:
    """P(t1..t6 | PROMPT) under the transformed target, by enumerating every continuation
    (5^5 prefixes) with float64 arithmetic on the target's logits: [V]^6."""
    law = np.ones([1] * 0)
    prefixes = [[]]
    for _ in range(NUM_TOKENS):
        batch = torch.tensor([PROMPT + p for p in prefixes])
        logits = target_outputs_batch(target, batch)[0][:, -1].double().numpy()  # [N, V]
        step = gof.transform(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             min_p=params.min_p)
        law = (law.reshape(-1, 1) * step).reshape(-1)
        prefixes = [p + [t] for p in prefixes for t in range(VOCAB)]
    return law.reshape([VOCAB] * NUM_TOKENS)


class Misreporting(FeatureDrafter):
    """Samples from the draft but tells the verifier 'uniform': the negative control."""

    def propose(self, context, gamma, params, generator) -> Draft:
        draft = super().propose(context, gamma, params, generator)
        if draft.probs is None:
            return draft
        return Draft(draft.tokens, torch.full_like(draft.probs, 1.0 / draft.probs.shape[-1]))


def runs(target, drafter, gamma, params, fused: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    stepper = FusedStepper(target, drafter.model, compile=False) if fused else None
    out = np.empty((NUM_RUNS, NUM_TOKENS), dtype=np.int64)
    accepted = tested = 0
    for i in range(NUM_RUNS):
        steps = list(generate(target, drafter, PROMPT, gamma=gamma, params=params, max_new_tokens=NUM_TOKENS,
                              generator=generator, stepper=stepper))
        out[i] = [t for s in steps for t in s.tokens]
        accepted += steps[-1].stats.accepted
        tested += steps[-1].stats.accepted + steps[-1].stats.rejections
    return out, accepted / tested


def window_pvalue(gof, tokens, law):
    """Chi-square of (t1, t2, t3) and of (t4, t5, t6), 125 cells each; Bonferroni over the two."""
    fits = []
    for k, window in enumerate([law.sum(axis=(3, 4, 5)), law.sum(axis=(0, 1, 2))]):
        codes = tokens[:, 3 * k] * VOCAB**2 + tokens[:, 3 * k + 1] * VOCAB + tokens[:, 3 * k + 2]
        fits.append(gof.chi_square(codes, window.ravel()))
    return min(1.0, 2 * min(f.pvalue for f in fits)), fits


@pytest.mark.parametrize("gamma, params, fused", [
    (2, SamplingParams(), False),
    (4, SamplingParams(top_p=0.8), False),
    (3, SamplingParams(), True),
], ids=["g2-plain", "g4-top_p", "fused-g3-plain"])
def test_feature_draft_output_follows_the_exact_target_law(gamma, params, fused, gof):
    """1500 seeded engine runs of a 5-token tiny transformer target with a feature draft; level 1e-4."""
    target, draft = feature_pair(VOCAB, seed=3)
    law = exact_law(target, params, gof)
    tokens, alpha = runs(target, FeatureDrafter(draft, target), gamma, params, fused)
    assert 0.2 < alpha < 0.95, alpha  # drafts are accepted and rejected: both paths run
    pvalue, fits = window_pvalue(gof, tokens, law)
    assert pvalue >= gof.SIGNIFICANCE, fits


def test_a_feature_drafter_that_misreports_its_probabilities_is_caught(gof):
    target, draft = feature_pair(VOCAB, seed=3)
    law = exact_law(target, SamplingParams(), gof)
    tokens, _ = runs(target, Misreporting(draft, target), 2, SamplingParams(), fused=False)
    pvalue, _ = window_pvalue(gof, tokens, law)
    assert pvalue < gof.SIGNIFICANCE


# ================================================================ greedy equality, generic and fused

@pytest.mark.parametrize("prompt", [[7], [3, 1], [1, 2, 3, 4, 5, 6, 7]], ids=["len1", "len2", "len7"])
@pytest.mark.parametrize("gamma", [1, 3, 5, "schedule"])
def test_greedy_feature_speculation_equals_plain_greedy_generic_and_fused(prompt, gamma):
    # 8 tokens, 6 kept: a random draft agrees with the target's argmax often enough to be accepted
    target, draft = feature_pair(8, seed=5, kept=6)
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=40)
    accepted = {}
    for fused in (False, True):
        policy = FixedSchedule([3, 0, 0, 0, 0, 0, 2, 5, 1, 0, 4]) if gamma == "schedule" else gamma
        stepper = FusedStepper(target, draft, compile=False) if fused else None
        steps = list(generate(target, FeatureDrafter(draft, target), prompt, gamma=policy, params=GREEDY,
                              max_new_tokens=40, stepper=stepper))
        assert [t for s in steps for t in s.tokens] == expected
        accepted[fused] = [s.num_accepted for s in steps]
    # the fused step re-reads a window and catches up after γ = 0 steps: its drafts are the same
    assert accepted[True] == accepted[False]
    assert sum(accepted[False]) > 0


def test_serving_forward_matches_the_batched_training_forward():
    target, draft = feature_pair(64, seed=2)
    tokens = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    _, features = target_outputs_batch(target, tokens)
    logits, predicted = draft.train_feature_outputs(tokens, features)  # [3, 20, K], [3, 20, E]
    for row in range(3):
        draft.truncate(0)
        served_logits, served_predicted = draft.forward_features(tokens[row, :12], features[row, :12], 0)
        more_logits, more_predicted = draft.forward_features(tokens[row, 12:], features[row, 12:], 12)
        torch.testing.assert_close(torch.cat([served_predicted, more_predicted]), predicted[row], atol=1e-5, rtol=1e-5)
        full = torch.cat([served_logits, more_logits])[:, draft.kept_ids]
        torch.testing.assert_close(full, logits[row], atol=1e-4, rtol=1e-4)


def test_a_feature_draft_cannot_be_run_without_features():
    _, draft = feature_pair(64)
    with pytest.raises(TypeError, match="features"):
        draft.forward(torch.tensor([1, 2]), 0)


# ================================================================ distillation

SEQ_LEN = 32


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    target = LeanModel(random_weights(tiny_config(vocab_size=64, num_layers=2), seed=1, scale=3.0), max_seq_len=128)
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 64, (416, 1), generator=gen)
    while seqs.shape[1] < SEQ_LEN:  # the target's own samples: text with structure to learn
        probs = logits_to_probs(target_outputs_batch(target, seqs)[0][:, -1], SamplingParams())
        seqs = torch.cat([seqs, sample_from(probs, torch.rand(416, generator=gen))[:, None]], 1)
    corpus = TokenCorpus(seqs[:400], seqs[400:], {"given": True})
    out = tmp_path_factory.mktemp("feature-draft")
    options = DistillOptions(steps=150, batch_size=8, seq_len=SEQ_LEN, lr=1e-2, num_layers=1, num_kept=48,
                             inputs="features", save_dtype="float32", eval_sequences=16, engine_prompts=2,
                             engine_new_tokens=16, checkpoint_every=1000, progress=False)
    metadata = train_draft(target, corpus, out, options, target_name="tiny", target_hash="tiny-sha")
    return target, corpus, out, metadata


def test_feature_distillation_raises_alpha_and_reports_the_second_draft_position(feature_run):
    _, _, _, m = feature_run
    assert m["alpha_t0"] > m["alpha_t0_before"] + 0.1, m
    assert m["alpha_t1"] > m["alpha_t1_before"] + 0.1, m
    assert 0 < m["alpha2_t1"] <= 1 and 0 < m["alpha2_t0"] <= 1
    assert m["loss_history"][-1] < m["loss_history"][0]
    assert m["engine_alpha_t1"] > 0


def test_feature_draft_folder_round_trips(feature_run):
    target, corpus, out, m = feature_run
    draft = load_draft(out, (target.weights, "tiny-sha"))
    assert isinstance(draft, FeatureDraft) and draft.draft_weights.draft_cfg.inputs == "features"
    assert heldout_alpha(target, draft, corpus.heldout[:16])["alpha_t1"] == pytest.approx(m["alpha_t1"], abs=1e-6)
    prompt = corpus.heldout[0, :6].tolist()
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=30)
    steps = list(generate(target, FeatureDrafter(draft, target), prompt, gamma=4, params=GREEDY, max_new_tokens=30))
    assert [t for s in steps for t in s.tokens] == expected
