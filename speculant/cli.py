"""`speculant` on the command line: generate, chat, models, distill, bench.

Exit status: 0 done; 2 bad input (one line on stderr that names the flag and what to do); 1 an
internal error (one line; SPECULANT_TRACEBACK=1 prints the traceback); 130 interrupted by Ctrl-C
(the output printed so far is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from speculant.args import (
    ArgumentParser,
    add_bit_exact_argument,
    add_kernels_argument,
    add_model_arguments,
    add_sampling_arguments,
    int_at_least,
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from speculant import __version__

    parser = ArgumentParser(prog="speculant", description="Exact speculative decoding.")
    parser.add_argument("--version", action="version", version=f"speculant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text, streaming to stdout; stats on stderr",
                         description="Generate a continuation of PROMPT (or a chat reply), streaming it to stdout "
                                     "with one stats line on stderr.")
    gen.add_argument("prompt", nargs="?", default=None,
                     help="the prompt; '-' or none with stdin piped in: read the prompt from stdin")
    add_model_arguments(gen)
    add_bit_exact_argument(gen)
    add_kernels_argument(gen)
    add_sampling_arguments(gen)
    gen.add_argument("--chat", action="store_true", help="apply the target's chat template")
    gen.add_argument("--prompts-file", default=None, metavar="FILE",
                     help="JSONL, one request a line: a JSON string, or {\"prompt\": ...} or {\"messages\": [...]} "
                          "(optional \"system\"); '-' reads stdin; prints one JSON result a line")
    gen.add_argument("--logprobs", type=int_at_least(0), default=None, metavar="N",
                     help="report each token's log-probability under the target (raw logits) and the N most "
                          "likely tokens (in --json output, else on stderr)")
    gen.add_argument("--compare", action="store_true",
                     help="also run plain decoding of the target (same prompt, seed) and compare")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")

    chat = sub.add_parser("chat", help="chat with the target interactively (streaming, stats per turn)",
                          description="An interactive chat: type a message, get the reply streamed. /reset "
                                      "forgets the conversation; /exit or Ctrl-D ends; Ctrl-C stops a reply.")
    add_model_arguments(chat)
    add_bit_exact_argument(chat)
    add_kernels_argument(chat)
    add_sampling_arguments(chat)

    sub.add_parser("models", help="list embedded and cached models")

    distill = sub.add_parser("distill", help="train a draft model for a target")
    from speculant.distill.cli import add_distill_arguments

    add_distill_arguments(distill)

    bench = sub.add_parser("bench", help="benchmark drafters on real tasks")
    from speculant.bench.run import add_bench_arguments

    add_bench_arguments(bench)

    from speculant.server import add_parser as add_serve_parser

    add_serve_parser(sub)

    from speculant.diffusion.cli import add_parser as add_diffusion_parser

    add_diffusion_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status. Called as the program (argv None), Ctrl-C is
    noted as it arrives, so that an interrupt that a library swallowed (a bare `except:` around an
    import, after which the import fails again) still exits 130; a Ctrl-C that comes after the work is
    done is ignored, so that it cannot interrupt the interpreter's exit."""
    if argv is not None:
        return _main(argv)
    import signal

    def note_interrupt(signum, frame):
        _INTERRUPTED.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note_interrupt)
    try:
        code = _main(None)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == 130:
        # Exit at once: an interrupt raised inside a library's embedded code leaves CPython set to kill
        # itself with SIGINT at shutdown, which would replace the status 130 with a signal.
        _flush_quietly()
        os._exit(130)
    return code


_INTERRUPTED: list[int] = []  # signals noted by main's SIGINT handler (the program only)


