"""The fused step: a whole speculative step as one static-shape function, captured as a CUDA graph.

On the lent H100 an eager kernel launch costs ~22 µs and a kernel inside a CUDA graph ~3 µs, so
the generic loop (one Python call per op) is launch-bound. Here each step is ONE graph replay:

    draft γ tokens with the draft model (sampling inside, from pre-drawn uniforms)
    (and find a lookup branch of G tokens: drafters.ngram.device_continuation over the token history)
    -> one target forward over the γ+1 positions (the tree's) -> logits_to_probs -> acceptance.verify
    -> out = [count, chain kept, alternative, lookup kept, emitted tokens (the first `count`)
              (, the lookup branch: its G tokens, its length)]

and ONE device->host read of `out` (the step's only synchronisation); the host writes one int64
buffer (tokens and positions) and draws the uniforms straight into theirs. The KV caches are
written in place at positions held in device tensors; attention spans the whole static cache
under a mask built from those positions, so every step of a given γ has the same shapes and
replays the same graph. Plain decoding runs up to `plain_chunk` tokens per replay, each sampled
token fed back on the device. FusedStepper is a speculant.step.Stepper: the functions are the same
as the generic step's, drafters.base.sample_chain, `logits_to_probs`, `sample_from`, `verify` /
`verify_candidates` and `emitted_tokens` (compiled with the model forwards, so that they fuse
into few kernels): exactness carries over, and on the CPU the same bodies run eagerly (that is how
the tests check them). Which drafters it can fuse is decided by `fused_stepper`, from the
drafter's own settings. The prompt is prefilled through the compiled forward as well; on CUDA
padded to a power of two and replayed from a graph per length (`_prefill`).

Run-ahead (on by default with graphs; draft-model steps, feature or token drafts, with or without a
lookup branch): after the step, the graph appends the tokens it emitted to the draft's window (the
tokens its draft re-reads each step) and moves both positions on, on the device, leaving the next
replay's inputs in its own input buffer (a lookup branch needs nothing more: each replay writes its
window to the token history the branch is found in, on the device, before it looks), so the host
launches the next replay (its γ given by the engine with this step's) before it reads this one's
output (copied to pinned memory behind it on the stream). The host's part of a step (the read-back,
the engine's bookkeeping, the next launch) then overlaps the GPU's work instead of leaving the GPU
idle (2.49 -> 2.33 and 2.47 -> 2.34 ms per step in two H100 runs, feature drafts). The next replay
is launched only where all of its tokens (max(γ, G) + 1) may still be emitted, so the text is the
same as one replay at a time: its uniforms are drawn in the same order and its lookup branch is the
one the host's NgramDrafter finds. Plain chunks do not run ahead: a chunk launched ahead of a
stop token is wasted (6.6 ms), and on chat prompts run-ahead plain decoding was +2.6 % in one run
and -1.2 % in the other, end to end (BENCHMARKS.md).

Bit-exact mode (`bit_exact=True`): every target forward after the prompt's prefill (plain steps,
plain chunks, chain and tree verifications) computes exactly EXACT_WIDTH rows, padded, with
speculant.models.exact_attention's attention (each row walks its own keys in position order), so a
position's logits are a function of its context only, bit for bit, and greedy speculative output is
plain greedy output token for token in bfloat16 on a GPU too (`score`, `exact_forward`). What this
step cannot run (a hierarchy, a draft through transformers, logprobs) runs the generic step over
speculant.exact_target.ExactTarget, whose forwards are a bit-exact stepper's own `prefill` and
`score` / `exact_score`: the same bits.

Kernels (`kernels="triton"`): every target forward above (prefill, plain steps and chunks, chain
and tree verification) runs models.triton_forward.TritonForward over models.triton_layers'
kernels, 6 per layer, captured in the same graphs but never through torch.compile; a token draft
model's too where TritonForward runs it (else torch's, with a warning); a feature draft's stays
torch's. The sampling and acceptance functions are the same, so the law is. With bit_exact the
target's every forward, the prefill included, is TritonForward.forward_exact (row-invariant kernels,
each row walking its own keys in position order: models.triton_forward), over the call's own rows,
not padded to EXACT_WIDTH (`exact_score`); the prefill then replays padded graphs as in the default
mode. Not yet measured on a GPU.

Graphs are keyed by (kind, γ) and captured on first use for a given `SamplingParams`; they are
reused across requests. `capture_time` reports what capture (and compilation) cost.

Long because the fused step is one stateful class: its graph bodies (model draft, feature draft,
verify, plain chunk, run-ahead), the prefill graphs and the runners that capture and replay them
share the caches and buffers they write in place.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

import torch

from speculant.acceptance import candidate_tree, emitted_tokens, tree_that_fits, tree_tokens, verify, verify_candidates
from speculant.drafters.base import Drafter, NoDrafter, common_prefix_length, draw_alternatives, sample_chain
from speculant.drafters.features import FeatureDrafter
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter, device_continuation
from speculant.models.base import CausalLM
from speculant.models.exact_attention import EXACT_WIDTH, ExactKeys, check_exact_width, exact_keys, exact_layout
from speculant.models.feature_draft import FeatureDraft
from speculant.models.transformer import LeanModel
from speculant.models.triton_forward import TritonForward, draft_kernels, target_kernels
from speculant.sampling import SamplingParams, logits_to_probs, sample_from
from speculant.step import StepResult, chain_tail

MAX_PARAM_SETS = 8  # sampling params sets whose graphs a stepper keeps (a server's requests alternate between a few)


def check_compile(compile) -> bool | str:
    """A FusedStepper's `compile`: False (eager forwards), True (each whole forward through
    torch.compile) or "layers" (regional: LeanModel.compile_layers, one compiled decoder layer for
    all layers and the rest eager: a compile costs one layer's time, not the whole model's)."""
    if not (isinstance(compile, bool) or (isinstance(compile, str) and compile == "layers")):
        raise ValueError(f"compile must be False, True or 'layers', got {compile!r}")
    return compile


def _compiled(owner, key: tuple, forward: Callable, compile: bool | str) -> Callable:
    """`forward`, through torch.compile if `compile` (it fuses the elementwise ops: fewer kernels per
    graph), kept on `owner` (the model) under `key` the first time: every stepper over the same model
    then shares the compiled code (a later call's `forward`, the same function, is dropped).
    compile="layers": the forward stays eager around the owner's compiled decoder layer (a LeanModel's
    compile_layers)."""
    cached, key = owner.__dict__.setdefault("_compiled_forwards", {}), (*key, compile)
    if key not in cached:
        if compile == "layers" and isinstance(owner, LeanModel):
            owner.compile_layers()
            cached[key] = forward
        else:
            cached[key] = torch.compile(forward) if compile else forward
    return cached[key]


# No pointwise concatenation in the sampling functions: on CUDA inductor may lower a small torch.cat
# as one pointwise kernel whose index is Identity(i - start); where that index folds to a constant (a
# piece of length 1), torch 2.11's Triton printer fails on it (sympy: "'Identity' object has no
# attribute '_prec'", or a RecursionError), seen on an H100 and an H200 (the K 4 tree without a lookup
# branch, the n-gram chain of the Qwen pair). A copy kernel per piece instead (inductor's choice on
# the CPU). Newer inductors take options for it (set to 0 here); torch 2.11 decides with a constant (up
# to 8 pieces always may go pointwise), so its lowering's pointwise_cat is also swapped for the copy
# kernels while a sampling function compiles (_concat_kernels_only).
NO_POINTWISE_CAT = ("max_pointwise_cat_inputs", "max_complex_pointwise_cat_inputs")  # inductor options, set to 0


@contextmanager
def _concat_kernels_only():
    """While inside: inductor lowers every torch.cat to copy kernels (ConcatKernel), never to one
    pointwise kernel (see NO_POINTWISE_CAT). Lowering runs in this process, at a compiled function's
    first call for a shape, so a call inside this block compiles that way."""
    from torch._inductor import ir, lowering

    original = getattr(lowering, "pointwise_cat", None)
    if original is None or not hasattr(ir, "ConcatKernel"):  # another inductor: its options do it
        yield
        return

    def concat_kernel(inputs, dim=0):
        return ir.TensorBox(ir.ConcatKernel.create(inputs, dim))

    lowering.pointwise_cat = concat_kernel
    try:
        yield
    finally:
        lowering.pointwise_cat = original


def _compiled_or_eager(function: Callable, failures: dict[str, str]) -> Callable:
    """`function` through torch.compile with static shapes (one specialisation per (γ, K, lookup) met,
    never a symbolic γ); if compiling it fails (a compiler error at its first call, which the graphs'
    warm-up makes outside any capture), it runs eagerly from then on, with a warning, and
    failures[its name] says why: the other sampling functions stay compiled."""
    import torch._inductor.config as inductor_config  # here: importing inductor takes seconds

    options = {option: 0 for option in NO_POINTWISE_CAT if hasattr(inductor_config, option)}
    compiled = torch.compile(function, dynamic=False, options=options)
    name = function.__name__

    def call(*args):
        if name not in failures:
            try:
                with _concat_kernels_only():
                    return compiled(*args)
            except Exception as error:
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                warnings.warn(f"compiling the sampling function {name} failed ({failures[name]}); it runs "
                              "eagerly inside the graph instead")
        return function(*args)

    return call


def static_forward(model: LeanModel, compile: bool, kernels: str = "torch", exact: bool = False
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """tokens [T], positions [T] (device tensors)[, ancestors [T, T]] -> logits [T, vocab] float32;
    attends over the whole cache. Compiled once per model (_compiled). kernels="triton":
    models.triton_forward.TritonForward's, over its own kernels (never through torch.compile); with
    `exact`, its bit-exact forward (forward_exact: a tree comes as exact_layout's nodes [T, W] instead
    of ancestors)."""
    if kernels == "triton":
        forward = TritonForward(model)
        return _compiled(model, ("triton", exact), forward.forward_exact if exact else forward.forward_static, False)

    def forward(tokens: torch.Tensor, positions: torch.Tensor, ancestors: torch.Tensor | None = None):
        # ancestors [T, T]: a tree (LeanModel.forward), its nodes in slots positions[0] + 0..T-1
        taps = model.new_taps()
        hidden = model.hidden_states(tokens, positions, kv_len=model.max_seq_len, ancestors=ancestors, taps=taps)
        slots = positions if ancestors is None else positions[0] + torch.arange(tokens.shape[0], device=tokens.device)
        model.record_features(hidden, slots, taps)
        return model.logits(hidden)

    # a target that keeps features writes them too: another function. dynamic=None (torch.compile's
    # default): the first shape compiles static, the next one once for all lengths >= 2
    return _compiled(model, ("static", model.feature_kind()), forward, compile)


def exact_forward(model: LeanModel, compile: bool):
    """Bit-exact mode's forward: tokens [W], positions [W], slots [W], start [], table [W, W], count []
    (models.exact_attention.ExactKeys) -> logits [W, vocab] (the padding rows' too: the caller
    slices). Every call has these shapes, so one compiled graph (one set of kernels) serves plain
    steps, chains and trees alike. Compiled once per model (_compiled)."""

    def forward(tokens, positions, slots, start, table, count):
        taps = model.new_taps()
        hidden = model.exact_hidden_states(tokens, ExactKeys(positions, slots, start, table, count), taps)
        model.record_features(hidden, slots, taps)  # the padding rows' go to scratch slots
        return model.logits(hidden)

    return _compiled(model, ("exact", model.feature_kind()), forward, compile)


def static_feature_forward(draft: FeatureDraft, compile: bool):
    """The feature draft's forward: tokens [T], features [T, E], positions [T] -> (logits [T, V],
    predicted features [T, E]); attends over the whole cache. Compiled once per draft (_compiled)."""

    def forward(tokens, features, positions):
        hidden = draft.feature_hidden(tokens, features, positions, kv_len=draft.max_seq_len)
        return draft.logits(hidden), hidden

    return _compiled(draft, ("features",), forward, bool(compile))  # its own layer loop: compiled whole


class GraphedModel:
    """A lean model whose short chain forwards (up to MAX_ROWS tokens) replay CUDA graphs of
    static_forward, one per row count, captured at first use; everything else (prefill, trees,
    truncate, the cache, ...) is the model's own. For a hierarchy's levels on CUDA (its target in the
    default mode, its middle levels, a last model level): the generic step runs their verifications and
    drafts through `forward`, which would otherwise launch each op eagerly (about 50 a layer, at ~22 µs
    each on the device machines). The logits are static_forward's: the same
    function as LeanModel.forward, not always the same bits, which the hierarchy's exactness does not
    need (the law a middle level's token was drawn from is the one its own forward returned, whatever
    computed it: drafters/hierarchical.py). use_graphs=False runs static_forward eagerly (the CPU)."""

    MAX_ROWS = 16

    def __init__(self, model: LeanModel, use_graphs: bool | None = None) -> None:
        self.model = model
        self.use_graphs = model.device.type == "cuda" if use_graphs is None else use_graphs
        self._forward = static_forward(model, compile=False)
        self._runners: dict[int, _Runner] = {}  # rows -> its forward over static (tokens, positions)
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def __getattr__(self, name: str):
        return getattr(self.model, name)  # only for what GraphedModel does not define itself

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, ancestors: torch.Tensor | None = None) -> torch.Tensor:
        """LeanModel.forward's contract: tokens [T] at positions start_pos.. -> logits [T, vocab]
        float32 (a fresh tensor), the cache written and its length start_pos + T."""
        t = tokens.shape[0]
        if ancestors is not None or not self.model.min_rows <= t <= self.MAX_ROWS:
            return self.model.forward(tokens, start_pos, ancestors)
        end = self.model._write_range(start_pos, t)
        tokens = tokens.to(self.model.device)
        positions = torch.arange(start_pos, end, device=self.model.device)
        runner = self._runners.get(t)
        if runner is None:  # built over this call's own inputs: its warm-up writes this call's keys and values
            runner = self._runners[t] = _Runner(self._forward, tokens.clone(), positions, self.use_graphs, self._pool,
                                                lambda: None, lambda saved: None)
        else:
            runner.ints.copy_(tokens)
            runner.uniforms.copy_(positions)
        logits = runner.run().clone()
        self.model.set_length(end)
        return logits


class GraphedTail:
    """The generic step's tail after the target's forward (step.chain_tail: the sampling transform, the
    acceptance rule, the emitted tokens, about 40 eager launches) replayed from a CUDA
    graph, one per (sampling params, draft length, whether the draft has laws): a replay and a few
    copies instead, where each eager launch costs ~20 µs (the device machines). For the generic step's
    levels on CUDA (a hierarchy). The same kernels on the same inputs as the eager tail: the same bits.
    Inputs on the CPU (or use_graphs=False) run the same static buffers eagerly (the CPU tests)."""

    def __init__(self, use_graphs: bool = True) -> None:
        self.use_graphs = use_graphs
        self.runners: dict[tuple, _TailRunner] = {}
        self.pool = None

    def __call__(self, params: SamplingParams, target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                 draft_probs: torch.Tensor | None, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """target_logits [γ+1, V], draft_tokens [γ], draft_probs [γ, V] or None (a point mass), uniforms
        [γ+1] -> (the target's probs [γ+1, V], a fresh tensor; [count, emitted tokens [γ+1]])."""
        key = (params, draft_tokens.shape[0], draft_probs is None, target_logits.dtype, target_logits.device)
        inputs = (target_logits, draft_tokens, draft_probs, uniforms)
        runner = self.runners.get(key)
        if runner is None:
            graphs = self.use_graphs and target_logits.is_cuda
            if graphs and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            runner = self.runners[key] = _TailRunner(params, inputs, graphs, self.pool)
        return runner.run(inputs)


class _TailRunner:
    """step.chain_tail over static copies of one call's inputs; on CUDA captured once and replayed."""

    @torch.inference_mode()
    def __init__(self, params: SamplingParams, inputs: tuple, use_graphs: bool, pool) -> None:
        self.params = params
        self.static = tuple(None if x is None else x.clone() for x in inputs)
        self.graph = None
        if use_graphs:
            self.graph, self.output = _capture(lambda: chain_tail(params, *self.static), pool, warm_ups=1)

    @torch.inference_mode()
    def run(self, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        for static, x in zip(self.static, inputs):
            if static is not None:
                static.copy_(x)
        if self.graph is None:
            probs, out = chain_tail(self.params, *self.static)
        else:
            self.graph.replay()
            probs, out = self.output
        return probs.clone(), out.clone()


def fused_stepper(target: CausalLM, drafter: Drafter, **options) -> FusedStepper | None:
    """The FusedStepper for this target and drafter, or None where the pair cannot be fused: the
    one place that decides, from the drafter's own settings (its model, candidates, lookup branch).

    Fusable: a lean target with no drafter (plain decoding: NoDrafter or None), an
    n-gram drafter, or one lean draft model (ModelDrafter, FeatureDrafter), with its candidates and
    optionally a lookup branch beside it (LookupDrafter). A hierarchy is not. `options` go to
    FusedStepper (compile, use_graphs, plain_chunk, run_ahead, bit_exact, kernels)."""
    if not isinstance(target, LeanModel):
        return None
    if drafter is None or isinstance(drafter, NoDrafter):
        return FusedStepper(target, None, **options)
    if isinstance(drafter, NgramDrafter):
        return FusedStepper(target, None, ngram=drafter, **options)
    lookup = drafter if isinstance(drafter, LookupDrafter) else None
    inner = lookup.inner if lookup is not None else drafter
    if isinstance(inner, (ModelDrafter, FeatureDrafter)) and isinstance(inner.model, LeanModel):
        return FusedStepper(target, inner.model, candidates=inner.candidates, ngram=lookup and lookup.ngram,
                            lookup=lookup.length if lookup is not None else 0, **options)
    return None


class FusedStepper:
    """Runs speculative steps for a lean target and a lean draft model, an n-gram drafter or none.

    Use through `engine.generate(..., stepper=FusedStepper(...))` (or `fused_stepper(target,
    drafter)`, which reads these settings from a drafter). `draft_model` None means the drafter is
    deterministic (n-gram lookup) or absent (plain decoding).
    """

    def __init__(self, target: LeanModel, draft_model: LeanModel | None = None,
                 ngram: NgramDrafter | None = None, compile: bool | str = True, use_graphs: bool | None = None,
                 plain_chunk: int = 4, candidates: int = 1, lookup: int = 0, run_ahead: bool | None = None,
                 bit_exact: bool = False, kernels: str = "torch") -> None:
        self.target = target
        self.draft_model = draft_model
        self.ngram = ngram
        self.device = target.device
        self.compile = compile = check_compile(compile)  # see check_compile; the sampling functions compile either way
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        # Plain decoding (γ = 0 asked for) runs up to `plain_chunk` tokens per graph replay: the
        # host work of a step (input copies, random numbers, launch, the read-back) is paid once
        # per chunk. Tokens after a stop token are computed and dropped by the engine.
        if plain_chunk < 1:
            raise ValueError(f"plain_chunk must be >= 1, got {plain_chunk}")
        self.plain_chunk = plain_chunk
        # k candidates per draft position (acceptance.verify_candidates): a draft model's chain plus
        # k-1 alternatives, scored as one tree by the target
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if candidates > 1 and draft_model is None:
            raise ValueError("several candidates per position need a draft model")
        self.candidates = candidates
        # Run ahead (default on CUDA): draft-model replays advance their own inputs on the device,
        # so the next replay is launched before this one's output is read; the host's share of a
        # step (reading the output, the engine's bookkeeping, the next launch) then runs while the
        # GPU works. Only where the next replay's tokens may all still be emitted, so the text is
        # what one replay at a time gives; a run-ahead replay a stop token makes useless is computed
        # and dropped (its uniforms drawn: a generator shared by later requests is ahead).
        self.run_ahead = self.use_graphs if run_ahead is None else run_ahead
        self.pending: _Launched | None = None  # the replay launched ahead, not read yet
        self.ahead_launches = 0  # replays launched ahead so far (each one a stop token ended was wasted)
        # a lookup branch of up to `lookup` prompt-lookup tokens beside the draft model's (drafters.lookup)
        if lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {lookup}")
        if lookup and draft_model is None:
            raise ValueError("a lookup branch goes beside a draft model")
        self.lookup = lookup
        if lookup and ngram is None:
            self.ngram = NgramDrafter()
        # The lookup branch is found on the device, inside the step's graph (ngram.device_continuation, with
        # the n-gram drafter's settings, read now: calibration swaps `ngram` for a padded proposer), from a
        # history [max_seq_len] of the request's tokens: each drafting replay writes its window (the context's
        # last W tokens, which hold every token the last step emitted) there first, so a replay launched
        # ahead finds the branch of the context it advanced to. history_valid: the tokens from the start
        # known to be there (the host copies the ones before a window that no replay wrote: after begin, or
        # plain steps); contexts only grow between begins, as the draft's (draft_valid) do.
        self.lookup_ngram = (self.ngram.max_ngram, self.ngram.min_ngram) if lookup else None
        self.history = torch.zeros(target.max_seq_len, dtype=torch.int64, device=self.device) if lookup else None
        self.history_valid = 0
        if compile:  # room for the shape variants (length 1 is always specialised by dynamo)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.features = isinstance(draft_model, FeatureDraft)
        # kernels="triton": the target's forwards (and a token draft model's, where TritonForward runs it)
        # over models.triton_layers' kernels, 6 per layer, instead of the lean model's torch ops
        self.kernels = target_kernels(kernels, target)
        self.draft_kernels = draft_kernels(kernels, draft_model)
        # bit-exact mode on torch's kernels: every stepper of this target, plain or not, then shares ONE compiled
        # exact forward (on the triton kernels features are written outside them and never change the logits)
        if bit_exact and self.kernels == "torch":
            target.keep_features()
        if self.features:
            draft_model.read_from(target)  # before compiling: the target's forward then writes them
            self.draft_fn = static_feature_forward(draft_model, compile)
        else:
            self.draft_fn = None if draft_model is None else static_forward(draft_model, compile, self.draft_kernels)
        # the prompt's prefill (and every forward by default; bit-exact on the triton kernels, every forward)
        self.target_fn = static_forward(target, compile, self.kernels, exact=bit_exact)
        # bit-exact mode on torch's kernels: every other target forward is EXACT_WIDTH rows through exact_fn (score)
        self.bit_exact = bit_exact
        self.exact_fn = exact_forward(target, compile) if bit_exact and self.kernels == "torch" else None
        self.layouts: dict = {}  # bit-exact layouts (depths, nodes, count) on the device, per call shape
        self.offsets = torch.arange(target.max_seq_len, device=self.device)  # position offsets, read by bodies
        self.trees: dict = {}
        self.widest = 0  # the longest step (γ or lookup branch) asked for so far: the draft's window, less one
        # The sampling transform, the draw and the acceptance rule are compiled too (fused into a
        # few kernels instead of ~20 per draft token); if compiling them fails, they run eagerly.
        self.compile_sampling = bool(compile)
        self.eager_sampling: dict[str, str] = {}  # a sampling function whose compile failed -> the error
        # Sampling params are baked into a step's graph and its sampling functions: a set of both per
        # params met (up to MAX_PARAM_SETS, the latest last), the current one in graphs and samplers;
        # prefills sample nothing, so their graphs serve every params set
        self.graph_sets: OrderedDict[SamplingParams, tuple[dict, dict]] = OrderedDict()
        self.graphs: dict = {}
        self.samplers: dict = {}
        self.prefills: dict = {}
        self.params: SamplingParams | None = None
        self.capture_time = 0.0
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.prefill_graphs = self.use_graphs  # padded prefills from graphs (see _prefill)

    # ---- request lifecycle (called by the engine) --------------------------------------------
    # Every entry point (begin, prefill, warm_up_prefills, step, score) runs in inference mode, so every
    # tensor a compiled forward or sampling function reads is made there: dynamo guards on a tensor's
    # dispatch keys, and a normal tensor in one call and an inference tensor in the next compile the
    # function twice.
    @torch.inference_mode()
    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        """Prefill the target (prompt[:-1]) and the draft (what its first step's window does not
        re-read), through the compiled forwards (fewer launches than eager); graphs are captured
        on first use."""
        self._wait_pending()  # a replay launched ahead for the last request: done before its graphs may go
        if params != self.params:
            self._use_params(params)
        self.prefill(prompt[:-1])
        self.history_valid = 0
        if self.draft_model is not None:
            self.draft_model.truncate(0)
            self.draft_valid = 0
            self._catch_up_draft(prompt, len(prompt) - 1 if self.features else len(prompt) - 2)

    def _use_params(self, params: SamplingParams) -> None:
        """Steps from now on sample with `params`: their graphs and sampling functions are the set
        made for them before, or a new one. A new set past MAX_PARAM_SETS drops every graph (a graph
        keeps its memory in the shared pool) and captures start in a fresh pool (a pool whose graphs
        were freed takes no capture)."""
        if params not in self.graph_sets and len(self.graph_sets) >= MAX_PARAM_SETS:
            self.graph_sets.clear()
            self.prefills.clear()
            self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.graphs, self.samplers = self.graph_sets.setdefault(params, ({}, {}))
        self.graph_sets.move_to_end(params)
        self.params = params

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> None:
        """The target's cache then holds `tokens` at positions 0.. (the prompt's prefill, `_prefill`);
        speculant.exact_target.ExactTarget prefills through it too, so that the generic step in
        bit-exact mode starts from the same cache bits as this stepper's plain decoding. In bit-exact
        mode on torch's kernels never from a graph: a graph writes the cache it was captured on, and the
        batched engine prefills each row's own cache, swapped into the model (exact_target.ExactRows),
        the same way; on the triton kernels (which batched decoding never runs) from a padded graph, as
        in the default mode: the padding rows come after the text and its rows' bits are their own."""
        self.target.truncate(0)
        if tokens:
            self._prefill(self.target_fn, tokens, 0, graphs=not self.bit_exact or self.kernels == "triton")
            self.target.set_length(len(tokens))

    @torch.inference_mode()
    def warm_up_prefills(self, params: SamplingParams, max_prompt: int | None = None) -> None:
        """Make ahead the prefill graphs (target and draft) of every length bucket that a prompt of up to
        `max_prompt` tokens (default: the cache's length) meets, so that no request waits on a capture
        (or, with compiled forwards, a compile) for its prompt's length; on the CPU, or without padded
        prefills, there is nothing to make. The caches hold nothing after it: begin() comes next."""
        if not self.prefill_graphs:
            return
        room = min(m.max_seq_len for m in (self.target, self.draft_model) if m is not None)
        longest = min(room - 1, max_prompt or room)
        bucket = 16
        while bucket // 2 + 3 <= longest:
            # bucket/2 + 3 tokens: the target prefills all but the last, the draft one or two fewer, all
            # more than half the bucket, so each pads to it
            self.begin([(3 + 7 * i) % self.target.vocab_size for i in range(bucket // 2 + 3)], params)
            bucket *= 2
        self._wait_pending()
        for model in (self.target, self.draft_model):
            if model is not None:
                model.truncate(0)
        self.draft_valid = 0

    def _prefill(self, fn, tokens: list[int], start: int, features: torch.Tensor | None = None,
                 graphs: bool = True) -> None:
        """fn over tokens at positions start.. (writes the caches in place).

        With graphs (`graphs` and the stepper's), a prefill is padded to a power-of-two length (at
        least 16) and replayed from one graph per length: an eager prefill launches every kernel of
        every layer from the host (~22 µs each on the lent H100, 3.1 µs inside a graph). The padding
        (token 0, zero features) sits at the positions after the text: causal attention keeps it out
        of the text's states, and its K/V and features lie past the cache's length, overwritten before
        anything reads them, as a rejected draft's are."""
        bucket = max(16, 1 << (len(tokens) - 1).bit_length())
        room = min(m.max_seq_len for m in (self.target, self.draft_model) if m is not None)
        if graphs and self.prefill_graphs and len(tokens) > 1 and start + bucket <= room:
            key = ("prefill", id(fn), bucket)
            runner = self.prefills.get(key) or self._prepare(
                key, lambda: self._prefill_body(fn, bucket, features is not None), bucket, 0, into=self.prefills)
            runner.ints.copy_(torch.tensor(tokens + [0] * (bucket - len(tokens))), non_blocking=True)
            runner.body.start.fill_(start)
            if features is not None:
                runner.body.features[: len(tokens)].copy_(features)
                runner.body.features[len(tokens):].zero_()
            runner.run()
            return
        ids = torch.tensor(tokens, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)
        if len(tokens) > 1:  # one compiled graph for every length >= 2, not one per prompt length
            self._mark_dynamic(ids, positions)
        fn(ids, positions) if features is None else fn(ids, features, positions)

    def _prefill_body(self, fn, bucket: int, with_features: bool):
        """ints = tokens [bucket] -> fn over them at positions body.start + 0..bucket-1; a feature
        draft reads body.features [bucket, E]. Every input is a whole tensor of its own (no view at
        an offset), as in the eager prefill: the compiled forward's one dynamic-length variant
        serves every bucket."""
        start = torch.zeros((), dtype=torch.int64, device=self.device)
        features = torch.zeros(bucket, self.target.cfg.hidden_size, dtype=self.target.dtype,
                               device=self.device) if with_features else None

        def body(tokens, uniforms):
            positions = start + self.offsets[:bucket]
            self._mark_dynamic(tokens, positions, *((features,) if with_features else ()))
            if features is None:
                return fn(tokens, positions)[-1:]
            return fn(tokens, features, positions)[0][-1:]

        body.start, body.features = start, features
        return body

    def _mark_dynamic(self, *tensors: torch.Tensor) -> None:
        """Mark dim 0 of a prefill's inputs dynamic where the forwards compile whole (compile=True):
        one compile serves every length. Regionally compiled layers (compile="layers") see these
        tensors through the eager code around them, which fixes some of their shapes: no marks."""
        if self.compile is True:
            for tensor in tensors:
                torch._dynamo.mark_dynamic(tensor, 0)

    def _catch_up_draft(self, context: list[int], upto: int) -> None:
        """Make draft positions < upto valid (after the prompt, or when steps without drafting,
        γ = 0, left a gap the next graph's window does not cover). A token draft holds x_i at
        position i; a feature draft reads (x_{i+1}, f_i) at position i."""
        start = self.draft_valid
        if upto <= start:
            return
        if self.features:
            # a copy made in inference mode, as every tensor the compiled draft forward reads in a step is: a
            # view of the target's buffer (a normal tensor) would make dynamo compile the forward again
            features = self.target.features[start:upto].clone()
            if upto - start > 1:
                self._mark_dynamic(features)
            self._prefill(self.draft_fn, context[start + 1 : upto + 1], start, features)
        else:
            self._prefill(self.draft_fn, context[start:upto], start)
        self.draft_valid = upto
        self.draft_model.set_length(max(self.draft_model.length, upto))

    def reserve(self, gamma: int) -> None:
        """Size the draft's window for steps up to γ from now on (`--gamma auto`: its longest).
        The window is otherwise the widest step taken so far, so the draft's inputs, hence its rounding,
        would depend on the γs that earlier requests (or a calibration) happened to take."""
        self.widest = max(self.widest, gamma, self.lookup)

    @property
    def runs_ahead(self) -> bool:
        """Launches the next step before reading this one (draft-model steps, feature or token, with or without a
        lookup branch): the engine then gives each step the next one's γ (`next_gamma`)."""
        return self.run_ahead and self.draft_model is not None

    @torch.inference_mode()
    def step(self, context: list[int], gamma: int, generator: torch.Generator | None, *, room: int | None = None,
             next_gamma: int | None = None, plain_tokens: int = 1) -> StepResult:
        """One step (speculant.step.Stepper). With run-ahead, a draft-model step whose tokens may
        all be emitted (`room`; None: unknown, no run-ahead) is taken from the replay launched ahead
        for this context, if there is one, and the next step (of `next_gamma`) is launched before
        this one is read, when all the tokens of both may be emitted, its γ is no longer than the
        window's and its tree fits."""
        n = len(context) - 1
        if self.bit_exact:
            check_exact_width(gamma, self.candidates, self.lookup)
        pending, self.pending = self.pending, None
        if pending is not None and (pending.length != len(context) or pending.gamma != gamma):
            pending = None  # launched for a context the engine did not reach (a stop token ended the request)
        widest = max(self.widest, gamma, self.lookup)  # this step's window, less one
        if self.runs_ahead and gamma > 0 and room is not None and n >= widest + 1 \
                and self._steps_fit(context, [gamma], room):
            launch_next = (next_gamma is not None and 1 <= next_gamma <= widest
                           and self._steps_fit(context, [gamma, next_gamma], room))
            return self._run_ahead_step(context, gamma, generator, next_gamma if launch_next else None, pending)
        return self._one_step(context, gamma, generator, plain_tokens)

    def _steps_fit(self, context: list[int], gammas: list[int], room: int) -> bool:
        """May steps of these γs from here each emit all the max(γ, G) + 1 tokens they may, with every whole
        tree (its alternatives and lookup branch) in the cache?"""
        length = len(context)
        for gamma in gammas:
            if length + gamma * self.candidates + self.lookup > self.target.max_seq_len:
                return False
            length += max(gamma, self.lookup) + 1
        return room + 1 >= length - len(context)

    def _wait_pending(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def _launch(self, key, gamma: int, runner: _Runner, generator: torch.Generator | None) -> _Launched:
        """Draw the step's uniforms (as a step run alone would), replay, and start copying the output
        to the host; returns without waiting."""
        torch.rand(runner.uniforms.shape, generator=generator, device=self.device, out=runner.uniforms)
        return _Launched(key, gamma, runner)

    def _ahead_runner(self, gamma: int, window: int, k: int) -> tuple[tuple, _Runner]:
        kind, make = ("features", self._feature_step_body) if self.features else ("model", self._model_step_body)
        size = self.lookup  # the whole tree: _steps_fit
        key = (kind + "-ahead", gamma, window, k, size)
        runner = self.graphs.get(key) or self._prepare(
            key, lambda: self._advancing_body(make(gamma, window, k, size), gamma, window, size), window + 2,
            self._draft_uniforms(gamma, k, size))
        return key, runner

    def _run_ahead_step(self, context: list[int], gamma: int, generator: torch.Generator | None,
                        next_gamma: int | None, pending: _Launched | None) -> StepResult:
        """A draft-model step (feature or token draft) from `pending`, if it was launched ahead for this context,
        else from a replay launched now; then the step of `next_gamma` (if given) is launched before this one is
        read. The step's time is the wall time since the last replay was read."""
        start = time.perf_counter()
        captured = self.capture_time
        n, k = len(context) - 1, self.candidates
        self.widest = max(self.widest, gamma, self.lookup)
        # >= max(γ, G) + 1: every position a step fed with predicted features (or draft tokens) is re-read, and
        # the window holds every token the last step emitted (the lookup history's)
        window = self.widest + 1
        key, runner = self._ahead_runner(gamma, window, k)
        alone = pending is None or pending.key != key  # launched now, not ahead
        self._write_history(context, n - window + 1)  # launched ahead: the replay before it wrote the rest
        if alone:  # a feature draft's window re-reads positions n-W..n-1, a token draft's n-W+1..n
            self._catch_up_draft(context, n - window + (0 if self.features else 1))
            runner.ints.copy_(torch.tensor(context[n - window + 1:] + [n - window, n]), non_blocking=True)
            pending = self._launch(key, gamma, runner, generator)
        if next_gamma is not None:  # it reads the inputs this replay advanced on the device
            next_key, next_runner = self._ahead_runner(next_gamma, window, k)
            if next_runner is not runner:
                next_runner.ints.copy_(runner.ints)
            self.pending = self._launch(next_key, next_gamma, next_runner, generator)
            self.ahead_launches += 1
        out = pending.read()  # the step's one synchronisation
        now = time.perf_counter()
        elapsed = now - max(start, pending.after) - (self.capture_time - captured)
        count, chain_accepted, alternative, lookup_kept = out[:4]
        tokens = out[4:4 + count]
        self.target.set_length(len(context) + count - 1)  # the context and every kept draft token
        self._settle_draft(n, gamma, chain_accepted)
        if self.pending is not None:  # valid if the engine goes on with all these tokens
            self.pending.length, self.pending.after = len(context) + count, now
        lookup_drafted, lookup_reach = _lookup_stats(out, self.lookup, tokens)
        return StepResult(tokens, max(gamma, lookup_drafted), count - 1, None, 0.0, elapsed, 1, bool(alternative),
                          lookup_kept, alone=alone, lookup_drafted=lookup_drafted, lookup_reach=lookup_reach)

    def _settle_draft(self, n: int, drafted: int, chain_accepted: int) -> None:
        """After a step from x_n that drafted `drafted` tokens and kept `chain_accepted` of its chain: the draft
        positions whose inputs are valid, and the draft cache's length (an upper bound of what was written)."""
        if drafted and self.features:  # true features for positions < n; later ones are redone
            self.draft_valid = n
        elif drafted:  # x_i at i up to n, then the kept chain drafts fed while drafting
            self.draft_valid = n + 1 + min(chain_accepted, drafted - 1)
        self.draft_model.set_length(max(self.draft_valid, n + drafted))

    def _advancing_body(self, body, gamma: int, window: int, size: int):
        """A draft-model `body` (ints = [x_{n-W+1..n}, n-W, n], a lookup branch of `size`) that then appends
        the tokens the step emitted to the window on the device and moves both positions on, writing the
        result back to `ints`: the next replay (launched ahead) starts there, and writes the window to the
        lookup history before it finds its branch."""
        offsets = self.offsets

        def advance(ints, out):
            """ints and a step's output [count, ..., tokens [max(γ, G) + 1], ...] -> the next step's ints."""
            count, emitted = out[0], out[4:4 + max(gamma, size) + 1]
            # [W + γ + 1] -> the last W tokens of the longer context (never past the emitted ones)
            tokens = torch.cat([ints[:window], emitted])[count + offsets[:window]]
            return torch.cat([tokens, ints[window:window + 2] + count])

        def run(ints, uniforms):
            out = body(ints, uniforms)
            ints.copy_(advance(ints, out))
            return out

        return run

    def _one_step(self, context: list[int], gamma: int, generator: torch.Generator | None,
                  plain_tokens: int = 1) -> StepResult:
        """One step, one replay read at once. `plain_tokens`: how many tokens a plain step (γ = 0) may
        produce (the engine allows more than one only for plain decoding, within max_new_tokens and
        the context)."""
        start = time.perf_counter()
        captured = self.capture_time  # a graph captured (and compiled) in this step is not its time
        n = len(context) - 1
        target_calls = 1
        # k candidates per position and the lookup branch while the tree's 1 + γk + G slots fit in the
        # cache, else a chain
        k, size = tree_that_fits(n + 1, gamma, self.candidates, self.lookup, self.target.max_seq_len)
        if gamma == 0 or n < 1:
            size = 0  # no drafting step: no lookup branch (its G tokens are found inside the graph, padded)
        if self.features and gamma > 0 and n >= 1:
            # re-read the last min(W+1, n) draft positions with true features, W the widest step (γ or
            # lookup branch) this stepper has taken: a step emits up to W+1 tokens, so every position
            # the previous step fed with predicted features lies in that window, even when a short
            # step (--gamma auto) follows a long one; no eager catch-up forward outside the graph
            self.widest = max(self.widest, gamma, size)
            window = min(self.widest + 1, n)
            self._catch_up_draft(context, n - window)
            key = ("features", gamma, window, k, size)
            runner = self.graphs.get(key) or self._prepare(
                key, lambda: self._feature_step_body(gamma, window, k, size), window + 2,
                self._draft_uniforms(gamma, k, size))
            if size:
                self._write_history(context, n - window + 1)
            ints = context[n - window + 1:] + [n - window, n]
            drafted = gamma
        elif self.draft_model is not None and not self.features and gamma > 0 and n >= 1:
            # the token draft re-reads x_{n-W+1..n}, W = the widest step's + 1 as the feature draft's window (so a
            # step run alone and one launched ahead read the same inputs), past what a catch-up left valid; a
            # context shorter than W is read from position 0, the window padded past x_n (one graph per W)
            self.widest = max(self.widest, gamma, size)
            window = self.widest + 1
            first = max(0, n - window + 1)
            self._catch_up_draft(context, first)
            key = ("model", gamma, window, k, size)
            runner = self.graphs.get(key) or self._prepare(
                key, lambda: self._model_step_body(gamma, window, k, size), window + 2,
                self._draft_uniforms(gamma, k, size))
            if size:
                self._write_history(context, first)
            ints = context[first:] + [0] * (window - (n + 1 - first)) + [first - 1, n]
            drafted = gamma
        else:
            draft = self.ngram.propose(context, gamma, None, None).tokens.tolist() if (self.ngram and gamma) else []
            drafted = len(draft)
            if drafted == 0 and gamma == 0 and self.plain_chunk > 1 and plain_tokens >= self.plain_chunk:
                # whole chunks only (the tail of a request goes one token at a time): two graphs
                target_calls = self.plain_chunk
                key = ("plain", target_calls)
                runner = self.graphs.get(key) or self._prepare(key, lambda: self._plain_body(target_calls), 2,
                                                               target_calls)
            else:
                key = ("verify", drafted)
                runner = self.graphs.get(key) or self._prepare(key, lambda: self._verify_body(drafted), drafted + 2,
                                                               drafted + 1)
            ints = context[-1:] + draft + [n]
        runner.ints.copy_(torch.tensor(ints), non_blocking=True)
        torch.rand(runner.uniforms.shape, generator=generator, device=self.device, out=runner.uniforms)
        out = runner.run().tolist()  # the step's one synchronisation
        chain_accepted, alternative, lookup_kept = 0, 0, 0  # chain tokens kept; the kept alternative's column
        if key[0] == "plain":
            num_accepted, tokens = 0, out
            self.target.set_length(n + target_calls)  # x_n and the chunk's tokens but the last
        else:
            # [count, chain kept, alternative column or 0, lookup tokens kept, emitted tokens...] (a kept
            # alternative and kept lookup tokens were moved to their cache slots inside the graph)
            count, chain_accepted, alternative, lookup_kept = out[:4]
            tokens = out[4:4 + count]
            num_accepted = count - 1
            self.target.set_length(len(context) + num_accepted)  # cache: context + accepted drafts
        if self.draft_model is not None:
            self._settle_draft(n, drafted, chain_accepted)
        elapsed = time.perf_counter() - start - (self.capture_time - captured)
        # time is not split between draft and target inside one graph; it is reported as target time
        lookup_drafted, lookup_reach = _lookup_stats(out, size, tokens)
        depth = max(drafted, lookup_drafted)  # as deep as its longer branch (the lookup's real length)
        return StepResult(tokens, depth, num_accepted, None, 0.0, elapsed, target_calls, bool(alternative), lookup_kept,
                          lookup_drafted=lookup_drafted, lookup_reach=lookup_reach)

    def _write_history(self, context: list[int], first: int) -> None:
        """Before a replay that writes the lookup history's positions first..n (its window): the tokens before
        `first` that no replay wrote since begin are copied from the host (after a plain step, the last
        step's tokens; after begin, the prompt's); then it holds the context."""
        if self.history is None:
            return
        if self.history_valid < first:
            self.history[self.history_valid:first].copy_(torch.tensor(context[self.history_valid:first]),
                                                         non_blocking=True)
        self.history_valid = len(context)

    # ---- graph bodies: (ints [int64], uniforms [float32]) -> int64 output ----------------------
    def _draft_uniforms(self, gamma: int, k: int, lookup: int = 0) -> int:
        """Uniforms of a drafting step: γ draws, then for a chain γ tests and one draw; for a tree
        the noise that draws the alternatives (γ·V, when sampling with k > 1), γ·k tests, γ + 1
        draws and the lookup branch's tests."""
        if k == 1 and not lookup:
            return 2 * gamma + 1
        noise = 0 if self.params.greedy or k == 1 else gamma * self.target.vocab_size
        return gamma + noise + gamma * k + gamma + 1 + lookup

    def _sampling(self):
        """The sampling steps for the current params, compiled if asked:
        sample(logits [V], u []) -> (probs [V], token []): the transform and one draw;
        alternatives(logits [γ, V], probs [γ, V], tokens [γ], count, noise [γ, V] | None) ->
        drafters.base.draw_alternatives;
        finish(target_logits [γ+1, V], draft_tokens [γ], draft_probs [γ, V] | None, uniforms [γ+1])
        -> out: the transform on the target's side, the rule and the emitted tokens;
        finish_candidates(target_logits [1+γk+G, V], candidates [γ, k], laws [γ, k, V] | None,
        uniforms [γk + γ + 1 + G], lookup [G] | None, lookup_length []) -> (out, the emitted tokens'
        tree nodes [max(γ, G)]). out = [count, chain kept, alternative column or 0, lookup kept,
        emitted tokens [max(γ, G) + 1]] (acceptance.emitted_tokens: the first `count` are emitted);
        and with a lookup branch find_lookup(history [max_seq_len], length []) -> the lookup branch [G + 1]
        (ngram.device_continuation: its tokens padded, then its length)."""
        if self.compile_sampling not in self.samplers:
            params = self.params

            def sample(logits, uniform):
                probs = logits_to_probs(logits, params)
                return probs, sample_from(probs, uniform, params.greedy)  # greedy: the one-hot's argmax

            def alternatives(logits, probs, token, count, noise):
                return draw_alternatives(logits, probs, token, count, params.greedy, noise)

            def finish(target_logits, draft_tokens, draft_probs, uniforms):
                gamma = draft_tokens.shape[0]
                verdict = verify(draft_tokens, draft_probs, logits_to_probs(target_logits, params),
                                 uniforms[:gamma], uniforms[gamma], params.greedy)
                emitted = emitted_tokens(draft_tokens[:, None], verdict.num_accepted, verdict.next_token)
                none = torch.zeros_like(verdict.num_accepted)
                return torch.cat([torch.stack([emitted.count, verdict.num_accepted, none, none]), emitted.tokens])

            def finish_candidates(target_logits, candidates, laws, uniforms, lookup, lookup_length):
                gamma, k = candidates.shape
                draws = uniforms[gamma * k: gamma * k + gamma + 1]
                verdict = verify_candidates(candidates, laws, logits_to_probs(target_logits, params),
                                            uniforms[: gamma * k].view(gamma, k), draws, lookup, lookup_length,
                                            uniforms[gamma * k + gamma + 1:], params.greedy)
                emitted = emitted_tokens(candidates, verdict.num_accepted, verdict.next_token, verdict.alternative,
                                         lookup, verdict.lookup_kept)
                head = torch.stack([emitted.count, verdict.num_accepted, verdict.alternative, verdict.lookup_kept])
                return torch.cat([head, emitted.tokens]), emitted.nodes

            functions = (sample, alternatives, finish, finish_candidates)
            if self.lookup:
                size, (max_ngram, min_ngram) = self.lookup, self.lookup_ngram

                def find_lookup(history, length):
                    return device_continuation(history, length, size, max_ngram, min_ngram)

                functions += (find_lookup,)
            if self.compile_sampling:
                functions = tuple(_compiled_or_eager(f, self.eager_sampling) for f in functions)
            self.samplers[self.compile_sampling] = functions
        return self.samplers[self.compile_sampling]

    def _draft_and_verify(self, gamma: int, k: int, size: int, logits, uniforms, feed, root, start, lookup):
        """The part shared by the model and feature bodies: draw the chain (and alternatives) from
        the draft's logits [V] and `feed`, score it (and the lookup branch: lookup [G + 1], its G
        tokens padded and its length, or None) with the target from the root token [1] at position `start`
        [], apply the rule, and move the kept nodes off the chain to the cache slots of their positions.
        -> out (_sampling's), then the lookup branch [G + 1] where there is one (the host's stats read it)."""
        sample, alternatives, finish, finish_candidates = self._sampling()[:4]
        draws, rest = uniforms[:gamma], uniforms[gamma:]
        draft_tokens, draft_probs, draft_logits = sample_chain(logits, draws, feed, sample)
        if k == 1 and not size:
            return finish(self.score(torch.cat([root, draft_tokens]), start), draft_tokens, draft_probs, rest)
        candidates, laws = draft_tokens[:, None], draft_probs[:, None]  # [γ, 1], [γ, 1, V]
        if k > 1:
            vocab = self.target.vocab_size
            noise = None
            if not self.params.greedy:
                noise, rest = rest[: gamma * vocab].view(gamma, vocab), rest[gamma * vocab:]
            others, others_laws = alternatives(draft_logits, draft_probs, draft_tokens, k - 1, noise)  # all depths
            candidates = torch.cat([draft_tokens[:, None], others], 1)  # [γ, k]
            laws = None if others_laws is None else torch.cat([draft_probs[:, None], others_laws], 1)
        branch, length = (lookup[:size], lookup[size]) if size else (None, 0)
        target_logits = self.score(tree_tokens(root, candidates, branch), start, (gamma, k, size))
        out, nodes = finish_candidates(target_logits, candidates, laws, rest, branch, length)
        # emitted token i sits at node nodes[i] and belongs in slot start + i + 1 (chain tokens and the
        # padding past the kept ones are there already: they copy onto themselves)
        self.target.move_slot(start + nodes, start + 1 + self.offsets[: nodes.shape[0]])
        return torch.cat([out, lookup]) if size else out

    @torch.inference_mode()
    def score(self, tokens: torch.Tensor, start: torch.Tensor, tree: tuple[int, int, int] | None = None
               ) -> torch.Tensor:
        """The target's logits [T, V] for tokens [T] from position `start` ([] or [1], on the device):
        a chain at start.., or the tree candidate_tree(*tree) rooted there; writes their K/V (and
        features) at slots start.., as every step's verification does. In bit-exact mode through
        exact_score (its layout made once per call shape)."""
        t = tokens.shape[0]
        if not self.bit_exact:
            if tree is None:
                return self.target_fn(tokens, start + self.offsets[:t])
            depths, ancestors = self.tree(*tree)
            return self.target_fn(tokens, start + depths, ancestors)
        if (t, tree) not in self.layouts:
            depths, ancestors = candidate_tree(*tree) if tree is not None else (torch.arange(t), None)
            self.layouts[t, tree] = self.layout_of(depths, ancestors)
        return self.exact_score(tokens, start, self.layouts[t, tree])

    def layout_of(self, depths: torch.Tensor, ancestors: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The layout of a bit-exact call of T tokens, on the device: models.exact_attention.exact_layout
        of depths [T] and ancestors [T, T] bool (None: a chain), and the count T (what exact_score reads)."""
        layout = exact_layout(depths, ancestors) + (torch.tensor(depths.shape[0]),)
        return tuple(x.to(self.device) for x in layout)

    def exact_score(self, tokens: torch.Tensor, start: torch.Tensor, layout: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Bit-exact mode's forward: tokens [T] from position `start` ([] or [1], on the device) laid out
        by `layout` (layout_of) -> logits [T, V]. On torch's kernels the call is padded to EXACT_WIDTH rows
        and runs exact_fn; on the triton kernels its T rows run target_fn (TritonForward.forward_exact),
        unpadded: those kernels give a row the same bits in a call of any number of rows."""
        depths, nodes, count = layout
        if self.kernels == "triton":
            t = tokens.shape[0]
            return self.target_fn(tokens, start.reshape(()) + depths[:t], nodes[:t])
        keys = exact_keys(start.reshape(()), depths, nodes, count, self.target.max_seq_len)
        padded = torch.cat([tokens, tokens.new_zeros(EXACT_WIDTH - tokens.shape[0])])  # fresh tensors: one graph
        return self.exact_fn(padded, keys.positions, keys.slots, keys.start, keys.table, keys.count)[:tokens.shape[0]]

    def tree(self, gamma: int, k: int, lookup: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """acceptance.candidate_tree on the device, made once per (γ, k, G): graphs read it in place."""
        if (gamma, k, lookup) not in self.trees:
            self.trees[gamma, k, lookup] = tuple(t.to(self.device) for t in candidate_tree(gamma, k, lookup))
        return self.trees[gamma, k, lookup]

    def _model_step_body(self, gamma: int, window: int, k: int, size: int):
        draft_fn = self.draft_fn
        offsets = self.offsets

        def body(ints, uniforms):
            # ints = [x_{s..s+W-1}, s-1, n], s = n-W+1 (the feature body's layout) or, for
            # a context shorter than W, s = 0 and the window padded past x_n. A token draft holds x_i at position
            # i; it re-reads the window (positions whose drafts the last step fed, or the kept run of a tree, get
            # the emitted tokens; padding past x_n is written over by the drafts it feeds, and no position reads a
            # later one), then feeds γ-1 drafts at n+1..
            window_tokens, starts = ints[:window], ints[window:window + 2]
            # x_n's row: W-1, or n for a padded window (clamped: a capture's warm-up call reads zeros)
            last = (starts[1] - starts[0] - 1).clamp(0, window - 1).view(1)
            logits = draft_fn(window_tokens, starts[0] + 1 + offsets[:window]).index_select(0, last)[0]

            def feed(token, i):
                return draft_fn(token.view(1), starts[1] + 1 + offsets[i : i + 1])[-1]

            return self._draft_and_verify(gamma, k, size, logits, uniforms, feed, window_tokens.index_select(0, last),
                                          starts[1], self._lookup_branch(ints, window) if size else None)

        return body

    def _feature_step_body(self, gamma: int, window: int, k: int, size: int):
        draft_fn, features, offsets = self.draft_fn, self.target.features, self.offsets

        def body(ints, uniforms):
            # ints = [x_{n-W+1..n}, n-W, n]: draft positions n-W..n-1 re-read
            # them with the true features f_{n-W..n-1}
            window_tokens, starts = ints[:window], ints[window:window + 2]
            positions = starts[0] + offsets[:window]
            logits, predicted = draft_fn(window_tokens, features.index_select(0, positions), positions)
            feature = predicted[-1:]

            def feed(token, i):  # draft position n+i reads (x̂_{n+i+1}, f̂_{n+i})
                nonlocal feature
                logits, feature = draft_fn(token.view(1), feature, starts[1] + offsets[i : i + 1])
                return logits[-1]

            # the target reads [x_n, drafts] from position n
            return self._draft_and_verify(gamma, k, size, logits[-1], uniforms, feed, window_tokens[-1:], starts[1],
                                          self._lookup_branch(ints, window) if size else None)

        return body

    def _lookup_branch(self, ints: torch.Tensor, window: int) -> torch.Tensor:
        """A drafting body's lookup branch [G + 1] (its tokens padded, then its length), ints = [x_{s..s+W-1},
        s-1, n] (either body's layout): the window's tokens are written to the history first (positions
        s..s+W-1; a token draft's padding past x_n is written over later), then the branch of history[:n+1]."""
        tokens, starts = ints[:window], ints[window:window + 2]
        self.history.index_copy_(0, starts[0] + 1 + self.offsets[:window], tokens)
        return self._sampling()[4](self.history, starts[1] + 1)

    def _verify_body(self, drafted: int):
        finish = self._sampling()[2]

        def body(ints, uniforms):
            # ints = [x_n, d_1..d_γ', n]: the target verifies a deterministic draft (or none)
            tokens, start = ints[: drafted + 1], ints[drafted + 1]
            return finish(self.score(tokens, start), tokens[1:], None, uniforms)

        return body

    def _plain_body(self, count: int):
        sample = self._sampling()[0]

        def body(ints, uniforms):
            # ints = [x_n, n]: `count` plain decoding steps, each token fed back on the device
            token, position = ints[:1], ints[1:]
            out = []
            for i in range(count):
                token = sample(self.score(token, position + i)[0], uniforms[i])[1].view(1)
                out.append(token)
            return torch.cat(out)

        return body

    def _prepare(self, key, make_body, num_ints: int, num_uniforms: int, into: dict | None = None) -> _Runner:
        """A runner of make_body()'s function, captured as a graph where the stepper uses graphs, kept
        under `key` in `into` (default: the current params set's graphs)."""
        start = time.perf_counter()
        ints = torch.zeros(num_ints, dtype=torch.int64, device=self.device)
        uniforms = torch.zeros(num_uniforms, dtype=torch.float32, device=self.device)
        compiled_before = (self.compile_sampling, len(self.eager_sampling))
        try:
            runner = _Runner(make_body(), ints, uniforms, self.use_graphs, self.pool, self._save_caches,
                             self._restore_caches)
        except Exception as error:
            if not self.compile_sampling:
                raise
            warnings.warn(f"compiling the sampling step failed ({type(error).__name__}: {error}); "
                          "it runs eagerly inside the graph instead")
            self.compile_sampling = False
            if self.use_graphs:
                self.pool = torch.cuda.graph_pool_handle()  # a failed capture may leave the pool unusable
            runner = _Runner(make_body(), ints, uniforms, self.use_graphs, self.pool, self._save_caches,
                             self._restore_caches)
        if (self.compile_sampling, len(self.eager_sampling)) != compiled_before and any(
                graphs for graphs, _ in self.graph_sets.values()):
            # sampling went (partly) eager: the step graphs captured before replay the compiled
            # functions. Drop them (recaptured on use) so that every step length runs, and costs, the
            # same functions: `--gamma auto` prices lengths against each other.
            for graphs, _ in self.graph_sets.values():
                graphs.clear()
            if self.use_graphs:
                self.pool = torch.cuda.graph_pool_handle()  # a pool whose graphs were freed takes no capture
        (self.graphs if into is None else into)[key] = runner
        self.capture_time += time.perf_counter() - start
        return runner

    # Warm-up and capture run the body on dummy inputs, which writes K/V at low positions: save
    # and restore the caches' live prefix around them.
    # The lookup history too.
    def _save_caches(self):
        models = [m for m in (self.target, self.draft_model) if m is not None]
        return [(m, m.k_cache.clone(), m.v_cache.clone(), m.features.clone() if m.features is not None else None,
                 m.length) for m in models], None if self.history is None else self.history.clone()

    def _restore_caches(self, saved) -> None:
        caches, history = saved
        for model, k, v, features, length in caches:
            model.k_cache.copy_(k)
            model.v_cache.copy_(v)
            if features is not None:
                model.features.copy_(features)
            model.set_length(length)
        if history is not None:
            self.history.copy_(history)


def _lookup_stats(out: list[int], size: int, tokens: list[int]) -> tuple[int, int]:
    """A step's lookup branch of `size` from its output (its last G + 1 entries: the branch, its length) ->
    (the branch's length, how many of its first tokens the emitted `tokens` begin with); (0, 0) without one."""
    if not size:
        return 0, 0
    branch = out[-size - 1:]
    return branch[-1], common_prefix_length(branch[:branch[-1]], tokens)


class _Launched:
    """The replay of a step of `gamma` in flight: its output is copied to (pinned) host memory behind
    it on the stream; `read` waits for that copy only. `length` is the context length the engine
    must reach for it to be the next step (set by whoever launched it ahead); `after` the time its
    wait may start."""

    def __init__(self, key, gamma: int, runner: _Runner) -> None:
        self.key, self.gamma, self.length, self.after = key, gamma, -1, 0.0
        self.host, self.done = None, None
        output = runner.run()
        if output.device.type == "cuda":
            # two pinned buffers per runner, in turn: at most this replay and one launched ahead are unread
            if runner.host is None:
                runner.host = [torch.empty(output.shape, dtype=output.dtype, pin_memory=True) for _ in range(2)]
            self.host, runner.host = runner.host[0], runner.host[::-1]
            self.host.copy_(output, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = output.clone(), None

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()

    def read(self) -> list:
        self.wait()
        return self.host.tolist()


class _Runner:
    """A body over two static input buffers (ints, uniforms); on CUDA captured once as a graph
    and replayed."""

    def __init__(self, body, ints: torch.Tensor, uniforms: torch.Tensor, use_graphs: bool, pool, save,
                 restore) -> None:
        self.body, self.ints, self.uniforms = body, ints, uniforms
        self.graph = None
        self.host: list[torch.Tensor] | None = None  # pinned copies of the output (_Launched)
        saved = save()
        try:
            if use_graphs:  # two warm-ups: compile, autotune, allocate outside the capture
                self.graph, self.output = _capture(lambda: body(ints, uniforms), pool, warm_ups=2)
            else:
                with torch.inference_mode():  # compile now, not inside the first timed step
                    body(ints, uniforms)
        finally:
            restore(saved)

    def run(self) -> torch.Tensor:
        if self.graph is None:
            with torch.inference_mode():
                return self.body(self.ints, self.uniforms)
        self.graph.replay()
        return self.output


def _capture(call: Callable, pool, warm_ups: int) -> tuple[torch.cuda.CUDAGraph, object]:
    """call() run warm_ups times on a side stream, then captured once as a CUDA graph in `pool` ->
    (the graph, the output tensors it replays into)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(warm_ups):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # No garbage collection inside the capture: a dead stepper (a reference cycle) freed there would
    # destroy its graphs, events and pinned buffers mid-capture, which can invalidate it and leave the
    # CUDA generator marked as capturing (later draws fail with "Offset increment outside graph
    # capture"; seen once in the CUDA tests). torch.cuda.graph no longer collects first by default;
    # collection resumes once the capture is done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
            output = call()
    finally:
        if collecting:
            gc.enable()
    return graph, output
