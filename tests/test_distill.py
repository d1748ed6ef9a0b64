"""Distillation: a tiny draft learns a tiny target, round-trips through its folder, stays exact."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from speculant.distill import train as train_module
from speculant.distill.cli import add_distill_arguments, options_from_args
from speculant.distill.data import (
    CorpusTooSmallError,
    DistillError,
    Document,
    TokenCorpus,
    build_corpus,
    chat_sequences,
    humaneval_fingerprints,
    is_heldout,
    load_corpus,
    save_corpus,
)
from speculant.distill.evaluate import heldout_alpha
from speculant.distill.objective import distill_loss, target_logits_batch
from speculant.distill.options import CheckpointMismatchError, DistillOptions, OutputDirError
from speculant.distill.train import train_draft
from speculant.drafters.model import ModelDrafter
from speculant.engine import generate
from speculant.models.feature_draft import (
    DraftConfig,
    TargetMismatchError,
    build_draft,
    init_random,
    is_draft_folder,
    load_draft,
    save_draft,
)
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams, logits_to_probs, sample_from

VOCAB = 64
KEPT = 48  # the draft's truncated vocabulary: 16 ids are never proposed
SEQ_LEN = 32
TARGET_HASH = "tiny-target-sha256"


def _target(seed: int = 1) -> LeanModel:
    # scale 3: peaked distributions, i.e. a target with structure a small draft can learn
    return LeanModel(random_weights(tiny_config(vocab_size=VOCAB, num_layers=2), seed=seed, scale=3.0), max_seq_len=128)


def _own_samples(target: LeanModel, num: int, length: int, seed: int = 0) -> torch.Tensor:
    """Sequences sampled from the target itself at temperature 1: [num, length]."""
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, VOCAB, (num, 1), generator=gen)
    while seqs.shape[1] < length:
        probs = logits_to_probs(target_logits_batch(target, seqs)[:, -1], SamplingParams())
        seqs = torch.cat([seqs, sample_from(probs, torch.rand(num, generator=gen))[:, None]], 1)
    return seqs


def _options(**overrides) -> DistillOptions:
    base = {"steps": 150, "batch_size": 8, "seq_len": SEQ_LEN, "lr": 1e-2, "num_layers": 1, "num_kept": KEPT, "save_dtype": "float32",
                "eval_sequences": 16, "engine_prompts": 2, "engine_new_tokens": 16, "checkpoint_every": 1000, "progress": False}
    base.update(overrides)
    return DistillOptions(**base)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    target = _target()
    seqs = _own_samples(target, 416, SEQ_LEN)
    corpus = TokenCorpus(seqs[:400], seqs[400:], {"given": True})
    out = tmp_path_factory.mktemp("draft")
    metadata = train_draft(target, corpus, out, _options(), target_name="tiny", target_hash=TARGET_HASH)
    return target, corpus, out, metadata


def test_training_raises_heldout_alpha_at_both_temperatures(tiny_run):
    _, _, _, m = tiny_run
    assert m["alpha_t0"] > m["alpha_t0_before"] + 0.1, m
    assert m["alpha_t1"] > m["alpha_t1_before"] + 0.08, m
    assert m["alpha_t1"] <= m["kept_mass_t1"] + 1e-6  # α over K can never beat the target's mass on K
    assert m["loss_history"][-1] < m["loss_history"][0]


def test_folder_round_trips_with_identical_logits_and_shared_embedding(tiny_run):
    target, corpus, out, m = tiny_run
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "speculant-draft" and config["target_hash"] == TARGET_HASH
    for key in ("steps", "seed", "wall_time_s", "final_loss", "alpha_t0", "alpha_t1", "device", "data"):
        assert key in config["training"]
    assert config["architecture"]["num_layers"] == 1 and config["architecture"]["num_kept"] == KEPT
    assert is_draft_folder(out) and not is_draft_folder(out / "checkpoint")

    first = load_draft(out, (target.weights, TARGET_HASH))
    second = load_draft(out, (target.weights, TARGET_HASH))
    assert first.draft_weights.embed_tokens.weight.data_ptr() == target.weights.embed_tokens.weight.data_ptr()
    tokens = corpus.heldout[0]
    assert torch.equal(first.forward(tokens, 0), second.forward(tokens, 0))
    # the served draft is what was evaluated: same α as recorded
    assert heldout_alpha(target, first, corpus.heldout[:16])["alpha_t1"] == pytest.approx(m["alpha_t1"], abs=1e-6)
    # the embedding is not stored in the draft's files
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert not any("embed" in name for name in stored) and stored["kept_ids"].shape == (KEPT,)


def test_loading_for_another_target_is_refused(tiny_run):
    target, _, out, _ = tiny_run
    with pytest.raises(TargetMismatchError, match="distilled from 'tiny'"):
        load_draft(out, (target.weights, "some-other-sha256"))
    other = LeanModel(random_weights(tiny_config(vocab_size=80), seed=5))
    with pytest.raises(TargetMismatchError, match="vocabulary"):
        load_draft(out, (other.weights, TARGET_HASH))


def test_engine_with_distilled_draft_is_plain_greedy_token_for_token(tiny_run):
    target, corpus, out, _ = tiny_run
    draft = load_draft(out, (target.weights, TARGET_HASH))
    for prompt in (corpus.heldout[0, :8].tolist(), corpus.heldout[3, :5].tolist()):
        expected = reference_generate(target, prompt, params=SamplingParams(temperature=0), max_new_tokens=40)
        steps = list(generate(target, ModelDrafter(draft), prompt, gamma=4, params=SamplingParams(temperature=0),
                              max_new_tokens=40))
        assert [t for s in steps for t in s.tokens] == expected
        assert steps[-1].stats.alpha > 0


def test_an_int8_draft_stores_half_the_bytes_and_loads_what_its_evaluation_saw(tiny_run, tmp_path):
    """--save-dtype int8: matrices as int8 with row scales; loading gives q * scale, within half a step
    of the float weights; a run's recorded α is the loaded draft's; the engine stays exact with it."""
    from safetensors.torch import load_file

    from speculant.distill.evaluate import serving_copy
    from speculant.models.feature_draft import INT8_SCALE, quantize_rows

    target, corpus, out, _ = tiny_run
    weights = load_draft(out, (target.weights, TARGET_HASH)).draft_weights
    save_draft(tmp_path / "b16", weights, target_name="tiny", target_hash=TARGET_HASH, dtype=torch.bfloat16)
    save_draft(tmp_path / "i8", weights, target_name="tiny", target_hash=TARGET_HASH, dtype=torch.int8)
    stored = load_file(str(tmp_path / "i8" / "model.safetensors"))
    matrices = [name for name, t in weights.state_dict().items() if t.dim() == 2]
    assert matrices and all(stored[name].dtype == torch.int8 and stored[name + INT8_SCALE].dtype == torch.float32
                            for name in matrices)
    assert weights.own_bytes(torch.int8) == sum(t.numel() * t.element_size() for t in stored.values())
    assert weights.own_bytes(torch.int8) < 0.6 * weights.own_bytes(torch.bfloat16)
    assert json.loads((tmp_path / "i8" / "config.json").read_text())["dtype"] == "int8"

    loaded = load_draft(tmp_path / "i8", (target.weights, TARGET_HASH))
    for name in matrices:
        got, tensor = loaded.draft_weights.state_dict()[name], weights.state_dict()[name]
        q, scale = quantize_rows(tensor)
        assert torch.equal(got, q.float() * scale[:, None]) and not torch.equal(got, tensor.float())
        assert (got - tensor.float()).abs().le(scale[:, None] / 2 + 1e-7).all()
    prompt = corpus.heldout[1, :6].tolist()
    expected = reference_generate(target, prompt, params=SamplingParams(temperature=0), max_new_tokens=24)
    steps = list(generate(target, ModelDrafter(loaded), prompt, gamma=4, params=SamplingParams(temperature=0),
                          max_new_tokens=24))
    assert [t for s in steps for t in s.tokens] == expected and steps[-1].stats.alpha > 0
    with pytest.raises(ValueError, match="training weights"):
        serving_copy(weights, torch.int8)  # a loaded draft's fused matrices: refused, not evaluated stale

    run = tmp_path / "run"  # a run that saves int8: its recorded bytes are the file's, its α the loaded draft's
    metadata = train_draft(target, corpus, run, _options(steps=20, save_dtype="int8", engine_prompts=0, eval_sequences=8),
                           target_name="tiny", target_hash=TARGET_HASH)
    assert metadata["draft_bytes"] == sum(t.numel() * t.element_size()
                                          for t in load_file(str(run / "model.safetensors")).values())
    reloaded = load_draft(run, (target.weights, TARGET_HASH))
    assert heldout_alpha(target, reloaded, corpus.heldout[:8])["alpha_t1"] == pytest.approx(metadata["alpha_t1"], abs=1e-6)
    with pytest.raises(ValueError, match="save dtype must be one of float32, bfloat16, float16, int8"):
        _options(save_dtype="int4")


def test_draft_logits_are_minus_inf_outside_kept_ids_and_every_transform_gives_them_zero():
    target = _target()
    kept = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:KEPT]
    draft = build_draft(DraftConfig.for_target(target.cfg, num_layers=1, num_kept=KEPT), target.weights, kept)
    init_random(draft.draft_weights, seed=3)
    logits = draft.forward(torch.arange(10), 0)  # [10, V]
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[kept] = False
    assert torch.isneginf(logits[:, outside]).all() and torch.isfinite(logits[:, ~outside]).all()
    for params in (SamplingParams(), SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=60),
                   SamplingParams(top_k=5), SamplingParams(top_p=0.9), SamplingParams(min_p=0.2),
                   SamplingParams(temperature=1.3, top_k=50, top_p=0.95, min_p=0.05)):
        probs = logits_to_probs(logits, params)
        assert not probs.isnan().any()
        assert torch.allclose(probs.sum(-1), torch.ones(10))
        assert (probs[:, outside] == 0).all()


def test_batched_training_forward_matches_the_cached_serving_forward():
    target = _target()
    draft = build_draft(DraftConfig.for_target(target.cfg, num_layers=2, num_kept=KEPT), target.weights,
                        torch.arange(KEPT) * 1 + 16)
    init_random(draft.draft_weights, seed=4)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    batched = draft.train_kept_logits(tokens)  # [3, 20, K]
    for row, expected in zip(tokens, batched):
        draft.truncate(0)
        served = draft.forward(row, 0)[:, draft.kept_ids]
        assert torch.allclose(served, expected, atol=1e-4)
    target_batched = target_logits_batch(target, tokens)
    target.truncate(0)
    assert torch.allclose(target.forward(tokens[1], 0), target_batched[1], atol=1e-4)


def test_draft_made_of_the_targets_first_layer_over_all_ids_is_the_layers_self_draft():
    target = _target()
    draft = build_draft(DraftConfig.for_target(target.cfg, num_layers=1, num_kept=VOCAB), target.weights,
                        torch.arange(VOCAB))
    draft.draft_weights.init_from_target(target.weights)
    tokens = torch.arange(12) % VOCAB
    assert torch.equal(draft.forward(tokens, 0), LeanModel(target.weights, num_layers=1).forward(tokens, 0))


def test_loss_is_zero_exactly_at_the_renormalised_target_and_finite_with_mass_outside():
    gen = torch.Generator().manual_seed(0)
    target_logits = torch.randn(5, 10, generator=gen, dtype=torch.float64) * 2
    kept = torch.tensor([1, 2, 5, 7])
    for temperature in (1.0, 0.6):
        matched = target_logits[:, kept]  # q = p restricted to K, renormalised
        loss, alpha, mass = distill_loss(matched, target_logits, kept, temperature)
        assert abs(float(loss)) < 1e-6 and float(mass) < 1
        assert float(alpha) == pytest.approx(float(mass))  # the best α over K is the target's mass on K
        worse, _, _ = distill_loss(torch.zeros(5, 4, dtype=torch.float64), target_logits, kept, temperature)
        assert torch.isfinite(worse) and float(worse) > 1e-3


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    target = _target()
    seqs = _own_samples(target, 40, 16)
    corpus = TokenCorpus(seqs[:32], seqs[32:], {})
    opts = _options(steps=12, batch_size=4, seq_len=16, checkpoint_every=4, engine_prompts=0, eval_sequences=4)
    train_draft(target, corpus, tmp_path / "straight", opts, target_name="tiny", target_hash=TARGET_HASH)

    calls = {"n": 0}
    real_loss = train_module.distill_loss

    def crash_at_step_7(*args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train_module, "distill_loss", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_draft(target, corpus, tmp_path / "resumed", opts, target_name="tiny", target_hash=TARGET_HASH)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    calls["n"] = 100  # count the steps the resumed run takes

    def count(*args):
        calls["n"] += 1
        return real_loss(*args)

    monkeypatch.setattr(train_module, "distill_loss", count)
    meta = train_draft(target, corpus, tmp_path / "resumed", opts, target_name="tiny", target_hash=TARGET_HASH)
    assert meta["steps"] == 12 and calls["n"] == 100 + 8  # from the checkpoint at step 4
    a = load_draft(tmp_path / "straight", (target.weights, TARGET_HASH))
    b = load_draft(tmp_path / "resumed", (target.weights, TARGET_HASH))
    for (name, x), (_, y) in zip(a.draft_weights.state_dict().items(), b.draft_weights.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name

    with pytest.raises(CheckpointMismatchError, match="num_layers"):
        train_draft(target, corpus, tmp_path / "resumed", _options(**{**vars_of(opts), "num_layers": 2}),
                    target_name="tiny", target_hash=TARGET_HASH)
    with pytest.raises(CheckpointMismatchError, match="another target"):
        train_draft(target, corpus, tmp_path / "resumed", opts, target_name="tiny", target_hash="other")


def vars_of(opts: DistillOptions) -> dict:
    return {k: getattr(opts, k) for k in opts.__dataclass_fields__}


def test_bad_inputs_raise_clear_errors(tmp_path):
    target = _target()
    seqs = _own_samples(target, 6, 16)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="cannot write"):
        train_draft(target, TokenCorpus(seqs[:4], seqs[4:], {}), blocker / "out", _options(seq_len=16),
                    target_name="tiny", target_hash=TARGET_HASH)
    with pytest.raises(CorpusTooSmallError, match="batch"):
        train_draft(target, TokenCorpus(seqs[:4], seqs[4:], {}), tmp_path / "out", _options(seq_len=16),
                    target_name="tiny", target_hash=TARGET_HASH)
    docs = [Document(f"doc{i}", text="x = 1\n") for i in range(5)]
    with pytest.raises(CorpusTooSmallError, match="corpus too small"):
        build_corpus(lambda text: list(text.encode()), documents=docs, seq_len=512, train_tokens=10_000,
                     heldout_tokens=512, separator_id=0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        DistillOptions(temperature=0)


def test_corpus_keeps_humaneval_out_splits_by_document_and_round_trips(tmp_path):
    prompt = 'def has_close_elements(numbers: List[float], threshold: float) -> bool:\n    """ Check if in given list'
    fingerprints = humaneval_fingerprints([prompt])
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in fingerprints
    docs = [Document(f"pkg/mod{i}.py", text=f"def f{i}(x):\n    return x + {i}\n" * 40) for i in range(200)]
    docs.append(Document("pkg/leak.py", text="import math\n\n" + prompt + "\n" + "pass\n" * 500))
    docs.append(Document("pkg/tasks.py", text='task = "HumanEval/12"\n' + "pass\n" * 500))
    humaneval_file = tmp_path / "HumanEval.jsonl"
    humaneval_file.write_text(json.dumps({"task_id": "HumanEval/0", "prompt": prompt}) + "\n")
    seen = []

    def encode(text):
        seen.append(text)
        return list(text.encode())

    corpus = build_corpus(encode, documents=docs, seq_len=64, train_tokens=10**6, heldout_tokens=2000,
                          separator_id=0, heldout_fraction=0.1, humaneval_file=humaneval_file, progress=False)
    assert corpus.meta["excluded_humaneval"] == 2 and corpus.meta["humaneval_prompts_checked"]
    assert not any("has_close_elements" in t or "HumanEval" in t for t in seen)
    assert corpus.heldout.shape[0] >= 1 and corpus.train.shape[1] == 64
    heldout_names = {d.name for d in docs if is_heldout(d.name, 0.1)}
    assert 0 < len(heldout_names) < len(docs) / 4
    save_corpus(tmp_path / "c.safetensors", corpus)
    again = load_corpus(tmp_path / "c.safetensors")
    assert torch.equal(again.train, corpus.train) and again.meta == corpus.meta