def _main(argv: list[str] | None) -> int:
    command = None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help, --version, or a usage error already printed
            return done.code if isinstance(done.code, int) else 2
        command = args.command
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "models":
            return cmd_models()
        if args.command == "distill":
            from speculant.distill.cli import distill_from_args

            return distill_from_args(args) or 0
        if args.command == "bench":
            from speculant.bench.run import bench_from_args

            return bench_from_args(args) or 0
        if args.command == "serve":
            from speculant.server import run as serve

            return serve(args)
        if args.command == "diffusion":
            from speculant.diffusion.cli import run as diffusion

            return diffusion(args)
    except KeyboardInterrupt:
        return _interrupted(command)
    except BrokenPipeError:  # stdout closed early (speculant ... | head): the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CliError, ValueError, OSError) as error:
        if _INTERRUPTED:
            return _interrupted(command)
        print(f"speculant: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 -- a bug: one line, the traceback on request
        if _INTERRUPTED:  # e.g. an import that fails because the interrupt broke its first attempt
            return _interrupted(command)
        if os.environ.get("SPECULANT_TRACEBACK"):
            import traceback

            traceback.print_exc()
        print(f"speculant: internal error: {type(error).__name__}: {_one_line(error)} (a bug: please report "
              "it; SPECULANT_TRACEBACK=1 prints where it happened)", file=sys.stderr)
        return 1
    return 0


def _interrupted(command: str | None) -> int:
    _flush_quietly()
    resume = "; run the same command again to resume from the last checkpoint" if command == "distill" else ""
    print(f"\nspeculant: interrupted{resume}", file=sys.stderr)
    return 130


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:400] + "..."


