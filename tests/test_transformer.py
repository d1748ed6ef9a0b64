"""The lean transformer's serving layout against its plain reference, and the `prefill` protocol.

Frozen weights are served fused (q|k|v and gate|up as one matrix each) and, on the CPU, with every
matrix stored column-major; trainable weights run the plain per-projection modules. Both must
compute the same function, load and save the same state dict, and decode the same greedy tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from speculant.models.base import CausalLM
from speculant.models.hf import HFCausalLM
from speculant.models.markov import MarkovModel
from speculant.models.transformer import (
    Int8Matrix,
    LeanModel,
    TransformerWeights,
    int8_weights,
    random_weights,
    tiny_config,
)

CONFIGS = {
    "llama": {"arch": "llama"},
    "qwen2 (q/k/v bias, untied head)": {"arch": "llama", "attention_bias": True, "tie_word_embeddings": False},
    "gemma3": {"arch": "gemma3"},
    "multi-head (KV = H)": {"arch": "llama", "num_kv_heads": 4},
}


def served_and_reference(overrides: dict, seed: int = 0) -> tuple[LeanModel, LeanModel]:
    """The same weights twice: frozen (served: fused, column-major on the CPU) and trainable
    (the reference: the separate nn.Linear projections, row-major head)."""
    frozen = random_weights(tiny_config(**overrides), seed=seed, scale=3.0)
    trainable = copy.deepcopy(frozen).requires_grad_(True)
    return LeanModel(frozen, max_seq_len=64), LeanModel(trainable, max_seq_len=64)


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix products torch dispatches (in inference mode F.linear arrives as aten.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.linear, torch.ops.aten.matmul, torch.ops.aten.mm,
                                   torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


# ---- fused projections ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_the_served_layout_computes_the_reference_logits(overrides, attention):
    served, reference = served_and_reference(overrides)
    layer = served.weights.layers[0]
    assert layer.qkv is not None and layer.gate_up is not None  # fused
    assert reference.weights.layers[0].qkv is None  # the reference really runs the separate modules
    served.attention = reference.attention = attention
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (20,), generator=g)
    anc = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # a tree: root, two children
    for model in (served, reference):
        model.truncate(0)
    calls = [(tokens[:12], 0, None), (tokens[12:13], 12, None), (tokens[13:16], 13, None), (tokens[16:19], 16, anc)]
    for t, start, ancestors in calls:
        got = served.forward(t, start, ancestors=ancestors)
        expected = reference.forward(t, start, ancestors=ancestors)
        # float32 summation order only (fused and column-major GEMMs add in another order): ~1e-5
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
        assert got.abs().max() > 1.0  # logits of a real size, so the tolerance is tight
    # a model that gets the fused split wrong must fail the same comparison: swap k and v
    broken = copy.deepcopy(served.weights)
    for blk in broken.layers:
        q, k, v = blk.qkv[0].split([blk.q_proj.out_features, blk.k_proj.out_features, blk.v_proj.out_features])
        blk.qkv = (torch.cat([q, v, k]), blk.qkv[1])
    wrong = LeanModel(broken, max_seq_len=64)
    wrong.attention = attention
    reference.truncate(0)
    assert (wrong.forward(tokens[:12], 0) - reference.forward(tokens[:12], 0)).abs().max() > 1e-2


def test_a_fused_layer_runs_four_matrix_products_where_the_reference_runs_seven():
    served, reference = served_and_reference(CONFIGS["llama"])
    served.attention = reference.attention = "sdpa"  # attention itself is not a matmul here
    layers = served.cfg.num_layers
    counts = []
    for model in (served, reference):
        with CountMatmuls() as counter:
            model.forward(torch.tensor([3]), 0)
        counts.append(counter.count)
    assert counts == [4 * layers + 1, 7 * layers + 1]  # + the output head


def test_the_served_state_dict_is_the_reference_state_dict_and_round_trips(tmp_path):
    served, reference = served_and_reference(CONFIGS["qwen2 (q/k/v bias, untied head)"])
    mine, theirs = served.weights.state_dict(), reference.weights.state_dict()
    assert list(mine) == list(theirs)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    # saved as safetensors (which needs contiguous, unshared tensors) and read back
    save_file({k: v.contiguous() for k, v in mine.items()}, tmp_path / "w.safetensors")
    fresh = TransformerWeights(served.cfg)
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert all(torch.equal(fresh.state_dict()[k], mine[k]) for k in mine)


def test_loading_a_state_dict_into_served_weights_updates_what_forward_multiplies_by():
    """Distillation and draft loading write weights through the separate names after fusion."""
    served, _ = served_and_reference(CONFIGS["qwen2 (q/k/v bias, untied head)"], seed=0)
    _, other_reference = served_and_reference(CONFIGS["qwen2 (q/k/v bias, untied head)"], seed=5)
    tokens = torch.tensor([1, 5, 9, 2])
    before = served.forward(tokens, 0)
    served.weights.load_state_dict(other_reference.weights.state_dict())
    served.truncate(0)
    after = served.forward(tokens, 0)
    torch.testing.assert_close(after, other_reference.forward(tokens, 0), atol=1e-4, rtol=1e-5)
    assert (after - before).abs().max() > 1e-2


def test_the_int8_copy_does_not_depend_on_the_served_layout():
    """int8_weights quantizes the same values whether the weights were served (fused, head
    column-major) or not: the two copies give the same bits."""
    weights = random_weights(tiny_config("llama"), seed=0, scale=3.0)
    untouched = copy.deepcopy(weights)
    LeanModel(weights, max_seq_len=64)  # lays the weights out for serving
    assert weights.head_weight().stride() != untouched.head_weight().stride()
    served8 = LeanModel(int8_weights(weights), max_seq_len=64)
    plain8 = LeanModel(int8_weights(untouched), max_seq_len=64)
    assert isinstance(served8.weights.head(), Int8Matrix)
    tokens = torch.tensor([1, 5, 9, 2, 7])
    assert torch.equal(served8.forward(tokens, 0), plain8.forward(tokens, 0))


# ---- the CPU layout --------------------------------------------------------------------------------


def is_column_major(matrix: torch.Tensor) -> bool:
    return matrix.stride(0) == 1


def test_on_the_cpu_every_served_matrix_is_column_major_with_the_same_values():
    frozen = random_weights(tiny_config("llama"), seed=0)
    values = frozen.embed_tokens.weight.clone()
    layer_values = {k: v.clone() for k, v in frozen.layers[0].state_dict().items()}
    model = LeanModel(frozen, max_seq_len=32)
    layer = model.weights.layers[0]
    assert all(is_column_major(m) for m in (layer.qkv[0], layer.gate_up, layer.o, layer.down))
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in layer_values.items())
    head = model.weights.head_weight()
    assert is_column_major(head)
    assert torch.equal(head, values) and torch.equal(model.embed(torch.tensor([3, 0])), values[[3, 0]])
    LeanModel(frozen, max_seq_len=32)  # a second model over the same weights (layers:N) keeps them so
    assert frozen.head_weight().stride() == head.stride() and torch.equal(frozen.head_weight(), values)


def test_on_the_cpu_bfloat16_matrices_stay_row_major():
    """bfloat16 GEMMs of a few rows are faster by the row-major matrix (serves_column_major)."""
    model = LeanModel(random_weights(tiny_config("llama"), seed=0, dtype=torch.bfloat16), max_seq_len=32)
    layer = model.weights.layers[0]
    assert not any(is_column_major(m) for m in (layer.qkv[0], layer.gate_up, layer.o, layer.down))
    assert not is_column_major(model.weights.head_weight())


@pytest.mark.parametrize("overrides", [CONFIGS["llama"], CONFIGS["gemma3"]], ids=["llama", "gemma3"])
def test_greedy_choices_are_the_reference_choices_at_every_decoding_step(overrides):
    """Float32: at each of 48 one-token decoding steps (the inputs drawn at random, so the steps are
    not a tiny model's fixed point) the served layout's argmax is the reference's."""
    served, reference = served_and_reference(overrides, seed=2)
    inputs = torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(3))
    choices = []
    for model in (served, reference):
        model.prefill(torch.tensor([1, 2, 3, 4]))
        choices.append([int(model.forward(inputs[i:i + 1], 4 + i)[-1].argmax()) for i in range(len(inputs))])
    assert choices[0] == choices[1]
    assert len(set(choices[0])) > 5


