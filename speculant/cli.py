"""`speculant` on the command line: generate, models, distill, bench."""

from __future__ import annotations

import argparse
import json
import sys


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _gamma(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        gamma = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"gamma must be an integer >= 1 or 'auto', got {value!r}") from None
    if gamma < 1:
        raise argparse.ArgumentTypeError(f"gamma must be >= 1 (use --draft none for plain decoding), got {gamma}")
    return gamma


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2-135m", help="embedded name, HF folder or GGUF file")
    parser.add_argument("--draft", action="append", default=None, metavar="SPEC",
                        help="none | ngram[:MAX[:MIN]] | layers:N | int8 | NAME|PATH | default; repeat for a "
                             "hierarchy (each further drafter drafts for the one before)")
    parser.add_argument("--gamma", type=_gamma, default=4, help="draft length, or 'auto' (default 4)")
    parser.add_argument("--candidates", type=int, default=1, metavar="K",
                        help="candidates per draft position, scored as one tree (default 1: a chain); "
                             "for one draft model and a lean target")
    parser.add_argument("--lookup", type=int, default=0, metavar="G",
                        help="also verify a prompt-lookup continuation of up to G tokens beside the draft "
                             "model's, in the same target forward (default 0: none); pays on text that repeats, "
                             "such as code")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-seq-len", type=int, default=2048, help="KV cache capacity (tokens)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speculant", description="Exact speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text, streaming to stdout; stats on stderr")
    gen.add_argument("prompt")
    add_model_arguments(gen)
    add_sampling_arguments(gen)
    gen.add_argument("--chat", action="store_true", help="apply the target's chat template")
    gen.add_argument("--compare", action="store_true",
                     help="also run plain decoding of the target (same prompt, seed) and compare")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")

    sub.add_parser("models", help="list embedded and cached models")

    distill = sub.add_parser("distill", help="train a draft model for a target")
    from speculant.distill.train import add_distill_arguments

    add_distill_arguments(distill)

    bench = sub.add_parser("bench", help="benchmark drafters on real tasks")
    from speculant.bench.run import add_bench_arguments

    add_bench_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "models":
            return cmd_models()
        if args.command == "distill":
            from speculant.distill.train import distill_from_args

            return distill_from_args(args) or 0
        if args.command == "bench":
            from speculant.bench.run import bench_from_args

            return bench_from_args(args) or 0
    except KeyboardInterrupt:
        print("\nspeculant: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, PermissionError, OSError) as error:
        print(f"speculant: error: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_generate(args) -> int:
    import speculant.api as api

    # Check the cheap things before loading anything.
    api.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    if args.max_new_tokens < 0:
        raise CliError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    spec = api.load(target=args.target, draft=args.draft or ["default"], gamma=args.gamma,
                    device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len, candidates=args.candidates,
                    lookup=args.lookup)
    options = dict(chat=args.chat, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)

    if args.json:
        result = spec.generate(args.prompt, **options)
        out = {"text": result.text, "token_ids": result.token_ids, "stats": _public_stats(result.stats)}
    else:
        token_ids: list[int] = []
        decoder = spec.tokenizer.stream_decoder()
        _, steps = spec.steps(args.prompt, **options)
        stats = None
        for step in steps:
            token_ids.extend(step.tokens)
            stats = step.stats
            sys.stdout.write(decoder.add(step.tokens))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        out = {"token_ids": token_ids, "stats": _public_stats(spec.stats_dict(stats)) if stats else {}}

    if args.compare:
        plain = spec.generate(args.prompt, plain=True, **options)
        out["plain"] = {"token_ids": plain.token_ids, "tokens_per_s": plain.stats["tokens_per_s"]}
        plain_speed = plain.stats["tokens_per_s"]
        out["speedup"] = out["stats"].get("tokens_per_s", 0.0) / plain_speed if plain_speed else 0.0
        out["identical"] = plain.token_ids == out["token_ids"]

    if args.json:
        print(json.dumps(out))
    else:
        s = out["stats"]
        line = (f"[speculant] draft={','.join(spec.draft_specs)} gamma={s.get('gamma')} alpha={s.get('alpha', 0):.3f} "
                f"tau={s.get('tau', 0):.2f} target_calls={s.get('target_calls', 0)} new_tokens={s.get('new_tokens', 0)} "
                f"tok/s={s.get('tokens_per_s', 0):.1f} predicted_speedup={s.get('predicted_speedup', 0):.2f}")
        if args.compare:
            line += (f" | plain tok/s={out['plain']['tokens_per_s']:.1f} speedup={out['speedup']:.2f}x "
                     f"identical={out['identical']}")
        print(line, file=sys.stderr)
    return 0


def _public_stats(stats: dict) -> dict:
    keys = ("alpha", "tau", "target_calls", "new_tokens", "tokens_per_s", "gamma", "accepted_per_drafted",
            "drafted", "accepted", "acceptance_by_position", "cost_ratio", "predicted_speedup", "draft_time",
            "target_time", "prefill_time", "decode_time", "finish_reason", "mean_gamma", "gamma_history", "levels",
            "alternatives_kept", "lookup_tokens")
    return {k: stats[k] for k in keys if k in stats}


def cmd_models() -> int:
    from speculant.models.loading import list_models

    from speculant.api import EMBEDDED_DRAFTS

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
