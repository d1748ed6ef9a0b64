"""`speculant serve` end to end: a real server process on localhost, driven by the real `openai`
client (and httpx where the client hides the wire): completions, chat, streaming, stop strings,
seeds, logprobs, errors, the waiting queue, a client that goes away, /metrics, and 64 concurrent
streaming clients whose tokens must equal the same requests run alone.

The model is a tiny random Llama (2 layers, byte-level vocabulary) saved as a Hugging Face folder;
its letters' output rows are scaled up so greedy text is mostly letters (readable stop strings).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

SERVER_START_TIMEOUT = 120  # seconds: importing torch and loading on a busy 2-core machine
LETTERS = "abcdefghijklmnopqrstuvwxyz "


def build_tiny_model(folder: Path) -> Path:
    import torch
    import transformers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_symbols = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(specials + list(byte_symbols.values()))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 1.0)
        letter_ids = [vocab[byte_symbols[ord(c)]] for c in LETTERS]
        model.lm_head.weight[letter_ids] *= 3.0
    model.save_pretrained(str(folder))
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `speculant serve` subprocess."""

    def __init__(self, folder: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(folder)
        command = [sys.executable, "-c", "import sys; from speculant.cli import main; sys.exit(main(sys.argv[1:]))",
                   "serve", "--target", str(folder), "--port", str(self.port), *options]
        self.log = folder / f"server-{self.port}.log"
        with open(self.log, "w") as log:  # the server writes to its own copy of the file descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start in time")

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **options)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def servers(model_folder):
    """A speculative server (draft layers:1, γ 3, its steps the static functions CUDA captures:
    `--graphs on`, eager on the CPU) and a plain one with one row and one waiting slot; started
    together so that their start-up overlaps."""
    main = Server(model_folder, "--draft", "layers:1", "--gamma", "3", "--max-seq-len", "512", "--graphs", "on")
    small = Server(model_folder, "--draft", "none", "--max-seq-len", "1024", "--max-batch", "1",
                   "--max-waiting", "1")
    try:
        main.wait_ready()
        small.wait_ready()
        yield main, small
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0]


# ---- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "device_type", "expected"), [
    ([], "cuda", (True, True)),  # CUDA: graphs and, by default, compiled row forwards
    (["--device", "cuda:1"], "cuda", (True, True)),
    (["--no-compile"], "cuda", (True, False)),
    (["--compile"], "cuda", (True, True)),
    (["--graphs", "off"], "cuda", (False, False)),  # nothing static to compile
    (["--graphs", "off", "--compile"], "cuda", (False, False)),
    (["--bit-exact"], "cuda", (False, False)),  # bit-exact rows run eagerly: no graphs, no compile
    ([], "cpu", (False, False)),
    (["--graphs", "on"], "cpu", (True, False)),  # the CPU's static steps run eagerly, uncompiled by default
    (["--graphs", "on", "--compile"], "cpu", (True, True)),  # unless asked for
    (["--graphs", "on", "--no-compile"], "cpu", (True, False)),
])
def test_serve_compiles_the_row_forwards_by_default_where_its_steps_are_cuda_graphs(options, device_type, expected):
    """(graphs, compile) of `speculant serve` from its flags and the device type: parsing only, no CUDA."""
    from speculant.cli import build_parser
    from speculant.server import engine_options

    args = build_parser().parse_args(["serve", *options])
    assert args.compile is (True if "--compile" in options else False if "--no-compile" in options else None)
    assert engine_options(args, device_type) == expected


# ---- completions and chat ---------------------------------------------------------------------

def test_a_greedy_completion_equals_the_librarys_and_carries_usage_and_speculative_counters(server, model_folder):
    import speculant

    out = server.client().completions.create(model=server.model, prompt="the cat", max_tokens=12, temperature=0)
    choice = out.choices[0]
    spec = speculant.load(target=str(model_folder), draft="none", max_seq_len=512)
    expected = spec.generate("the cat", max_new_tokens=12, temperature=0)
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(spec.encode("the cat")) and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    speculative = out.model_extra["speculative"]
    assert set(speculative) == {"alpha", "tau", "drafted", "accepted", "target_calls"}
    assert 0 < speculative["target_calls"] <= 12 and speculative["drafted"] > 0
    assert speculative["tau"] == pytest.approx(12 / speculative["target_calls"])
    assert 0 <= speculative["alpha"] <= 1


