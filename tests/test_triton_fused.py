"""The fused step on speculant's Triton kernels (FusedStepper(kernels="triton"), the forward of
speculant.models.triton_forward): a tree's forward equals LeanModel.forward with ancestors; in
float32 greedy output equals plain greedy decoding token for token, for plain decoding, a draft
model's chain, a tree of candidates, a lookup branch and a feature draft; what cannot run is refused
in one line; the API and the CLI take the option.

The law. The triton step calls the same drafting, sampling and acceptance functions as the torch
fused step (sample_chain, logits_to_probs, sample_from, verify / verify_candidates,
emitted_tokens), whose law tests/test_fused.py checks by chi-square against the target's exact law
with a negative control; only the logits come from other kernels. So the law carries over if the
logits are the model's: here the tree forward is checked against LeanModel.forward to ~1e-5, and a
sampled run of a tree of candidates (the alternatives' noise draws, the residual) gives, seed for
seed, the torch fused step's tokens (the same uniforms on logits within ~1e-5: a token changes only
if a uniform falls within that distance of a cumulative probability). A chi-square over thousands of
requests would take hours under the interpreter.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py;
slow, so the models are tiny: 2 layers, 2 heads, E 16, a vocabulary of 32); where triton is
missing, or was imported without the interpreter, the tests skip. The last test runs only on CUDA:
the triton fused step captured in CUDA graphs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from speculant.acceptance import candidate_tree
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper, fused_stepper
from speculant.models.feature_draft import DraftConfig, build_draft, init_random
from speculant.models.transformer import LeanModel, int8_weights, random_weights, tiny_config
from speculant.models.triton_forward import TritonForward
from speculant.reference import reference_generate
from speculant.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
VOCAB = 32
SMALL = {"num_heads": 2, "num_kv_heads": 1, "hidden_size": 16, "intermediate_size": 32}  # few programs per kernel
PROMPT = [1, 2, 3, 4, 5, 1, 2, 3, 4]  # repeats: the lookup branch finds continuations


def _model(device, layers=2, seed=0, bias=False, seq=48, arch="llama", **overrides) -> LeanModel:
    """A tiny float32 lean model; bias: Qwen2's q|k|v bias."""
    cfg = tiny_config(arch, vocab_size=VOCAB, num_layers=layers, attention_bias=bias, **{**SMALL, **overrides})
    return LeanModel(random_weights(cfg, seed=seed, scale=3.0).to(device), max_seq_len=seq)


def _distilled_draft(target: LeanModel, inputs: str = "features", seed: int = 5):
    """A random one-layer distilled draft over the target's embedding: a feature draft (EAGLE-style)
    or one that reads tokens only."""
    cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=VOCAB, inputs=inputs)
    draft = build_draft(cfg, target.weights, torch.arange(VOCAB), max_seq_len=target.max_seq_len)
    init_random(draft.draft_weights, seed, scale=1.0)
    return draft


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest difference, relative to the largest |reference| value (as tests/test_triton_layers.py)."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _run(target, drafter, stepper, gamma, params=GREEDY, max_new=12, seed=0):
    """(tokens, stats) of one request after PROMPT."""
    generator = torch.Generator(device=target.device).manual_seed(seed)
    steps = list(generate(target, drafter, PROMPT, gamma=gamma, params=params, max_new_tokens=max_new,
                          generator=generator, stepper=stepper))
    return [t for step in steps for t in step.tokens], steps[-1].stats


# ---- the forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2"])
def test_a_trees_triton_forward_is_lean_model_forward_with_ancestors(triton_device, bias):
    """After a 21-token prompt, a 12-node tree (γ 3, K 3, a lookup branch of 2) and a 35-node one (γ 8,
    K 4, G 2: two pieces of rows): the logits, the K/V written at the tree's slots and the features
    equal LeanModel.forward's within 1e-5 (float32). Negative control: the same tokens as a chain
    (no ancestors) give other logits."""
    reference, model = _model(triton_device, bias=bias, seq=64), _model(triton_device, bias=bias, seq=64)
    for m in (reference, model):
        m.keep_features()
    forward = TritonForward(model, chunk=16)  # the tree's slots span two chunks
    prompt = torch.tensor([(7 * i + 3) % VOCAB for i in range(21)], device=triton_device)
    assert _error(forward(prompt, 0), reference.forward(prompt, 0)) <= 1e-5
    for gamma, k, lookup in ((3, 3, 2), (8, 4, 2)):
        _, ancestors = candidate_tree(gamma, k, lookup)
        n = ancestors.shape[0]
        tokens = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).to(triton_device)
        for m in (reference, model):
            m.truncate(21)
        want, got = reference.forward(tokens, 21, ancestors), forward(tokens, 21, ancestors)
        assert model.length == reference.length == 21 + n
        assert _error(got, want) <= 1e-5, _error(got, want)
        end = 21 + n
        for mine, theirs in ((model.k_cache[:, :end], reference.k_cache[:, :end]),
                             (model.v_cache[:, :end], reference.v_cache[:, :end]),
                             (model.features[:end], reference.features[:end])):
            assert _error(mine, theirs) <= 1e-5
        reference.truncate(21)
        chain = reference.forward(tokens, 21)
        assert _error(got, chain) > 1e-2


