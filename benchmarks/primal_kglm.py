"""Primal vs dual kGLM: the same surrogate fitted from N x D feature rows without the N x N kernel.

Each mode runs in its own process (peak RSS per mode), one BLAS thread. Unit-norm random features with a
common mean direction (as NTK features have) and noisy labels of a random linear teacher.

    python benchmarks/primal_kglm.py                       # N = 20,000, D = 512, C = 10: both modes
    python benchmarks/primal_kglm.py --n 4000 --d 256      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import numpy as np  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(mode: str, N: int, D: int, C: int) -> dict[str, float | str | int]:
    from threadpoolctl import threadpool_limits

    from tangentlens.surrogate import KernelSurrogate, PrimalKernelSurrogate

    rng = np.random.default_rng(0)
    Phi = rng.normal(size=(N, D)) + 0.5
    Phi /= np.linalg.norm(Phi, axis=1, keepdims=True)
    y = np.argmax(Phi @ rng.normal(size=(D, C)) * 20 + rng.gumbel(size=(N, C)), axis=1)
    base = _rss_mb()
    out: dict[str, float | str | int] = {"mode": mode}
    with threadpool_limits(1):
        t0 = time.perf_counter()
        if mode == "dual":
            K = Phi @ Phi.T
            out["form_K_s"] = round(time.perf_counter() - t0, 2)
            m = KernelSurrogate(solver="lbfgs").fit(K, y)
            W = m.class_coef_
        else:
            m = PrimalKernelSurrogate().fit(Phi, y)
            W = m.class_coef_
        out["total_s"] = round(time.perf_counter() - t0, 2)
    out["n_iter"] = int(np.max(m.n_iter_))
    out["peak_over_baseline_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    out["W_checksum"] = float(np.abs(W).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--c", type=int, default=10)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.n, a.d, a.c)))
        return
    res = {}
    for mode in ("primal", "dual"):
        p = subprocess.run([sys.executable, __file__, "--one", mode, "--n", str(a.n), "--d", str(a.d),
                            "--c", str(a.c)], capture_output=True, text=True, check=True)
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        print(res[mode], flush=True)
    pr, du = res["primal"], res["dual"]
    print(f"N={a.n} D={a.d} C={a.c}: primal {pr['total_s']} s / {pr['peak_over_baseline_mb']} MB, "
          f"dual (K + fit) {du['total_s']} s / {du['peak_over_baseline_mb']} MB: "
          f"{du['total_s'] / pr['total_s']:.1f}x time, "
          f"{du['peak_over_baseline_mb'] / max(pr['peak_over_baseline_mb'], 1):.0f}x memory")


if __name__ == "__main__":
    main()
