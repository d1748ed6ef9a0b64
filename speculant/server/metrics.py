"""Prometheus metrics of the server, with vLLM's names where vLLM has one (without its `vllm:`
prefix): speculative decoding counters, request counts, latency, time to first token, and the
running / waiting gauges. One registry per server, so tests can run several in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from speculant.analysis import position_gains

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
STEP_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 4.096, 16.384, 65.536)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # speculative decoding (vLLM: spec_decode_*)
        self.num_drafts = Counter("spec_decode_num_drafts", "Target calls that verified at least one draft token",
                                  registry=r)
        self.num_draft_tokens = Counter("spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.num_accepted_tokens = Counter("spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted, by position in the draft (0 = first)",
                                        ["position"], registry=r)
        self.drafted_per_pos = Counter("spec_decode_num_draft_tokens_per_pos",
                                       "Draft tokens proposed, by position in the draft (0 = first)",
                                       ["position"], registry=r)
        self.target_calls = Counter("spec_decode_num_target_calls", "Target forward passes, summed over rows",
                                    registry=r)
        # requests (vLLM: request_success_total, prompt_tokens_total, generation_tokens_total, ...)
        self.request_success = Counter("request_success", "Requests finished, by finish reason",
                                       ["finished_reason"], registry=r)
        self.request_errors = Counter("request_errors", "Requests refused or failed, by HTTP status",
                                      ["status"], registry=r)
        self.request_cancelled = Counter("request_cancelled", "Requests whose client went away before the end",
                                         registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated", registry=r)
        self.e2e_latency = Histogram("e2e_request_latency_seconds", "Time from arrival to the last token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.num_running = Gauge("num_requests_running", "Requests in the batch", registry=r)
        self.num_waiting = Gauge("num_requests_waiting", "Requests queued for a batch slot", registry=r)
        # the engine itself (speculant's own): where a step's time goes, and whether steps replay graphs
        self.step_seconds = Histogram("engine_step_seconds", "Seconds of one BatchEngine.step (admission, "
                                      "prefill, draft, verify, commit)", buckets=STEP_BUCKETS, registry=r)
        self.graphs_captured = Gauge("engine_cuda_graphs_captured", "CUDA graphs the engine holds (steps and "
                                     "prefills, one per bucket)", registry=r)
        self.compile_fallbacks = Gauge("engine_compile_fallbacks", "Times a compiler error turned the compiled "
                                       "row forwards off (they run eagerly inside the graphs from then on)",
                                       registry=r)
        self._functions_seen = -1  # RowStep.graphs' size when observe_engine last read the engine
        self.warm_up_seconds = Gauge("engine_warm_up_seconds", "Seconds the warm-up at start took (0: none)",
                                     registry=r)

    def observe_engine(self, seconds: float, row_step) -> None:
        """A step of `seconds`; the graphs and compile fallbacks of its speculant.row_step.RowStep so far
        (read again only when it made a function: both change only then, and counting the captured
        graphs walks them all)."""
        self.step_seconds.observe(seconds)
        if len(row_step.graphs) != self._functions_seen:
            self._functions_seen = len(row_step.graphs)
            self.graphs_captured.set(row_step.captured)
            self.compile_fallbacks.set(row_step.compile_fallbacks)

    def observe_step(self, before: tuple, stats) -> tuple:
        """Add what a row's GenerationStats gained since `before` (a snapshot this returned last time)."""
        now = snapshot(stats)
        drafted, accepted, calls, tokens = (a - b for a, b in zip(now[:4], before[:4]))
        self.num_draft_tokens.inc(drafted)
        self.num_accepted_tokens.inc(accepted)
        self.target_calls.inc(calls)
        self.generation_tokens.inc(tokens)
        if drafted:
            self.num_drafts.inc(calls)
        for pos, (drafted_gain, accepted_gain) in enumerate(zip(position_gains(now[4], before[4]),
                                                                 position_gains(now[5], before[5]))):
            if drafted_gain > 0:
                self.drafted_per_pos.labels(str(pos)).inc(drafted_gain)
            if accepted_gain > 0:
                self.accepted_per_pos.labels(str(pos)).inc(accepted_gain)
        return now

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def snapshot(stats) -> tuple:
    """The counters of a GenerationStats that the metrics follow (None: a fresh row)."""
    if stats is None:
        return (0, 0, 0, 0, (), ())
    return (stats.drafted, stats.accepted, stats.target_calls, stats.new_tokens,
            tuple(stats.drafted_by_position), tuple(stats.accepted_by_position))
