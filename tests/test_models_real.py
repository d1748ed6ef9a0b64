"""The embedded models with their real weights: the lean model must give transformers' logits for the
same (converted) weights, for a whole prompt and token by token through the KV cache, and the
loader, the tokenizers and the errors must behave on them.

The first run converts the GGUF files into the cache ($SPECULANT_CACHE or ~/.cache/speculant/models);
later runs load the converted folders."""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch

from speculant.models.base import ContextOverflowError
from speculant.models.hf import dtype_kwargs
from speculant.models.registry import (
    EMBEDDED,
    VocabularyMismatchError,
    check_pairing,
    embedded_gguf,
    embedded_installed,
    load_model,
)
from speculant.models.transformer import LeanModel
from speculant.tokenizer import StreamDecoder

transformers = pytest.importorskip("transformers")

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
MULTILINGUAL = "Größe, naïve café — 日本語のテキスト 🙂👍🏽 ½ ∑ x² → done.\n\tTabs  and   spaces "


def _embedded(name: str):
    entry = EMBEDDED[name]
    if not embedded_installed(name):
        pytest.skip(f"{name} weights not installed ({entry.pip})")
    return load_model(name, max_seq_len=1024, progress=True)


@pytest.fixture(scope="module")
def smollm2():
    return _embedded("smollm2-135m")


@pytest.fixture(scope="module")
def gemma3():
    return _embedded("gemma3-270m")


def _transformers_model(loaded):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(loaded.folder), attn_implementation="eager", **dtype_kwargs(torch.float32)
    ).eval()


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    return _transformers_model(smollm2)


@pytest.fixture(scope="module")
def gemma3_hf(gemma3):
    return _transformers_model(gemma3)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)[None]).logits[0].float()


def check_parity(lean: LeanModel, hf_model, tokens: list[int], label: str, atol: float = 1e-3) -> None:
    """Whole prompt, then prefill + single tokens, then truncate and continue differently."""
    expected = hf_logits(hf_model, tokens)
    lean.truncate(0)
    whole = lean.forward(torch.tensor(tokens), 0)
    lean.truncate(0)
    n = len(tokens)
    pieces = [lean.forward(torch.tensor(tokens[: n - 4]), 0)]
    pieces += [lean.forward(torch.tensor(tokens[i : i + 1]), i) for i in range(n - 4, n)]
    incremental = torch.cat(pieces)
    lean.truncate(n - 6)
    other = tokens[: n - 6] + [tokens[1], tokens[2]]
    after_truncate = lean.forward(torch.tensor(other[n - 6 :]), n - 6)
    other_expected = hf_logits(hf_model, other)[n - 6 :]
    diffs = {
        "whole": (whole - expected).abs().max().item(),
        "incremental": (incremental - expected).abs().max().item(),
        "after truncate": (after_truncate - other_expected).abs().max().item(),
    }
    print(f"\n{label}: {n} tokens, logits up to {expected.abs().max().item():.1f}, max abs diff {diffs}")
    assert all(d <= atol for d in diffs.values()), diffs
    assert torch.equal(whole.argmax(-1), expected.argmax(-1))


# ---- configs ----------------------------------------------------------------------------------


def test_smollm2_converts_to_the_published_config(smollm2):
    c = smollm2.config
    assert smollm2.lean and c.arch == "llama" and smollm2.arch == "llama"
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (576, 30, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta, c.tie_word_embeddings) == (49152, 1536, 100000.0, True)
    assert c.sliding_window is None and c.layer_types == () and smollm2.context_length == 8192
    assert 134e6 < smollm2.num_params < 136e6 and smollm2.weight_bytes == 4 * smollm2.num_params


def test_gemma3_converts_to_the_published_config(gemma3):
    c = gemma3.config
    assert gemma3.lean and c.arch == "gemma3" and gemma3.arch == "gemma3_text"
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (640, 18, 4, 1, 256)
    assert (c.vocab_size, c.intermediate_size, c.sliding_window, c.query_pre_attn_scalar) == (262144, 2048, 512, 256)
    assert (c.rope_local_theta, c.rope_theta, c.rope_scaling_factor) == (10000.0, 1_000_000.0, 1.0)
    assert c.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 3
    assert c.tie_word_embeddings and gemma3.context_length == 32768


# ---- logits parity with transformers ----------------------------------------------------------


