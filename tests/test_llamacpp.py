"""The llama.cpp backend (speculant.models.llamacpp) on the real SmolLM2-135M GGUF.

llama-cpp-python is optional: `bash scripts/setup.sh --llama-cpp` compiles it (CI does). Without
it these tests skip with that reason, except the one that checks the one-line error.

- our tokenizer gives llama.cpp's ids;
- rollback: after a rejected draft, truncate + forward gives the logits of a fresh context fed
  only the accepted tokens (bit for bit with the same calls; close to one batch of all of them);
- greedy: speculative decoding on llama.cpp (n-gram, a model draft on llama.cpp, plain) equals
  llama.cpp's own plain greedy decoding (llama_cpp.Llama.generate, temp 0) token for token; also on
  Qwen2.5-Coder 0.5B (Q4_K_M, repacked: batches of >= 4 round differently), where it holds only
  because `forward` splits a verify batch into calls of at most `exact_batch` tokens;
- batch width: `forward` over T <= 17 tokens gives one-token decoding's bits (also past the position
  where, with 2 threads, a lone token takes split-KV attention); the probed width is kept in the cache
  and a damaged cache file is probed again;
- law: the first two emitted tokens at T 1, top-k 3, follow the law computed (tests/conftest.py,
  float64, not speculant's sampling code) from the logits llama.cpp returns, with a deterministic
  drafter (n-gram) and a drafter whose law differs (the target's first 8 layers, on torch); the
  draft's own law, what an always-accept rule would emit, must fail the same test, with its power
  computed before it runs.

Cost on a shared 2-core CPU: about a minute, most of it the 2 x 300 engine runs of the law test, and
about 20 s for the Qwen 0.5B test (where that model is installed: bash scripts/setup.sh --qwen)."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch

import speculant
from speculant.models.llamacpp import LlamaCppModel, LlamaCppUnavailable, llama_cpp_available, load_llamacpp

needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="llama-cpp-python is not installed (bash scripts/setup.sh --llama-cpp)")
TARGET = "smollm2-135m"
PROMPTS = ["def fibonacci(n):\n", "The capital of France is Paris. The capital of Italy is",
           # over 64 tokens: llama.cpp evaluates such a batch with tiled flash attention, which rounds
           # differently than a short batch, so the prompt must go in one batch as llama.cpp's own loop does
           ("from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
           '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
           "    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n"
           '    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    """\n')]


@pytest.fixture(scope="module")
def target():
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (bash scripts/setup.sh --llama-cpp)")
    from speculant.models.registry import embedded_installed

    if not embedded_installed(TARGET):
        pytest.skip(f"{TARGET} is not installed (bash scripts/setup.sh)")
    return load_llamacpp(TARGET, max_seq_len=512, threads=1, progress=False)  # 1: robust on a shared CPU


def _ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer.encode(text, add_special_tokens=True)


def _one_at_a_time(model, ids: list[int], start: int) -> torch.Tensor:
    """ids [T] at positions start.. evaluated one token per forward -> logits [T, vocab]."""
    return torch.cat([model.forward(torch.tensor([t]), start + i) for i, t in enumerate(ids)])


@needs_llama_cpp
def test_forward_over_a_batch_gives_the_bits_of_one_token_decoding(target):
    model = target.model
    assert 1 <= model.exact_batch <= 32 and f"exact_batch={model.exact_batch}" in repr(model)
    ids = _ids(target, PROMPTS[2])
    prefix, tail = ids[:40], ids[40:57]
    model.truncate(0)
    model.forward(torch.tensor(prefix), 0)
    single = _one_at_a_time(model, tail, len(prefix))  # [17, vocab]
    for width in range(2, 18):
        model.truncate(len(prefix))
        assert torch.equal(model.forward(torch.tensor(tail[:width]), len(prefix)), single[:width]), width


