"""The step costs of `--gamma auto` (speculant.calibrate): measured through the stepper at the steady
cost of each length (one-time costs and steps run alone left out, every length drafted in full),
kept in the cache, read back exactly, a damaged file said in one line and measured again; and, end to
end, a seeded request under `gamma="auto"` gives the same tokens every time, on one loaded object and
on a fresh load that reads the cache."""

from __future__ import annotations

import json

import pytest
from test_loading import save_folder, tiny_hf_model

from speculant import api
from speculant.adaptive import StepCosts, nominal_costs
from speculant.calibrate import CACHE_FORMAT, cache_path, measure_costs, read_costs, step_costs
from speculant.cli import main
from speculant.drafters.lookup import LookupDrafter
from speculant.drafters.model import ModelDrafter
from speculant.drafters.ngram import NgramDrafter
from speculant.fused import FusedStepper
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.sampling import SamplingParams
from speculant.step import GenericStepper, StepResult

COSTS = (1.0, 1.5, 1.4, 1.6, 2.0, 2.1, 2.4)  # seconds by drafted length: 2 cheaper than 1, as BLAS makes it on a CPU


class ScriptedStepper:
    """A stepper whose steps cost COSTS[γ], except the first step of each γ (a graph captured, a
    kernel compiled: +2 s) and, where it runs ahead, a step run alone (a request's first, the one
    after a plain step: 1.3x)."""

    def __init__(self, runs_ahead: bool) -> None:
        self.target = LeanModel(random_weights(tiny_config(vocab_size=16), seed=0), max_seq_len=256)
        self.runs_ahead = runs_ahead
        self.seen: set[int] = set()
        self.previous: int | None = None

    def begin(self, prompt, params) -> None:
        self.previous = None

    def step(self, context, gamma, generator, *, room, next_gamma=None, plain_tokens=1) -> StepResult:
        assert gamma <= room
        seconds = COSTS[gamma] + (2.0 if gamma not in self.seen else 0.0)
        alone = self.runs_ahead and gamma > 0 and (self.previous is None or self.previous == 0)
        self.seen.add(gamma)
        self.previous = gamma
        return StepResult([1] * (gamma + 1), gamma, gamma, None, 0.1 * seconds, 0.9 * seconds * (1.3 if alone else 1.0),
                          alone=alone)


@pytest.mark.parametrize("runs_ahead", [False, True])
def test_a_length_costs_its_steady_step_time_not_a_one_time_cost_or_a_step_run_alone(runs_ahead):
    costs = measure_costs(ScriptedStepper(runs_ahead), len(COSTS) - 1, SamplingParams())
    assert costs == pytest.approx(COSTS)


class Recording:
    """A stepper that remembers what each step drafted."""

    def __init__(self, stepper) -> None:
        self.stepper, self.target, self.runs_ahead = stepper, stepper.target, stepper.runs_ahead
        self.steps: list[tuple[int, int, int]] = []  # (γ asked, drafted, lookup branch's length)

    def begin(self, prompt, params) -> None:
        self.stepper.begin(prompt, params)

    def step(self, context, gamma, *args, **kwargs):
        result = self.stepper.step(context, gamma, *args, **kwargs)
        self.steps.append((gamma, result.num_drafted, result.lookup_drafted))
        return result

    def __getattr__(self, name):  # the proposers measure_costs pads for the length of the measurement
        return getattr(self.stepper, name)

    def __setattr__(self, name, value):
        if name in ("ngram", "drafter"):
            setattr(self.stepper, name, value)
        else:
            super().__setattr__(name, value)


def _pair():
    weights = random_weights(tiny_config(vocab_size=16), seed=0, scale=2.0)
    return LeanModel(weights, max_seq_len=96), LeanModel(weights, num_layers=1, max_seq_len=96)


