"""`speculant serve`: an OpenAI-compatible HTTP server over the batched speculative engine.

    speculant serve                                    # the embedded pair (smollm2-135m + its draft), CPU
    speculant serve --target smollm2-135m --draft ngram --gamma 4 --device cuda --port 8000

Layout: schemas.py (OpenAI request bodies), engine_thread.py (the one thread that owns the
BatchEngine), metrics.py (Prometheus), app.py (FastAPI routes). The app runs on uvicorn.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    from speculant.args import add_bit_exact_argument, add_model_arguments, int_at_least

    serve = subparsers.add_parser(
        "serve", help="serve the target over an OpenAI-compatible HTTP API (continuous batching)",
        description="Serve OpenAI's /v1/completions and /v1/chat/completions (streaming too), /v1/models, "
                    "/health and /metrics, with continuous batching of speculative requests.")
    add_model_arguments(serve)
    add_bit_exact_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=port_number, default=8000)
    serve.add_argument("--max-batch", type=int_at_least(1), default=64,
                       help="requests decoded at once (rows of a step)")
    serve.add_argument("--max-waiting", type=int_at_least(1), default=256,
                       help="requests that may wait for a row; more are answered 429")
    serve.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                       help="each batched step as one captured CUDA graph (speculant.row_step); auto: on CUDA, "
                            "unless --bit-exact (its rows run one at a time, eagerly)")
    serve.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="the decoder layers inside the graphs through torch.compile (one compiled layer for "
                            "all of them, the batch's steps and a lone request's single-request engine alike): fewer "
                            "kernels per step (fused ones instead of one per torch op), at the price of "
                            "several compiles of one layer in the warm-up. "
                            "Default: on where the steps are captured as CUDA graphs (CUDA), off elsewhere; "
                            "--no-compile turns it off")
    serve.add_argument("--solo", action=argparse.BooleanOptionalAction, default=True,
                       help="with --gamma auto: a request that runs alone runs the single-request engine (the "
                            "fused step on CUDA, its own gamma auto, --candidates and --lookup where given: the "
                            "batch drafts their chain) instead of a batch of one row; it joins the batch when others come (--no-solo: always batched)")
    serve.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                       help="with graphs on CUDA, capture every step and prefill graph (and compile the forwards "
                            "they hold) before answering; /health answers once this is done")
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients pass as `model` (default: --target as given)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (info logs every request)")
    return serve


def port_number(value: str) -> int:
    """An argparse type: a TCP port, 0..65535."""
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {value!r}")
    return int(value)


def engine_options(args: argparse.Namespace, device_type: str) -> tuple[bool, bool]:
    """(graphs, compile) for the batch engine of `serve` on a device of this type ("cpu", "cuda").
    graphs: --graphs on, or auto on CUDA unless --bit-exact. compile (the row forwards through
    torch.compile, only inside static steps): --compile / --no-compile, or by default where the
    steps are captured as CUDA graphs, i.e. graphs on CUDA (the CPU's static steps run eagerly:
    compiling them would cost the warm-up and gain little)."""
    graphs = args.graphs == "on" or (args.graphs == "auto" and device_type == "cuda" and not args.bit_exact)
    compile = graphs and (device_type == "cuda" if args.compile is None else args.compile)
    return graphs, compile


def check_can_listen(host: str, port: int) -> None:
    """Raise ValueError (one line for the CLI) if host:port cannot be bound now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(infos[0][4])
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def run(args: argparse.Namespace) -> int:
    """Load the pair, start the engine thread and uvicorn; returns when the server stops (Ctrl-C)."""
    import uvicorn

    import speculant
    from speculant.sampling import SamplingParams
    from speculant.server.app import ServerState, create_app
    from speculant.server.engine_thread import EngineThread
    from speculant.server.metrics import ServerMetrics

    # the params sets of plain requests, made ahead: sampled at OpenAI's defaults, and greedy
    warm_up_params = [SamplingParams(), SamplingParams(temperature=0.0)]
    check_can_listen(args.host, args.port)  # before the model loads: a busy port is found out at once
    print(f"speculant serve: loading {args.target} ...", file=sys.stderr, flush=True)
    graphs, compile = engine_options(args, args.device.partition(":")[0])
    # a lone request's fused step (--solo) compiles the same one layer as the batch's steps: whole
    # forwards would compile once per step shape, minutes for a tree with a lookup branch
    spec = speculant.load(target=args.target, draft=args.draft or "default", gamma=args.gamma, device=args.device,
                          dtype=args.dtype, max_seq_len=args.max_seq_len, candidates=args.candidates,
                          lookup=args.lookup, backend=args.backend, bit_exact=args.bit_exact,
                          compile="layers" if compile else None)
    engine = spec.batch_engine(max_batch=args.max_batch, graphs=graphs, compile=compile, solo=args.solo)
    metrics = ServerMetrics()
    row_step = engine.row_step
    steps = "captured as CUDA graphs" if row_step.pool is not None else "static, run eagerly" if graphs else "eager"
    print(f"speculant serve: steps {steps}, row forwards {'compiled' if row_step.compiled else 'eager'}",
          file=sys.stderr, flush=True)
    # before the server listens, so /health answers only once warm; only where there is something to
    # make ahead (graphs to capture, forwards to compile): the CPU's static steps run eagerly
    if graphs and args.warm_up and (row_step.pool is not None or row_step.compiled):
        print("speculant serve: warming up (every step and prefill bucket) ...", file=sys.stderr, flush=True)
        warm = engine.warm_up(params=warm_up_params)
        metrics.warm_up_seconds.set(warm.seconds)
        metrics.graphs_captured.set(row_step.captured)
        metrics.compile_fallbacks.set(row_step.compile_fallbacks)
        print(f"speculant serve: warm-up {warm.seconds:.1f} s: {warm.functions} step and prefill functions, "
              f"{warm.captured} CUDA graphs, {row_step.compile_fallbacks} compile fallbacks", file=sys.stderr,
              flush=True)
    if engine.solo_steps is not None and args.warm_up:  # its steps at every γ and its prefills of every length
        seconds = spec.warm_up(warm_up_params)
        print(f"speculant serve: lone requests run the single-request engine (warmed up in {seconds:.1f} s)",
              file=sys.stderr, flush=True)
    names = tuple(dict.fromkeys(n for n in (args.served_model_name, args.target, spec.target.name) if n))
    state = ServerState(spec=spec, model_names=names, max_seq_len=spec.target.model.max_seq_len,
                        engine=EngineThread(engine, spec.tokenizer, metrics, args.max_batch, args.max_waiting),
                        metrics=metrics, created=int(time.time()))
    print(f"speculant serve: {names[0]} (draft {', '.join(spec.draft_specs)}, gamma {args.gamma}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    return 0
