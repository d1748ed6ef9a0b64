"""The step costs of `--gamma auto` (adaptive.StepCosts, and adaptive.BatchStepCosts for the batched
engine): measured once per machine and model pair, through the code that runs the requests, and kept
on disk so that every later load prices steps with exactly the same numbers.

    step_costs(key, measure, fallback)    the table for `key`, read from the cache, else measured and
                                          written there; `fallback` (a nominal table) if it cannot be kept
    measure_costs(stepper, max_gamma, params, candidates, lookup)
                                          C[n], n = 0..max_gamma: seconds of a step whose chain drafted n
                                          (C[0]: of a plain step per token it emits, a fused stepper's
                                          plain steps decoding chunks of tokens)
    batch_step_costs(key, measure, fallback)          the same for a batched table
    measure_batch_costs(engine, max_gamma)            T[bucket][Γ]: seconds of a batched step

Measuring. A fixed prompt, a few warm-up steps (the draft's catch-up on the prompt, first calls),
then rounds of steps of γ = 0, max, max, max−1, ..., 1 through the stepper itself: on CUDA the
fused CUDA-graph stepper, run ahead as it runs there (each step launched before the one before it is
read, and timed from that read to its own; graph capture and compilation are not step time); on the
CPU the generic stepper, draft and verify synchronised. A length costs the least of its timed steps
(other work on the machine only ever slows a step down). A step that a run-ahead stepper ran alone (a
request's first, the one after a plain step) is left out where the length has others. Deterministic
proposers (n-gram, the generic step's lookup branch) are padded to full length while measuring, so that
each length is timed, with the tree it makes: 1 + n·K + G nodes (the fused step's lookup branch, found
inside its graph, always has its G nodes there). At least MIN_ROUNDS rounds, more while they
take under BUDGET_S: a few seconds for SmolLM2-135M on a 2-core CPU (2 rounds), about BUDGET_S where
steps take milliseconds, on an idle machine (a busy one makes the table worse: SPECULANT_RECALIBRATE=1
redoes it).

Cache: `$SPECULANT_CACHE/step-costs/<hash of the key>.json` (default ~/.cache/speculant/models/...),
with the key in the file. The key names everything that changes the costs: machine, processor,
device, torch, threads, backend, dtype, target, drafts, candidates, lookup, stepper and run-ahead, KV
cache size, longest γ, greedy or sampled. A damaged file is said in one line and measured again;
where the cache cannot be written the fallback serves (reproducible, fitted to no machine);
SPECULANT_RECALIBRATE=1 measures again and overwrites.

Batched steps (speculant.batching.LoadGamma). Through the BatchEngine's own step (its drafter, target
and CUDA graphs), with a fixed Γ per step: per batch bucket (1, 2, 4, ... up to max_batch; a bucket
past max_batch runs max_batch rows) as many rows of a fixed prompt, sampled, and for Γ in BATCH_GAMMAS
and the longest, one untimed step (a graph captured, the draft catching up after another Γ), then
timed steps, n-gram rows padded to full length; a (bucket, Γ) costs the least of its timed steps
(draft + verify, as the rows' stats count them). Buckets of more rows take fewer timed steps
(BATCH_REPEATS ÷ rows, at least MIN_BATCH_REPEATS: their steps are slower and vary less), so the
whole table costs some hundred steps. Buckets are timed from the smallest up while the timing has
taken less than BATCH_BUDGET_S (a step of 64 rows of 9 tokens takes seconds on a CPU): each bucket
past that costs the last timed one's table scaled by its rows (a forward that is compute bound, as
large batches are on a CPU; on a GPU, where steps take milliseconds, every bucket gets timed). Γs
between the measured ones are priced on the line between their neighbours, and a bucket never costs
less than the one below it at the same Γ (more rows do not cost less). Cache:
`$SPECULANT_CACHE/batch-step-costs/`, keyed as above plus max_batch and graphs.
"""

from __future__ import annotations

