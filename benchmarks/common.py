"""What the benchmark scripts share: the common flags (--device, --dtype, --threads, --out), their
checking, and the output: a readable table, then one JSON line for scripts, the same summary as a
JSON file under --out.

    parser = common.arguments(__doc__, out_default="bench-out/gpu")
    parser.add_argument(...)                          # the script's own flags
    args = parser.parse_args()
    dtype = common.setup(args)                        # "float32" / "bfloat16": what speculant.load takes
    ...
    common.finish(args.out, "gpu_speed.json", summary, table, last_line)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from speculant.api import check_device
from speculant.models.base import DTYPES


def apply_triton_settings(text: str) -> None:
    """Set speculant.models.triton_layers settings ("PDL=1,PREFETCH=4") for the whole run; every script that
    imports this module does so with SPECULANT_TRITON_SETTINGS, before it runs a kernel."""
    if not text:
        return
    from speculant.models import triton_layers

    try:
        values = triton_layers.parse_settings(text)
    except ValueError as error:
        raise SystemExit(f"error: SPECULANT_TRITON_SETTINGS: {error}") from None
    for name, value in values.items():
        setattr(triton_layers, name, value)
    print(f"# triton_layers settings: {text}", flush=True)


apply_triton_settings(os.environ.get("SPECULANT_TRITON_SETTINGS", ""))


def arguments(doc: str | None, *, device: str = "cpu", out_default: str = "out") -> argparse.ArgumentParser:
    """A parser with the common flags; `doc` (the script's docstring) is its description."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=device, help="cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=os.environ.get("OUT", out_default),
                        help="folder for the JSON summary ($OUT, else %(default)s)")
    return parser


def setup(args: argparse.Namespace) -> str:
    """Check the device, set the thread count; returns the dtype's name. Bad values end the script
    with one line and status 2, as argparse does."""
    try:
        check_device(args.device)
    except ValueError as error:
        raise SystemExit(f"error: --device: {error}") from None
    if args.threads < 0:
        raise SystemExit(f"error: --threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        return "bfloat16" if args.device.startswith("cuda") else "float32"
    return args.dtype


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """Rows as left-aligned text columns (numbers as given: format them first)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def write_json(out: str | Path, file_name: str, data) -> Path:
    """Write `data` to out/file_name (partial results, rewritten as a run goes)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    path.write_text(json.dumps(data, indent=1))
    return path


def finish(out: str | Path, file_name: str, summary: dict, text: str, last_line: dict) -> Path:
    """Write `summary` to out/file_name, print `text` (the table) and then `last_line` as one JSON line."""
    path = write_json(out, file_name, summary)
    print(f"\n{text}")
    print(json.dumps({**last_line, "json": str(path)}))
    return path


# SmolLM2-135M's shapes, for benchmarks on random weights: TransformerConfig(num_layers=..., **SMOLLM2_SHAPES)
SMOLLM2_SHAPES = {"arch": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                  "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
                  "rope_theta": 100000.0, "rms_norm_eps": 1e-5}
# Qwen2.5-Coder-1.5B's (Qwen2: biases on q, k, v; the head tied to the embedding, as its GGUF has it)
QWEN_1_5B_SHAPES = {"arch": "llama", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                    "num_heads": 12, "num_kv_heads": 2, "head_dim": 128, "max_position_embeddings": 32768,
                    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "attention_bias": True}
RANDOM_SHAPES = {"smollm2-135m": (SMOLLM2_SHAPES, 30), "qwen2.5-1.5b": (QWEN_1_5B_SHAPES, 28)}


def graph_replay_ms(call, repeats: int = 200) -> tuple[float, float]:
    """(ms per replay, seconds to warm up and capture) of call() captured as one CUDA graph: three warm-up
    calls on a side stream, the capture, ten untimed replays, then `repeats` replays between CUDA events."""
    begin = time.perf_counter()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        call()
    torch.cuda.synchronize()
    setup = time.perf_counter() - begin
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, setup


def cuda_kernel_profile(call) -> tuple[Counter, dict[str, float]]:
    """The CUDA kernels one call() launches (after one untimed call), from torch.profiler: (launches by
    name, device µs by name), names cut to 80 characters."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
    counts, times = Counter(), defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            name = event.name[:80]
            counts[name] += 1
            times[name] += event.device_time if hasattr(event, "device_time") else event.cuda_time
    return counts, dict(times)


HELD_OUT = Path(__file__).resolve().parent / "prompts"  # prompts no draft was trained or tuned on

# The held-out domains: name -> (file in prompts/, whether the text goes through the chat template).
# Each file's header says where its prompts come from; none is Python source, pydoc text or HumanEval.
HELD_OUT_DOMAINS = {
    "chat": ("heldout_chat.txt", True),  # everyday questions in English
    "code": ("heldout_code.jsonl", False),  # Python functions of libraries no draft was trained on
    "chat_languages": ("heldout_chat_languages.txt", True),  # everyday questions in German, French, ...
    "math": ("heldout_math.txt", True),  # word problems
    "code_languages": ("heldout_code_languages.jsonl", False),  # C, JS, shell, Go, SQL, Perl from this machine
    "prose": ("heldout_prose.txt", False),  # openings of science / history paragraphs, continued
}


def heldout_texts(domain: str, n: int) -> list[str]:
    """The first n prompts of a held-out domain (HELD_OUT_DOMAINS): the lines of a .txt file, the
    "prompt" fields of a .jsonl file; lines starting with # are comments in both."""
    if domain not in HELD_OUT_DOMAINS:
        raise ValueError(f"unknown held-out domain {domain!r}; choose from {', '.join(HELD_OUT_DOMAINS)}")
    path = HELD_OUT / HELD_OUT_DOMAINS[domain][0]
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines][:n]
    return [line.strip() for line in lines][:n]


def heldout_chat_texts(n: int) -> list[str]:
    """The first n everyday questions of prompts/heldout_chat.txt (no Python topics)."""
    return heldout_texts("chat", n)


def heldout_code_texts(n: int) -> list[str]:
    """The first n function prompts (signature + docstring) of prompts/heldout_code.jsonl, from
    libraries no draft was trained on (starlette, fastapi, pydantic, httpx, anyio, hypothesis,
    prometheus_client, openai, uvicorn)."""
    return heldout_texts("code", n)
