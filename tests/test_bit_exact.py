"""Bit-exact mode (speculant.models.exact_attention, FusedStepper(bit_exact=True)): a position's logits
are a function of its context only, bit for bit, whether it is computed alone, inside a chain or
inside a tree; so greedy speculative output is plain greedy output token for token in bfloat16; the
exact attention is still attention; padding rows touch no real cache slot; sampling keeps the
target's law. The Triton kernel runs on the CPU under TRITON_INTERPRET=1 where triton is installed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from speculant.acceptance import candidate_tree, tree_tokens
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.models import exact_attention as ea
from speculant.models.exact_attention import EXACT_WIDTH, exact_keys, exact_layout
from speculant.models.feature_draft import DraftConfig, build_draft, init_random
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
BF16 = torch.bfloat16
CONTEXT = [(5 * i + 3) % 64 for i in range(40)]  # longer than a key block (32): the walk spans two
# The tree's alternatives and the plain steps' keys sit in different blocks of 512 slots of torch's
# CPU SDPA kernel: the default path sums them in other groups
LONG_CONTEXT = [(5 * i + 3) % 64 for i in range(509)]


def _target(dtype=BF16, vocab=64, seed=0, arch="llama", seq=96, layers=3, device="cpu"):
    cfg = tiny_config(arch, vocab_size=vocab, num_layers=layers, max_position_embeddings=max(512, seq))
    return LeanModel(random_weights(cfg, seed=seed, scale=3.0, dtype=dtype).to(device), max_seq_len=seq)


def _three_ways(target, exact: bool, arch_gamma_k=(4, 4), context=CONTEXT):
    """Logits of the 17 nodes of a γ 4, K 4 tree after CONTEXT, computed (a) inside the tree, (b) the
    root and chain nodes inside a chain verify, (c) each node alone, its path fed one token at a time
    (the plain step's forward): (tree [17, V], chain [5, V], alone [17, V])."""
    gamma, k = arch_gamma_k
    stepper = FusedStepper(target, None, compile=False, bit_exact=exact)
    stepper.begin(context, GREEDY)  # prefills context[:-1]; its last token is the root, at position n
    start = torch.tensor(len(context) - 1, device=target.device)
    candidates = torch.randint(0, target.vocab_size, (gamma, k), generator=torch.Generator().manual_seed(1))
    nodes = tree_tokens(torch.tensor(context[-1:]), candidates).to(target.device)
    _, ancestors = candidate_tree(gamma, k)
    with torch.inference_mode():
        tree = stepper.score(nodes, start, (gamma, k, 0))
        chain = stepper.score(nodes[: gamma + 1], start)
        alone = []
        for node in range(nodes.shape[0]):
            for depth, token in enumerate(nodes[ancestors[node]]):  # root .. node, in depth order
                logits = stepper.score(token.view(1), start + depth)
            alone.append(logits[0])
    return tree, chain, torch.stack(alone)


@pytest.mark.parametrize("context", [CONTEXT, LONG_CONTEXT], ids=["40", "509"])
def test_in_bit_exact_mode_a_positions_logits_are_the_same_bits_alone_in_a_chain_and_in_a_tree(context):
    tree, chain, alone = _three_ways(_target(seq=1024), exact=True, context=context)
    assert tree.shape[0] == 17
    for node in range(17):
        assert torch.equal(tree[node], alone[node]), node
    for row in range(5):
        assert torch.equal(chain[row], alone[row]), row
    assert torch.isfinite(tree).all()


def _sdpa_target():
    target = _target(seq=1024)
    target.attention = "sdpa"  # torch's fused kernel (the CPU's default in float32)
    return target


def test_fused_sdpa_attention_is_not_bit_exact_in_bfloat16_on_the_cpu():
    """The control. On this CPU torch's bfloat16 kernels happen to give a row the same bits whatever
    the number of rows (the GEMMs, and SDPA after a 40-token context): the three ways agree there.
    But SDPA sums over cache SLOTS, and a tree's alternatives sit in other slots than the plain
    steps' keys: after 509 tokens they fall in another of SDPA's key blocks (512) and some node's
    logits change bits (rounding, not a bug: close in value). This is why the CPU runs bfloat16
    attention as matmuls (transformer.row_invariant_on_cpu); on a GPU the row count alone changes the
    kernels (issue 21)."""
    tree, chain, alone = _three_ways(_sdpa_target(), exact=False)
    assert torch.equal(tree, alone) and torch.equal(chain, alone[:5])
    tree, chain, alone = _three_ways(_sdpa_target(), exact=False, context=LONG_CONTEXT)
    assert torch.equal(chain, alone[:5])
    assert [node for node in range(17) if not torch.equal(tree[node], alone[node])]
    torch.testing.assert_close(tree, alone, atol=0.5, rtol=0.05)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_exact_forward_is_still_the_models_attention(arch):
    """In float32 the bit-exact tree forward gives each node the logits the standard forward gives
    its path (gemma3: sliding-window layers of 4 over a tree whose slots are not its positions)."""
    target = _target(torch.float32, arch=arch)
    tree, _, _ = _three_ways(target, exact=True)
    gamma, k = 4, 4
    candidates = torch.randint(0, target.vocab_size, (gamma, k), generator=torch.Generator().manual_seed(1))
    nodes = tree_tokens(torch.tensor(CONTEXT[-1:]), candidates)
    _, ancestors = candidate_tree(gamma, k)
    for node in range(nodes.shape[0]):
        fresh = LeanModel(target.weights, max_seq_len=96)
        expected = fresh.forward(torch.tensor(CONTEXT[:-1] + nodes[ancestors[node]].tolist()), 0)[-1]
        torch.testing.assert_close(tree[node], expected, atol=1e-4, rtol=1e-4)


def test_padding_rows_never_change_a_real_cache_slot_nor_give_nan():
    """A bit-exact chain of 3 at position 39: slots 39..41 are written, every other real slot (and
    feature) keeps its bits; the padding rows wrote only scratch slots S..S+W-1, and all W rows of
    logits are finite."""
    target = _target()
    target.keep_features()
    stepper = FusedStepper(target, None, compile=False, bit_exact=True)
    stepper.begin(CONTEXT, GREEDY)
    s = target.max_seq_len
    for cache in (target.k_cache, target.v_cache):
        cache[:, 42:s] = 7.0  # real slots past the call: must stay
    target.features[42:s] = 7.0
    before = [target.k_cache.clone(), target.v_cache.clone(), target.features.clone()]
    with torch.inference_mode():
        depths, nodes = exact_layout(torch.arange(3))
        keys = exact_keys(torch.tensor(39), depths, nodes, torch.tensor(3), s)
        tokens = torch.cat([torch.tensor([1, 2, 3]), torch.zeros(EXACT_WIDTH - 3, dtype=torch.int64)])
        logits = stepper.exact_fn(tokens, *keys[:5])
    assert logits.shape[0] == EXACT_WIDTH and torch.isfinite(logits).all()
    for after, old in zip((target.k_cache, target.v_cache), before):
        assert torch.equal(after[:, :39], old[:, :39]) and torch.equal(after[:, 42:s], old[:, 42:s])
        assert not torch.equal(after[:, 39:42], old[:, 39:42])
        assert not torch.equal(after[:, s + 3:], old[:, s + 3:])  # the padding wrote its scratch slots
    assert torch.equal(target.features[:39], before[2][:39]) and torch.equal(target.features[42:s], before[2][42:s])


# ================================================================ greedy: speculative == plain, bfloat16

def _feature_pair_bf16(vocab=64, seed=5):
    weights = random_weights(tiny_config(vocab_size=vocab, num_layers=2), seed=seed, scale=2.0, dtype=BF16)
    target = LeanModel(weights, max_seq_len=96)
    cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=vocab, inputs="features")
    draft = build_draft(cfg, target.weights, torch.arange(vocab), max_seq_len=96)
    init_random(draft.draft_weights, seed + 1, scale=1.0)
    return target, draft


