"""GPU speed (issue 6): our plain and speculative decoding on CUDA — generic eager loop vs fused
CUDA-graph steps — against transformers' eager `generate`, on the same weights, in one run.

    python benchmarks/gpu_speed.py --target /root/w/smollm2.gguf --humaneval .gpu/HumanEval.jsonl.gz \
        --draft speculant/embedded/smollm2-135m-draft --out $OUT

Prints a table, then one JSON line; writes gpu_speed.json into --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

import torch

from speculant.adaptive import AdaptiveGamma
from speculant.api import NoDrafter
from speculant.engine import generate
from speculant.fused import FusedStepper
from speculant.drafters.ngram import NgramDrafter
from speculant.models.loading import load_model
from speculant.models.transformer import LeanModel
from speculant.sampling import SamplingParams


def code_prompts(path: str, n: int, tokenizer) -> list[list[int]]:
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [tokenizer.encode(r["prompt"], add_special_tokens=True) for r in rows[-n:]]


def chat_prompts(n: int, tokenizer) -> list[list[int]]:
    from pydoc_data.topics import topics

    names = sorted(topics)[::max(1, len(topics) // n)][:n]
    texts = [f"Explain the Python topic '{name}' briefly, with an example." for name in names]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
            for t in texts]


HELD_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def heldout_chat_prompts(n: int, tokenizer) -> list[list[int]]:
    """Everyday questions (benchmarks/prompts/heldout_chat.txt), not Python topics: held out from
    every draft's training and every tuning run."""
    with open(os.path.join(HELD_OUT, "heldout_chat.txt"), encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip() and not line.startswith("#")][:n]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
            for t in texts]


