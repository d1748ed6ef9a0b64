"""`speculant distill`: train a small draft for a target by distillation, on CPU or CUDA.

    python -m speculant.distill.cli --target smollm2-135m --out drafts/smollm2 --steps 2000 --device cuda

Objective. At every position of the training text the target's distribution p (after the
temperature the draft will serve at, `--temperature`) is computed on the fly (target frozen, no
grad). The draft's q lives on the K kept ids only, so the full-vocabulary KL(p || q) is infinite
whenever p puts any mass outside them. We minimise instead

    L = Σ_{x∈K} p(x) · log(p̃(x) / q(x)) = m · KL(p̃ || q),     m = Σ_{x∈K} p(x),  p̃ = p / m on K,

i.e. the cross-entropy −Σ_{x∈K} p(x) log q(x) minus a constant that does not depend on the draft
(so the gradients are the cross-entropy's), shifted to be 0 at the optimum. Why this is the right
target: α = Σ_x min(p, q) ≤ Σ_{x∈K} p(x) = m for any q supported on K, and q = p̃ reaches that
bound (p̃ ≥ p on K), while L is minimised exactly at q = p̃. Positions where the target's mass
sits mostly outside K weigh less (m small), as they should: no draft on K can gain much there.

The run: load the target, build (or reuse) the token corpus (speculant.distill.data), pick the K
most frequent ids, initialise the draft from the target's first layers (or randomly), train with
AdamW and a warm-up + cosine (or linear) schedule, checkpoint every `--checkpoint-every` steps,
resume automatically from the out dir's checkpoint, measure held-out α at temperatures 0 and 1
(Σ min(p, q), through the same `logits_to_probs` the engine uses) before and after, optionally
run the engine, and write model.safetensors + config.json.

The package: options.py (the flags as `DistillOptions`), data.py (the corpus), objective.py (the
loss and the target's side of it), evaluate.py (α and c), checkpoint.py (resume), this file (the
run and its training loop), cli.py (`speculant distill`).
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from speculant.distill.checkpoint import (
    CHECKPOINT_DIR,
    TrainState,
    batch_indices,
    check_resumable,
    prepare_out_dir,
    restore_rng,
    save_checkpoint,
)
from speculant.distill.data import (
    CorpusTooSmallError,
    DistillError,
    TokenCorpus,
    batch_encoder,
    build_corpus,
    chat_prompts,
    chat_sequences,
    kept_token_ids,
    load_corpus,
    save_corpus,
    self_written_questions,
    wide_chat_prompts,
)
from speculant.distill.evaluate import engine_alpha, heldout_alpha, measure_cost_ratio, serving_copy
from speculant.distill.objective import distill_loss, feature_draft_losses, target_outputs_batch
from speculant.distill.options import DistillOptions, options_dict
from speculant.distill.questions import requested_questions
from speculant.models.base import DTYPES, synchronize
from speculant.models.feature_draft import (
    SAVE_DTYPES,
    WEIGHTS_FILE,
    DraftConfig,
    DraftWeights,
    dequantized,
    draft_class,
    init_random,
    read_draft_config,
    save_draft,
)
from speculant.models.transformer import LeanModel, TransformerWeights

CORPUS_FILE = "corpus.safetensors"
_LATER_POSITION = re.compile(r"alpha\d+_t")  # heldout_alpha's keys for draft positions 2, 3, ...

# ---- training ---------------------------------------------------------------------------------------


def train_draft(
    target: LeanModel,
    corpus: TokenCorpus,
    out_dir: str | Path,
    options: DistillOptions,
    *,
    target_name: str,
    target_hash: str,
    always_kept: Sequence[int] = (),
    extra_metadata: dict | None = None,
) -> dict:
    """Distil a draft for `target` (a LeanModel) on `corpus`; write the draft folder to `out_dir`.

    Resumes from out_dir/checkpoint when `options.resume` and one is there. Returns the metadata
    written to config.json["training"] (α before and after, loss, throughput, ...).

    The steps: check the corpus fits; find the starting weights (the checkpoint, `init_from`, or
    fresh kept ids); build the float32 draft and its optimizer; measure held-out α before; train;
    checkpoint; measure the served draft (α, c, engine runs); save the folder.
    """
    out_dir = prepare_out_dir(out_dir)
    opts = options
    _check_corpus_fits(corpus, target, opts)
    tw: TransformerWeights = target.weights
    checkpoint = out_dir / CHECKPOINT_DIR
    saved = _saved_run(checkpoint, opts, target_hash)
    feature_layers = opts.resolve_feature_layers(target.num_layers)
    kept, draft_tensors = _starting_tensors(saved, checkpoint, corpus, tw, opts, target_hash, always_kept,
                                            feature_layers)
    cfg = DraftConfig.for_target(tw.cfg, num_layers=opts.num_layers, num_kept=len(kept), head=opts.head,
                                 intermediate_size=opts.intermediate_size or None, inputs=opts.inputs,
                                 feature_layers=feature_layers, feature_rank=opts.feature_rank)
    weights, init = _draft_weights(tw, cfg, kept, draft_tensors, opts, target.device)
    trainer = draft_class(cfg)(weights, max_seq_len=corpus.seq_len)  # float32 master weights
    params = [p for p in weights.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.95),
                                  **({"fused": True} if target.device.type == "cuda" else {}))
    state = TrainState()
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**saved["state"])
        restore_rng(saved["rng"], target.device)
    target_dtype = tw.embed_tokens.weight.dtype
    heldout = corpus.heldout[: opts.eval_sequences]
    heldout_chat = corpus.heldout_chat[: opts.eval_sequences] if corpus.heldout_chat is not None else None
    if not state.before:
        initial = serving_copy(weights, target_dtype, target.max_seq_len)
        state.before = _heldout_alphas(target, initial, heldout, heldout_chat, opts)

    def save_progress() -> None:
        save_checkpoint(checkpoint, weights, optimizer, state, opts, target_hash, target.device)

    last_loss = _train_loop(target, trainer, cfg, weights, optimizer, params, corpus, opts, state, save_progress)
    save_progress()

    # What users get: the saved weights, in the target's dtype.
    save_dtype = SAVE_DTYPES[opts.save_dtype]
    served = serving_copy(weights, save_dtype, target.max_seq_len)
    served = serving_copy(served.draft_weights, target_dtype, target.max_seq_len)
    after = _heldout_alphas(target, served, heldout, heldout_chat, opts)
    metadata = _run_metadata(target, served, corpus, opts, state, after, init=init, last_loss=last_loss,
                             save_dtype=save_dtype, extra_metadata=extra_metadata)
    _check_finite(metadata)
    save_draft(out_dir, weights, target_name=target_name, target_hash=target_hash, dtype=save_dtype,
               metadata=metadata)
    return metadata


def _check_corpus_fits(corpus: TokenCorpus, target: LeanModel, opts: DistillOptions) -> None:
    if corpus.train.shape[0] < opts.batch_size:
        raise CorpusTooSmallError(f"corpus too small: {corpus.train.shape[0]} training sequences for a batch of "
                                  f"{opts.batch_size}; lower --batch-size or --seq-len, or add data")
    if corpus.seq_len > target.max_seq_len:
        raise DistillError(f"sequences of {corpus.seq_len} tokens do not fit the target's cache of {target.max_seq_len}")


def _saved_run(checkpoint: Path, opts: DistillOptions, target_hash: str) -> dict | None:
    """The checkpoint's trainer state when this run resumes one (checked to be the same run), else None."""
    if not (opts.resume and (checkpoint / "trainer.pt").is_file()):
        return None
    saved = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    check_resumable(saved, opts, target_hash, checkpoint)
    return saved


