"""No bad input ends in a traceback: hypothesis drives the CLI and the Python API with arbitrary
flags, values, prompt bytes, API arguments and truncated or corrupted model files and draft folders.

The CLI must answer 0 (done) or 2 (bad input, one line that says what to do), never 1 (an internal
error) and never a traceback. The API must either work or raise ValueError / TypeError from
speculant's own code (a message we wrote), never an error from inside torch, tokenizers or struct.
Everything runs on a tiny Llama folder built here (a byte-level tokenizer, 2 layers), so an example
costs milliseconds; the examples are derandomized, so CI sees the same ones every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_loading import byte_level_gguf_vocab, save_folder, tiny_hf_model, write_gguf

from speculant import api
from speculant.cli import main
from speculant.distill.data import TokenCorpus
from speculant.distill.options import DistillOptions
from speculant.distill.train import train_draft

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny HF folder (the target), the same model as GGUF, and a distilled draft folder for it."""
    root = tmp_path_factory.mktemp("fuzz")
    os.environ["SPECULANT_CACHE"] = str(root / "cache")  # converted GGUFs go here, not in the user's cache
    vocab = byte_level_gguf_vocab()
    hf_model = tiny_hf_model("llama", vocab_size=len(vocab["tokens"]), max_position_embeddings=64)
    target = save_folder(hf_model, root / "tiny")
    gguf = write_gguf(root / "tiny.gguf", "llama", hf_model, **vocab)
    loaded = api.load_model(str(target))
    corpus = TokenCorpus(torch.randint(0, 200, (8, 16)), torch.randint(0, 200, (4, 16)), {})
    options = DistillOptions(steps=0, batch_size=2, seq_len=16, num_kept=64, eval_sequences=2, engine_prompts=0,
                             progress=False, save_dtype="float32")
    draft = root / "draft"
    train_draft(loaded.model, corpus, draft, options, target_name=loaded.name, target_hash=loaded.source_hash)
    yield {"target": str(target), "gguf": str(gguf), "draft": str(draft), "root": root}
    os.environ.pop("SPECULANT_CACHE", None)


def run_cli(argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    real_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        sys.stdin = real_stdin
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str, argv) -> None:
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert "error:" in last and len(last) < 600, (argv, err)


# ---- the command line ---------------------------------------------------------------------------

# values that have broken parsers before: empty, signs, non-numbers, huge, NaN, paths that are not there
ODD_VALUES = ["", "0", "-1", "1", "2", "3", "0.5", "1e309", "nan", "inf", "-inf", "auto", "x", "none", "ngram",
              "ngram:0", "ngram:2:5", "ngram:x:y:z", "layers:0", "layers:1", "layers:2", "layers:-1", "int8",
              "default", "cuda", "cuda:0", "cpu", "float32", "bfloat16", "/no/such/path", ".", "999999999999",
              "\x00", "--", "-", "smollm2-135m-draft", "gemma3-270m"]
VALID = {  # flag -> values that fit it ("DRAFT" stands for the distilled draft folder built here)
    "--draft": ["ngram", "ngram:2", "ngram:3:2", "none", "default", "layers:1", "int8", "DRAFT"],
    "--gamma": ["1", "2", "4", "auto"], "--candidates": ["1", "2"], "--lookup": ["0", "4"], "--device": ["cpu"],
    "--dtype": ["float32", "bfloat16"], "--max-seq-len": ["8", "16", "64"], "--temperature": ["0", "0.7", "1.3"],
    "--top-k": ["0", "1", "5"], "--top-p": ["0.5", "0.9", "1"], "--min-p": ["0", "0.1"],
    "--max-new-tokens": ["0", "1", "4", "8"], "--seed": ["0", "1", "7"], "--stop": ["a", " ", "\n", "ab"],
    "--system": ["", "Be brief.", "caf\u00e9"], "--logprobs": ["0", "2"],
    "--prompts-file": ["/no/such/file"],
}
# each flag gets a value that fits it, or one time in eight an odd one (or any text)
FLAGS = {flag: st.integers(1, 8).flatmap(lambda n, values=values: st.sampled_from(values) if n > 1 else st.one_of(
    st.sampled_from(ODD_VALUES), st.text(max_size=6))) for flag, values in VALID.items()}
SWITCHES = ["--chat", "--json", "--compare"]
argv_bytes = st.binary(max_size=24).map(lambda b: b.decode("utf-8", "surrogateescape"))  # as Python gives argv


@st.composite
def generate_argv(draw):
    argv = []
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS) + SWITCHES), max_size=5)):
        argv += [flag] if flag in SWITCHES else [flag, draw(FLAGS[flag])]
    prompt = draw(st.one_of(st.text(min_size=1, max_size=30), st.text(max_size=30), argv_bytes, st.just("-"),
                            st.none()))
    return argv + ([] if prompt is None else ["--", prompt]), draw(st.binary(max_size=40))


