"""Batched `--gamma auto` (speculant.batching.LoadGamma) prices steps by a table measured once
(speculant.calibrate.measure_batch_costs, kept by batch_step_costs), never by a clock read during the
requests: a seeded batched run gives the same tokens whatever the clock says, through the engine and
through the api on a fresh load; the table is timed through the engine's own step (the least of its
steady steps, n-gram rows drafted in full, Γs between the timed ones on a line, more rows never
cheaper), kept, read back exactly, a damaged file said in one line and measured again; and, in
simulations over a table, Γ shrinks to 0 as the batch grows and the policy stays within 5 % of the
best fixed Γ.
"""

from __future__ import annotations

import itertools
import json
import random
import time

import pytest
from test_loading import save_folder, tiny_hf_model

from speculant import api, calibrate
from speculant.adaptive import BatchStepCosts, batch_buckets, nominal_batch_costs
from speculant.batching import BatchEngine, BatchRequest, LoadGamma
from speculant.calibrate import (
    BATCH_CACHE_FORMAT,
    BATCH_GAMMAS,
    batch_step_costs,
    measure_batch_costs,
    read_batch_costs,
)
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter, NgramRows
from speculant.models.cache import keyed_file
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.sampling import SamplingParams

SAMPLED = SamplingParams(temperature=1.0)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [3, 3, 3, 1, 2, 3, 3, 1, 2], [5], [40, 41, 42, 40, 41]]


@pytest.fixture(scope="module")
def weights():
    return random_weights(tiny_config("llama"), seed=0, scale=2.0)


def gpu_like(rows: int, gamma: int) -> float:
    """A step of `rows` rows at Γ: a launch cost, compute growing with rows × positions, and drafting
    a tenth of a verify per position. Speculation pays at small batches, not at large ones."""
    return 1.0 + 0.02 * rows * (gamma + 1) + gamma * 0.1 * (1.0 + 0.02 * rows)


def table(step_time, max_batch: int = 256, max_gamma: int = 8) -> BatchStepCosts:
    return BatchStepCosts({b: tuple(step_time(b, g) for g in range(max_gamma + 1)) for b in batch_buckets(max_batch)})


class RandomClock:
    """time.perf_counter as a clock gone mad: random, increasing, different on every run."""

    def __init__(self, seed: int) -> None:
        self.rng, self.now = random.Random(seed), 0.0

    def __call__(self) -> float:
        self.now += self.rng.expovariate(1.0) * 10 ** self.rng.uniform(-6, 1)
        return self.now


# ================================================================ reproducible, whatever the clock says


def run_engine(engine: BatchEngine, requests: list[BatchRequest]) -> dict[int, tuple[list[int], list[int]]]:
    """{request id: (tokens, the Γ of each of its steps)}."""
    out = {engine.add(r): ([], []) for r in requests}
    while engine.num_running:
        for update in engine.step():
            out[update.request_id][0].extend(update.tokens)
            if update.finished:
                out[update.request_id][1].extend(update.stats.gamma_history)
    return out


def test_a_seeded_batched_run_under_auto_gives_the_same_tokens_whatever_the_clock_says(weights, monkeypatch):
    """Five sampled requests of different lengths (the batch shrinks as they end), under auto over a
    table where Γ depends on the batch size: the same tokens and the same Γs with the clock left
    alone and with perf_counter returning random increasing times (two different ones)."""
    requests = [BatchRequest(p, SAMPLED, 8 + 6 * i, seed=20 + i) for i, p in enumerate(PROMPTS)]
    costs = table(lambda rows, gamma: 1.0 + 0.05 * rows * (gamma + 1) + 0.02 * gamma, max_batch=8)
    runs = []
    for clock in (time.perf_counter, RandomClock(1), RandomClock(2)):
        with monkeypatch.context() as patch:
            patch.setattr(time, "perf_counter", clock)
            target = LeanModel(weights, max_seq_len=128)
            drafter = ModelDrafter(LeanModel(weights, num_layers=1, max_seq_len=128))
            runs.append(run_engine(BatchEngine(target, drafter.rows, gamma="auto", max_batch=8,
                                               policy=LoadGamma(costs)), requests))
    assert runs[0] == runs[1] == runs[2]
    gammas = {g for _, history in runs[0].values() for g in history}
    assert len(gammas) > 2, gammas  # Γ did change with the batch: the test shows something


