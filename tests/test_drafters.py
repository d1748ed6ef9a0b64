"""Drafters: the n-gram lookup and the model drafter (its probabilities and its cache rollback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from speculant.drafters.base import common_prefix_length
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter, device_continuation
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.sampling import SamplingParams, logits_to_probs


def ngram(context, gamma=4, max_ngram=3, min_ngram=1) -> list[int]:
    draft = NgramDrafter(max_ngram=max_ngram, min_ngram=min_ngram).propose(context, gamma, None, None)
    assert draft.probs is None  # deterministic: the verifier uses point masses
    assert draft.tokens.dtype == torch.int64
    return draft.tokens.tolist()


# ---------------------------------------------------------------- n-gram lookup


def test_ngram_prefers_the_longest_suffix_match():
    # suffix [1, 2, 3] occurs at 0 (followed by 9, 9, 7); the 1-gram [3] occurs later, at 6
    # (followed by 4): the 3-gram wins
    context = [1, 2, 3, 9, 9, 7, 3, 4, 1, 2, 3]
    assert ngram(context, gamma=3) == [9, 9, 7]


def test_ngram_falls_back_to_shorter_suffixes():
    # no earlier [6, 2, 3]; [2, 3] occurs at 1
    assert ngram([5, 2, 3, 8, 6, 2, 3], gamma=3) == [8, 6, 2]
    # no earlier [0, 8, 9] or [8, 9]; [9] occurs at 1
    assert ngram([4, 9, 5, 0, 8, 9], gamma=2) == [5, 0]


def test_ngram_uses_the_latest_earlier_occurrence():
    assert ngram([1, 5, 1, 6, 1, 7, 1], gamma=2) == [7, 1]
    assert ngram([2, 3, 0, 2, 3, 1, 2, 3], gamma=1) == [1]


def test_ngram_respects_gamma_and_a_short_continuation():
    context = [7, 1, 2, 3, 4, 5, 6, 7]
    assert ngram(context, gamma=1) == [1]
    assert ngram(context, gamma=3) == [1, 2, 3]
    assert ngram(context, gamma=10) == [1, 2, 3, 4, 5, 6, 7]
    assert ngram([4, 5, 4], gamma=5) == [5, 4]  # continuation may run into the suffix itself
    assert ngram(context, gamma=0) == []


def test_ngram_proposes_nothing_without_a_match():
    assert ngram([1, 2, 3]) == []
    assert ngram([7]) == []


def _ngram_by_search(context, gamma, max_ngram, min_ngram) -> list[int]:
    """The definition, by brute force: the longest suffix (max_ngram down to min_ngram) with an
    earlier occurrence whose continuation is non-empty; the latest such occurrence."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == context[-n:]:
                return context[start + n:start + n + gamma]
    return []


def test_the_incremental_ngram_index_matches_a_fresh_search_as_the_context_grows_and_changes():
    rng = np.random.default_rng(0)
    drafter = NgramDrafter(max_ngram=4, min_ngram=2)
    context = []
    for step in range(400):
        if step % 29 == 28:  # a rollback (a hierarchy's inner context) or a new request: not an extension
            context = context[: int(rng.integers(0, len(context)))] + [int(rng.integers(0, 6))]
        context = context + rng.integers(0, 6, int(rng.integers(1, 4))).tolist()
        expected = _ngram_by_search(context, 5, 4, 2)
        assert drafter.propose(context, 5, None, None).tokens.tolist() == expected


def test_ngram_min_ngram_excludes_shorter_matches():
    context = [5, 9, 1, 2, 9]  # only the 1-gram [9] matches
    assert ngram(context, gamma=2, min_ngram=1) == [1, 2]
    assert ngram(context, gamma=2, min_ngram=2) == []
    # max_ngram limits how long a suffix is tried: with max 1, the latest [3] wins over [1, 2, 3]
    assert ngram([1, 2, 3, 9, 9, 7, 3, 4, 1, 2, 3], gamma=1, max_ngram=1) == [4]


def test_ngram_rejects_bad_sizes():
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=3, min_ngram=0)