@FUZZ
@given(case=generate_argv())
def test_any_generate_flags_and_prompt_bytes_give_a_result_or_one_line(files, case):
    argv, stdin = case
    argv = [files["draft"] if value == "DRAFT" else value for value in argv]
    full = ["generate", "--target", files["target"], "--max-new-tokens", "3", *argv]
    code, out, err = run_cli(full, stdin)
    assert_clean(code, err, full)
    if code == 0 and "--json" in argv and "--prompts-file" not in argv:
        json.loads(out.strip().splitlines()[-1], parse_constant=_refuse)


def _refuse(name):
    raise AssertionError(f"{name} in JSON output")


@FUZZ
@given(lines=st.lists(st.one_of(st.text(max_size=20).map(json.dumps), st.binary(max_size=20).map(
    lambda b: b.decode("latin-1")), st.sampled_from(['{"prompt": ""}', '{"messages": []}', '{"messages": [{}]}',
                                                     '{"messages": [{"role": "user", "content": "hi"}]}',
                                                     '{"prompt": 3}', '{"prompt": "a", "system": null}', "[1, 2]",
                                                     '{"prompt": "a", "extra": 1}', "nan"])), max_size=4))
def test_any_prompts_file_gives_one_result_a_line_or_one_line_naming_the_line(files, lines):
    path = files["root"] / "prompts.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    argv = ["generate", "--target", files["target"], "--max-new-tokens", "2", "--prompts-file", str(path)]
    code, out, err = run_cli(argv)
    assert_clean(code, err, lines)
    if code == 0:
        results = [json.loads(line, parse_constant=_refuse) for line in out.splitlines()]
        assert [r["index"] for r in results] == list(range(len(results))) and results
    else:
        assert "--prompts-file" in err


def test_the_commands_of_the_issue_give_clear_messages(files):
    code, _, err = run_cli(["generate", "--target", files["target"], "--max-new-tokens", "6",
                            b"caf\xe9 \xff\xfe bad".decode("utf-8", "surrogateescape")])
    assert code == 2 and "the prompt is not valid UTF-8: byte(s) e9 at character 3" in err
    code, _, err = run_cli(["generate", "--target", files["target"], "-"], stdin=b"caf\xe9")
    assert code == 2 and "the prompt read from stdin is not valid UTF-8: byte 0xe9 at offset 3" in err
    code, _, err = run_cli(["generate", "--top-p", "2", "x"])
    assert code == 2 and "argument --top-p" in err and "top_p" not in err
    code, _, err = run_cli(["generate", "--target", files["target"], "--max-new-tokens", "100000", "--max-seq-len",
                            "16", "hello"])
    assert code == 0 and "KV cache of 16 tokens is full; raise --max-seq-len (up to tiny's context of 64)" in err
    code, out, _ = run_cli(["--version"])
    assert code == 0 and out.startswith("speculant ")


# ---- model files and draft folders ---------------------------------------------------------------
# The loader's messages for these belong to speculant.models (a truncated GGUF should say it is
# truncated); this test pins only that every one is a single line with exit status 2.

@st.composite
def damaged_file(draw, size: int):
    how = draw(st.sampled_from(["truncate", "flip"]))
    if how == "truncate":
        return how, draw(st.integers(0, size - 1)), 0
    return how, draw(st.integers(0, size - 1)), draw(st.integers(1, 255))


def damage(source: Path, target: Path, how: str, at: int, xor: int) -> None:
    data = bytearray(source.read_bytes())
    if how == "truncate":
        data = data[:at]
    else:
        data[at] ^= xor
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["gguf", "config.json", "model.safetensors", "tokenizer.json",
                                  "draft config.json", "draft model.safetensors"])
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_truncated_or_corrupt_model_files_and_draft_folders_give_one_line(files, kind, data):
    root = files["root"] / "damaged"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir()
    os.environ["SPECULANT_CACHE"] = str(root / "cache")  # a damaged file converts afresh (its hash differs)
    try:
        if kind == "gguf":
            source = Path(files["gguf"])
            target = root / "tiny.gguf"
            damage(source, target, *data.draw(damaged_file(source.stat().st_size)))
            argv = ["generate", "--target", str(target), "--draft", "ngram", "--max-new-tokens", "2", "hi"]
        elif kind.startswith("draft"):
            import shutil

            folder = shutil.copytree(files["draft"], root / "draft")
            name = kind.split()[1]
            damage(Path(files["draft"]) / name, folder / name, *data.draw(damaged_file((folder / name).stat().st_size)))
            argv = ["generate", "--target", files["target"], "--draft", str(folder), "--max-new-tokens", "2", "hi"]
        else:
            import shutil

            folder = shutil.copytree(files["target"], root / "tiny")
            damage(Path(files["target"]) / kind, folder / kind,
                   *data.draw(damaged_file((folder / kind).stat().st_size)))
            argv = ["generate", "--target", str(folder), "--draft", "ngram", "--max-new-tokens", "2", "hi"]
        code, _, err = run_cli(argv)
    finally:
        os.environ["SPECULANT_CACHE"] = str(files["root"] / "cache")
    assert_clean(code, err, (kind, argv))