def heldout_code_prompts(n: int, tokenizer) -> list[list[int]]:
    """Signature + docstring of functions from libraries no draft was trained on (starlette, fastapi,
    pydantic, httpx, anyio, hypothesis, prometheus_client, openai, uvicorn):
    benchmarks/prompts/heldout_code.jsonl."""
    with open(os.path.join(HELD_OUT, "heldout_code.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:n]
    return [tokenizer.encode(r["prompt"], add_special_tokens=True) for r in rows]


class TracedPolicy(AdaptiveGamma):
    """AdaptiveGamma that keeps what it saw: [γ, drafted, accepted, step seconds, expected rate per γ,
    timed (False: the step ran alone, its time taught acceptance only)]."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.trace: list = []
        self.unobserved = 0  # the first choice not observed yet (run-ahead chooses a step ahead)

    def choose(self) -> int:
        rates = [round(r, 1) for r in self.expected_rates()]
        gamma = super().choose()
        self.trace.append([gamma, None, None, None, rates, None])
        return gamma

    def new_request(self) -> None:
        """A choice made ahead for a step the last request never ran stays unobserved."""
        self.unobserved = len(self.trace)

    def observe(self, drafted: int, accepted: int, draft_time: float, target_time: float,
                asked: int | None = None, timed: bool = True) -> None:
        self.trace[self.unobserved][1:4] = [drafted, accepted, round(draft_time + target_time, 6)]
        self.trace[self.unobserved][5] = timed
        self.unobserved += 1
        super().observe(drafted, accepted, draft_time, target_time, asked, timed)


def run_ours(target, prompts, *, stepper=None, drafter=None, gamma=0, params, max_new, eos) -> dict:
    outputs, tokens, seconds = [], 0, 0.0
    alpha_num = alpha_den = calls = 0
    prefill = 0.0
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device=target.device).manual_seed(i)
        if isinstance(gamma, TracedPolicy):
            gamma.new_request()
        out, stats = [], None
        for step in generate(target, drafter or NoDrafter(), prompt, gamma=gamma, params=params,
                             max_new_tokens=max_new, stop_ids=eos, generator=generator, stepper=stepper):
            out += step.tokens
            stats = step.stats
        outputs.append(out)
        tokens += stats.new_tokens
        seconds += stats.prefill_time + stats.decode_time
        prefill += stats.prefill_time
        alpha_num += stats.accepted
        alpha_den += stats.accepted + stats.rejections
        calls += stats.target_calls
    return {"tokens_per_s": tokens / seconds, "alpha": alpha_num / alpha_den if alpha_den else None,
            "tau": tokens / calls, "new_tokens": tokens, "outputs": outputs,
            # where the seconds went: prefills (per prompt) and decoding (per target call)
            "prefill_ms_per_prompt": 1000 * prefill / len(prompts),
            "decode_ms_per_call": 1000 * (seconds - prefill) / calls}


def run_hf(folder, prompts, *, max_new, sample: bool, prompt_lookup: int | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    kwargs = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=sample, pad_token_id=0)
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


def kernel_profile(stepper: FusedStepper, runner, top: int = 12) -> dict:
    """The kernels one replay of `runner`'s graph launches (its body run once outside the graph,
    under the profiler): how many, their summed GPU time, and the busiest by name. The replay's
    time beyond that sum is the graph's per-kernel cost and the gaps between kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    saved = stepper._save_caches()
    torch.cuda.synchronize()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.body(runner.ints, runner.uniforms)
        torch.cuda.synchronize()
    stepper._restore_caches(saved)
    totals: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:  # device-side work only (kernels, copies, sets)
            total = totals.setdefault(event.name, [0, 0.0])
            total[0] += 1
            total[1] += event.time_range.elapsed_us()
    rows = [(name, count, micros) for name, (count, micros) in totals.items()]
    rows.sort(key=lambda r: -r[2])
    return {"kernels": sum(r[1] for r in rows), "kernel_ms": sum(r[2] for r in rows) / 1000,
            "busiest_kernels": [[name[:60], count, round(micros / 1000, 4)] for name, count, micros in rows[:top]],
            "most_launched": [[name[:60], count, round(micros / 1000, 4)]
                              for name, count, micros in sorted(rows, key=lambda r: -r[1])[:top]]}


def profile_step(stepper: FusedStepper, context: list[int], gamma: int, params: SamplingParams, reps: int = 50) -> dict:
    """Where the time of one fused speculative step goes: graph replay (GPU) vs host overhead,
    and the draft and verify forwards timed alone as graphs of their own."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    stepper.begin(context, params)
    stepper.step(context, gamma, generator)  # capture
    k, size = stepper.candidates, stepper.lookup
    if stepper.features:
        key = ("features", gamma, min(max(stepper.widest, gamma, size) + 1, len(context) - 1), k, size)
    else:
        key = ("model", gamma, k, size) if stepper.draft_model is not None else ("verify", gamma)
    runner = stepper.graphs[key]
    start_evt, end_evt = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start_evt.record()
    for _ in range(reps):
        runner.graph.replay()
    end_evt.record()
    torch.cuda.synchronize()
    replay_ms = start_evt.elapsed_time(end_evt) / reps
    wall = time.perf_counter()
    for _ in range(reps):
        stepper.step(context, gamma, generator)
    step_ms = (time.perf_counter() - wall) / reps * 1000
    out = {"gamma": gamma, "graph_replay_ms": replay_ms, "step_wall_ms": step_ms,
           "host_overhead_ms": step_ms - replay_ms}
    try:
        out.update(kernel_profile(stepper, runner))
    except Exception as error:  # noqa: BLE001 - the profiler is an extra: the timings above still count
        out["kernel_profile_error"] = repr(error)
    # forwards alone
    for name, model, t in (("target_forward_ms", stepper.target, gamma * k + 1 + size),
                           ("target_forward_1_ms", stepper.target, 1),
                           ("draft_forward_ms", stepper.draft_model, 1)):
        if model is None:
            continue
        fn = stepper.target_fn if model is stepper.target else stepper.draft_fn
        tokens = torch.zeros(t, dtype=torch.int64, device="cuda")
        positions = torch.arange(t, device="cuda") + len(context)
        args = (tokens, positions)
        if model is stepper.draft_model and stepper.features:
            args = (tokens, torch.zeros(t, model.cfg.hidden_size, dtype=model.dtype, device="cuda"), positions)
        graph = torch.cuda.CUDAGraph()
        saved = stepper._save_caches()
        with torch.inference_mode():
            fn(*args)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=stepper.pool):
                fn(*args)
        start_evt.record()
        for _ in range(reps):
            graph.replay()
        end_evt.record()
        torch.cuda.synchronize()
        stepper._restore_caches(saved)
        out[name] = start_evt.elapsed_time(end_evt) / reps
    if "draft_forward_ms" in out:
        out["cost_ratio"] = out["draft_forward_ms"] / out["target_forward_1_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--humaneval", required=True)
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=PATH",
                    help="a distilled draft folder to bench under NAME (repeatable)")
    ap.add_argument("--attention", choices=["auto", "sdpa", "matmul"], default="auto",
                    help="auto: the lean model's per-device choice (matmul on CUDA)")
    ap.add_argument("--plain-chunk", type=int, default=4, help="plain tokens per graph replay")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out/gpu"))
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=0, help="also bench layers:N (0 = skip; costs a compile)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gammas", default="3,5,7")
    ap.add_argument("--candidates", default="1", help="candidates per draft position to bench, e.g. 1,2,4")
    ap.add_argument("--lookup", default="0", help="lookup branch sizes beside the draft models, e.g. 0,8")
    ap.add_argument("--steps-per-replay", default="1",
                    help="feature-draft steps per graph replay to bench (without a lookup branch), e.g. 1,3")
    ap.add_argument("--run-ahead", default="1",
                    help="1: launch the next replay before reading this one (the default); 0: one at a time; 0,1: both")
    ap.add_argument("--widen", default="0",
                    help="widen each feature-draft stepper's window by a request at this γ before its fixed-γ rows "
                         "(0: no; 0,6: both, on separate steppers): auto runs with the window of its widest γ")
    ap.add_argument("--no-auto", dest="auto", action="store_false", help="skip --gamma auto")
    ap.add_argument("--auto-max-gamma", type=int, default=8)
    ap.add_argument("--auto-half-life", default=None,
                    help="AdaptiveGamma's half_life (default: its own); several, e.g. 8,32: one auto row each")
    ap.add_argument("--no-ngram", dest="ngram", action="store_false", help="skip the n-gram drafter")
    ap.add_argument("--tasks", default="code,chat",
                    help="code, chat, adversarial, code-heldout, chat-heldout (comma-separated)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    LeanModel.attention = None if args.attention == "auto" else args.attention
    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    loaded = load_model(args.target, device=args.device, dtype=torch.bfloat16 if cuda else torch.float32,
                        max_seq_len=1024)
    target, tok = loaded.model, loaded.tokenizer
    eos = sorted(tok.eos_ids)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"loaded target in {time.perf_counter() - t0:.1f}s; device {device_name}", flush=True)
    tasks = {"code": (code_prompts(args.humaneval, args.prompts, tok), SamplingParams(temperature=0)),
             "chat": (chat_prompts(args.prompts, tok), SamplingParams(temperature=1.0)),
             "code-heldout": (heldout_code_prompts(args.prompts, tok), SamplingParams(temperature=0)),
             "chat-heldout": (heldout_chat_prompts(args.prompts, tok), SamplingParams(temperature=1.0))}
    # random token ids (speculant bench's adversarial task), greedy as in the CPU tables
    from speculant.bench.tasks import adversarial_prompts

    tasks["adversarial"] = ([list(p.token_ids) for p in adversarial_prompts(args.prompts, target.vocab_size, 0)],
                            SamplingParams(temperature=0))
    tasks = {name: tasks[name] for name in args.tasks.split(",")}
    compile_flag = not args.no_compile
    drafts: dict[str, LeanModel] = {}
    if args.layers:
        drafts["layers:%d" % args.layers] = LeanModel(loaded.weights, 1024, args.layers)
    for spec in args.draft:
        from speculant.distill.draft_model import load_draft

        name, _, path = spec.rpartition("=")
        drafts[name or "distilled"] = load_draft(path, loaded, max_seq_len=1024)
    if any(getattr(d, "draft_weights", None) is not None and d.draft_weights.draft_cfg.inputs == "features"
           for d in drafts.values()):
        target.keep_features()  # before the first compile: one compiled target forward for every stepper
    results: list[dict] = []

    def record(task, method, gamma, res, capture=None, candidates=1, lookup=0):
        row = {"task": task, "method": method, "gamma": gamma, "candidates": candidates, "lookup": lookup,
               **{k: v for k, v in res.items() if k != "outputs"}}
        if capture is not None:
            row["capture_s"] = capture
        results.append(row)
        print(json.dumps(row), flush=True)
        return res

    steppers: dict[str, FusedStepper] = {}
    one_per_replay: dict[tuple, list] = {}

    def stepper_for(name, k=1, lookup=0, m=1, ahead=True, widen=0):
        if (name, k, lookup, m, ahead, widen) not in steppers:
            if name.startswith("plain"):
                stepper = FusedStepper(target, None, compile=compile_flag, plain_chunk=args.plain_chunk)
                stepper.prefill_graphs = stepper.prefill_graphs and name == "plain"
            elif name == "ngram":
                stepper = FusedStepper(target, None, ngram=NgramDrafter(), compile=compile_flag)
            else:
                stepper = FusedStepper(target, drafts[name], compile=compile_flag, candidates=k, lookup=lookup,
                                       steps_per_replay=m, run_ahead=ahead)
            steppers[name, k, lookup, m, ahead, widen] = stepper
        return steppers[name, k, lookup, m, ahead, widen]

    for task, (prompts, params) in tasks.items():
        mx = args.max_new_tokens
        # baselines
        if not args.skip_hf and cuda:
            hf = record(task, "hf_eager", 0, run_hf(loaded.folder, prompts[:2], max_new=64,
                                                     sample=not params.greedy))
            if task == "code":
                record(task, "hf_prompt_lookup", 10, run_hf(loaded.folder, prompts[:2], max_new=64,
                                                            sample=False, prompt_lookup=10))
        record(task, "ours_eager_plain", 0, run_ours(target, prompts[:2], params=params, max_new=64, eos=eos))
        st = stepper_for("plain")
        cap = time.perf_counter()
        run_ours(target, prompts[:1], stepper=st, params=params, max_new=8, eos=eos)  # warm-up + capture
        cap = time.perf_counter() - cap
        run_ours(target, prompts, stepper=st, params=params, max_new=mx, eos=eos)  # untimed, as for the drafts
        plain = record(task, "ours_graph_plain", 0, run_ours(target, prompts, stepper=st, params=params,
                                                             max_new=mx, eos=eos), cap)
        if cuda:  # the same with the prefills run eagerly (not from padded graphs): what those save
            st = stepper_for("plain-eager-prefill")
            run_ours(target, prompts, stepper=st, params=params, max_new=mx, eos=eos)
            res = run_ours(target, prompts, stepper=st, params=params, max_new=mx, eos=eos)
            res["speedup_vs_plain"] = res["tokens_per_s"] / plain["tokens_per_s"]
            record(task, "plain_eager_prefill", 0, res)
        gammas_model = tuple(int(g) for g in args.gammas.split(","))
        ks = tuple(int(k) for k in args.candidates.split(","))
        lookups = tuple(int(g) for g in args.lookup.split(","))
        replays = tuple(int(m) for m in args.steps_per_replay.split(","))
        aheads = tuple(bool(int(a)) for a in args.run_ahead.split(","))
        widens = tuple(int(w) for w in args.widen.split(","))
        configs = [("ngram", 1, 0, (4, 8), 1, True, 0)] if args.ngram else []
        configs += [(d, k, g, gammas_model, m, a, w) for d in drafts for k in ks for g in lookups for m in replays
                    for a in aheads for w in widens if (m == 1 or g == 0) and (a or g == 0) and (w == 0 or g == 0)]
        for name, k, lookup, gammas, m, ahead, widen in configs:
            for gamma in gammas:
                fresh = (name, k, lookup, m, ahead, widen) not in steppers
                st = stepper_for(name, k, lookup, m, ahead, widen)
                if fresh and widen:  # its window is widen + 1 from now on, as auto's is max_gamma + 1
                    run_ours(target, prompts[:1], stepper=st, gamma=widen, params=params, max_new=2 * widen + 2, eos=eos)
                cap = time.perf_counter()
                # long enough for a replay of m steps to be captured here, not in a timed prompt
                run_ours(target, prompts[:1], stepper=st, gamma=gamma, params=params, max_new=max(16, m * (gamma + 1) + 1),
                         eos=eos)
                cap = time.perf_counter() - cap
                # once more over every prompt, untimed: shapes met only in later prompts compile here
                run_ours(target, prompts, stepper=st, gamma=gamma, params=params, max_new=mx, eos=eos)
                res = run_ours(target, prompts, stepper=st, gamma=gamma, params=params, max_new=mx, eos=eos)
                res["speedup_vs_plain"] = res["tokens_per_s"] / plain["tokens_per_s"]
                if params.greedy:
                    res["greedy_mismatches"] = sum(a != b for a, b in zip(res["outputs"], plain["outputs"]))
                res["compiled_sampling"] = st.compile_sampling  # False: compiling failed, eager sampling ran
                res["steps_per_replay"] = m
                res["run_ahead"] = st.run_ahead
                res["window"] = st.widest + 1 if st.features else None
                # a replay draws each step's uniforms as a lone step would, run ahead or not: the same
                # seeds give the same text as one step per replay, one at a time
                one_per_replay[task, name, k, lookup, gamma, m, ahead, widen] = res["outputs"]
                lone = one_per_replay.get((task, name, k, lookup, gamma, 1, False, widen))
                if (m > 1 or ahead) and lone is not None:
                    res["outputs_as_one_at_a_time"] = sum(a == b for a, b in zip(res["outputs"], lone))
                    # where they part: [prompt, first differing token, lengths]
                    res["differences"] = [[i, next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))),
                                           len(a), len(b)] for i, (a, b) in enumerate(zip(res["outputs"], lone)) if a != b]
                label = (name + ("" if m == 1 else f"/{m}per") + ("" if ahead or name == "ngram" else "/one-at-a-time")
                         + (f"/widened{widen}" if widen else ""))
                record(task, label, gamma, res, cap, k, lookup)
            if name != "ngram" and not lookup and m == 1 and ahead and widen == widens[-1] and args.auto:
                st = stepper_for(name, k, widen=widen)
                cap = time.perf_counter()
                for gamma in range(1, args.auto_max_gamma + 1):  # every γ auto may pick: captured before timing
                    run_ours(target, prompts[:1], stepper=st, gamma=gamma, params=params, max_new=2 * gamma + 2, eos=eos)
                cap = time.perf_counter() - cap
                half_lives = [None] if args.auto_half_life is None else [float(h) for h in args.auto_half_life.split(",")]
                for half_life in half_lives:
                    options = {} if half_life is None else {"half_life": half_life}
                    policy = TracedPolicy(max_gamma=args.auto_max_gamma, **options)  # one policy: estimates carry over
                    run_ours(target, prompts, stepper=st, gamma=policy, params=params, max_new=mx, eos=eos)
                    timed_from = len(policy.history)
                    res = run_ours(target, prompts, stepper=st, gamma=policy, params=params, max_new=mx, eos=eos)
                    res["speedup_vs_plain"] = res["tokens_per_s"] / plain["tokens_per_s"]
                    res["half_life"] = half_life  # None: the policy's default
                    chosen = [t[0] for t in policy.trace[timed_from:] if t[1] is not None]  # the steps that ran
                    res["gamma_chosen"] = {str(g): chosen.count(g) for g in sorted(set(chosen))}
                    # every timed step: (γ asked, drafted, accepted, seconds) and the policy's rates per γ before it
                    res["trace"] = policy.trace[timed_from:]
                    record(task, name, "auto" if half_life is None else f"auto/hl{half_life:g}", res, cap, k)
    prof = {}
    for name in drafts if cuda else ():
        for k, lookup in sorted({(1, 0), (max(ks), 0), (max(ks), max(lookups))}):
            st = stepper_for(name, k, lookup)
            first_prompts, first_params = next(iter(tasks.values()))
            label = f"{name} k={k} lookup={lookup}"
            prof[label] = profile_step(st, first_prompts[0], gammas_model[-1], first_params)
            print("profile", label, json.dumps(prof[label]), flush=True)
    summary = {"device": device_name, "torch": torch.__version__, "compile": compile_flag, "attention": args.attention,
               "results": results, "profile": prof, "command": " ".join(sys.argv)}
    with open(os.path.join(args.out, "gpu_speed.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{'task':<6} {'method':<18} {'gamma':>5} {'k':>2} {'G':>2} {'tok/s':>9} {'alpha':>6} {'tau':>5} {'vs plain':>8} {'prefill':>8} {'ms/call':>8}")
    for r in results:
        alpha = f"{r['alpha']:.2f}" if r.get("alpha") is not None else "-"
        tau = f"{r['tau']:.2f}" if "tau" in r else "-"
        print(f"{r['task']:<6} {r['method']:<18} {str(r['gamma']):>5} {r['candidates']:>2} {r['lookup']:>2} {r['tokens_per_s']:>9.1f} "
              f"{alpha:>6} {tau:>5} {r.get('speedup_vs_plain', 0):>8.2f} {r.get('prefill_ms_per_prompt', 0):>8.2f} "
              f"{r.get('decode_ms_per_call', 0):>8.3f}")
    print(json.dumps({"device": summary["device"], "rows": len(results)}))


if __name__ == "__main__":
    main()