def test_ngram_is_deterministic_and_stateless():
    drafter = NgramDrafter()
    context = [1, 2, 3, 1, 2]
    first = drafter.propose(context, 3, None, None).tokens.tolist()
    drafter.reset()
    assert drafter.propose(context, 3, None, None).tokens.tolist() == first == [3, 1, 2]


@st.composite
def ngram_cases(draw):
    """(context, tokens after it in the buffer, size, max_ngram, min_ngram): a vocabulary of 4, so
    that n-grams repeat."""
    length = draw(st.integers(1, 40))
    context = draw(st.lists(st.integers(0, 3), min_size=length, max_size=length))
    past = draw(st.lists(st.integers(0, 3), min_size=1, max_size=5))
    max_ngram = draw(st.integers(1, 4))
    return context, past, draw(st.integers(1, 8)), max_ngram, draw(st.integers(1, max_ngram))


def _device_agrees(case, continuation=device_continuation) -> bool:
    """Is `continuation` (device_continuation's signature) NgramDrafter.continuation, padded, then its length?"""
    context, past, size, max_ngram, min_ngram = case
    found = NgramDrafter(max_ngram, min_ngram).continuation(context, size)
    out = continuation(torch.tensor(context + past), torch.tensor(len(context)), size, max_ngram, min_ngram)
    return out.tolist() == found + [0] * (size - len(found)) + [len(found)]


@settings(max_examples=400, deadline=None)
@given(ngram_cases())
def test_the_device_continuation_is_the_drafters_own(case):
    assert _device_agrees(case)


@pytest.mark.parametrize("context, size, max_ngram, min_ngram", [
    ([1, 2, 3, 9, 9, 7, 3, 4, 1, 2, 3], 3, 3, 1),  # the longest suffix wins
    ([1, 2, 3, 9, 9, 7, 3, 4, 1, 2, 3], 1, 1, 1),  # unless max_ngram stops it: the latest [3]
    ([5, 2, 3, 8, 6, 2, 3], 3, 3, 1),  # a shorter suffix
    ([1, 5, 1, 6, 1, 7, 1], 2, 3, 1),  # the latest occurrence
    ([7, 1, 2, 3, 4, 5, 6, 7], 10, 3, 1),  # a continuation shorter than the size
    ([4, 5, 4], 5, 3, 1),  # one that runs into the suffix itself
    ([5, 9, 1, 2, 9], 2, 3, 2),  # only a 1-gram matches: none at min_ngram 2
    ([1, 2, 3], 4, 3, 1), ([7], 4, 3, 1),  # no match
])
def test_the_device_continuation_on_the_drafters_examples(context, size, max_ngram, min_ngram):
    assert _device_agrees((context, [0, 1], size, max_ngram, min_ngram))


@pytest.mark.parametrize("shift", [-1, 1], ids=["drops-the-last-token", "reads-one-past-the-context"])
def test_a_device_continuation_off_by_one_is_caught(shift):
    """Negative controls: the comparison above fails for a length off by one either way."""

    def off_by_one(history, length, *args):
        return device_continuation(history, length + shift, *args)

    find(ngram_cases(), lambda case: not _device_agrees(case, off_by_one), settings=settings(max_examples=400,
                                                                                             deadline=None))


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 3, 5], start=2) == 3


# ---------------------------------------------------------------- model drafter


@pytest.fixture(scope="module")
def weights():
    return random_weights(tiny_config("llama"), seed=1, scale=4.0)


def fresh_logits(weights, tokens: list[int]) -> tuple[LeanModel, torch.Tensor]:
    model = LeanModel(weights, max_seq_len=64)
    return model, model.forward(torch.tensor(tokens), 0)


def assert_cache_matches_fresh(drafter: ModelDrafter, weights) -> None:
    """The draft model's cache holds exactly `drafter.fed`, as a fresh model fed those tokens."""
    model = drafter.model
    assert model.length == len(drafter.fed)
    fresh, _ = fresh_logits(weights, drafter.fed)
    length = model.length
    torch.testing.assert_close(model.k_cache[:, :length], fresh.k_cache[:, :length], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.v_cache[:, :length], fresh.v_cache[:, :length], atol=1e-4, rtol=1e-4)