def _starting_tensors(saved: dict | None, checkpoint: Path, corpus: TokenCorpus, tw: TransformerWeights,
                      opts: DistillOptions, target_hash: str, always_kept: Sequence[int],
                      feature_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict | None]:
    """(kept ids [K], the draft tensors to start from or None for a fresh draft): the checkpoint's,
    the `init_from` draft's (its kept ids, or new ones picked on this corpus), or none."""
    def kept_on_corpus() -> torch.Tensor:
        return kept_token_ids(corpus.train, tw.cfg.vocab_size, min(opts.num_kept, tw.cfg.vocab_size), always_kept)

    if saved is not None:
        draft_tensors = load_file(str(checkpoint / "draft.safetensors"))
        return draft_tensors["kept_ids"], draft_tensors
    if not opts.init_from:
        return kept_on_corpus(), None
    draft_tensors = _init_tensors(opts, target_hash, tw.cfg.intermediate_size, feature_layers)
    kept = draft_tensors["kept_ids"]
    if opts.init_vocab == "corpus":  # new kept ids; a bias (and an own head's row) follows its id
        kept = kept_on_corpus()
        index = {int(i): row for row, i in enumerate(draft_tensors["kept_ids"].tolist())}
        for name in ("head_bias", "head.weight"):  # [K] and [K, E]; new ids start at the mean
            if name in draft_tensors:
                old = draft_tensors[name].float()
                draft_tensors[name] = torch.stack([old[index[i]] if i in index else old.mean(0)
                                                   for i in kept.tolist()])
        draft_tensors["kept_ids"] = kept
    return kept, draft_tensors


