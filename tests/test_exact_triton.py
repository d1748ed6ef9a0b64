"""Bit-exact mode on speculant's Triton kernels (FusedStepper(bit_exact=True, kernels="triton"): every
target forward is TritonForward.forward_exact, over speculant.models.triton_layers' row-invariant
GEMM kernels and exact_cache_attention). A position's logits are the same bits alone (a plain step),
inside a chain and inside a 17-node γ 4, K 4 tree, and its K/V the same whether prefilled or decoded;
so greedy speculative output is plain greedy output token for token in bfloat16, for a chain, a tree
of candidates, a lookup branch, a feature draft, n-gram lookup and (the generic step over
ExactTarget) a hierarchy; the API and the CLI take the combination.

What these CPU tests prove, and what they cannot. Without a GPU the kernels run under
TRITON_INTERPRET=1: triton's interpreter runs each program in numpy, tl.dot as numpy's matmul
(OpenBLAS), which is not row-invariant by itself: it rounds a product by the matrix's row count
(the GEMM control below: a row tile that follows T, as the kernels had before, changes a row's bits
here). So the tests prove, under that arithmetic: that every row walks its own keys in position order
in chunks of positions (a tree node whose keys sit in other slots, and in another chunk of slots,
gets its plain step's bits, where the default triton path's attention does not: the control); that
the tiles and the wiring make a row's bits independent of the call's rows, in every kernel and in
the whole forward (bfloat16 and float32, Llama and Qwen2 layers, contexts past a chunk of keys); and
that every kernel launch of the exact forward has ONE specialisation by triton's own rules, whatever
the call's rows (chains of 1, 5 and 40 rows, trees of 17 and 25 nodes) — on a GPU, one compiled binary
per kernel. What they cannot prove: that the GPU's compiled code computes a row from that row alone
(the MMA instructions do; the interpreter never compiles), nor the CUDA graphs and the compiled
sampling tail around the forwards. The CUDA tests at the end (skipped here) check those on the GPU:

    python -m pytest tests/test_exact_triton.py tests/test_triton_fused.py tests/test_bit_exact.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from speculant.acceptance import candidate_tree, tree_tokens
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import generate
from speculant.exact_target import ExactRows, ExactTarget
from speculant.fused import FusedStepper, fused_stepper
from speculant.models import triton_layers as tl_layers
from speculant.models.exact_attention import exact_layout
from speculant.models.feature_draft import DraftConfig, build_draft, init_random
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.models.triton_forward import TritonForward
from speculant.sampling import SamplingParams
from speculant.step import GenericStepper

GREEDY = SamplingParams(temperature=0)
BF16 = torch.bfloat16
VOCAB = 64
SMALL = {"num_heads": 2, "num_kv_heads": 1, "hidden_size": 16, "intermediate_size": 32}  # few programs per kernel
# 60 tokens: the tree's root at position 59, its 17 nodes in slots 59..75: past the first chunk of 64
# keys, while their positions (59..63) are not, and the context spans a chunk
CONTEXT = [(5 * i + 3) % VOCAB for i in range(60)]
PROMPTS = [[7], [(11 * i + 5) % VOCAB for i in range(70)]]  # one longer than a chunk of keys


def _target(device, dtype=BF16, arch="llama", layers=2, seed=0, seq=128, **sizes) -> LeanModel:
    """A tiny lean model; arch "qwen2": Llama layers with Qwen2's q|k|v bias."""
    cfg = tiny_config(vocab_size=VOCAB, num_layers=layers, attention_bias=arch == "qwen2", **{**SMALL, **sizes})
    return LeanModel(random_weights(cfg, seed=seed, scale=3.0, dtype=dtype).to(device), max_seq_len=seq)


def _three_ways(stepper: FusedStepper, context=CONTEXT, gamma=4, k=4):
    """Logits of the 17 nodes of a γ 4, K 4 tree after `context` (its last token the root), computed
    (a) in one tree forward, (b) the root and chain nodes in one chain forward, (c) each node alone in a
    plain step (one row at its position, its path's tokens before it in the cache): for every depth d
    the nodes at d fed one at a time at position start + d, the chain's last, whose K/V the next depth
    reads (candidate_tree's alternatives hang off the chain). -> (tree [17, V], chain [5, V], alone [17, V])"""
    stepper.begin(context, GREEDY)
    device = stepper.target.device
    start = torch.tensor(len(context) - 1, device=device)
    candidates = torch.randint(0, VOCAB, (gamma, k), generator=torch.Generator().manual_seed(1))
    nodes = tree_tokens(torch.tensor(context[-1:]), candidates).to(device)
    depths, _ = candidate_tree(gamma, k)
    with torch.inference_mode():
        tree = stepper.score(nodes, start, (gamma, k, 0))
        chain = stepper.score(nodes[: gamma + 1], start)
        alone = torch.zeros_like(tree)
        for depth in range(gamma + 1):
            for node in [i for i in range(nodes.shape[0]) if depths[i] == depth and i != depth] + [depth]:
                alone[node] = stepper.score(nodes[node].view(1), start + depth)[0]
    return tree, chain, alone


