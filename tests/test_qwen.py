"""The Qwen2.5-Coder pair with its real weights: qwen2.5-coder-1.5b (target) and qwen2.5-coder-0.5b
(its draft), installed by `bash scripts/setup.sh --qwen` (CI does). Skipped, with the reason, when
the pair is not installed.

The lean model must give transformers' float32 logits (a Qwen2ForCausalLM holding the same
tensors: biases on q/k/v, rope theta 1e6, the file's own output head), speculative decoding must
equal plain greedy decoding token for token with the 0.5B as draft (chain, candidates, lookup, and
the hierarchy 0.5B > ngram), and the first emitted token's law at T 1 must be the target's.

Cost on a 2-core CPU: loading the pair in float32 (9 GB) and about 40 forward passes of the 1.5B
(about a second each) for greedy equality; the chi-square law check samples the engine 50 times
(marked slow: it is the slowest test here, and CI runs it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speculant import chain
from speculant.api import Speculant
from speculant.models.cache import find_converted
from speculant.models.feature_draft import read_draft_config
from speculant.models.registry import EMBEDDED, check_pairing, embedded_installed, load_model
from speculant.models.transformer import LeanModel

transformers = pytest.importorskip("transformers")

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
FEATURE_DRAFT = "qwen2.5-coder-1.5b-draft"  # shipped in speculant/embedded
CODE = 'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n'


def _installed_or_skip(name: str) -> None:
    entry = EMBEDDED[name]
    if find_converted(entry.sha256) is None and not embedded_installed(name):
        pytest.skip(f"{name} is not installed (bash scripts/setup.sh --qwen)")


@pytest.fixture(scope="module")
def target():
    _installed_or_skip(TARGET)
    _installed_or_skip(DRAFT)
    return load_model(TARGET, max_seq_len=128)


@pytest.fixture(scope="module")
def draft(target):
    return load_model(DRAFT, max_seq_len=128)


def transformers_twin(loaded) -> torch.nn.Module:
    """A transformers Qwen2ForCausalLM holding the lean model's own tensors (no copy): the same weights
    through transformers' independent Qwen2 code."""
    config = transformers.AutoConfig.from_pretrained(str(loaded.folder))
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    state = {}
    for name, tensor in loaded.weights.state_dict().items():
        if name.startswith("layers."):
            _, index, proj, kind = name.split(".")
            group = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            if proj.endswith("layernorm"):
                state[f"model.layers.{index}.{proj}.{kind}"] = tensor
            else:
                state[f"model.layers.{index}.{group}.{proj}.{kind}"] = tensor
        elif name.startswith("lm_head"):
            state[name] = tensor
        else:
            state[f"model.{name}"] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if "lm_head.weight" in missing:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its inv_freq buffer, off the meta device
    return model.eval()


def test_the_pair_converts_to_the_published_configs_and_shares_one_vocabulary(target, draft):
    for loaded, layers, hidden, heads in ((target, 28, 1536, 12), (draft, 24, 896, 14)):
        cfg = loaded.config
        assert loaded.arch == "qwen2" and loaded.lean and isinstance(loaded.model, LeanModel)
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (layers, hidden, heads, 2)
        assert cfg.vocab_size == 151936 and cfg.rope_theta == 1e6 and cfg.attention_bias
        assert loaded.source_hash == EMBEDDED[loaded.name].sha256
        assert loaded.fingerprint == EMBEDDED[loaded.name].fingerprint
        assert 151645 in loaded.tokenizer.eos_ids  # <|im_end|>
    assert not target.config.tie_word_embeddings and target.weights.lm_head is not None  # the file has output.weight
    check_pairing(target, draft)
    ids = target.tokenizer.encode(target.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]),
                                  add_special_tokens=False)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|>system\n: the template's default system turn