@pytest.fixture(scope="module")
def target_folder(tmp_path_factory):
    # a 4-layer target drafted by its own first layer: acceptance is neither 0 nor 1
    model = tiny_hf_model("llama", vocab_size=261, num_hidden_layers=4, max_position_embeddings=128)
    return str(save_folder(model, tmp_path_factory.mktemp("batch-auto") / "tiny"))


def test_the_api_times_batched_steps_once_and_a_fresh_load_gives_the_same_tokens(target_folder, tmp_path,
                                                                               monkeypatch, capsys):
    """generate_many under auto: the batched table is timed on first use (one line on stderr), read
    from memory by the next engine and from the cache by a fresh load (no line); with a random
    clock during the requests, every run gives the same tokens."""
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    requests = [{"prompt": p} for p in ("ab cd", "ef", "ab ab ab", "gh ij kl")]
    first = api.load(target_folder, draft="layers:1", gamma="auto", max_seq_len=128)

    def run(spec, clock_seed):
        with monkeypatch.context() as patch:
            patch.setattr(time, "perf_counter", RandomClock(clock_seed))
            return [(g.token_ids, g.stats["gamma_history"])
                    for g in spec.generate_many(requests, max_new_tokens=30, temperature=1.0, seed=5, max_batch=3)]

    first.batch_step_costs(3, False)  # timed here, with the real clock
    [line] = capsys.readouterr().err.strip().splitlines()
    path = next((tmp_path / "cache" / "batch-step-costs").glob("*.json"))
    assert "timing batched steps once" in line and str(path) in line
    runs = [run(first, 1), run(first, 2)]
    second = api.load(target_folder, draft="layers:1", gamma="auto", max_seq_len=128)  # as a new process would
    runs.append(run(second, 3))
    assert capsys.readouterr().err == ""
    assert second.batch_costs[(3, False, False)].how == "cached"
    assert second.batch_costs[(3, False, False)].step == first.batch_costs[(3, False, False)].step
    assert runs[0] == runs[1] == runs[2]
    other_seed = first.generate_many(requests, max_new_tokens=30, temperature=1.0, seed=6, max_batch=3)
    assert [g.token_ids for g in other_seed] != [tokens for tokens, _ in runs[0]]  # the seed is honoured


# ================================================================ measured through the engine's own step


class ScriptedTarget:
    """The target's verify forwards move a fake clock by cost(rows, width - 1), plus 0.5 s the first
    time a (rows, width) runs (a graph captured, a first call); nothing else moves it."""

    def __init__(self, target: LeanModel, cost) -> None:
        self.forward_rows, self.cost, self.now, self.seen = target.forward_rows, cost, 0.0, set()
        target.forward_rows = self.verify

    def verify(self, cache, tokens, starts, lengths, **options):
        if "first_row" not in options:  # a prefill is not a step
            shape = tuple(tokens.shape)
            self.now += self.cost(*shape[:1], shape[1] - 1) + (0.5 if shape not in self.seen else 0.0)
            self.seen.add(shape)
        return self.forward_rows(cache, tokens, starts, lengths, **options)

    def __call__(self) -> float:
        return self.now


def scripted_cost(rows: int, gamma: int) -> float:
    """Not linear in Γ (so the line between timed Γs shows), and 2 rows cheaper than 1 at Γ = 0."""
    cost = 0.01 * (1 + rows * (gamma + 1)) + 0.001 * gamma ** 2
    return cost * 0.5 if rows == 2 and gamma == 0 else cost


@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_a_batched_step_costs_its_steady_time_per_bucket_on_lines_between_the_timed_gammas(weights, kind, monkeypatch):
    """max_batch 3 (buckets 1, 2, 4; bucket 4 runs 3 rows), Γ up to 5 (timed: 0, 1, 2, 4, 5), a small
    KV cache (rows start over): each timed (bucket, Γ) costs its scripted step, not its first one; Γ 3
    lies on the line between 2 and 4; bucket 2's cheap plain step is raised to bucket 1's. n-gram rows,
    which find nothing in the prompt, draft in full while timed (else the widths, and costs, differ)
    and are given back after; the engine is left idle."""
    target = LeanModel(weights, max_seq_len=64)
    clock = ScriptedTarget(target, scripted_cost)
    monkeypatch.setattr(time, "perf_counter", clock)
    drafter = NgramDrafter() if kind == "ngram" else ModelDrafter(LeanModel(weights, num_layers=1, max_seq_len=64))
    engine = BatchEngine(target, drafter.rows, gamma=5, max_batch=3)
    rows_drafter = engine.drafter
    costs = measure_batch_costs(engine, 5)
    assert sorted(costs) == [1, 2, 4] and all(len(row) == 6 for row in costs.values())
    timed = sorted(set(BATCH_GAMMAS) | {5})
    expected = {}
    for bucket in (1, 2, 4):
        at = {g: scripted_cost(min(bucket, 3), g) for g in timed}
        expected[bucket] = [at[0], at[1], at[2], (at[2] + at[4]) / 2, at[4], at[5]]
    expected[2][0] = expected[1][0]  # more rows do not cost less
    for bucket in (1, 2, 4):
        assert costs[bucket] == pytest.approx(expected[bucket], rel=1e-9), bucket
    assert engine.drafter is rows_drafter and (isinstance(rows_drafter, NgramRows) or kind == "model")
    assert engine.num_running == 0 and engine.rows == [] and engine.step() == []