def _draft_weights(tw: TransformerWeights, cfg: DraftConfig, kept: torch.Tensor, draft_tensors: dict | None,
                   opts: DistillOptions, device: torch.device) -> tuple[DraftWeights, str]:
    """The float32 draft weights on `device`, and how they were initialised (for the metadata):
    seeded random, then the target's first layers where they fit, then `draft_tensors` if given."""
    head = tw.head_weight()
    rows = head.detach()[kept.to(head.device)].float() if cfg.head == "shared" else None
    weights = DraftWeights(cfg, tw.embed_tokens, kept, rows)
    init = opts.init
    if init == "auto":
        can_copy = tw.cfg.arch == "llama" and cfg.intermediate_size == tw.cfg.intermediate_size \
            and cfg.num_layers <= tw.cfg.num_layers and cfg.inputs == "tokens"
        init = "target" if can_copy else "random"
    init_random(weights, opts.seed)
    if init == "target":
        weights.init_from_target(tw)
    weights = weights.to(device=device, dtype=torch.float32)
    if draft_tensors is not None:
        # a draft without feature layers fine-tuned with them: its tap mix starts at zero (init_random)
        fresh = weights.state_dict()
        missing = {k: v for k, v in fresh.items() if k not in draft_tensors and k.startswith(("tap_norms.", "tap_down.", "tap_mix."))}
        tensors = {k: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
                   for k, v in draft_tensors.items()}
        weights.load_state_dict({**tensors, **missing})
    if opts.init_from:
        init = f"from {opts.init_from}"
    return weights, init