@pytest.mark.parametrize("which", ["target", "draft"])
def test_lean_float32_logits_equal_transformers_qwen2(request, which):
    loaded = request.getfixturevalue(which)
    twin = transformers_twin(loaded)
    tokens = loaded.tokenizer.encode(CODE)
    with torch.no_grad():
        expected = twin(torch.tensor(tokens)[None]).logits[0]
    model = loaded.model
    model.truncate(0)
    whole = model.forward(torch.tensor(tokens), 0)
    model.truncate(len(tokens) - 2)  # the cache path: the last two tokens one at a time
    pieces = [model.forward(torch.tensor([tokens[i]]), i) for i in range(len(tokens) - 2, len(tokens))]
    diff = max((whole - expected).abs().max().item(), (torch.cat(pieces) - expected[-2:]).abs().max().item())
    assert diff < 2e-3, f"{which}: logits up to {expected.abs().max().item():.1f}, max abs diff {diff}"
    assert torch.equal(whole.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_draft_runs_in_half_precision_close_to_float32(draft, dtype):
    half = load_model(DRAFT, dtype=dtype, max_seq_len=64, progress=False)
    tokens = draft.tokenizer.encode(CODE)
    draft.model.truncate(0)
    reference = draft.model.forward(torch.tensor(tokens), 0)
    logits = half.model.forward(torch.tensor(tokens), 0).float()
    assert torch.isfinite(logits).all()
    probs, reference_probs = torch.softmax(logits, -1), torch.softmax(reference, -1)
    total_variation = 0.5 * (probs - reference_probs).abs().sum(-1)
    assert total_variation.mean() < 0.05, total_variation  # rounding, not a wrong model
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


@pytest.fixture(scope="module")
def plain_greedy(target) -> list[int]:
    return Speculant(target, ["none"]).generate(target.tokenizer.encode(CODE), max_new_tokens=8,
                                                temperature=0.0).token_ids


@pytest.mark.parametrize("drafts,options", [
    ([DRAFT], {}),
    ([DRAFT], {"candidates": 2}),
    ([DRAFT], {"lookup": 8}),
    ([DRAFT, "ngram"], {}),
    ([FEATURE_DRAFT], {}),
    ([FEATURE_DRAFT], {"candidates": 2, "lookup": 8}),
], ids=["chain", "candidates", "lookup", "hierarchy-ngram", "feature-draft", "feature-draft-tree-lookup"])
def test_speculative_greedy_output_equals_plain_greedy(target, plain_greedy, drafts, options):
    spec = Speculant(target, drafts, gamma=3, **options)
    out = spec.generate(target.tokenizer.encode(CODE), max_new_tokens=8, temperature=0.0)
    assert out.token_ids == plain_greedy
    assert out.stats["accepted"] > 0  # the draft's tokens were checked, and some kept
    assert spec.draft_specs == drafts


def test_the_shipped_feature_draft_is_the_targets_default_and_reads_its_layers(target, draft):
    """The embedded `qwen2.5-coder-1.5b-draft` (distilled on an H100, int8) is the 1.5B's default
    draft, by name and by the loaded model's weights; it reads the target's layers 2, 14 and 25; the
    0.5B is refused it (the draft was distilled from the 1.5B's features)."""
    folder = chain.embedded_draft_folder(FEATURE_DRAFT)
    assert chain.default_draft(TARGET) == str(folder) == chain.default_draft(target)
    config = read_draft_config(folder)
    assert config["target_hash"] == EMBEDDED[TARGET].sha256
    assert config["architecture"]["feature_layers"] == [2, 14, 25] and config["dtype"] == "int8"
    assert (folder / "model.safetensors").stat().st_size < 21_000_000  # the shipped drafts' 30 MB budget
    spec = Speculant(target, ["default"], gamma=3)
    assert spec.draft_specs == [FEATURE_DRAFT]
    with pytest.raises(ValueError, match="was distilled from 'qwen-1.5b'.*not from this target"):
        Speculant(draft, [FEATURE_DRAFT])  # the module's 0.5B, not a second load of it


@pytest.mark.slow
def test_first_emitted_token_follows_the_targets_law_at_temperature_one(target, draft, gof):
    """50 draws of the first token through the engine with the 0.5B drafting (γ 1), against the
    1.5B's softmax computed by transformers (float32). The prompt is one where the two models
    disagree (total variation 0.57: the 0.5B puts 0.50 on its first choice, the 1.5B 0.19), so a
    sampler that emitted the draft's tokens unchecked would be caught: the power against the 0.5B's
    law is computed and asserted (0.98 at these 50 draws, 3 pooled cells), and draws from that law
    must fail the test."""
    prompt = target.tokenizer.encode("The capital of Australia is")
    with torch.no_grad():
        law = torch.softmax(transformers_twin(target)(torch.tensor(prompt)[None]).logits[0, -1].double(), -1).numpy()
        draft.model.truncate(0)
        draft_law = torch.softmax(draft.model.forward(torch.tensor(prompt), 0)[-1].double(), -1).numpy()
    law, draft_law = law / law.sum(), draft_law / draft_law.sum()
    draws, significance = 50, 1e-3
    power = gof.power(law, draft_law, draws, significance=significance)
    print(f"\nchi-square power against always-accept (the 0.5B's law) with {draws} draws: {power.power:.3f} "
          f"(noncentrality {power.noncentrality:.1f}, {power.cells} cells)")
    assert power.power > 0.9
    broken = np.random.default_rng(0).choice(len(draft_law), size=draws, p=draft_law)  # always-accept's draws
    assert gof.chi_square(broken, law).pvalue < significance
    spec = Speculant(target, [DRAFT], gamma=1)
    firsts = [spec.generate(prompt, max_new_tokens=1, temperature=1.0, seed=seed).token_ids[0]
              for seed in range(draws)]
    fit = gof.chi_square(np.array(firsts), law)
    assert fit.pvalue > significance, fit
