"""GPU speed: our plain and speculative decoding, single request, through the public API
(`speculant.load` / `Speculant`: fused CUDA-graph steps on CUDA, the generic step elsewhere), against
our own eager loop and transformers' eager `generate`, on the same weights, in one run.

    python benchmarks/gpu_speed.py --target /root/w/smollm2.gguf --humaneval /root/w/HumanEval.jsonl.gz \\
        --draft distilled=speculant/embedded/smollm2-135m-draft --tasks code-heldout,chat-heldout,code,chat \\
        --prompts 16 --gammas 3,4 --candidates 4 --lookup 0,8 --auto-max-gamma 6 --no-ngram --skip-hf \\
        --max-new-tokens 128 --out $OUT

CPU smoke run (the generic step; no transformers baseline without CUDA):
    python benchmarks/gpu_speed.py --device cpu --target smollm2-135m --humaneval .gpu/HumanEval.jsonl.gz \\
        --draft distilled=speculant/embedded/smollm2-135m-draft --tasks code --prompts 1 --gammas 3 \\
        --max-new-tokens 8 --no-auto --no-ngram

Rows: hf_eager and hf_prompt_lookup (CUDA), ours_eager_plain (the generic step), ours_graph_plain (the
API's default step for plain decoding), n-gram at γ 4 and 8, each --draft (and --layers N) at each γ,
candidates and lookup size, and `--gamma auto` per half-life; with `--kernels torch,triton` every row
from ours_graph_plain on once per kernel set (speculant.api's `kernels`; the triton rows' methods end
in #triton, their speed-ups are against the plain row of their own kernels and, as
speedup_vs_torch_plain, against torch's). A kernel set `torch+exact` or `triton+exact` runs its rows
in bit-exact mode (speculant.api's `bit_exact`; methods end in #torch+exact, #triton+exact); a row
that mode cannot run (a tree wider than 32 nodes, `--gamma auto` with K 4) is skipped, said in the
JSON. Prints a table, then one JSON line; writes gpu_speed.json into --out.

Triton kernels beside torch's (the fused step's target forwards on speculant.models.triton_layers):
    python benchmarks/gpu_speed.py --target /root/w/smollm2.gguf --humaneval /root/w/HumanEval.jsonl.gz \\
        --draft distilled=speculant/embedded/smollm2-135m-draft --layers 8 --tasks code,chat --prompts 8 \\
        --gammas 3,4 --candidates 1,4 --no-ngram --skip-hf --kernels torch,triton --out $OUT

Bit-exact mode on both kernel sets beside the default (issue 21: on by default on CUDA if it costs <= 10 %):
    python benchmarks/gpu_speed.py --target /root/w/smollm2.gguf --humaneval /root/w/HumanEval.jsonl.gz \
        --draft distilled=speculant/embedded/smollm2-135m-draft --tasks code,chat --prompts 8 --gammas 4 \
        --candidates 1,4 --lookup 0,8 --no-auto --no-ngram --skip-hf \
        --kernels torch,triton,torch+exact,triton+exact --out $OUT
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import common
import torch

import speculant
from speculant.api import Speculant
from speculant.bench.tasks import adversarial_prompts, code_prompts
from speculant.models.transformer import LeanModel
from speculant.prompts import topic_keys, topic_prompts

CHAT_TEMPLATE = "Explain the Python topic '{topic}' briefly, with an example."
KERNEL_SETS = ("torch", "triton", "torch+exact", "triton+exact")  # kernels, and "+exact": bit-exact mode


def chat_prompts(n: int, spec: Speculant) -> list[list[int]]:
    """n Python documentation topics, every len // n-th key, through the chat template."""
    keys = topic_keys()
    subjects = keys[::max(1, len(keys) // n)][:n]
    return [spec.encode(text, chat=True) for text in topic_prompts([CHAT_TEMPLATE], subjects=subjects)]


def heldout_chat_prompts(n: int, spec: Speculant) -> list[list[int]]:
    """Everyday questions, not Python topics (common.heldout_chat_texts), through the chat template."""
    return [spec.encode(text, chat=True) for text in common.heldout_chat_texts(n)]


def heldout_code_prompts(n: int, spec: Speculant) -> list[list[int]]:
    """Functions from libraries no draft was trained on (common.heldout_code_texts), raw completion."""
    return [spec.encode(text) for text in common.heldout_code_texts(n)]


def run_ours(spec: Speculant, prompts: list[list[int]], *, temperature: float, max_new: int,
             plain: bool = False) -> dict:
    """Each prompt once through spec.generate (seed = its index); totals from the stats it returns."""
    outputs, tokens, seconds, prefill = [], 0, 0.0, 0.0
    accepted = tested = calls = 0
    gammas: Counter = Counter()
    sequences = []  # each request's γ choices in order (--gamma auto: where it switched)
    for i, prompt in enumerate(prompts):
        out = spec.generate(prompt, max_new_tokens=max_new, temperature=temperature, seed=i, plain=plain)
        stats = out.stats
        outputs.append(out.token_ids)
        tokens += stats["new_tokens"]
        seconds += stats["prefill_time"] + stats["decode_time"]
        prefill += stats["prefill_time"]
        accepted += stats["accepted"]
        tested += stats["accepted"] + stats["rejections"]
        calls += stats["target_calls"]
        gammas.update(stats["gamma_history"])
        sequences.append(list(stats["gamma_history"]))
    return {"tokens_per_s": tokens / seconds, "alpha": accepted / tested if tested else None,
            "tau": tokens / calls, "new_tokens": tokens, "outputs": outputs,
            # where the seconds went: prefills (per prompt) and decoding (per target call)
            "prefill_ms_per_prompt": 1000 * prefill / len(prompts),
            "decode_ms_per_call": 1000 * (seconds - prefill) / calls,
            "gamma_counts": {str(g): n for g, n in sorted(gammas.items())}, "gamma_sequences": sequences,
            # --gamma auto's step-cost table (seconds of a step by the tokens its chain drafted), by sampled or greedy
            "step_costs": {("sampled" if sampled else "greedy"): list(costs.step)
                           for sampled, costs in (spec.step_costs.items() if spec.gamma == "auto" else ())}}


def run_hf(folder, prompts, *, max_new, sample: bool, prompt_lookup: int | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    kwargs = {"max_new_tokens": max_new, "min_new_tokens": max_new, "do_sample": sample, "pad_token_id": 0}
    if prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup
    tokens, seconds, outputs = 0, 0.0, []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]], device="cuda"), **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        for prompt in prompts:
            ids = torch.tensor([prompt], device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            tokens += out.shape[1] - ids.shape[1]
            outputs.append(out[0, ids.shape[1]:].tolist())
    del model
    torch.cuda.empty_cache()
    return {"tokens_per_s": tokens / seconds, "new_tokens": tokens, "outputs": outputs}


def csv_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated integers, got {text!r}") from None


def main() -> None:
    ap = common.arguments(__doc__, device="cuda", out_default="bench-out/gpu")
    ap.add_argument("--target", required=True, help="an embedded name, a GGUF file or an HF folder")
    ap.add_argument("--humaneval", required=True, help="HumanEval.jsonl(.gz): the code task")
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=PATH",
                    help="a draft (distilled draft folder, model, embedded name) to bench under NAME (repeatable)")
    ap.add_argument("--attention", choices=["auto", "sdpa", "matmul"], default="auto",
                    help="auto: the lean model's per-device choice (matmul on CUDA)")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=0, help="also bench layers:N (0 = skip)")
    ap.add_argument("--gammas", default="3,5,7")
    ap.add_argument("--candidates", default="1", help="candidates per draft position to bench, e.g. 1,2,4")
    ap.add_argument("--lookup", default="0", help="lookup branch sizes beside the draft models, e.g. 0,8")
    ap.add_argument("--no-auto", dest="auto", action="store_false", help="skip --gamma auto")
    ap.add_argument("--auto-max-gamma", type=int, default=8)
    ap.add_argument("--auto-half-life", default=None,
                    help="AdaptiveGamma's half_life (default: its own); several, e.g. 8,32: one auto row each")
    ap.add_argument("--no-ngram", dest="ngram", action="store_false", help="skip the n-gram drafter")
    ap.add_argument("--tasks", default="code,chat",
                    help="code, chat, adversarial, code-heldout, chat-heldout (comma-separated)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--kernels", default="torch",
                    help=f"comma-separated from {', '.join(KERNEL_SETS)}: the fused step's kernels (speculant.api's "
                         "kernels), +exact in bit-exact mode; each set runs every graph row")
    args = ap.parse_args()
    dtype = common.setup(args)
    gammas, ks, lookups = (csv_ints(args.gammas, "--gammas"), csv_ints(args.candidates, "--candidates"),
                           csv_ints(args.lookup, "--lookup"))
    if set(args.kernels.split(",")) - set(KERNEL_SETS):
        raise SystemExit(f"error: --kernels takes some of {', '.join(KERNEL_SETS)}, got {args.kernels!r}")
    kernel_sets = sorted(set(args.kernels.split(",")), key=KERNEL_SETS.index)  # torch first: the reference
    torch._dynamo.config.cache_size_limit = 64
    LeanModel.attention = None if args.attention == "auto" else args.attention
    cuda = args.device.startswith("cuda")
    start = time.perf_counter()
    base = speculant.load(args.target, draft="none", device=args.device, dtype=dtype, max_seq_len=1024)
    loaded = base.target
    device_name = common.device_name(args.device)
    print(f"loaded target in {time.perf_counter() - start:.1f}s; device {device_name}", flush=True)

    builders = {"code": lambda n: [list(p.token_ids) for p in code_prompts(n, base.encode, args.humaneval)],
                "chat": lambda n: chat_prompts(n, base),
                "code-heldout": lambda n: heldout_code_prompts(n, base),
                "chat-heldout": lambda n: heldout_chat_prompts(n, base),
                # random token ids (speculant bench's adversarial task)
                "adversarial": lambda n: [list(p.token_ids) for p in adversarial_prompts(n, loaded.model.vocab_size, 0)]}
    temperatures = {"code": 0.0, "chat": 1.0, "code-heldout": 0.0, "chat-heldout": 1.0, "adversarial": 0.0}
    unknown = [t for t in args.tasks.split(",") if t not in builders]
    if unknown:
        raise SystemExit(f"error: --tasks: unknown {unknown}; choose from {', '.join(builders)}")
    tasks = {name: (builders[name](args.prompts), temperatures[name]) for name in args.tasks.split(",")}

    drafts: dict[str, str] = {}  # row name -> draft spec
    if args.layers:
        drafts[f"layers:{args.layers}"] = f"layers:{args.layers}"
    for item in args.draft:
        name, _, path = item.rpartition("=")
        drafts[name or "distilled"] = path
    # one Speculant per configuration, all on the one loaded target (its compiled forward is shared)
    made: dict[tuple, Speculant] = {}

    def speculant_for(draft: str, gamma: int | str = 4, k: int = 1, lookup: int = 0, fused: bool | None = None,
                      kernel_set: str = "torch"):
        key = (draft, gamma, k, lookup, fused, kernel_set)
        if key not in made:
            made[key] = Speculant(loaded, [draft], gamma=gamma, candidates=k, lookup=lookup, fused=fused,
                                  kernels=kernel_set.split("+")[0], bit_exact=kernel_set.endswith("+exact"))
        return made[key]

    results: list[dict] = []
    skipped: list[dict] = []  # rows a kernel set cannot run (bit-exact mode's width), with the reason

    def skip(task, method, gamma, error: ValueError) -> None:
        skipped.append({"task": task, "method": method, "gamma": gamma, "skipped": str(error)})
        print(json.dumps(skipped[-1]), flush=True)

    def record(task, method, gamma, res, capture=None, candidates=1, lookup=0, spec=None):
        row = {"task": task, "method": method, "gamma": gamma, "candidates": candidates, "lookup": lookup,
               "kernels": spec.kernels if spec is not None else "torch",
               "bit_exact": spec.bit_exact if spec is not None else False,
               **{k: v for k, v in res.items() if k not in ("outputs", "gamma_counts", "gamma_sequences")}}
        if str(gamma).startswith("auto"):  # kept in the file, not printed: each request's γ choices in order
            row["gamma_sequences"] = res["gamma_sequences"]
        if capture is not None:
            row["capture_s"] = capture
        if spec is not None and spec.stepper is not None:  # False: (part of) the sampling tail ran eagerly in the graph
            row["compiled_sampling"] = spec.stepper.compile_sampling and not spec.stepper.eager_sampling
            if spec.stepper.eager_sampling:
                row["eager_sampling"] = spec.stepper.eager_sampling  # function -> its compile error
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "gamma_sequences"}), flush=True)
        common.write_json(args.out, "gpu_speed_partial.json", results)  # what a run stopped at its limit keeps
        return res

    torch_plains: dict[str, dict] = {}  # task -> torch's plain row: the reference of the other kernel sets
    # kernel sets outermost: torch's rows of every task come first, whatever a time limit cuts off
    for kernel_set in kernel_sets:
        for task, (prompts, temperature) in tasks.items():
            mx = args.max_new_tokens
            if kernel_set == kernel_sets[0]:
                if not args.skip_hf and cuda:
                    record(task, "hf_eager", 0, run_hf(loaded.folder, prompts[:2], max_new=64,
                                                       sample=temperature > 0))
                    if task == "code":
                        record(task, "hf_prompt_lookup", 10, run_hf(loaded.folder, prompts[:2], max_new=64,
                                                                    sample=False, prompt_lookup=10))
                record(task, "ours_eager_plain", 0, run_ours(speculant_for("none", fused=False), prompts[:2],
                                                              temperature=temperature, max_new=64))
            torch_plain = torch_plains.get(task)
            tag = "" if kernel_set == "torch" else f"#{kernel_set}"
            spec = speculant_for("none", kernel_set=kernel_set)
            cap = time.perf_counter()
            run_ours(spec, prompts[:1], temperature=temperature, max_new=8)  # warm-up + capture
            cap = time.perf_counter() - cap
            run_ours(spec, prompts, temperature=temperature, max_new=mx)  # untimed, as for the drafts
            res = run_ours(spec, prompts, temperature=temperature, max_new=mx)
            if torch_plain is not None:
                res["speedup_vs_torch_plain"] = res["tokens_per_s"] / torch_plain["tokens_per_s"]
                if temperature == 0:  # other kernels round otherwise: in bfloat16 a near-tie may flip
                    res["greedy_mismatches_vs_torch"] = sum(a != b for a, b in zip(res["outputs"],
                                                                                   torch_plain["outputs"]))
            plain = record(task, "ours_graph_plain" + tag, 0, res, cap, spec=spec)
            if kernel_set == "torch":
                torch_plains[task] = torch_plain = plain
            configs = [("ngram", "ngram", 1, 0, (4, 8))] if args.ngram else []
            configs += [(name, draft, k, g, gammas) for name, draft in drafts.items() for k in ks for g in lookups]
            for name, draft, k, lookup, config_gammas in configs:
                for gamma in config_gammas:
                    try:
                        spec = speculant_for(draft, gamma, k, lookup, kernel_set=kernel_set)
                    except ValueError as error:
                        skip(task, name + tag, gamma, error)
                        continue
                    cap = time.perf_counter()
                    run_ours(spec, prompts[:1], temperature=temperature, max_new=max(16, gamma + 2))  # capture here
                    cap = time.perf_counter() - cap
                    # once more over every prompt, untimed: shapes met only in later prompts compile here
                    run_ours(spec, prompts, temperature=temperature, max_new=mx)
                    res = run_ours(spec, prompts, temperature=temperature, max_new=mx)
                    res["speedup_vs_plain"] = res["tokens_per_s"] / plain["tokens_per_s"]
                    if torch_plain is not None and plain is not torch_plain:
                        res["speedup_vs_torch_plain"] = res["tokens_per_s"] / torch_plain["tokens_per_s"]
                    if temperature == 0:
                        res["greedy_mismatches"] = sum(a != b for a, b in zip(res["outputs"], plain["outputs"]))
                    record(task, name + tag, gamma, res, cap, k, lookup, spec)
                if name != "ngram" and args.auto:  # with the lookup branch too, when --lookup has it
                    try:
                        spec = speculant_for(draft, "auto", k, lookup, kernel_set=kernel_set)
                    except ValueError as error:
                        skip(task, name + tag, "auto", error)
                        continue
                    cap = time.perf_counter()
                    for gamma in range(1, args.auto_max_gamma + 1):  # every γ auto may pick: captured before timing
                        spec.gamma = gamma
                        run_ours(spec, prompts[:1], temperature=temperature, max_new=2 * gamma + 2)
                    cap = time.perf_counter() - cap
                    half_lives = [None] if args.auto_half_life is None else \
                        [float(h) for h in args.auto_half_life.split(",")]
                    for half_life in half_lives:
                        # a fresh policy per request over this machine's step costs (timed on the first request)
                        spec.gamma = "auto"
                        spec.auto_options = {"max_gamma": args.auto_max_gamma,
                                             **({} if half_life is None else {"half_life": half_life})}
                        run_ours(spec, prompts, temperature=temperature, max_new=mx)
                        res = run_ours(spec, prompts, temperature=temperature, max_new=mx)
                        res["speedup_vs_plain"] = res["tokens_per_s"] / plain["tokens_per_s"]
                        if torch_plain is not None and plain is not torch_plain:
                            res["speedup_vs_torch_plain"] = res["tokens_per_s"] / torch_plain["tokens_per_s"]
                        res["half_life"] = half_life  # None: the policy's default
                        res["gamma_chosen"] = res.pop("gamma_counts")  # target calls per γ chosen
                        record(task, name + tag, "auto" if half_life is None else f"auto/hl{half_life:g}", res, cap,
                               k, lookup, spec)
    summary = {"device": device_name, "torch": torch.__version__, "dtype": dtype, "attention": args.attention,
               "results": results, "skipped": skipped, "command": " ".join(sys.argv)}
    header = ("task", "method", "gamma", "k", "G", "tok/s", "alpha", "tau", "vs plain", "prefill", "ms/call")
    rows = [(r["task"], r["method"], r["gamma"], r["candidates"], r["lookup"], f"{r['tokens_per_s']:.1f}",
             "-" if r.get("alpha") is None else f"{r['alpha']:.2f}", f"{r['tau']:.2f}" if "tau" in r else "-",
             f"{r['speedup_vs_plain']:.2f}" if "speedup_vs_plain" in r else "-",  # the plain rows themselves
             f"{r.get('prefill_ms_per_prompt', 0):.2f}",
             f"{r.get('decode_ms_per_call', 0):.3f}") for r in results]
    common.finish(args.out, "gpu_speed.json", summary, common.table(rows, header),
                  {"device": device_name, "rows": len(results)})


if __name__ == "__main__":
    main()
