"""The command-line flags and argparse types that `speculant`'s sub-commands share (generate, chat,
serve): the parser class (defaults in --help, a usage error in one line), the model and sampling
flags, and argument types that check a value where it is typed. Both speculant.cli and
speculant.server import it; it imports neither.
"""

from __future__ import annotations

import argparse
import math


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None (its help says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default shown in --help and a usage error as one line (exit status 2).
    Sub-commands added with `add_parser` get this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _gamma(value: str) -> int | str:
    from speculant.adaptive import parse_gamma

    try:
        return parse_gamma(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (--draft none decodes without a draft)") from None


def int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {number}")
        return number
    return parse


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = False, note: str = ""):
    """An argparse type: a finite float in the interval, e.g. number_in(0, 1, low_open=True) for (0, 1]."""
    interval = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf else
                f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and (low < number if low_open else low <= number)
                and (number < high if high_open else number <= high)):
            raise argparse.ArgumentTypeError(f"must be a number {interval}{note}, got {value!r}")
        return number
    return parse


def device_name(value: str) -> str:
    """An argparse type: cpu, cuda or cuda:N (whether the device exists is checked when loading)."""
    if value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {value!r}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2-135m", help="embedded name, HF folder or GGUF file")
    parser.add_argument("--draft", action="append", default=None, metavar="SPEC",
                        help="none | ngram[:MAX[:MIN]] | layers:N | int8 | NAME|PATH | default; repeat for a "
                             "hierarchy (each further drafter drafts for the one before); None means default: "
                             "the target's embedded draft, else ngram")
    parser.add_argument("--gamma", type=_gamma, default=4,
                        help="draft length, or 'auto': γ each step from the request's acceptance and this "
                             "machine's step costs (timed once, kept in the cache; SPECULANT_RECALIBRATE=1 "
                             "times them again); reproducible, also with --candidates and --lookup")
    parser.add_argument("--candidates", type=int_at_least(1), default=1, metavar="K",
                        help="candidates per draft position, scored as one tree (1: a chain); "
                             "for one draft model and a lean target")
    parser.add_argument("--lookup", type=int_at_least(0), default=0, metavar="G",
                        help="also verify a prompt-lookup continuation of up to G tokens beside the draft "
                             "model's, in the same target forward (0: none); pays on text that repeats, "
                             "such as code")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--backend", choices=["torch", "llama.cpp", "auto"], default="torch",
                        help="where the target and model drafts run: torch, llama.cpp (GGUF on llama.cpp's CPU "
                             "kernels; bash scripts/setup.sh --llama-cpp), auto (llama.cpp where it can run the "
                             "request, else torch); the stats line says which ran")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the models' weights and activations")
    parser.add_argument("--max-seq-len", type=int_at_least(2), default=None,
                        help="KV cache capacity in tokens (prompt + output), at most the target's context "
                             "(default: 2048, or the target's context where that is shorter)")


def add_bit_exact_argument(parser: argparse.ArgumentParser) -> None:
    """--bit-exact, for generate, chat and serve."""
    parser.add_argument("--bit-exact", action=argparse.BooleanOptionalAction, default=None,
                        help="decode with fixed-width target forwards and position-ordered attention, plain and "
                             "speculative alike, so that greedy output equals plain greedy decoding token for token "
                             "in bfloat16 on a GPU too, and a batched request's tokens do not depend on the others "
                             "(slower, batches most: a forward per request per step; a lean torch target, any "
                             "--draft chain, 1 + gamma*candidates + lookup <= 32; with --kernels triton: the "
                             "forwards' own rows on row-invariant Triton kernels instead of a fixed width). "
                             "Default: on with --kernels triton where the step fits (it costs a few %%), off "
                             "otherwise; --no-bit-exact turns it off")


def add_kernels_argument(parser: argparse.ArgumentParser) -> None:
    """--kernels, for the commands that decode one request at a time (generate, chat)."""
    parser.add_argument("--kernels", choices=["torch", "triton"], default="torch",
                        help="the fused step's target forwards (and a token draft model's) on torch's kernels or on "
                             "speculant's Triton kernels (6 per layer; a lean Llama or Qwen2 target on a GPU, one "
                             "drafter level; with --bit-exact: row-invariant kernels, no fixed width)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Defaults are greedy decoding, as in the Python API: reproducible output, equal token for token
    to plain greedy decoding. --temperature > 0 samples; the output's law is exactly the target's."""
    parser.add_argument("--temperature", type=number_in(0, math.inf, note=" (0 = greedy)"), default=0.0,
                        help="0 = greedy")
    parser.add_argument("--top-k", type=int_at_least(0), default=0, help="keep the K most likely tokens (0: off)")
    parser.add_argument("--top-p", type=number_in(0, 1, low_open=True, note=" (1 = off)"), default=1.0,
                        help="keep the smallest set of most likely tokens of this mass (1: off)")
    parser.add_argument("--min-p", type=number_in(0, 1, high_open=True, note=" (0 = off)"), default=0.0,
                        help="keep tokens at least this fraction of the most likely one's probability (0: off)")
    parser.add_argument("--max-new-tokens", type=int_at_least(0), default=128,
                        help="at most this many new tokens (fewer if the KV cache fills: see --max-seq-len)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the random draws")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end the output before this text (not included); repeatable; e.g. --stop $'\\n\\n'")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="a system message (implies the target's chat template)")
