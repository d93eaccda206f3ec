r"""Counterfactual attribution measured by the linear datamodeling score, against TRAK 0.3.2 (issue 14).

One process, side by side, on two CPU settings built from scikit-learn's bundled digits (8×8 images,
10 classes; standardized; a seeded split into N training points and T test targets):

* ``mlp``: a 64-128-128-10 ReLU MLP;
* ``cnn``: a small CNN (conv 1→16, conv 16→32, 2×2 max-pool, linear 512→10).

Every model is trained by the same recipe (Adam, minibatches, a fixed number of epochs, seeded).
For each setting:

1. five independently seeded models are trained on the full training set (the ensembles);
2. the LDS ground truth: :class:`tangentlens.SubsetRetrainer` (cache folder, resumable) trains one
   model on each of M seeded α = 0.5 subsets and records TRAK's margin of every target
   (:func:`tangentlens.margins`, true labels);
3. attributions, each timed (wall clock, the thread count printed in the header):

   - ``tangentlens.attribute`` exact kernel form, defaults (λ = tr(K)/N), 1 model and 5 models;
   - ``tangentlens.attribute(..., projection=Projection(D))`` (primal form), 1 and 5 models;
   - TRAK 0.3.2 (``TRAKer``, its CPU ``BasicProjector``, ``lambda_reg=0``, half precision as shipped)
     with ``proj_dim=512`` (its default 2048 exceeds N here, which with ``lambda_reg=0`` makes the
     scores noise, see the anchors) and ``traker.projector.model_id = -1`` before every
     ``start_scoring_checkpoint`` (TRAK's single-block projector otherwise loses its matrix), 1 and 5
     models;
   - Grad-Dot (TracIn at the last checkpoint): loss-gradient dot products ∇ℓ(x)·∇ℓ(z_i) of model 0
     (``kind="gradcos"``, unnormalized);
   - kGLM contributions W[c, i]·K(x, x_i) of the target's class c (``KernelSurrogate`` with its defaults
     on model 0's trNTK, :func:`tangentlens.kglm_contributions`);
   - the label sign (+1 same class as the target, −1 otherwise);

4. LDS ± SE (over targets) of each, and the ratios tangentlens / TRAK (LDS and time).

Mislabel detection (``--mislabel``, on the ``mlp`` setting): 10% of the training labels are flipped to a
random other class, one model is trained on the noisy labels, and the training points are ranked by

* tangentlens self-influence τ(z_i, z_i) = [K(K + λI)⁻¹]_ii · q_i, the diagonal of
  ``attribute(model, train, train)`` (margin kernel of the noisy labels, default λ): the leverage of
  z_i in the ridge regression on margin gradients times q_i = 1 − p_{y_i}(x_i);
* kGLM coefficient magnitude ‖W[:, i]‖₂ (``KernelSurrogate`` on the trNTK, noisy labels);
* TRAK self-influence: the diagonal of TRAK's scores of the training set against itself (same TRAK
  settings as above);
* and, for reference, the model's own loss-like score q_i = 1 − p_{y_i}(x_i);

and the ROC AUC of each ranking for finding the flipped points is reported.

Run: ``.venv/bin/python benchmarks/attribution_lds.py [--trak-fp32] [--quick] [--json out.json]``
(``--trak-fp32`` adds TRAK with ``use_half_precision=False``, its only change; results and the commands
used are in benchmarks/RESULTS.md, "Counterfactual attribution: LDS against TRAK (issue 14)").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import tangentlens as tl

N_MODELS = 5


# --------------------------------------------------------------------------------------------------
# data and models
# --------------------------------------------------------------------------------------------------
def load_digits_split(n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16.0
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 0.1
    X = (X - mu) / sd
    return X[tr], y[tr].astype(np.int64), X[te], y[te].astype(np.int64)


def make_model(arch: str) -> nn.Module:
    if arch == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    if arch == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10),
        )
    raise ValueError(arch)


EPOCHS = {"mlp": 40, "cnn": 20}


def train_model(arch: str, X: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """The recipe: Adam lr 3e-3, weight decay 1e-4, batch 64, fixed epochs, seeded."""
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    model = make_model(arch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    n = X.shape[0]
    model.train()
    for _ in range(EPOCHS[arch]):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 64):
            idx = perm[s:s + 64]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


def logits_of(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


# --------------------------------------------------------------------------------------------------
# TRAK
# --------------------------------------------------------------------------------------------------
def trak_scores(models: list[nn.Module], Xtr: torch.Tensor, ytr: torch.Tensor, Xte: torch.Tensor,
                yte: torch.Tensor, proj_dim: int, batch: int = 100, half: bool = True) -> np.ndarray:
    """TRAK 0.3.2 scores (T, N): TRAKer on CPU, its BasicProjector, lambda_reg=0, half precision
    (``half=False``: ``use_half_precision=False``, everything else unchanged)."""
    import logging

    from trak import TRAKer

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traker = TRAKer(model=models[0], task="image_classification", train_set_size=Xtr.shape[0],
                        save_dir=d, device="cpu", proj_dim=proj_dim, logging_level=logging.ERROR,
                        use_half_precision=half)
        for mid, m in enumerate(models):
            traker.load_checkpoint(m.state_dict(), model_id=mid)
            for s in range(0, Xtr.shape[0], batch):
                xb, yb = Xtr[s:s + batch], ytr[s:s + batch]
                traker.featurize(batch=(xb, yb), num_samples=xb.shape[0])
        traker.finalize_features()
        for mid, m in enumerate(models):
            traker.projector.model_id = -1  # anchors: the single-block projector loses its matrix
            traker.start_scoring_checkpoint(exp_name="lds", checkpoint=m.state_dict(), model_id=mid,
                                            num_targets=Xte.shape[0])
            for s in range(0, Xte.shape[0], batch):
                xb, yb = Xte[s:s + batch], yte[s:s + batch]
                traker.score(batch=(xb, yb), num_samples=xb.shape[0])
        S = np.array(traker.finalize_scores(exp_name="lds"), dtype=np.float64)
    return S.T  # TRAK stores (N, T)


# --------------------------------------------------------------------------------------------------
# one setting
# --------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def as_np(S: Any) -> np.ndarray:
    if isinstance(S, torch.Tensor):
        return S.detach().cpu().numpy().astype(np.float64)
    return np.asarray(S, dtype=np.float64)


def run_setting(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    Xtr_np, ytr_np, Xte_np, yte_np = load_digits_split(args.n_train, args.n_test, args.seed)
    Xtr, ytr = torch.from_numpy(Xtr_np), torch.from_numpy(ytr_np)
    Xte, yte = torch.from_numpy(Xte_np), torch.from_numpy(yte_np)
    N, T = Xtr.shape[0], Xte.shape[0]
    print(f"\n== setting {arch}: N = {N} training points, T = {T} targets, M = {args.subsets} subsets "
          f"(α = 0.5), {N_MODELS} models, params = {sum(p.numel() for p in make_model(arch).parameters())}",
          flush=True)

    models, t_train = timed(lambda: [train_model(arch, Xtr, ytr, 1000 + k) for k in range(N_MODELS)])
    accs = [float((logits_of(m, Xte).argmax(1) == yte).float().mean()) for m in models]
    print(f"  trained {N_MODELS} full models in {t_train:.1f} s; test accuracy "
          f"{np.mean(accs):.3f} (min {min(accs):.3f})", flush=True)

    cache = Path(args.cache_dir) / f"{arch}_N{N}_T{T}_M{args.subsets}_s{args.seed}"
    retr = tl.SubsetRetrainer(
        lambda idx, seed: train_model(arch, Xtr[idx], ytr[idx], seed),
        lambda m: tl.margins(logits_of(m, Xte), yte),
        N, args.subsets, alpha=0.5, seed=args.seed, cache_dir=cache, progress=not args.no_progress)
    runs, t_retrain = timed(retr.run)
    print(f"  LDS ground truth: {runs.n_trained} subsets trained, {runs.n_loaded} loaded from {cache} "
          f"({t_retrain:.1f} s)", flush=True)

    rows: list[dict[str, Any]] = []

    def add(name: str, n_models: int | None, S: np.ndarray, secs: float | None, note: str = "") -> None:
        r = tl.lds(S, runs.masks, runs.outputs, seed=args.seed)
        rows.append(dict(name=name, models=n_models, lds=r.mean, se=r.se, ci=[r.ci_low, r.ci_high],
                         n_used=r.n_used, time_s=secs, note=note))
        ts = "—" if secs is None else f"{secs:.2f} s"
        print(f"  {name:<40} {str(n_models or '—'):>3}  LDS {r.mean:.3f} ± {r.se:.3f}  time {ts}", flush=True)

    proj = lambda: tl.Projection(args.proj_dim, kind=args.proj_kind, seed=0)  # noqa: E731
    def ens(k: int) -> nn.Module | list[nn.Module]:
        return models[0] if k == 1 else models[:k]

    for k in (1, N_MODELS):
        S, t = timed(lambda k=k: tl.attribute(ens(k), Xtr, Xte, labels=ytr, test_labels=yte))
        add("tangentlens.attribute exact", k, as_np(S), t)
    for k in (1, N_MODELS):
        S, t = timed(lambda k=k: tl.attribute(ens(k), Xtr, Xte, labels=ytr, test_labels=yte,
                                              projection=proj()))
        add(f"tangentlens.attribute {args.proj_kind} D={args.proj_dim}", k, as_np(S), t)
    if not args.no_trak:
        for k in (1, N_MODELS):
            S, t = timed(lambda k=k: trak_scores(models[:k], Xtr, ytr, Xte, yte, args.trak_proj_dim))
            add(f"TRAK 0.3.2 (proj_dim {args.trak_proj_dim}, CPU)", k, S, t)
        if args.trak_fp32:
            for k in (1, N_MODELS):
                S, t = timed(lambda k=k: trak_scores(models[:k], Xtr, ytr, Xte, yte, args.trak_proj_dim,
                                                     half=False))
                add(f"TRAK 0.3.2 float32 (proj_dim {args.trak_proj_dim}, CPU)", k, S, t)
    with warnings.catch_warnings():  # the true-label warning concerns surrogates, not Grad-Dot
        warnings.simplefilter("ignore")
        Kg, t = timed(lambda: tl.train_test_kernels(models[0], Xtr, Xte, kind="gradcos", normalize=False,
                                                    labels=ytr, test_labels=yte)[1])
    add("Grad-Dot (loss gradients, model 0)", 1, as_np(Kg), t)

    def kglm() -> torch.Tensor:
        K, Kt = tl.train_test_kernels(models[0], Xtr, Xte, kind="trntk")
        sur = tl.KernelSurrogate().fit(as_np(K), ytr_np)
        return tl.kglm_contributions(sur, as_np(Kt), target=yte_np)

    S, t = timed(kglm)
    add("kGLM contributions (trNTK, labels)", 1, as_np(S), t)
    add("label sign (+1 same class, −1 other)", None,
        np.where(yte_np[:, None] == ytr_np[None, :], 1.0, -1.0), None)
    return dict(arch=arch, N=N, T=T, M=args.subsets, test_accuracy=accs, train_full_s=t_train,
                retrain_s=t_retrain, n_trained=runs.n_trained, n_loaded=runs.n_loaded, rows=rows)


# --------------------------------------------------------------------------------------------------
# mislabel detection
# --------------------------------------------------------------------------------------------------
def run_mislabel(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    Xtr_np, ytr_np, _, _ = load_digits_split(args.n_train, args.n_test, args.seed)
    N = len(ytr_np)
    rng = np.random.default_rng(args.seed + 7)
    flipped = np.zeros(N, bool)
    flipped[rng.choice(N, size=N // 10, replace=False)] = True
    noisy = ytr_np.copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, size=int(flipped.sum()))) % 10
    Xtr, yn = torch.from_numpy(Xtr_np), torch.from_numpy(noisy)
    model = train_model(arch, Xtr, yn, 2024)
    train_acc_noisy = float((logits_of(model, Xtr).argmax(1) == yn).float().mean())
    print(f"\n== mislabel detection ({arch}): {int(flipped.sum())} of {N} labels flipped; the model fits "
          f"{train_acc_noisy:.3f} of the noisy labels", flush=True)
    out: dict[str, Any] = dict(arch=arch, N=N, n_flipped=int(flipped.sum()), train_acc_noisy=train_acc_noisy,
                               rows=[])

    def add(name: str, score: np.ndarray, secs: float | None) -> None:
        auc = float(roc_auc_score(flipped, score))
        out["rows"].append(dict(name=name, auc=auc, time_s=secs))
        ts = "—" if secs is None else f"{secs:.2f} s"
        print(f"  {name:<52} AUC {auc:.3f}  time {ts}", flush=True)

    S, t = timed(lambda: tl.attribute(model, Xtr, Xtr, labels=yn, test_labels=yn))
    add("tangentlens self-influence [K(K+λI)⁻¹]_ii·q_i", np.diag(as_np(S)), t)

    def kglm_w() -> np.ndarray:
        K = tl.kernel(model, Xtr, kind="trntk")
        sur = tl.KernelSurrogate().fit(as_np(K), noisy)
        return np.linalg.norm(np.asarray(sur.class_coef_, dtype=np.float64), axis=0)

    w, t = timed(kglm_w)
    add("kGLM coefficient magnitude ‖W[:, i]‖", w, t)
    if not args.no_trak:
        S, t = timed(lambda: trak_scores([model], Xtr, yn, Xtr, yn, args.trak_proj_dim))
        add(f"TRAK self-influence (proj_dim {args.trak_proj_dim}, diagonal)", np.diag(S), t)
        if args.trak_fp32:
            S, t = timed(lambda: trak_scores([model], Xtr, yn, Xtr, yn, args.trak_proj_dim, half=False))
            add(f"TRAK float32 self-influence (proj_dim {args.trak_proj_dim})", np.diag(S), t)
    p = torch.softmax(logits_of(model, Xtr).double(), 1).gather(1, yn[:, None])[:, 0].numpy()
    add("reference: q_i = 1 − p_{y_i}(x_i) (the model's loss)", 1 - p, None)
    return out


# --------------------------------------------------------------------------------------------------
def summary(settings: list[dict[str, Any]]) -> list[str]:
    lines = []
    for st in settings:
        by = {(r["name"].split(" ")[0] + (" proj" if "D=" in r["name"] else "")
               + (" fp32" if "float32" in r["name"] else ""), r["models"]): r for r in st["rows"]}
        lines.append(f"\n{st['arch']} (N = {st['N']}, T = {st['T']}, M = {st['M']}):")
        lines.append(f"  {'attribution':<42} {'LDS, 1 model':>18} {'LDS, 5 models':>18} {'time 1':>8} "
                     f"{'time 5':>8}")
        names = list(dict.fromkeys(r["name"] for r in st["rows"]))
        for nm in names:
            r1 = next((r for r in st["rows"] if r["name"] == nm and r["models"] in (1, None)), None)
            r5 = next((r for r in st["rows"] if r["name"] == nm and r["models"] == N_MODELS), None)

            def cell(r: dict[str, Any] | None) -> str:
                return "—" if r is None else f"{r['lds']:.3f} ± {r['se']:.3f}"

            def tm(r: dict[str, Any] | None) -> str:
                return "—" if r is None or r["time_s"] is None else f"{r['time_s']:.2f}s"

            lines.append(f"  {nm:<42} {cell(r1):>18} {cell(r5):>18} {tm(r1):>8} {tm(r5):>8}")
        ex1, ex5 = by.get(("tangentlens.attribute", 1)), by.get(("tangentlens.attribute", N_MODELS))
        tr1, tr5 = by.get(("TRAK", 1)), by.get(("TRAK", N_MODELS))
        if ex1 and tr1 and ex5 and tr5:
            ok1 = ex1["lds"] >= 1.3 * tr1["lds"]
            ok5 = ex5["lds"] >= 1.1 * tr5["lds"]
            okt = ex1["time_s"] <= tr1["time_s"] and ex5["time_s"] <= tr5["time_s"]
            st["targets"] = dict(ratio_1=ex1["lds"] / tr1["lds"], ratio_5=ex5["lds"] / tr5["lds"],
                                 time_ratio_1=tr1["time_s"] / ex1["time_s"],
                                 time_ratio_5=tr5["time_s"] / ex5["time_s"], met_1=ok1, met_5=ok5,
                                 met_time=okt)
            lines.append(f"  exact/TRAK LDS: 1 model ×{ex1['lds'] / tr1['lds']:.2f} (target ≥ 1.3: "
                         f"{'met' if ok1 else 'MISSED'}), 5 models ×{ex5['lds'] / tr5['lds']:.2f} (target "
                         f"≥ 1.1: {'met' if ok5 else 'MISSED'}); TRAK time / exact time: "
                         f"1 model ×{tr1['time_s'] / ex1['time_s']:.1f}, "
                         f"5 models ×{tr5['time_s'] / ex5['time_s']:.1f}"
                         f" ({'met' if okt else 'MISSED'})")
            f1, f5 = by.get(("TRAK fp32", 1)), by.get(("TRAK fp32", N_MODELS))
            if f1 and f5:
                st["targets_vs_fp32"] = dict(ratio_1=ex1["lds"] / f1["lds"], ratio_5=ex5["lds"] / f5["lds"],
                                             time_ratio_1=f1["time_s"] / ex1["time_s"],
                                             time_ratio_5=f5["time_s"] / ex5["time_s"])
                lines.append(f"  exact/TRAK float32 LDS: 1 model ×{ex1['lds'] / f1['lds']:.2f}, 5 models "
                             f"×{ex5['lds'] / f5['lds']:.2f}; TRAK float32 time / exact time: "
                             f"×{f1['time_s'] / ex1['time_s']:.1f}, ×{f5['time_s'] / ex5['time_s']:.1f}")
            pj1 = by.get(("tangentlens.attribute proj", 1))
            pj5 = by.get(("tangentlens.attribute proj", N_MODELS))
            if pj1 and pj5:
                lines.append(f"  projected/TRAK LDS: 1 model ×{pj1['lds'] / tr1['lds']:.2f}, 5 models "
                             f"×{pj5['lds'] / tr5['lds']:.2f}; TRAK time / projected time: "
                             f"×{tr1['time_s'] / pj1['time_s']:.1f}, ×{tr5['time_s'] / pj5['time_s']:.1f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (N 600, T 60, M 16): a smoke run")
    ap.add_argument("--settings", default="mlp,cnn")
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--proj-kind", default="sjlt")
    ap.add_argument("--trak-proj-dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "tangentlens_lds_cache"))
    ap.add_argument("--no-trak", action="store_true")
    ap.add_argument("--trak-fp32", action="store_true",
                    help="also TRAK with use_half_precision=False (its only change)")
    ap.add_argument("--no-mislabel", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.subsets = 600, 60, 16
        args.trak_proj_dim = min(args.trak_proj_dim, 256)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"attribution_lds: torch {torch.__version__}, {args.threads} thread(s), "
          f"{platform.processor() or 'cpu'}, "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    settings = [run_setting(a, args) for a in args.settings.split(",") if a]
    mis = None if args.no_mislabel else run_mislabel("mlp", args)
    lines = summary(settings)
    print("\n".join(lines))
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s; load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        def clean(o: Any) -> Any:
            if isinstance(o, float) and not math.isfinite(o):
                return None
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, list):
                return [clean(v) for v in o]
            if isinstance(o, (np.floating, np.integer, np.bool_)):
                return o.item()
            return o

        Path(args.json).write_text(json.dumps(clean(dict(
            args=vars(args), torch=torch.__version__, threads=args.threads, total_s=total,
            settings=settings, mislabel=mis)), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