def _greedy(target, drafter, stepper, prompt, gamma, max_new=30):
    return [t for s in generate(target, drafter, prompt, gamma=gamma, params=GREEDY, max_new_tokens=max_new,
                                stepper=stepper) for t in s.tokens]


PROMPTS = [[7], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [(11 * i + 5) % 64 for i in range(37)]]


@pytest.mark.parametrize("kind", ["model", "features", "ngram", "tree", "lookup"])
def test_bit_exact_greedy_speculative_output_is_plain_greedy_output_in_bfloat16(kind):
    """The tiny models' logits have near-ties at bfloat16's resolution; in bit-exact mode every
    drafter's greedy output equals bit-exact plain decoding (chunks of 4 and single steps) token for
    token, over several prompts (one longer than a key block)."""
    if kind == "features":
        target, draft = _feature_pair_bf16()
        make = lambda: FeatureDrafter(draft, target, candidates=1)
    else:
        target = _target(layers=2, seed=5)
        draft = _target(layers=1, seed=6)
        make = {"model": lambda: ModelDrafter(draft), "ngram": NgramDrafter,
                "tree": lambda: ModelDrafter(draft, candidates=4),
                "lookup": lambda: LookupDrafter(ModelDrafter(draft, candidates=4), NgramDrafter(), 6)}[kind]
    from speculant.fused import fused_stepper

    plain = FusedStepper(target, None, compile=False, bit_exact=True)
    single = FusedStepper(target, None, compile=False, bit_exact=True, plain_chunk=1)
    for prompt in PROMPTS:
        expected = _greedy(target, None, plain, prompt, 0)
        assert _greedy(target, None, single, prompt, 0) == expected
        # the feature draft runs ahead, as it does on CUDA (the next replay launched before this one is read)
        stepper = fused_stepper(target, make(), compile=False, bit_exact=True, run_ahead=kind == "features")
        assert stepper.bit_exact and (kind != "lookup" or stepper.lookup == 6)
        assert _greedy(target, make(), stepper, prompt, 4) == expected
    assert kind != "features" or stepper.ahead_launches > 0


