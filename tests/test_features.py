"""Feature drafts (EAGLE-style: the draft reads the target's last hidden state): exact law end to
end, greedy equality (generic loop and fused step, with γ changing and dropping to 0), serving vs
training forward, distillation and the folder round trip."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speculant.distill.cli import main as distill_main
from speculant.distill.data import DistillError, TokenCorpus
from speculant.distill.evaluate import heldout_alpha
from speculant.distill.objective import distill_loss, feature_draft_losses, target_outputs_batch
from speculant.distill.options import DistillOptions
from speculant.distill.train import train_draft
from speculant.drafters.base import Draft
from speculant.drafters.features import FeatureDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.models.feature_draft import (
    DraftConfig,
    DraftWeights,
    FeatureDraft,
    build_draft,
    init_random,
    load_draft,
)
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams, logits_to_probs, sample_from

GREEDY = SamplingParams(temperature=0)


def feature_pair(vocab: int, seed: int = 0, target_scale: float = 2.0, draft_scale: float = 1.0,
                 kept: int | None = None, max_seq_len: int = 96, device: str = "cpu",
                 feature_layers: tuple[int, ...] = (), num_layers: int = 2, feature_rank: int = 0):
    """A tiny llama target and a random one-layer feature draft over its embedding (with
    feature_layers: reading those target layers too, through a random, non-zero tap mix)."""
    weights = random_weights(tiny_config(vocab_size=vocab, num_layers=num_layers), seed=seed, scale=target_scale)
    target = LeanModel(weights.to(device), max_seq_len=max_seq_len)
    cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=kept or vocab, inputs="features",
                                 feature_layers=feature_layers, feature_rank=feature_rank)
    kept_ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[: cfg.num_kept]
    draft = build_draft(cfg, target.weights, kept_ids, max_seq_len=max_seq_len)
    init_random(draft.draft_weights, seed + 1, scale=draft_scale)
    if feature_layers:  # init_random starts the mix at zero: make the taps count
        mix = draft.draft_weights.tap_mix.weight
        with torch.no_grad():
            mix.copy_(torch.randn(mix.shape, generator=torch.Generator().manual_seed(seed + 2)) / mix.shape[1] ** 0.5)
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


@pytest.mark.parametrize("gamma, params, fused, taps", [
    (2, SamplingParams(), False, ()),
    (4, SamplingParams(top_p=0.8), False, ()),
    (3, SamplingParams(), True, ()),
    (3, SamplingParams(), False, (0,)),
    (2, SamplingParams(top_k=3), True, (0,)),
], ids=["g2-plain", "g4-top_p", "fused-g3-plain", "taps-g3-plain", "taps-fused-g2-top_k"])
def test_feature_draft_output_follows_the_exact_target_law(gamma, params, fused, taps, gof):
    """1500 seeded engine runs of a 5-token tiny transformer target with a feature draft (taps: one
    that also reads the target's layer 0); level 1e-4."""
    target, draft = feature_pair(VOCAB, seed=3, feature_layers=taps)
    law = exact_law(target, params, gof)
    tokens, alpha = runs(target, FeatureDrafter(draft, target), gamma, params, fused)
    assert 0.2 < alpha < 0.95, alpha  # drafts are accepted and rejected: both paths run
    pvalue, fits = window_pvalue(gof, tokens, law)
    assert pvalue >= gof.SIGNIFICANCE, fits


@pytest.mark.parametrize("taps", [(), (0,)], ids=["final", "taps"])
def test_a_feature_drafter_that_misreports_its_probabilities_is_caught(taps, gof):
    target, draft = feature_pair(VOCAB, seed=3, feature_layers=taps)
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
    # "chunks": the fused stepper's plain steps decode 4 tokens a replay (its default): other steps, same tokens
    for fused in (False, True, "chunks"):
        policy = FixedSchedule([3, 0, 0, 0, 0, 0, 2, 5, 1, 0, 4]) if gamma == "schedule" else gamma
        stepper = FusedStepper(target, draft, compile=False, plain_chunk=1 if fused is True else 4) if fused else None
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


def feature_options(**overrides) -> DistillOptions:
    base = {"steps": 150, "batch_size": 8, "seq_len": SEQ_LEN, "lr": 1e-2, "num_layers": 1, "num_kept": 48,
            "inputs": "features", "save_dtype": "float32", "eval_sequences": 16, "engine_prompts": 2,
            "engine_new_tokens": 16, "checkpoint_every": 1000, "progress": False}
    return DistillOptions(**{**base, **overrides})


@pytest.fixture(scope="module")
def feature_corpus():
    """A tiny target and a corpus of its own samples at T = 1: text with structure to learn."""
    target = LeanModel(random_weights(tiny_config(vocab_size=64, num_layers=2), seed=1, scale=3.0), max_seq_len=128)
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 64, (416, 1), generator=gen)
    while seqs.shape[1] < SEQ_LEN:
        probs = logits_to_probs(target_outputs_batch(target, seqs)[0][:, -1], SamplingParams())
        seqs = torch.cat([seqs, sample_from(probs, torch.rand(416, generator=gen))[:, None]], 1)
    return target, TokenCorpus(seqs[:400], seqs[400:], {"given": True})