def test_chat_renders_multi_turn_messages_with_a_system_message_through_the_template(server, model_folder):
    from speculant.tokenizer import Tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    out = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=6,
                                                  temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.prompt_tokens == len(Tokenizer.from_folder(model_folder).encode_chat(messages))
    assert out.usage.completion_tokens <= 6 and "speculative" in out.model_extra


def test_streamed_chunks_concatenate_to_the_whole_response_and_end_with_usage_then_done(server):
    client = server.client()
    whole = client.completions.create(model=server.model, prompt="abc", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=server.model, prompt="abc", max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].model_extra["speculative"]["target_calls"] > 0
    assert all(c.usage is None for c in chunks[:-1])
    # stream_options include_usage: OpenAI's extra last chunk with no choices
    chunks = list(client.completions.create(model=server.model, prompt="abc", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].model_extra["speculative"]["target_calls"] > 0
    # chat: a role delta first; and on the wire, the last event is [DONE]
    chat = list(client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=5, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].usage.completion_tokens <= 5
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": server.model, "prompt": "abc", "max_tokens": 3, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_stop_string_cuts_the_output_before_it_streamed_or_not(server):
    client = server.client()
    full = client.completions.create(model=server.model, prompt="hello", max_tokens=40, temperature=0)
    text = full.choices[0].text
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    expected = text[:text.find(stop)]
    cut = client.completions.create(model=server.model, prompt="hello", max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 40
    streamed = list(client.completions.create(model=server.model, prompt="hello", max_tokens=40, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"


def test_seeded_sampling_is_reproducible_and_the_jth_choice_draws_with_seed_plus_j(server):
    client = server.client()
    args = {"model": server.model, "prompt": "seed", "max_tokens": 12, "temperature": 1.0}
    first = client.completions.create(seed=7, **args).choices[0].text
    assert client.completions.create(seed=7, **args).choices[0].text == first
    import speculant

    spec = speculant.load(target=server.model, draft="layers:1", gamma=3, max_seq_len=512)
    library = spec.generate("seed", max_new_tokens=12, temperature=1.0, seed=7)
    assert first == library.text  # the row draws from its own generator, as the single-request engine does
    two = client.completions.create(seed=7, n=2, **args)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == first
    assert two.choices[1].text == client.completions.create(seed=8, **args).choices[0].text
    assert two.usage.completion_tokens == 24
    chat = {"model": server.model, "messages": [{"role": "user", "content": "s"}], "max_tokens": 8, "temperature": 0.8,
                "top_p": 0.9, "seed": 3, "extra_body": {"top_k": 20, "min_p": 0.01}}
    assert (client.chat.completions.create(**chat).choices[0].message.content
            == client.chat.completions.create(**chat).choices[0].message.content)


def test_logprobs_are_the_targets_and_the_greedy_token_is_the_top_one(server):
    client = server.client()
    out = client.completions.create(model=server.model, prompt="log", max_tokens=6, temperature=0, logprobs=3)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == out.usage.completion_tokens == 6
    assert "".join(logprobs.tokens) == out.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and chosen <= 0 and chosen == pytest.approx(max(top.values()))
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "q"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


# ---- errors -----------------------------------------------------------------------------------

def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_requests_get_a_4xx_with_openais_error_body(server):
    url = server.url + "/v1/completions"
    ok = {"model": server.model, "prompt": "x", "max_tokens": 2}
    assert_openai_error(httpx.post(url, content=b'{"model": "x", "prompt": ', timeout=10,
                                   headers={"content-type": "application/json"}), 400)
    assert_openai_error(httpx.post(url, json={**ok, "model": "gpt-4"}, timeout=10), 404, "model")
    for field, value in [("temperature", -1), ("temperature", "hot"), ("top_p", 0), ("n", 0), ("max_tokens", -2),
                         ("stop", [""]), ("logprobs", 99), ("min_p", 1.0), ("presence_penalty", 1.0)]:
        assert_openai_error(httpx.post(url, json={**ok, field: value}, timeout=10), 400)
    assert_openai_error(httpx.post(url, json={"model": server.model}, timeout=10), 400, "prompt")
    assert_openai_error(httpx.post(url, json={**ok, "prompt": [999999]}, timeout=10), 400)
    too_long = assert_openai_error(httpx.post(url, json={**ok, "prompt": "word " * 200}, timeout=10), 400)
    assert too_long["code"] == "context_length_exceeded"
    assert_openai_error(httpx.post(url, json={**ok, "max_tokens": 10_000}, timeout=10), 400, "max_tokens")
    assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json={"model": server.model, "messages": []},
                                   timeout=10), 400)
    assert_openai_error(httpx.post(server.url + "/v1/chat/completions", timeout=10, json={
        "model": server.model, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_openai_error(httpx.get(server.url + "/v1/nothing", timeout=10), 404)
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=server.model, prompt="x", temperature=3.0)
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}  # still serving
    nulls = httpx.post(url, json={**ok, "max_tokens": None, "temperature": None, "stop": None, "seed": 0}, timeout=30)
    assert nulls.status_code == 200 and nulls.json()["usage"]["completion_tokens"] == 16  # null takes the default


def test_a_full_queue_answers_429_and_a_client_that_goes_away_frees_its_row_at_once(servers):
    """The small server has one row and one waiting slot: a long stream holds the row, a second request
    waits, a third is refused with 429; closing the stream frees the row, so the waiting one runs."""
    small = servers[1]
    client = small.client()
    stream = client.completions.create(model=small.model, prompt="long", max_tokens=1000, temperature=0,
                                       stream=True)
    next(iter(stream))  # the long request holds the only row
    waiting_result = {}
    waiter = threading.Thread(target=lambda: waiting_result.setdefault("out", small.client().completions.create(
        model=small.model, prompt="short", max_tokens=4, temperature=0)))
    waiter.start()
    deadline = time.monotonic() + 20
    while small.metrics().get("num_requests_waiting") != 1.0:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model=small.model, prompt="third", max_tokens=4)
    assert refused.value.status_code == 429 and refused.value.body["code"] == "queue_full"
    stream.close()  # the client goes away mid-stream
    waiter.join(timeout=30)
    assert waiting_result["out"].choices[0].finish_reason == "length"
    metrics = small.metrics()
    assert metrics["request_cancelled_total"] == 1.0
    assert metrics["generation_tokens_total"] < 1000  # the long request did not run to its end
    assert metrics["num_requests_running"] == 0.0 and metrics["num_requests_waiting"] == 0.0
    # a non-streaming client that gives up: its row is freed too, long before its 1000 tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.3),
                   json={"model": small.model, "prompt": "long", "max_tokens": 1000, "temperature": 0})
    deadline = time.monotonic() + 20
    while (metrics := small.metrics())["request_cancelled_total"] != 2.0:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.02)
    assert metrics["num_requests_running"] == 0.0
    assert metrics["generation_tokens_total"] < 2000


