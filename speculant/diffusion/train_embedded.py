"""Train the embedded diffusion models (targets and draft networks) from fixed seeds.

    .venv/bin/python -m speculant.diffusion.train_embedded [--out speculant/embedded/diffusion]

Trained with OMP_NUM_THREADS=1 (tiny matrices: more threads only contend); a few minutes on one core; the result is shipped under speculant/embedded/diffusion/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from speculant.diffusion.models import (
    EMBEDDED_DIR,
    EpsMLP,
    MLPConfig,
    Schedule,
    digits_data,
    mixture_data,
    save_model,
    train_eps_model,
)

NUM_STEPS = 200
# name -> (data set, config, training steps)
RECIPES = {
    "digits": ("digits", MLPConfig(dim=64, hidden=256, depth=3, num_steps=NUM_STEPS), 8000),
    "digits-draft": ("digits", MLPConfig(dim=64, hidden=64, depth=2, num_steps=NUM_STEPS), 4000),
    "mixture": ("mixture", MLPConfig(dim=2, hidden=128, depth=3, num_steps=NUM_STEPS), 6000),
    "mixture-draft": ("mixture", MLPConfig(dim=2, hidden=32, depth=2, num_steps=NUM_STEPS), 3000),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--only", nargs="*", default=list(RECIPES))
    args = parser.parse_args(argv)
    schedule = Schedule.linear(NUM_STEPS)
    data = {"digits": digits_data(), "mixture": mixture_data(20000, seed=1)}
    for name in args.only:
        data_name, config, steps = RECIPES[name]
        model = EpsMLP(config)
        start = time.perf_counter()
        losses = train_eps_model(model, data[data_name], schedule, steps=steps, seed=0)
        final = sum(losses[-200:]) / 200
        seconds = time.perf_counter() - start
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {steps} steps, "
              f"final loss {final:.4f}, {seconds:.0f} s", flush=True)
        save_model(model, args.out / name, data=data_name, train_steps=steps, batch_size=256, lr=2e-3, seed=0,
                   final_loss=round(final, 4), schedule=f"linear beta 1e-4..0.02 rescaled to T={NUM_STEPS}")


if __name__ == "__main__":
    main()