def test_buckets_past_the_time_budget_cost_the_last_timed_one_scaled_by_rows(weights, monkeypatch):
    """With no budget left after the first bucket (a CPU where big batched steps take seconds), bucket 1
    is timed and every larger one is its table times its rows (max_batch 3: bucket 4 runs 3 rows)."""
    monkeypatch.setattr(calibrate, "BATCH_BUDGET_S", 0.0)
    drafter = ModelDrafter(LeanModel(weights, num_layers=1, max_seq_len=64))
    engine = BatchEngine(LeanModel(weights, max_seq_len=64), drafter.rows, gamma=4, max_batch=3)
    costs = measure_batch_costs(engine, 4)
    assert sorted(costs) == [1, 2, 4]
    assert costs[2] == pytest.approx([2 * t for t in costs[1]]) and costs[4] == pytest.approx([3 * t for t in costs[1]])
    assert engine.num_running == 0


@pytest.mark.parametrize("graphs", [False, True])
def test_timing_a_real_engine_gives_a_table_the_policy_takes(weights, graphs):
    """With the real clock, eager and with the padded static forward behind CUDA graphs: positive
    seconds for every bucket up to max_batch and Γ, which LoadGamma and an engine of that size take."""
    drafter = ModelDrafter(LeanModel(weights, num_layers=1, max_seq_len=128))
    engine = BatchEngine(LeanModel(weights, max_seq_len=128), drafter.rows, gamma=4, max_batch=5, graphs=graphs)
    costs = BatchStepCosts(measure_batch_costs(engine, 4), "measured")
    assert costs.max_rows == 8 and costs.max_gamma == 4
    policy = LoadGamma(costs)
    assert BatchEngine(LeanModel(weights, max_seq_len=128), drafter.rows, gamma="auto", max_batch=5,
                       policy=policy).gamma == 4
    with pytest.raises(ValueError, match="covers batches of up to 8 rows"):
        BatchEngine(LeanModel(weights, max_seq_len=128), drafter.rows, gamma="auto", max_batch=9, policy=policy)


def test_bad_timing_and_table_inputs_raise_a_clear_error(weights):
    drafter = ModelDrafter(LeanModel(weights, num_layers=1, max_seq_len=128))
    engine = BatchEngine(LeanModel(weights, max_seq_len=128), drafter.rows, gamma=2, max_batch=2)
    with pytest.raises(ValueError, match="gamma >= 4"):
        measure_batch_costs(engine, 4)
    with pytest.raises(ValueError, match="integer in 0..2"):
        engine.step(3)
    with pytest.raises(ValueError, match="too small"):
        measure_batch_costs(BatchEngine(LeanModel(weights, max_seq_len=12), drafter.rows, gamma=8, max_batch=2), 8)
    with pytest.raises(ValueError, match="batch buckets 1, 2, 4"):
        BatchStepCosts({1: (1.0, 2.0), 4: (1.0, 2.0)})
    with pytest.raises(ValueError, match="positive finite"):
        BatchStepCosts({1: (1.0, 2.0), 2: (1.0,)})
    with pytest.raises(ValueError, match="past the step-cost table"):
        nominal_batch_costs(4).cost(5, 0)
    with pytest.raises(ValueError, match="max_gamma must be in 1..8"):
        LoadGamma(nominal_batch_costs(4), max_gamma=9)
    with pytest.raises(ValueError, match="accepted draft tokens"):
        LoadGamma(nominal_batch_costs(4)).observe(3, 2)


# ================================================================ kept in the cache

KEY = {"machine": "test", "target": "abc", "max_batch": 2, "max_gamma": 2}