# ---- the Python API --------------------------------------------------------------------------------

anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 10 ** 20), st.floats(allow_nan=True),
                     st.text(max_size=8), argv_bytes, st.binary(max_size=4), st.lists(st.integers(-2, 400), max_size=4),
                     st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
messages = st.lists(st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                                     "content": st.one_of(st.text(max_size=10), argv_bytes)}),
                              anything), max_size=3)
def mostly(valid, odd=anything, odds: int = 12):
    """A value that fits, or one time in `odds` an arbitrary one (several odd values would mostly
    stop a request at its first check)."""
    return st.integers(1, odds).flatmap(lambda n: odd if n == 1 else valid)


good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                "content": st.text(max_size=10)}), min_size=1, max_size=3)
REQUEST_OPTIONS = {
    "prompt": mostly(st.one_of(st.text(min_size=1, max_size=20), st.lists(st.integers(0, 260), min_size=1, max_size=5))),
    "messages": st.one_of(good_messages, messages), "system": mostly(st.text(max_size=8)),
    "chat": mostly(st.booleans()), "max_new_tokens": mostly(st.integers(0, 6)),
    "temperature": mostly(st.sampled_from([0, 0.5, 1.0, 2])), "top_k": mostly(st.integers(0, 300)),
    "top_p": mostly(st.floats(0.01, 1.0)), "min_p": mostly(st.floats(0.0, 0.99)), "seed": mostly(st.integers(0, 99)),
    "stop": mostly(st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3))),
    "stop_ids": mostly(st.lists(st.integers(0, 260), max_size=3)), "logprobs": mostly(st.integers(0, 20)),
    "plain": mostly(st.booleans()),
}


def assert_ours(error: BaseException) -> None:
    """A ValueError or TypeError raised by speculant's own code, with a message."""
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    where = traceback.extract_tb(error.__traceback__)[-1].filename
    assert f"{os.sep}speculant{os.sep}" in where and "site-packages" not in where, (repr(error), where)
    assert str(error), repr(error)


@pytest.fixture(scope="module")
def spec(files):
    return api.load(files["target"], draft="ngram", max_seq_len=64)


@FUZZ
@given(options=st.fixed_dictionaries({}, optional=REQUEST_OPTIONS))
def test_any_generate_arguments_work_or_raise_our_value_or_type_error(spec, options):
    if isinstance(options.get("max_new_tokens"), int) and options["max_new_tokens"] > 6:
        options["max_new_tokens"] = 6
    if "prompt" not in options and "messages" not in options:
        options["prompt"] = "hello"
    try:
        result = spec.generate(**options)
    except (ValueError, TypeError) as error:
        assert_ours(error)
        return
    json.dumps(result.stats, allow_nan=False)
    assert len(result.token_ids) <= options.get("max_new_tokens", 128)
    if result.logprobs is not None:
        assert len(result.logprobs) == len(result.token_ids)


LOAD_OPTIONS = {
    "draft": st.one_of(anything, st.sampled_from(ODD_VALUES), st.lists(st.sampled_from(ODD_VALUES), max_size=3)),
    "gamma": st.one_of(anything, st.sampled_from(["auto", 0, 1, 4])), "device": st.one_of(
        anything, st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:x", "mps"])),
    "dtype": anything, "max_seq_len": st.one_of(anything, st.sampled_from([None, 2, 16, 64, 65])),
    "inner_gamma": anything, "candidates": anything, "lookup": anything,
}


@FUZZ
@given(options=st.fixed_dictionaries({}, optional=LOAD_OPTIONS))
def test_any_load_arguments_work_or_raise_our_value_or_type_error(files, options):
    try:
        api.load(files["target"], **options)
    except (ValueError, TypeError) as error:
        assert_ours(error)


# ---- signals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(delay):
    proc = subprocess.Popen([sys.executable, "-m", "speculant.cli", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 130), (proc.returncode, err)  # 0: it had finished before the signal
    if proc.returncode == 130:
        assert err.strip().endswith("speculant: interrupted")
