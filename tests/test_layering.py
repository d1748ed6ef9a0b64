"""The shape of the package, read from its own source with `ast` (nothing is imported).

Every import in speculant/, at module level or inside a function, is an edge from the importing
module to the module it names. The layers, lowest first:

    0  sampling, acceptance, analysis, stopping, tokenizer,    the math and text, no models
       prompts, request_checks
    1  models/                                                  every model class and its loading
    2  drafters/                                                what proposes draft tokens
    3  step, fused, exact_target                                one step: draft, verify, accept
    4  engine, adaptive, calibrate, batching, row_step, plan,   loops over steps, γ policies and their step
       reference, chain                                         costs, the drafter chain, the batched step
    5  api (and the package's own __init__, which re-exports it)
    6  cli, args, server/, bench/, distill/, diffusion/         leaves: they use the core

An edge may stay in its layer or go down, never up; there are no import cycles; no core module
(layers 0-4) imports api or a leaf. A file of more than MAX_LINES lines says why in its module
docstring, in a sentence that starts "Long because".
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600

LAYERS = {
    0: ("speculant.sampling", "speculant.acceptance", "speculant.analysis", "speculant.stopping",
        "speculant.tokenizer", "speculant.prompts", "speculant.request_checks"),
    1: ("speculant.models",),
    2: ("speculant.drafters",),
    3: ("speculant.step", "speculant.fused", "speculant.exact_target"),
    4: ("speculant.engine", "speculant.adaptive", "speculant.calibrate", "speculant.batching", "speculant.row_step",
        "speculant.plan", "speculant.reference", "speculant.chain"),
    5: ("speculant.api", "speculant"),
    6: ("speculant.cli", "speculant.args", "speculant.server", "speculant.bench", "speculant.distill", "speculant.diffusion"),
}
LEAF_LAYER, API_LAYER = 6, 5


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "speculant").rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix of `module` named in LAYERS (`speculant` itself only exactly)."""
    best, best_len = None, -1
    for layer, names in LAYERS.items():
        for name in names:
            matches = module == name if name == "speculant" else module == name or module.startswith(name + ".")
            if matches and len(name) > best_len:
                best, best_len = layer, len(name)
    return best


def imported_modules(path: Path, known: set[str], root: Path = ROOT) -> set[tuple[str, int]]:
    """(module of speculant, line) for every import in the file, module-level or nested.

    `from speculant.models import loading` names the submodule speculant.models.loading where it
    exists, else the package; relative imports are resolved against the file's package."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "speculant" or alias.name.startswith("speculant."):
                    found.add((_known_prefix(alias.name, known), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == "speculant" or source.startswith("speculant.")):
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add((candidate if candidate in known else _known_prefix(source, known), node.lineno))
    return {(target, line) for target, line in found if target != this}


def _known_prefix(name: str, known: set[str]) -> str:
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def import_graph(root: Path = ROOT) -> dict[str, set[tuple[str, int]]]:
    mods = modules(root)
    known = set(mods)
    return {name: imported_modules(path, known, root) for name, path in mods.items()}


def cycles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    edges = {m: sorted({t for t, _ in targets if t in graph}) for m, targets in graph.items()}
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _edges_within(component: list[str], graph) -> list[str]:
    inside = set(component)
    return [f"{m}:{line} -> {t}" for m in component for t, line in sorted(graph[m]) if t in inside]


# ---- the checks ------------------------------------------------------------------------------------


def test_the_import_reader_sees_module_level_and_function_level_imports(tmp_path):
    """The reader itself, on a made-up package: both kinds of import, relative imports, submodules."""
    pkg = tmp_path / "speculant"
    (pkg / "models").mkdir(parents=True)
    for name in ("__init__.py", "api.py", "engine.py", "models/__init__.py", "models/base.py"):
        (pkg / name).write_text("")
    (pkg / "engine.py").write_text("from speculant.models import base\n\ndef f():\n    from . import api\n")
    (pkg / "models" / "base.py").write_text("import speculant.engine as e\nfrom ..api import load\n")
    graph = import_graph(tmp_path)
    assert graph["speculant.engine"] == {("speculant.models.base", 1), ("speculant.api", 4)}
    assert graph["speculant.models.base"] == {("speculant.engine", 1), ("speculant.api", 2)}
    assert cycles(graph) == [["speculant.engine", "speculant.models.base"]]


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if layer_of(m) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_there_are_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        f"  {' <-> '.join(c)}: " + "; ".join(_edges_within(c, graph)) for c in found)


def test_no_import_goes_up_a_layer():
    graph = import_graph()
    upward = [f"{m}:{line} (layer {layer_of(m)}) -> {t} (layer {layer_of(t)})"
              for m, targets in sorted(graph.items()) for t, line in sorted(targets)
              if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m)]
    assert not upward, f"{len(upward)} upward import(s):\n  " + "\n  ".join(upward)


def test_no_core_module_imports_the_api_or_a_leaf():
    graph = import_graph()
    bad = [f"{m}:{line} -> {t}" for m, targets in sorted(graph.items()) for t, line in sorted(targets)
           if (layer_of(m) or 0) < API_LAYER and (layer_of(t) or 0) >= API_LAYER]
    assert not bad, "core modules importing api or a leaf:\n  " + "\n  ".join(bad)


def _explains_length(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return re.search(r"(^|[.!?:;]\s+|\n\s*)Long because\b", doc) is not None


def test_no_file_is_over_600_lines_without_saying_why():
    files = [p for folder in ("speculant", "benchmarks", "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES and not _explains_length(p)]
    assert not long, (f"files over {MAX_LINES} lines whose docstring gives no sentence starting 'Long because':\n  "
                      + "\n  ".join(long))


def test_the_shipped_weights_leave_room_for_the_device_staging():
    """Every device call carries the tracked tree and at most 64 MiB in all; the staged model pieces
    (benchmarks/gpu_stage.sh fit) get what the tree leaves. The weights under speculant/embedded (the
    feature drafts and the diffusion models) stay within the 30 MB budget the README gives the drafts
    plus the diffusion models' 1 MB."""
    weights = {str(p.relative_to(ROOT)): p.stat().st_size for p in (ROOT / "speculant" / "embedded").rglob("*")
               if p.is_file() and p.suffix in (".safetensors", ".gguf", ".bin", ".pt")}
    drafts = sum(size for name, size in weights.items() if "/diffusion/" not in name)
    assert drafts <= 30_000_000, f"the shipped drafts total {drafts:,} bytes, over 30 MB: {weights}"
    assert sum(weights.values()) <= 31_000_000, weights