# ---- one attention for one row and for several ----------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_one_row_of_forward_rows_is_bitwise_the_single_row_forward(arch, attention):
    """The single-row and the batched forward run the same attention code: for one row they give the
    same bits, so a request batched alone decodes what it decodes alone."""
    model = LeanModel(random_weights(tiny_config(arch), seed=0, scale=4.0), max_seq_len=64)
    model.attention = attention
    cache = model.new_row_cache(3)
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    rows, _ = model.forward_rows(cache, tokens[:, :6], [0], [6], first_row=2)
    step, _ = model.forward_rows(cache, tokens[:, 6:], [6], [3], first_row=2)
    model.truncate(0)
    assert torch.equal(rows[0], model.forward(tokens[0, :6], 0))
    assert torch.equal(step[0], model.forward(tokens[0, 6:], 6))
    assert torch.equal(cache.k[:, 2, :, :9], model.k_cache[:, :9].transpose(1, 2)) and not cache.k[:, :2].any()  # its own row only


@pytest.mark.parametrize("attention", ["matmul", "blocked"])
def test_batched_attention_reads_the_cache_in_place(attention):
    """The batched forward multiplies each row's keys and values where they lie: no op copies a
    layer's cache (rows · KV heads · keys · D elements). With slots stored before heads, matmul copied
    every layer's whole view first: on an H100 that copy was 40 % of a 64-row step."""
    model = LeanModel(random_weights(tiny_config("llama")), max_seq_len=256)
    model.attention = attention
    cache = model.new_row_cache(4)
    one_layer = 4 * model.cfg.num_kv_heads * 256 * model.cfg.head_dim
    copies = {torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default,
              torch.ops.aten.constant_pad_nd.default}

    class LargeCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in copies and isinstance(out, torch.Tensor) and out.numel() >= one_layer:
                self.seen.append((func, tuple(out.shape)))
            return out

    tokens = torch.randint(0, 64, (4, 3), generator=torch.Generator().manual_seed(0))
    starts, lengths = torch.tensor([0, 5, 9, 2]), torch.tensor([3, 3, 2, 1])
    with LargeCopies() as counter:
        logits, _ = model.forward_rows_static(cache, tokens, starts, lengths, kv_len=256)
    assert counter.seen == []
    assert torch.isfinite(logits).all()


