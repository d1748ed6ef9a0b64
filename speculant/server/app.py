"""The FastAPI app: OpenAI's /v1/completions and /v1/chat/completions (plain JSON or server-sent
events), /v1/models, /health and /metrics, over one EngineThread.

Every error is OpenAI's error body with a 4xx status where the client is at fault (malformed JSON,
bad parameters, unknown model, a prompt over the context: 400/404; the waiting queue full: 429),
never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from speculant.batching import BatchRequest
from speculant.sampling import SamplingParams
from speculant.server.engine_thread import EngineThread, Event, Job
from speculant.server.metrics import ServerMetrics
from speculant.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


@dataclass
class ServerState:
    spec: object  # speculant.api.Speculant: its tokenizer and encode()
    model_names: tuple[str, ...]  # names a request's "model" may use; the first is reported
    max_seq_len: int
    engine: EngineThread
    metrics: ServerMetrics
    created: int = 0


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="speculant", lifespan=lifespan)
    app.state.speculant = state

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        state.metrics.request_errors.labels(str(error.status)).inc()
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        state.metrics.request_errors.labels("400").inc()
        return JSONResponse(error_body(*_validation_message(error.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        state.metrics.request_errors.labels(str(error.status_code)).inc()
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        state.metrics.request_errors.labels("500").inc()
        return JSONResponse(error_body(f"internal error: {error!r}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return JSONResponse({"status": "error", "detail": state.engine.failure}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_names[0], "object": "model", "created": state.created,
                                            "owned_by": "speculant", "max_model_len": state.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        prompts = [_encode(state, prompt=p) for p in body.prompts()]
        return await _serve(state, request, body, prompts, body.logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        ids = _encode(state, messages=[m.as_template_message() for m in body.messages])
        return await _serve(state, request, body, [ids], body.num_logprobs, chat=True)

    return app


def _validation_message(errors) -> tuple[str, str, str | None]:
    """(message, type, param) of the first pydantic error, as one line."""
    if not errors:
        return "invalid request", "invalid_request_error", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return f"malformed JSON body: {reason}", "invalid_request_error", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = "field required"
    return (f"{param}: {message}" if param else message), "invalid_request_error", param


def _check_model(state: ServerState, model: str) -> None:
    if model not in state.model_names:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {state.model_names[0]!r}",
                       param="model", code="model_not_found")


def _encode(state: ServerState, prompt=None, messages=None) -> list[int]:
    try:
        ids = state.spec.encode(prompt, messages=messages)
    except (ValueError, TypeError) as error:
        raise ApiError(400, str(error), param="messages" if messages is not None else "prompt") from None
    vocab_size = state.spec.tokenizer.vocab_size
    if any(not 0 <= i < vocab_size for i in ids):
        raise ApiError(400, f"prompt token ids must lie in [0, {vocab_size})", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty (no tokens)", param="prompt")
    return ids


def _jobs(state: ServerState, body: SamplingFields, prompts: list[list[int]], num_logprobs: int | None,
          loop, events: asyncio.Queue) -> list[Job]:
    """n jobs per prompt, choice index prompt * n + j; the j-th draws with seed + j."""
    try:
        params = SamplingParams(temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                                min_p=body.min_p)
    except ValueError as error:
        raise ApiError(400, str(error)) from None
    jobs = []
    for p, ids in enumerate(prompts):
        room = state.max_seq_len - len(ids)
        if room < 1:
            raise ApiError(400, f"this model's maximum context length is {state.max_seq_len} tokens; the prompt "
                                f"has {len(ids)}", param="messages" if isinstance(body, ChatCompletionRequest)
                           else "prompt", code="context_length_exceeded")
        max_new_tokens = room if body.max_tokens is None else body.max_tokens
        if max_new_tokens > room:
            raise ApiError(400, f"this model's maximum context length is {state.max_seq_len} tokens; the prompt "
                                f"({len(ids)}) and max_tokens ({max_new_tokens}) need {len(ids) + max_new_tokens}",
                           param="max_tokens", code="context_length_exceeded")
        for j in range(body.n):
            request = BatchRequest(prompt_ids=ids, params=params, max_new_tokens=max_new_tokens,
                                   stop_ids=tuple(sorted(state.spec.tokenizer.eos_ids)),
                                   seed=None if body.seed is None else (body.seed + j) % 2 ** 63,
                                   logprobs=num_logprobs)
            jobs.append(Job(p * body.n + j, request, body.stop_strings, loop, events))
    return jobs


async def _serve(state: ServerState, request: Request, body: SamplingFields, prompts: list[list[int]],
                 num_logprobs: int | None, chat: bool):
    events: asyncio.Queue = asyncio.Queue()
    jobs = _jobs(state, body, prompts, num_logprobs, asyncio.get_running_loop(), events)
    if not state.engine.submit(jobs):
        if state.engine.failure is not None or not state.engine.alive:  # failed, or shutting down
            raise ApiError(503, f"the engine is not running ({state.engine.failure})", "server_error")
        raise ApiError(429, f"the server is at capacity ({state.engine.max_waiting} requests waiting); retry later",
                       "rate_limit_error", code="queue_full")
    reply = Reply(state, body, chat, [len(ids) for ids in prompts], num_logprobs)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(state, jobs, events, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _collect(state, request, jobs, events, reply)


async def _collect(state: ServerState, request: Request, jobs: list[Job], events: asyncio.Queue, reply: Reply):
    """Wait for every job's end; a client that goes away cancels its jobs at once."""
    async def all_events() -> Event | None:
        """None when every job ended, else the first failed job's event."""
        pending = len(jobs)
        while pending:
            event = await events.get()
            if event.error is not None:
                return event
            reply.add(event)
            pending -= event.finish_reason is not None
        return None

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(all_events())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        for job in jobs:
            state.engine.cancel(job)
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # the client is gone; nobody reads this
    failed = work.result()
    if failed is not None:  # counted in the metrics by the engine thread
        return JSONResponse(error_body(failed.error, "server_error" if failed.status >= 500 else
                                       "invalid_request_error"), status_code=failed.status)
    return reply.whole()


