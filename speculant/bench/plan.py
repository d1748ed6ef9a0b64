"""The grid of `speculant bench`: the --quick and full defaults, the settings a run resolves to, and
the method strings (see speculant.bench.run's docstring) parsed into groups of draft specs, γ and
options (candidates, lookup, kernels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from speculant.adaptive import parse_gamma
from speculant.bench.tasks import TASKS
from speculant.plan import DraftPlan

# --quick: what a user gets by default (the shipped draft; the best CPU tree, γ 3 beside a lookup branch
# of 8; prompt lookup) against transformers' eager decoding and its prompt lookup; three repeats,
# every method in turn per prompt, so that a change of load hits all alike and shows as a spread.
QUICK = {"prompts_per_task": 1, "max_new_tokens": 32, "methods": "plain,distilled,distilled#lookup8@3,ngram",
         "gammas": "4", "temperatures": "0", "peers": "hf-eager,hf-pld", "repeats": 3, "interleave": True}
FULL = {"prompts_per_task": 5, "max_new_tokens": 128, "gammas": "2,4,8", "temperatures": "0,1",
        "peers": "hf-eager,hf-pld,llama.cpp", "repeats": 1, "interleave": False}
DEFAULT_METHODS = ("plain,ngram,layers:4,layers:8,int8,distilled,distilled+ngram,layers:8+ngram,int8+distilled,"
                   "int8+ngram,ngram@auto,distilled@auto,distilled#lookup8@3")
PEERS = ("hf-eager", "hf-pld", "llama.cpp")


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
    from speculant.chain import default_draft, embedded_draft_folder

    if args.distilled_draft:  # a draft folder, or the name of an embedded one (smollm2-135m-draft)
        embedded = embedded_draft_folder(args.distilled_draft)
        if embedded is not None:
            return str(embedded)
        if not Path(args.distilled_draft).exists():
            raise FileNotFoundError(f"--distilled-draft {args.distilled_draft}: no such folder, nor an embedded draft")
        return args.distilled_draft

    found = default_draft(target_name)
    return None if found == "ngram" else found


def kernels_of(method: str) -> tuple[str, str]:
    """A method string without its #triton modifier, and the kernels it asks for (speculant.api's
    `kernels`): "distilled#triton#k4@3" -> ("distilled#k4@3", "triton")."""
    name, at, gamma = method.partition("@")
    parts = name.split("#")
    kernels = "triton" if "triton" in parts[1:] else "torch"
    return "#".join(parts[:1] + [p for p in parts[1:] if p != "triton"]) + at + gamma, kernels


def plan_groups(methods: Sequence[str], gammas: Sequence, distilled: str | None, num_layers: int | None,
                given: bool, notes: list[str], add_auto: bool = False) -> list[dict]:
    """(method label, draft specs, γ) for each group of cells; plain first. A method that cannot run
    is an error if it was asked for (`given`), else a note. `add_auto`: with no distilled draft, run
    layers:8@auto in place of distilled@auto."""
    from speculant.chain import feature_draft_may_follow

    groups: list[dict] = [{"method": "plain", "drafts": ["none"], "gamma": 0}]
    for method in methods:
        text, kernels = kernels_of(method)
        if text.partition("@")[0] == "plain":
            if kernels != "torch":  # plain decoding on other kernels: beside plain, not its baseline
                groups.append({"method": f"plain#{kernels}", "drafts": ["none"], "gamma": 0,
                               "options": {"kernels": kernels}})
            continue
        # one plan per γ of the grid, or one if the method pins its γ (speculant.plan's text form)
        plans = list(dict.fromkeys(DraftPlan.parse(text, gamma) for gamma in gammas))
        parts = list(plans[0].drafts)
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
        for plan in plans:
            group = {"method": method.partition("@")[0], "drafts": drafts, "gamma": plan.gamma}
            options = {name: value for name, value, unset in (("candidates", plan.candidates, 1),
                                                              ("lookup", plan.lookup, 0),
                                                              ("kernels", kernels, "torch")) if value != unset}
            if options:
                group["options"] = options
            groups.append(group)
    if add_auto and distilled is None and not any(g["gamma"] == "auto" for g in groups):
        for method in ("layers:8",):
            if num_layers is not None and _layers_ok(method, num_layers):
                groups.append({"method": method, "drafts": [method], "gamma": "auto"})
    return groups


def _reads_features(folder: str) -> bool:
    from speculant.models.feature_draft import read_draft_config

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


def method_label(method: str, gamma) -> str:
    return method if gamma in (0, None) else f"{method}@{gamma}"


def short_method(drafts: Sequence[str], distilled: str | None) -> str:
    return "+".join("distilled" if d == distilled else d for d in drafts)