import itertools
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from speculant.adaptive import BatchStepCosts, StepCosts, batch_bucket, batch_buckets
from speculant.batching import BatchEngine, BatchRequest
from speculant.drafters.base import Draft, RowPlan
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.ngram import NgramDrafter, NgramRows
from speculant.models.cache import keyed_file, read_keyed_json, recalibrate_requested, say, write_json_atomic
from speculant.sampling import SamplingParams
from speculant.step import Stepper

CACHE_FORMAT = 2  # bump when the file's layout or the way costs are measured changes (2: C[0] per plain token)
# timed rounds of steps over every length, after a few warm-up steps: at least MIN_ROUNDS, more while
# they have taken less than BUDGET_S seconds (fast steps are cheap to time often, and noisier)
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S = 2, 20, 1.0
PROMPT_LENGTH = 32
BATCH_CACHE_FORMAT = 2  # the same for the batched table (2: steps through speculant.row_step, one graph each)
BATCH_GAMMAS = (0, 1, 2, 4)  # Γs timed per batch bucket, with the longest; those between on a line
BATCH_REPEATS, MIN_BATCH_REPEATS = 8, 2  # timed steps per (bucket, Γ): BATCH_REPEATS ÷ rows, at least MIN
BATCH_BUDGET_S = 20.0  # larger buckets are timed while the timing has taken less; the rest scaled by rows


def setup_key(model, target_hash: str, drafts: list[str]) -> dict:
    """What every step-cost table is measured for, single-request or batched: this machine, processor,
    device, torch and its thread count, the model's dtype and KV cache size, the target's weights and
    the draft specs (each table's key adds its own settings)."""
    return {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(getattr(model, "dtype", "")),
            "target": target_hash, "drafts": list(drafts), "max_seq_len": model.max_seq_len}


def cache_path(key: dict) -> Path:
    return keyed_file("step-costs", key)


def step_costs(key: dict, measure: Callable[[], tuple[float, ...]], fallback: StepCosts,
               progress: bool = True) -> StepCosts:
    """The step costs for `key` (JSON values only): read from the cache; else `measure()`d, written
    there and returned; `fallback` where the cache cannot be written. `progress`: say on stderr, in one
    line, that a measurement runs and where it is kept."""
    return _kept(cache_path(key), lambda path: read_costs(path, key),
                 lambda: StepCosts(tuple(float(t) for t in measure()), "measured"),
                 lambda costs: {"format": CACHE_FORMAT, "key": key, "step_costs": list(costs.step)},
                 fallback, "step costs", "timing steps once for this machine and model pair", progress)


def batch_step_costs(key: dict, measure: Callable[[], dict[int, tuple[float, ...]]], fallback: BatchStepCosts,
                     progress: bool = True) -> BatchStepCosts:
    """step_costs for the batched engine's table: `measure()` gives {bucket: seconds by Γ}."""
    return _kept(keyed_file("batch-step-costs", key), lambda path: read_batch_costs(path, key),
                 lambda: BatchStepCosts(measure(), "measured"),
                 lambda costs: {"format": BATCH_CACHE_FORMAT, "key": key,
                                "step_costs": {str(bucket): list(row) for bucket, row in costs.step.items()}},
                 fallback, "batched step costs", "timing batched steps once for this machine, model pair and "
                 "batch size", progress)


