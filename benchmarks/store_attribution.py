"""Counterfactual attribution streamed from a margin feature store vs the in-memory primal solve.

N random D-dimensional float32 rows in a Zarr store (kind="margin"), T random float64 targets, q uniform.
Each mode runs in its own process (peak RSS per mode, measured from the high-water mark reset after the
setup), one thread:

* ``memory``: the rows loaded whole (``store[:]``, float64) and ``solve_primal`` — the solve that
  ``tl.attribute(..., projection=R)`` runs on its in-memory features;
* ``stream``: ``tl.attribute_from_store`` — G = ΦᵀΦ accumulated block by block, then (T, N) scores;
* ``topk``: ``tl.top_attributions_from_store(k=10)`` — the same, keeping only the running top-k.

The streamed scores are compared with the in-memory ones (relative Frobenius error) and the top-k with
``tl.top_attributions`` of them.

    python benchmarks/store_attribution.py                       # N = 60,000, D = 1,024, T = 100
    python benchmarks/store_attribution.py --n 6000 --d 256      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import numpy as np  # noqa: E402


def _status(field: str) -> float:
    """A /proc/self/status figure in MiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # pragma: no cover - not Linux
        return False


def setup(root: Path, N: int, D: int, T: int, chunk: int) -> None:
    import tangentlens as tl

    if (root / "train" / "zarr.json").exists() and (root / "targets.npy").exists():
        return
    rng = np.random.default_rng(0)
    cfg = tl.KernelConfig(kind="margin")
    tl.FeatureStore.from_array(root / "warm", rng.standard_normal((min(N, 2 * chunk), D), dtype=np.float32),
                               config=cfg, model_id="random", chunk_rows=chunk)
    fs = tl.FeatureStore.create(root / "train", config=cfg, n=N, chunk_rows=chunk,
                                model_fingerprint="id:random", data_fingerprint=f"id:random-{N}x{D}")
    fs.allocate((D,), np.float32)
    for k in fs.pending():
        sl = fs.chunk_slice(k)
        fs.write_chunk(k, rng.standard_normal((sl.stop - sl.start, D), dtype=np.float32))
    fs.finish()
    np.save(root / "targets.npy", rng.standard_normal((T, D)))
    np.save(root / "q.npy", rng.uniform(0.01, 1.0, size=N))


def one(mode: str, root: Path, k: int) -> dict[str, object]:
    import torch

    torch.set_num_threads(1)
    import tangentlens as tl
    from tangentlens.attribution_core import solve_primal

    def run(fs: tl.FeatureStore) -> tuple[torch.Tensor | None, tl.TopAttributions | None]:
        qq = q[: fs.n]
        if mode == "memory":
            F = torch.from_numpy(np.asarray(fs[:], dtype=np.float64))
            out["load_s"] = round(time.perf_counter() - t0, 2)
            return solve_primal(F, torch.from_numpy(Ft), torch.from_numpy(qq), None), None
        if mode == "stream":
            return tl.attribute_from_store(fs, Ft, q=qq), None
        return None, tl.top_attributions_from_store(fs, Ft, q=qq, k=k)

    fs = tl.FeatureStore.open(root / "train")
    Ft, q = np.load(root / "targets.npy"), np.load(root / "q.npy")
    out: dict[str, object] = {"mode": mode, "N": fs.n, "D": fs.row_shape[0], "T": Ft.shape[0]}  # type: ignore[index]
    t0 = time.perf_counter()
    run(tl.FeatureStore.open(root / "warm"))  # warm-up: the code paths (and their pages) on a small store
    base = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    S, top = run(fs)
    out["total_s"] = round(time.perf_counter() - t0, 2)
    out["peak_over_baseline_mb"] = round(_status("VmHWM") - base, 1)
    if mode == "memory":
        np.save(root / "scores_memory.npy", S.numpy())  # type: ignore[union-attr]
    else:
        ref = torch.from_numpy(np.load(root / "scores_memory.npy"))
        if S is not None:
            out["rel_err_vs_memory"] = float((S - ref).norm() / ref.norm())
        else:
            assert top is not None
            full = tl.top_attributions(ref, k)
            out["same_topk_sets"] = bool(all(
                set(a) == set(b) for a, b in zip(top.proponents.tolist(), full.proponents.tolist())) and all(
                set(a) == set(b) for a, b in zip(top.opponents.tolist(), full.opponents.tolist())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--t", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=1024, help="rows per store chunk")
    ap.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, Path(a.dir), a.k)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.dir) if a.dir else Path(tmp)
        t0 = time.perf_counter()
        setup(root, a.n, a.d, a.t, a.chunk)
        print(f"store of {a.n} x {a.d} float32 rows ready in {time.perf_counter() - t0:.1f} s", flush=True)
        res = {}
        for mode in ("memory", "stream", "topk"):
            p = subprocess.run([sys.executable, __file__, "--one", mode, "--dir", str(root), "--k", str(a.k)],
                               capture_output=True, text=True, check=True)
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
            print(res[mode], flush=True)
    m, s, k = res["memory"], res["stream"], res["topk"]
    full_mb = a.t * a.n * 8 / 2**20
    print(f"N={a.n} D={a.d} T={a.t}, one thread: in memory {m['total_s']} s / {m['peak_over_baseline_mb']} "
          f"MB (load {m['load_s']} s); streamed {s['total_s']} s / {s['peak_over_baseline_mb']} MB (rel. err "
          f"{s['rel_err_vs_memory']:.1e}); top-{a.k} {k['total_s']} s / {k['peak_over_baseline_mb']} MB "
          f"(same sets: {k['same_topk_sets']}); the (T, N) scores alone are {full_mb:.0f} MB")


if __name__ == "__main__":
    main()
