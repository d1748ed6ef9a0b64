"""A draft model that scores only the most frequent tokens (`--draft NAME:vocab=N`,
LeanModel.keep_vocab, speculant.models.frequent_tokens): its logits are the whole head's at the kept
tokens and -inf elsewhere, the output law stays the target's (chi-square, with a negative control
that reports the whole vocabulary's law while drafting from the kept one), greedy output stays plain
greedy output, and the ranking is counted once per tokenizer and kept."""

from __future__ import annotations

import pytest
import torch
from test_hierarchical import VOCAB, _assert_control_caught, _lean_law, _pvalue, _sample_law
from test_loading import save_folder, tiny_hf_model

from speculant import api
from speculant.drafters.base import Draft
from speculant.drafters.model import ModelDrafter
from speculant.models import frequent_tokens as frequent
from speculant.models.registry import load_model
from speculant.models.transformer import LeanModel, int8_weights, random_weights, tiny_config
from speculant.sampling import SamplingParams, logits_to_probs
from tests.conftest import SIGNIFICANCE


@pytest.mark.parametrize("int8", [False, True])
def test_kept_vocabulary_logits_are_the_whole_heads_at_the_kept_tokens(int8):
    weights = random_weights(tiny_config(), seed=0)
    model = LeanModel(int8_weights(weights) if int8 else weights)
    tokens = torch.tensor([3, 9, 27, 1, 40])
    whole = model.forward(tokens, 0)
    kept = torch.tensor([0, 1, 9, 27, 63])
    model.keep_vocab(kept)
    model.truncate(0)
    part = model.forward(tokens, 0)
    torch.testing.assert_close(part[:, kept], whole[:, kept], atol=1e-5, rtol=1e-5)
    others = torch.ones(64, dtype=torch.bool)
    others[kept] = False
    assert torch.isneginf(part[:, others]).all()
    assert set(logits_to_probs(part, SamplingParams()).nonzero()[:, 1].tolist()) <= set(kept.tolist())
    model.keep_vocab(None)
    model.truncate(0)
    torch.testing.assert_close(model.forward(tokens, 0), whole)
    for bad in (torch.tensor([1, 1]), torch.tensor([64]), torch.tensor([-1]), torch.tensor([], dtype=torch.int64)):
        with pytest.raises(ValueError, match="distinct token ids in 0..63"):
            model.keep_vocab(bad)


def _kept_draft(other, kept):
    model = LeanModel(other)
    model.keep_vocab(torch.tensor(kept))
    return model


def test_a_draft_with_a_kept_vocabulary_emits_the_target_law():
    """target <- another model keeping 3 of 4 tokens, sampled, 3000 runs of 3 tokens (64 cells) against
    the exact law: the token the draft never proposes still comes, from the residual."""
    cfg = tiny_config(vocab_size=VOCAB)
    target = LeanModel(random_weights(cfg, seed=0, scale=1.5))
    other = random_weights(cfg, seed=1, scale=1.5)
    params = SamplingParams(temperature=1.0)
    law = _lean_law(target)
    counts = _sample_law(lambda: ModelDrafter(_kept_draft(other, [0, 1, 3])), None, params, runs=3000, gamma=3,
                         target=target)
    assert _pvalue(counts, law) > SIGNIFICANCE

    class ReportsTheWholeVocabulary(ModelDrafter):
        """Negative control: drafts from the kept tokens, reports the whole head's law as q."""

        def propose(self, context, gamma, params, generator):
            draft = super().propose(context, gamma, params, generator)
            whole = LeanModel(other)
            logits = whole.forward(torch.tensor(context + draft.tokens.tolist()[:-1]), 0)[len(context) - 1:]
            return Draft(draft.tokens, logits_to_probs(logits, params).to(draft.probs.dtype))

    sample = lambda runs, seed: _sample_law(lambda: ReportsTheWholeVocabulary(_kept_draft(other, [0, 1, 3])), None,
                                            params, runs=runs, gamma=3, target=target, seed=seed)
    _assert_control_caught(sample, law, runs=3000)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    # 261 ids: the byte-level tokenizer's 256 bytes, 3 special tokens and 2 merges
    return str(save_folder(tiny_hf_model("llama", vocab_size=261, max_position_embeddings=128),
                           tmp_path_factory.mktemp("vocab") / "tiny"))


def test_the_ranking_is_counted_once_per_tokenizer_and_keeps_every_special_token(target, tmp_path, monkeypatch):
    tokenizer = load_model(target).tokenizer
    kept = frequent.frequent_tokens(tokenizer, 40, tmp_path)
    special = set(tokenizer.backend.get_added_tokens_decoder())
    assert special and special <= set(kept.tolist()) and len(kept) >= 40
    assert kept.tolist() == sorted(set(kept.tolist()))
    ranked = frequent.ranked_tokens(tokenizer, tmp_path)
    assert sorted(ranked) == list(range(tokenizer.vocab_size)) and ranked[0] == frequent.ranked_tokens(tokenizer)[0]
    assert tokenizer.encode("e", add_special_tokens=False)[0] in ranked[:20]  # English's and code's commonest letter
    monkeypatch.setattr(frequent, "corpus_texts", lambda: pytest.fail("counted again despite the kept ranking"))
    assert torch.equal(frequent.frequent_tokens(tokenizer, 40, tmp_path), kept)
    monkeypatch.undo()
    (tmp_path / frequent.RANKING_FILE).write_text("{ damaged")
    assert torch.equal(frequent.frequent_tokens(tokenizer, 40, tmp_path), kept)  # counted again
    with pytest.raises(ValueError, match="keeps 1 to 260 of the vocabulary's 261 tokens, got 261"):
        frequent.frequent_tokens(tokenizer, 261, tmp_path)


def test_a_kept_vocabulary_draft_spec_keeps_greedy_output_and_refuses_what_it_cannot_follow(target):
    plain = api.load(target, draft="none", max_seq_len=128).generate("ab cd", max_new_tokens=24)
    spec = api.load(target, draft=f"{target}:int8:vocab=64", gamma=3, max_seq_len=128)
    draft = spec.levels[0][1].model
    assert isinstance(draft, LeanModel) and draft.kept_vocab is not None and len(draft.kept_vocab[0]) >= 64
    out = spec.generate("ab cd", max_new_tokens=24)
    assert out.token_ids == plain.token_ids and out.stats["drafted"] > 0
    with pytest.raises(ValueError, match="':vocab=N' follows a draft model that runs on the lean torch model"):
        api.load(target, draft="none:vocab=8", max_seq_len=128)
