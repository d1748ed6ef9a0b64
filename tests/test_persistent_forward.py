"""speculant.models.persistent_forward: a one-row forward in one launch, against the forward it replaces
(TritonForward's GEMV path: triton_layers' kernels, 6 a layer) and LeanModel.forward, on tiny random models:
logits and the KV cache over decode steps whose attention spans several chunks (so a head's chunks are merged by
its last unit), with negative controls (a layer reading another layer's weights, a wrong position) that the same
comparison must catch. Under the interpreter (no GPU) the kernel runs as one program, so its barriers pass at
once: these tests check the arithmetic and the split of each phase's work; on a GPU they run with every SM's
program and the grid barriers. Then the fused step on it (plain decoding, a draft model's chain) gives plain
greedy output, also captured in CUDA graphs on a GPU. tests/test_triton_layers.py compiles the kernel for sm_90."""

from __future__ import annotations

import pytest
import torch
from test_triton_layers import TOLERANCE, _error, _round_bfloat16_to_nearest, count_launches

from speculant.models import persistent_forward as pf
from speculant.models import triton_forward as tl_forward
from speculant.models import triton_layers as tl_layers
from speculant.models.transformer import LeanModel, random_weights, tiny_config

STEPS = [(5, 10), (9, 11), (1, 12), (4, 13), (4, 14), (2, 15)]  # (token, position): one-row decode calls


@pytest.fixture(autouse=True)
def _small_chunks(triton_device, monkeypatch):
    """Chunks of 4 keys, so that positions 10..15 read 3-4 chunks; bf16 rounded as on a GPU (see
    test_triton_layers)."""
    monkeypatch.setattr(pf, "CHUNK", 4)
    if triton_device == "cpu":
        _round_bfloat16_to_nearest(monkeypatch)


def _pair(device, dtype, **overrides):
    """(kernels, persistent, reference): TritonForward without and with the one-launch forward, and a LeanModel,
    each over the same weights with its own cache, all three prefilled with the same 10 tokens."""
    cfg = tiny_config(num_layers=2, **overrides)
    weights = random_weights(cfg, seed=0, scale=2.0, dtype=dtype).to(device)
    models = [LeanModel(weights, max_seq_len=32) for _ in range(3)]
    prompt = torch.tensor([(7 * i + 3) % 64 for i in range(10)], device=device)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pf, "PERSISTENT", False)
        kernels = tl_forward.TritonForward(models[0], chunk=4)
        patch.setattr(pf, "PERSISTENT", True)
        persistent = tl_forward.TritonForward(models[1], chunk=4)
        for forward in (kernels, persistent, models[2]):
            patch.setattr(pf, "PERSISTENT", False)  # the prompt through the same kernels
            forward.forward(prompt, 0)
    assert kernels.persistent is None and persistent.persistent is not None
    return kernels, persistent, models[2]