# ---- greedy: the triton step's output is plain greedy output --------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "chain", "tree", "lookup", "features"])
def test_triton_fused_greedy_output_equals_plain_greedy(triton_device, kind):
    """float32, γ 3: plain decoding (chunks of 4), a draft model's chain, a tree of 3 candidates, a
    tree of 2 with a lookup branch of 4 (the draft: layers:1 of the target, on the triton kernels
    too; the trees' with Qwen2 layers, where alternatives and lookup tokens are kept, so their nodes'
    logits are used), a feature draft with 2 candidates (its own forward on torch's kernels, the
    target's features written at the tree's slots; run ahead, as on CUDA)."""
    tree = kind in ("tree", "lookup")
    target = _model(triton_device, seed=1 if tree else 0, bias=tree)
    layer = LeanModel(target.weights, max_seq_len=48, num_layers=1)  # the chain's and the trees' draft model
    drafter = {"plain": lambda: None, "chain": lambda: ModelDrafter(layer),
               "tree": lambda: ModelDrafter(layer, candidates=3),
               "lookup": lambda: LookupDrafter(ModelDrafter(layer, candidates=2), NgramDrafter(), 4),
               "features": lambda: FeatureDrafter(_distilled_draft(target), target, candidates=2)}[kind]()
    stepper = fused_stepper(target, drafter, compile=False, use_graphs=False, kernels="triton",
                            run_ahead=kind == "features")
    assert stepper.kernels == "triton"
    assert stepper.draft_kernels == ("triton" if kind in ("chain", "tree", "lookup") else "torch")
    expected = reference_generate(target, PROMPT, params=GREEDY, max_new_tokens=12)
    tokens, stats = _run(target, drafter, stepper, 0 if kind == "plain" else 3)
    assert tokens == expected
    assert not tree or stats.alternatives_kept > 0
    assert kind != "lookup" or stats.lookup_tokens > 0
    assert kind != "features" or stepper.ahead_launches > 0


def test_triton_fused_sampling_gives_the_torch_steps_tokens_seed_for_seed(triton_device):
    """Temperature 1 with top-p 0.9, a tree of 2 candidates per position (alternatives drawn with
    noise, residuals): the triton step and the torch fused step, each over a model of its own with
    the same weights and the same seeds, emit the same tokens (see the module docstring), alternatives
    kept among them."""
    params = SamplingParams(temperature=1.0, top_p=0.9)
    outputs, kept = [], 0
    for kernels in ("torch", "triton"):
        target = _model(triton_device, seed=1, bias=True)
        draft = LeanModel(target.weights, max_seq_len=48, num_layers=1)
        stepper = FusedStepper(target, draft, compile=False, use_graphs=False, candidates=2, kernels=kernels)
        runs = [_run(target, ModelDrafter(draft, candidates=2), stepper, 3, params, 10, seed) for seed in (0, 1)]
        outputs.append([tokens for tokens, _ in runs])
        kept += sum(stats.alternatives_kept for _, stats in runs)
    assert outputs[0] == outputs[1]
    assert outputs[0][0] != outputs[0][1] and kept > 0  # the seeds matter: sampled; alternatives were kept


# ---- what cannot run is refused --------------------------------------------------------------------------


def test_what_the_triton_step_cannot_run_is_refused_in_one_line(triton_device, monkeypatch):
    """Gemma 3's sliding windows, int8 weights, an unknown kernel set and (on the CPU) no interpreter:
    each a ValueError naming what is wrong (bit-exact mode runs: tests/test_exact_triton.py)."""
    target = _model(triton_device)
    assert FusedStepper(target, None, compile=False).kernels == "torch"  # the default
    with pytest.raises(ValueError, match="Llama and Qwen2 layers only"):
        FusedStepper(_model(triton_device, layers=3, arch="gemma3"), None, compile=False, kernels="triton")
    with pytest.raises(ValueError, match="frozen float weights"):
        FusedStepper(LeanModel(int8_weights(target.weights), max_seq_len=48), None, compile=False, kernels="triton")
    with pytest.raises(ValueError, match="'torch' or 'triton'"):
        FusedStepper(target, None, compile=False, kernels="cuda")
    if triton_device == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            FusedStepper(target, None, compile=False, kernels="triton")


