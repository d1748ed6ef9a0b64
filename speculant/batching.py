"""Continuous batching of speculative requests: many requests, one target forward per step.

    add(request)      the request waits for a free row; the requests that get one in a step take rows
                      0..k-1 (the rows there move to the end) and are prefilled together, one batched
                      forward from row 0 (speculant.row_step), before the step
    step()            rows 0..B-1 are the running requests, packed:
                        γ        one Γ for the step (fixed, or `LoadGamma` from a table of step costs
                                 at this batch size), cut per row to what that row may still emit
                        draft    the row drafter drafts every row at once: one batched draft forward
                                 per draft position, sampling from uniforms drawn before it (n-gram:
                                 one lookup per row, on the host)
                        verify   ONE target forward over [B, Γ+1] tokens: row b holds its last
                                 committed token and its γ'_b draft tokens at its own positions
                                 (padding writes a scratch slot and is never read)
                        accept   acceptance.verify_rows: acceptance.verify row by row, vectorised (the
                                 test pins it to acceptance.verify token for token)
                        commit   stop tokens and max_new_tokens as speculant.engine does; finished
                                 rows leave, the last row moves into the hole (rows stay packed)
    cancel(id)        the row is freed at once

The caches (models.transformer.RowKVCache) have a row dimension: [layers, rows, KV, S + 1, D]. Each
row is position-indexed like the single-request cache, so rollback stays free: a row's valid length
is its committed context minus one, later writes overwrite rejected slots, the causal mask hides them.

Exactness per request. Row b draws its uniforms only from its own torch.Generator (seeded by the
request's seed, on the CPU), in the order the single-request engine draws them: γ_b draft uniforms
(a sampling draft), then γ'_b + 1 for verification. No neighbour changes which uniforms a request
gets, and every computation is per row (attention masks keep rows apart), so a request's output law
is the single-request law, and its tokens are the same alone or batched up to float rounding of
different batch shapes (equal in float32 in the tests). On the CPU the draws are even those of
speculant.engine.generate with a CPU generator of the same seed, so the outputs agree token for
token; on CUDA generate draws on the device's generator, a different stream (same law). With a
fixed γ that holds for every request; under `auto` the γ of a step depends on the batch (its size,
the rows' acceptance), so a seeded request's tokens may differ alone and batched, while its law does
not: γ is chosen before the draft exists, from past steps only, and every step is exact given γ. No
clock enters that choice, so the same requests, added the same way, give the same tokens on every run.

The step over rows is the shape of the Stepper protocol (issue 17): `step()` maps (rows, Γ) to
per-row tokens through calls that take rows, not one request: the row drafter's (RowDrafter.plan on
the host, .draft on the device, .settle on the host), LeanModel.forward_rows, verify_rows. A single
request is the case B = 1. This module is the host's half (admission, Γ, commit, statistics);
speculant.row_step runs the device's half, eagerly (exact shapes) or, with `graphs=True`, as one
static function per (batch bucket, Γ, sampling params) that CUDA captures as ONE graph holding the
draft, the verification and the acceptance, fed by one copy in and read by one copy out per step (on
the CPU the same padded function runs eagerly, and the tests pin it to the eager step).

γ under load (`LoadGamma`). A padded step costs what its longest row costs, so one Γ serves all rows
(per-row lengths differ only where a row is near its end). The policy prices a step of B rows at Γ
by a fixed table, adaptive.BatchStepCosts (seconds by batch bucket, B rounded up to a power of two,
and Γ), measured once per machine, model pair and engine settings through the engine's own step and
kept in the cache (speculant.calibrate, through Speculant.batch_engine; an engine given no policy
uses adaptive.nominal_batch_costs), and picks Γ maximising expected tokens per second, Σ_b E_b(Γ) /
T(B, Γ), with E_b from each row's acceptance rate. As B grows the target forward turns compute bound,
T(B, Γ) grows with Γ, and Γ shrinks, down to 0 = plain batched decoding. The step times the engine
reads are statistics only (GenerationStats): how long a step took never changes a Γ.

Scope. The target is a LeanModel. Row drafters exist for n-gram lookup (NgramDrafter.rows), a lean
draft model (ModelDrafter.rows: a model, layers:N, a distilled draft) and the feature draft
(FeatureDrafter.rows); hierarchical chains, several candidates per position and the lookup branch
run single-request only (Speculant.batch_engine refuses them with a clear error).

A lone request (`solo`, under `auto`). While one request is all the engine holds, it runs the
single-request engine instead (a SoloSteps factory: speculant.api.Speculant.solo_steps, the fused
step on CUDA with its own γ policy), from its context so far, drawing from a seed taken from its own
generator; when another request comes, the solo run is closed and the request joins the batch, its
context prefilled into a row. Every step, solo or batched, is an exact step given the context, so
the law is unchanged; which engine ran a step depends on the other requests, as Γ does under `auto`.

Bit-exact mode (`exact`, an exact_target.ExactTarget): every row's cache is laid out as the model's
own (exact_target.ExactRows) and its prefill and verification run through the bit-exact forward with
that cache swapped into the model, one row at a time, so a request's logits are the bits it gets
alone: its greedy tokens do not depend on its neighbours, and are plain bit-exact decoding's (the
same prefill and forward as a FusedStepper(bit_exact=True)). The draft still runs batched: it only
proposes. A step then costs one exact forward per row (EXACT_WIDTH rows each) instead of one for the
batch: throughput no longer grows with the batch on the target's side. Eager steps only (no graphs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from speculant.adaptive import BatchStepCosts, batch_bucket, nominal_batch_costs
from speculant.analysis import GenerationStats, position_gains
from speculant.drafters.base import RowDrafter
from speculant.engine import Step, check_request
from speculant.exact_target import ExactRows, ExactTarget
from speculant.models.base import synchronize
from speculant.models.transformer import LeanModel, RowKVCache
from speculant.row_step import RowStep
from speculant.sampling import SamplingParams
from speculant.step import StepResult


@dataclass(frozen=True)
class BatchRequest:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()  # stop tokens (eos); stop strings are the server's job
    seed: int | None = None  # a request's random draws come only from its own generator
    logprobs: int | None = None  # None: none; k >= 0: each emitted token's log-prob + the top-k


@dataclass
class RowUpdate:
    request_id: int
    tokens: list[int]  # tokens fixed by this step for this request (may be empty)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None  # per token: (logprob, top-k [(id, logprob)])
    finished: str | None  # None, "stop", "length", "context", "cancelled"
    stats: GenerationStats


# ---- γ under load -----------------------------------------------------------------------------------


class LoadGamma:
    """Chooses the step's Γ from a table of step costs T(B, Γ) (speculant.adaptive.BatchStepCosts) and
    the rows' acceptance rates: Γ* = argmax over Γ = 0..max_gamma of Σ_b E(Γ, α_b) / T(B, Γ), E(Γ, α) = 1 + α
    + ... + α^Γ. α_b is row b's accepted ÷ tested drafts, shrunk towards the pooled rate of all rows
    with weight `prior_weight` tested tokens; the pooled rate starts at `prior_alpha` (with that
    weight) and ages with half-life `half_life` steps that tested drafts.

    Probes. A plain step tests no draft, so while Γ* = 0 the acceptance estimates stand still, and a
    drafter whose acceptance rose (other requests, other text) would stay off for good. So after
    `probe_every` plain steps in a row, and late enough that its priced loss (its time beyond what plain
    steps take for the tokens it is expected to make) is at most `explore` of the plain steps' time
    since the last probe, a step asks for the best Γ >= 1.

    No clock is read: Γ depends only on the batch size, the table and what the rows (and the steps
    before them on this policy) drafted and kept."""

    def __init__(self, costs: BatchStepCosts, max_gamma: int | None = None, prior_alpha: float = 0.6,
                 prior_weight: float = 8.0, half_life: float = 8.0, probe_every: int = 32,
                 explore: float = 0.02) -> None:
        if not isinstance(costs, BatchStepCosts):
            raise ValueError(f"costs must be a BatchStepCosts table, got {type(costs).__name__}")  # noqa: TRY004
        max_gamma = costs.max_gamma if max_gamma is None else max_gamma
        if not 1 <= max_gamma <= costs.max_gamma:
            raise ValueError(f"max_gamma must be in 1..{costs.max_gamma} (the step-cost table's), got {max_gamma}")
        if not 0.0 <= prior_alpha < 1.0:
            raise ValueError(f"prior_alpha must be in [0, 1), got {prior_alpha}")
        if not 0.0 < explore < 1.0:
            raise ValueError(f"explore must be in (0, 1), got {explore}")
        self.costs = costs
        self.max_gamma = max_gamma
        self.prior_weight = prior_weight
        self.decay = 0.5 ** (1.0 / half_life)
        self.probe_every = max(1, probe_every)
        self.explore = explore
        self.pooled = [prior_alpha * prior_weight, prior_weight]  # accepted, tested (aged)
        self.plain_run = 0  # plain steps chosen since the last step that drafted

    @property
    def pooled_alpha(self) -> float:
        return self.pooled[0] / self.pooled[1]

    def expected(self, rows: int, counts: list[tuple[int, int]]) -> tuple[list[float], list[float]]:
        """(expected tokens, seconds) of a step of `rows` rows at Γ = 0..max_gamma; counts[b] =
        (accepted, tested) draft tokens of row b so far."""
        if rows < 1 or len(counts) != rows:
            raise ValueError(f"a step needs (accepted, tested) counts for each of its rows: {rows} rows, "
                             f"{len(counts)} counts")
        pooled = self.pooled_alpha
        alphas = [(a + self.prior_weight * pooled) / (t + self.prior_weight) for a, t in counts]
        gammas = range(self.max_gamma + 1)
        tokens = [sum((1 - a ** (gamma + 1)) / (1 - a) if a < 1 else gamma + 1.0 for a in alphas) for gamma in gammas]
        return tokens, [self.costs.cost(rows, gamma) for gamma in gammas]

    def best(self, rows: int, counts: list[tuple[int, int]]) -> int:
        """The Γ of most expected tokens per second (the smallest of equals)."""
        tokens, seconds = self.expected(rows, counts)
        return max(range(self.max_gamma + 1), key=lambda gamma: tokens[gamma] / seconds[gamma])

    def choose(self, rows: int, counts: list[tuple[int, int]]) -> int:
        """Γ for a step of `rows` rows (counts as for `expected`): the best, or a probe (see Probes)."""
        tokens, seconds = self.expected(rows, counts)
        rate = [t / s for t, s in zip(tokens, seconds)]
        best = max(range(self.max_gamma + 1), key=rate.__getitem__)
        if best:
            self.plain_run = 0
            return best
        self.plain_run += 1
        probe = max(range(1, self.max_gamma + 1), key=rate.__getitem__)
        loss = seconds[probe] - tokens[probe] / tokens[0] * seconds[0]  # >= 0: plain is the best
        if self.plain_run >= max(self.probe_every, loss / (self.explore * seconds[0])):
            self.plain_run = 0
            return probe
        return 0

    def observe(self, accepted: int, tested: int) -> None:
        """A step's rows accepted `accepted` of `tested` draft tokens (tokens after a row's first
        rejection are not tested). No time: costs come from the table."""
        if not 0 <= accepted <= tested:
            raise ValueError(f"accepted draft tokens must be in 0..tested ({tested}), got {accepted}")
        if tested:
            self.pooled = [self.decay * self.pooled[0] + accepted, self.decay * self.pooled[1] + tested]


# ---- the engine ---------------------------------------------------------------------------------------


@dataclass
class _Row:
    request_id: int
    request: BatchRequest
    generator: torch.Generator
    context: list[int]
    stats: GenerationStats
    stop: frozenset[int]
    decode_start: float = 0.0
    steps: Iterator[Step] | None = None  # the single-request engine's steps while the request runs solo
    seen: dict | None = None  # the solo steps' counters already added to `stats`


@dataclass(frozen=True)
class WarmUp:
    """What BatchEngine.warm_up did."""

    seconds: float
    functions: int  # static functions made by the warm-up (step and prefill buckets)
    captured: int  # CUDA graphs the engine holds after it (0 on the CPU)


def check_max_batch(max_batch) -> None:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")


class BatchEngine:
    """Continuous batching over a lean target (see the module docstring).

    drafter_factory(max_rows, target_cache) -> RowDrafter (e.g. NgramDrafter().rows,
    ModelDrafter(draft).rows, FeatureDrafter(draft, target).rows), or None for plain decoding.
    gamma: an int >= 0 (0: plain decoding) or "auto" (`policy`, a LoadGamma over a table of step costs
    covering max_batch rows; without one, over nominal_batch_costs); max_batch: rows that run at once
    (more requests wait their turn); graphs: each step as one CUDA graph per (batch bucket, Γ, params
    sets), prefills per (rows, tokens) bucket (speculant.row_step, static; on the CPU the same padded
    static functions, eager); compile: the models' row forwards in those functions through
    torch.compile (off by default here, since it costs a warm-up of compiles; `speculant serve` turns
    it on where its steps are CUDA graphs: see speculant.row_step). exact: bit-exact mode, an
    ExactTarget over `target`: each row's prefill and verification run through it on the row's own
    cache (exact_target.ExactRows), one row at a time, so a request's logits are those it gets alone."""

    def __init__(self, target: LeanModel, drafter_factory: Callable[[int, RowKVCache], RowDrafter] | None,
                 gamma: int | str = 4, max_batch: int = 64, policy: LoadGamma | None = None,
                 graphs: bool = False, exact: ExactTarget | None = None, compile: bool = False,
                 solo: SoloSteps | None = None) -> None:
        if not isinstance(target, LeanModel):
            raise ValueError("batched decoding needs a lean target (llama / gemma3 families)")  # noqa: TRY004
        if exact is not None and (exact.model is not target or graphs):
            raise ValueError("bit-exact batching runs the target's own ExactTarget, one row at a time, without "
                             "graphs")
        check_max_batch(max_batch)
        if gamma == "auto":
            self.policy: LoadGamma | None = policy or LoadGamma(
                nominal_batch_costs(max_batch, device_type=target.device.type))
            if self.policy.costs.max_rows < batch_bucket(max_batch):
                raise ValueError(f"the policy's step-cost table covers batches of up to {self.policy.costs.max_rows} "
                                 f"rows; the engine runs up to {max_batch}")
            self.gamma = self.policy.max_gamma
        elif isinstance(gamma, int) and not isinstance(gamma, bool) and gamma >= 0:
            self.policy, self.gamma = None, gamma
        else:
            raise ValueError(f"gamma must be an integer >= 0 or 'auto', got {gamma!r}")
        self.target = target
        self.max_batch = max_batch
        # bit-exact mode: rows laid out as the model's own cache, run one at a time through `exact`
        self.exact = ExactRows(exact, max_batch) if exact is not None else None
        self.cache = self.exact if self.exact is not None else target.new_row_cache(max_batch)
        drafter = drafter_factory(max_batch, self.cache) if drafter_factory is not None and self.gamma else None
        if drafter is None:
            self.gamma, self.policy = 0, None
        self.row_step = RowStep(target, self.cache, drafter, self.gamma + 1, static=graphs, exact=self.exact,
                                compile=compile)
        if solo is not None and (self.policy is None or exact is not None):
            raise ValueError("a lone request runs solo (the single-request engine) only under gamma 'auto', "
                             "not in bit-exact mode")
        self.solo_steps = solo
        self.solo: _Row | None = None  # the one request, running solo
        self.rows: list[_Row] = []  # running, packed: row b sits in cache row b
        self.waiting: list[_Row] = []
        self.pending: list[RowUpdate] = []  # cancellations, reported by the next step
        self._next_id = 0

    @property
    def drafter(self) -> RowDrafter | None:
        """The row drafter (its state is the rows'), kept by the row step that drafts with it."""
        return self.row_step.drafter

    @property
    def num_running(self) -> int:
        """Requests not finished: running rows and those waiting for a row."""
        return len(self.rows) + len(self.waiting) + (self.solo is not None)

    def warm_up(self, params: list[SamplingParams] | None = None, max_prompt: int | None = None) -> WarmUp:
        """Make, before any request, every static function (CUDA: graph, and the compiles of the row
        forwards it holds) that steps and prefills may meet (graphs=True): steps of every batch bucket up
        to max_batch at every Γ in 0..the engine's longest (fixed γ: 0 and γ, and the widths between,
        which rows near their end take; auto: 0..the policy's max), for each of `params` (default
        SamplingParams(): one set per graph, as a batch of requests with those params alone), and
        prefills of every (rows, tokens) bucket for prompts up to `max_prompt` tokens (default: the
        context). Rows of length 0 write only scratch slots: no request's state changes, and the
        tokens after a warm-up are the tokens without it."""
        if not self.row_step.static:
            raise ValueError("warm_up makes the functions of graphs=True; this engine runs eager steps")
        sets = [(p,) for p in (params if params is not None else [SamplingParams()])]
        start = time.perf_counter()
        made = self.row_step.warm_up(list(range(self.gamma + 1)), sets, self.max_batch, max_prompt)
        return WarmUp(time.perf_counter() - start, made, self.row_step.captured)

    def add(self, request: BatchRequest) -> int:
        """Queue a request; returns its id. Bad requests raise ValueError (ContextOverflowError for a
        prompt that does not fit the context): one error class for bad input, types included."""
        if not isinstance(request, BatchRequest):
            raise ValueError(f"expected a BatchRequest, got {type(request).__name__}")  # noqa: TRY004
        if not isinstance(request.params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(request.params).__name__}")  # noqa: TRY004
        if not isinstance(request.max_new_tokens, int) or isinstance(request.max_new_tokens, bool):
            raise ValueError(f"max_new_tokens must be an integer, got {request.max_new_tokens!r}")  # noqa: TRY004
        check_request(request.prompt_ids, request.max_new_tokens, self.target.vocab_size, self.target.max_seq_len)
        vocab = self.target.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in request.stop_ids):
            raise ValueError(f"stop ids must be token ids in 0..{vocab - 1}, got {list(request.stop_ids)[:5]}")
        if request.logprobs is not None and not (isinstance(request.logprobs, int)
                                                 and 0 <= request.logprobs <= vocab):
            raise ValueError(f"logprobs must be None or an integer in 0..{vocab}, got {request.logprobs!r}")
        if request.seed is not None and (not isinstance(request.seed, int) or request.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {request.seed!r}")
        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        request_id = self._next_id
        self._next_id += 1
        context = [int(t) for t in request.prompt_ids]
        stats = GenerationStats(gamma="auto" if self.policy else self.gamma, prompt_tokens=len(context))
        self.waiting.append(_Row(request_id, request, generator, context, stats, frozenset(request.stop_ids)))
        return request_id

    def cancel(self, request_id: int) -> None:
        """Free the request's row at once; the next step reports it "cancelled". Unknown or finished ids
        are ignored (a request may finish while its cancellation is on its way)."""
        if self.solo is not None and self.solo.request_id == request_id:
            self.pending.append(self._finish(self._stop_solo(), "cancelled"))
            return
        for i, row in enumerate(self.waiting):
            if row.request_id == request_id:
                del self.waiting[i]
                self.pending.append(self._finish(row, "cancelled"))
                return
        for b, row in enumerate(self.rows):
            if row.request_id == request_id:
                self._remove(b)
                self.pending.append(self._finish(row, "cancelled"))
                return

    def step(self, gamma: int | None = None) -> list[RowUpdate]:
        """Admit waiting requests, then one batched draft + one target forward over all running rows.
        Returns one RowUpdate per running (or just finished) request; [] when idle. `gamma`: this
        step's Γ (0..the engine's longest) instead of the engine's own; such a step teaches the policy
        nothing (speculant.calibrate times each Γ through this very step)."""
        if gamma is not None and not (type(gamma) is int and 0 <= gamma <= self.gamma):
            raise ValueError(f"a step's gamma must be an integer in 0..{self.gamma} (the engine's longest), "
                             f"got {gamma!r}")
        updates, self.pending = self.pending, []
        if self._runs_solo(gamma):
            return updates + self._solo_step()
        if self.solo is not None:  # others came: the solo request joins the batch first, its context prefilled
            self.waiting.insert(0, self._stop_solo())
        joining = []
        while self.waiting and len(self.rows) + len(joining) < self.max_batch:
            row = self.waiting.pop(0)
            if row.request.max_new_tokens == 0:  # nothing to make: finished at once
                updates.append(self._finish(row, "length"))
            else:
                joining.append(row)
        if joining:
            self._admit(joining)
        for b in reversed(range(len(self.rows))):  # a full context ends a request before its step
            if len(self.rows[b].context) >= self.target.max_seq_len:
                row = self._remove(b)
                updates.append(self._finish(row, "context"))
        if not self.rows:
            return updates
        rows = self.rows
        learning = self.policy is not None and gamma is None
        step_gamma = self.gamma if gamma is None else gamma
        if learning:
            step_gamma = self.policy.choose(len(rows), [(r.stats.accepted, r.stats.accepted + r.stats.rejections)
                                                        for r in rows])
        # never draft past what a row may still emit or store (as speculant.engine.generate)
        gammas = [max(0, min(step_gamma, r.request.max_new_tokens - r.stats.new_tokens - 1,
                             self.target.max_seq_len - len(r.context) - 1)) for r in rows]
        wanted = [b for b, r in enumerate(rows) if r.request.logprobs is not None]
        start = time.perf_counter()  # step times are statistics (GenerationStats), never the policy's input
        outcome = self.row_step.step([r.context for r in rows], gammas, [r.request.params for r in rows],
                                     [r.generator for r in rows], with_logits=bool(wanted))  # read: in sync
        draft_time = outcome.draft_time
        target_time = time.perf_counter() - start - draft_time
        counts, num_accepted = outcome.counts, outcome.num_accepted

        logprobs = _logprobs(outcome.logits, wanted, [rows[b].request.logprobs for b in wanted])
        finished = []
        for b, row in enumerate(rows):
            n, a = counts[b], num_accepted[b]
            tokens = outcome.drafted[b][:a] + [outcome.next_token[b]]
            result = StepResult(tokens, n, a, None, draft_time, target_time)
            row.stats.record(gammas[b], result)
            emitted, reason = self._commit(row, tokens)
            row_logprobs = None
            if b in logprobs:
                table, tops = logprobs[b]
                positions = torch.arange(len(emitted), device=table.device)
                chosen = table[positions, torch.tensor(emitted, device=table.device)].tolist()
                row_logprobs = list(zip(chosen, tops[:len(emitted)]))
            updates.append(RowUpdate(row.request_id, emitted, row_logprobs, reason, row.stats))
            if reason:
                row.stats.finish_reason = reason
                finished.append(b)
        if learning:
            self.policy.observe(sum(num_accepted), sum(min(a + 1, n) for a, n in zip(num_accepted, counts)))
        for b in reversed(finished):
            self._remove(b)
        return updates

    # ---- rows ----------------------------------------------------------------------------------------

    @staticmethod
    def _commit(row: _Row, tokens: list[int]) -> tuple[list[int], str | None]:
        """Append a step's tokens to the row, honouring its stop tokens and max_new_tokens as
        speculant.engine.generate does. Returns the tokens kept and the finish reason, if any."""
        emitted, reason = [], None
        for token in tokens:
            emitted.append(token)
            if token in row.stop:
                reason = "stop"
                break
            if row.stats.new_tokens + len(emitted) == row.request.max_new_tokens:
                break
        row.context.extend(emitted)
        row.stats.new_tokens += len(emitted)
        row.stats.decode_time = time.perf_counter() - row.decode_start
        if reason is None and row.stats.new_tokens >= row.request.max_new_tokens:
            reason = "length"
        return emitted, reason

    def _admit(self, joining: list[_Row]) -> None:
        """The joining requests take rows 0..k-1, prefilled together (RowStep.prefill: one forward from
        row 0, a graph per size on CUDA); the rows that sat there move to the end."""
        k, running = len(joining), len(self.rows)
        start = time.perf_counter()
        for b in range(min(k, running)):
            dest = max(k, running) + b
            self.cache.move_row(b, dest, len(self.rows[b].context) - 1)
            if self.drafter is not None:
                self.drafter.move(b, dest)
        self.rows = joining + self.rows[k:] + self.rows[:k]
        self.row_step.prefill([row.context for row in joining])
        synchronize(self.target.device)
        for row in joining:
            if not row.decode_start:  # a request back from solo keeps its first prefill and start
                row.stats.prefill_time = time.perf_counter() - start  # the batch's prefill, shared
                row.decode_start = time.perf_counter()

    # ---- a lone request ------------------------------------------------------------------------------

    def _runs_solo(self, gamma: int | None) -> bool:
        """Whether this step runs the one request solo: a solo engine, a policy step (a forced Γ
        times the batched step), and one request in all, with no log-probabilities asked for (the
        single-request engine's fused steps keep no logits), tokens left to make and room left."""
        if self.solo_steps is None or gamma is not None or self.num_running != 1:
            return False
        row = self.solo or (self.waiting or self.rows)[0]
        return (row.request.logprobs is None and row.request.max_new_tokens > row.stats.new_tokens
                and len(row.context) < self.target.max_seq_len)  # a full one ends as a batched row does

    def _solo_step(self) -> list[RowUpdate]:
        """One step of the single-request engine for the lone request (started here if it was waiting
        or batched: its row is freed, and the single-request engine prefills its context)."""
        if self.solo is None:
            row = self.waiting.pop(0) if self.waiting else self._remove(0)
            # Its own seed, drawn from the request's generator: the draws after it (solo or back in a
            # row) are a fresh stream, never the uniforms that already made its tokens.
            seed = int(torch.randint(0, 2**62, (), generator=row.generator))
            row.steps = self.solo_steps(row.context, row.request, seed, row.request.max_new_tokens - row.stats.new_tokens)
            row.seen = {}
            if not row.decode_start:
                row.decode_start = time.perf_counter()
            self.solo = row
        row = self.solo
        step = next(row.steps, None)
        if step is not None:
            _absorb(row.stats, step.stats, row.seen)
            emitted, reason = self._commit(row, step.tokens)
        else:  # the single-request engine stopped without a step: the context is full
            emitted, reason = [], "context" if len(row.context) >= self.target.max_seq_len else "length"
        if reason:
            row.stats.finish_reason = reason
            self._stop_solo()
        return [RowUpdate(row.request_id, emitted, None, reason, row.stats)]

    def _stop_solo(self) -> _Row:
        """End the lone request's solo run (its single-request steps are closed); returns its row."""
        row, self.solo = self.solo, None
        row.steps.close()
        row.steps = None
        return row

    def _remove(self, b: int) -> _Row:
        """Take row b out; the last row moves into its place (cache rows and drafter state)."""
        row = self.rows[b]
        last = len(self.rows) - 1
        if b != last:
            moved = self.rows[last]
            self.cache.move_row(last, b, len(moved.context) - 1)
            if self.drafter is not None:
                self.drafter.move(last, b)
            self.rows[b] = moved
        self.rows.pop()
        return row

    def _finish(self, row: _Row, reason: str) -> RowUpdate:
        """The update of a request that ends without a step."""
        row.stats.finish_reason = reason
        return RowUpdate(row.request_id, [], [] if row.request.logprobs is not None else None, reason, row.stats)


def _logprobs(logits: torch.Tensor, rows: list[int], top: list[int]) -> dict[int, tuple[list, list]]:
    """The target's own log-probabilities (log-softmax of its logits, before the sampling transform)
    for the rows that asked: {row: (logprobs [W + 1, V], top-k [(id, logprob)] per position)}."""
    if not rows:
        return {}
    index = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), -1)  # [R, W + 1, V]
    k = max(top)
    values, ids = logprobs.topk(k, -1) if k else (logprobs[..., :0], logprobs[..., :0].long())
    values, ids = values.tolist(), ids.tolist()
    return {b: (logprobs[i], [list(zip(ids[i][j][:top[i]], values[i][j][:top[i]])) for j in range(len(ids[i]))])
            for i, b in enumerate(rows)}


