"""The one-launch forward (speculant.models.persistent_forward) against triton_layers' GEMV forward (6 kernels a
layer, PDL), one row, bfloat16, random weights of a real model's shapes, after a --context-token prompt: the
logits' error between them (and whether a grid barrier gave up), then ms per forward replayed from a CUDA graph,
for the persistent kernel's settings variants.

    python benchmarks/persistent_probe.py --shapes smollm2-135m,qwen2.5-1.5b --variants "PROGRAMS_PER_SM=1;WARPS=4"

A variant is ','-separated NAME=VALUE of persistent_forward's settings (PROGRAMS_PER_SM, WARPS, BLOCK_K, BLOCK_N,
DOWN_BLOCK_N, HEAD_BLOCK_N, ROPE_COLUMNS, CHUNK, BLOCK_J, POLL, PREFETCH); the empty variant is the defaults. A row's
programs are those launched (PersistentForward launches fewer than PROGRAMS_PER_SM a SM where they would not all
be resident).
"""

from __future__ import annotations

import sys

import common  # benchmarks/common.py (this script runs from benchmarks/)
import torch


def parse_variant(text: str) -> dict:
    from speculant.models import persistent_forward

    values = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not hasattr(persistent_forward, name.strip()):
            sys.exit(f"error: persistent_forward has no setting {name.strip()}")
        values[name.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return values


def replay_ms(forward, token: torch.Tensor, position: torch.Tensor, repeats: int) -> float:
    """ms per replay of forward(token, position) captured in a CUDA graph."""
    return common.graph_replay_ms(lambda: forward(token, position), repeats)[0]


def main() -> None:
    parser = common.arguments(__doc__, device="cuda", out_default="bench-out/persistent_probe")
    parser.add_argument("--shapes", default="smollm2-135m,qwen2.5-1.5b")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--variants", default="", help="';'-separated variants (see above)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    common.setup(args)
    from speculant.models import persistent_forward as pf
    from speculant.models import triton_forward as tf
    from speculant.models.transformer import LeanModel, TransformerConfig, random_weights

    variants = [""] + [v for v in args.variants.split(";") if v]
    defaults = {name: getattr(pf, name) for v in variants for name in parse_variant(v)}
    rows = []
    for shape in args.shapes.split(","):
        shapes, layers = common.RANDOM_SHAPES[shape]
        cfg = TransformerConfig(num_layers=layers, **shapes)
        model = LeanModel(random_weights(cfg, seed=0, dtype=torch.bfloat16).cuda(), max_seq_len=args.max_seq_len)
        pf.PERSISTENT = False
        kernels = tf.TritonForward(model)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (args.context,), generator=gen).cuda()
        kernels.forward_static(prompt, torch.arange(args.context, device="cuda"))
        token = torch.tensor([7], device="cuda")
        position = torch.tensor([args.context], device="cuda")
        want = kernels.forward_static(token, position).clone()
        ms = replay_ms(kernels.forward_static, token, position, args.repeats)
        rows.append({"shapes": shape, "forward": "GEMV kernels + PDL", "ms": ms, "rel_err": 0.0, "barrier_ok": True})
        print(rows[-1], flush=True)
        for variant in variants:
            values = parse_variant(variant)
            for name, value in {**defaults, **values}.items():
                setattr(pf, name, value)
            pf._KERNELS.clear()  # constexprs come from the call; PROGRAMS_PER_SM from the constructor
            one = pf.PersistentForward(model)
            got = one(token, position)
            torch.cuda.synchronize()
            try:
                one.check()
                ok = True
            except RuntimeError:
                ok = False
            err = float((got - want).abs().max() / want.abs().max())
            ms = replay_ms(one, token, position, args.repeats)
            try:
                one.check()
            except RuntimeError:
                ok = False
            launched = max(one._programs.values())
            rows.append({"shapes": shape, "forward": f"persistent {variant or 'defaults'} ({launched} programs)",
                         "ms": ms, "rel_err": err, "barrier_ok": ok})
            print(rows[-1], flush=True)
        for name, value in defaults.items():
            setattr(pf, name, value)
        del model, kernels
        torch.cuda.empty_cache()
    text = common.table([(r["shapes"], r["forward"], f"{r['ms']:.4f}", f"{r['rel_err']:.2e}", r["barrier_ok"])
                         for r in rows], ("shapes", "forward", "ms", "logits rel. err", "barriers"))
    summary = {"device": common.device_name(args.device), "context": args.context, "rows": rows}
    common.finish(args.out, "persistent_probe.json", summary, text, {"rows": len(rows)})


if __name__ == "__main__":
    main()