def test_metrics_use_vllms_names_and_count_what_ran(server):
    server.client().completions.create(model=server.model, prompt="metrics", max_tokens=8, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ["spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_accepted_tokens_total", 'spec_decode_num_accepted_tokens_per_pos_total{position="0"}',
                 'request_success_total{finished_reason="length"}', "prompt_tokens_total", "generation_tokens_total",
                 "e2e_request_latency_seconds_bucket", "time_to_first_token_seconds_bucket",
                 "num_requests_running", "num_requests_waiting", "engine_step_seconds_bucket",
                 "engine_cuda_graphs_captured", "engine_compile_fallbacks", "engine_warm_up_seconds"]:
        assert re.search(rf"^{re.escape(name)}", text, re.MULTILINE), name
    metrics = server.metrics()
    assert metrics["engine_step_seconds_count"] >= 1 and metrics["engine_step_seconds_sum"] > 0
    assert metrics["engine_cuda_graphs_captured"] == 0 and metrics["engine_compile_fallbacks"] == 0  # the CPU's
    assert 0 <= metrics["spec_decode_num_accepted_tokens_total"] <= metrics["spec_decode_num_draft_tokens_total"]
    per_position = sum(v for k, v in metrics.items() if k.startswith("spec_decode_num_accepted_tokens_per_pos_total"))
    assert per_position == metrics["spec_decode_num_accepted_tokens_total"]


# ---- load -------------------------------------------------------------------------------------

def test_64_concurrent_streaming_clients_all_get_the_tokens_they_get_alone(server):
    prompts = [f"{LETTERS[i % 26]}{LETTERS[(7 * i) % 26]} {i}" for i in range(64)]
    args = {"model": server.model, "max_tokens": 8, "temperature": 0}

    async def one(client, prompt):
        stream = await client.completions.create(prompt=prompt, stream=True, **args)
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts),
                                                         return_exceptions=True), timeout=90)
        finally:
            await client.close()

    start = time.monotonic()
    results = asyncio.run(all_at_once())
    elapsed = time.monotonic() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(finish in ("length", "stop") for _, finish in results)
    client = server.client()
    alone = [client.completions.create(prompt=p, **args).choices[0].text for p in prompts]
    assert [text for text, _ in results] == alone
    assert len(set(alone)) > 32  # the prompts lead to different outputs: a mixed-up row would show
    print(f"64 concurrent streams: {elapsed:.1f} s")