# ---- prefill: part of the CausalLM protocol --------------------------------------------------------


def hf_tiny() -> HFCausalLM:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return HFCausalLM(transformers.LlamaForCausalLM(config).float())


MODELS = {
    "lean": lambda: LeanModel(random_weights(tiny_config("llama", vocab_size=50), seed=0, scale=3.0), max_seq_len=64),
    "lean layers:1": lambda: LeanModel(random_weights(tiny_config("llama", vocab_size=50), seed=0), 64, num_layers=1),
    "transformers": hf_tiny,
    "markov": lambda: MarkovModel(torch.randn(50, 50, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_prefill_leaves_the_cache_as_a_forward_of_the_prompt_does(make):
    model = make()
    assert isinstance(model, CausalLM)
    prompt, more = torch.tensor([4, 8, 15, 16, 23]), torch.tensor([42, 7])
    model.forward(torch.tensor([9, 9, 9, 9, 9, 9, 9]), 0)  # something else was cached before
    assert model.prefill(prompt) is None
    assert model.length == 5
    after_prefill = model.forward(more, 5)
    model.truncate(0)
    model.forward(prompt, 0)
    torch.testing.assert_close(after_prefill, model.forward(more, 5), atol=1e-5, rtol=1e-5)
    model.prefill(torch.tensor([], dtype=torch.int64))
    assert model.length == 0
    if not isinstance(model, MarkovModel):  # (a Markov chain's logits do not read the cache)
        # another prompt is told apart by the same comparison
        model.prefill(torch.tensor([4, 8, 15, 3, 23]))
        assert (model.forward(more, 5) - after_prefill).abs().max() > 1e-3


def test_prefill_of_a_prompt_past_the_context_is_refused_in_one_line():
    model = MODELS["lean"]()
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        model.prefill(torch.zeros(65, dtype=torch.int64))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_compiled_layer_compiles_once_for_every_layer(arch, monkeypatch):
    """compile_layers: one compiled function serves all the layers (their weights and cache rows are
    its inputs, not constants dynamo guards on), Gemma's sliding and global layers alike: the prompt
    compiles once, a plain step (one token: dynamo specialises a length of 1) once, a call of another
    length once more (symbolic), and later lengths nothing. Counted with dynamo's own counter, through
    its cheapest backend (the frames it compiles do not depend on the backend); the logits are the
    eager model's."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{"backend": "eager", **kw}))
    layer_types = ("sliding_attention", "full_attention") * 3 if arch == "gemma3" else ()
    weights = random_weights(tiny_config(arch, num_layers=6, layer_types=layer_types), seed=2)
    eager, compiled = LeanModel(weights, max_seq_len=64), LeanModel(weights, max_seq_len=64)
    compiled.compile_layers()
    torch._dynamo.reset()
    counters.clear()
    prompt = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    eager.prefill(prompt[:5])
    compiled.prefill(prompt[:5])
    assert counters["frames"]["ok"] == 1
    compiles = []
    for start, end in ((5, 6), (6, 8), (8, 9), (9, 10), (5, 8)):
        assert torch.equal(compiled.forward(prompt[start:end], start), eager.forward(prompt[start:end], start))
        compiles.append(counters["frames"]["ok"])
    assert compiles == [2, 3, 3, 3, 3]
    compiled.compile_layers(False)
    assert "_layer" not in compiled.__dict__