@pytest.mark.parametrize("kind", ["ngram-generic", "ngram-fused", "lookup-generic", "lookup-fused"])
def test_deterministic_proposers_are_measured_at_full_length_and_given_back_after(kind):
    """An n-gram drafter proposes nothing on a miss and the lookup branch may be short: while
    measuring, each proposes all it is asked for, so each length is timed with the tree it makes. The
    fused stepper's lookup branch is found inside its graph, whose tree has the whole branch (G nodes)
    whatever the branch's length: nothing to pad."""
    target, draft = _pair()
    ngram = NgramDrafter()
    if kind == "ngram-generic":
        stepper, lookup = GenericStepper(target, ngram), 0
    elif kind == "ngram-fused":
        stepper, lookup = FusedStepper(target, None, ngram=ngram, compile=False), 0
    elif kind == "lookup-generic":
        stepper, lookup = GenericStepper(target, LookupDrafter(ModelDrafter(draft), ngram, 5)), 5
    else:
        stepper, lookup = FusedStepper(target, draft, ngram=ngram, compile=False, lookup=5), 5
    before = (getattr(stepper, "ngram", None), getattr(stepper, "drafter", None))
    recording = Recording(stepper)
    costs = measure_costs(recording, 4, SamplingParams(), lookup=lookup)
    assert len(costs) == 5 and all(c > 0 for c in costs)
    drafting = [(g, d, branch) for g, d, branch in recording.steps if g > 0]
    if kind == "lookup-fused":
        assert drafting and all(d == max(g, branch) for g, d, branch in drafting), recording.steps
        assert all(key[-1] == lookup for key in stepper.graphs if key[0] == "model")  # (.., γ, W, K, G)
    else:
        assert drafting and all(d == max(g, lookup) and branch == lookup for g, d, branch in drafting), recording.steps
    assert (getattr(stepper, "ngram", None), getattr(stepper, "drafter", None)) == before


def test_a_run_ahead_stepper_is_measured_running_ahead():
    """The fused feature-draft stepper with run-ahead (on the CPU its graph bodies run eagerly): most
    measured steps were launched before the one before them was read, as requests run them."""
    from test_features import feature_pair

    target, draft = feature_pair(8, seed=5, kept=6, max_seq_len=256)
    stepper = FusedStepper(target, draft, compile=False, run_ahead=True)
    stepper.reserve(6)
    recording = Recording(stepper)
    costs = measure_costs(recording, 6, SamplingParams(), budget=0.0)
    assert len(costs) == 7 and all(c > 0 for c in costs)
    assert stepper.ahead_launches > len(recording.steps) // 2


KEY = {"machine": "test", "target": "abc", "max_gamma": 3, "sampled": False}


class Measure:
    def __init__(self, costs=(0.01, 0.02, 0.025, 0.03)) -> None:
        self.costs, self.calls = costs, 0

    def __call__(self):
        self.calls += 1
        return self.costs