def _kept(path: Path, read: Callable[[Path], object], measure: Callable[[], object], record: Callable[[object], dict],
          fallback, what: str, timing: str, progress: bool):
    """The table kept in `path` (`read(path)`, ValueError for a damaged file); else `measure()`d, written
    there as `record(table)` with the seconds it took, and returned; `fallback` where that cannot be
    written. `what` is measured, `timing` says so on stderr."""
    if not recalibrate_requested() and path.exists():
        try:
            return read(path)
        except ValueError as error:
            say(progress, f"the cache file of {what} {path} is damaged ({error}); measuring again")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError("not writable")
    except OSError as error:
        say(progress, f"cannot keep {what} in {path.parent} ({error.strerror or error}); --gamma auto prices "
                      "steps by a nominal table (reproducible, fitted to no machine)")
        return fallback
    if progress:
        print(f"speculant: --gamma auto: {timing} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    table = measure()
    elapsed = time.perf_counter() - start
    try:
        write_json_atomic(path, {**record(table), "seconds": round(elapsed, 2)})
    except OSError as error:
        if progress:
            print(f" {elapsed:.1f} s, but {path} cannot be written ({error.strerror or error}): a nominal table "
                  "serves", file=sys.stderr, flush=True)
        return fallback
    if progress:
        print(f" {elapsed:.1f} s; kept in {path}", file=sys.stderr, flush=True)
    return table


def _kept_costs(path: Path, key: dict, file_format: int, what: str):
    """The "step_costs" of the record kept in `path` for `key`, in format `file_format` (what: the
    kind of file, for the message); ValueError saying what is wrong with the file."""
    record = read_keyed_json(path)
    if not isinstance(record, dict) or record.get("format") != file_format:
        raise ValueError(f"not a format-{file_format} {what} file")
    if record.get("key") != key:
        raise ValueError("written for another setup")
    return record.get("step_costs")


def timing_prompt(target) -> list[int]:
    """The fixed prompt steps are timed after: PROMPT_LENGTH tokens, at most a quarter of the cache."""
    return [(3 + 7 * i) % target.vocab_size for i in range(max(1, min(PROMPT_LENGTH, target.max_seq_len // 4)))]


def read_costs(path: Path, key: dict) -> StepCosts:
    """The table kept in `path` for `key`; ValueError saying what is wrong with the file."""
    costs = _kept_costs(path, key, CACHE_FORMAT, "step-cost")
    if not isinstance(costs, list) or len(costs) != key.get("max_gamma", len(costs) - 1) + 1:
        raise ValueError("the table has the wrong length")
    return StepCosts(tuple(costs), "cached")  # StepCosts refuses what is not positive seconds


def measure_costs(stepper: Stepper, max_gamma: int, params: SamplingParams, candidates: int = 1, lookup: int = 0,
                  budget: float = BUDGET_S) -> tuple[float, ...]:
    """C[n] for n = 0..max_gamma: the seconds of a step of `stepper` whose chain drafted n tokens, with
    `candidates` per position and a lookup branch of `lookup` (see the module docstring): at least
    MIN_ROUNDS timed rounds, more while they have taken less than `budget` seconds (at most MAX_ROUNDS)."""
    target = stepper.target
    capacity = target.max_seq_len
    widest = 1 + max_gamma * candidates + lookup  # the biggest tree's slots
    prompt = timing_prompt(target)
    order = [0, max_gamma] + list(range(max_gamma, 0, -1))  # after a plain step a run-ahead step runs alone
    generator = torch.Generator(device=target.device).manual_seed(0)
    timed: dict[int, list[float]] = {n: [] for n in range(max_gamma + 1)}
    alone: dict[int, list[float]] = {n: [] for n in range(max_gamma + 1)}
    context: list[int] = []

    def step(gamma: int, next_gamma: int | None, record: bool) -> None:
        nonlocal context
        if not context or len(context) + 2 * (widest + max_gamma + 1) > capacity:
            # a fresh request where the next steps might not fit; its first step (the draft's catch-up
            # on the prompt, a run-ahead stepper's step alone) is not timed, where the cache has room
            context = list(prompt)
            stepper.begin(context, params)
            if len(context) + 2 * (widest + max_gamma + 1) <= capacity:
                context += stepper.step(context, 1, generator, room=capacity - len(context) - 1,
                                        next_gamma=gamma).tokens
        room = capacity - len(context) - 1  # >= 0: the prompt is at most a quarter of the cache
        # a plain step as requests run it: a chunk of tokens where the stepper decodes one (engine.decode)
        result = stepper.step(context, min(gamma, room), generator, room=room, next_gamma=next_gamma,
                              plain_tokens=room + 1 if gamma == 0 else 1)
        context = context + result.tokens
        if record and gamma <= room:
            seconds = result.draft_time + result.target_time
            (alone if result.alone else timed)[gamma].append(seconds / len(result.tokens) if gamma == 0 else seconds)

    with _full_length(stepper):
        for i in range(3):  # warm-up: first calls
            step(order[i], order[i + 1], record=False)
        rounds, start = 0, time.perf_counter()
        while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - start < budget):
            for i, gamma in enumerate(order):
                step(gamma, order[i + 1] if i + 1 < len(order) else None, record=True)
            rounds += 1
    costs = []
    for n in range(max_gamma + 1):
        seen = timed[n] or alone[n]
        costs.append(min(seen) if seen else costs[-1])  # a length the cache had no room for: the one below's
    return tuple(costs)


def read_batch_costs(path: Path, key: dict) -> BatchStepCosts:
    """The batched table kept in `path` for `key`; ValueError saying what is wrong with the file."""
    costs = _kept_costs(path, key, BATCH_CACHE_FORMAT, "batched step-cost")
    if not isinstance(costs, dict) or not all(bucket.isdigit() for bucket in costs):
        raise ValueError("the table is not {batch bucket: costs}")
    table = BatchStepCosts({int(bucket): row for bucket, row in costs.items()}, "cached")  # refuses bad seconds
    if table.max_rows != batch_bucket(key.get("max_batch", table.max_rows)) or \
            table.max_gamma != key.get("max_gamma", table.max_gamma):
        raise ValueError("the table has the wrong size")
    return table


def measure_batch_costs(engine: BatchEngine, max_gamma: int,
                        repeats: int = BATCH_REPEATS) -> dict[int, tuple[float, ...]]:
    """{bucket: T[Γ] for Γ = 0..max_gamma} for the buckets of batches of up to engine.max_batch rows: the
    seconds (draft + verify) of a step of `engine`, idle, with a drafter and a longest Γ >= max_gamma
    (see the module docstring). The engine is left idle."""
    if engine.drafter is None or engine.gamma < max_gamma or engine.num_running:
        raise ValueError(f"timing batched steps needs an idle engine with a drafter and gamma >= {max_gamma}")
    capacity = engine.target.max_seq_len
    prompt = timing_prompt(engine.target)
    if len(prompt) + 2 * (max_gamma + 1) > capacity:
        raise ValueError(f"a KV cache of {capacity} tokens is too small to time batched steps of Γ up to {max_gamma}")
    gammas = sorted({g for g in BATCH_GAMMAS if g < max_gamma} | {max_gamma})
    buckets = batch_buckets(engine.max_batch)
    table = {}
    started = time.monotonic()  # not perf_counter: the tests drive that one
    with _full_length_rows(engine):
        for bucket in buckets:
            if table and time.monotonic() - started > BATCH_BUDGET_S:
                break
            rows = min(bucket, engine.max_batch)
            seconds = {}
            for gamma in gammas:
                times, warm = [], False  # a (bucket, Γ)'s first step: a graph captured, the draft catching up
                while len(times) < max(MIN_BATCH_REPEATS, repeats // bucket):
                    longest = max((len(r.context) for r in engine.rows), default=0)
                    if len(engine.rows) != rows or longest + 2 * (gamma + 1) > capacity:
                        _fresh_rows(engine, rows, prompt)  # new rows where the next steps might not fit
                        warm = False
                    before = _step_seconds(engine)
                    engine.step(gamma)
                    if warm:
                        times.append(_step_seconds(engine) - before)
                    warm = True
                seconds[gamma] = min(times)  # other work on the machine only ever slows a step down
            table[bucket] = _on_lines(seconds, max_gamma)
    _fresh_rows(engine, 0, prompt)
    engine.step()  # reports the cancellations: the engine is idle
    last = max(table)
    for bucket in buckets[len(table):]:  # past the budget: the last timed bucket's costs, scaled by rows
        scale = min(bucket, engine.max_batch) / min(last, engine.max_batch)
        table[bucket] = tuple(seconds * scale for seconds in table[last])
    for smaller, bucket in itertools.pairwise(buckets):  # more rows do not cost less
        table[bucket] = tuple(max(a, b) for a, b in zip(table[smaller], table[bucket]))
    return table


def _fresh_rows(engine: BatchEngine, rows: int, prompt: list[int]) -> None:
    """Cancel the engine's rows and queue `rows` new ones with `prompt` (sampled, never ending by
    themselves: the caller starts new ones before the cache fills)."""
    for row in list(engine.rows):
        engine.cancel(row.request_id)
    for seed in range(rows):
        engine.add(BatchRequest(prompt, SamplingParams(temperature=1.0), engine.target.max_seq_len, seed=seed))


def _step_seconds(engine: BatchEngine) -> float:
    """The draft and verify seconds the engine's first row has counted so far (every row counts each step)."""
    if not engine.rows:
        return 0.0
    stats = engine.rows[0].stats
    return stats.draft_time + stats.target_time


def _on_lines(seconds: dict[int, float], max_gamma: int) -> tuple[float, ...]:
    """Seconds for Γ = 0..max_gamma from those measured: between two measured Γs, on the line through them."""
    measured = sorted(seconds)
    out = []
    for gamma in range(max_gamma + 1):
        below, above = max(g for g in measured if g <= gamma), min(g for g in measured if g >= gamma)
        share = (gamma - below) / (above - below) if above > below else 0.0
        out.append(seconds[below] + share * (seconds[above] - seconds[below]))
    return tuple(out)


class _FullLength:
    """A deterministic proposer padded to full length (the context's last token repeated), so that a
    step drafts all it is asked for: a length is timed as such, not as an n-gram miss."""

    def __init__(self, ngram: NgramDrafter) -> None:
        self.ngram = ngram

    def reset(self) -> None:
        self.ngram.reset()

    def propose(self, context: list[int], gamma: int, params, generator) -> Draft:
        tokens = self.ngram.propose(context, gamma, params, generator).tokens.tolist()
        return Draft(torch.tensor(tokens + [context[-1]] * (gamma - len(tokens)), dtype=torch.int64), None)


@contextmanager
def _full_length(stepper):
    """Pad the stepper's deterministic proposers while measuring: the fused stepper's `ngram` (its n-gram
    drafts; its lookup branch is found inside the step's graph, whose tree has all G nodes whatever the
    branch's length), the generic stepper's `drafter` where it is one or has one."""
    swapped = {}
    for name in ("ngram", "drafter"):
        proposer = getattr(stepper, name, None)
        if isinstance(proposer, NgramDrafter):
            swapped[name] = proposer
            setattr(stepper, name, _FullLength(proposer))
        elif isinstance(proposer, LookupDrafter):
            swapped[name] = proposer
            setattr(stepper, name, LookupDrafter(proposer.inner, _FullLength(proposer.ngram), proposer.length))
    try:
        yield
    finally:
        for name, proposer in swapped.items():
            setattr(stepper, name, proposer)


class _FullLengthRows:
    """NgramRows padded to full length (each row's last token repeated), as _FullLength: its plan is
    padded, the rest is NgramRows'."""

    def __init__(self, ngram: NgramRows) -> None:
        self.ngram = ngram

    def __getattr__(self, name: str):
        return getattr(self.ngram, name)

    def plan(self, contexts: list[list[int]], gammas: list[int]) -> RowPlan:
        plan = self.ngram.plan(contexts, gammas)
        tokens = [found + [context[-1]] * (gamma - len(found)) for context, gamma, found in zip(contexts, gammas, plan.tokens)]
        return RowPlan(tokens, plan.starts, list(gammas))


@contextmanager
def _full_length_rows(engine: BatchEngine):
    """Pad the engine's n-gram rows while measuring (other row drafters draft all they are asked for)."""
    ngram = engine.row_step.drafter
    if isinstance(ngram, NgramRows):
        engine.row_step.drafter = _FullLengthRows(ngram)
    try:
        yield
    finally:
        engine.row_step.drafter = ngram