def test_cli_flags_match_the_documented_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    args = parser.parse_args(["--out", "x"])
    defaults = DistillOptions()
    options = options_from_args(args)
    assert options == {k: getattr(defaults, k) for k in options}
    assert (defaults.num_layers, defaults.num_kept, defaults.head, defaults.temperature) == (2, 8192, "shared", 1.0)
    assert args.target == "smollm2-135m"


def test_batched_chat_answers_equal_one_at_a_time_answers():
    target = _target()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 7, 5, 1, 6)]
    free = chat_sequences(target, prompts, max_new_tokens=12, temperature=0.0, stop_ids=[], progress=False)
    stop = {free[0][len(prompts[0]) + 3], free[2][len(prompts[2]) + 6]}  # answers that stop early
    kwargs = {"max_new_tokens": 12, "temperature": 0.0, "stop_ids": stop, "progress": False}
    one_by_one = chat_sequences(target, prompts, batch_size=1, **kwargs)
    batched = chat_sequences(target, prompts, batch_size=4, **kwargs)
    assert batched == one_by_one
    lengths = [len(seq) - len(prompt) for prompt, seq in zip(prompts, batched)]
    assert min(lengths) < 12 and lengths[0] <= 4
    for prompt, seq, full in zip(prompts, batched, free):
        answer = seq[len(prompt):]
        assert seq == full[: len(seq)]  # the same answer, cut at the first stop id
        assert all(t not in stop for t in answer[:-1])
        assert len(answer) == 12 or answer[-1] in stop


