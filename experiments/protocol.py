"""The method's faithfulness protocol on MNIST2 / FMNIST2 (reference architectures, exact trNTK).

For every seed: train the reference model (``experiments/models.py``), compute the exact trace NTK
(train x train and test x train, float32) with :func:`tangentlens.api.kernel`, fit

* the kGLM with the reference settings (``KernelSurrogate(solver="sgd", alpha=1e-4,
  class_weight="balanced", random_state=seed)`` = scikit-learn ``SGDClassifier(loss="log_loss",
  penalty="l2", ...)``) on the true training labels,
* the kernel SVM baseline ``SVC(kernel="precomputed", probability=True, random_state=seed)`` through
  ``KernelSVMSurrogate(random_state=seed)`` (the same estimator, bit for bit, and still Platt-scaled on a
  scikit-learn without ``SVC(probability=...)``),
* a distilled kGLM (``KernelSurrogate(solver="lbfgs", alpha=1e-4, class_weight=None)``) on the
  network's soft outputs ``[1 - sigmoid(f), sigmoid(f)]`` at the training points,
* a distilled kernel ridge regression on the network's logits (``KernelRidgeSurrogate(alpha=1e-3)``),

and score each surrogate's ``comparison_logits`` (as one class-1 log-odds per point, :func:`binary_scores`)
with :func:`tangentlens.faithfulness.faithfulness` in the reference mode (Kendall τ-b on
the class-1 probability, saturated float32 probabilities dropped) plus the true-class τ, TAD, the
misclassification overlap Γ and its binomial p-value. One JSON per seed (``seed_0007.json``) makes runs
resumable: seeds with a result are skipped, and a group's training state is checkpointed after every
epoch (``group_0000.ckpt``), so a long training run interrupted mid-way continues where it stopped. The
summary (mean ± standard error over seeds, beside the
reference's numbers) is printed and written to ``summary.md``.

Usage::

    python experiments/protocol.py --setting mnist2-mlp --seeds 20 --out experiments/out/mnist2-mlp

``--epochs`` overrides the reference epochs (the CPU budget); the override is recorded in
``config.json`` and the summary, and a run refuses to mix results of different configurations.
"""

from __future__ import annotations

import os

# Single-threaded BLAS: on a shared 2-core machine OpenBLAS's spinning threads made the L-BFGS fit 10x
# slower. Torch threads are set with --threads.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import SETTINGS, CenteredModel, make_model, predict_logits, train_group  # noqa: E402
from tangentlens.api import train_test_kernels  # noqa: E402
from tangentlens.datasets.idx import load_idx_pair  # noqa: E402
from tangentlens.datasets.splits import REFERENCE_SIZES, binary_split  # noqa: E402
from tangentlens.faithfulness import (  # noqa: E402
    aggregate,
    faithfulness,
    format_mean_se,
    misclassification_overlap,
)
from tangentlens.surrogate import KernelRidgeSurrogate, KernelSurrogate, KernelSVMSurrogate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA_DIRS = {"mnist2": "mnist", "fmnist2": "fashion-mnist"}


def load_split(data: str, data_root: Path, n_train: int | None, n_test: int | None):
    """The MNIST2 / FMNIST2 split (optionally with fewer examples per class, for development)."""
    ref_tr, ref_te = REFERENCE_SIZES[data]
    d = data_root / DATA_DIRS[data]
    xtr, ytr = load_idx_pair(d, "train")
    xte, yte = load_idx_pair(d, "test")
    return binary_split(
        xtr, ytr, (0, 1), n_train or ref_tr, n_test or ref_te, test_images=xte, test_labels=yte
    )


def binary_scores(surrogate: Any, K_test: np.ndarray) -> np.ndarray:
    """(n,) class-1 log-odds of a two-class surrogate: the difference of the two columns of its
    ``comparison_logits`` (the scores :mod:`tangentlens.surrogate` compares with a network).

    The decision value ``d`` for the kGLMs (SGD: ``log σ(d) − log σ(−d)``; L-BFGS: ``d/2 − (−d/2)``) and
    for ridge, ``logit(p)`` of the Platt probability ``p`` for the kernel SVM: one score per point, on
    the scale of the one-logit network.
    """
    z = surrogate.comparison_logits(K_test)
    return z[:, 1] - z[:, 0]