def _decode(forward, steps=STEPS) -> torch.Tensor:
    """The one-row calls' logits [steps, V] (the persistent path where the forward has it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pf, "PERSISTENT", True)
        return torch.cat([forward.forward(torch.tensor([t], device=forward.model.device), p) for t, p in steps])


@pytest.mark.parametrize("dtype, bias, kv_heads", [(torch.float32, False, 2), (torch.float32, True, 1),
                                                   (torch.float32, True, 4), (torch.bfloat16, True, 2)])
def test_a_one_row_forward_in_one_launch_is_the_kernels_forward(triton_device, dtype, bias, kv_heads):
    """The same logits and K/V as the GEMV forward (float32: within 1e-5 of the largest value; bfloat16: 2e-2,
    where the two sum in other orders), and in float32 as LeanModel.forward; no barrier gave up."""
    kernels, persistent, reference = _pair(triton_device, dtype, attention_bias=bias, num_kv_heads=kv_heads)
    want, got = _decode(kernels), _decode(persistent)
    assert got.dtype == torch.float32 and got.shape == want.shape == (len(STEPS), 64)
    assert _error(got, want) <= TOLERANCE[dtype], _error(got, want)
    end = STEPS[-1][1] + 1
    for ours, theirs in ((persistent.model.k_cache, kernels.model.k_cache),
                         (persistent.model.v_cache, kernels.model.v_cache)):
        assert _error(ours[:, :end], theirs[:, :end]) <= TOLERANCE[dtype]
    if dtype == torch.float32:
        truth = torch.cat([reference.forward(torch.tensor([t], device=triton_device), p) for t, p in STEPS])
        assert _error(got, truth) <= TOLERANCE[dtype]
    persistent.persistent.check()
    assert int(persistent.persistent.counters.abs().sum()) == 0  # zeroed for the next launch


def test_the_comparison_catches_a_layer_reading_the_wrong_weights_and_a_wrong_position(triton_device):
    """Negative controls: layer 1's row of the pointer table pointing at layer 0's weights, and a forward told
    position + 1, each fail the comparison above."""
    kernels, persistent, _ = _pair(triton_device, torch.float32)
    want = _decode(kernels)
    table = persistent.persistent.table
    kept = table[1].clone()
    table[1] = table[0]
    assert _error(_decode(persistent), want) > 100 * TOLERANCE[torch.float32]
    table[1] = kept
    persistent.model.truncate(10)
    device = persistent.model.device
    wrong = torch.cat([persistent.persistent(torch.tensor([t], device=device), torch.tensor([p + 1], device=device))
                       for t, p in STEPS])
    assert _error(wrong, want) > 100 * TOLERANCE[torch.float32]
    persistent.model.truncate(10)
    assert _error(_decode(persistent), want) <= TOLERANCE[torch.float32]  # and put right, it agrees again


def test_a_one_row_forward_is_one_launch_and_longer_calls_keep_the_kernels(triton_device, monkeypatch):
    """One persistent launch and no triton_layers kernel for a one-row call; a 3-row call runs the kernels."""
    _, persistent, _ = _pair(triton_device, torch.float32)
    pf._kernel()
    launched = count_launches(monkeypatch, tl_layers._kernels(), count_launches(monkeypatch, pf._KERNELS))
    _decode(persistent, STEPS[:1])
    assert launched == ["forward"]  # persistent_forward's one kernel
    launched.clear()
    monkeypatch.setattr(pf, "PERSISTENT", True)
    persistent.forward(torch.tensor([1, 2, 3], device=triton_device), 11)
    assert set(launched) <= set(tl_layers._kernels()) and len(launched) == 6 * 2 + 1


def test_features_and_taps_are_the_kernels_forwards(triton_device):
    """A model keeping features (a feature draft's, with taps from layers 0 and 1) records the same features
    through the one-launch forward as through the kernels."""
    kernels, persistent, _ = _pair(triton_device, torch.float32)
    for forward in (kernels, persistent):
        forward.model.keep_features((0, 1), lambda hidden, taps: hidden + taps[0] - 0.5 * taps[1])
    _decode(kernels)
    _decode(persistent)
    end = STEPS[-1][1] + 1
    ours, theirs = persistent.model.features[10:end], kernels.model.features[10:end]
    assert _error(ours, theirs) <= TOLERANCE[torch.float32] and theirs.abs().max() > 0


def test_a_barrier_that_gave_up_is_an_error_and_unsupported_models_keep_the_kernels(triton_device):
    """check() raises once a barrier has set the status word (then clears it); a model whose head's half is not
    a multiple of the q|k|v unit's columns is refused in one line, and TritonForward keeps the kernels for it."""
    _, persistent, _ = _pair(triton_device, torch.float32)
    one = persistent.persistent
    one.check()
    one.status.fill_(1)
    with pytest.raises(RuntimeError, match="not all resident"):
        one.check()
    one.check()
    cfg = tiny_config(num_layers=1, head_dim=12, num_heads=2, num_kv_heads=1)
    model = LeanModel(random_weights(cfg, seed=0).to(triton_device), max_seq_len=16)
    assert "columns" in pf.unsupported(model)
    with pytest.raises(ValueError, match="columns"):
        pf.PersistentForward(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pf, "PERSISTENT", True)
        assert tl_forward.TritonForward(model).persistent is None


# ---- in the fused step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "chain"])
def test_the_fused_step_on_the_one_launch_forward_gives_plain_greedy_output(triton_device, kind, monkeypatch):
    """float32, PERSISTENT on: plain decoding (its one-row steps) and a draft model's chain (the draft's one-row
    forwards; the target's verifications keep the kernels) give plain greedy output token for token, through the
    persistent kernel."""
    from test_triton_fused import GREEDY, PROMPT, _model, _run

    from speculant.drafters.model import ModelDrafter
    from speculant.fused import fused_stepper
    from speculant.reference import reference_generate

    monkeypatch.setattr(pf, "PERSISTENT", True)
    pf._kernel()
    launched = count_launches(monkeypatch, pf._KERNELS)
    target = _model(triton_device)
    drafter = ModelDrafter(LeanModel(target.weights, max_seq_len=48, num_layers=1)) if kind == "chain" else None
    stepper = fused_stepper(target, drafter, compile=False, use_graphs=False, kernels="triton")
    expected = reference_generate(target, PROMPT, params=GREEDY, max_new_tokens=12)
    tokens, _ = _run(target, drafter, stepper, 3 if kind == "chain" else 0)
    assert tokens == expected and len(launched) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and grid barriers need a GPU")
@pytest.mark.parametrize("kind", ["plain", "chain"])
def test_the_one_launch_forward_captured_in_cuda_graphs_gives_plain_greedy_output(kind, monkeypatch):
    """float32 on CUDA, every step a graph replay: plain greedy output over two requests, and no grid barrier gave
    up (every program resident: PersistentForward.check)."""
    from test_triton_fused import GREEDY, PROMPT, _model

    from speculant.drafters.model import ModelDrafter
    from speculant.engine import generate
    from speculant.fused import fused_stepper
    from speculant.reference import reference_generate

    monkeypatch.setattr(pf, "PERSISTENT", True)
    target = _model("cuda", layers=3, seq=256, hidden_size=64, num_heads=4, num_kv_heads=2)
    draft = LeanModel(target.weights, max_seq_len=256, num_layers=1)

    def make():
        return ModelDrafter(draft) if kind == "chain" else None

    stepper = fused_stepper(target, make(), use_graphs=True, compile=False, kernels="triton")
    prompt = PROMPT * 5
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=40)
    for _ in range(2):
        out = [t for step in generate(target, make(), prompt, gamma=0 if kind == "plain" else 4, params=GREEDY,
                                      max_new_tokens=40, stepper=stepper) for t in step.tokens]
        assert out == expected
    # the TritonForwards the step's graphs captured (fused._compiled keeps their bound forwards on each model)
    ones = [fn.__self__.persistent for model in (target, draft) for fn in model.__dict__.get("_compiled_forwards", {}
            ).values() if getattr(getattr(fn, "__self__", None), "persistent", None) is not None]
    assert len(ones) == (2 if kind == "chain" else 1)
    for one in ones:
        one.check()