def test_costs_are_measured_once_kept_and_read_back_exactly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    measure = Measure((0.1 / 3, 0.2 / 3, 0.07, 1e-3 / 7))  # floats that print long: read back to the bit
    first = step_costs(KEY, measure, nominal_costs(3))
    err = capsys.readouterr().err
    path = cache_path(KEY)
    assert path.is_relative_to(tmp_path / "cache" / "step-costs")
    assert len(err.strip().splitlines()) == 1 and "timing steps once" in err and str(path) in err
    assert first == StepCosts(measure.costs, "measured")
    assert json.loads(path.read_text())["key"] == KEY
    again = step_costs(KEY, measure, nominal_costs(3))
    assert measure.calls == 1 and again.step == first.step and again.how == "cached"
    assert capsys.readouterr().err == ""
    assert step_costs({**KEY, "sampled": True}, measure, nominal_costs(3)).how == "measured"  # another key
    monkeypatch.setenv("SPECULANT_RECALIBRATE", "1")
    step_costs(KEY, measure, nominal_costs(3))
    assert measure.calls == 3


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not readable JSON"),
    (b"\xff\xfe\x00", "not readable JSON"),
    (b"[1, 2, 3]", f"not a format-{CACHE_FORMAT} step-cost file"),
    (json.dumps({"format": CACHE_FORMAT - 1, "key": KEY, "step_costs": [1, 2, 3, 4]}).encode(),
     f"not a format-{CACHE_FORMAT} step-cost file"),  # measured the old way
    (json.dumps({"format": CACHE_FORMAT, "key": {**KEY, "target": "other"}, "step_costs": [1, 2, 3, 4]}).encode(),
     "written for another setup"),
    (json.dumps({"format": CACHE_FORMAT, "key": KEY, "step_costs": [1, 2]}).encode(), "the table has the wrong length"),
    (json.dumps({"format": CACHE_FORMAT, "key": KEY, "step_costs": [1, -2, 3, "x"]}).encode(), "positive finite"),
    (json.dumps({"format": CACHE_FORMAT, "key": KEY, "step_costs": {"a": 1}}).encode(), "the table has the wrong length"),
])
def test_a_damaged_cache_file_is_said_in_one_line_and_measured_again(tmp_path, monkeypatch, capsys, content, reason):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    path = cache_path(KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        read_costs(path, KEY)
    measure = Measure()
    costs = step_costs(KEY, measure, nominal_costs(3))
    lines = capsys.readouterr().err.strip().splitlines()
    assert "is damaged" in lines[0] and reason in lines[0] and str(path) in lines[0]
    assert "Traceback" not in "".join(lines)
    assert measure.calls == 1 and costs.step == measure.costs
    assert read_costs(path, KEY).step == measure.costs  # written anew


def test_where_the_cache_cannot_be_written_the_nominal_table_serves(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SPECULANT_CACHE", str(blocker / "cache"))  # a folder under a file: mkdir fails
    measure = Measure()
    costs = step_costs(KEY, measure, nominal_costs(3))
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "cannot keep step costs" in line and "nominal" in line
    assert measure.calls == 0 and costs == nominal_costs(3)


# ================================================================ reproducible, end to end


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    # a 4-layer target drafted by its own first layer: acceptance is neither 0 nor 1
    model = tiny_hf_model("llama", vocab_size=261, num_hidden_layers=4, max_position_embeddings=128)
    return str(save_folder(model, tmp_path_factory.mktemp("auto") / "tiny"))


def test_a_seeded_request_under_auto_gives_the_same_tokens_every_time_and_on_a_fresh_load(
        target, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    first = api.load(target, draft="layers:1", gamma="auto", max_seq_len=128)
    runs = [first.generate("ab cd", max_new_tokens=60, temperature=1.0, seed=11) for _ in range(2)]
    err = capsys.readouterr().err
    assert err.count("timing steps once") == 1  # measured on first use, then kept
    second = api.load(target, draft="layers:1", gamma="auto", max_seq_len=128)  # as a new process would
    runs.append(second.generate("ab cd", max_new_tokens=60, temperature=1.0, seed=11))
    assert "timing steps" not in capsys.readouterr().err  # read from the cache
    assert second.step_costs[True].how == "cached" and second.step_costs[True].step == first.step_costs[True].step
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids
    assert runs[0].stats["gamma_history"] == runs[1].stats["gamma_history"] == runs[2].stats["gamma_history"]
    # another seed draws otherwise (the seed is honoured), and greedy output is plain greedy output
    assert first.generate("ab cd", max_new_tokens=60, temperature=1.0, seed=12).token_ids != runs[0].token_ids
    greedy = second.generate("ab cd", max_new_tokens=60)
    assert greedy.token_ids == second.generate("ab cd", max_new_tokens=60, plain=True).token_ids


def test_auto_takes_a_lookup_branch_and_keeps_greedy_output(target, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    spec = api.load(target, draft="layers:1", gamma="auto", lookup=6, candidates=2, max_seq_len=128)
    prompt = "ab cd ab cd ab cd ab"
    out = spec.generate(prompt, max_new_tokens=40)
    assert out.token_ids == spec.generate(prompt, max_new_tokens=40, plain=True).token_ids
    assert out.stats["gamma"] == "auto" and spec.step_costs[False].max_gamma == 12
    assert spec.generate(prompt, max_new_tokens=40).token_ids == out.token_ids


def test_the_cli_says_once_where_the_costs_are_kept_and_a_damaged_file_in_one_line(target, tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    argv = ["generate", "--target", target, "--draft", "layers:1", "--gamma", "auto", "--lookup", "4",
            "--max-seq-len", "128", "--max-new-tokens", "8", "ab cd"]
    assert main(argv) == 0
    [line] = [line for line in capsys.readouterr().err.splitlines() if "step" in line and "cache" in line]
    path = next((tmp_path / "cache" / "step-costs").glob("*.json"))
    assert "timing steps once" in line and str(path) in line
    path.write_text("{damaged")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "is damaged" in err and "Traceback" not in err
    json.loads(path.read_text())  # measured again and kept


def test_greedy_and_sampled_requests_each_get_their_own_table(target, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    spec = api.load(target, draft="layers:1", gamma="auto", max_seq_len=128)
    spec.generate("ab", max_new_tokens=4)
    spec.generate("ab", max_new_tokens=4, temperature=0.8)
    assert set(spec.step_costs) == {False, True}
    assert len(list((tmp_path / "cache" / "step-costs").glob("*.json"))) == 2