def tau_reference_literal(nn_logit: np.ndarray, sur_score: np.ndarray) -> tuple[float, int]:
    """τ exactly as the reference's ``make_no_forward_fit`` computed it.

    ``X = exp(z) / sum(exp(z))`` across the test points (float64, no max-subtraction), ``Y`` the
    network's float32 sigmoid; points with ``Y`` or ``X`` exactly 0 or 1 are dropped; NaN (e.g. when
    ``exp`` overflows) is returned as NaN, and the reference then left that seed out of the mean.
    """
    from scipy.stats import kendalltau

    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        e = np.exp(sur_score.astype(np.float64))
        X = e / e.sum()
    Y = torch.sigmoid(torch.from_numpy(nn_logit.astype(np.float32))).numpy()
    keep = ~((Y == 0) | (Y == 1) | (X == 0) | (X == 1))
    n = int(keep.sum())
    if n < 2:
        return float("nan"), n
    return float(kendalltau(X[keep], Y[keep]).correlation), n


def _scores(nn_test: np.ndarray, sur_logit: np.ndarray, y: np.ndarray) -> dict[str, float]:
    ref = faithfulness(nn_test, sur_logit, y, tau_mode="class1", drop_saturated=True).to_dict()
    tru = faithfulness(nn_test, sur_logit, y, tau_mode="logit")
    out = {k: v for k, v in ref.items() if k != "tau_mode"}
    out["tau_logit"] = tru.tau
    out["tau_ref_literal"], out["n_tau_ref_literal"] = tau_reference_literal(nn_test, sur_logit)
    out["surrogate_logit_absmax"] = float(np.abs(sur_logit).max())
    return out


def run_seed(
    model: torch.nn.Module,
    seed: int,
    split: Any,
    *,
    ksvm: bool,
    batch_size: int,
    distill_max_iter: int = 300,
) -> dict[str, Any]:
    """Kernels, surrogates and metrics of one trained model."""
    xtr = torch.from_numpy(split.x_train)
    xte = torch.from_numpy(split.x_test)
    ytr, yte = split.y_train, split.y_test
    rec: dict[str, Any] = {"seed": seed}
    t = {}

    nn_train = predict_logits(model, xtr).numpy().astype(np.float32)
    nn_test = predict_logits(model, xte).numpy().astype(np.float32)
    rec["nn_train_acc"] = float(((nn_train > 0) == ytr).mean())
    rec["nn_test_acc"] = float(((nn_test > 0) == yte).mean())
    rec["nn_test_saturated"] = float(np.mean(np.isin(1 / (1 + np.exp(-nn_test)), (0.0, 1.0))))

    t0 = time.perf_counter()
    K_tr, K_te = (k.numpy() for k in train_test_kernels(model, xtr, xte, kind="trntk", batch_size=batch_size))
    t["kernels"] = time.perf_counter() - t0  # train x train and test x train, one capture per example

    t0 = time.perf_counter()
    kglm = KernelSurrogate(solver="sgd", alpha=1e-4, class_weight="balanced", random_state=seed)
    kglm.fit(K_tr, ytr)
    z_kglm = binary_scores(kglm, K_te)
    t["kglm"] = time.perf_counter() - t0
    rec["kglm"] = _scores(nn_test, z_kglm, yte)
    rec["kglm"]["train_acc"] = float(kglm.score(K_tr, ytr))

    t0 = time.perf_counter()
    p_tr = 1.0 / (1.0 + np.exp(-nn_train.astype(np.float64)))
    soft = np.stack([1.0 - p_tr, p_tr], axis=1)
    dist = KernelSurrogate(solver="lbfgs", alpha=1e-4, class_weight=None, max_iter=distill_max_iter, tol=1e-5)
    dist.fit(K_tr, soft)
    z_dist = binary_scores(dist, K_te)
    t["distilled"] = time.perf_counter() - t0
    rec["distilled"] = _scores(nn_test, z_dist, yte)

    # the most faithful surrogate measured (distill.py): kernel ridge regression on the network's logits
    t0 = time.perf_counter()
    ridge = KernelRidgeSurrogate(alpha=1e-3).fit(K_tr, np.stack([np.zeros_like(nn_train), nn_train], 1))
    z_ridge = binary_scores(ridge, K_te)
    t["ridge"] = time.perf_counter() - t0
    rec["ridge"] = _scores(nn_test, z_ridge, yte)

    if ksvm:
        t0 = time.perf_counter()
        # the reference's SVC; the surrogate converts the float32 kernels to libsvm's float64 itself
        svm = KernelSVMSurrogate(random_state=seed).fit(K_tr, ytr)
        z_svm = binary_scores(svm, K_te)
        p_svm = svm.predict_proba(K_te)[:, 1]
        pred_svm = svm.predict(K_te)
        t["ksvm"] = time.perf_counter() - t0
        # Platt probabilities can disagree with predict(); accuracy uses predict() as the reference.
        rec["ksvm"] = _scores(nn_test, z_svm, yte)
        rec["ksvm"]["surrogate_acc"] = float((pred_svm == yte).mean())
        rec["ksvm"]["tad"] = rec["ksvm"]["surrogate_acc"] - rec["nn_test_acc"]
        wrong_n, wrong_s = (nn_test > 0) != yte, pred_svm != yte
        g, gp, gf = misclassification_overlap(wrong_n, wrong_s)
        rec["ksvm"].update(gamma=g, gamma_p=gp, gamma_p_fisher=gf, surrogate_errors=int(wrong_s.sum()))
    rec["seconds"] = t
    arrays = {"nn_test": nn_test, "nn_train": nn_train, "kglm": z_kglm, "distilled": z_dist, "ridge": z_ridge}
    if ksvm:
        arrays.update(ksvm_proba=p_svm, ksvm_pred=pred_svm)
    rec["_arrays"] = arrays
    rec["kernel_train_offdiag_mean"] = float((K_tr.sum() - np.trace(K_tr)) / (K_tr.size - len(K_tr)))
    return rec