def test_model_drafter_reports_the_law_it_sampled_each_token_from(weights):
    drafter = ModelDrafter(LeanModel(weights, max_seq_len=64))
    params = SamplingParams(temperature=0.9, top_k=20)
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    draft = drafter.propose(context, 4, params, torch.Generator().manual_seed(0))
    assert draft.tokens.shape == (4,) and draft.probs.shape == (4, 64)
    _, logits = fresh_logits(weights, context + draft.tokens.tolist())
    expected = logits_to_probs(logits[len(context) - 1 : len(context) + 3], params)
    torch.testing.assert_close(draft.probs, expected, atol=1e-4, rtol=1e-4)
    # every drafted token had positive probability under the law reported for it
    assert (draft.probs.gather(-1, draft.tokens[:, None]) > 0).all()


def test_model_drafter_is_reproducible_from_the_generator(weights):
    drafter = ModelDrafter(LeanModel(weights, max_seq_len=64))
    context, params = [3, 1, 4, 1, 5], SamplingParams()
    a = drafter.propose(context, 5, params, torch.Generator().manual_seed(7)).tokens.tolist()
    drafter.reset()
    b = drafter.propose(context, 5, params, torch.Generator().manual_seed(7)).tokens.tolist()
    assert a == b


def test_model_drafter_greedy_draft_is_the_argmax_chain(weights):
    drafter = ModelDrafter(LeanModel(weights, max_seq_len=64))
    context = [10, 20, 30]
    draft = drafter.propose(context, 4, SamplingParams(temperature=0), None)
    tokens = list(context)
    for _ in range(4):
        _, logits = fresh_logits(weights, tokens)
        tokens.append(int(logits[-1].argmax()))
    assert draft.tokens.tolist() == tokens[3:]
    assert torch.equal(draft.probs, torch.nn.functional.one_hot(draft.tokens, 64).float())


def test_model_drafter_with_gamma_zero_proposes_nothing(weights):
    drafter = ModelDrafter(LeanModel(weights, max_seq_len=64))
    draft = drafter.propose([1, 2, 3], 0, SamplingParams(), None)
    assert draft.tokens.numel() == 0


def test_model_drafter_rolls_its_cache_back_after_a_rejection(weights):
    """Draft, reject the second token, commit a different one: the draft model's cache and its next
    draft equal those of a fresh model fed only the committed context (and the new drafts)."""
    drafter = ModelDrafter(LeanModel(weights, max_seq_len=64))
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(3)
    context = [5, 6, 7, 8, 9]
    draft = drafter.propose(context, 4, params, generator).tokens.tolist()
    assert_cache_matches_fresh(drafter, weights)
    # the verifier accepted draft[0], rejected draft[1] and recovered another token
    recovered = (draft[1] + 1) % 64
    context = context + [draft[0], recovered]
    new_draft = drafter.propose(context, 3, params, generator)
    assert drafter.fed[: len(context)] == context
    assert_cache_matches_fresh(drafter, weights)
    _, logits = fresh_logits(weights, context + new_draft.tokens.tolist())
    expected = logits_to_probs(logits[len(context) - 1 : len(context) + 2], params)
    torch.testing.assert_close(new_draft.probs, expected, atol=1e-4, rtol=1e-4)


def test_model_drafter_rolls_back_a_rejection_it_did_not_see(weights):
    """Steps that draft nothing (γ = 0, e.g. chosen by an adaptive policy) never call the drafter:
    its first draft token was rejected and two more tokens were committed since. The stale
    position is no longer the context's last token, so only a true common-prefix rollback works."""
    drafter = ModelDrafter(LeanModel(weights, max_seq_len=64))
    params = SamplingParams()
    generator = torch.Generator().manual_seed(5)
    context = [5, 6, 7, 8, 9]
    draft = drafter.propose(context, 4, params, generator).tokens.tolist()
    context = context + [(draft[0] + 1) % 64, 11, 12]
    new_draft = drafter.propose(context, 2, params, generator)
    assert_cache_matches_fresh(drafter, weights)
    _, logits = fresh_logits(weights, context + new_draft.tokens.tolist())
    expected = logits_to_probs(logits[len(context) - 1 : len(context) + 1], params)
    torch.testing.assert_close(new_draft.probs, expected, atol=1e-4, rtol=1e-4)