def test_time_limit_stops_the_run_and_ends_the_schedule(tmp_path):
    target = _target()
    seqs = _own_samples(target, 36, 16)
    opts = _options(steps=500, batch_size=4, seq_len=16, time_limit=1e-6, engine_prompts=0, eval_sequences=4)
    meta = train_draft(target, TokenCorpus(seqs[:32], seqs[32:], {}), tmp_path, opts, target_name="tiny",
                       target_hash=TARGET_HASH)
    assert meta["steps"] == 1  # the first step used the time up
    assert opts.lr_at(opts.warmup, elapsed=1.0) == pytest.approx(opts.lr * opts.min_lr_ratio)
    # the loss of a run cut inside its 10-step window is still read: a number, and strict JSON on disk
    assert meta["final_loss"] > 0 and meta["loss_history"] == [round(meta["final_loss"], 5)]
    json.loads((tmp_path / "config.json").read_text(), parse_constant=_no_constants)


def _no_constants(name):
    raise AssertionError(f"{name} in JSON")


def test_a_loss_that_becomes_nan_stops_training_with_the_cause_and_saves_no_draft(tmp_path):
    target = _target()
    seqs = _own_samples(target, 36, 16)
    # a learning rate no run survives: the weights overflow within a few steps
    opts = _options(steps=40, batch_size=4, seq_len=16, lr=1e30, grad_clip=0.0, warmup_steps=0, engine_prompts=0,
                    eval_sequences=4)
    with pytest.raises(DistillError, match=r"loss became (nan|inf).*Lower --lr"):
        train_draft(target, TokenCorpus(seqs[:32], seqs[32:], {}), tmp_path, opts, target_name="tiny",
                    target_hash=TARGET_HASH)
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="--lr"):
        DistillOptions(lr=float("inf"))


