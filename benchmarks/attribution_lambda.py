"""How the LDS of ``tangentlens.attribute`` depends on its ridge λ = s·tr(K)/N (the default s = 0.1).

Same settings, models and retrained subsets as ``attribution_lds.py`` (digits MLP and CNN, N = 1,500,
200 targets, 100 half-size subsets; the subsets' outputs are read from that benchmark's cache folder, or
trained into it). For each scale s the exact attribution of 1 and 5 models is scored by LDS.

    python benchmarks/attribution_lambda.py              # after (or instead of) attribution_lds.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import tangentlens as tl
import tangentlens.attribution as attribution

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_lds import N_MODELS, as_np, load_digits_split, logits_of, train_model  # noqa: E402

SCALES = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="mlp,cnn")
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "tangentlens_lds_cache"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for arch in args.settings.split(","):
        sweep(arch, args)


def sweep(arch: str, args: argparse.Namespace) -> None:
    """Print LDS (1 and 5 models) of the exact attribution for every scale in ``SCALES``."""
    default = attribution.DEFAULT_LAM_SCALE
    Xtr_np, ytr_np, Xte_np, yte_np = load_digits_split(args.n_train, args.n_test, args.seed)
    Xtr, ytr = torch.from_numpy(Xtr_np), torch.from_numpy(ytr_np)
    Xte, yte = torch.from_numpy(Xte_np), torch.from_numpy(yte_np)
    N, T = Xtr.shape[0], Xte.shape[0]
    models = [train_model(arch, Xtr, ytr, 1000 + k) for k in range(N_MODELS)]
    cache = Path(args.cache_dir) / f"{arch}_N{N}_T{T}_M{args.subsets}_s{args.seed}"
    runs = tl.SubsetRetrainer(
        lambda idx, seed: train_model(arch, Xtr[idx], ytr[idx], seed),
        lambda m: tl.margins(logits_of(m, Xte), yte),
        N, args.subsets, alpha=0.5, seed=args.seed, cache_dir=cache, progress=False).run()
    print(f"\n{arch}: N = {N}, T = {T}, M = {args.subsets} ({runs.n_loaded} subsets loaded, "
          f"{runs.n_trained} trained)")
    print(f"{'s (λ = s·tr(K)/N)':>18}  {'LDS 1 model':>14}  {'LDS 5 models':>14}")
    try:
        for s in SCALES:
            attribution.DEFAULT_LAM_SCALE = s
            out = []
            for k in (1, N_MODELS):
                S = tl.attribute(models[0] if k == 1 else models[:k], Xtr, Xte, labels=ytr, test_labels=yte)
                r = tl.lds(as_np(S), runs.masks, runs.outputs, seed=args.seed)
                out.append(f"{r.mean:.3f} ± {r.se:.3f}")
            mark = "  (default)" if np.isclose(s, default) else ""
            print(f"{s:>18g}  {out[0]:>14}  {out[1]:>14}{mark}", flush=True)
    finally:
        attribution.DEFAULT_LAM_SCALE = default

if __name__ == "__main__":
    main()