@needs_llama_cpp
def test_past_position_256_two_threads_verify_one_token_per_call(target):
    """With 2 threads, llama.cpp's attention for a lone token at position >= 256 (a context of >= 512
    cells) splits the cache across the threads, which no batch does: a whole batch rounds differently
    there (up to 0.7 in a logit), so forward evaluates those positions one token per call. (Width 4
    given, not probed: the probe costs much more with 2 threads on a busy CPU; the equality of
    positions 252..255, one call of 4, checks it.)"""
    model = LlamaCppModel(target.model.path, max_seq_len=512, threads=2, sha256=target.source_hash, exact_batch=4)
    try:
        assert model.split_kv_from == 256 and model._width_at(250) == 4 and model._width_at(253) == 3
        assert model._width_at(256) == 1 and "one token per call from position 256" in repr(model)
        ids = _ids(target, PROMPTS[2] * 3)[:266]
        model.forward(torch.tensor(ids[:252]), 0)
        single = _one_at_a_time(model, ids[252:266], 252)  # positions 252..265: both sides of 256
        model.truncate(252)
        assert torch.equal(model.forward(torch.tensor(ids[252:266]), 252), single)
        model.truncate(258)
        whole = model._decode(ids[258:262], 258, last_only=False)  # one llama_decode of 4, past 256
        assert not torch.equal(whole, single[6:10])
    finally:
        model.close()


@needs_llama_cpp
def test_the_probed_width_is_cached_and_a_damaged_cache_file_is_probed_again(target, tmp_path, monkeypatch):
    import json

    import speculant.models.llamacpp as backend

    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path))
    monkeypatch.delenv("SPECULANT_RECALIBRATE", raising=False)
    monkeypatch.setattr(backend, "EXACT_BATCH_LIMIT", 4)  # a probe of widths 2..4 only: 4 probes stay cheap
    monkeypatch.setattr(backend, "PROBE_STAGES", (4,))
    probes = []
    real_probe = backend.probe_exact_batch
    monkeypatch.setattr(backend, "probe_exact_batch", lambda model: probes.append(1) or real_probe(model))

    def load():
        model = LlamaCppModel(target.model.path, max_seq_len=64, threads=1, sha256=target.source_hash)
        model.close()
        return model

    first = load()
    files = list((tmp_path / "llamacpp-exact-batch").glob("*.json"))
    assert len(probes) == 1 and len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["exact_batch"] == first.exact_batch == min(target.model.exact_batch, 4)
    assert record["key"]["model_sha256"] == target.source_hash and record["key"]["threads"] == 1
    assert record["key"]["limit"] == 4
    assert record["key"]["repack"] is True and "llama_cpp" in record["key"]
    assert load().exact_batch == first.exact_batch and len(probes) == 1  # read back, not probed
    for damage in ('{"key": 1', json.dumps({**record, "exact_batch": 0}), json.dumps({**record, "key": {}})):
        files[0].write_text(damage)
        assert load().exact_batch == first.exact_batch
        assert json.loads(files[0].read_text()) == {**record, "seconds": json.loads(files[0].read_text())["seconds"]}
    assert len(probes) == 4
    forced = LlamaCppModel(target.model.path, max_seq_len=64, threads=1, sha256=target.source_hash, exact_batch=2)
    assert forced.exact_batch == 2 and len(probes) == 4  # a given width is not probed
    forced.close()


@needs_llama_cpp
def test_our_tokenizer_gives_llama_cpps_ids(target):
    import llama_cpp

    lib, model = llama_cpp, target.model
    vocab = lib.llama_model_get_vocab(model._model)
    chat = target.tokenizer.apply_chat_template([{"role": "user", "content": "Wie geht's? 🙂"}])
    for text in PROMPTS + ["  indented\n\tlines  ", "naïve café 12345 + x**2", chat]:
        data = text.encode()
        buffer = (lib.llama_token * (len(data) + 8))()
        n = lib.llama_tokenize(vocab, data, len(data), buffer, len(buffer), True, True)
        ours = target.tokenizer.encode(text, add_special_tokens=text != chat)
        assert ours == list(buffer[:n]), text