def test_a_tree_wider_than_the_fixed_width_is_refused_with_a_clear_message():
    target, draft = _target(layers=2), _target(layers=1, seed=6)
    stepper = FusedStepper(target, draft, compile=False, bit_exact=True, candidates=4, lookup=8)
    with pytest.raises(ValueError, match="at most 32 tokens per target forward"):
        _greedy(target, ModelDrafter(draft, candidates=4), stepper, [1, 2, 3], 6)


def two_token_law(model: LeanModel, prompt: list[int]) -> np.ndarray:
    """The exact law of the first two tokens sampled (temperature 1) after `prompt` from the model's
    standard forward, in float64: [V * V], the pair (a, b) at a * V + b."""
    vocab = model.vocab_size
    law = torch.zeros(vocab, vocab, dtype=torch.float64)
    fresh = LeanModel(model.weights, max_seq_len=model.max_seq_len)
    first = torch.softmax(fresh.forward(torch.tensor(prompt), 0)[-1].double(), -1)
    for token in range(vocab):
        fresh.truncate(0)
        law[token] = first[token] * torch.softmax(fresh.forward(torch.tensor(prompt + [token]), 0)[-1].double(), -1)
    return law.flatten().numpy()


def two_token_samples(target: LeanModel, prompt: list[int], n: int, make: Callable[[], tuple]) -> list[int]:
    """The first two tokens of n requests after `prompt` (temperature 1, γ 2, one seeded generator),
    each as a * V + b (the cells of two_token_law); make() gives each request its (drafter, stepper)."""
    generator = torch.Generator().manual_seed(0)
    codes = []
    for _ in range(n):
        drafter, stepper = make()
        tokens = [t for s in generate(target, drafter, prompt, gamma=2, params=SamplingParams(), max_new_tokens=2,
                                      generator=generator, stepper=stepper) for t in s.tokens]
        codes.append(tokens[0] * target.vocab_size + tokens[1])
    return codes


