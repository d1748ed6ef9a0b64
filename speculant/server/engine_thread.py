"""The engine thread: the one thread that owns the BatchEngine and calls step().

The event loop (FastAPI handlers) and this thread meet in three places only:

    submit(jobs)  event loop -> inbox (a thread-safe queue): all of a request's jobs, or none when
                  the waiting queue is full (the handler answers 429)
    cancel(job)   event loop -> inbox: the client went away; the row is freed before the next step
    events        this thread -> the requests' asyncio.Queues: a step's events go out together, in
                  one loop.call_soon_threadsafe per step (a call per event would wake the event loop
                  once per row and hand it the GIL as often, between the engine's own steps)

A job is one choice of one request (n > 1 makes n jobs, one row each). Between steps the thread
takes commands from the inbox, admits waiting jobs while the batch has room, runs one step, and
turns each row's new tokens into text with a StopStringDecoder, so that a stop string ends the row
(and frees its slot) in the step that completed it, even when it spans steps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from speculant.batching import BatchEngine, BatchRequest
from speculant.models.base import ContextOverflowError
from speculant.server.metrics import ServerMetrics, snapshot
from speculant.stopping import StopStringDecoder
from speculant.tokenizer import Tokenizer

# finish reasons of the engine -> OpenAI's (the KV cache filling up reads as "length", as in vLLM)
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}


@dataclass
class Event:
    """What one job got from one step (or its end)."""

    index: int  # the job's choice index in its request
    text: str = ""  # text safe to show now
    token_ids: list[int] = field(default_factory=list)  # tokens of the output this event adds
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # one per token id, when asked for
    finish_reason: str | None = None  # "stop" | "length" at the end
    stats: dict | None = None  # the row's counters, at the end
    error: str | None = None  # the job failed: this message, with HTTP `status`
    status: int = 500


@dataclass(eq=False)
class Job:
    """One row's work, as the event loop hands it over."""

    index: int
    request: BatchRequest
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # shared by the jobs of one request
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the event loop before it sends cancel
    finished: bool = False  # set by the engine thread when the last event is posted


@dataclass(eq=False)
class Row:
    """The engine thread's state of an admitted job."""

    job: Job
    decoder: StopStringDecoder
    before: tuple = snapshot(None)  # metrics snapshot of the row's stats
    sent: int = 0  # output tokens posted so far
    logprobs: list = field(default_factory=list)  # per token fed to the decoder, when asked for
    first_token_at: float | None = None


def stats_dict(stats) -> dict:
    """The `speculative` extension object of a response (counters summed over a request's rows)."""
    if stats is None:
        return {"alpha": 0.0, "tau": 0.0, "drafted": 0, "accepted": 0, "rejections": 0, "target_calls": 0,
                "new_tokens": 0}
    return {"alpha": stats.alpha, "tau": stats.tau, "drafted": stats.drafted, "accepted": stats.accepted,
            "rejections": stats.rejections, "target_calls": stats.target_calls, "new_tokens": stats.new_tokens}


