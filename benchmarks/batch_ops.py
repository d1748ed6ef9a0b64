"""Torch ops the batched engine dispatches per step outside the regions a CUDA graph captures: a CPU
proxy for its launch cost on a GPU (an eager op there costs ~20 µs of launch, an op inside a graph
~3 µs), counted with a TorchDispatchMode on tiny random models of SmolLM2-135M's depth (30 target
layers, a 1-layer feature draft) on the CPU.

Per batch size B and engine: the eager step (graphs off), the static step (graphs on: what runs
outside the captured body; on the CPU the body runs eagerly, and its ops are counted apart, as
"in graph"), a plain batched engine (no drafter), and the speculative engine at Γ 0 (a step the
policy makes plain), after warm-up steps (joins, first captures). Outside the graph, a static step
holds per row its two random draws on the host (γ'_b draft and γ'_b + 1 verification uniforms, from
the row's own generator), then a few host ops filling the input buffer, one copy in, one read out.

    python benchmarks/batch_ops.py --batches 1,4,16,64

Prints a table, then one JSON line; writes the JSON to $OUT/batch_ops.json ($OUT: ./out).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

from speculant.batching import BatchEngine, BatchRequest
from speculant.bench.op_counter import counting_ops  # shared with tests/test_row_step.py
from speculant.drafters.features import FeatureDrafter
from speculant.models.feature_draft import DraftConfig, build_draft, init_random
from speculant.models.transformer import LeanModel, random_weights, tiny_config
from speculant.sampling import SamplingParams

LAYERS = 30  # SmolLM2-135M's
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def totals(ops: Counter, steps: int) -> dict:
    """Ops per step, and those of them that compute (not views: on a GPU, what launches a kernel)."""
    return {"ops": sum(ops.values()) / steps, "compute": sum(n for op, n in ops.items() if not op.is_view) / steps}


def make_engine(rows: int, drafter: bool, graphs: bool, gamma: int) -> BatchEngine:
    target = LeanModel(random_weights(tiny_config("llama", num_layers=LAYERS), seed=0, scale=2.0), max_seq_len=256)
    factory = None
    if drafter:
        cfg = DraftConfig.for_target(target.cfg, num_layers=1, num_kept=target.vocab_size, inputs="features")
        draft = build_draft(cfg, target.weights, torch.arange(target.vocab_size), max_seq_len=target.max_seq_len)
        init_random(draft.draft_weights, 1)
        factory = FeatureDrafter(draft, target).rows
    engine = BatchEngine(target, factory, gamma=gamma if drafter else 0, max_batch=rows, graphs=graphs)
    for seed in range(rows):
        engine.add(BatchRequest(PROMPT, SamplingParams(), 200, seed=seed))
    return engine


def ops_per_step(engine: BatchEngine, gamma: int | None, warmup: int, steps: int) -> dict:
    """Ops outside the captured bodies and inside, per step (`totals`), over `steps` after `warmup`."""
    for _ in range(warmup):
        engine.step(gamma)
    with counting_ops() as counter:
        for _ in range(steps):
            engine.step(gamma)
    return {"outside": totals(counter.outside, steps), "in_graph": totals(counter.inside, steps)}


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--gamma", type=int, default=4, help="the speculative engine's Γ")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    common.setup(args)
    engines = {  # name: (drafter, graphs, the step's Γ: None = the engine's)
        "speculative eager": (True, False, None), "speculative static": (True, True, None),
        "plain eager": (False, False, None), "plain static": (False, True, None),
        "speculative Γ 0 eager": (True, False, 0), "speculative Γ 0 static": (True, True, 0),
    }
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        row = {"batch": batch}
        for name, (drafter, graphs, gamma) in engines.items():
            engine = make_engine(batch, drafter, graphs, args.gamma)
            row[name] = ops_per_step(engine, gamma, warmup=2, steps=args.steps)
        rows.append(row)
        print(f"B={batch} done", file=sys.stderr, flush=True)
    header = ["B", *engines]
    body = [[r["batch"], *[f"{r[n]['outside']['ops']:.0f} / {r[n]['outside']['compute']:.0f} "
                           f"({r[n]['in_graph']['ops']:.0f} / {r[n]['in_graph']['compute']:.0f})" for n in engines]]
            for r in rows]
    text = (f"torch ops per batched step outside captured regions, all / computing (not views); in parentheses "
            f"inside them (what a CUDA graph replays); {LAYERS}-layer tiny target + 1-layer feature draft, "
            f"Γ {args.gamma}, CPU\n" + common.table(body, header))
    summary = {"benchmark": "batch_ops", "layers": LAYERS, "gamma": args.gamma, "torch": torch.__version__,
               "rows": rows}
    common.finish(args.out, "batch_ops.json", summary, text,
                  {"benchmark": "batch_ops", "outside_per_step": {r["batch"]: {n: r[n]["outside"]["ops"] for n in engines}
                                                                for r in rows}})


if __name__ == "__main__":
    main()
