"""Distillation of a small draft for a target (`speculant distill`).

    draft_model.py   DistilledDraft: a few layers over the target's (shared) embedding, a head over
                     the K most frequent ids, -inf elsewhere; the draft folder (save/load_draft).
    data.py          offline training text (stdlib, site-packages, pydoc topics, optionally the
                     target's own chat answers), HumanEval kept out, held-out split, token packing.
    train.py         the objective m·KL(p̃ || q), the training loop with checkpoints and resume,
                     held-out α, the command line (`python -m speculant.distill.train`).
"""

from speculant.distill.draft_model import (
    DistilledDraft,
    DistillError,
    DraftConfig,
    TargetMismatchError,
    is_draft_folder,
    load_draft,
    save_draft,
)

__all__ = [
    "DistillError",
    "DistilledDraft",
    "DraftConfig",
    "TargetMismatchError",
    "is_draft_folder",
    "load_draft",
    "run_distill",
    "save_draft",
]


def run_distill(target_spec, out_dir, **options):
    """See speculant.distill.train.run_distill (imported lazily: it pulls in the loader)."""
    from speculant.distill.train import run_distill as run

    return run(target_spec, out_dir, **options)