def _batch_loss(target: LeanModel, trainer, cfg: DraftConfig, tokens: torch.Tensor, kept: torch.Tensor,
                opts: DistillOptions, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, α estimate per pass [P]) of one training batch tokens [B, T]; the target runs without
    grad. P = rollout_steps for a feature draft, 1 for a token draft."""
    with autocast:
        taps: list[torch.Tensor] = []
        t_logits, t_features = target_outputs_batch(target, tokens, cfg.feature_layers, taps)  # [B, T, V], [B, T, E]
        if cfg.inputs == "features":
            read = trainer.draft_weights.combine_features(t_features, taps) if cfg.feature_layers else None
            return feature_draft_losses(trainer, tokens, t_logits, t_features, kept, opts.temperature,
                                        opts.feature_weight, opts.rollout_steps, opts.rollout_weight_decay,
                                        read_features=read)
        d_logits = trainer.train_kept_logits(tokens)  # [B, T, K]
    loss, alpha, _ = distill_loss(d_logits.flatten(0, 1), t_logits.flatten(0, 1), kept, opts.temperature)
    return loss, alpha.reshape(1)


def _train_loop(target: LeanModel, trainer, cfg: DraftConfig, weights: DraftWeights, optimizer, params: list,
                corpus: TokenCorpus, opts: DistillOptions, state: TrainState, save_progress) -> float:
    """AdamW steps from `state.step` until the step count or the time limit is reached, updating
    `state`; `save_progress()` every `checkpoint_every` steps. Returns the last logged mean loss (NaN if
    no step was ever logged)."""
    device = target.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    bar = _progress(opts, state.step)
    tokens_per_step = opts.batch_size * corpus.seq_len
    kept = weights.kept_ids
    window_loss, window_alpha, window_n, window_start = 0.0, 0.0, 0, time.perf_counter()
    last_loss = state.losses[-1] if state.losses else float("nan")
    try:
        while state.step < opts.steps and opts.done_fraction(state.step, state.wall_time) < 1.0:
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = opts.lr_at(state.step, state.wall_time)
            tokens = corpus.train[batch_indices(state.step, opts.batch_size, corpus.train.shape[0], opts.seed)]
            tokens = tokens.to(device, non_blocking=True)
            loss, alphas = _batch_loss(target, trainer, cfg, tokens, kept, opts, autocast)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opts.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            optimizer.step()
            state.step += 1
            state.tokens_seen += tokens_per_step
            window_loss = window_loss + loss.detach()  # read back every 10 steps: few host syncs
            window_alpha = window_alpha + alphas  # [P]: α of each pass
            window_n += 1
            last_of_run = state.step == opts.steps or opts.done_fraction(
                state.step, state.wall_time + time.perf_counter() - step_start) >= 1.0
            # the loss is read (and checked) every 10 steps, at the run's end and before every checkpoint
            if window_n == 10 or last_of_run or state.step % opts.checkpoint_every == 0:
                synchronize(device)
                state.wall_time += time.perf_counter() - step_start
                elapsed = time.perf_counter() - window_start
                last_loss = float(window_loss) / window_n
                _check_loss(last_loss, state.step, opts)
                state.train_alpha = [round(a / window_n, 4) for a in window_alpha.tolist()]
                state.losses.append(round(last_loss, 5))
                if bar is not None:
                    left = {"time_left": f"{max(0.0, opts.time_limit - state.wall_time):.0f}s"} if opts.time_limit else {}
                    # α of the training batches per pass: "0.612/0.580/0.551" = draft positions 1, 2, 3
                    bar.set_postfix(loss=f"{last_loss:.4f}", alpha="/".join(f"{a:.3f}" for a in state.train_alpha),
                                    tok_s=f"{window_n * tokens_per_step / elapsed:,.0f}", **left)
                window_loss, window_alpha, window_n, window_start = 0.0, 0.0, 0, time.perf_counter()
            else:
                state.wall_time += time.perf_counter() - step_start
            if bar is not None:
                bar.update(1)
            if state.step % opts.checkpoint_every == 0 and state.step < opts.steps:
                save_progress()
    finally:
        if bar is not None:
            bar.close()
    if window_n:  # the loop ended inside a window (the time limit)
        last_loss = float(window_loss) / window_n
        _check_loss(last_loss, state.step, opts)
        state.train_alpha = [round(a / window_n, 4) for a in window_alpha.tolist()]
        state.losses.append(round(last_loss, 5))
    return last_loss


def _heldout_alphas(target: LeanModel, draft, heldout: torch.Tensor, heldout_chat: torch.Tensor | None,
                    opts: DistillOptions) -> dict:
    """heldout_alpha on the held-out text, and on the held-out chat answers (keys chat_...) if any;
    a feature draft is measured at draft positions 1..max(2, rollout_steps) (alpha_t*, alpha2_t*, ...)."""
    passes = max(2, opts.rollout_steps)
    alphas = heldout_alpha(target, draft, heldout, passes=passes)
    if heldout_chat is not None:
        alphas.update(_prefixed("chat_", heldout_alpha(target, draft, heldout_chat, passes=passes)))
    return alphas


def _run_metadata(target: LeanModel, served, corpus: TokenCorpus, opts: DistillOptions, state: TrainState,
                  after: dict, *, init: str, last_loss: float, save_dtype: torch.dtype,
                  extra_metadata: dict | None) -> dict:
    """What config.json["training"] records: the run, α before and after, sizes, c, engine runs."""
    heldout = corpus.heldout[: opts.eval_sequences]
    target_bytes = sum(t.numel() * t.element_size() for t in target.weights.state_dict().values())
    metadata = {
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "batch_size": opts.batch_size,
        "seq_len": corpus.seq_len,
        "seed": opts.seed,
        "temperature": opts.temperature,
        "init": init,
        "device": _device_name(target.device),
        "wall_time_s": round(state.wall_time, 2),
        "train_tokens_per_s": round(state.tokens_seen / state.wall_time, 1) if state.wall_time else 0.0,
        "final_loss": last_loss if math.isfinite(last_loss) else None,  # None: no training step ran
        "loss_history": state.losses[-200:],
        "alpha_t0": after["alpha_t0"],
        "alpha_t1": after["alpha_t1"],
        **{k: v for k, v in after.items() if _LATER_POSITION.match(k)},  # alpha2_t0, alpha3_t0, ...
        "train_alpha_by_pass": state.train_alpha,  # the last logged training batches, pass 1, 2, ...
        "kept_mass_t1": after["kept_mass_t1"],
        "alpha_t0_before": state.before["alpha_t0"],
        "alpha_t1_before": state.before["alpha_t1"],
        "heldout_positions": int(heldout.numel()),
        **{k: v for k, v in after.items() if k.startswith("chat_")},
        **{k + "_before": v for k, v in state.before.items() if k.startswith("chat_")},
        "draft_bytes": served.draft_weights.own_bytes(save_dtype),
        "target_bytes": target_bytes,
        "options": options_dict(opts),
        "data": corpus.meta,
        **(extra_metadata or {}),
    }
    metadata["draft_to_target_bytes"] = metadata["draft_bytes"] / target_bytes
    context = heldout[0, : min(128, corpus.seq_len - 1)]
    metadata.update(measure_cost_ratio(target, served, context))
    if opts.engine_prompts > 0:
        prompts = [row[:32].tolist() for row in corpus.heldout[: opts.engine_prompts]]
        metadata.update(engine_alpha(target, served, prompts, gamma=opts.gamma,
                                     max_new_tokens=min(opts.engine_new_tokens, target.max_seq_len - 33),
                                     seed=opts.seed))
    return metadata


def _check_loss(loss: float, step: int, opts: DistillOptions) -> None:
    """A NaN or infinite loss ends training: the weights it leaves are no draft."""
    if not math.isfinite(loss):
        raise DistillError(
            f"the training loss became {loss} by step {step} (learning rate {opts.lr_at(step):g}): the draft's "
            f"weights are no longer numbers. Lower --lr (now {opts.lr:g}), keep --grad-clip on (now "
            f"{opts.grad_clip:g}), or check the training data (--data); nothing was saved after the last "
            "checkpoint, and --resume would restart from it")


def _check_finite(metadata: dict, where: str = "") -> None:
    """Every number the draft's config.json records must be finite (JSON has no NaN)."""
    for key, value in metadata.items():
        if isinstance(value, dict):
            _check_finite(value, f"{where}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise DistillError(f"the draft's {where}{key} came out {value}: the run did not train a usable draft "
                               "(lower --lr, train longer, or check the data); nothing was saved")