async def _stream(state: ServerState, jobs: list[Job], events: asyncio.Queue, reply: Reply, include_usage: bool):
    """Server-sent events: OpenAI's chunks, then [DONE]. `usage` and `speculative` come on the last
    chunk, or, with stream_options {"include_usage": true}, on one more chunk with no choices."""
    try:
        if reply.chat:
            for job in jobs:
                yield _sse(reply.chunk(job.index, {"role": "assistant", "content": ""}))
        pending = len(jobs)
        while pending:
            event = await events.get()
            if event.error is not None:
                yield _sse(error_body(event.error, "server_error" if event.status >= 500 else "invalid_request_error"))
                break
            reply.add(event)
            pending -= event.finish_reason is not None
            chunk = reply.event_chunk(event)
            if not pending and not include_usage:  # usage rides on the last chunk
                chunk.update(usage=reply.usage(), speculative=reply.speculative())
            yield _sse(chunk)
        else:
            if include_usage:  # OpenAI's form: one more chunk, with no choices
                yield _sse(reply.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:  # also on a client that went away mid-stream (the generator is cancelled): free the rows now
        for job in jobs:
            state.engine.cancel(job)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """Builds a request's response objects (whole, or chunk by chunk) from its jobs' events."""

    def __init__(self, state: ServerState, body: SamplingFields, chat: bool, prompt_lengths: list[int],
                 num_logprobs: int | None) -> None:
        self.state, self.chat = state, chat
        self.num_choices = len(prompt_lengths) * body.n
        self.prompt_tokens = sum(prompt_lengths)  # once per prompt, whatever n (as OpenAI counts)
        self.num_logprobs = num_logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = [""] * self.num_choices
        self.finish = [None] * self.num_choices
        self.logprobs: list[list] = [[] for _ in range(self.num_choices)]
        self.offsets = [0] * self.num_choices  # text_offset of the next token (completions logprobs)
        self.stats: list[dict | None] = [None] * self.num_choices

    def add(self, event: Event) -> None:
        self.text[event.index] += event.text
        if event.finish_reason is not None:
            self.finish[event.index] = event.finish_reason
            self.stats[event.index] = event.stats
        if event.logprobs is not None:
            self.logprobs[event.index] += list(zip(event.token_ids, event.logprobs))

    # ---- whole responses ------------------------------------------------------------------------
    def whole(self) -> dict:
        choices = []
        for i in range(self.num_choices):
            logprobs = self._logprobs(self.logprobs[i], i) if self.num_logprobs is not None else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": self.text[i]},
                                "logprobs": logprobs, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": self.text[i], "logprobs": logprobs,
                                "finish_reason": self.finish[i]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_names[0], "choices": choices,
                "usage": self.usage(), "speculative": self.speculative()}

    # ---- chunks ---------------------------------------------------------------------------------
    def chunk(self, index: int, delta_or_text, finish_reason: str | None = None, logprobs=None) -> dict:
        if self.chat:
            choice = {"index": index, "delta": delta_or_text, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta_or_text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_names[0], "choices": [choice]}

    def event_chunk(self, event: Event) -> dict:
        logprobs = None
        if self.num_logprobs is not None and event.logprobs is not None:
            logprobs = self._logprobs(list(zip(event.token_ids, event.logprobs)), event.index)
        delta = ({"content": event.text} if event.text or event.finish_reason is None else {}) if self.chat \
            else event.text
        return self.chunk(event.index, delta, event.finish_reason, logprobs)

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_names[0], "choices": [],
                "usage": self.usage(), "speculative": self.speculative()}

    # ---- parts ----------------------------------------------------------------------------------
    def usage(self) -> dict:
        completion = sum(s["completion_tokens"] for s in self.stats if s is not None)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def speculative(self) -> dict:
        """α, τ and the counters, summed over the request's choices (α = accepted / tested drafts)."""
        total = {key: sum(s[key] for s in self.stats if s is not None)
                 for key in ("drafted", "accepted", "rejections", "target_calls", "new_tokens")}
        tested = total["accepted"] + total["rejections"]
        return {"alpha": total["accepted"] / tested if tested else 0.0,
                "tau": total["new_tokens"] / total["target_calls"] if total["target_calls"] else 0.0,
                "drafted": total["drafted"], "accepted": total["accepted"], "target_calls": total["target_calls"]}

    def _token_text(self, token_id: int) -> str:
        return self.state.spec.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, pairs: list, index: int) -> dict:
        """OpenAI's logprobs object of these (token id, (logprob, top-k)) pairs: chat or completions form."""
        if self.chat:
            content = []
            for token_id, (logprob, top) in pairs:
                token = self._token_text(token_id)
                content.append({"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
                                "top_logprobs": [{"token": self._token_text(t), "logprob": lp,
                                                  "bytes": list(self._token_text(t).encode("utf-8"))}
                                                 for t, lp in top]})
            return {"content": content}
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, (logprob, top) in pairs:
            token = self._token_text(token_id)
            tokens.append(token)
            token_logprobs.append(logprob)
            top_logprobs.append({self._token_text(t): lp for t, lp in top})
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}
