"""The device half of a batched step (speculant.batching), eager or as CUDA graphs, and the batched prefill.

    step(contexts, gammas, params, generators)  rows 0..B-1 of the caches, one step:
        plan      the row drafter's host part (RowDrafter.plan: what each row feeds and drafts)
        draws     row b's uniforms from its own CPU generator, in the single-request order: γ'_b draft
                  uniforms (a sampling draft), then γ'_b + 1 for verification (drafters.base.row_uniforms)
        device    the drafter's batched forwards with sampling inside (RowDrafter.draft, from the drawn
                  uniforms), ONE target forward over [B, Γ + 1], RowLaws, verify_rows
        read      [B, 2 + Γ]: accepted count, next token and drafted tokens per row
        settle    the row drafter's host part after the step (RowDrafter.settle)
    prefill(contexts)   joining requests take rows 0..k-1: the target's rows (context[:-1]) and the
                        drafter's (RowDrafter.start's tokens) in one batched forward each

Two ways to run the device part, the same functions either way (drafters.base.sample_rows,
RowLaws (probs_by_row and its draws), acceptance.verify_rows, the models' row forwards):

eager (static=False)   shapes as small as the step allows: B rows, the draft's feed as long as the
                       longest row's, keys read up to the furthest position written. The draft is
                       drafters.base.propose_rows; a host read per step for the draft (its settle) and
                       one for the verdict.
static (static=True)   one function of fixed shapes per (batch bucket, Γ, params sets, logits wanted,
                       keys read): rows padded to a power of two (padding rows feed nothing: they write
                       only scratch slots), keys read up to a power of two at or past the furthest row's
                       end (at least MIN_KEYS; the causal mask hides what a row has not written: a step
                       of short rows does not read a long cache's empty slots), the draft's feed a
                       window of the engine's longest Γ + 1 tokens (a row whose feed is longer, after
                       steps in which it drafted nothing, first catches up through the prefill). Its
                       inputs, ints and uniforms, are one int64 buffer filled on the host and copied in
                       once; its output is read back once. On CUDA each function is
                       captured as ONE CUDA graph on first use and replayed (draft, verify, acceptance:
                       the whole step); on the CPU it runs eagerly, so the tests pin it to the eager step.

Compiled forwards (`compile`, off by default here; `speculant serve` turns it on where its steps
are CUDA graphs, `--no-compile` off). The models' decoder layers may run through
torch.compile (LeanModel.compile_layers: one compiled layer function serves all the layers), so that
a graph replays fused kernels rather than one per torch op; a compiler failure falls back to eager
forwards with a warning (counted: compile_fallbacks). Off by default because of what it costs:
dynamo compiles once per kind of call it meets (a first static shape, then a symbolic one, a batch or
feed of one; tests/test_row_step.py counts them), each a compile of one layer; compiling the whole
row forward instead (every layer unrolled) made each of those compiles minutes long on a GPU for a
deep model (BENCHMARKS.md, "Server"). Either way `warm_up` makes every function the engine may meet
before any request (every batch bucket × Γ × params set, every prefill (rows, tokens) bucket), on
zeros that write only scratch slots: after it, traffic compiles and captures nothing.

Sampling params inside a graph. The rows' params are grouped: a graph is keyed by the set of distinct
params of its rows (sorted, not in row order) and fed each row's index into it, and every set's
transform runs over every row, each row keeping its own (probs_by_row with a tensor of groups). The
transform stays the one function logits_to_probs with Python params (top-k, top-p, greedy are
branches of its code, not tensors), so p and q are the same transform as in the single-request
engine, with no second copy of it; the price is G transforms per step for G sets, and a graph per set
of sets met. Steps whose rows hold more than CAPTURED_PARAMS distinct params run the eager step.

Bit-exact rows (`exact`, an exact_target.ExactRows: speculant.batching's bit-exact mode): eager
steps whose target side runs row by row through the bit-exact forward on each row's own cache, and a
prefill of each joining row alone, as plain bit-exact decoding prefills; the draft stays batched.

Prefill. Joining rows always take rows 0..k-1 (the engine moves the rows there to the end), so a
prefill is one forward from row 0 whatever the batch holds: in static mode padded to a power of two
of rows and of tokens (16 at least) and captured per (rows, tokens) bucket, with the drafter's own
prefill (a draft model's prompt, a feature draft's reading of the target's features) in the same
graph; eagerly, exact shapes. Padding (tokens past a row's prompt, rows past the joining ones) writes
only the scratch slot, as in a step.
"""