def test_bit_exact_sampling_follows_the_target_law_over_two_tokens(gof):
    """Chi-square of 1500 two-token outputs (vocab 8, temperature 1, γ 2, K 2 tree) in bit-exact mode
    against the exact law of the target's standard forward (float32: the two agree to rounding)."""
    target = _target(torch.float32, vocab=8, seed=3, seq=16)
    draft = _target(torch.float32, vocab=8, seed=3, seq=16, layers=1)
    prompt, n = [1, 2, 3], 1500
    stepper = FusedStepper(target, draft, compile=False, bit_exact=True, candidates=2)
    codes = two_token_samples(target, prompt, n, lambda: (ModelDrafter(draft, candidates=2), stepper))
    assert gof.chi_square(codes, two_token_law(target, prompt)).pvalue > gof.SIGNIFICANCE


# ================================================================ the attention itself

def _attention_case(window=0, seed=0, dtype=BF16, device="cpu"):
    """A tree (γ 4, K 4) at position 40 over a random cache: (q, keys, values, ExactKeys, scale)."""
    generator = torch.Generator().manual_seed(seed)
    s, kv, g, d = 80, 2, 3, 8
    keys = torch.randn(s + EXACT_WIDTH, kv, d, generator=generator).to(dtype)
    values = torch.randn(s + EXACT_WIDTH, kv, d, generator=generator).to(dtype)
    q = torch.randn(EXACT_WIDTH, kv, g, d, generator=generator).to(dtype)
    depths, ancestors = candidate_tree(4, 4)
    where = exact_keys(torch.tensor(40), *exact_layout(depths, ancestors), torch.tensor(17), s)
    where = type(where)(*(x.to(device) for x in where[:5]), window=window)
    return q.to(device), keys.to(device), values.to(device), where, 0.35