def test_a_bit_exact_server_gives_each_concurrent_request_plain_bit_exact_decodings_tokens(model_folder):
    """`serve --bit-exact` in bfloat16: 8 concurrent greedy completions (one row each, speculative with
    layers:1) get the tokens the library's plain bit-exact decoding gives each prompt alone."""
    import speculant

    server = Server(model_folder, "--bit-exact", "--dtype", "bfloat16", "--draft", "layers:1", "--gamma", "3",
                    "--max-seq-len", "256", "--max-batch", "4")
    try:
        server.wait_ready()
        prompts = [f"{LETTERS[i]}{LETTERS[(5 * i) % 26]} {i}" for i in range(8)]
        client = server.client()
        threads, texts = [], [None] * len(prompts)

        def ask(i):
            texts[i] = client.completions.create(model=server.model, prompt=prompts[i], max_tokens=10,
                                                 temperature=0).choices[0].text

        for i in range(len(prompts)):
            threads.append(threading.Thread(target=ask, args=(i,)))
            threads[-1].start()
        for thread in threads:
            thread.join(timeout=90)
    finally:
        server.stop()
    spec = speculant.load(target=str(model_folder), draft="none", dtype="bfloat16", max_seq_len=256, bit_exact=True)
    assert texts == [spec.generate(p, max_new_tokens=10, temperature=0).text for p in prompts]


def test_an_auto_server_runs_a_lone_request_solo_with_candidates_and_lookup_and_batches_the_rest(model_folder):
    """`serve --gamma auto --candidates 2 --lookup 2`: a lone request runs the single-request engine
    (its candidates and lookup branch), concurrent ones the batch (their chain); every greedy output
    is plain decoding's, and the speculative counters count what ran."""
    import speculant

    server = Server(model_folder, "--draft", "layers:1", "--gamma", "auto", "--candidates", "2", "--lookup", "2",
                    "--max-seq-len", "256", "--max-batch", "4")
    try:
        server.wait_ready()
        assert "lone requests run the single-request engine" in server.log.read_text()
        client = server.client()
        alone = client.completions.create(model=server.model, prompt="the cat", max_tokens=12, temperature=0)
        prompts = [f"{LETTERS[i]}{LETTERS[(7 * i) % 26]} {i}" for i in range(4)]
        texts = [None] * len(prompts)

        def ask(i):
            texts[i] = client.completions.create(model=server.model, prompt=prompts[i], max_tokens=10,
                                                 temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
    finally:
        server.stop()
    plain = speculant.load(target=str(model_folder), draft="none", max_seq_len=256)
    assert alone.choices[0].text == plain.generate("the cat", max_new_tokens=12, temperature=0).text
    assert alone.model_extra["speculative"]["target_calls"] <= 12
    assert texts == [plain.generate(p, max_new_tokens=10, temperature=0).text for p in prompts]