class Measure:
    def __init__(self, costs=None) -> None:
        self.costs = costs or {1: (0.01, 0.02, 0.025), 2: (0.011, 0.03, 0.04)}
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.costs


def test_batched_costs_are_measured_once_kept_and_read_back_exactly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    measure = Measure({1: (0.1 / 3, 0.2 / 3, 0.07), 2: (1e-3 / 7, 0.3 / 7, 2 / 3)})  # floats that print long
    first = batch_step_costs(KEY, measure, nominal_batch_costs(2, 2))
    [line] = capsys.readouterr().err.strip().splitlines()
    path = keyed_file("batch-step-costs", KEY)
    assert path.is_relative_to(tmp_path / "cache" / "batch-step-costs")
    assert "timing batched steps once" in line and str(path) in line
    assert first == BatchStepCosts(measure.costs, "measured")
    assert json.loads(path.read_text())["key"] == KEY
    again = batch_step_costs(KEY, measure, nominal_batch_costs(2, 2))
    assert measure.calls == 1 and again.step == first.step and again.how == "cached"
    assert capsys.readouterr().err == ""
    assert batch_step_costs({**KEY, "graphs": True}, measure, nominal_batch_costs(2, 2)).how == "measured"
    monkeypatch.setenv("SPECULANT_RECALIBRATE", "1")
    assert batch_step_costs(KEY, measure, nominal_batch_costs(2, 2)).how == "measured"
    assert measure.calls == 3