@pytest.fixture(scope="module")
def feature_run(feature_corpus, tmp_path_factory):
    target, corpus = feature_corpus
    out = tmp_path_factory.mktemp("feature-draft")
    metadata = train_draft(target, corpus, out, feature_options(), target_name="tiny", target_hash="tiny-sha")
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


# ================================================================ training-time test (--rollout-steps)


def two_pass_loss_as_shipped(trainer, tokens, target_logits, target_features, kept_ids, temperature, feature_weight):
    """A copy of the objective the shipped draft was trained with (before --rollout-steps): pass 1 on
    the true features, pass 2 on pass 1's predictions one position on; distillation + regression."""
    inputs = tokens[:, 1:]
    true_next = target_features[:, 1:].float()
    scored = target_logits[:, 1:].flatten(0, 1)
    logits1, predicted1 = trainer.train_feature_outputs(inputs, target_features[:, :-1])
    loss1, alpha1, _ = distill_loss(logits1.flatten(0, 1), scored, kept_ids, temperature)
    own = torch.cat([target_features[:, :1].to(predicted1.dtype), predicted1[:, :-1].detach()], 1)
    logits2, predicted2 = trainer.train_feature_outputs(inputs, own)
    loss2, alpha2, _ = distill_loss(logits2.flatten(0, 1), scored, kept_ids, temperature)
    regression = F.smooth_l1_loss(predicted1.float(), true_next) + F.smooth_l1_loss(predicted2.float(), true_next)
    return loss1 + loss2 + feature_weight * regression, alpha1, alpha2


def _loss_and_grads(draft, loss_fn):
    params = [p for p in draft.draft_weights.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def _batch(seed: int = 0):
    """A trainable float32 feature draft (as train_draft builds it: 16 ids outside its vocabulary) and
    a batch: tokens [3, 20], the target's logits and features on it."""
    target, _ = feature_pair(64, seed=seed)
    cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=48, inputs="features")
    kept = torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:48]
    weights = DraftWeights(cfg, target.weights.embed_tokens, kept, target.weights.head_weight().detach()[kept])
    init_random(weights, seed + 1)
    draft = FeatureDraft(weights.to(torch.float32), max_seq_len=96)
    tokens = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(seed))
    logits, features = target_outputs_batch(target, tokens)  # [3, 20, V], [3, 20, E]
    return draft, tokens, logits, features