def _init_tensors(opts: DistillOptions, target_hash: str, target_intermediate: int,
                  feature_layers: tuple[int, ...]) -> dict:
    """The weights of the draft folder `opts.init_from`, checked against the target and the options."""
    config = read_draft_config(opts.init_from)
    if config["target_hash"] != target_hash:
        raise DistillError(f"{opts.init_from} was distilled for another target ({config['target_name']!r}); "
                           "fine-tune only a draft of this target")
    arch = config["architecture"]
    wanted = {"num_layers": opts.num_layers, "inputs": opts.inputs, "head": opts.head,
              "intermediate_size": opts.intermediate_size or target_intermediate}
    differ = {k: (arch.get(k), v) for k, v in wanted.items() if arch.get(k) != v}
    if arch.get("feature_layers") and list(arch["feature_layers"]) != list(feature_layers):
        differ["feature_layers"] = (arch["feature_layers"], list(feature_layers))
    if arch.get("feature_layers") and arch.get("feature_rank", 0) != opts.feature_rank:
        differ["feature_rank"] = (arch.get("feature_rank", 0), opts.feature_rank)
    if differ:
        raise DistillError(f"{opts.init_from} does not match the options: " +
                           ", ".join(f"{k} is {a!r} there, {b!r} here" for k, (a, b) in differ.items()))
    return dequantized(load_file(str(Path(opts.init_from) / WEIGHTS_FILE)))  # an int8 draft's matrices too


def _prefixed(prefix: str, values: dict) -> dict:
    return {prefix + k: v for k, v in values.items()}


