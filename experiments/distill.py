"""Distilled surrogates on the trained models of a protocol run: how faithful can a kernel machine on the
exact trNTK be when it is fit to the network's own outputs?

For each seed of ``--run`` (a directory written by ``protocol.py``, any setting), reload the trained model,
recompute the exact trNTK blocks and fit
* ``ridge``: kernel ridge regression on the network's logits (``KernelRidgeSurrogate``, alpha 1e-3);
* ``lbfgs-1e-6``: the multinomial kGLM on the network's soft outputs, alpha 1e-6 (first ``--lbfgs-seeds``),
and score τ in the reference's mode (class-1 probability, network-saturated points dropped).

    python experiments/distill.py --run experiments/out/mnist2-mlp-ref-20 --seeds 20 --lbfgs-seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from protocol import binary_scores, load_split  # noqa: E402

from models import SETTINGS, CenteredModel, make_model, predict_logits  # noqa: E402
from tangentlens import (  # noqa: E402
    KernelRidgeSurrogate,
    KernelSurrogate,
    aggregate,
    faithfulness,
    train_test_kernels,
)
from tangentlens.faithfulness import format_mean_se  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--lbfgs-seeds", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = json.loads((a.run / "config.json").read_text())
    setting = SETTINGS[cfg["setting"]]
    split = load_split(setting.data, a.data, None, None)
    xtr, xte = torch.from_numpy(split.x_train), torch.from_numpy(split.x_test)
    results: dict[str, list] = {"ridge": [], "lbfgs-1e-6": []}
    for seed in range(a.seeds):
        m = make_model(setting.arch, seed)
        m.load_state_dict(torch.load(a.run / f"seed_{seed:04d}_model.pt"))
        m.eval()
        if cfg.get("centered_eval") == "centered":  # as protocol.py scored it
            m = CenteredModel(m, make_model(setting.arch, seed).eval()).eval()
        ntr = predict_logits(m, xtr).numpy().astype(np.float64)
        nte = predict_logits(m, xte).numpy().astype(np.float32)
        bs = 1000 if setting.arch == "mlp" else 256
        Ktr, Kte = (k.numpy() for k in train_test_kernels(m, xtr, xte, kind="trntk", batch_size=bs))
        fits = [("ridge", KernelRidgeSurrogate(alpha=1e-3), np.stack([np.zeros_like(ntr), ntr], 1))]
        if seed < a.lbfgs_seeds:
            p = 1 / (1 + np.exp(-ntr))
            fits.append(("lbfgs-1e-6", KernelSurrogate(alpha=1e-6, class_weight=None, max_iter=300, tol=1e-5),
                         np.stack([1 - p, p], 1)))
        for name, est, target in fits:
            t = time.perf_counter()
            est.fit(Ktr, target)
            z = binary_scores(est, Kte)
            r = faithfulness(nte, z, split.y_test, tau_mode="class1", drop_saturated=True)
            results[name].append(r)
            print(f"seed {seed} {name}: tau {r.tau:.3f} TAD {100 * r.tad:+.2f} pp R2 {r.r2:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    print("\n| surrogate | seeds | τ (class-1, ref. mode) | TAD pp | R² |\n|---|---|---|---|---|")
    for name, rs in results.items():
        if not rs:
            continue
        ag = aggregate(rs)
        tau, tad, r2 = ag["tau"], ag["tad"], ag["r2"]
        print(f"| {name} | {len(rs)} | {format_mean_se(tau.mean, tau.se)} | "
              f"{format_mean_se(100 * tad.mean, 100 * tad.se)} | {format_mean_se(r2.mean, r2.se)} |")


if __name__ == "__main__":
    main()