def test_smollm2_lean_logits_equal_transformers(smollm2, smollm2_hf):
    tokens = smollm2.tokenizer.encode(PROMPT)
    assert 20 <= len(tokens) <= 40
    check_parity(smollm2.model, smollm2_hf, tokens, "smollm2-135m")


def test_gemma3_lean_logits_equal_transformers(gemma3, gemma3_hf):
    tokens = gemma3.tokenizer.encode(PROMPT)
    assert 20 <= len(tokens) <= 40 and tokens[0] == gemma3.tokenizer.bos_id
    check_parity(gemma3.model, gemma3_hf, tokens, "gemma3-270m")


def test_gemma3_sliding_window_layers_equal_transformers_past_the_window(gemma3, gemma3_hf):
    """The window shrunk from 512 to 8 on both sides, so a short prompt runs far past it."""
    window = 8
    weights = copy.copy(gemma3.weights)  # shares the parameters; its own config
    weights.cfg = dataclasses.replace(gemma3.config, sliding_window=window)
    lean = LeanModel(weights, max_seq_len=64)
    layers = gemma3_hf.model.layers
    saved = gemma3_hf.config.sliding_window, [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    try:
        gemma3_hf.config.sliding_window = window
        for layer in layers:
            if getattr(layer.self_attn, "sliding_window", None):
                layer.self_attn.sliding_window = window
        tokens = gemma3.tokenizer.encode(PROMPT)[:30]
        check_parity(lean, gemma3_hf, tokens, f"gemma3-270m, sliding window {window}")
        # the window matters: the real model (window 512) gives other logits for these tokens
        full_window = gemma3.model.forward(torch.tensor(tokens), 0)
        lean.truncate(0)
        assert (lean.forward(torch.tensor(tokens), 0) - full_window).abs().max() > 1.0
    finally:
        gemma3_hf.config.sliding_window = saved[0]
        for layer, value in zip(layers, saved[1]):
            if value is not None:
                layer.self_attn.sliding_window = value


def test_smollm2_speculative_greedy_output_equals_plain_greedy(smollm2):
    from speculant.drafters.ngram import NgramDrafter
    from speculant.engine import generate
    from speculant.sampling import SamplingParams

    prompt = smollm2.tokenizer.encode("a = [1, 2, 3]\nb = [1, 2, 3]\nc = [1, 2, 3]\nd =")
    greedy = SamplingParams(temperature=0.0)
    plain = [t for s in generate(smollm2.model, NgramDrafter(), prompt, gamma=0, params=greedy, max_new_tokens=16)
             for t in s.tokens]
    steps = list(generate(smollm2.model, NgramDrafter(), prompt, gamma=4, params=greedy, max_new_tokens=16))
    assert [t for s in steps for t in s.tokens] == plain
    stats = steps[-1].stats
    assert stats.accepted > 0 and stats.target_calls < 16  # n-gram drafts were tested and some accepted


# ---- loading, errors --------------------------------------------------------------------------


def test_a_cached_model_loads_in_well_under_two_seconds(smollm2):
    start = time.perf_counter()
    again = load_model("smollm2-135m", progress=False)
    seconds = time.perf_counter() - start
    print(f"\ncached load of smollm2-135m: {seconds:.2f} s")
    assert again.folder == smollm2.folder and again.source_hash == smollm2.source_hash
    assert seconds < 5.0  # about 0.7 s on a 2-core machine; generous for a loaded CI box


def test_a_draft_with_another_vocabulary_is_refused_naming_both(smollm2, gemma3):
    with pytest.raises(VocabularyMismatchError) as error:
        check_pairing(smollm2, gemma3)
    message = str(error.value)
    assert "smollm2-135m" in message and "gemma3-270m" in message
    assert "49152" in message and "262144" in message
    check_pairing(smollm2, smollm2)


def test_any_copy_or_format_of_smollm2_gets_its_shipped_draft_and_says_so(smollm2, tmp_path):
    """Pairing follows the model, not the file: a renamed copy of the GGUF and a Hugging Face folder
    re-saved in bfloat16 both get `smollm2-135m-draft` as their default draft, the stats name it, and
    the draft decodes exactly (greedy output equal to plain)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from speculant.api import Speculant

    gguf_copy = tmp_path / "my-renamed-model.gguf"
    shutil.copy(embedded_gguf("smollm2-135m", progress=False), gguf_copy)
    resaved = tmp_path / "resaved"
    shutil.copytree(smollm2.folder, resaved)
    tensors = load_file(str(resaved / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(resaved / "model.safetensors"))
    prompt = smollm2.tokenizer.encode(PROMPT)
    plain = Speculant(smollm2, ["none"]).generate(prompt, max_new_tokens=12, temperature=0.0).token_ids
    for path in (gguf_copy, resaved):
        loaded = load_model(path, max_seq_len=256, progress=False)
        assert loaded.name != smollm2.name and loaded.fingerprint == smollm2.fingerprint
        spec = Speculant(loaded, ["default"], gamma=3)
        assert spec.draft_specs == ["smollm2-135m-draft"]
        if path == gguf_copy:  # the same weights as smollm2's: the same greedy output
            assert spec.generate(prompt, max_new_tokens=12, temperature=0.0).token_ids == plain
    # the embedded draft's name is a draft spec of its own
    assert Speculant(smollm2, ["smollm2-135m-draft"], gamma=3).draft_specs == ["smollm2-135m-draft"]


def test_a_damaged_draft_folder_is_named_in_one_line(smollm2, tmp_path):
    import shutil

    from speculant.api import Speculant
    from speculant.chain import EMBEDDED_DRAFTS
    from speculant.models.cache import ModelLoadError

    cut, broken_config = tmp_path / "cut", tmp_path / "broken-config"
    for folder in (cut, broken_config):
        shutil.copytree(EMBEDDED_DRAFTS / "smollm2-135m-draft", folder)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (broken_config / "config.json").write_text('{"format": "speculant-draft", "archi')
    for folder, says in ((cut, "corrupt draft folder"), (broken_config, "corrupt (not readable JSON)")):
        with pytest.raises(ModelLoadError) as error:
            Speculant(smollm2, [str(folder)])
        assert str(folder) in str(error.value) and says in str(error.value) and "\n" not in str(error.value)


def test_the_shipped_draft_still_refuses_another_model(gemma3):
    from speculant.api import Speculant
    from speculant.models.feature_draft import TargetMismatchError

    assert Speculant(gemma3, ["default"]).draft_specs == ["ngram"]
    with pytest.raises((TargetMismatchError, ValueError), match="distilled from"):
        Speculant(gemma3, ["smollm2-135m-draft"])


def test_a_prompt_longer_than_the_context_is_refused(smollm2):
    from speculant.drafters.ngram import NgramDrafter
    from speculant.engine import generate

    short = load_model("smollm2-135m", max_seq_len=16, progress=False)
    assert short.model.max_seq_len == 16
    prompt = short.tokenizer.encode(PROMPT)
    with pytest.raises(ContextOverflowError, match="16"):
        next(generate(short.model, NgramDrafter(), prompt, max_new_tokens=4))


# ---- tokenizers -------------------------------------------------------------------------------


def test_smollm2_tokenizer_special_tokens_and_chat_template(smollm2):
    tok = smollm2.tokenizer
    assert tok.vocab_size == 49152 and tok.eos_ids == {0, 2} and tok.bos_id == 1
    assert tok.decode(tok.encode(PROMPT)) == PROMPT and tok.encode(PROMPT)[0] != tok.bos_id
    messages = [{"role": "user", "content": "Write hello world in Python."}]
    text = tok.apply_chat_template(messages)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWrite hello world in Python.<|im_end|>\n<|im_start|>assistant\n")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<|im_start|>",
                                                     eos_token="<|im_end|>")
    assert text == reference.apply_chat_template(messages, chat_template=tok.chat_template, tokenize=False,
                                                 add_generation_prompt=True)
    assert tok.encode_chat(messages)[0] == tok.bos_id


def test_gemma3_tokenizer_adds_bos_and_stops_on_end_of_turn(gemma3):
    tok = gemma3.tokenizer
    assert tok.vocab_size == 262144 and tok.bos_id == 2 and tok.eos_ids == {1, 106}
    ids = tok.encode(PROMPT)
    assert ids[0] == 2 and tok.encode(PROMPT, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == PROMPT


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_streamed_text_equals_the_full_decode_token_by_token(request, name):
    tok = request.getfixturevalue(name).tokenizer
    ids = tok.encode(MULTILINGUAL + PROMPT)
    stream = StreamDecoder(tok)
    pieces = [stream.add([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == (MULTILINGUAL + PROMPT)
    assert not any("\ufffd" in p for p in pieces)  # characters split over tokens came out whole