# (context, request, seed, new tokens left) -> the single-request engine's steps for that request
SoloSteps = Callable[[list[int], BatchRequest, int, int], Iterator[Step]]

_COUNTERS = ("target_calls", "drafted", "accepted", "rejections", "alternatives_kept", "lookup_tokens",
             "prefill_time", "draft_time", "target_time")  # a solo run's prefill adds to the request's


def _absorb(stats: GenerationStats, solo: GenerationStats, seen: dict) -> None:
    """Add to a request's stats what its solo steps counted since the last call (`solo`: the
    single-request engine's running totals; `seen`: how much of them `stats` holds already)."""
    for name in _COUNTERS:
        value = getattr(solo, name)
        setattr(stats, name, getattr(stats, name) + value - seen.get(name, 0))
        seen[name] = value
    for name in ("drafted_by_position", "accepted_by_position"):
        mine, theirs = getattr(stats, name), getattr(solo, name)
        for i, gain in enumerate(position_gains(theirs, seen.get(name, []))):
            if i < len(mine):
                mine[i] += gain
            else:
                mine.append(gain)
        seen[name] = list(theirs)
    history = seen.get("gamma_history", 0)
    stats.gamma_history.extend(solo.gamma_history[history:])
    seen["gamma_history"] = len(solo.gamma_history)
