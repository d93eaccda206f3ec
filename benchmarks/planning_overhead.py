"""Exact trNTK time of this checkout against an earlier commit (did a change slow the engine down?).

Each library version runs in its own subprocess (the earlier one from ``git archive REV src``), one thread,
the same models and data: the method's MNIST MLP (N = 2,000 and N = 64) and the LeNet-style CNN of
``exact_kernel.py`` (N = 500). Prints the best time of several repeats after warm-up, and the ratio.

    python benchmarks/planning_overhead.py --base a17e9e3 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure() -> dict[str, float]:
    import time

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from exact_kernel import mnist_mlp, small_cnn

    import tangentlens as tl

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = [
        ("mlp N=2000", mnist_mlp(), torch.randn(2000, 1, 28, 28), 3),
        ("cnn N=500", small_cnn(), torch.randn(500, 1, 28, 28), 3),
        ("mlp N=64", mnist_mlp(), torch.randn(64, 1, 28, 28), 20),
    ]
    out = {}
    for name, m, x, reps in cases:
        for _ in range(3):
            tl.kernel(m, x[:64], kind="trntk")
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            tl.kernel(m, x, kind="trntk")
            ts.append(time.perf_counter() - t)
        out[name] = min(ts)
    return out


def run(src: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD~1", help="the earlier commit to compare with")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the versions this many times; keep each case's best (noisy machines)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "src"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        for _ in range(args.rounds):
            for best, src in ((before, Path(tmp) / "src"), (after, ROOT / "src")):
                for k, v in run(src).items():
                    best[k] = min(v, best.get(k, v))
    print(f"{'case':<12} {'base ' + args.base:>16} {'this checkout':>16} {'ratio':>7}")
    for k in before:
        print(f"{k:<12} {before[k] * 1e3:>13.1f} ms {after[k] * 1e3:>13.1f} ms {after[k] / before[k]:>6.2f}x")


if __name__ == "__main__":
    main()