def _flush_quietly() -> None:
    """Flush stdout and stderr, ignoring a closed or broken stream."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _checked_text(text: str, what: str) -> str:
    """Command-line text arrives decoded with errors='surrogateescape': bytes that are not UTF-8
    become lone surrogates, which the tokenizer refuses. Say so, naming where they came from."""
    from speculant.tokenizer import check_text

    try:
        return check_text(text, what)
    except ValueError as error:
        raise CliError(str(error)) from None


def _read_utf8(stream, what: str) -> str:
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"{what} is not valid UTF-8: byte {data[error.start]:#04x} at offset {error.start}; "
                       "pass UTF-8 text") from None


def _requests(args) -> list[dict]:
    """The requests of `generate` (prompt, messages, system), checked before any model is loaded."""
    system = None if args.system is None else _checked_text(args.system, "--system")
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise CliError("give either a PROMPT or --prompts-file, not both")
        if args.compare:
            raise CliError("--compare takes one PROMPT, not --prompts-file")
        if args.prompts_file == "-":
            text, source = _read_utf8(sys.stdin.buffer, "stdin (--prompts-file -)"), "stdin"
        else:
            try:
                with open(args.prompts_file, "rb") as f:
                    text = _read_utf8(f, f"--prompts-file {args.prompts_file}")
            except IsADirectoryError:
                raise CliError(f"--prompts-file {args.prompts_file} is a folder; give a JSONL file") from None
            except FileNotFoundError:
                raise CliError(f"--prompts-file {args.prompts_file}: no such file") from None
            source = args.prompts_file
        requests = [_jsonl_request(line, f"--prompts-file {source} line {number}", system)
                    for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not requests:
            raise CliError(f"--prompts-file {source} holds no request (one JSON string or object a line)")
        return requests
    if args.prompt is None or args.prompt == "-":
        if args.prompt is None and sys.stdin.isatty():
            raise CliError("give a PROMPT, '-' to read it from stdin, or --prompts-file FILE")
        prompt = _read_utf8(sys.stdin.buffer, "the prompt read from stdin")
    else:
        prompt = _checked_text(args.prompt, "the prompt")
    if not prompt:
        raise CliError("the prompt is empty; give some text")
    return [{"prompt": prompt, "system": system}]


def _jsonl_request(line: str, where: str, system: str | None) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise CliError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item) or set(item) - {
            "prompt", "messages", "system"}:
        raise CliError(f'{where}: give a JSON string, or an object with "prompt" or "messages" (and optionally '
                       '"system")')
    if "prompt" in item and (not isinstance(item["prompt"], str) or not item["prompt"]):
        raise CliError(f'{where}: "prompt" must be a non-empty string')
    if "system" in item and not isinstance(item["system"], str):
        raise CliError(f'{where}: "system" must be a string')
    item.setdefault("system", system)
    item["where"] = where
    return item


def _load(args):
    from speculant import api

    stops = [_checked_text(s, "--stop") for s in args.stop or []]
    if any(not s for s in stops):
        raise CliError("--stop must not be empty")
    return api.load(target=args.target, draft=args.draft or ["default"], gamma=args.gamma, device=args.device,
                    dtype=args.dtype, max_seq_len=args.max_seq_len, candidates=args.candidates, lookup=args.lookup,
                    backend=args.backend, bit_exact=args.bit_exact, kernels=args.kernels)


def _options(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed, "stop": args.stop}


def cmd_generate(args) -> int:
    if args.logprobs is not None and args.logprobs > 20:
        raise CliError(f"--logprobs must be at most 20 (alternatives per token), got {args.logprobs}")
    requests = _requests(args)  # cheap checks (and reading stdin) before loading anything
    spec = _load(args)
    options = _options(args)
    chat = args.chat

    def run(request: dict, **more):
        if "messages" in request:
            return spec.generate(messages=request["messages"], system=request["system"], **options, **more)
        return spec.generate(request["prompt"], system=request["system"], chat=chat, **options, **more)

    if args.prompts_file is not None:  # all at once where the engine batches (see Speculant.generate_many)
        from speculant import api

        batch = [{k: request[k] for k in ("prompt", "messages", "system") if k in request} for request in requests]
        for request in batch:
            if "prompt" in request:
                request["chat"] = chat
        try:
            results = spec.generate_many(batch, logprobs=args.logprobs, **options)
        except api.BadRequest as error:  # this request's messages, or its length: say which line it was
            raise CliError(f"{requests[error.index]['where']}: {error.reason}") from None
        for index, result in enumerate(results):
            print(_json({"index": index, **_result_json(result)}), flush=True)
            _warn_if_context_full(spec, result.stats)
        return 0

    [request] = requests
    if args.json:
        result = run(request, logprobs=args.logprobs)
    else:
        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = run(request, logprobs=args.logprobs, on_text=write)
        sys.stdout.write("\n")
        sys.stdout.flush()
    out = _result_json(result)

    if args.compare:
        plain = run(request, plain=True)
        out["plain"] = {"token_ids": plain.token_ids, "tokens_per_s": plain.stats["tokens_per_s"]}
        plain_speed = plain.stats["tokens_per_s"]
        out["speedup"] = out["stats"].get("tokens_per_s", 0.0) / plain_speed if plain_speed else 0.0
        out["identical"] = plain.token_ids == out["token_ids"]

    if args.json:
        print(_json(out))
    else:
        if result.logprobs is not None:
            _print_logprobs(result.logprobs)
        print(_stats_line(spec, out["stats"]) + (
            f" | plain tok/s={out['plain']['tokens_per_s']:.1f} speedup={out['speedup']:.2f}x "
            f"identical={out['identical']}" if args.compare else ""), file=sys.stderr)
    _warn_if_context_full(spec, result.stats)
    return 0


def _result_json(result) -> dict:
    out = {"text": result.text, "token_ids": result.token_ids, "stats": _public_stats(result.stats)}
    if result.stop is not None:
        out["stop"] = result.stop
    if result.logprobs is not None:
        out["logprobs"] = [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob,
                            "top": [{"token_id": i, "token": s, "logprob": v} for i, s, v in t.top]}
                           for t in result.logprobs]
    return out


def _json(obj) -> str:
    """Strict JSON (a NaN or infinity is a bug, not a number to print)."""
    return json.dumps(obj, allow_nan=False)


def _stats_line(spec, s: dict) -> str:
    return (f"[speculant] backend={s.get('backend', 'torch')} draft={','.join(spec.draft_specs)} "
            f"gamma={s.get('gamma')} alpha={s.get('alpha', 0):.3f} "
            f"tau={s.get('tau', 0):.2f} target_calls={s.get('target_calls', 0)} new_tokens={s.get('new_tokens', 0)} "
            f"tok/s={s.get('tokens_per_s', 0):.1f} predicted_speedup={s.get('predicted_speedup', 0):.2f} "
            f"finish={s.get('finish_reason', '')}")


def _print_logprobs(logprobs) -> None:
    for t in logprobs:
        top = "  ".join(f"{s!r} {v:.3f}" for _, s, v in t.top)
        print(f"[logprobs] {t.token!r} {t.logprob:.4f}" + (f"  | {top}" if top else ""), file=sys.stderr)


def _warn_if_context_full(spec, stats: dict) -> None:
    if stats.get("finish_reason") == "context":
        capacity = spec.target.model.max_seq_len
        print(f"speculant: warning: stopped after {stats.get('new_tokens', 0)} new tokens: the KV cache of "
              f"{capacity} tokens is full; raise --max-seq-len (up to {spec.target.name}'s context of "
              f"{spec.target.context_length}) for longer outputs", file=sys.stderr)


def cmd_chat(args) -> int:
    system = None if args.system is None else _checked_text(args.system, "--system")
    spec = _load(args)
    options = _options(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"speculant chat: {spec.target.name}, draft {','.join(spec.draft_specs)}. /reset forgets the "
              "conversation, /exit or Ctrl-D ends, Ctrl-C stops a reply.", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except UnicodeDecodeError:
            print("speculant: that line is not valid UTF-8; type it again", file=sys.stderr)
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return 0
        if command == "/reset":
            messages.clear()
            continue
        try:
            text = _checked_text(line, "the message")
        except CliError as error:
            print(f"speculant: {error}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        shown: list[str] = []

        def write(piece: str, shown: list[str] = shown) -> None:
            shown.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        try:
            result = spec.generate(messages=messages, system=system, on_text=write, **options)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            messages.append({"role": "assistant", "content": "".join(shown)})
            print("\n[reply stopped]", file=sys.stderr)
            continue
        except ValueError as error:  # the conversation no longer fits, or the template refuses it
            messages.pop()
            print(f"speculant: error: {_one_line(error)} (/reset starts over)", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": result.text})
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(_stats_line(spec, _public_stats(result.stats)), file=sys.stderr)
        _warn_if_context_full(spec, result.stats)


def _public_stats(stats: dict) -> dict:
    keys = ("alpha", "tau", "target_calls", "new_tokens", "tokens_per_s", "gamma", "accepted_per_drafted",
            "drafted", "accepted", "acceptance_by_position", "cost_ratio", "predicted_speedup", "draft_time",
            "target_time", "prefill_time", "decode_time", "finish_reason", "mean_gamma", "gamma_history", "levels",
            "alternatives_kept", "lookup_tokens", "backend")
    return {k: stats[k] for k in keys if k in stats}


def cmd_models() -> int:
    from speculant.chain import EMBEDDED_DRAFTS
    from speculant.models.registry import list_models

    rows = list_models()
    for folder in sorted(EMBEDDED_DRAFTS.glob("*/config.json")):
        config = json.loads(folder.read_text())
        weights = folder.parent / "model.safetensors"
        rows.append({"name": folder.parent.name, "vocab_size": config["architecture"]["vocab_size"],
                     "cached": True, "location": f"{folder.parent} (draft for {config['target_name']}, "
                     f"{weights.stat().st_size / 1e6:.1f} MB)"})
    print(f"{'name':<24} {'params':>10} {'vocab':>8} {'cached':>7}  location")
    for row in rows:
        params = f"{row.get('num_params', 0) / 1e6:.1f}M" if row.get("num_params") else "?"
        print(f"{row['name']:<24} {params:>10} {row.get('vocab_size') or '?':>8} "
              f"{'yes' if row.get('cached') else 'no':>7}  {row.get('location', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