from __future__ import annotations

import gc
import itertools
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from speculant.acceptance import verify_rows
from speculant.adaptive import batch_bucket
from speculant.drafters.base import RowDrafter, RowLaws, RowPlan, param_groups, propose_rows, row_uniforms
from speculant.exact_target import ExactRows
from speculant.models.base import check_fits, synchronize
from speculant.models.transformer import LeanModel, RowKVCache
from speculant.sampling import SamplingParams

CAPTURED_PARAMS = 4  # a step whose rows hold more distinct SamplingParams runs eagerly (see the docstring)
MIN_PREFILL_WIDTH = 16  # a static prefill's tokens per row: a power of two, at least this
MIN_KEYS = 256  # a static step's keys read per row: a power of two, at least this (a CPU attention block)


class RowOutcome(NamedTuple):
    """A step's result, on the host."""

    counts: list[int]  # draft tokens row b drafted (γ'_b)
    num_accepted: list[int]
    next_token: list[int]
    drafted: list[list[int]]  # row b's counts[b] draft tokens
    logits: torch.Tensor | None  # [B, Γ + 1, V]: the target's logits (when asked for); read before the next step
    draft_time: float  # seconds of the draft alone (eager steps; 0 where draft and verify run as one)


class RowStep:
    """See the module docstring. `window`: the draft's feed per row in static steps (the engine's
    longest Γ + 1: after a step that drafted, a row feeds at most its accepted tokens and the next one)."""

    def __init__(self, target: LeanModel, cache: RowKVCache, drafter: RowDrafter | None, window: int,
                 static: bool, exact: ExactRows | None = None, compile: bool = False) -> None:
        self.target, self.cache, self.drafter, self.window = target, cache, drafter, window
        if exact is not None and static:
            raise ValueError("bit-exact rows run eager steps only")
        self.static, self.exact = static, exact  # exact: the rows' caches are `cache`, run one at a time
        capture = static and target.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple, _Graph] = {}
        self.compile_fallbacks = 0  # times a compiler error turned the compiled forwards off (see _graph)
        # the models' layers through torch.compile (LeanModel.compile_layers) where asked: static
        # functions only (the eager step's shapes change with every call)
        self.compiled = bool(compile and static)
        self._compile(self.compiled)

    @property
    def captured(self) -> int:
        """CUDA graphs captured so far (0 where steps run eagerly, the CPU included)."""
        return sum(graph.graph is not None for graph in self.graphs.values())

    def _compile(self, enabled: bool) -> None:
        self.compiled = enabled
        if enabled:  # room for the shape variants (buckets, widths, prefill lengths), as the fused step
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for model in (self.target, getattr(self.drafter, "model", None)):
            if isinstance(model, LeanModel):
                model.compile_layers(enabled)

    def _graph(self, make_body: Callable[[], Callable], rows: int, columns: int, floats: int) -> _Graph:
        """A _Graph over make_body(); where compiling the row forwards fails (a compiler error at the
        warm-up), they run eagerly from then on, with a warning, and the graph is captured again."""
        try:
            return _Graph(make_body(), rows, columns, floats, self.target.device, self.pool)
        except Exception as error:  # a compiler failure: fall back to eager forwards
            if not self.compiled:
                raise
            warnings.warn(f"compiling the batched step's forwards failed ({type(error).__name__}: {error}); "
                          "they run eagerly inside the graphs instead")
            self._compile(False)
            self.compile_fallbacks += 1
            if self.pool is not None:
                self.pool = torch.cuda.graph_pool_handle()  # a failed capture may leave the pool unusable
            return _Graph(make_body(), rows, columns, floats, self.target.device, self.pool)

    # ---- the step -------------------------------------------------------------------------------

    def step(self, contexts: list[list[int]], gammas: list[int], params: list[SamplingParams],
             generators: list[torch.Generator], with_logits: bool) -> RowOutcome:
        """One step of rows 0..B-1 (contexts[b]: prompt + committed output; the caches hold
        contexts[b][:-1]); row b drafts up to gammas[b] tokens."""
        sets, group = param_groups(params)
        with torch.inference_mode():
            if self.static and len(sets) <= CAPTURED_PARAMS:
                return self._static_step(contexts, gammas, sets, group, generators, with_logits)
            return self._eager_step(contexts, gammas, sets, group, generators)

    def _eager_step(self, contexts, gammas, sets, group, generators) -> RowOutcome:
        device = self.target.device
        start = time.perf_counter()
        draft_tokens, draft_probs, counts = None, None, [0] * len(contexts)
        if self.drafter is not None and any(gammas):
            draft = propose_rows(self.drafter, contexts, gammas, [sets[g] for g in group], generators)
            draft_tokens, draft_probs, counts = draft.tokens.to(device), draft.probs, draft.counts
        synchronize(device)
        draft_time = time.perf_counter() - start
        width = max(counts)
        inputs = torch.zeros(len(contexts), width + 1, dtype=torch.int64)
        inputs[:, 0] = torch.tensor([c[-1] for c in contexts])
        inputs = inputs.to(device)
        if width:
            inputs[:, 1:] = draft_tokens[:, :width]
        starts, lengths = [len(c) - 1 for c in contexts], [n + 1 for n in counts]
        if self.exact is not None:
            logits = self.exact.forward_rows(inputs, starts, lengths)
        else:
            logits, _ = self.target.forward_rows(self.cache, inputs, starts, lengths)
        laws = RowLaws(sets, group)
        target_probs = laws(logits)  # [B, W + 1, V]
        uniforms = row_uniforms(generators, [[n + 1] for n in counts], [width + 1]).to(device)
        count_tensor = torch.tensor(counts, device=device)
        sample = uniforms[torch.arange(len(contexts), device=device), count_tensor]  # row b's draw n_b + 1
        verdict = verify_rows(inputs[:, 1:], None if draft_probs is None else draft_probs[:, :width], target_probs,
                              uniforms[:, :width], sample, count_tensor, laws.greedy)
        drafted = inputs[:, 1:].tolist()
        return RowOutcome(counts, verdict.num_accepted.tolist(), verdict.next_token.tolist(),
                          [d[:n] for d, n in zip(drafted, counts)], logits, draft_time)

    def _static_step(self, contexts, gammas, sets, group, generators, with_logits: bool) -> RowOutcome:
        rows = len(contexts)
        plan = self.drafter.plan(contexts, gammas) if self.drafter is not None and any(gammas) else None
        counts = plan.counts if plan is not None else [0] * rows
        width = max(counts)
        samples = width > 0 and self.drafter.samples
        if samples:
            plan = self._catch_up(plan)
        feed = self.window if samples else width  # a deterministic draft is its own feed
        end = max(len(c) + n for c, n in zip(contexts, counts))  # past the furthest position this step writes
        check_fits(self.target, end)
        bucket = self._rows_bucket(rows)
        graph = self._step_graph(bucket, width, feed, sets, with_logits, self._keys_read(end))
        tokens, starts = (plan.tokens, plan.starts) if plan is not None else ([[]] * rows, [0] * rows)
        ints = [[c[-1], len(c) - 1, n + 1, n, g, s, len(t), *t] + [0] * (feed - len(t))
                for c, n, g, s, t in zip(contexts, counts, group, starts, tokens)]
        uniforms = row_uniforms(generators, [[n if samples else 0, n + 1] for n in counts], [width, width + 1])
        out, logits = graph.run(ints, uniforms)
        values = out[:rows].tolist()  # the step's one read of the device
        drafted = [v[2:2 + n] for v, n in zip(values, counts)]
        if plan is not None:
            self.drafter.settle(contexts, counts, drafted)
        return RowOutcome(counts, [v[0] for v in values], [v[1] for v in values], drafted,
                          None if logits is None else logits[:rows], 0.0)

    def _step_graph(self, bucket: int, width: int, feed: int, sets: tuple[SamplingParams, ...],
                    with_logits: bool, kv_len: int) -> _Graph:
        key = ("step", bucket, width, sets, with_logits, kv_len)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._graph(
                lambda: self._step_body(bucket, width, feed, sets, with_logits, kv_len),
                bucket, _STEP_INTS + feed, bucket * (2 * width + 1))
        return graph

    def _step_body(self, bucket: int, width: int, feed: int, sets: tuple[SamplingParams, ...],
                   with_logits: bool, kv_len: int) -> Callable[[torch.Tensor], tuple]:
        """inputs (int64) -> (out [bucket, 2 + Γ], logits [bucket, Γ + 1, V] or None). Per row, ints
        [last token, n, n's row length (γ'_b + 1; 0: a padding row), γ'_b, params group, feed start,
        feed length, feed tokens [feed]], then float32 uniforms [bucket, 2Γ + 1]: Γ draft, Γ + 1
        verification. Keys are read up to kv_len (a _keys_read bucket) in the target and the draft."""
        columns = _STEP_INTS + feed

        def body(inputs: torch.Tensor) -> tuple:
            ints = inputs[:bucket * columns].view(bucket, columns)
            uniforms = inputs[bucket * columns:].view(torch.float32)[:bucket * (2 * width + 1)].view(bucket, -1)
            counts = ints[:, 3]
            laws = RowLaws(sets, ints[:, 4])
            tokens, draft_probs = ints[:, :1], None
            if width:
                drafted, draft_probs = self.drafter.draft(ints[:, _STEP_INTS:], ints[:, 5], ints[:, 6], counts,
                                                          uniforms[:, :width], laws, kv_len)
                tokens = torch.cat([tokens, drafted], 1)  # [B, Γ + 1]
            logits, _ = self.target.forward_rows_static(self.cache, tokens, ints[:, 1], ints[:, 2], kv_len)
            verify = uniforms[:, width:]  # [B, Γ + 1]: row b's first counts[b] test drafts, the next draws
            verdict = verify_rows(tokens[:, 1:], draft_probs, laws(logits), verify[:, :width],
                                  verify.gather(1, counts[:, None])[:, 0], counts, laws.greedy)
            out = torch.cat([verdict.num_accepted[:, None], verdict.next_token[:, None], tokens[:, 1:]], 1)
            return out, logits if with_logits else None

        return body

    def _catch_up(self, plan: RowPlan) -> RowPlan:
        """A row whose feed is longer than the window (it drafted nothing for some steps) feeds all but
        the window's last tokens first, through the prefill."""
        extra = [max(len(t) - self.window, 0) for t in plan.tokens]
        if not any(extra):
            return plan
        self._prefill(None, [t[:e] for t, e in zip(plan.tokens, extra)], plan.starts)
        return RowPlan([t[e:] for t, e in zip(plan.tokens, extra)], [s + e for s, e in zip(plan.starts, extra)],
                       plan.counts)

    # ---- joining rows -----------------------------------------------------------------------------

    def prefill(self, contexts: list[list[int]]) -> None:
        """Requests with these contexts (prompts) take rows 0..k-1: the target's rows get context[:-1],
        the drafter's rows what its start gives."""
        draft = [self.drafter.start(b, c) for b, c in enumerate(contexts)] if self.drafter is not None else None
        with torch.inference_mode():
            if self.exact is not None:  # each row alone, as plain bit-exact decoding prefills; then the draft
                for b, context in enumerate(contexts):
                    self.exact.prefill(b, context[:-1])
                self._prefill(None, draft, [0] * len(contexts))
            else:
                self._prefill([c[:-1] for c in contexts], draft, [0] * len(contexts))

    def _prefill(self, target: list[list[int]] | None, draft: list[list[int]] | None, draft_starts: list[int]) -> None:
        """Rows 0..k-1: the target's feed target[b] from position 0, the drafter's draft[b] from
        draft_starts[b] (None: that side feeds nothing)."""
        rows = len(draft_starts)
        target_lengths = [len(t) for t in target] if target is not None else [0] * rows
        draft_lengths = [len(t) for t in draft] if draft is not None else [0] * rows
        with_target, with_draft = any(target_lengths), any(draft_lengths)
        if not (with_target or with_draft):
            return
        longest = max(target_lengths + draft_lengths)
        ends = [s + n for s, n in zip(draft_starts, draft_lengths)] + target_lengths
        if self.static:
            bucket, width = self._rows_bucket(rows), self._prefill_width(longest)
            kv_len = self.target.max_seq_len if any(draft_starts) else width
        else:
            bucket, width, kv_len = rows, longest, max(ends)
        graph = self._prefill_graph(bucket, width, kv_len, with_target, with_draft)
        ints = []
        for b in range(rows):
            row_target = target[b] if target is not None else []
            row_draft = draft[b] if draft is not None else []
            ints.append([len(row_target), draft_starts[b], len(row_draft), *row_target, *[0] * (width - len(row_target)),
                         *row_draft, *[0] * (width - len(row_draft))])
        graph.run(ints, None)

    def _prefill_graph(self, bucket: int, width: int, kv_len: int, with_target: bool, with_draft: bool) -> _Graph:
        key = ("prefill", bucket, width, kv_len, with_target, with_draft)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._graph(lambda: self._prefill_body(bucket, width, kv_len, with_target, with_draft), bucket,
                                _PREFILL_INTS + 2 * width, 0)
            if self.static:  # eager shapes change with every join: nothing to keep
                self.graphs[key] = graph
        return graph

    # ---- warm-up ------------------------------------------------------------------------------------

    def warm_up(self, widths: list[int], sets: list[tuple[SamplingParams, ...]], max_rows: int,
                max_prompt: int | None = None) -> int:
        """Make every static function that steps of up to `max_rows` rows at these widths (Γ) and
        params sets, and prefills of prompts up to `max_prompt` tokens (default: the context), may
        meet, before any request: on CUDA each is captured (the compiles of the row forwards happen
        here too); on the CPU each runs once, eagerly. Every input is zeros, so every row has length
        0 and writes only the scratch slots: no row's cache or drafter state changes. Returns the
        number of functions made (those that existed already not counted)."""
        if not self.static:
            raise ValueError("warm_up makes the static functions of graphs=True; eager steps have none")
        before = len(self.graphs)
        top = self._rows_bucket(max_rows)
        buckets = sorted({min(1 << i, top) for i in range(top.bit_length() + 1)})
        samples = self.drafter is not None and self.drafter.samples
        with torch.inference_mode():
            keys = sorted({self._keys_read(n) for n in range(1, self.target.max_seq_len + 1)})
            for bucket, width, params, kv_len in itertools.product(
                    buckets, widths if self.drafter is not None else [0], sets, keys):
                self._warm(self._step_graph(bucket, width, self.window if samples and width else width, params,
                                            False, kv_len))
            longest = min(max_prompt or self.target.max_seq_len, self.target.max_seq_len)
            prefill_widths = sorted({self._prefill_width(n) for n in range(1, longest + 1)})
            # (with target, with draft, a catch-up's keys over the whole context): joins, with and without
            # the draft's prompt (a prompt of one token has neither), and the catch-up of a sampling draft
            kinds = [(True, False, False)] + ([(True, True, False), (False, True, False), (False, True, True)]
                                              if samples else [])
            for bucket in buckets:
                for width in prefill_widths:
                    for with_target, with_draft, catch_up in kinds:
                        kv_len = self.target.max_seq_len if catch_up else width
                        self._warm(self._prefill_graph(bucket, width, kv_len, with_target, with_draft))
            synchronize(self.target.device)
        return len(self.graphs) - before

    def _rows_bucket(self, rows: int) -> int:
        """The rows a static step or prefill of `rows` rows runs: a power of two, at most the cache's."""
        return min(batch_bucket(rows), self.cache.rows)

    def _keys_read(self, end: int) -> int:
        """The keys a static step reads per row when its rows end by `end`: a power of two, at least
        MIN_KEYS, at most the cache's."""
        return min(max(MIN_KEYS, batch_bucket(end)), self.target.max_seq_len)

    def _prefill_width(self, tokens: int) -> int:
        """The tokens per row of a static prefill whose longest row has `tokens`: a power of two, at
        least MIN_PREFILL_WIDTH, at most the context."""
        return min(max(MIN_PREFILL_WIDTH, batch_bucket(tokens)), self.target.max_seq_len)

    @staticmethod
    def _warm(graph: _Graph) -> None:
        """Run a function just made once on its zeros, where nothing captured it (the CPU): its
        compiles happen now. A captured graph ran at its capture."""
        if graph.graph is None and not graph.warm:
            graph.body(graph.inputs)
            graph.warm = True

    def _prefill_body(self, bucket: int, width: int, kv_len: int, with_target: bool,
                      with_draft: bool) -> Callable[[torch.Tensor], None]:
        """inputs (int64): per row [target length, draft start, draft length, target tokens [width],
        draft tokens [width]]."""
        columns = _PREFILL_INTS + 2 * width

        def body(inputs: torch.Tensor) -> None:
            ints = inputs[:bucket * columns].view(bucket, columns)
            if with_target:
                self.target.forward_rows_static(self.cache, ints[:, 3:3 + width], torch.zeros_like(ints[:, 0]),
                                                ints[:, 0], kv_len, with_logits=False)
            if with_draft:
                self.drafter.prefill(ints[:, 3 + width:], ints[:, 1], ints[:, 2], kv_len)

        return body