def _record(**changes) -> bytes:
    return json.dumps({"format": BATCH_CACHE_FORMAT, "key": KEY, "step_costs": {"1": [1, 2, 3], "2": [2, 3, 4]},
                       **changes}).encode()


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not readable JSON"),
    (b"\xff\xfe\x00", "not readable JSON"),
    (b"[1, 2, 3]", f"not a format-{BATCH_CACHE_FORMAT} batched step-cost file"),
    (_record(format=BATCH_CACHE_FORMAT - 1), f"not a format-{BATCH_CACHE_FORMAT} batched step-cost file"),
    (_record(key={**KEY, "target": "other"}), "written for another setup"),
    (_record(step_costs=[1, 2, 3]), "not {batch bucket: costs}"),
    (_record(step_costs={"1": [1, 2, 3]}), "the table has the wrong size"),
    (_record(step_costs={"1": [1, 2], "2": [2, 3]}), "the table has the wrong size"),
    (_record(step_costs={"1": [1, -2, 3], "2": [2, 3, "x"]}), "positive finite"),
    (_record(step_costs={"1": [1, 2, 3], "3": [2, 3, 4]}), "batch buckets 1, 2, 4"),
])
def test_a_damaged_batched_cache_file_is_said_in_one_line_and_measured_again(tmp_path, monkeypatch, capsys,
                                                                            content, reason):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    path = keyed_file("batch-step-costs", KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        read_batch_costs(path, KEY)
    measure = Measure()
    costs = batch_step_costs(KEY, measure, nominal_batch_costs(2, 2))
    lines = capsys.readouterr().err.strip().splitlines()
    assert "is damaged" in lines[0] and reason in lines[0] and str(path) in lines[0]
    assert "Traceback" not in "".join(lines)
    assert measure.calls == 1 and costs.step == measure.costs
    assert read_batch_costs(path, KEY).step == measure.costs  # written anew


def test_where_the_cache_cannot_be_written_the_nominal_batched_table_serves(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SPECULANT_CACHE", str(blocker / "cache"))  # a folder under a file: mkdir fails
    measure = Measure()
    costs = batch_step_costs(KEY, measure, nominal_batch_costs(2, 2))
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "cannot keep batched step costs" in line and "nominal" in line
    assert measure.calls == 0 and costs == nominal_batch_costs(2, 2)


# ================================================================ simulations over a table


def expected_tokens(gamma: int, alpha: float) -> float:
    return sum(alpha ** k for k in range(gamma + 1))


def simulate(policy: LoadGamma, costs: BatchStepCosts, schedule: list[tuple[int, int]], alphas, seed: int):
    """Run the policy over `schedule` [(rows, steps)]: row b of a batch accepts each draft position with
    probability alphas[b % len(alphas)] until its first rejection, and ends after 20-200 tokens, a new
    request taking its row (its own counts start at zero). Returns the tokens per second of each
    phase of the schedule and the Γ of every step."""
    rng = random.Random(seed)
    rates, chosen = [], []
    for rows, steps in schedule:
        counts = [[0, 0] for _ in range(rows)]
        left = [rng.randint(20, 200) for _ in range(rows)]
        tokens = seconds = 0.0
        for _ in range(steps):
            gamma = policy.choose(rows, [tuple(c) for c in counts])
            accepted_all = tested_all = 0
            for b in range(rows):
                accepted = 0
                while accepted < gamma and rng.random() < alphas[b % len(alphas)]:
                    accepted += 1
                tested = min(accepted + 1, gamma)
                counts[b][0] += accepted
                counts[b][1] += tested
                accepted_all, tested_all = accepted_all + accepted, tested_all + tested
                tokens += accepted + 1
                left[b] -= accepted + 1
                if left[b] <= 0:
                    counts[b], left[b] = [0, 0], rng.randint(20, 200)
            policy.observe(accepted_all, tested_all)
            seconds += costs.cost(rows, gamma)
            chosen.append(gamma)
        rates.append(tokens / seconds)
    return rates, chosen


def fixed_rates(costs: BatchStepCosts, schedule, alphas, gamma: int) -> list[float]:
    """The exact expected tokens per second of a fixed Γ in each phase of the schedule."""
    return [sum(expected_tokens(gamma, alphas[b % len(alphas)]) for b in range(rows)) / costs.cost(rows, gamma)
            for rows, _ in schedule]


def overall(rates: list[float], schedule) -> float:
    """Tokens per second over a workload of rows × steps tokens in each phase (what the phases would
    take at these rates: a phase of large batches does not drown the others)."""
    work = [rows * steps for rows, steps in schedule]
    return sum(work) / sum(w / r for w, r in zip(work, rates))


def test_gamma_shrinks_to_plain_decoding_as_the_batch_grows():
    """A table where speculation pays at small batches and not at large ones, rows accepting 0.8:
    Γ > 0 at one row, then no longer as rows are added, and 0 at 256 rows."""
    costs = table(gpu_like)
    policy = LoadGamma(costs)
    settled = {}
    for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        _, chosen = simulate(policy, costs, [(rows, 60)], [0.8], seed=rows)
        settled[rows] = max(set(chosen[-30:]), key=chosen[-30:].count)
    assert settled[1] >= 3, settled
    sizes = sorted(settled)
    assert all(settled[a] >= settled[b] for a, b in itertools.pairwise(sizes)), settled
    assert settled[256] == 0 and settled[16] < settled[1], settled


CHANGING_LOAD = [(1, 200), (16, 100), (4, 150), (128, 40)]


@pytest.mark.parametrize("alphas", [[0.8], [0.9, 0.3], [0.6, 0.7, 0.5, 0.95], [0.05]],
                         ids=["good", "mixed", "varied", "useless"])
@pytest.mark.parametrize("schedule", [[(1, 600)], [(8, 300)], [(64, 100)], CHANGING_LOAD],
                         ids=["one-row", "8-rows", "64-rows", "changing-load"])
def test_the_policy_is_within_5_percent_of_the_best_fixed_gamma(alphas, schedule):
    """Expected tokens per second from the table: the policy (learning acceptance from the rows as
    they run, requests coming and going) against every fixed Γ, scored exactly."""
    costs = table(gpu_like)
    best = max(overall(fixed_rates(costs, schedule, alphas, gamma), schedule) for gamma in range(costs.max_gamma + 1))
    rates, chosen = simulate(LoadGamma(costs), costs, schedule, alphas, seed=7)
    assert overall(rates, schedule) >= 0.95 * best, (overall(rates, schedule) / best, chosen[-30:])


def test_under_a_changing_load_auto_beats_every_fixed_gamma():
    """No fixed Γ fits every batch size; the policy, choosing per size, does better than the best of
    them (what auto is for)."""
    costs = table(gpu_like)
    fixed = [overall(fixed_rates(costs, CHANGING_LOAD, [0.8], gamma), CHANGING_LOAD) for gamma in range(9)]
    rates, _ = simulate(LoadGamma(costs), costs, CHANGING_LOAD, [0.8], seed=3)
    assert overall(rates, CHANGING_LOAD) > 1.02 * max(fixed)


def test_a_seeded_simulation_is_the_same_every_time():
    costs = table(gpu_like)
    runs = [simulate(LoadGamma(costs), costs, [(1, 100), (64, 50), (2, 100)], [0.7, 0.4], seed=11) for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0][1])) > 2