SURROGATES = ("kglm", "ksvm", "distilled", "ridge")


def summarize(setting: str, rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """Markdown summary: mean(SE) over seeds beside the reference numbers."""
    s = SETTINGS[setting]
    lines = [
        f"### {setting}: {len(rows)} seeds (n_train={config['n_train']}, n_test={config['n_test']})",
        "",
        "Recipe: "
        + ", ".join(f"{k}={v}" for k, v in config["recipe"].items())
        + (" (the reference's)" if config.get("recipe_is_reference") else " (**not** the reference's)"),
        "",
    ]
    nn = aggregate([{"acc": r["nn_test_acc"], "train": r["nn_train_acc"]} for r in rows])
    lines.append(
        f"Network test accuracy {format_mean_se(100 * nn['acc'].mean, 100 * nn['acc'].se)}% "
        f"(reference {100 * s.ref_nn_acc:.2f}%); train accuracy "
        f"{format_mean_se(100 * nn['train'].mean, 100 * nn['train'].se)}%."
    )
    lines += [
        "",
        "| surrogate | τ (class-1, ref. mode) | τ (ref. code literally) | τ (logit) | test acc % | TAD pp "
        "| Γ | p(Γ) | R² | reference τ / acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SURROGATES:
        sub = [r[name] for r in rows if name in r]
        if not sub:
            continue
        a = aggregate(sub)

        def f(key: str, scale: float = 1.0, a: Any = a) -> str:
            m = a[key]
            return format_mean_se(scale * m.mean, scale * m.se) if m.n else "n/a"

        ref = f"{s.ref_tau:.3f} / {100 * s.ref_kglm_acc:.2f}%" if name == "kglm" else ""
        pmed = float(np.nanmedian([x["gamma_p"] for x in sub]))
        lines.append(
            f"| {name} | {f('tau')} | {f('tau_ref_literal')} | {f('tau_logit')} | "
            f"{f('surrogate_acc', 100)} | "
            f"{f('tad', 100)} | {f('gamma')} | median {pmed:.1e} | {f('r2')} | {ref} |"
        )
    keys = set.intersection(*(set(r["seconds"]) for r in rows))  # older rows may lack newer timings
    secs = aggregate([{k: v for k, v in r["seconds"].items() if k in keys} for r in rows])
    lines += [
        "",
        "Mean seconds per seed: "
        + ", ".join(f"{k} {v.mean:.1f}" for k, v in secs.metrics.items())
        + f"; training (per group, vectorized): {config.get('train_seconds_last', float('nan')):.0f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", required=True, choices=sorted(SETTINGS))
    ap.add_argument("--seeds", type=int, default=20, help="number of seeds (models)")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=ROOT / "experiments" / "data")
    ap.add_argument("--epochs", type=int, default=None, help="override the reference epochs")
    ap.add_argument("--lr", type=float, default=None, help="override the reference learning rate")
    ap.add_argument("--train-batch", type=int, default=None, help="override the reference batch (4)")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default=None, help="override the optimizer")
    ap.add_argument("--group-size", type=int, default=10, help="seeds trained together (stacked)")
    ap.add_argument("--n-train-per-class", type=int, default=None, help="development only")
    ap.add_argument("--n-test-per-class", type=int, default=None, help="development only")
    ap.add_argument("--shuffle", choices=("yes", "no"), default=None, help="override the recipe's shuffling")
    ap.add_argument("--no-ksvm", action="store_true", help="skip the kernel SVM baseline")
    ap.add_argument(
        "--centered-eval",
        choices=("centered", "uncentered"),
        default="centered",
        help="for the centered (FMNIST2) recipe: score the trained f - f0 - 0.5 (default) or the "
        "uncentered f, as the reference's script literally does",
    )
    ap.add_argument(
        "--distill-max-iter", type=int, default=300, help="L-BFGS iterations of the distilled kGLM"
    )
    ap.add_argument("--batch-size", type=int, default=256, help="kernel engine block size")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    s = SETTINGS[args.setting]
    split = load_split(s.data, args.data, args.n_train_per_class, args.n_test_per_class)
    epochs = args.epochs if args.epochs is not None else s.recipe.epochs
    over = {
        k: v
        for k, v in (
            ("lr", args.lr),
            ("batch_size", args.train_batch),
            ("optimizer", args.optimizer),
            ("shuffle", None if args.shuffle is None else args.shuffle == "yes"),
        )
        if v is not None
    }
    recipe = replace(s.recipe, epochs=epochs, **over)
    config = {
        "setting": args.setting,
        "epochs": epochs,
        "reference_epochs": s.recipe.epochs,
        "recipe": recipe.__dict__,
        "recipe_is_reference": recipe == s.recipe,
        "n_train": int(len(split.y_train)),
        "n_test": int(len(split.y_test)),
        "group_size": args.group_size,
        "ksvm": not args.no_ksvm,
        "centered_eval": args.centered_eval if recipe.loss == "mse_centered" else None,
        "distill_max_iter": args.distill_max_iter,
        "torch": torch.__version__,
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        keys = ("setting", "recipe", "n_train", "n_test", "group_size", "ksvm", "centered_eval")
        if any(old.get(k) != config[k] for k in keys):
            print(
                f"error: {out} holds results of another configuration ({cfg_path}); pass a different --out.",
                file=sys.stderr,
            )
            return 2
    cfg_path.write_text(json.dumps(config, indent=1))

    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    xtr = torch.from_numpy(split.x_train)
    ytr = torch.from_numpy(split.y_train)
    g = args.group_size
    groups: dict[int, list[int]] = {}
    for sd in seeds:
        groups.setdefault(sd // g, []).append(sd)
    for gi, todo in groups.items():
        todo = [sd for sd in todo if not (out / f"seed_{sd:04d}.json").exists()]
        if not todo:
            continue
        members = list(range(gi * g, gi * g + g))  # fixed groups: results do not depend on --seeds
        print(
            f"training {args.setting} seeds {members[0]}..{members[-1]} ({epochs} epochs)",
            flush=True,
        )
        # per-epoch checkpoint: an interrupted run resumes where it stopped (same models bit for bit)
        models, info = train_group(s.arch, members, xtr, ytr, recipe, checkpoint=out / f"group_{gi:04d}.ckpt")
        config["train_seconds_last"] = info["train_seconds"]
        cfg_path.write_text(json.dumps(config, indent=1))
        for sd in todo:
            t0 = time.perf_counter()
            net = models[members.index(sd)]
            # the trained weights, so new surrogates can be evaluated without retraining
            torch.save(net.state_dict(), out / f"seed_{sd:04d}_model.pt")
            if recipe.loss == "mse_centered" and args.centered_eval == "centered":
                net = CenteredModel(net, make_model(s.arch, sd).eval()).eval()
            rec = run_seed(
                net,
                sd,
                split,
                ksvm=not args.no_ksvm,
                batch_size=args.batch_size,
                distill_max_iter=args.distill_max_iter,
            )
            rec["train_seconds_group"] = info["train_seconds"]
            rec["group"] = members
            rec["seconds"]["total_after_training"] = time.perf_counter() - t0
            # test/train logits, so metrics can be recomputed without retraining
            np.savez_compressed(out / f"seed_{sd:04d}_outputs.npz", **rec.pop("_arrays"))
            (out / f"seed_{sd:04d}.json").write_text(json.dumps(rec, indent=1))
            print(
                f"  seed {sd}: NN {100 * rec['nn_test_acc']:.2f}%  kGLM τ {rec['kglm']['tau']:.3f} "
                f"acc {100 * rec['kglm']['surrogate_acc']:.2f}%  distilled τ "
                f"{rec['distilled']['tau']:.3f}  ({rec['seconds']['total_after_training']:.0f}s)",
                flush=True,
            )

    rows = [
        json.loads((out / f"seed_{sd:04d}.json").read_text())
        for sd in seeds
        if (out / f"seed_{sd:04d}.json").exists()
    ]
    md = summarize(args.setting, rows, config)
    (out / "summary.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
