"""Distillation of a small draft for a target (`speculant distill`). The draft's classes and its
folder format live in speculant.models.feature_draft; this package only trains.

    data.py          offline training text (stdlib, site-packages, pydoc topics, optionally the
                     target's own chat answers), HumanEval kept out, held-out split, token packing.
    options.py       DistillOptions: every flag, its checks, the learning-rate schedule.
    objective.py     the objective m·KL(p̃ || q) and the target's logits/features it is scored on.
    evaluate.py      held-out α, α and c from engine runs, the cost of one forward.
    checkpoint.py    the out dir, checkpoints and resume, the seeded batch order.
    train.py         the run: target, corpus, starting weights, the training loop, the saved folder.
    cli.py           the command line (`speculant distill`, `python -m speculant.distill.cli`).
"""

from speculant.distill.data import DistillError

__all__ = ["DistillError", "run_distill"]


def run_distill(target_spec, out_dir, **options):
    """See speculant.distill.train.run_distill (imported lazily: it pulls in the loader)."""
    from speculant.distill.train import run_distill as run

    return run(target_spec, out_dir, **options)
