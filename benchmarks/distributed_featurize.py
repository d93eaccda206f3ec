"""Distributed featurization on dask.distributed: the same feature store from one process and from a
LocalCluster with 1 and 2 worker processes (one thread each), wall times, the 2-vs-1-worker speed-up
(issue 15's target: >= 1.6x) and a byte-for-byte comparison of the stores.

The model is the LeNet-style ``small_cnn()`` of benchmarks/exact_kernel.py (80k parameters), the kernel
proj-pNTK (``kind="pntk", normalize=True``) with a folded Kronecker projection to K = 1,024 (as
benchmarks/store_scale.py), the data N random 28x28 images. The workers rebuild the model from a
``tl.ModelRecipe(small_cnn)``. Each cluster is started and warmed up (imports and a first featurization of
8 images on every worker, as on a cluster that has served a job before) before the clock starts; that time
is printed apart. Every timed run includes the client's data fingerprint, the chunks' transfer to the
workers, and each worker's model build, plan and first-block checks.

    python benchmarks/distributed_featurize.py --glibc-malloc  # N = 20,000 (about 2 minutes on 2 cores)
    python benchmarks/distributed_featurize.py                 # with Dask's MALLOC_TRIM_THRESHOLD_=65536
    python benchmarks/distributed_featurize.py --n 2000        # quick
    python benchmarks/distributed_featurize.py --glibc-malloc --data-recipe  # workers build the images

With ``--data-recipe`` the data are a ``tl.DataRecipe`` (the same seeded images built by every worker), so
only chunk index ranges travel, against chunks of images sent from the client by default.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from exact_kernel import small_cnn  # the LeNet-style CNN (importable on the workers: same sys.path)

import tangentlens as tl
from tangentlens.store import FeatureStore, ModelRecipe, featurize


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def options(args: argparse.Namespace) -> dict:
    extra = {"fold": True} if args.proj_kind == "kronecker" else {}
    return dict(kind="pntk", normalize=True, projection=tl.Projection(args.dim, kind=args.proj_kind, seed=0,
                                                                      **extra))


def warm_up(dim: int, proj_kind: str) -> None:
    """What a long-running cluster has done before: the imports (torch, tangentlens, zarr) and a first
    featurization of a few images."""
    import zarr  # noqa: F401 - imported by the first store write

    args = argparse.Namespace(dim=dim, proj_kind=proj_kind)
    tl.features(small_cnn(), images(8), **options(args))


def same_bytes(a: FeatureStore, b: FeatureStore) -> bool:
    def eq(x: np.ndarray, y: np.ndarray) -> bool:
        return (x.dtype == y.dtype and x.shape == y.shape
                and np.array_equal(x.view(np.uint8), y.view(np.uint8)))

    keys = ("config_fingerprint", "model_fingerprint", "data_fingerprint", "block_size", "row_shape", "dtype")
    return (eq(np.asarray(a[:]), np.asarray(b[:])) and eq(np.asarray(a.sqnorms[:]), np.asarray(b.sqnorms[:]))
            and all(a.manifest[k] == b.manifest[k] for k in keys))


def on_cluster(workers: int, x: torch.Tensor, root: Path, args: argparse.Namespace) -> dict:
    import dask
    from distributed import Client, LocalCluster

    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap threshold: every
    # large buffer of a capture is then fresh memory (page faults). --glibc-malloc unsets it.
    env = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None} if args.glibc_malloc else {}
    t0 = time.perf_counter()
    with dask.config.set(env), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                         worker_dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        client.run(warm_up, args.dim, args.proj_kind)  # imports and first calls on every worker
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = tl.DataRecipe(functools.partial(images, args.n)) if args.data_recipe else x
        fs = featurize(ModelRecipe(small_cnn), data, root / f"workers-{workers}", chunk_rows=args.chunk_rows,
                       scheduler=client, **options(args))
        seconds = time.perf_counter() - t0
    return {"workers": workers, "seconds": seconds, "cluster_start_s": start, "block_size": fs.block_size,
            "store": fs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--proj-kind", default="kronecker")
    ap.add_argument("--chunk-rows", type=int, default=256)
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="start the workers without Dask's MALLOC_TRIM_THRESHOLD_=65536 (glibc's defaults, "
                    "as in the single process)")
    ap.add_argument("--data-recipe", action="store_true",
                    help="the workers build the images from a tl.DataRecipe instead of receiving chunks")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="tl-dist-"))
    for sub in ("single", "workers-1", "workers-2"):
        shutil.rmtree(root / sub, ignore_errors=True)
    x = images(args.n)
    try:
        t0 = time.perf_counter()
        single = featurize(small_cnn(), x, root / "single", chunk_rows=args.chunk_rows, **options(args))
        t_single = time.perf_counter() - t0
        one, two = on_cluster(1, x, root, args), on_cluster(2, x, root, args)
        rows = [("single process, 1 thread", t_single, None, single.block_size, True)]
        rows += [(f"LocalCluster {r['workers']} worker(s) x 1 thread", r["seconds"], r["cluster_start_s"],
                  r["block_size"], same_bytes(single, r["store"])) for r in (one, two)]
        print(f"N = {args.n}, small_cnn (80k parameters), proj-pNTK {args.proj_kind} K = {args.dim}, "
              f"chunks of {args.chunk_rows} ({single.n_chunks} tasks); load average "
              f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, {platform.machine()}; workers' malloc: "
              f"{'glibc defaults' if args.glibc_malloc else 'Dask default (MALLOC_TRIM_THRESHOLD_=65536)'}; "
              f"data {'built by the workers (DataRecipe)' if args.data_recipe else 'sent from the client'}")
        print(f"{'run':34s} {'wall s':>8s} {'rows/s':>8s} {'start s':>8s} {'block':>6s}  bit-identical")
        for name, sec, start, block, same in rows:
            st = f"{start:8.1f}" if start is not None else f"{'-':>8s}"
            print(f"{name:34s} {sec:8.1f} {args.n / sec:8.0f} {st} {block!s:>6s}  {same}")
        speedup = one["seconds"] / two["seconds"]
        print(f"speed-up 2 vs 1 worker: {speedup:.2f}x (target >= 1.6x); 1 worker vs single process: "
              f"{t_single / one['seconds']:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "n": args.n, "dim": args.dim, "glibc_malloc": args.glibc_malloc, "proj_kind": args.proj_kind,
                "data_recipe": args.data_recipe,
                "chunk_rows": args.chunk_rows,
                "single_s": t_single, "one_worker_s": one["seconds"], "two_workers_s": two["seconds"],
                "speedup_2_vs_1": speedup, "bit_identical": [r[4] for r in rows[1:]],
                "cluster_start_s": [one["cluster_start_s"], two["cluster_start_s"]],
                "load_average": os.getloadavg()}, indent=2) + "\n")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
