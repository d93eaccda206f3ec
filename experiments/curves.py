"""Train and test accuracy of the reference recipes per epoch (what an epoch budget or a recipe costs).

Usage: python experiments/curves.py --setting mnist2-mlp --seeds 2 --epochs 30 [--every 5] [--shuffle no]

For the centered recipe (FMNIST2: the loss fits ``f - f_init`` to the 0/1 targets) both readouts are
printed: the trained function ``f - f_init > 0.5`` ("centered") and the reference script's uncentered
``sigmoid(f) > 0.5`` ("uncentered").
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import ROOT, load_split  # noqa: E402

from models import SETTINGS, make_model, train_group  # noqa: E402


def _pct(v: torch.Tensor) -> list[float]:
    return [round(100 * float(a), 2) for a in v]


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", required=True, choices=sorted(SETTINGS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--shuffle", choices=("yes", "no"), default=None, help="override the recipe's shuffling")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=ROOT / "experiments" / "data")
    ap.add_argument("--n-train-per-class", type=int, default=None, help="development only")
    ap.add_argument("--n-test-per-class", type=int, default=None, help="development only")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = SETTINGS[a.setting]
    recipe = replace(s.recipe, epochs=a.epochs)
    if a.shuffle is not None:
        recipe = replace(recipe, shuffle=a.shuffle == "yes")
    sp = load_split(s.data, a.data, a.n_train_per_class, a.n_test_per_class)
    xtr, ytr = torch.from_numpy(sp.x_train), torch.from_numpy(sp.y_train)
    xte, yte = torch.from_numpy(sp.x_test), torch.from_numpy(sp.y_test)
    seeds = list(range(a.seeds))
    centered = recipe.loss == "mse_centered"
    if centered:
        with torch.no_grad():
            inits = [make_model(s.arch, sd).eval() for sd in seeds]
            f0_tr = torch.stack([m(xtr)[:, 0] for m in inits])
            f0_te = torch.stack([m(xte)[:, 0] for m in inits])
    print(f"{a.setting} seeds {seeds}, recipe {recipe}", flush=True)
    t0 = time.perf_counter()

    def log(ep: int, predict) -> None:  # type: ignore[no-untyped-def]
        if ep % a.every and ep != a.epochs:
            return
        z_tr, z_te = predict(xtr), predict(xte)
        line = f"epoch {ep}:"
        if centered:
            line += (
                f" centered test {_pct(((z_te - f0_te > 0.5).long() == yte).float().mean(1))}"
                f" train {_pct(((z_tr - f0_tr > 0.5).long() == ytr).float().mean(1))} |"
                f" uncentered test {_pct(((z_te > 0).long() == yte).float().mean(1))}"
            )
        else:
            line += (
                f" test {_pct(((z_te > 0).long() == yte).float().mean(1))}"
                f" train {_pct(((z_tr > 0).long() == ytr).float().mean(1))}"
                f" saturated {[round(float(v), 3) for v in (torch.sigmoid(z_te) == 1).float().mean(1)]}"
            )
        print(f"{line} ({time.perf_counter() - t0:.0f}s)", flush=True)

    train_group(s.arch, seeds, xtr, ytr, recipe, progress=False, on_epoch=log)


if __name__ == "__main__":
    main()