@needs_llama_cpp
def test_logits_have_the_vocabulary_width_and_follow_the_tokens(target):
    model = target.model
    ids = torch.tensor(_ids(target, PROMPTS[0]))
    model.truncate(0)
    logits = model.forward(ids, 0)
    assert logits.shape == (len(ids), target.tokenizer.vocab_size) and logits.dtype == torch.float32
    assert model.length == len(ids)
    assert int(logits[-1].argmax()) != int(logits[-2].argmax()) or not torch.equal(logits[-1], logits[-2])


@needs_llama_cpp
def test_rollback_after_rejection_equals_a_fresh_evaluation(target):
    model = target.model
    prompt = _ids(target, PROMPTS[1])
    n = len(prompt)
    accepted, rejected, after = [prompt[1]], [prompt[2], prompt[3], prompt[4]], [prompt[5], prompt[6]]
    model.truncate(0)
    model.forward(torch.tensor(prompt), 0)
    model.forward(torch.tensor(accepted + rejected), n)  # a draft whose last three tokens are rejected
    model.truncate(n + 1)
    rolled_back = model.forward(torch.tensor(after), n + 1)  # [2, vocab]

    fresh = LlamaCppModel(model.path, max_seq_len=512, threads=2)
    fresh.forward(torch.tensor(prompt), 0)
    fresh.forward(torch.tensor(accepted), n)
    assert torch.equal(fresh.forward(torch.tensor(after), n + 1), rolled_back)
    fresh.truncate(0)  # with flash attention on, batch shapes do not change the bits either
    assert torch.equal(fresh.forward(torch.tensor(prompt + accepted + after), 0)[-2:], rolled_back)


@needs_llama_cpp
def test_without_flash_attention_a_lone_token_rounds_differently_than_in_a_batch(target):
    """Why LlamaCppModel turns flash attention on: without it, the logits of a token evaluated alone
    differ from its logits inside a batch, so a verify batch would not reproduce plain decoding (at
    any width: the probe finds exact_batch 1; the batch below is one llama_decode, exact_batch given)."""
    prompt = _ids(target, PROMPTS[1])
    probed = LlamaCppModel(target.model.path, max_seq_len=64, threads=1, flash_attention=False,
                           sha256=target.source_hash)
    assert probed.exact_batch == 1
    probed.close()
    model = LlamaCppModel(target.model.path, max_seq_len=512, threads=2, flash_attention=False, exact_batch=512)
    model.forward(torch.tensor(prompt[:-3]), 0)
    alone = torch.cat([model.forward(torch.tensor([t]), len(prompt) - 3 + i) for i, t in enumerate(prompt[-3:])])
    model.truncate(0)
    assert not torch.equal(model.forward(torch.tensor(prompt), 0)[-3:], alone)


@needs_llama_cpp
@pytest.mark.parametrize("draft", ["ngram", TARGET, "none"])
def test_greedy_speculative_output_equals_llama_cpps_own_greedy_decoding(target, draft):
    import llama_cpp

    plain = llama_cpp.Llama(model_path=target.source, n_ctx=512, n_threads=2, flash_attn=True, verbose=False)
    spec = speculant.load(TARGET, draft=draft, gamma=4, max_seq_len=512, backend="llama.cpp")
    for text in PROMPTS:
        ids = _ids(target, text)
        theirs = list(itertools.islice(plain.generate(ids, temp=0.0, repeat_penalty=1.0), 48))
        out = spec.generate(ids, max_new_tokens=48, stop_ids=[])
        assert out.token_ids == theirs, (draft, text)
        assert out.stats["backend"] == "llama.cpp"
    if draft != "none":
        assert out.stats["accepted"] > 0


QWEN_DRAFTED = "qwen2.5-coder-0.5b"
# without the split into exact_batch-wide calls, both prompts' greedy output departs from llama.cpp's own
# within 24 tokens at gamma 4 and 8 (Q4_K_M repacked, the AVX2 build of scripts/setup.sh)
QWEN_PROMPTS = ["Write a function that reverses a string.\n", "List three colors:\n1."]


