"""The `speculant` CLI and Python API on the real embedded SmolLM2-135M (float32, CPU)."""

import json
import subprocess
import sys

import pytest

from speculant import api, chain
from speculant.cli import main

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n\ndef normalize(x):"]
SCHEMA = {"text", "token_ids", "stats"}
STATS = {"alpha", "tau", "target_calls", "new_tokens", "tokens_per_s", "gamma"}


@pytest.fixture(autouse=True, scope="module")
def each_model_loaded_once():
    """Every CLI call loads its target afresh (1-5 s on 2 cores); here the real loader runs once per
    (model, options) and later calls get the same LoadedModel, as `speculant bench` shares one target
    among its methods (each request truncates the target's cache first). Failed loads are not kept."""
    real = api.load_model
    loaded = {}

    def load_once(spec, **options):
        key = (str(spec), tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in loaded:
            loaded[key] = real(spec, **options)
        return loaded[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(api, "load_model", load_once)
    patch.setattr(chain, "load_model", load_once)  # draft models
    yield
    patch.undo()


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args):
    code, out, err = run_cli(capsys, "generate", "--json", *args)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("draft", ["ngram", "layers:8", "default"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculative_greedy_output_equals_plain_greedy_on_real_prompts(capsys, draft, prompt):
    result = run_json(capsys, "--draft", draft, "--compare", "--max-new-tokens", "24", prompt)
    assert SCHEMA <= result.keys() and STATS <= result["stats"].keys()
    assert {"plain", "speedup", "identical"} <= result.keys()
    assert {"token_ids", "tokens_per_s"} <= result["plain"].keys()
    assert result["identical"] is True
    assert result["token_ids"] == result["plain"]["token_ids"]
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) <= 24
    assert result["stats"]["target_calls"] <= result["stats"]["new_tokens"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_candidates_keep_greedy_output_of_the_real_model_and_raise_tau(capsys, prompt):
    chain = run_json(capsys, "--compare", "--max-new-tokens", "32", prompt)
    tree = run_json(capsys, "--candidates", "4", "--compare", "--max-new-tokens", "32", prompt)
    assert tree["identical"] is True and tree["token_ids"] == chain["token_ids"]
    # greedy and deterministic: on these prompts the alternatives only add kept tokens
    assert tree["stats"]["tau"] >= chain["stats"]["tau"]


def test_a_lookup_branch_keeps_greedy_output_of_the_real_model_and_is_used_on_code_that_repeats(capsys):
    # the prompt names the function twice and repeats a line: the continuation copies from it
    prompt = ("def clip(values, low, high):\n    return [min(max(v, low), high) for v in values]\n\n\n"
              "def clip_all(rows, low, high):\n    return [clip(")
    chain = run_json(capsys, "--candidates", "4", "--gamma", "3", "--max-new-tokens", "40", prompt)
    both = run_json(capsys, "--candidates", "4", "--gamma", "3", "--lookup", "8", "--compare", "--max-new-tokens",
                    "40", prompt)
    assert both["identical"] is True and both["token_ids"] == chain["token_ids"]
    assert both["stats"]["lookup_tokens"] > 0
    assert both["stats"]["target_calls"] <= chain["stats"]["target_calls"]


def test_hierarchical_drafts_and_auto_gamma_keep_greedy_output_and_report_each_level(capsys):
    result = run_json(capsys, "--draft", "layers:8", "--draft", "ngram", "--gamma", "auto", "--compare",
                      "--max-new-tokens", "24", PROMPTS[0])
    assert result["identical"] is True
    assert result["stats"]["gamma"] == "auto"
    [level] = result["stats"]["levels"]
    assert 0.0 <= level["alpha"] <= 1.0 and level["tau"] >= 1.0
    assert level["cost_ratio"] >= 0.0 and result["stats"]["cost_ratio"] > 0.0  # each level's c
    assert len(result["stats"]["gamma_history"]) == result["stats"]["target_calls"]


@pytest.mark.parametrize("below", ["default", "ngram"])
def test_the_int8_copy_drafted_in_turn_keeps_greedy_output_and_is_close_to_the_target(capsys, below):
    result = run_json(capsys, "--draft", "int8", "--draft", below, "--gamma", "6", "--compare",
                      "--max-new-tokens", "24", PROMPTS[0])
    assert result["identical"] is True
    [level] = result["stats"]["levels"]
    assert level["draft"] == "int8" and level["tau"] >= 1.0
    # the int8 copy's greedy tokens are nearly always the target's (α 0.93-0.99 measured on 4 tasks)
    assert result["stats"]["alpha"] > 0.7


def test_a_draft_model_served_in_int8_keeps_greedy_output(capsys):
    # NAME:int8: a model draft (here the target's own file) with int8 matrices; its prompt goes through
    # the float matrices (Int8Matrix.source), its drafting through the int8 ones
    result = run_json(capsys, "--draft", "smollm2-135m:int8", "--compare", "--max-new-tokens", "24", PROMPTS[0])
    assert result["identical"] is True
    assert result["stats"]["alpha"] > 0.7  # close to the model it was made from


def test_sampling_with_a_seed_is_reproducible_and_seeds_differ(capsys):
    args = ["--draft", "ngram", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "16"]
    first = run_json(capsys, *args, "--seed", "1", PROMPTS[1])
    again = run_json(capsys, *args, "--seed", "1", PROMPTS[1])
    other = run_json(capsys, *args, "--seed", "2", PROMPTS[1])
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]


def test_generate_streams_text_to_stdout_and_one_stats_line_to_stderr(capsys):
    code, out, err = run_cli(capsys, "generate", "--draft", "ngram", "--chat", "--max-new-tokens", "12",
                             "Say hello.")
    assert code == 0
    assert out.strip()
    [line] = [l for l in err.splitlines() if l.startswith("[speculant]")]
    assert "alpha=" in line and "tau=" in line and "tok/s=" in line


def test_models_lists_the_embedded_models(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    assert "smollm2-135m" in out and "gemma3-270m" in out and "smollm2-135m-draft" in out


@pytest.mark.parametrize("args, message", [
    (["--target", "no-such-model"], "unknown model 'no-such-model'"),
    (["--temperature", "-1"], "argument --temperature: must be a number >= 0 (0 = greedy), got '-1'"),
    (["--temperature", "nan"], "argument --temperature: must be a number >= 0"),
    (["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1] (1 = off)"),
    (["--top-k", "-3"], "argument --top-k: must be >= 0"),
    (["--min-p", "1.0"], "argument --min-p: must be a number in [0, 1) (0 = off)"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 0"),
    (["--max-new-tokens", "ten"], "argument --max-new-tokens: must be an integer >= 0, got 'ten'"),
    (["--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N"),
    (["--device", "cuda:3"], "device 'cuda:3' asked for"),
    (["--draft", "layers:99"], "layers:99 must be between 1 and 29"),
    (["--draft", "ngram", "--draft", "ngram"], "can only be the last --draft"),
    (["--draft", "ngram:x"], "bad n-gram spec"),
    (["--draft", "int8:int8"], "':int8' follows a draft model that runs on the lean torch model"),
    (["--draft", "default", "--draft", "ngram"], "reads the target's features"),
    (["--draft", "int8", "--draft", "int8", "--draft", "default"], "reads the target's features"),
    (["--draft", "layers:8", "--draft", "default"], "reads the target's features"),
    (["--candidates", "0"], "argument --candidates: must be >= 1"),
    (["--draft", "ngram", "--candidates", "3"], "several candidates per position need one draft model"),
    (["--lookup", "-2"], "argument --lookup: must be >= 0"),
    (["--draft", "ngram", "--lookup", "8"], "for prompt lookup alone use --draft ngram"),
    (["--max-seq-len", "8"], ("do not fit the KV cache of 8 tokens (at least one position must stay free): raise "
                              "--max-seq-len (max_seq_len=) up to smollm2-135m's context of 8192 tokens")),
    (["--stop", ""], "--stop must not be empty"),
    (["--prompts-file", "/no/such/file"], "give either a PROMPT or --prompts-file, not both"),
])
def test_bad_input_gets_one_clear_line_and_exit_status_2(capsys, args, message):
    code, _, err = run_cli(capsys, "generate", *args, "def fibonacci(n): return a long prompt of tokens")
    assert code == 2
    assert message in err.strip().splitlines()[-1]  # one line (a first run also says it converts the model)
    assert "Traceback" not in err


def test_a_draft_with_another_vocabulary_is_refused_by_the_cli(capsys):
    code, _, err = run_cli(capsys, "generate", "--draft", "gemma3-270m", "x")
    assert code == 2 and "does not share the vocabulary" in err and "smollm2-135m" in err


def test_bad_input_from_a_real_process_exits_nonzero_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "speculant.cli", "generate", "--gamma", "0", "x"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "gamma must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "speculant.cli", "generate", "--top-p", "0", "x"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--top-p" in proc.stderr and "Traceback" not in proc.stderr


def test_python_api_generate_and_stream_agree():
    spec = api.load(target="smollm2-135m", draft="ngram", gamma=4)
    result = spec.generate(PROMPTS[0], max_new_tokens=20, temperature=0)
    assert result.text == "".join(spec.stream(PROMPTS[0], max_new_tokens=20, temperature=0))
    assert result.token_ids and 0.0 <= result.stats["alpha"] <= 1.0 and result.stats["tau"] >= 1.0
    plain = spec.generate(PROMPTS[0], max_new_tokens=20, temperature=0, plain=True)
    assert plain.token_ids == result.token_ids