def test_model_drafter_after_full_acceptance_and_bonus(weights):
    drafter = ModelDrafter(LeanModel(weights, max_seq_len=64))
    params = SamplingParams()
    generator = torch.Generator().manual_seed(4)
    context = [1, 2, 3]
    for _ in range(5):  # every draft accepted, plus a bonus token the drafter never saw
        draft = drafter.propose(context, 3, params, generator).tokens.tolist()
        context = context + draft + [int(torch.randint(64, (), generator=generator))]
        assert_cache_matches_fresh(drafter, weights)
    drafter.propose(context, 2, params, generator)
    assert_cache_matches_fresh(drafter, weights)


def test_model_drafter_reset_empties_the_cache(weights):
    drafter = ModelDrafter(LeanModel(weights, max_seq_len=64))
    drafter.propose([1, 2, 3, 4], 3, SamplingParams(), None)
    drafter.reset()
    assert drafter.model.length == 0 and drafter.fed == []
    drafter.propose([9, 8], 2, SamplingParams(), None)
    assert_cache_matches_fresh(drafter, weights)


# ---------------------------------------------------------------- the int8 copy (`--draft int8`)


def test_int8_matrix_is_within_half_a_step_of_each_weight_and_multiplies_as_its_dequantized_float():
    from speculant.models.transformer import INT8_MAX_ROWS, Int8Matrix

    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    weight[3] *= 40.0  # a row with a far larger range gets its own, coarser step
    matrix = Int8Matrix(weight)
    step = weight.abs().amax(1, keepdim=True) / 127
    dequantized = matrix.q.float() * matrix.scale.float()[:, None]
    # the step is rounded to bfloat16 (8 bits of mantissa): allow that on top of half a step
    assert ((dequantized - weight).abs() <= 0.5 * step + weight.abs() * 2**-8).all()
    assert matrix.q.dtype == torch.int8 and matrix.nbytes() == 48 * 64 + 2 * 48
    x = torch.randn(INT8_MAX_ROWS, 64, generator=torch.Generator().manual_seed(1))
    expected = x.bfloat16().float() @ dequantized.T  # the kernel takes bfloat16 activations
    assert torch.allclose(matrix(x), expected, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(matrix(x), x @ weight.T, rtol=1e-4, atol=1e-4)  # it is the int8 product
    # more rows (a prompt) multiply by the float matrix itself, which the copy holds by reference
    many = torch.randn(INT8_MAX_ROWS + 1, 64, generator=torch.Generator().manual_seed(2))
    assert matrix.source.data_ptr() == weight.data_ptr()
    assert torch.equal(matrix(many), torch.nn.functional.linear(many, weight))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_int8_copy_of_a_model_shares_its_embedding_and_predicts_what_it_predicts(arch):
    from speculant.models.transformer import Int8Matrix, int8_weights

    cfg = tiny_config(arch, vocab_size=96, hidden_size=64, intermediate_size=128)
    weights = random_weights(cfg, seed=3)
    model, copy = LeanModel(weights), LeanModel(int8_weights(weights))
    assert copy.weights.embed_tokens is weights.embed_tokens
    assert all(isinstance(m, Int8Matrix) for layer in copy.weights.layers for m in (layer.gate_up, layer.o, layer.down))
    tokens = torch.tensor([5, 17, 3, 88, 41, 9, 60, 2])
    exact, approx = model.forward(tokens, 0), copy.forward(tokens, 0)
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    # close in law: the two next-token distributions overlap almost entirely, the argmax agrees
    overlap = torch.minimum(exact.softmax(-1), approx.softmax(-1)).sum(-1)
    assert overlap.min() > 0.9, overlap
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() >= 0.75
    # and it is a model of its own: a second call from a rolled-back cache gives the same logits (calls
    # of at most INT8_MAX_ROWS tokens, which multiply by the int8 matrices; the prompt above did not)
    decoded = copy.forward(tokens[4:], 4)
    copy.truncate(4)
    assert torch.allclose(copy.forward(tokens[4:], 4), decoded, atol=1e-5)


def test_int8_weights_refuses_weights_that_train():
    from speculant.models.transformer import TransformerWeights, int8_weights

    with pytest.raises(ValueError, match="frozen"):
        int8_weights(TransformerWeights(tiny_config()))
