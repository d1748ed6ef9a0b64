"""A distillation run's state on disk: the out dir, the checkpoint (float32 draft weights,
optimizer, step, RNG and options) written every `--checkpoint-every` steps and resumed from, and the
seeded batch order that makes a resumed run see exactly the batches of an uninterrupted one."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from speculant.distill.options import (
    RESUMABLE,
    CheckpointMismatchError,
    DistillOptions,
    OutputDirError,
    options_dict,
)
from speculant.models.feature_draft import DraftWeights

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainState:
    """How far a run has got; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    wall_time: float = 0.0  # seconds of training, summed over resumptions
    losses: list[float] = field(default_factory=list)  # mean loss per logged interval
    before: dict = field(default_factory=dict)  # held-out α before training
    train_alpha: list[float] = field(default_factory=list)  # α per pass of the last logged training batches


def batch_indices(step: int, batch_size: int, num_sequences: int, seed: int) -> torch.Tensor:
    """Sequence indices of `step`: one seeded permutation per epoch, so a resumed run sees exactly
    the batches the uninterrupted run would have."""
    first = step * batch_size
    indices = []
    for i in range(first, first + batch_size):
        epoch, position = divmod(i, num_sequences)
        perm = _epoch_permutation(num_sequences, seed, epoch)
        indices.append(int(perm[position]))
    return torch.tensor(indices)


_PERMS: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERMS:
        _PERMS.clear()
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return _PERMS[key]


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` and check it can be written, before any costly work."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"cannot write to the output folder {out_dir}: {error.strerror or error}") from None
    return out_dir


def save_checkpoint(folder: Path, weights: DraftWeights, optimizer, state: TrainState, opts: DistillOptions,
                     target_hash: str, device: torch.device) -> None:
    """draft.safetensors (float32 weights, kept ids) + trainer.pt (optimizer, step, RNG, options)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.state_dict().items()}
    tmp = folder / "draft.safetensors.tmp"
    save_file(tensors, str(tmp))
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    trainer = {"optimizer": optimizer.state_dict(), "state": asdict(state), "rng": rng,
               "options": options_dict(opts), "target_hash": target_hash}
    tmp_trainer = folder / "trainer.pt.tmp"
    torch.save(trainer, tmp_trainer)
    os.replace(tmp, folder / "draft.safetensors")
    os.replace(tmp_trainer, folder / "trainer.pt")


def check_resumable(saved: dict, opts: DistillOptions, target_hash: str, checkpoint: Path) -> None:
    """A checkpoint resumes only the run that wrote it: same target, same options bar RESUMABLE."""
    if saved.get("target_hash") != target_hash:
        raise CheckpointMismatchError(
            f"{checkpoint} holds a run for another target; use another --out or --no-resume to start over")
    mine, defaults = options_dict(opts), options_dict(DistillOptions())
    # an option the checkpoint does not record was added later: that run used its default
    theirs = {k: saved.get("options", {}).get(k, defaults[k]) for k in mine}
    changed = [k for k, v in theirs.items() if k not in RESUMABLE and mine[k] != v]
    if changed:
        raise CheckpointMismatchError(
            f"{checkpoint} holds a run with different options ({', '.join(sorted(changed))}); "
            "use the same options, another --out, or --no-resume to start over")


def restore_rng(rng: dict, device: torch.device) -> None:
    """The random state a checkpoint saved, so the resumed run draws what the straight one would."""
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