def _differing(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return [row for row in range(a.shape[0]) if not torch.equal(a[row], b[row])]


# ---- the kernels ---------------------------------------------------------------------------------------

K, N = 576, 64  # SmolLM2-135M's hidden size; numpy multiplies tiles [rows, 512] by [512, 64] (block_k, block_n)


def _gemms(device, dtype, rows=32):
    """Each GEMM kernel as a function of x's rows first.. (x [T, K], block_k 512 under the interpreter: fewer
    steps; 64 on a GPU, whose shared memory does not hold 512-deep tiles of 32 rows) -> [T, ...]: the rows it
    computes (norm_qkv_rope_cache: q and the k, v it wrote, rotary at position 10 + row), and x [rows, K]."""
    generator = torch.Generator().manual_seed(0)
    deep = 64 if torch.device(device).type == "cuda" else 512

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    heads, kv, d = 3, 1, 64
    norm, w, bias = randn(K, scale=0.1) + 1, randn(N, K, scale=K ** -0.5), randn(N)
    residual, gate_up = randn(rows, N), randn(2 * N, K, scale=K ** -0.5)
    w_qkv, b_qkv = randn((heads + 2 * kv) * d, K, scale=K ** -0.5), randn((heads + 2 * kv) * d)
    cos, sin = randn(10 + rows, d), randn(10 + rows, d)
    caches = torch.zeros(2, 10 + rows, kv, d, dtype=dtype, device=device)

    def qkv(x, first, columns=None, split_k=None):
        t = x.shape[0]
        positions = torch.arange(10 + first, 10 + first + t, device=device)
        q = tl_layers.norm_qkv_rope_cache(x, norm, 1e-6, w_qkv, b_qkv, cos, sin, positions, caches[0], caches[1],
                                          positions, heads, kv, d, block_k=deep if split_k is None else 64,
                                          columns=columns, split_k=split_k)
        return torch.cat([q.view(t, -1), caches[0, positions].view(t, -1), caches[1, positions].view(t, -1)], 1)

    return {"norm_matmul": lambda x, first: tl_layers.norm_matmul(x, norm, 1e-6, w, bias, block_k=deep,
                                                                            block_n=64),
            "matmul_residual": lambda x, first: tl_layers.matmul_residual(x, w, residual[first: first + x.shape[0]],
                                                                          block_k=deep, block_n=64),
            "norm_gate_up_silu": lambda x, first: tl_layers.norm_gate_up_silu(x, norm, 1e-6, gate_up, block_k=deep,
                                                                                  block_n=64),
            "norm_matmul, K in 2 ranges": lambda x, first: tl_layers.norm_matmul(x, norm, 1e-6, w, bias, block_k=64,
                                                                                  block_n=16, split_k=2),
            "matmul_residual, K in 4 ranges": lambda x, first: tl_layers.matmul_residual(
                x, w, residual[first: first + x.shape[0]], block_k=64, block_n=16, split_k=4),
            "norm_qkv_rope_cache": qkv,
            "norm_qkv_rope_cache, halves in blocks of 16": lambda x, first: qkv(x, first, columns=16),
            "norm_qkv_rope_cache, K in 2 ranges": lambda x, first: qkv(x, first, columns=16, split_k=2),
            # whole halves with K in ranges: what ROPE_SPLIT "auto" runs on a GPU
            "norm_qkv_rope_cache, whole halves, K in 2 ranges": lambda x, first: qkv(x, first, split_k=2)}, randn(rows, K)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_a_gemm_kernels_rows_do_not_depend_on_how_many_rows_the_call_has(triton_device, dtype):
    """Each GEMM kernel (norm_matmul with a bias, matmul_residual, norm_gate_up_silu, norm_qkv_rope_cache
    with its cache writes) over 17 rows, and over slices of them (1 row, rows 3..4, 5 rows, the last 5):
    every row the same bits in each call."""
    gemms, x = _gemms(triton_device, dtype, rows=17)
    for name, gemm in gemms.items():
        whole = gemm(x, 0)
        for lo, hi in ((0, 1), (3, 4), (0, 5), (12, 17)):
            assert torch.equal(gemm(x[lo:hi], lo), whole[lo:hi]), (name, lo, hi)


def test_the_control_a_row_tile_that_follows_t_changes_a_rows_bits_under_the_interpreter(triton_device, monkeypatch):
    """The row tile as it was (16 rows up to T = 16, 32 above): a row alone in a 16-row tile and in the
    17-row call's 32-row tile get other bits under the interpreter (numpy's matmul rounds a product by
    its row count), so a fixed tile is what the test above rests on here. (On a GPU another tile can
    mean another MMA layout; the fixed tile removes the question.)"""
    if triton_device == "cuda":
        pytest.skip("the interpreter's numpy arithmetic: a CPU control")
    monkeypatch.setattr(tl_layers, "GEMV", False)  # the tl.dot kernels (a GEMV's row never sees the tile)
    gemms, x = _gemms(triton_device, torch.float32, rows=17)
    whole = gemms["norm_matmul"](x, 0)
    monkeypatch.setattr(tl_layers, "ROW_TILE", tl_layers.MIN_DOT)  # a call of at most 16 rows, as before
    assert _differing(gemms["norm_matmul"](x[:5], 0), whole[:5])


def _attention_case(device, dtype, seed=0):
    """A γ 4, K 4 tree rooted at position 60 over a random cache (chunks of 32 positions: 3 reach 64):
    q [17, H, D], keys, values [S', KV, D], positions [17], nodes [17, W] (exact_layout's)."""
    generator = torch.Generator().manual_seed(seed)
    kv, g, d, start = 2, 3, 16, 60
    keys, values = (torch.randn(192, kv, d, generator=generator).to(dtype).to(device) for _ in range(2))
    q = torch.randn(17, kv * g, d, generator=generator).to(dtype).to(device)
    depths, ancestors = candidate_tree(4, 4)
    _, nodes = exact_layout(depths, ancestors)
    return q, keys, values, (start + depths).to(device), nodes[:17].to(device), ancestors


def _exact(q, keys, values, positions, nodes, kv_len=96):
    return tl_layers.exact_cache_attention(q, keys, values, kv_len, positions, nodes, 0.3, chunk=32, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_exact_cache_attention_walks_each_rows_own_keys_in_position_order(triton_device, dtype):
    """Each tree node's attention is softmax attention over its own keys (the cache before the root and
    its ancestors' slots) against a float64 reference, and the same bits (a) alone, in a call of one
    row with its path's keys at their positions (a chain), (b) as the last row of its path's chain call,
    (c) with more chunks launched (kv_len). The control: the default cache_attention gives some node
    other bits than its chain does (a tree node's keys grouped by the slots they sit in)."""
    q, keys, values, positions, nodes, ancestors = _attention_case(triton_device, dtype)
    start = int(positions[0])
    tree = _exact(q, keys, values, positions, nodes)
    assert torch.equal(_exact(q, keys, values, positions, nodes, kv_len=192), tree)
    chain_nodes = torch.arange(32, device=triton_device).repeat(32, 1)
    default_tree = tl_layers.cache_attention(q, keys, values, 96, positions, 0.3, chunk=32, block_n=16,
                                             ancestors=ancestors.to(triton_device), tree_start=positions[:1].clone())
    default_differs = 0
    for row in range(17):
        position = int(positions[row])
        slots = [j if j < start else start + int(nodes[row, j - start]) for j in range(position + 1)]
        k, v = keys[slots].double(), values[slots].double()  # [n, KV, D]
        for h in range(q.shape[1]):
            reference = torch.softmax(k[:, h // 3] @ q[row, h].double() * 0.3, 0) @ v[:, h // 3]
            torch.testing.assert_close(tree[row, h].double(), reference, atol=1e-2 if dtype == BF16 else 1e-5, rtol=0)
        depth = position - start
        moved_keys, moved_values = keys.clone(), values.clone()  # the path's keys at their positions
        moved_keys[start: position + 1], moved_values[start: position + 1] = keys[slots[start:]], values[slots[start:]]
        path = q[ancestors[row].nonzero().view(-1).to(triton_device)]  # root .. the node: [depth + 1, H, D]
        chain = _exact(path, moved_keys, moved_values, torch.arange(start, position + 1, device=triton_device),
                       chain_nodes[: depth + 1])
        alone = _exact(q[row: row + 1], moved_keys, moved_values, positions[row: row + 1], chain_nodes[:1])
        assert torch.equal(chain[-1], tree[row]) and torch.equal(alone[0], tree[row]), row
        default_chain = tl_layers.cache_attention(path, moved_keys, moved_values, 96,
                                                  torch.arange(start, position + 1, device=triton_device), 0.3,
                                                  chunk=32, block_n=16)
        default_differs += not torch.equal(default_chain[-1], default_tree[row])
    assert default_differs > 0


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_attention_with_its_chunks_merged_by_their_last_program_gives_the_combine_kernels_bits(triton_device, dtype,
                                                                                              monkeypatch):
    """FUSE_COMBINE: the chunk kernels' last program of a head (bit-exact mode: of a row and head) merges
    the chunks with the combine's operations in its order, one launch less: the same bits as the two
    kernels for a chain across chunks, a tree and bit-exact mode's rows, whatever the chunks launched."""
    q, keys, values, positions, nodes, ancestors = _attention_case(triton_device, dtype)
    chain = torch.arange(60, 65, device=triton_device)  # keys 0..64: three chunks of 32
    runs = {}
    for fuse in (False, True):
        monkeypatch.setattr(tl_layers, "FUSE_COMBINE", fuse)
        runs[fuse] = [_exact(q, keys, values, positions, nodes), _exact(q, keys, values, positions, nodes, kv_len=192),
                      tl_layers.cache_attention(q, keys, values, 96, positions, 0.3, chunk=32, block_n=16,
                                                ancestors=ancestors.to(triton_device), tree_start=positions[:1].clone()),
                      tl_layers.cache_attention(q[:5], keys, values, 192, chain, 0.3, chunk=32, block_n=16)]
    for unfused, fused in zip(runs[False], runs[True]):
        assert torch.equal(unfused, fused)


# ---- one compiled binary per kernel, whatever the call's rows --------------------------------------------


def test_every_launch_of_the_exact_forward_has_one_specialisation_whatever_the_calls_rows(triton_device, monkeypatch):
    """Every kernel launch of forward_exact, over chains of 1, 5 and 40 rows (pieces of 32 and 8) and
    trees of 17 and 25 nodes, keyed as triton keys its compiled binaries (each argument's
    specialisation by triton's own native_specialize_impl, minus do_not_specialize, and the constexprs
    and launch options): one key per launch site (the i-th launch of a piece of rows: a layer's
    kernel, the head). So on a GPU every call runs the same binaries, whatever its rows. The control:
    without do_not_specialize triton would compile T = 1 apart."""
    pytest.importorskip("triton")
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    target = _target(triton_device, layers=2)
    per_piece = 6 * 2 + 1  # launches per piece of rows: 6 per layer, and the head
    launches: list[str] = []
    keys: dict[tuple[int, str], set] = {}

    class Keyed:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel
            loose = getattr(kernel, "do_not_specialize", None)  # a JITFunction's; the interpreter keeps it in kwargs
            self.loose = set((kernel.kwargs.get("do_not_specialize") if loose is None else loose) or ())

        def __getitem__(self, grid):
            def launch(*args, **options):
                spec = tuple(native_specialize_impl(BaseBackend, arg, False, name not in self.loose, True)
                             for name, arg in zip(self.kernel.arg_names, args))
                keys.setdefault((len(launches) % per_piece, self.name), set()).add((spec, tuple(sorted(options.items()))))
                launches.append(self.name)
                return self.kernel[grid](*args, **options)
            return launch

    kernels = tl_layers._kernels()
    for name, kernel in list(kernels.items()):
        monkeypatch.setitem(kernels, name, Keyed(name, kernel))
    forward = TritonForward(target)
    with torch.inference_mode():
        for t in (40, 1, 5):  # chains from position 0 (the 40 first: its keys are there for the rest)
            forward.forward_exact(torch.arange(t, device=triton_device) % VOCAB, torch.arange(t, device=triton_device))
        for gamma, k, lookup in ((4, 4, 0), (4, 4, 8)):
            depths, ancestors = candidate_tree(gamma, k, lookup)
            _, nodes = exact_layout(depths, ancestors)
            n = depths.shape[0]
            forward.forward_exact(torch.arange(n, device=triton_device) % VOCAB, (20 + depths).to(triton_device),
                                  nodes[:n].to(triton_device))
    assert len(launches) == per_piece * 6 and len(keys) == per_piece  # 6 pieces, each the same launch sequence
    assert {name for _, name in keys} == {"norm_matmul", "gate_up", "qkv_rope", "exact_attention", "combine"}
    assert all(len(found) == 1 for found in keys.values()), {site: len(found) for site, found in keys.items()}
    assert native_specialize_impl(BaseBackend, 1, False, True, True) == ("constexpr", 1)  # what T = 1 would be
    assert native_specialize_impl(BaseBackend, 1, False, False, True) == native_specialize_impl(BaseBackend, 5, False,
                                                                                                False, True)


# ---- the model: a position's logits alone, in a chain, in a tree ---------------------------------------


@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_in_exact_triton_mode_a_positions_logits_are_the_same_bits_alone_in_a_chain_and_in_a_tree(
        triton_device, arch, dtype):
    """After 60 tokens (the tree's slots cross the first chunk of 64 keys, its positions do not), the
    17 nodes of a γ 4, K 4 tree scored in one forward, the chain's 5 in one chain forward and each node
    alone in a plain step: bit-equal, in bfloat16 and float32, Llama and Qwen2 layers."""
    stepper = FusedStepper(_target(triton_device, dtype, arch), None, compile=False, bit_exact=True, kernels="triton")
    tree, chain, alone = _three_ways(stepper)
    assert tree.shape[0] == 17 and torch.isfinite(tree).all()
    assert _differing(tree, alone) == [] and _differing(chain, alone[:5]) == []


def test_with_split_k_gemms_a_positions_logits_are_the_same_bits_alone_in_a_chain_and_in_a_tree(triton_device,
                                                                                               monkeypatch):
    """As above (Qwen2 layers, bfloat16) with o_proj and down_proj cut in ranges of K as on a GPU whose
    SMs their column blocks do not fill (triton_layers._split_k, here forced on the tiny model), and the
    other opt-in kernel variants on: q/k/v + rotary in column blocks and ranges of K, gate/up in ranges
    of K, attention's chunks merged by their last program (FUSE_COMBINE)."""
    monkeypatch.setitem(tl_layers._SMS, torch.device(triton_device, 0) if triton_device == "cuda" else
                        torch.device("cpu"), 132)
    monkeypatch.setattr(tl_layers, "MIN_SPLIT_K", 16)
    for name, value in {"ROPE_COLUMNS": 16, "ROPE_SPLIT": 2, "GATE_UP_SPLIT": 2, "FUSE_COMBINE": True}.items():
        monkeypatch.setattr(tl_layers, name, value)
    target = _target(triton_device, BF16, "qwen2")
    cfg = target.cfg
    assert tl_layers._split_k(cfg.hidden_size, cfg.intermediate_size, 16, target.device) > 1
    stepper = FusedStepper(target, None, compile=False, bit_exact=True, kernels="triton")
    tree, chain, alone = _three_ways(stepper)
    assert _differing(tree, alone) == [] and _differing(chain, alone[:5]) == []


@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16", "f32"])
def test_the_control_the_default_paths_give_a_tree_node_other_bits_than_its_plain_step(triton_device, dtype):
    """The same three ways off bit-exact mode. The default triton path: a row alone runs its GEMMs as GEMVs
    (triton_layers.use_gemv), other sums than a chain's and a tree's tiles, so both differ from it. With the
    tiles for one row too (GEMV off) its GEMMs are row-invariant and a chain's keys sit at their positions, so
    the chain agrees; but its attention groups a tree node's keys by the slots they sit in (here in another
    chunk), and some node's bits change. torch's default path: in float32 (SDPA) every node's bits change; in
    bfloat16 on this CPU they happen not to (matmul attention, and torch's CPU GEMM of this model gives a row its
    bits in any call: see transformer.row_invariant_on_cpu; on a GPU they do change: issue 21)."""
    tree, chain, alone = _three_ways(FusedStepper(_target(triton_device, dtype), None, compile=False, kernels="triton"))
    assert _differing(tree, alone) and _differing(chain, alone[:5])
    torch.testing.assert_close(tree, alone, atol=0.5, rtol=0.05)  # rounding, not a bug
    torch.testing.assert_close(chain, alone[:5], atol=0.5, rtol=0.05)
    with tl_layers.settings({"GEMV": False}):
        tree, chain, alone = _three_ways(FusedStepper(_target(triton_device, dtype), None, compile=False,
                                                      kernels="triton"))
    assert _differing(tree, alone) and (triton_device == "cuda" or _differing(chain, alone[:5]) == [])
    if triton_device == "cpu":  # on the GPU: the CUDA test below
        tree, chain, alone = _three_ways(FusedStepper(_target(triton_device, dtype), None, compile=False))
        assert bool(_differing(tree, alone)) == (dtype == torch.float32)


def test_the_exact_prefill_writes_the_bits_plain_steps_write(triton_device):
    """59 tokens prefilled in one call (pieces of 32 and 27 rows) and the same tokens as a 20-token
    prefill then 39 plain steps: the same K/V bits at every position, and the same next logits (Qwen2
    layers, bfloat16): a position's K/V does not depend on whether the prompt held it."""
    caches, logits = [], []
    for prefilled in (59, 20):
        target = _target(triton_device, arch="qwen2")
        stepper = FusedStepper(target, None, compile=False, bit_exact=True, kernels="triton")
        stepper.begin(CONTEXT[: prefilled + 1], GREEDY)
        with torch.inference_mode():
            for position in range(prefilled, 60):
                row = stepper.score(torch.tensor(CONTEXT[position: position + 1], device=triton_device),
                                    torch.tensor(position, device=triton_device))
        caches.append((target.k_cache[:, :60].clone(), target.v_cache[:, :60].clone()))
        logits.append(row)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert torch.equal(logits[0], logits[1])


# ---- greedy: speculative == plain, bfloat16 -------------------------------------------------------------


def _feature_draft(target: LeanModel, seed: int = 5):
    cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=VOCAB, inputs="features")
    draft = build_draft(cfg, target.weights, torch.arange(VOCAB), max_seq_len=target.max_seq_len)
    init_random(draft.draft_weights, seed, scale=1.0)
    return draft


def _greedy(target, drafter, stepper, prompt, gamma, max_new=12):
    return [t for s in generate(target, drafter, prompt, gamma=gamma, params=GREEDY, max_new_tokens=max_new,
                                stepper=stepper) for t in s.tokens]


@pytest.fixture(scope="module")
def bf16_target(triton_device):
    """A bfloat16 target (Qwen2 layers) and its bit-exact plain greedy tokens on the triton kernels
    (chunks of 4) after each of PROMPTS."""
    target = _target(triton_device, arch="qwen2", seed=5)
    plain = FusedStepper(target, None, compile=False, bit_exact=True, kernels="triton")
    return target, [_greedy(target, None, plain, prompt, 0) for prompt in PROMPTS]


@pytest.mark.parametrize("kind", ["chain", "tree", "lookup", "features", "ngram"])
def test_exact_triton_greedy_speculative_output_is_plain_greedy_output_in_bfloat16(bf16_target, kind):
    """bfloat16, γ 4: a draft model's chain and its K 4 tree (the target's first layer, on the triton
    kernels too), a K 2 tree with a lookup branch of 6, a feature draft (its forward on torch's
    kernels; run ahead) and n-gram lookup give bit-exact plain decoding's tokens, after a short prompt
    and after one longer than a chunk of keys."""
    target, expected = bf16_target
    layer = LeanModel(target.weights, max_seq_len=128, num_layers=1)
    make = {"chain": lambda: ModelDrafter(layer), "tree": lambda: ModelDrafter(layer, candidates=4),
            "lookup": lambda: LookupDrafter(ModelDrafter(layer, candidates=2), NgramDrafter(), 6),
            "features": lambda: FeatureDrafter(_feature_draft(target), target, candidates=1),
            "ngram": NgramDrafter}[kind]
    for prompt, tokens in zip(PROMPTS, expected):
        stepper = fused_stepper(target, make(), compile=False, bit_exact=True, kernels="triton",
                                run_ahead=kind == "features")
        assert stepper.bit_exact and stepper.kernels == "triton"
        assert _greedy(target, make(), stepper, prompt, 4) == tokens
    assert kind != "features" or stepper.ahead_launches > 0


def test_the_exact_target_on_the_triton_kernels_gives_plain_decodings_bits(triton_device):
    """ExactTarget (the generic step's bit-exact target) over a triton bit-exact stepper: a chain of 34
    positions (two calls: 32 and 2 rows) and a 17-node tree give each position the bits plain decoding
    computes one position at a time."""
    target = _target(triton_device)
    stepper = FusedStepper(target, None, compile=False, bit_exact=True, kernels="triton")
    tree_alone = _three_ways(stepper)[2]
    chain = CONTEXT[-1:] + [(7 * i + 2) % VOCAB for i in range(33)]
    stepper.begin(CONTEXT, GREEDY)
    with torch.inference_mode():
        plain = [stepper.score(torch.tensor([token], device=triton_device),
                               torch.tensor(59 + i, device=triton_device))[0]
                 for i, token in enumerate(chain)]
    exact = ExactTarget(FusedStepper(target, None, compile=False, bit_exact=True, kernels="triton"))
    exact.prefill(torch.tensor(CONTEXT[:-1]))
    logits = exact.forward(torch.tensor(chain), 59)
    assert logits.shape[0] == 34 and _differing(logits, torch.stack(plain)) == []
    exact.truncate(59)
    candidates = torch.randint(0, VOCAB, (4, 4), generator=torch.Generator().manual_seed(1))
    _, ancestors = candidate_tree(4, 4)
    tree = exact.forward(tree_tokens(torch.tensor(CONTEXT[-1:]), candidates), 59, ancestors)
    assert _differing(tree, tree_alone) == []


# ---- the API and the command line --------------------------------------------------------------------------


def test_the_api_and_the_cli_run_bit_exact_decoding_on_the_triton_kernels(triton_device, tmp_path, capsys):
    """speculant.load(bit_exact=True, kernels="triton"), bfloat16: plain and speculative decoding (n-gram)
    run the triton bit-exact fused step and agree; a hierarchy (a model drafted by n-gram lookup) and
    logprobs run the generic step over ExactTarget on the same forwards and agree; generate_many runs
    one request at a time (batched decoding runs torch's kernels, and ExactRows refuses the stepper);
    `generate --bit-exact --kernels triton --compare` says identical."""
    from test_loading import save_folder, tiny_hf_model

    from speculant import api
    from speculant.cli import main

    sizes = {"vocab_size": 261, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
             "num_key_value_heads": 1, "num_hidden_layers": 1, "max_position_embeddings": 64}
    folder = str(save_folder(tiny_hf_model("llama", **sizes), tmp_path / "tiny"))
    options = {"max_seq_len": 64, "device": triton_device, "dtype": "bfloat16", "bit_exact": True, "kernels": "triton"}
    spec = api.load(folder, draft="ngram", gamma=3, **options)
    assert spec.stepper.kernels == spec.plain_stepper.kernels == "triton"
    assert spec.stepper.bit_exact and spec.plain_stepper.bit_exact
    prompt = "ab cd ab cd"
    plain = spec.generate(prompt, max_new_tokens=12, plain=True).token_ids
    assert spec.generate(prompt, max_new_tokens=12).token_ids == plain
    assert spec.generate(prompt, max_new_tokens=12, logprobs=1).token_ids == plain
    with pytest.raises(ValueError, match="batched decoding runs torch's kernels"):
        spec.batch_engine()
    with pytest.raises(ValueError, match="bit-exact batching runs torch's kernels"):
        ExactRows(spec.exact_target, 2)  # its prefill replays graphs: never swapped caches
    assert spec.generate_many([{"prompt": prompt}], max_new_tokens=12)[0].token_ids == plain
    hierarchy = api.load(folder, draft=[folder, "ngram"], gamma=3, **options)
    assert isinstance(hierarchy.stepper, GenericStepper) and hierarchy.stepper.target.stepper.kernels == "triton"
    assert hierarchy.generate(prompt, max_new_tokens=12).token_ids == plain
    code = main(["generate", "--target", folder, "--draft", "ngram", "--max-seq-len", "64", "--device", triton_device,
                 "--dtype", "bfloat16", "--bit-exact", "--kernels", "triton", "--max-new-tokens", "8", "--compare",
                 "--json", prompt])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["identical"] is True


def test_bit_exact_mode_is_the_default_on_the_triton_kernels_where_the_step_fits(triton_device, tmp_path):
    """speculant.load(kernels="triton") decodes in bit-exact mode unless told not to (bit_exact=False,
    --no-bit-exact) or where its trees do not fit a bit-exact forward (K 4 + lookup 16 at γ 4: 33 rows);
    on torch's kernels the default stays off (api.default_bit_exact)."""
    from test_loading import save_folder, tiny_hf_model

    from speculant import api
    from speculant.cli import build_parser

    sizes = {"vocab_size": 261, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
             "num_key_value_heads": 1, "num_hidden_layers": 1, "max_position_embeddings": 64}
    folder = str(save_folder(tiny_hf_model("llama", **sizes), tmp_path / "tiny"))
    options = {"max_seq_len": 64, "device": triton_device, "dtype": "bfloat16"}
    spec = api.load(folder, draft="ngram", gamma=3, kernels="triton", **options)
    assert spec.bit_exact and spec.stepper.bit_exact and spec.plain_stepper.bit_exact
    off = api.Speculant(spec.target, ["ngram"], gamma=3, kernels="triton", bit_exact=False)
    assert not off.bit_exact and not off.stepper.bit_exact and off.stepper.kernels == "triton"
    wide = api.Speculant(spec.target, [folder], gamma=4, candidates=4, lookup=16, kernels="triton")
    assert not wide.bit_exact and not wide.stepper.bit_exact
    assert api.Speculant(spec.target, ["ngram"], gamma="auto", kernels="triton").bit_exact  # up to γ 12: 13 rows
    assert not api.Speculant(spec.target, ["ngram"], gamma=3).bit_exact  # torch's kernels
    assert build_parser().parse_args(["generate", "x"]).bit_exact is None
    assert build_parser().parse_args(["generate", "--no-bit-exact", "x"]).bit_exact is False


# ---- on a GPU: the compiled kernels, CUDA graphs, the compiled sampling tail --------------------------------

SMOLLM2_LAYER = {"hidden_size": 576, "intermediate_size": 1536, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
                 "max_position_embeddings": 2048}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a GPU")
@pytest.mark.parametrize("context", [60, 700])
def test_on_cuda_a_positions_logits_are_the_same_bits_alone_in_a_chain_and_in_a_tree(context):
    """SmolLM2-135M's layer shapes (4 layers, random weights, bfloat16) on the GPU: the three ways
    bit-equal on the compiled kernels, after 60 and after 700 tokens; every GEMM kernel's rows the same
    bits in calls of 1 to 32 rows. The control: the same kernels' default mode (a row alone runs GEMVs, a chain
    and a tree tl.dot tiles; attention's tiles follow the rows) gives some node other bits. (torch's kernels
    were the control until torch 2.11's cuBLAS on an H100 gave all three the same bits.)"""
    tokens = [(5 * i + 3) % VOCAB for i in range(context)]
    target = _target("cuda", layers=4, seq=1024, **SMOLLM2_LAYER)
    tree, chain, alone = _three_ways(FusedStepper(target, None, compile=False, bit_exact=True, kernels="triton"),
                                     tokens)
    assert _differing(tree, alone) == [] and _differing(chain, alone[:5]) == []
    tree, chain, alone = _three_ways(FusedStepper(target, None, compile=False, kernels="triton"), tokens)
    assert _differing(tree, alone) or _differing(chain, alone[:5])
    gemms, x = _gemms("cuda", BF16)
    for name, gemm in gemms.items():
        whole = gemm(x, 0)
        assert all(torch.equal(gemm(x[first:t], first), whole[first:t]) for t in range(1, 33) for first in (0, t - 1)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["plain", "chain", "tree", "features"])
def test_on_cuda_exact_triton_steps_in_graphs_with_compiled_sampling_give_plain_greedy_output(kind):
    """bfloat16 on the GPU, every step a graph replay (the prefill too), the sampling tail compiled as
    the API compiles it: plain decoding in chunks of 4 and one token at a time, a draft model's chain,
    a K 4 tree with a lookup branch of 8, a K 2 feature draft run ahead: the tokens of plain bit-exact
    decoding in one graph-free, uncompiled run, over two requests on one stepper (graphs reused)."""
    target = _target("cuda", layers=4, seq=512, **SMOLLM2_LAYER)
    draft = {"chain": lambda: LeanModel(target.weights, max_seq_len=512, num_layers=1),
             "tree": lambda: LeanModel(target.weights, max_seq_len=512, num_layers=2),
             "features": lambda: _feature_draft(target)}.get(kind, lambda: None)()
    make = {"plain": lambda: None, "chain": lambda: ModelDrafter(draft),
            "tree": lambda: LookupDrafter(ModelDrafter(draft, candidates=4), NgramDrafter(), 8),
            "features": lambda: FeatureDrafter(draft, target, candidates=2)}[kind]
    reference = FusedStepper(target, None, compile=False, use_graphs=False, bit_exact=True, kernels="triton")
    stepper = fused_stepper(target, make(), use_graphs=True, compile=True, bit_exact=True, kernels="triton")
    for prompt in (PROMPTS[1] * 3, [(3 * i + 1) % VOCAB for i in range(45)]):
        expected = _greedy(target, None, reference, prompt, 0, max_new=64)
        if kind == "plain":
            single = FusedStepper(target, None, use_graphs=True, compile=True, bit_exact=True, kernels="triton",
                                  plain_chunk=1)
            assert _greedy(target, None, single, prompt, 0, max_new=64) == expected
        assert _greedy(target, make(), stepper, prompt, 0 if kind == "plain" else 4, max_new=64) == expected
    assert stepper.graphs and all(runner.graph is not None for runner in stepper.graphs.values())
    # the sampling tail stayed compiled (a failed compile falls back to eager, function by function)
    assert stepper.compile_sampling and not stepper.eager_sampling, stepper.eager_sampling