def test_two_rollout_steps_are_exactly_the_shipped_two_pass_objective():
    draft, tokens, logits, features = _batch()
    kept = draft.kept_ids
    old_loss, old_grads = _loss_and_grads(draft, lambda: two_pass_loss_as_shipped(
        draft, tokens, logits, features, kept, 1.0, 0.7)[0])
    new_loss, new_grads = _loss_and_grads(draft, lambda: feature_draft_losses(
        draft, tokens, logits, features, kept, 1.0, 0.7)[0])
    assert torch.equal(new_loss, old_loss)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))
    _, alpha1, alpha2 = two_pass_loss_as_shipped(draft, tokens, logits, features, kept, 1.0, 0.7)
    _, alphas = feature_draft_losses(draft, tokens, logits, features, kept, 1.0, 0.7, rollout_steps=2,
                                     rollout_weight_decay=1.0)
    assert torch.equal(alphas, torch.stack([alpha1, alpha2]))
    assert DistillOptions().rollout_steps == 2 and DistillOptions().rollout_weight_decay == 1.0


def test_pass_k_reads_pass_k_minus_1_and_weighs_decay_to_the_k_minus_1():
    draft, tokens, logits, features = _batch(seed=3)
    kept, inputs, true_next = draft.kept_ids, tokens[:, 1:], features[:, 1:]
    scored = logits[:, 1:].flatten(0, 1)
    read, distill, regression, alphas = features[:, :-1], 0.0, 0.0, []
    for k in range(3):  # by hand: pass k+1 reads pass k's predictions, one position on
        pass_logits, predicted = draft.train_feature_outputs(inputs, read)
        loss, alpha, _ = distill_loss(pass_logits.flatten(0, 1), scored, kept, 1.0)
        distill = distill + 0.5 ** k * loss
        regression = regression + 0.5 ** k * F.smooth_l1_loss(predicted, true_next)
        alphas.append(alpha)
        read = torch.cat([features[:, :1], predicted[:, :-1].detach()], 1)
    loss, got_alphas = feature_draft_losses(draft, tokens, logits, features, kept, 1.0, 2.0, rollout_steps=3,
                                            rollout_weight_decay=0.5)
    torch.testing.assert_close(loss, distill + 2.0 * regression, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_alphas, torch.stack(alphas))
    one, alpha_one = feature_draft_losses(draft, tokens, logits, features, kept, 1.0, 2.0, rollout_steps=1)
    assert alpha_one.shape == (1,) and one < loss


def test_three_rollout_steps_train_and_report_alpha_for_each_pass(feature_corpus, tmp_path):
    target, corpus = feature_corpus
    m = train_draft(target, corpus, tmp_path, feature_options(steps=100, rollout_steps=3, rollout_weight_decay=0.8),
                    target_name="tiny", target_hash="tiny-sha")
    for t in (0, 1):
        assert m[f"alpha_t{t}"] > m[f"alpha_t{t}_before"] + 0.1, m
        assert 0 < m[f"alpha3_t{t}"] <= 1 and 0 < m[f"alpha2_t{t}"] <= 1
    assert len(m["train_alpha_by_pass"]) == 3 and all(0 < a <= 1 for a in m["train_alpha_by_pass"])
    assert m["options"]["rollout_steps"] == 3 and m["loss_history"][-1] < m["loss_history"][0]
    draft = load_draft(tmp_path, (target.weights, "tiny-sha"))
    again = heldout_alpha(target, draft, corpus.heldout[:16], passes=3)
    assert again["alpha3_t1"] == pytest.approx(m["alpha3_t1"], abs=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--rollout-steps", "0"], "rollout steps (--rollout-steps) must be an integer >= 1, got 0"),
    (["--rollout-weight-decay", "0"], "rollout weight decay (--rollout-weight-decay) must be > 0, got 0.0"),
    (["--rollout-weight-decay", "-0.5"], "must be > 0, got -0.5"),
    (["--rollout-weight-decay", "nan"], "rollout weight decay (--rollout-weight-decay) must be a finite number, got nan"),
    (["--inputs", "tokens", "--rollout-steps", "3"], "train feature drafts (--inputs features)"),
    (["--inputs", "tokens", "--feature-layers", "0"], "--feature-layers is for feature drafts"),
    (["--feature-layers", "a,b"], "auto or comma-separated layer indices"),
    (["--feature-rank", "8"], "goes with --feature-layers"),
    (["--feature-layers", "auto", "--feature-rank", "-1"], "feature rank (--feature-rank) is >= 0"),
])
def test_bad_feature_draft_options_end_the_run_with_one_line(flags, message, tmp_path, capsys):
    status = distill_main(["--out", str(tmp_path / "out"), "--inputs", "features", *flags])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("speculant distill: error: ") and message in err
    with pytest.raises(DistillError, match="finite"):
        DistillOptions(inputs="features", rollout_steps=math.nan)


