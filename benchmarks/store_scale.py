"""Larger than memory: featurize N random 28×28 images with a small CNN into a Zarr feature store
(proj-pNTK), write the N×N kernel out of core, spot-check it against direct products of the stored features.

Each stage runs in a fresh subprocess (one thread) so that its peak RSS is its own:

1. ``featurize``: ``tl.featurize(cnn, images, store, kind="pntk", normalize=True, projection=...)``;
2. ``kernel``: ``tl.kernel_from_store(store, out=kernel_store)`` (cosine-normalized, symmetric);
3. ``check``: 100 random entries K[i, j] against ⟨φ_i, φ_j⟩ / (‖φ_i‖‖φ_j‖) in float64 from the stored rows.

    python benchmarks/store_scale.py                      # N = 20,000 (about 2 minutes, 1.6 GB on disk)
    python benchmarks/store_scale.py --n 2000             # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tangentlens as tl
from tangentlens.store import FeatureStore, KernelStore, featurize, kernel_from_store


def small_cnn() -> nn.Module:
    """Two 3×3 convolutions with pooling, two dense layers (106k parameters), seeded, untrained."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def projection(args: argparse.Namespace) -> tl.Projection:
    extra = {"fold": True} if args.proj_kind == "kronecker" else {}
    return tl.Projection(args.dim, kind=args.proj_kind, seed=0, **extra)


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_stages(script: str, names: Sequence[str], passed: list[str], folder: str | None, prefix: str
               ) -> list[dict]:
    """Run each stage ``script --stage NAME --dir ROOT *passed`` in a fresh one-thread process (so that its
    peak RSS is its own), print and return the JSON line each prints last. ``ROOT`` is ``folder``, or a
    temporary folder removed afterwards."""
    root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results = []
    try:
        for name in names:
            cmd = [sys.executable, script, "--stage", name, "--dir", str(root), *passed]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"stage {name} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if not folder:
            shutil.rmtree(root, ignore_errors=True)
    return results


def stage(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    root = Path(args.dir)
    base = _peak()  # after the imports (torch, tangentlens, zarr)
    t0 = time.perf_counter()
    if args.stage == "featurize":
        fs = featurize(small_cnn(), images(args.n), root / "features", kind="pntk", normalize=True,
                       projection=projection(args), chunk_rows=args.chunk_rows)
        out = {"rows": fs.n, "dim": fs.row_shape[-1], "block_size": fs.block_size,
               "disk_bytes": _du(root / "features")}
    elif args.stage == "kernel":
        ks = kernel_from_store(root / "features", out=root / "kernel", block_rows=args.block_rows)
        out = {"shape": list(ks.shape), "disk_bytes": _du(root / "kernel")}
    else:
        fs, ks = FeatureStore.open(root / "features"), KernelStore.open(root / "kernel")
        rng = np.random.default_rng(1)
        i, j = rng.integers(0, fs.n, 100), rng.integers(0, fs.n, 100)
        Fi, Fj = fs.features.get_orthogonal_selection((i,)), fs.features.get_orthogonal_selection((j,))
        Fi, Fj = Fi.astype(np.float64), Fj.astype(np.float64)
        want = (Fi * Fj).sum(1) / np.linalg.norm(Fi, axis=1) / np.linalg.norm(Fj, axis=1)
        want[i == j] = 1.0
        got = ks.entries(i, j).astype(np.float64)
        out = {"entries": 100, "max_abs_error": float(np.abs(got - want).max()),
               "max_rel_error": float((np.abs(got - want) / np.abs(want)).max())}
    out.update(stage=args.stage, seconds=round(time.perf_counter() - t0, 2), peak_rss_bytes=_peak(),
               import_rss_bytes=base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--proj-kind", default="kronecker", help="projection kind (kronecker: two-stage, folded)")
    ap.add_argument("--dim", type=int, default=1024, help="projection dimension K")
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--block-rows", type=int, default=2048)
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder, removed)")
    ap.add_argument("--stage", choices=("featurize", "kernel", "check"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage is not None:
        print(json.dumps(stage(args)))
        return
    passed = ["--n", str(args.n), "--proj-kind", args.proj_kind, "--dim", str(args.dim),
              "--chunk-rows", str(args.chunk_rows), "--block-rows", str(args.block_rows)]
    results = run_stages(__file__, ("featurize", "kernel", "check"), passed, args.dir, "tl-store-scale-")
    print(f"\nN = {args.n:,}, small CNN (106k parameters), proj-pNTK, Projection({args.dim}, "
          f"{args.proj_kind!r}), chunk_rows = {args.chunk_rows}, block_rows = {args.block_rows}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread\n")
    print("| stage | wall time | peak RSS (after imports) | on disk |\n|---|---|---|---|")
    for r in results:
        disk = f"{r['disk_bytes'] / 2**30:.2f} GiB" if "disk_bytes" in r else "—"
        rss = f"{r['peak_rss_bytes'] / 2**20:.0f} MiB ({r['import_rss_bytes'] / 2**20:.0f} MiB)"
        print(f"| {r['stage']} | {r['seconds']:.1f} s | {rss} | {disk} |")
    chk = results[-1]
    print(f"\nspot check: {chk['entries']} entries, max |error| {chk['max_abs_error']:.2e}, "
          f"max relative error {chk['max_rel_error']:.2e}")


if __name__ == "__main__":
    main()