def _naive(q, keys, values, where, scale):
    """softmax attention of each real row over its keys (slot = position before start, the table's
    after), float64, one row at a time."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    start = int(where.start)
    for r in range(int(where.count)):
        p = int(where.positions[r])
        js = [j for j in range(p + 1) if not where.window or j > p - where.window]
        slots = [j if j < start else int(where.table[r, j - start]) for j in js]
        k, v = keys[slots].double(), values[slots].double()  # [n, KV, D]
        scores = torch.einsum("kgd,nkd->kgn", q[r].double(), k) * scale
        out[r] = torch.einsum("kgn,nkd->kgd", scores.softmax(-1), v)
    return out


def _run(implementation, q, keys, values, where, scale):
    out = implementation(q, keys, values, where.positions, where.start, where.table, where.count, scale, where.window)
    return out.cpu()


@pytest.mark.parametrize("window", [0, 5])
def test_exact_attention_in_torch_is_softmax_attention_over_each_rows_keys(window):
    q, keys, values, where, scale = _attention_case(window, dtype=torch.float32)
    out = _run(ea.exact_attention_torch, q, keys, values, where, scale)
    torch.testing.assert_close(out.double(), _naive(q, keys, values, where, scale), atol=1e-5, rtol=1e-5)
    assert out[17:].eq(0).all()  # padding rows: zeros


def _row_invariance(implementation, device="cpu"):
    """Row 0's query at its position (the root of the tree, position 40) and row 6 (a depth-2 node)
    computed inside the 17-node tree, alone in a call of one row, and moved to another row of the
    call: the same bits."""
    q, keys, values, where, scale = _attention_case(device=device)
    tree = _run(implementation, q, keys, values, where, scale)
    for row in (0, 6):
        depth = int(where.positions[row] - where.start)
        path = where.table[row, : depth + 1]  # its ancestors' slots
        alone_q = torch.zeros_like(q)
        alone_q[depth] = q[row]
        depths, nodes = exact_layout(torch.arange(depth + 1))
        chain = exact_keys(where.start, depths.to(device), nodes.to(device), torch.tensor(depth + 1, device=device), 80)
        moved_keys, moved_values = keys.clone(), values.clone()
        moved_keys[chain.slots[: depth + 1]] = keys[path]  # the path's keys at the chain's slots
        moved_values[chain.slots[: depth + 1]] = values[path]
        alone = _run(implementation, alone_q, moved_keys, moved_values, chain, scale)
        assert torch.equal(alone[depth], tree[row]), row


def test_exact_attention_in_torch_gives_a_row_the_same_bits_wherever_it_sits():
    _row_invariance(ea.exact_attention_torch)


@pytest.mark.parametrize("window", [0, 5])
def test_the_triton_kernel_computes_the_torch_math(window, triton_device):
    q, keys, values, where, scale = _attention_case(window, device=triton_device)
    kernel = _run(ea.exact_attention_triton, q, keys, values, where, scale)
    reference = _run(ea.exact_attention_torch, q, keys, values, where, scale)
    q, keys, values = q.cpu(), keys.cpu(), values.cpu()
    where = type(where)(*(x.cpu() for x in where[:5]), window=window)
    torch.testing.assert_close(kernel.float(), reference.float(), atol=2e-2, rtol=2e-2)  # bfloat16 outputs
    torch.testing.assert_close(kernel.double(), _naive(q, keys, values, where, scale), atol=2e-2, rtol=2e-2)
    assert kernel[17:].eq(0).all()


def test_the_triton_kernel_gives_a_row_the_same_bits_wherever_it_sits(triton_device):
    _row_invariance(ea.exact_attention_triton, triton_device)


def test_a_model_running_the_triton_kernel_keeps_the_bits_of_a_position_alone_and_in_a_tree(
        triton_device, monkeypatch):
    monkeypatch.setattr(ea, "TRITON", True)
    tree, chain, alone = _three_ways(_target(layers=1, device=triton_device), exact=True, arch_gamma_k=(2, 2))
    assert all(torch.equal(tree[i], alone[i]) for i in range(tree.shape[0]))
    assert all(torch.equal(chain[i], alone[i]) for i in range(chain.shape[0]))


# ================================================================ the API and the command line

def test_the_api_and_the_cli_run_bit_exact_decoding_and_refuse_what_cannot_be(tmp_path):
    """speculant.load(bit_exact=True): plain and speculative decoding both run the bit-exact fused
    step (on the CPU too) and agree in bfloat16; a tree wider than 32 is refused in one line; the CLI's
    generate and chat take --bit-exact (hierarchies and logprobs: tests/test_bit_exact_generic.py)."""
    from test_loading import save_folder, tiny_hf_model

    from speculant import api
    from speculant.cli import build_parser

    folder = str(save_folder(tiny_hf_model("llama", vocab_size=261, max_position_embeddings=128), tmp_path / "tiny"))
    spec = api.load(folder, draft="ngram", gamma=4, dtype="bfloat16", max_seq_len=128, bit_exact=True)
    assert spec.stepper.bit_exact and spec.plain_stepper.bit_exact
    out = spec.generate("ab cd ab cd ab", max_new_tokens=24)
    assert out.token_ids == spec.generate("ab cd ab cd ab", max_new_tokens=24, plain=True).token_ids
    with pytest.raises(ValueError, match="at most 32 tokens"):
        api.load(folder, draft=folder, gamma=8, candidates=4, dtype="bfloat16", max_seq_len=128, bit_exact=True)
    for command in ("generate", "chat"):
        assert build_parser().parse_args([command, "--bit-exact"] + (["x"] if command == "generate" else [])).bit_exact