def test_a_run_can_start_from_a_saved_draft_and_refuses_one_that_does_not_fit(tiny_run, tmp_path):
    target, corpus, out, metadata = tiny_run
    meta = train_draft(target, corpus, tmp_path / "again", _options(steps=0, init_from=str(out), engine_prompts=0),
                       target_name="tiny", target_hash=TARGET_HASH)
    assert meta["init"] == f"from {out}"
    assert meta["alpha_t1_before"] == pytest.approx(metadata["alpha_t1"], abs=1e-6)  # the same weights
    assert meta["alpha_t0_before"] == pytest.approx(metadata["alpha_t0"], abs=1e-6)
    from safetensors.torch import load_file
    saved, again = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    # new kept ids picked on the corpus: the layers carry over, a bias follows its id
    regrown = train_draft(target, corpus, tmp_path / "vocab", _options(steps=0, init_from=str(out), num_kept=40,
                          init_vocab="corpus", engine_prompts=0), target_name="tiny", target_hash=TARGET_HASH)
    grown = load_file(str(tmp_path / "vocab" / "model.safetensors"))
    assert grown["kept_ids"].shape == (40,) and regrown["init"] == f"from {out}"
    assert torch.equal(grown["fuse_in.weight"], saved["fuse_in.weight"]) if "fuse_in.weight" in saved else True
    assert torch.equal(grown["layers.0.q_proj.weight"], saved["layers.0.q_proj.weight"])
    old_bias = dict(zip(saved["kept_ids"].tolist(), saved["head_bias"].tolist()))
    shared = [(b, old_bias[i]) for i, b in zip(grown["kept_ids"].tolist(), grown["head_bias"].tolist()) if i in old_bias]
    assert len(shared) >= 30 and all(a == b for a, b in shared)
    # an own head's rows follow their ids too
    own = train_draft(target, corpus, tmp_path / "own", _options(steps=0, head="own", engine_prompts=0),
                      target_name="tiny", target_hash=TARGET_HASH)
    assert own["init"] != f"from {out}"
    train_draft(target, corpus, tmp_path / "own2", _options(steps=0, head="own", num_kept=40, init_vocab="corpus",
                init_from=str(tmp_path / "own"), engine_prompts=0), target_name="tiny", target_hash=TARGET_HASH)
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("own", "own2"))
    rows = {i: r for i, r in zip(first["kept_ids"].tolist(), first["head.weight"])}
    moved = [(r, rows[i]) for i, r in zip(second["kept_ids"].tolist(), second["head.weight"]) if i in rows]
    assert len(moved) >= 30 and all(torch.equal(a, b) for a, b in moved)
    with pytest.raises(DistillError, match="num_layers is 1 there, 2 here"):
        train_draft(target, corpus, tmp_path / "a", _options(num_layers=2, init_from=str(out)),
                    target_name="tiny", target_hash=TARGET_HASH)
    with pytest.raises(DistillError, match="another target"):
        train_draft(target, corpus, tmp_path / "b", _options(init_from=str(out)), target_name="tiny",
                    target_hash="another")