def _progress(opts: DistillOptions, initial: int):
    if not opts.progress or opts.steps == 0:
        return None
    from tqdm import tqdm

    # Logged to a file (a remote run), the bar would print hundreds of lines: every 10 s at most.
    desc = f"distilling (stops at {opts.time_limit:g} s)" if opts.time_limit else "distilling"
    return tqdm(total=opts.steps, initial=initial, desc=desc, unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


# ---- the whole run from a target spec ---------------------------------------------------------------


def run_distill(target_spec: str, out_dir: str | Path, **options) -> dict:
    """Load `target_spec` (an embedded name, HF folder or GGUF file), build or reuse the corpus,
    train, and write the draft folder. Options are `DistillOptions` fields. Returns the metadata.

    Errors: the loader's own for an unknown target; OutputDirError, CorpusTooSmallError,
    CheckpointMismatchError (all DistillError, a ValueError) for the rest.
    """
    known = {f.name for f in fields(DistillOptions)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown distill option(s): {', '.join(sorted(unknown))}")
    if "sources" in options:
        options["sources"] = tuple(options["sources"])
    opts = DistillOptions(**options)
    out_dir = prepare_out_dir(out_dir)
    if opts.device != "auto":
        from speculant.api import check_device

        try:
            check_device(opts.device)
        except ValueError as error:
            raise DistillError(f"--device: {error} (or auto)") from None
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    target_dtype = DTYPES.get(opts.target_dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(opts.seed)

    corpus_path = Path(opts.data) if opts.data else out_dir / CORPUS_FILE
    corpus = load_corpus(corpus_path) if corpus_path.is_file() and (opts.data or opts.resume) else None
    seq_len = corpus.seq_len if corpus is not None else opts.seq_len
    if corpus is not None and opts.progress:
        print(f"reusing the corpus {corpus_path}: {corpus.train.shape[0]} training sequences of {seq_len} tokens",
              file=sys.stderr)
    if corpus is not None and seq_len != opts.seq_len:
        opts = DistillOptions(**{**asdict(opts), "seq_len": seq_len})

    from speculant.models.registry import load_model

    loaded = load_model(target_spec, device=device, dtype=target_dtype,
                        max_seq_len=max(seq_len, 32 + opts.engine_new_tokens + 1))
    if loaded.weights is None or not isinstance(loaded.model, LeanModel):
        raise DistillError(f"{loaded.name} runs through transformers; distillation needs a lean (llama/gemma3) target")
    tokenizer = loaded.tokenizer
    eos = sorted(int(t) for t in (getattr(tokenizer, "eos_ids", None) or []))

    if corpus is None:
        extra, extra_heldout = [], []
        if opts.chat_samples > 0:
            if opts.chat_prompts in ("wide", "broad"):
                # wide: half written by the target itself, half from programming subjects; broad: half everyday
                # questions the target writes when asked for one (requested_questions), a quarter each of those
                texts = []
                if opts.chat_prompts == "broad":
                    texts = requested_questions(loaded.model, tokenizer, opts.chat_samples // 2, seed=opts.seed,
                                                batch_size=opts.chat_batch_size, progress=opts.progress)
                texts += self_written_questions(loaded.model, tokenizer, (opts.chat_samples - len(texts)) // 2,
                                                seed=opts.seed, batch_size=opts.chat_batch_size,
                                                progress=opts.progress)
                texts += wide_chat_prompts(opts.chat_samples - len(texts), opts.seed)
                random.Random(opts.seed).shuffle(texts)  # both kinds in the held-out tenth
            else:
                texts = chat_prompts(opts.chat_samples, opts.seed)
            prompts = [_chat_ids(tokenizer, text) for text in texts]
            answers = chat_sequences(loaded.model, prompts, max_new_tokens=opts.chat_max_new_tokens,
                                     temperature=opts.temperature, stop_ids=eos, seed=opts.seed,
                                     batch_size=opts.chat_batch_size, progress=opts.progress)
            extra_heldout = answers[::10]
            extra = [a for i, a in enumerate(answers) if i % 10] * opts.chat_repeat
        corpus = build_corpus(
            tokenizer.encode, encode_batch=batch_encoder(tokenizer), seq_len=seq_len,
            train_tokens=opts.train_tokens or opts.steps * opts.batch_size * seq_len,
            heldout_tokens=opts.eval_sequences * seq_len, separator_id=eos[0] if eos else None,
            sources=opts.sources, heldout_fraction=opts.heldout_fraction, seed=opts.seed,
            humaneval_file=opts.humaneval_file or None, extra_train=extra, extra_heldout=extra_heldout,
            progress=opts.progress,
        )
        corpus.meta["tokenizer_of"] = loaded.name
        save_corpus(corpus_path, corpus)
    return train_draft(loaded.model, corpus, out_dir, opts, target_name=loaded.name,
                       target_hash=loaded.source_hash, always_kept=eos,
                       extra_metadata={"target_source": str(loaded.source)})


def _chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True))
