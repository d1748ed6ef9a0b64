"""The Python API's requests on a tiny Llama folder: stop strings cut inside a block of accepted
draft tokens, chat messages and a system prompt, log-probabilities of the target, one default
temperature (greedy) for the API and the CLI, and the CLI's stdin, --prompts-file and chat REPL."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from test_loading import save_folder, tiny_hf_model

from speculant import api, chain
from speculant.cli import build_parser, main
from speculant.stopping import reference_cut

NEW = 40


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    # 261 ids: the byte-level tokenizer's 256 bytes, 3 special tokens and 2 merges
    return str(save_folder(tiny_hf_model("llama", vocab_size=261, max_position_embeddings=128),
                           tmp_path_factory.mktemp("api") / "tiny"))


@pytest.fixture(scope="module")
def spec(target):
    # the target drafts for itself: at T = 0 every draft token is accepted, so each step fixes a
    # block of γ + 1 tokens, and a stop string can end inside one
    return api.load(target, draft=target, gamma=4, max_seq_len=128)


def test_the_api_the_cli_and_the_server_all_default_to_greedy_decoding(spec):
    assert spec.generate("ab cd", max_new_tokens=12).token_ids == spec.generate(
        "ab cd", max_new_tokens=12, temperature=0).token_ids
    defaults = build_parser().parse_args(["generate", "x"])
    assert defaults.temperature == 0.0 and (defaults.top_k, defaults.top_p, defaults.min_p) == (0, 1.0, 0.0)
    from speculant.server.schemas import ChatCompletionRequest, CompletionRequest

    completion = CompletionRequest(model="m", prompt="x")
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    for request in (completion, chat):
        assert (request.temperature, request.top_k, request.top_p, request.min_p) == (0.0, 0, 1.0, 0.0)


def test_stop_strings_cut_inside_a_block_of_accepted_tokens_as_the_reference_cut_says(spec):
    free = spec.generate("ab cd", max_new_tokens=NEW, stop_ids=[])
    assert free.stats["tau"] > 3  # blocks of several tokens per target call
    text = free.text
    tested = 0
    # stop strings of two printable ASCII characters (random bytes elsewhere decode to U+FFFD)
    for start in (i for i in range(1, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].isprintable()):
        stop = text[start:start + 2]
        out = spec.generate("ab cd", max_new_tokens=NEW, stop=[stop, "never there"], stop_ids=[])
        assert out.text == reference_cut(text, [stop]) and out.stop == stop
        assert out.stats["finish_reason"] == "stop" and out.stats["new_tokens"] == len(out.token_ids)
        # the ids kept are the fewest of the free run's whose text holds the stop string
        n = len(out.token_ids)
        assert out.token_ids == free.token_ids[:n]
        assert stop in spec.tokenizer.decode(free.token_ids[:n])[len(out.text):]
        assert stop not in spec.tokenizer.decode(free.token_ids[:n - 1])[len(out.text):]
        assert "".join(spec.stream("ab cd", max_new_tokens=NEW, stop=stop, stop_ids=[])) == out.text
        tested += 1
    assert tested >= 5
    assert spec.generate("ab cd", max_new_tokens=NEW, stop="never there", stop_ids=[]).text == text


def test_logprobs_are_the_targets_own_log_softmax_at_each_emitted_token(spec):
    prompt = spec.encode("ab cd")
    out = spec.generate(prompt, max_new_tokens=10, logprobs=3)
    plain = spec.generate(prompt, max_new_tokens=10, logprobs=3, plain=True)
    model = spec.target.model
    model.truncate(0)
    sequence = prompt + out.token_ids
    expected = torch.log_softmax(model.forward(torch.tensor(sequence[:-1]), 0).double(), -1)[len(prompt) - 1:]
    assert [t.token_id for t in out.logprobs] == out.token_ids
    for i, token in enumerate(out.logprobs):
        assert token.logprob == pytest.approx(float(expected[i, token.token_id]), abs=1e-4)
        top = expected[i].topk(3)
        assert [t for t, _, _ in token.top] == top.indices.tolist()
        assert [v for _, _, v in token.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert token.top[0][0] == token.token_id  # greedy: the emitted token is the most likely one
        assert token.token == spec.tokenizer.decode([token.token_id], skip_special_tokens=False)
    for a, b in zip(out.logprobs, plain.logprobs):  # speculative and plain decoding report the same
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_messages_and_a_system_prompt_go_through_the_chat_template(spec):
    turns = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"},
             {"role": "user", "content": "ab cd"}]
    ids = spec.encode(messages=turns, system="be brief")
    assert ids == spec.tokenizer.encode_chat([{"role": "system", "content": "be brief"}, *turns])
    assert spec.encode("ab", system="be brief") == spec.encode(messages=turns[:1], system="be brief")
    assert spec.generate(messages=turns, system="be brief", max_new_tokens=6).token_ids == spec.generate(
        ids, max_new_tokens=6).token_ids
    with pytest.raises(ValueError, match='messages\\[1\\]\\["role"\\] must be'):
        spec.encode(messages=[turns[0], {"role": "robot", "content": "x"}])
    with pytest.raises(TypeError, match="the prompt is bytes"):
        spec.encode(b"ab")
    with pytest.raises(ValueError, match="prompt is not valid UTF-8"):
        spec.encode(b"caf\xe9".decode("utf-8", "surrogateescape"))


def test_a_prompt_that_fills_the_cache_names_max_seq_len_and_the_context(target):
    small = api.load(target, draft="ngram", max_seq_len=8)
    with pytest.raises(ValueError, match="do not fit the KV cache of 8 tokens.*--max-seq-len.*context of 128"):
        small.generate("ab cd ab cd ab cd ab cd")
    out = small.generate("ab", max_new_tokens=100, stop_ids=[])
    assert out.stats["finish_reason"] == "context"
    assert api.load(target, draft="ngram").target.model.max_seq_len == 128  # default 2048, cut to the context


# ---- the command line -----------------------------------------------------------------------------

def run(argv, stdin=b""):
    real = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        return main(argv)
    finally:
        sys.stdin = real


def test_load_takes_the_fused_steps_compile_mode_and_refuses_an_unknown_one(target):
    """compile= reaches the fused steppers (here on the CPU, fused=True); an unknown mode is one clear line."""
    spec = api.load(target, draft="ngram", max_seq_len=64, fused=True, compile="layers")
    assert spec.stepper.compile == "layers" and spec.plain_stepper.compile == "layers"
    with pytest.raises(ValueError, match="compile must be False, True or 'layers', got 'whole'"):
        api.load(target, draft="ngram", max_seq_len=64, compile="whole")


def test_prompts_from_stdin_and_from_a_jsonl_file_give_one_result_a_line(target, tmp_path, capsys):
    base = ["generate", "--target", target, "--draft", "ngram", "--max-new-tokens", "5"]
    assert run(base + ["--json", "--stop", "zz"], stdin=b"ab cd") == 0
    from_stdin = json.loads(capsys.readouterr().out)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"ab cd"\n\n{"prompt": "ab", "system": "be brief"}\n'
                       '{"messages": [{"role": "user", "content": "cd"}]}\n')
    assert run(base + ["--prompts-file", str(prompts), "--logprobs", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert lines[0]["token_ids"] == from_stdin["token_ids"]
    assert all(len(line["logprobs"]) == len(line["token_ids"]) for line in lines)
    prompts.write_text('"ab"\n{"messages": [{"role": "robot", "content": "cd"}]}\n')
    assert run(base + ["--prompts-file", str(prompts)]) == 2
    assert f"--prompts-file {prompts} line 2: " in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_prints_stats_for_each_turn(target, capsys):
    code = run(["chat", "--target", target, "--draft", "ngram", "--max-new-tokens", "4", "--system", "be brief"],
               stdin=b"ab\n\n/reset\ncd\nab cd\n/exit\nnever read\n")
    out, err = capsys.readouterr()
    assert code == 0
    assert len([line for line in err.splitlines() if line.startswith("[speculant]")]) == 3
    spec = api.load(target, draft="ngram")
    first = spec.generate(messages=[{"role": "user", "content": "ab"}], system="be brief", max_new_tokens=4)
    after_reset = spec.generate(messages=[{"role": "user", "content": "cd"}], system="be brief", max_new_tokens=4)
    second = spec.generate(messages=[{"role": "user", "content": "cd"}, {"role": "assistant", "content": after_reset.text},
                                     {"role": "user", "content": "ab cd"}], system="be brief", max_new_tokens=4)
    assert out == "".join(f"{reply.text}\n" for reply in (first, after_reset, second))


def test_help_lists_every_command_and_shows_the_sampling_defaults(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for command in ("generate", "chat", "models", "distill", "bench"):
        assert command in top
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--temperature TEMPERATURE 0 = greedy (default: 0.0)", "(default: 1.0)", "--stop TEXT",
                  "--prompts-file FILE", "--logprobs N", "--system TEXT", "cpu, cuda or cuda:N (default: cpu)"):
        assert shown in text, shown


@pytest.mark.parametrize("draft", ["ngram", "TARGET", "none"])
def test_many_requests_batched_give_what_each_gives_alone(target, draft):
    spec = api.load(target, draft=target if draft == "TARGET" else draft, gamma=3, max_seq_len=128)
    requests = [{"prompt": "ab cd"}, {"prompt": "ab", "system": "be brief"}, {"prompt": [5, 6, 7, 8, 9]},
                {"messages": [{"role": "user", "content": "cd ab"}]}]
    for options in ({"max_new_tokens": 12, "logprobs": 2}, {"max_new_tokens": 16, "stop": ["a", "ab"]},
                    {"max_new_tokens": 10, "temperature": 1.0, "seed": 3}):
        together = spec.generate_many(requests, max_batch=3, **options)
        for request, batched in zip(requests, together):
            alone = spec.generate(**request, **options)
            assert batched.token_ids == alone.token_ids and batched.text == alone.text
            assert batched.stop == alone.stop and batched.stats["finish_reason"] == alone.stats["finish_reason"]
            if alone.logprobs is not None:
                assert [t.token_id for t in batched.logprobs] == [t.token_id for t in alone.logprobs]
                for a, b in zip(batched.logprobs, alone.logprobs):
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                    assert [t for t, _, _ in a.top] == [t for t, _, _ in b.top]
    with pytest.raises(api.BadRequest, match="request 1: messages"):
        spec.generate_many([{"prompt": "ab"}, {"messages": []}])


def test_an_embedded_draft_is_a_draft_spec_by_its_name(target, tmp_path, monkeypatch, capsys):
    """`--draft NAME` loads the draft folder speculant/embedded/NAME (the README's `smollm2-135m-draft`),
    `default` picks it for its target and reports that name, and a name that is no draft, model, file
    or folder is refused in one line that lists the embedded drafts."""
    from speculant.drafters.model import ModelDrafter
    from speculant.models.feature_draft import DistilledDraft, DraftConfig, build_draft, init_random, save_draft
    from speculant.models.registry import load_model

    shipped = chain.embedded_draft_folder("smollm2-135m-draft")
    assert shipped == chain.EMBEDDED_DRAFTS / "smollm2-135m-draft" and (shipped / "model.safetensors").is_file()
    assert chain.embedded_draft_folder("smollm2-135m-draft/..") is None  # a name, never a path out of the folder

    loaded = load_model(target, max_seq_len=128, progress=False)
    draft = build_draft(DraftConfig.for_target(loaded.config, num_layers=1, num_kept=64), loaded.weights,
                        torch.arange(64))
    init_random(draft.draft_weights, seed=0)
    embedded = tmp_path / "embedded"
    save_draft(embedded / "tiny-draft", draft.draft_weights, target_name="tiny", target_hash=loaded.source_hash)
    monkeypatch.setattr(chain, "EMBEDDED_DRAFTS", embedded)

    plain = api.load(target, draft="none", max_seq_len=128).generate("ab cd", max_new_tokens=16)
    for spec_name in ("tiny-draft", "default"):
        spec = api.load(target, draft=spec_name, gamma=3, max_seq_len=128)
        assert spec.draft_specs == ["tiny-draft"]
        drafter = spec.levels[0][1]
        assert isinstance(drafter, ModelDrafter) and isinstance(drafter.model, DistilledDraft)
        out = spec.generate("ab cd", max_new_tokens=16)
        assert out.token_ids == plain.token_ids and out.stats["drafted"] > 0  # it drafted; greedy stays exact
    assert main(["generate", "--target", target, "--draft", "tiny-draft", "--max-seq-len", "128",
                 "--max-new-tokens", "4", "ab cd"]) == 0
    assert "draft=tiny-draft " in capsys.readouterr().err

    with pytest.raises(ValueError) as error:
        api.load(target, draft="tiny-drafts", max_seq_len=128)
    message = str(error.value)
    assert "unknown draft 'tiny-drafts'" in message and "tiny-draft" in message and "\n" not in message
    assert main(["generate", "--target", target, "--draft", "tiny-drafts", "ab"]) == 2
    assert "unknown draft 'tiny-drafts'" in capsys.readouterr().err


def test_warm_up_makes_every_graph_that_later_requests_meet(target, tmp_path, monkeypatch):
    """Speculant.warm_up (what `speculant serve` runs before listening, for lone requests): after it,
    requests of those sampling params, alternating between them, with prompts of several lengths and
    steps of whatever γ auto takes, make no new step or prefill graph (the prefills padded as on CUDA,
    their runners eager here); the tokens of a seeded request equal those of an unwarmed load. A new
    params set gets graphs of its own and leaves the others'."""
    from speculant.sampling import SamplingParams

    monkeypatch.setenv("SPECULANT_CACHE", str(tmp_path / "cache"))
    options = {"draft": "layers:1", "gamma": "auto", "candidates": 2, "lookup": 4, "max_seq_len": 128, "fused": True,
               "compile": False}
    spec, cold = api.load(target, **options), api.load(target, **options)
    for s in (spec, cold):
        s.stepper.prefill_graphs = True
    params = [SamplingParams(), SamplingParams(temperature=0.0)]
    for p in params:  # the step costs measured (and their steps made) on the other load: here read from the cache
        cold.gamma_policy(p)
    assert spec.warm_up(params, max_prompt=80) > 0
    made = {p: set(graphs) for p, (graphs, _) in spec.stepper.graph_sets.items()}
    prefills = set(spec.stepper.prefills)
    assert set(made) == set(params) and all(len(keys) > 12 for keys in made.values())
    assert {key[2] for key in prefills} == {16, 32, 64, 128}
    prompts = ["x = 1\n" * n for n in (2, 7, 12)]  # 12, 42 and 72 tokens
    for temperature in (0.0, 1.0, 0.0):
        for prompt in prompts:
            out = spec.generate(prompt, max_new_tokens=20, temperature=temperature, seed=3)
            assert out.token_ids == cold.generate(prompt, max_new_tokens=20, temperature=temperature, seed=3).token_ids
    assert {p: set(graphs) for p, (graphs, _) in spec.stepper.graph_sets.items()} == made
    assert set(spec.stepper.prefills) == prefills
    spec.generate(prompts[0], max_new_tokens=8, temperature=0.7, seed=3)
    assert len(spec.stepper.graph_sets) == 3 and all(spec.stepper.graph_sets[p] for p in params)


def test_layers_below_a_model_served_in_int8_are_that_models_first_layers(target):
    """--draft NAME:int8 --draft layers:N: the bottom level is the first N layers of the middle level
    (NAME's int8 matrices), not of the target; the same after NAME:int8:vocab=K."""
    for middle in (f"{target}:int8", f"{target}:int8:vocab=200"):
        spec = api.load(target, draft=[middle, "layers:1"], gamma=3, max_seq_len=64)
        (_, upper), (_, lower) = spec.levels
        assert lower.model.num_layers == 1 and upper.model is not spec.target.model
        assert lower.model.weights is upper.model.weights
        out = spec.generate("x = 1\n", max_new_tokens=12, temperature=0.0)
        plain = api.load(target, draft="none", max_seq_len=64).generate("x = 1\n", max_new_tokens=12, temperature=0.0)
        assert out.token_ids == plain.token_ids