def test_wide_chat_prompts_leave_the_benchmarks_documentation_topics_out():
    from pydoc_data.topics import topics

    from speculant.bench.tasks import builtin_chat_instructions
    from speculant.distill.data import wide_chat_prompts, wide_subjects

    subjects = wide_subjects()
    assert len(subjects) > 300 and len(set(subjects)) == len(subjects)
    for key in topics:  # no subject names a topic the benchmarks' chat prompts are built from
        assert all(s not in (f"the `{key}` module", f"the built-in `{key}()`", key.replace("-", " ")) for s in subjects)
    prompts = wide_chat_prompts(500, seed=3)
    assert prompts == wide_chat_prompts(500, seed=3) and prompts != wide_chat_prompts(500, seed=4)
    assert len(set(prompts)) == 500 and not set(prompts) & set(builtin_chat_instructions())


def _question_writer():
    """(a first-order chain model, its byte-level tokenizer with a ChatML template): after any newline the
    chain writes "why\tnot zip" and ends the turn."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from speculant.models.markov import MarkovModel
    from speculant.tokenizer import Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = list(bytes_to_unicode().values())
    backend = Backend(models.BPE(vocab={s: i for i, s in enumerate(specials + symbols)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = Tokenizer(backend, chat_template=template, eos_ids=[0])  # the turn ends at <|im_end|>
    text = "\nwhy\tnot zip"
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.token_to_id("<|im_end|>")]
    assert len(set(ids)) == len(ids)
    table = torch.zeros(backend.get_vocab_size(), backend.get_vocab_size())
    for a, b in itertools.pairwise(ids):
        table[a, b] = 100.0
    return MarkovModel(table, max_seq_len=256), tokenizer  # room for a request's ~130 tokens and the reply


def test_self_written_questions_continue_the_user_turn_and_keep_only_finished_ones():
    from speculant.distill.data import self_written_questions

    model, tokenizer = _question_writer()
    assert self_written_questions(model, tokenizer, 3, progress=False) == ["why\tnot zip"] * 3
    assert self_written_questions(model, tokenizer, 3, max_new_tokens=5, progress=False) == []  # unfinished


def test_requested_questions_ask_for_everyday_questions_and_keep_the_finished_replies():
    from speculant.distill.questions import (
        EVERYDAY_CATEGORIES,
        QUESTION_LANGUAGES,
        question_requests,
        requested_questions,
    )

    requests = question_requests(400, seed=1)
    assert requests == question_requests(400, seed=1) and requests != question_requests(400, seed=2)
    in_languages = [r for r in requests if any(f"in {language}" in r for language in QUESTION_LANGUAGES)]
    assert len(in_languages) == 80  # every fifth
    assert {c for c in EVERYDAY_CATEGORIES if any(f"about {c}." in r for r in requests)} == set(EVERYDAY_CATEGORIES)
    held_out = (Path(__file__).resolve().parents[1] / "benchmarks" / "prompts").glob("heldout_*")
    held_out_lines = {line.strip() for path in held_out for line in path.read_text().splitlines()}
    assert not held_out_lines & set(EVERYDAY_CATEGORIES) and not held_out_lines & set(requests)

    model, tokenizer = _question_writer()
    assert requested_questions(model, tokenizer, 3, progress=False) == ["why\tnot zip"] * 3
    assert requested_questions(model, tokenizer, 3, max_new_tokens=5, progress=False) == []  # unfinished


def test_a_checkpoint_that_predates_an_option_resumes_only_with_its_default(tmp_path):
    """An option added after a checkpoint was written (absent from its saved options) counts as its
    default: resuming with another value is a mismatch, resuming with the default is not."""
    from speculant.distill.checkpoint import check_resumable
    from speculant.distill.options import options_dict

    old = options_dict(DistillOptions(inputs="features"))
    del old["rollout_steps"]  # as a checkpoint written before --rollout-steps existed
    saved = {"target_hash": TARGET_HASH, "options": old}
    check_resumable(saved, DistillOptions(inputs="features"), TARGET_HASH, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="rollout_steps"):
        check_resumable(saved, DistillOptions(inputs="features", rollout_steps=3), TARGET_HASH, tmp_path)
