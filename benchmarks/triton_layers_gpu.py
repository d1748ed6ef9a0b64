"""TritonForward (speculant.models.triton_forward: 6 triton_layers kernels per layer) against
LeanModel.forward on the GPU, bfloat16: first whether it computes the same function (logit error
against LeanModel's bf16 forward and against the float32 forward of the same bf16 weights, argmax
agreement over a few prompts, teacher-forced decode and 5-token verify calls), then per-forward
time for T = 1 and T = 5 eagerly and replayed from a CUDA graph, and kernels per forward
(torch.profiler).

    python benchmarks/triton_layers_gpu.py --model smollm2-135m --out $OUT
    python benchmarks/triton_layers_gpu.py --random                      # SmolLM2-135M shapes, random weights
    python benchmarks/triton_layers_gpu.py --random qwen2.5-1.5b --no-truth  # Qwen2.5-Coder-1.5B's shapes
    python benchmarks/triton_layers_gpu.py --model /root/w/smollm2.gguf --no-compile   # skip torch.compile
    python benchmarks/triton_layers_gpu.py --model /root/w/qwen-1.5b.gguf --gemm-programs 64,128,256 --no-truth
    python benchmarks/triton_layers_gpu.py --model /root/w/qwen-1.5b.gguf --split-k auto,off --no-truth
    python benchmarks/triton_layers_gpu.py --model /root/w/qwen-1.5b.gguf --settings 'SPLIT_BELOW=2' --no-truth

Baselines: LeanModel.forward eagerly, and the fused step's forward (speculant.fused.static_forward,
torch.compile'd unless --no-compile) captured as a CUDA graph, as FusedStepper serves it; the
Triton graph captures TritonForward.forward_static (attention over the whole static cache, chunks
past the last position returning at once). Writes triton_layers_gpu.json into --out ($OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import common  # benchmarks/common.py (this script runs from benchmarks/)
import torch


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, Hugging Face folder or .gguf")
    parser.add_argument("--random", nargs="?", const="smollm2-135m", default=None, choices=sorted(common.RANDOM_SHAPES),
                        help="random weights of these shapes instead of --model (default: SmolLM2-135M's)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the --random model (default: its own)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="cache slots (the graphs attend over all)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts of the correctness check")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--decode-steps", type=int, default=16, help="teacher-forced T=1 calls per prompt")
    parser.add_argument("--rows", default="1,5", help="T values timed")
    parser.add_argument("--context", type=int, default=512, help="position of the timed calls")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=64, help="keys per attention program")
    parser.add_argument("--gemm-programs", default="",
                        help="also time the triton graph with triton_layers.GEMM_PROGRAMS set to each of these "
                             "(comma-separated): the GEMMs' output columns per program follow it")
    parser.add_argument("--split-k", default="off",
                        help="also time the triton graph with triton_layers.SPLIT_K set to each of these "
                             "(comma-separated from auto, off; the graph above runs the module's default)")
    parser.add_argument("--settings", default="",
                        help="also time the triton graph with each of these variants of triton_layers' settings: "
                             "';'-separated variants of ','-separated NAME=VALUE (e.g. SPLIT_BELOW=2;"
                             "SPLIT_BELOW=2,PROGRAMS_PER_SM=8)")
    parser.add_argument("--no-compile", action="store_true", help="the baseline graph without torch.compile")
    parser.add_argument("--no-truth", action="store_true", help="skip the float32 forward of the same weights")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out/triton_layers"))
    return parser


def load(args):
    """(model, truth or None, tokenizer or None): a bf16 LeanModel on CUDA; truth: the same weights in
    float32 (a LeanModel of its own)."""
    from speculant.models.transformer import LeanModel, TransformerConfig, random_weights

    if args.random:
        shapes, layers = common.RANDOM_SHAPES[args.random]
        cfg = TransformerConfig(num_layers=args.layers or layers, **shapes)
        weights = random_weights(cfg, seed=0, dtype=torch.bfloat16).cuda()
        tokenizer = None
    else:
        from speculant.models.registry import load_model

        loaded = load_model(args.model, dtype=torch.bfloat16, device="cuda", max_seq_len=args.max_seq_len)
        if not isinstance(loaded.model, LeanModel):
            raise SystemExit(f"error: {args.model} is not served by LeanModel")
        weights, tokenizer = loaded.weights, loaded.tokenizer
    model = LeanModel(weights, max_seq_len=args.max_seq_len)
    truth = None
    if not args.no_truth:
        truth = LeanModel(float32_copy(weights), max_seq_len=args.max_seq_len)
    return model, truth, tokenizer


def float32_copy(weights):
    """The same (bf16) weights in float32, unfused: Block.fuse_projections keeps its q|k|v and gate|up
    matrices as plain attributes, which Module.to would leave in bf16; LeanModel fuses them again."""
    import copy

    weights = copy.deepcopy(weights)
    for layer in weights.layers:
        layer.qkv = layer.gate_up = layer.o = layer.down = None
    return weights.to(torch.float32)


def prompts(args, model, tokenizer) -> list[torch.Tensor]:
    if tokenizer is not None:
        texts = common.heldout_texts("prose", args.prompts) + common.heldout_code_texts(args.prompts)
        ids = [tokenizer.encode(text)[: args.prompt_len] for text in texts]
        ids = [i for i in ids if len(i) >= 8][: args.prompts]  # a verify call reuses a prompt's tokens 0..5
        if ids:
            return [torch.tensor(i, device="cuda") for i in ids]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.vocab_size, (args.prompt_len,), generator=generator).cuda()
            for _ in range(args.prompts)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@torch.inference_mode()
def check(model, twin, forward, truth, prompt_list, steps) -> dict:
    """Prompt, then `steps` teacher-forced decode calls (the reference's greedy token), then a 5-token
    verify, on three models with their own caches: reference (bf16 LeanModel), triton (bf16, over
    the same weights), truth (float32)."""
    stats = {"calls": 0, "rows": 0, "argmax_agree": 0, "max_abs_err": 0.0, "max_rel_err": 0.0,
             "max_rel_err_vs_truth": 0.0, "reference_max_rel_err_vs_truth": 0.0}

    def compare(tokens, start):
        want = model.forward(tokens, start)
        got = forward(tokens, start)
        stats["calls"] += 1
        stats["rows"] += tokens.shape[0]
        stats["argmax_agree"] += int((got.argmax(-1) == want.argmax(-1)).sum())
        stats["max_abs_err"] = max(stats["max_abs_err"], float((got - want).abs().max()))
        stats["max_rel_err"] = max(stats["max_rel_err"], relative(got, want))
        if truth is not None:
            exact = truth.forward(tokens, start)
            stats["max_rel_err_vs_truth"] = max(stats["max_rel_err_vs_truth"], relative(got, exact))
            stats["reference_max_rel_err_vs_truth"] = max(stats["reference_max_rel_err_vs_truth"], relative(want, exact))
        return want

    for prompt in prompt_list:
        for m in (model, twin, truth):
            if m is not None:
                m.truncate(0)
        logits = compare(prompt, 0)
        position = prompt.shape[0]
        for _ in range(steps):
            token = logits[-1:].argmax(-1)
            logits = compare(token, position)
            position += 1
        verify = torch.cat([logits[-1:].argmax(-1), prompt[:4]])  # a 5-token verify call
        compare(verify, position)
        for m in (model, twin, truth):
            if m is not None:
                m.truncate(position + 2)  # two of the five kept
        compare(prompt[4:6], position + 2)
    stats["argmax_agreement"] = stats["argmax_agree"] / stats["rows"]
    return stats


@torch.inference_mode()
def row_invariance(twin, forward, prompt) -> dict:
    """Whether a position's logits are the same bits computed inside a 5-token call as alone (T = 1),
    TritonForward's and LeanModel's (each on twin's cache): the kernels fix a row's reduction order
    whatever T is, so this may hold where torch's GEMMs do not (see models.exact_attention)."""
    out = {}
    for name, run in (("triton", forward.forward), ("lean", twin.forward)):
        twin.truncate(0)
        run(prompt[:-5], 0)
        start = prompt.shape[0] - 5
        together = run(prompt[-5:], start)
        twin.truncate(start)
        alone = torch.cat([run(prompt[start + i: start + i + 1], start + i) for i in range(5)])
        out[name] = {"bitwise_equal": bool(torch.equal(together, alone)),
                     "max_abs_diff": float((together - alone).abs().max())}
    return out


def eager_ms(fn, sync_repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(sync_repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / sync_repeats


def kernels(fn) -> tuple[int, list]:
    """(CUDA kernels one call of fn launches, the kernels that took the most device time: [name,
    launches, µs per call]), copies and fills left out."""
    counts, times = common.cuda_kernel_profile(fn)
    launches = {name: n for name, n in counts.items() if "Memcpy" not in name and "Memset" not in name}
    slowest = sorted(launches, key=lambda name: -times.get(name, 0.0))[:8]
    return sum(launches.values()), [[name, launches[name], round(times.get(name, 0.0), 1)] for name in slowest]


def with_settings(values: dict, fn):
    """fn with triton_layers' module settings (GEMM_PROGRAMS, SPLIT_K, SPLIT_BELOW, ...) set to `values`
    while it runs: the kernels and tiles it picks compile their own binaries, captured into the graph
    with them."""
    from speculant.models import triton_layers

    def call():
        with triton_layers.settings(values):
            return fn()

    return call


def parse_settings(text: str) -> list[dict]:
    """"SPLIT_BELOW=2;SPLIT_BELOW=2,PROGRAMS_PER_SM=8" -> [{"SPLIT_BELOW": 2}, {...}]: each variant's
    triton_layers settings (triton_layers.parse_settings)."""
    from speculant.models import triton_layers

    try:
        return [triton_layers.parse_settings(variant) for variant in filter(None, text.split(";"))]
    except ValueError as error:
        raise SystemExit(f"error: --settings: {error}") from None


def main() -> None:
    args = arguments().parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    from speculant.fused import static_forward
    from speculant.models.transformer import LeanModel
    from speculant.models.triton_forward import TritonForward

    model, truth, tokenizer = load(args)
    twin = LeanModel(model.weights, max_seq_len=args.max_seq_len)  # same weights, its own cache
    forward = TritonForward(twin, chunk=args.chunk)
    layers = model.num_layers
    prompt_list = prompts(args, model, tokenizer)
    accuracy = check(model, twin, forward, truth, prompt_list, args.decode_steps)
    invariance = row_invariance(twin, forward, prompt_list[0])
    print(json.dumps({"accuracy": accuracy, "row_invariance": invariance}), flush=True)

    baseline = static_forward(model, compile=not args.no_compile)
    rows = []
    context = min(args.context, args.max_seq_len - 40)
    for t in map(int, args.rows.split(",")):
        tokens = torch.arange(1, t + 1, device="cuda")
        positions = torch.arange(context, context + t, device="cuda")
        for m in (model, twin):
            m.set_length(context)
        calls = {
            "lean eager": lambda x=tokens: model.forward(x, context),
            "triton eager": lambda x=tokens: forward.forward(x, context),
            "lean graph" + ("" if args.no_compile else " (compiled)"): lambda x=tokens, p=positions: baseline(x, p),
            "triton graph": lambda x=tokens, p=positions: forward.forward_static(x, p),
        }
        variants = [{"GEMM_PROGRAMS": int(p)} for p in filter(None, args.gemm_programs.split(","))]
        variants += [{"SPLIT_K": policy} for policy in filter(None, args.split_k.split(","))]
        for settings in variants + parse_settings(args.settings):
            label = ", ".join(f"{name}={value}" for name, value in settings.items())
            calls[f"triton graph, {label}"] = with_settings(
                settings, lambda x=tokens, p=positions: forward.forward_static(x, p))
        for name, fn in calls.items():
            if "graph" in name:
                ms, setup = common.graph_replay_ms(fn, args.repeats)
            else:
                ms, setup = eager_ms(fn, max(10, args.repeats // 10)), 0.0
            count, top = kernels(fn)
            # per layer: all but two (the embedding and the head), so for LeanModel an upper bound
            rows.append({"impl": name, "T": t, "ms_per_forward": round(ms, 4), "ms_per_token": round(ms / t, 4),
                         "kernels_per_forward": count, "kernels_per_layer": round((count - 2) / layers, 2),
                         "setup_s": round(setup, 1), "top_kernels": top})
            print(json.dumps(rows[-1]), flush=True)

    header = ["impl", "T", "ms/forward", "ms/token", "kernels", "kernels/layer"]
    width = [max(len(h), 22) for h in header]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, width))]
    for r in rows:
        cells = [r["impl"], r["T"], r["ms_per_forward"], r["ms_per_token"], r["kernels_per_forward"],
                 r["kernels_per_layer"]]
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, width)))
    print("\n" + "\n".join(lines))
    print(f"\naccuracy: argmax agreement {accuracy['argmax_agreement']:.4f} over {accuracy['rows']} rows, max logit "
          f"error {accuracy['max_abs_err']:.4f} (relative {accuracy['max_rel_err']:.4f}); against float32: triton "
          f"{accuracy['max_rel_err_vs_truth']:.4f}, LeanModel bf16 {accuracy['reference_max_rel_err_vs_truth']:.4f}")
    print(f"a row alone vs inside a 5-token call, same bits: {invariance}")
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "model": f"random {args.random} shapes" if args.random
               else args.model, "layers": layers, "max_seq_len": args.max_seq_len, "context": context,
               "chunk": args.chunk, "compile": not args.no_compile, "accuracy": accuracy,
               "row_invariance": invariance, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_layers_gpu.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"json": str(out / "triton_layers_gpu.json")}))


if __name__ == "__main__":
    main()