class EngineThread:
    def __init__(self, engine: BatchEngine, tokenizer: Tokenizer, metrics: ServerMetrics, max_batch: int,
                 max_waiting: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add" | "cancel", Job)
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Row] = {}  # by the engine's request id
        self._row_of: dict[Job, int] = {}
        self._lock = threading.Lock()
        self._num_waiting = 0  # jobs submitted and not admitted yet (in the inbox or the deque)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="speculant-engine", daemon=True)
        self.failure: str | None = None  # set if the thread died
        self._outbox: list[tuple[Job, Event]] = []  # events of this pass, sent by _send_events

    # ---- the event loop's side ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> bool:
        """Queue all of a request's jobs, or none (False) when that would overfill the waiting queue."""
        with self._lock:  # under the lock: a job is refused, or seen by _run's failure handler
            if self.failure is not None or self._stopping.is_set() or self._num_waiting + len(jobs) > self.max_waiting:
                return False
            self._num_waiting += len(jobs)
            for job in jobs:
                self._inbox.put(("add", job))
        return True

    def cancel(self, job: Job) -> None:
        if not job.finished and not job.cancelled:
            job.cancelled = True
            self._inbox.put(("cancel", job))

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._take_commands(block=not self._running and not self._waiting)
                self._admit()
                if self._running:
                    self._step()
                self._send_events()
                self.metrics.num_running.set(len(self._running))
                self.metrics.num_waiting.set(self._num_waiting)
        except BaseException as error:  # the thread must not die silently: fail every job it holds
            traceback.print_exc()
            with self._lock:  # from now on submit() refuses; what it queued before is in the inbox
                self.failure = f"engine thread failed: {error!r}"
            queued = []
            while not self._inbox.empty():
                command, job = self._inbox.get_nowait()
                queued += [job] if command == "add" else []
            for job in [row.job for row in self._running.values()] + list(self._waiting) + queued:
                if not job.cancelled:
                    self._fail(job, self.failure)
            self._send_events()
            raise

    def _take_commands(self, block: bool) -> None:
        try:
            command, job = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                if command == "add":
                    self._waiting.append(job)
                else:
                    self._drop(job)
                command, job = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _drop(self, job: Job) -> None:
        """A cancelled job: free its row now, or take it out of the waiting queue."""
        request_id = self._row_of.pop(job, None)
        if request_id is not None:
            self._running.pop(request_id, None)
            self.engine.cancel(request_id)
            self.metrics.request_cancelled.inc()
        elif job in self._waiting:
            self._waiting.remove(job)
            self._leave_waiting()
            self.metrics.request_cancelled.inc()

    def _leave_waiting(self) -> None:
        with self._lock:
            self._num_waiting -= 1

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            job = self._waiting.popleft()
            self._leave_waiting()
            if job.cancelled:
                self.metrics.request_cancelled.inc()
                continue
            try:
                request_id = self.engine.add(job.request)
            except (ValueError, ContextOverflowError) as error:
                self._fail(job, str(error), status=400)
                continue
            row = Row(job, StopStringDecoder(self.tokenizer, job.stop))
            self._running[request_id] = row
            self._row_of[job] = request_id
            self.metrics.prompt_tokens.inc(len(job.request.prompt_ids))

    def _step(self) -> None:
        try:
            start = time.perf_counter()
            updates = self.engine.step()
            self.metrics.observe_engine(time.perf_counter() - start, self.engine.row_step)
        except Exception as error:  # noqa: BLE001 -- a failed step leaves its rows unknown: end them, serve on
            traceback.print_exc()
            for request_id, row in list(self._running.items()):
                self._end_row(request_id)
                self.engine.cancel(request_id)
                self._fail(row.job, f"the engine failed: {error!r}")
            return
        for update in updates:
            row = self._running.get(update.request_id)
            if row is not None:  # None: a row cancelled after the step began
                self._advance(update.request_id, row, update)

    def _advance(self, request_id: int, row: Row, update) -> None:
        now = time.perf_counter()
        job = row.job
        row.before = self.metrics.observe_step(row.before, update.stats)
        if update.logprobs is not None:
            row.logprobs.extend(update.logprobs)
        text = row.decoder.add(update.tokens)
        finish_reason = FINISH_REASONS.get(update.finished) if update.finished else None
        if row.decoder.stopped is not None:
            finish_reason = "stop"
        elif update.finished == "cancelled":  # not asked for by us: report it as an error, never lose it
            self._end_row(request_id)
            self._fail(job, "the engine cancelled the request")
            return
        if finish_reason is not None:
            text += row.decoder.finish()
            self._end_row(request_id)
            if update.finished is None:  # ended by a stop string: the engine still holds the row
                self.engine.cancel(request_id)
        # tokens of the output so far: all fed ids, or the kept ones once it ended
        count = len(row.decoder.kept_ids) if finish_reason else len(row.decoder.ids)
        token_ids = row.decoder.ids[row.sent:count]
        logprobs = row.logprobs[row.sent:count] if job.request.logprobs is not None else None
        row.sent = count
        if token_ids and row.first_token_at is None:
            row.first_token_at = now
            self.metrics.ttft.observe(now - job.arrival)
        event = Event(job.index, text, token_ids, logprobs, finish_reason)
        if finish_reason is not None:
            job.finished = True
            event.stats = stats_dict(update.stats)
            event.stats["completion_tokens"] = count
            self.metrics.request_success.labels(finish_reason).inc()
            self.metrics.e2e_latency.observe(now - job.arrival)
        if text or token_ids or finish_reason:
            self._outbox.append((job, event))

    def _end_row(self, request_id: int) -> None:
        row = self._running.pop(request_id)
        self._row_of.pop(row.job, None)

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        job.finished = True
        self.metrics.request_errors.labels(str(status)).inc()
        self._outbox.append((job, Event(job.index, error=message, status=status)))

    def _send_events(self) -> None:
        """Hand this pass's events to their requests' queues: one call into each event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job.events, event))
        self._outbox = []
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass


def _deliver(deliveries: list[tuple[asyncio.Queue, Event]]) -> None:
    """On the event loop: each event into its request's queue, in the order the engine made them."""
    for events, event in deliveries:
        events.put_nowait(event)