# ================================================================ feature layers (--feature-layers)


def test_a_zero_tap_mix_reads_exactly_the_final_features():
    """A draft with feature layers and its mix at zero (where training starts) is the tapless draft:
    the target records the same features and the draft drafts the same tokens."""
    target, draft = feature_pair(64, seed=4, feature_layers=(0, 1))
    torch.nn.init.zeros_(draft.draft_weights.tap_mix.weight)
    plain_target, _ = feature_pair(64, seed=4)
    plain_target.keep_features()
    draft.read_from(target)
    tokens = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(1))
    target.forward(tokens, 0)
    plain_target.forward(tokens, 0)
    assert torch.equal(target.features[:12], plain_target.features[:12])


@pytest.mark.parametrize("rank", [0, 8], ids=["full-mix", "rank-8"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_recorded_features_are_the_training_combination_of_the_taps(device, rank):
    """What the target records while serving (forward, prefill, the fused step's forward, a batch's rows)
    equals what training computes: combine_features(final-normed, the tapped layers' outputs)."""
    from speculant.fused import static_forward

    target, draft = feature_pair(64, seed=6, feature_layers=(0, 2), num_layers=4, device=device, feature_rank=rank)
    assert (draft.draft_weights.tap_down is not None) == bool(rank)
    draft.read_from(target)
    tokens = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(2)).to(device)
    taps: list[torch.Tensor] = []
    _, hidden = target_outputs_batch(target, tokens, (0, 2), taps)
    assert len(taps) == 2
    expected = draft.draft_weights.combine_features(hidden, taps)  # [2, 14, E]
    assert not torch.allclose(expected, hidden, atol=1e-3)  # the taps change the features
    tol = {"atol": 1e-5, "rtol": 1e-5}
    target.forward(tokens[0], 0)
    torch.testing.assert_close(target.features[:14], expected[0], **tol)
    target.prefill(tokens[1])
    torch.testing.assert_close(target.features[:14], expected[1], **tol)
    target.features.zero_()
    static_forward(target, compile=False)(tokens[0], torch.arange(14, device=device))
    torch.testing.assert_close(target.features[:14], expected[0], **tol)
    cache = target.new_row_cache(2, features=True)
    target.forward_rows(cache, tokens, [0, 0], [14, 14])
    torch.testing.assert_close(cache.features[:, :14], expected, **tol)


@pytest.mark.parametrize("prompt", [[7], [1, 2, 3, 4, 5, 6, 7]], ids=["len1", "len7"])
def test_greedy_speculation_with_feature_layers_equals_plain_greedy(prompt):
    target, draft = feature_pair(8, seed=5, kept=6, feature_layers=(0,))
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=40)
    accepted = {}
    for fused in (False, True):
        stepper = FusedStepper(target, draft, compile=False) if fused else None
        steps = list(generate(target, FeatureDrafter(draft, target), prompt, gamma=3, params=GREEDY,
                              max_new_tokens=40, stepper=stepper))
        assert [t for s in steps for t in s.tokens] == expected
        accepted[fused] = [s.num_accepted for s in steps]
    assert accepted[True] == accepted[False] and sum(accepted[False]) > 0


