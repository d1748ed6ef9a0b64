"""The step costs of `--gamma auto` (adaptive.StepCosts): measured once per machine and model pair,
through the stepper that runs the requests, and kept on disk so that every later load prices steps
with exactly the same numbers.

    step_costs(key, measure, fallback)    the table for `key`, read from the cache, else measured and
                                          written there; `fallback` (a nominal table) if it cannot be kept
    measure_costs(stepper, max_gamma, params, candidates, lookup)
                                          C[n], n = 0..max_gamma: seconds of a step whose chain drafted n

Measuring. A fixed prompt, a few warm-up steps (the draft's catch-up on the prompt, first calls),
then rounds of steps of γ = 0, max, max, max−1, ..., 1 through the stepper itself: on CUDA the
fused CUDA-graph stepper, run ahead as it runs there (each step launched before the one before it is
read, and timed from that read to its own; graph capture and compilation are not step time); on the
CPU the generic stepper, draft and verify synchronised. A length costs the least of its timed steps
(other work on the machine only ever slows a step down). A step that a run-ahead stepper ran alone (a
request's first, the one after a plain step) is left out where the length has others. Deterministic
proposers (n-gram, the lookup branch) are padded to full length while measuring, so that each length
is timed, with the tree it makes: 1 + n·K + G nodes. At least MIN_ROUNDS rounds, more while they
take under BUDGET_S: a few seconds for SmolLM2-135M on a 2-core CPU (2 rounds), about BUDGET_S where
steps take milliseconds, on an idle machine (a busy one makes the table worse: SPECULANT_RECALIBRATE=1
redoes it).

Cache: `$SPECULANT_CACHE/step-costs/<hash of the key>.json` (default ~/.cache/speculant/models/...),
with the key in the file. The key names everything that changes the costs: machine, processor,
device, torch, threads, backend, dtype, target, drafts, candidates, lookup, stepper and run-ahead, KV
cache size, longest γ, greedy or sampled. A damaged file is said in one line and measured again;
where the cache cannot be written the fallback serves (reproducible, fitted to no machine);
SPECULANT_RECALIBRATE=1 measures again and overwrites.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from speculant.adaptive import StepCosts
from speculant.drafters.base import Draft
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.models.cache import keyed_file, read_keyed_json, recalibrate_requested, say, write_json_atomic
from speculant.sampling import SamplingParams
from speculant.step import Stepper

CACHE_FORMAT = 1  # bump when the file's layout or the way costs are measured changes
# timed rounds of steps over every length, after a few warm-up steps: at least MIN_ROUNDS, more while
# they have taken less than BUDGET_S seconds (fast steps are cheap to time often, and noisier)
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S = 2, 20, 1.0
PROMPT_LENGTH = 32


def cache_path(key: dict) -> Path:
    return keyed_file("step-costs", key)


def step_costs(key: dict, measure: Callable[[], tuple[float, ...]], fallback: StepCosts,
               progress: bool = True) -> StepCosts:
    """The step costs for `key` (JSON values only): read from the cache; else `measure()`d, written
    there and returned; `fallback` where the cache cannot be written. `progress`: say on stderr, in one
    line, that a measurement runs and where it is kept."""
    path = cache_path(key)
    if not recalibrate_requested() and path.exists():
        try:
            return read_costs(path, key)
        except ValueError as error:
            say(progress, f"the step-cost cache {path} is damaged ({error}); measuring again")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError("not writable")
    except OSError as error:
        say(progress, f"cannot keep step costs in {path.parent} ({error.strerror or error}); --gamma auto prices "
                      "steps by a nominal table (reproducible, fitted to no machine)")
        return fallback
    if progress:
        print("speculant: --gamma auto: timing steps once for this machine and model pair ...", end="",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    costs = tuple(float(t) for t in measure())
    elapsed = time.perf_counter() - start
    try:
        write_json_atomic(path, {"format": CACHE_FORMAT, "key": key, "step_costs": list(costs),
                                 "seconds": round(elapsed, 2)})
    except OSError as error:
        if progress:
            print(f" {elapsed:.1f} s, but {path} cannot be written ({error.strerror or error}): a nominal table "
                  "serves", file=sys.stderr, flush=True)
        return fallback
    if progress:
        print(f" {elapsed:.1f} s; kept in {path}", file=sys.stderr, flush=True)
    return StepCosts(costs, "measured")


def read_costs(path: Path, key: dict) -> StepCosts:
    """The table kept in `path` for `key`; ValueError saying what is wrong with the file."""
    record = read_keyed_json(path)
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT:
        raise ValueError(f"not a format-{CACHE_FORMAT} step-cost file")
    if record.get("key") != key:
        raise ValueError("written for another setup")
    costs = record.get("step_costs")
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
    prompt_length = max(1, min(PROMPT_LENGTH, capacity // 4))
    prompt = [(3 + 7 * i) % target.vocab_size for i in range(prompt_length)]
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
        result = stepper.step(context, min(gamma, room), generator, room=room, next_gamma=next_gamma)
        context = context + result.tokens
        if record and gamma <= room:
            (alone if result.alone else timed)[gamma].append(result.draft_time + result.target_time)

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
    """Pad the stepper's deterministic proposers while measuring: the fused stepper's `ngram` (n-gram
    drafts and the lookup branch), the generic stepper's `drafter` where it is one or has one."""
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
