"""Test accuracy of the reference recipes per epoch (how many epochs a CPU budget can drop).

Usage: python experiments/curves.py --setting mnist2-mlp --seeds 2 --epochs 30 [--every 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import ROOT, load_split  # noqa: E402

from models import SETTINGS, train_group  # noqa: E402


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", required=True, choices=sorted(SETTINGS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=ROOT / "experiments" / "data")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    s = SETTINGS[a.setting]
    sp = load_split(s.data, a.data, None, None)
    xte, yte = torch.from_numpy(sp.x_test), torch.from_numpy(sp.y_test)
    t0 = time.perf_counter()

    def log(ep: int, predict) -> None:  # type: ignore[no-untyped-def]
        if ep % a.every == 0 or ep == a.epochs:
            z = predict(xte)
            acc = ((z > 0).long() == yte).float().mean(1)
            sat = (torch.sigmoid(z) == 1).float().mean(1)
            print(
                f"epoch {ep}: test acc {[round(100 * v, 2) for v in acc.tolist()]} "
                f"saturated {[round(v, 3) for v in sat.tolist()]} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )

    train_group(
        s.arch,
        list(range(a.seeds)),
        torch.from_numpy(sp.x_train),
        torch.from_numpy(sp.y_train),
        s.recipe,
        epochs=a.epochs,
        progress=False,
        on_epoch=log,
    )


if __name__ == "__main__":
    main()