_STEP_INTS = 7  # a step's ints per row before the draft's feed tokens (see RowStep._step_body)
_PREFILL_INTS = 3  # a prefill's ints per row before its tokens (see RowStep._prefill_body)


class _Graph:
    """A body over one int64 input buffer: `rows` rows of `columns` ints, then `floats` float32
    uniforms in the same bytes, so the host fills one (pinned) buffer and copies it in once. Run
    eagerly, or, given a graph memory pool (CUDA), captured once and replayed. The body's output is
    the graph's: read it before the next replay."""

    def __init__(self, body: Callable[[torch.Tensor], object], rows: int, columns: int, floats: int,
                 device: torch.device, pool) -> None:
        self.body, self.rows, self.columns, self.floats = body, rows, columns, floats
        size = rows * columns + (floats + 1) // 2
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=pool is not None)  # pinned: copied in async
        self.inputs = torch.zeros(size, dtype=torch.int64, device=device) if device.type != "cpu" else self.host
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = False  # the body ran on zeros (RowStep.warm_up)
        if pool is not None:
            self._record(pool)

    def _record(self, pool) -> None:
        # the inputs are zeros: every row has length 0, so warm-up and capture write only scratch slots
        device = self.inputs.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            self.body(self.inputs)  # warm-up outside the graph: kernels and workspaces initialised
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # no garbage collection inside the capture (see fused._Runner: a dead object's CUDA resources
        # freed mid-capture can invalidate it)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
                self.output = self.body(self.inputs)
        finally:
            if collecting:
                gc.enable()

    def run(self, ints: list[list[int]], uniforms: torch.Tensor | None):
        """ints: rows 0..k-1's ints (padding rows get zeros: length 0); uniforms [k, floats ÷ rows]."""
        count = len(ints)
        host = self.host[:self.rows * self.columns].view(self.rows, self.columns)
        host[:count] = torch.tensor(ints, dtype=torch.int64)
        if count < self.rows:
            host[count:] = 0
        if uniforms is not None:
            self.host[self.rows * self.columns:].view(torch.float32)[:self.floats].view(self.rows, -1)[:count] = uniforms
        if self.inputs is not self.host:
            self.inputs.copy_(self.host, non_blocking=self.graph is not None)  # the step's one copy in
        if self.graph is None:
            return self.body(self.inputs)
        self.graph.replay()
        return self.output