def test_a_draft_model_the_kernels_cannot_run_falls_back_to_torch_with_a_warning(triton_device):
    """An int8 draft and a distilled draft (its truncated head) run on torch's kernels, said in a
    warning, the target on the triton kernels; a feature draft runs on torch's without a warning (its
    forward reads the target's features)."""
    target = _model(triton_device)
    for draft, why in ((LeanModel(int8_weights(target.weights), max_seq_len=48), "frozen float weights"),
                       (_distilled_draft(target, "tokens"), "truncated")):
        with pytest.warns(UserWarning, match=f"draft model runs on torch's kernels .*{why}"):
            stepper = FusedStepper(target, draft, compile=False, kernels="triton")
        assert (stepper.kernels, stepper.draft_kernels) == ("triton", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stepper = FusedStepper(target, _distilled_draft(target), compile=False, kernels="triton")
    assert (stepper.kernels, stepper.draft_kernels) == ("triton", "torch")


def test_the_api_and_the_cli_run_the_triton_step_and_refuse_what_cannot_be(triton_device, tmp_path, capsys):
    """speculant.load(kernels="triton") decodes plain and speculatively through the triton fused step
    (on the CPU too, interpreted) with plain greedy output; with fused=False or llama.cpp it is refused
    in one line, batched decoding likewise (generate_many runs one request at a time); the CLI's
    generate and chat take --kernels and say a refusal in one line (exit 2). With bit_exact:
    tests/test_exact_triton.py."""
    from test_loading import save_folder, tiny_hf_model

    from speculant import api
    from speculant.cli import build_parser, main

    sizes = {"vocab_size": 261, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
             "num_key_value_heads": 1, "num_hidden_layers": 1, "max_position_embeddings": 64}
    folder = str(save_folder(tiny_hf_model("llama", **sizes), tmp_path / "tiny"))
    spec = api.load(folder, draft="ngram", gamma=3, max_seq_len=64, device=triton_device, kernels="triton")
    assert spec.stepper.kernels == spec.plain_stepper.kernels == "triton"
    out = spec.generate("ab cd ab cd", max_new_tokens=6)
    torch_spec = api.Speculant(spec.target, ["ngram"], gamma=3)
    assert out.token_ids == spec.generate("ab cd ab cd", max_new_tokens=6, plain=True).token_ids
    assert out.token_ids == torch_spec.generate("ab cd ab cd", max_new_tokens=6).token_ids
    with pytest.raises(ValueError, match="batched decoding"):
        spec.batch_engine()
    assert spec.generate_many([{"prompt": "ab cd ab cd"}], max_new_tokens=6)[0].token_ids == out.token_ids
    with pytest.raises(ValueError, match="fused=False"):
        api.Speculant(spec.target, ["ngram"], kernels="triton", fused=False)
    with pytest.raises(ValueError, match="torch backend"):
        api.load(folder, backend="llama.cpp", kernels="triton")
    for command in ("generate", "chat"):
        args = [command] + (["x"] if command == "generate" else [])
        assert build_parser().parse_args(args).kernels == "torch"
        assert build_parser().parse_args(args + ["--kernels", "triton"]).kernels == "triton"
    code = main(["generate", "--target", folder, "--draft", "ngram", "--max-seq-len", "64", "--kernels", "triton",
                 "--backend", "llama.cpp", "ab"])
    assert code == 2 and "torch backend" in capsys.readouterr().err


# ---- on a GPU: captured in CUDA graphs -------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["plain", "chain", "tree", "features"])
def test_the_triton_fused_step_captured_in_cuda_graphs_gives_plain_greedy_output(kind):
    """float32 on CUDA, every step a graph replay (the prefill too); the tree's sampling functions
    compiled as the API compiles them. Two requests on one stepper: the graphs are reused."""
    target = _model("cuda", layers=3, seq=256, hidden_size=64, num_heads=4, num_kv_heads=2)
    draft = {"chain": lambda: LeanModel(target.weights, max_seq_len=256, num_layers=1),
             "tree": lambda: LeanModel(target.weights, max_seq_len=256, num_layers=2),
             "features": lambda: _distilled_draft(target)}.get(kind, lambda: None)()
    make = {"plain": lambda: None, "chain": lambda: ModelDrafter(draft),
            "tree": lambda: LookupDrafter(ModelDrafter(draft, candidates=4), NgramDrafter(), 8),
            "features": lambda: FeatureDrafter(draft, target, candidates=2)}[kind]
    stepper = fused_stepper(target, make(), use_graphs=True, compile=kind == "tree", kernels="triton")
    prompt = PROMPT * 5  # 45 tokens: a prefill graph of 64 rows, two pieces of 32
    expected = reference_generate(target, prompt, params=GREEDY, max_new_tokens=40)
    for _ in range(2):
        out = [t for step in generate(target, make(), prompt, gamma=0 if kind == "plain" else 4, params=GREEDY,
                                      max_new_tokens=40, stepper=stepper) for t in step.tokens]
        assert out == expected
    assert stepper.graphs and all(runner.graph is not None for runner in stepper.graphs.values())