@needs_llama_cpp
@pytest.mark.slow
def test_greedy_speculative_output_on_qwen_equals_llama_cpps_own_decoding():
    import llama_cpp

    from speculant.api import Speculant
    from speculant.models.registry import embedded_installed

    if not embedded_installed(QWEN_DRAFTED):
        pytest.skip(f"{QWEN_DRAFTED} is not installed (bash scripts/setup.sh --qwen)")
    loaded = load_llamacpp(QWEN_DRAFTED, max_seq_len=256, threads=1, progress=False)
    assert loaded.model.exact_batch < 5  # repacked Q4_K: a gamma-4 verify batch (5 tokens) goes in two calls
    plain = llama_cpp.Llama(model_path=loaded.source, n_ctx=256, n_threads=1, flash_attn=True, verbose=False)
    try:
        for text in QWEN_PROMPTS:
            ids = _ids(loaded, text)
            theirs = list(itertools.islice(plain.generate(ids, temp=0.0, repeat_penalty=1.0), 24))
            for gamma in (4, 8):
                out = Speculant(loaded, ["ngram"], gamma=gamma, fused=False).generate(ids, max_new_tokens=24,
                                                                                     stop_ids=[])
                assert out.token_ids == theirs, (gamma, text)
    finally:
        plain.close()
        loaded.model.close()


def _two_token_law(model, prompt: list[int], transform, params: dict) -> tuple[np.ndarray, dict]:
    """The law of the first two tokens after `prompt` from `model`'s own logits: ([K*K + 1] cell
    probabilities (the last cell, probability 0, takes every pair outside the top-k supports), a
    map (t1, t2) -> cell)."""
    model.truncate(0)
    first = transform(model.forward(torch.tensor(prompt), 0)[-1].double().numpy(), **params)
    law, cells = [], {}
    for t1 in np.flatnonzero(first):
        model.truncate(len(prompt))
        second = transform(model.forward(torch.tensor([int(t1)]), len(prompt))[-1].double().numpy(), **params)
        for t2 in np.flatnonzero(second):
            cells[int(t1), int(t2)] = len(law)
            law.append(first[t1] * second[t2])
    return np.array(law + [0.0]), cells


@needs_llama_cpp
def test_first_tokens_follow_llama_cpps_law_and_the_drafts_own_law_fails(target, gof):
    from speculant.drafters.model import ModelDrafter
    from speculant.drafters.ngram import NgramDrafter
    from speculant.engine import generate
    from speculant.models.registry import load_model
    from speculant.models.transformer import LeanModel
    from speculant.sampling import SamplingParams

    params = {"temperature": 1.0, "top_k": 3}
    # the n-gram drafter proposes " dog sat." after the last " The": right only part of the time
    prompt = _ids(target, "The cat sat. The dog sat. The")
    law, cells = _two_token_law(target.model, prompt, gof.transform, params)
    lean = load_model(TARGET, max_seq_len=512, progress=False)
    layers8 = LeanModel(lean.weights, max_seq_len=512, num_layers=8)
    draws = 300
    sampling = SamplingParams(**params)

    def first_two(drafter, seed: int) -> int:
        generator = torch.Generator().manual_seed(seed)
        tokens = [t for step in generate(target.model, drafter, prompt, gamma=2, params=sampling, max_new_tokens=3,
                                         generator=generator) for t in step.tokens]
        return cells.get((tokens[0], tokens[1]), len(law) - 1)

    for drafter in (NgramDrafter(), ModelDrafter(layers8)):
        codes = [first_two(drafter, seed) for seed in range(draws)]
        fit = gof.chi_square(codes, law)
        assert fit.pvalue > gof.SIGNIFICANCE, (type(drafter).__name__, fit)

    # negative control: the draft's own samples (an always-accept rule's output) against the target's law
    bad_law = np.zeros_like(law)
    layers8.truncate(0)
    q1 = gof.transform(layers8.forward(torch.tensor(prompt), 0)[-1].double().numpy(), **params)
    for t1 in np.flatnonzero(q1):
        layers8.truncate(len(prompt))
        q2 = gof.transform(layers8.forward(torch.tensor([int(t1)]), len(prompt))[-1].double().numpy(), **params)
        for t2 in np.flatnonzero(q2):
            bad_law[cells.get((int(t1), int(t2)), len(law) - 1)] += q1[t1] * q2[t2]
    power = gof.power(law, bad_law, draws)
    assert power.power > 0.99, power
    drafter = ModelDrafter(layers8)
    codes = []
    for seed in range(draws):
        drafter.reset()
        tokens = drafter.propose(prompt, 2, sampling, torch.Generator().manual_seed(seed)).tokens.tolist()
        codes.append(cells.get((tokens[0], tokens[1]), len(law) - 1))
    assert gof.chi_square(codes, law).pvalue < gof.SIGNIFICANCE