def test_a_target_records_the_features_of_the_last_draft_to_read_them():
    target, draft = feature_pair(64, seed=1, feature_layers=(0,))
    _, other = feature_pair(64, seed=2, feature_layers=(1,))
    draft.read_from(target)
    other.read_from(target)
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    taps: list[torch.Tensor] = []
    _, hidden = target_outputs_batch(target, tokens, (1,), taps)
    target.forward(tokens[0], 0)
    torch.testing.assert_close(target.features[:9], other.draft_weights.combine_features(hidden, taps)[0])
    assert target.feature_kind() == (1,)
    with pytest.raises(ValueError, match="layer indices"):
        target.keep_features((5,), draft.draft_weights.combine_features)
    with pytest.raises(ValueError, match="feature layers"):
        DraftConfig.for_target(target.cfg, num_layers=1, num_kept=8, inputs="features", feature_layers=(2,))
    with pytest.raises(ValueError, match="feature draft"):
        DraftConfig.for_target(target.cfg, num_layers=1, num_kept=8, inputs="tokens", feature_layers=(0,))


@pytest.mark.parametrize("rank", [0, 4], ids=["full-mix", "rank-4"])
def test_distilling_with_feature_layers_trains_the_mix_and_round_trips(feature_corpus, tmp_path, rank):
    target, corpus = feature_corpus
    m = train_draft(target, corpus, tmp_path, feature_options(steps=100, feature_layers="0", feature_rank=rank),
                    target_name="tiny", target_hash="tiny-sha")
    width = target.cfg.hidden_size  # one tapped layer: a [E, E] mix, or [r, E] down and [E, r] up
    assert draft_mix_params(tmp_path) == (width * width if not rank else rank * width * 2)
    for t in (0, 1):
        assert m[f"alpha_t{t}"] > m[f"alpha_t{t}_before"] + 0.1, m
    draft = load_draft(tmp_path, (target.weights, "tiny-sha"))
    assert draft.draft_weights.draft_cfg.feature_layers == (0,)
    assert draft.draft_weights.tap_mix.weight.abs().sum() > 0  # trained away from its zero start
    fresh = LeanModel(target.weights, max_seq_len=128)  # the fixture's target keeps no taps
    assert heldout_alpha(fresh, draft, corpus.heldout[:16])["alpha_t1"] == pytest.approx(m["alpha_t1"], abs=1e-6)
    prompt = corpus.heldout[0, :6].tolist()
    expected = reference_generate(fresh, prompt, params=GREEDY, max_new_tokens=30)
    steps = list(generate(fresh, FeatureDrafter(draft, fresh), prompt, gamma=4, params=GREEDY, max_new_tokens=30))
    assert [t for s in steps for t in s.tokens] == expected


def test_a_tapless_draft_fine_tuned_with_feature_layers_starts_where_it_was(feature_run, tmp_path):
    target, corpus, out, m = feature_run
    fresh = LeanModel(target.weights, max_seq_len=128)
    tuned = train_draft(fresh, corpus, tmp_path, feature_options(steps=0, feature_layers="1", init_from=str(out),
                                                                engine_prompts=0),
                        target_name="tiny", target_hash="tiny-sha")
    assert tuned["alpha_t1_before"] == pytest.approx(m["alpha_t1"], abs=1e-5)


def test_feature_layers_auto_are_eagle3s_low_middle_and_high():
    assert DistillOptions(inputs="features", feature_layers="auto").resolve_feature_layers(28) == (2, 14, 25)
    assert DistillOptions(inputs="features", feature_layers="auto").resolve_feature_layers(2) == (0, 1)
    with pytest.raises(DistillError, match="0..27"):
        DistillOptions(inputs="features", feature_layers="3,28").resolve_feature_layers(28)


def draft_mix_params(folder) -> int:
    """Elements of a saved draft's tap mix (tap_down and tap_mix)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    return sum(t.numel() for name, t in tensors.items() if name.startswith(("tap_down.", "tap_mix.")))