@needs_llama_cpp
def test_backend_choice_is_reported_and_unsupported_drafts_get_one_line_errors(target):
    from speculant.api import choose_backend

    assert choose_backend("auto", target=TARGET, drafts=["ngram"]) == "llama.cpp"
    assert choose_backend("auto", target=TARGET, drafts=["layers:8"]) == "torch"
    assert choose_backend("auto", target=TARGET, drafts=["ngram"], device="cuda") == "torch"
    spec = speculant.load(TARGET, draft="default", max_seq_len=256, backend="auto")
    assert spec.draft_specs == ["ngram"]  # the shipped feature draft needs the torch target's hidden states
    assert spec.generate("def f(x):", max_new_tokens=4).stats["backend"] == "llama.cpp"
    for draft, words in (("smollm2-135m-draft", "hidden states"), ("layers:8", "lean torch model"),
                         ("int8", "lean torch model")):
        with pytest.raises(ValueError, match=words) as error:
            speculant.load(TARGET, draft=draft, max_seq_len=256, backend="llama.cpp")
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="bfloat16|GGUF's own types"):
        speculant.load(TARGET, draft="ngram", dtype="bfloat16", backend="llama.cpp")


@needs_llama_cpp
def test_cli_generate_on_llama_cpp_says_which_backend_ran(target, capsys):
    from speculant.cli import main

    code = main(["generate", "--backend", "llama.cpp", "--draft", "ngram", "--max-new-tokens", "8", "def f(x):"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "backend=llama.cpp" in err and out


def test_without_llama_cpp_python_the_backend_fails_in_one_line_naming_the_setup_step(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails as if not installed
    from speculant.api import choose_backend
    from speculant.cli import main

    assert choose_backend("auto", target=TARGET, drafts=["ngram"]) == "torch"
    with pytest.raises(LlamaCppUnavailable, match="setup.sh --llama-cpp"):
        load_llamacpp(TARGET)
    code = main(["generate", "--backend", "llama.cpp", "--draft", "ngram", "--max-new-tokens", "2", "x"])
    _, err = capsys.readouterr()
    assert code == 2 and "setup.sh --llama-cpp" in err and len(err.strip().splitlines()) == 1


def test_a_gguf_path_loads_on_llama_cpp_without_converting_its_weights(target, tmp_path, monkeypatch):
    """A .gguf path new to the cache gets only a tokenizer folder built from its metadata (no
    float32 copy of its weights), and that tokenizer is the converted model's, id for id."""
    import shutil

    from speculant.models.registry import embedded_gguf

    source = tmp_path / "copy.gguf"
    shutil.copyfile(embedded_gguf(TARGET, progress=False), source)
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    loaded = load_llamacpp(str(source), max_seq_len=256, threads=1, progress=False)
    try:
        assert not list((tmp_path / "cache").rglob("*.safetensors"))
        assert loaded.folder.parent.name == "tokenizers" and (loaded.folder / "tokenizer.json").exists()
        assert loaded.tokenizer.vocab_fingerprint == target.tokenizer.vocab_fingerprint
        for text in PROMPTS:
            assert _ids(loaded, text) == _ids(target, text)
        assert loaded.tokenizer.eos_ids == target.tokenizer.eos_ids
        assert "llama.cpp" in repr(loaded)  # not "transformers"
        again = load_llamacpp(str(source), max_seq_len=256, threads=1, progress=False)  # from the cache
        assert again.folder == loaded.folder
        again.model.close()
    finally:
        loaded.model.close()
