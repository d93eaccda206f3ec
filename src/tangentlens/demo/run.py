"""The demo as a sequence of steps: data, network, kernels, surrogates, faithfulness, explanations, report.

:func:`run_demo` sets the thread limits and runs :func:`_run`, which calls one function per step; each step
takes what the earlier ones produced and returns plain arrays or small records.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from ..arrays import to_numpy
from ..datasets.digits import DigitsSplit, load_digits_split
from ..errors import InputError
from ..explain import explain
from ..explanation import Explanation
from ..faithfulness import FaithfulnessResult, faithfulness
from ..report import gallery_points, text_table, write_report
from ..surrogate import KernelSurrogate
from ._figures import confidence_scatter, explanation_gallery
from .network import DigitsCNN, train_cnn
from .specs import KERNELS, SURROGATES, KernelSpec, SurrogateSpec
from .words import EXPLANATION_COLUMNS, FAITHFULNESS_COLUMNS, explanation_table, verdict_in_words

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


# --------------------------------------------------------------------------------------------------------
# Configuration and result.
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo`.

    Attributes:
        out: the report folder (created; existing report files are overwritten).
        seed: seeds the split, the network, the surrogates and any projection.
        quick: a smaller run (fewer points and epochs) for tests and smoke checks.
        n_train: training images (default 1,200 of the 1,797; ``quick``: 400).
        n_test: test images (default the other 597; ``quick``: 200).
        epochs: training epochs of the CNN (default 30; ``quick``: 15).
        alpha: L2 strength of the surrogates (the reference's 1e-4).
        gallery_rows: test digits in the gallery.
        top_k: proponents and opponents per gallery row.
        progress: show tqdm progress bars on stderr.
        threads: torch CPU threads during the run (restored afterwards); ``None`` keeps torch's
            setting. The default 1 is the fastest on a small, shared machine (these blocks are too small
            for threads to pay off, and oversubscribed threads stall) and keeps the numbers independent
            of the core count.
    """

    out: Path = Path("tangentlens-report")
    seed: int = 0
    quick: bool = False
    n_train: int | None = None
    n_test: int | None = None
    epochs: int | None = None
    alpha: float = 1e-4
    gallery_rows: int = 4
    top_k: int = 3
    progress: bool = True
    threads: int | None = 1

    def resolved(self) -> DemoConfig:
        """The configuration with the size defaults filled in (they depend on ``quick``)."""
        return replace(
            self,
            out=Path(self.out),
            n_train=self.n_train if self.n_train is not None else (400 if self.quick else 1200),
            n_test=self.n_test if self.n_test is not None else (200 if self.quick else 597),
            epochs=self.epochs if self.epochs is not None else (15 if self.quick else 30),
        )

    def check(self) -> None:
        """Raise :class:`InputError` for settings the demo cannot run with (of a resolved config)."""
        if self.top_k < 1 or self.gallery_rows < 1:
            raise InputError("top_k and gallery_rows must be >= 1.")
        if self.epochs is None or self.epochs < 1:
            raise InputError(f"epochs must be >= 1, got {self.epochs}.")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} exists and is not a folder; choose another path.")


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        rows: the faithfulness table, one dict per (kernel, surrogate).
        table: the same table as fixed-width text.
        index: path of ``index.html``.
        images: paths of the PNG figures.
        meta: configuration, versions and timings written into the report.
        notes: remarks printed under the table (where Γ is undefined, and why).
        verdict: the report's conclusion in plain English (most faithful surrogate, what its τ means,
            coverage and disagreements of its explanations).
        explanation: the :class:`tangentlens.explanation.Explanation` of the network's predicted class on
            every test digit by the most faithful surrogate.
    """

    rows: list[dict[str, Any]]
    table: str
    index: Path
    images: list[Path]
    meta: dict[str, Any]
    notes: list[str]
    verdict: str = ""
    explanation: Explanation | None = None


# --------------------------------------------------------------------------------------------------------
# What the steps hand on.
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Network:
    """The trained network and its logits (float64) on both splits."""

    model: DigitsCNN
    train_logits: np.ndarray
    test_logits: np.ndarray
    accuracy: float


@dataclass(frozen=True)
class _Kernel:
    """One kernel's train x train and test x train blocks, and the seconds they took."""

    spec: KernelSpec
    train: np.ndarray
    test: np.ndarray
    seconds: float


@dataclass(frozen=True)
class _Fit:
    """One surrogate on one kernel: the model, its comparison logits on the test digits, the fit time."""

    kernel: _Kernel
    spec: SurrogateSpec
    surrogate: KernelSurrogate
    test_scores: np.ndarray
    seconds: float


@dataclass(frozen=True)
class _Findings:
    """What the run found: the table and each fit's metrics, the most faithful fit and its explanation."""

    fits: list[_Fit]
    rows: list[dict[str, Any]]
    results: list[FaithfulnessResult]
    best: int  # position of the most faithful fit in ``fits`` and ``rows``
    explanation: Explanation
    gallery: list[int]
    verdict: str
    notes: list[str]

    @property
    def best_row(self) -> dict[str, Any]:
        """The table row of the most faithful surrogate."""
        return self.rows[self.best]


def _bar(items: Sequence[Any], desc: str, unit: str, cfg: DemoConfig) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=not cfg.progress, file=sys.stderr, leave=False)


# --------------------------------------------------------------------------------------------------------
# The steps.
# --------------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - only for third-party code that reads the global state
    torch.use_deterministic_algorithms(True, warn_only=True)


def _load_data(cfg: DemoConfig) -> DigitsSplit:
    """Step 1: the seeded, stratified split of the digits."""
    return load_digits_split(cfg.n_train or 0, cfg.n_test or 0, seed=cfg.seed)


def _train_network(data: DigitsSplit, cfg: DemoConfig) -> _Network:
    """Step 2: train the CNN; its logits on both splits and its test accuracy."""
    model = train_cnn(data, seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress)
    with torch.no_grad():
        train_logits = to_numpy(model(data.x_train), np.float64)
        test_logits = to_numpy(model(data.x_test), np.float64)
    accuracy = float((test_logits.argmax(1) == data.y_test.numpy()).mean())
    return _Network(model, train_logits, test_logits, accuracy)


def _compute_kernels(
    network: _Network, data: DigitsSplit, specs: Sequence[KernelSpec], cfg: DemoConfig
) -> list[_Kernel]:
    """Step 3: both blocks of every kernel (see :meth:`KernelSpec.blocks`)."""
    kernels = []
    bar = _bar(specs, "kernels", "kernel", cfg)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        t0 = time.perf_counter()
        k_tr, k_te = spec.blocks(network.model, data.x_train, data.x_test, seed=cfg.seed)
        kernels.append(_Kernel(spec, k_tr, k_te, time.perf_counter() - t0))
    bar.close()
    return kernels


def _fit_surrogates(
    kernels: Sequence[_Kernel],
    surrogates: Sequence[SurrogateSpec],
    y_train: np.ndarray,
    network: _Network,
    cfg: DemoConfig,
) -> list[_Fit]:
    """Step 4: every surrogate on every kernel it names (surrogate-major order, as in the table)."""
    jobs = [(s, k) for s in surrogates for k in kernels if s.fits_on(k.spec.name)]
    fits = []
    bar = _bar(jobs, "surrogates", "fit", cfg)
    for spec, kernel in bar:
        bar.set_postfix_str(f"{kernel.spec.name}/{spec.name}")
        t0 = time.perf_counter()
        sur = spec.fit(kernel.train, y_train, network.train_logits, alpha=cfg.alpha, seed=cfg.seed)
        seconds = time.perf_counter() - t0
        fits.append(_Fit(kernel, spec, sur, sur.comparison_logits(kernel.test), seconds))
    bar.close()
    return fits


def _score(
    fits: Sequence[_Fit], network: _Network, y_test: np.ndarray
) -> tuple[list[dict[str, Any]], list[FaithfulnessResult]]:
    """Step 5: faithfulness of every fit (float64 throughout) and the table's rows."""
    rows, results = [], []
    for fit in fits:
        res = faithfulness(network.test_logits, fit.test_scores, y_test)
        results.append(res)
        rows.append({
            "kernel": fit.kernel.spec.name,
            "target": fit.spec.name,
            "tau": res.tau,
            "TAD (pp)": 100.0 * res.tad,
            "Gamma": res.gamma,
            "p": res.gamma_p,
            "R2": res.r2,
            "acc": res.surrogate_acc,
            "kernel s": fit.kernel.seconds,
            "fit s": fit.seconds,
        })
    return rows, results


def _explain_network(
    best: _Fit, y_train: np.ndarray, y_test: np.ndarray, network: _Network, cfg: DemoConfig
) -> tuple[Explanation, list[int]]:
    """Step 6: the most faithful surrogate explains the network's predicted class on every test digit
    (:func:`tangentlens.explain.explain`, ``target="network"``); and the test digits of the gallery."""
    expl = explain(best.surrogate, best.kernel.test, k=min(cfg.top_k, len(y_train)), train_labels=y_train,
                   network_logits=network.test_logits, target="network", classes=())
    surrogate_pred = np.array([p.predicted_index for p in expl])
    shown = gallery_points(y_test, network.test_logits.argmax(1), cfg.gallery_rows, surrogate_pred)
    return expl, shown


def _meta(cfg: DemoConfig, data: DigitsSplit, network: _Network, kernels: Sequence[_Kernel],
          surrogates: Sequence[SurrogateSpec], timings: dict[str, float]) -> dict[str, Any]:
    """The report's configuration section: command, settings, data, network, timings, versions."""
    import scipy
    import sklearn

    from .. import __version__

    return {
        "tangentlens": __version__,
        "command": "tangentlens demo " + " ".join(
            [f"--out {cfg.out}", f"--seed {cfg.seed}"] + (["--quick"] if cfg.quick else [])
        ),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "data": {"dataset": "scikit-learn digits (8x8, 10 classes)", "n_train": len(data.y_train),
                 "n_test": len(data.y_test), "pixel mean": data.mean, "pixel std": data.std},
        "network": {"architecture": "DigitsCNN",
                    "parameters": sum(p.numel() for p in network.model.parameters()),
                    "test accuracy": network.accuracy},
        "timings (s)": {k: round(v, 3) for k, v in timings.items()},
        "kernel timings (s)": {k.spec.name: round(k.seconds, 3) for k in kernels},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "scipy": scipy.__version__,
                     "scikit-learn": sklearn.__version__},
        "kernels": {k.spec.name: k.spec.description or k.spec.kind for k in kernels},
        "surrogates": {sp.name: sp.describe(cfg.alpha) for sp in surrogates},
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def _draw_figures(
    cfg: DemoConfig,
    data: DigitsSplit,
    network: _Network,
    kernels: Sequence[_Kernel],
    surrogates: Sequence[SurrogateSpec],
    found: _Findings,
) -> list[tuple[Path, str]]:
    """Step 7a: the scatter on trNTK (or the first kernel) and the gallery of the most faithful surrogate."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[Path, str]] = []
    names = [k.spec.name for k in kernels]
    main_kernel = "trNTK" if "trNTK" in names else names[0]
    scores = {f.spec.name: f.test_scores for f in found.fits if f.kernel.spec.name == main_kernel}
    if surrogates[0].name in scores:
        images.append(confidence_scatter(cfg.out / "scatter.png", main_kernel, surrogates, scores, found.rows,
                                         network.test_logits, data.y_test.numpy()))
    best, expl = found.best_row, found.explanation
    images.append(explanation_gallery(cfg.out / "gallery.png", data, [expl[i] for i in found.gallery], expl.k,
                                      f"{best['kernel']} / {best['target']}, τ = {best['tau']:.3f}"))
    return images


def _write_report(
    cfg: DemoConfig,
    found: _Findings,
    images: list[tuple[Path, str]],
    meta: dict[str, Any],
    y_test: np.ndarray,
) -> Path:
    """Step 7b: ``index.html`` and ``results.json`` (the table, every metric, the explanations)."""
    best, expl = found.best_row, found.explanation
    report_notes = [
        "Surrogates ('target' column): 'labels' are fitted on the true training labels (the reference's "
        "target), 'distilled' on the network's softmax probabilities (the same L-BFGS solver and alpha), "
        "'labels (SGD ref)' with the reference's SGDClassifier settings (seeded; its probabilities are "
        "scikit-learn's normalized one-vs-rest sigmoids), 'distilled T=2 a=1e-6' on the network's "
        "probabilities at temperature 2 with a 100x weaker L2 penalty. All metrics are computed in "
        "float64 (tangentlens.faithfulness) from each surrogate's comparison_logits.",
        "trNTK0 is the unnormalized trace NTK divided by the standard deviation of its train x train block.",
        *found.notes,
    ]
    heading = (f"Explanations of the network's decisions (gallery digits; {best['kernel']} / "
               f"{best['target']}, top {expl.k})")
    return write_report(
        cfg.out,
        found.rows,
        images,
        meta,
        title="tangentlens demo: kernel surrogates of a digits CNN",
        intro=(
            f"A {meta['network']['parameters']}-parameter CNN trained on {meta['data']['n_train']} digits "
            f"(test accuracy {100 * meta['network']['test accuracy']:.2f}%), explained by kernel machines on "
            "its empirical neural tangent kernels and on two forward-only baselines (Em, CK)."
        ),
        notes=report_notes,
        verdict=found.verdict,
        columns=FAITHFULNESS_COLUMNS,
        tables=[(heading, explanation_table((expl[i] for i in found.gallery), y_test), EXPLANATION_COLUMNS)],
        extra={
            "most_faithful": {"kernel": best["kernel"], "target": best["target"], "tau": best["tau"]},
            "faithfulness": [{"kernel": r["kernel"], "target": r["target"], **res.to_dict()}
                             for r, res in zip(found.rows, found.results)],
            "explanations": {
                "surrogate": {"kernel": best["kernel"], "target": best["target"]},
                "target": "network",
                "k": expl.k,
                "what": "for every test digit (tangentlens.explanation.PointExplanation.to_dict() and its "
                        "true_label): the network's predicted class (network_label; the explained "
                        "target_label), the surrogate's class (predicted_label), whether they agree, and "
                        "under 'target' the surrogate's logit of that class (logit, intercept, "
                        "positive_total + negative_total = logit - intercept), coverage_pos / coverage_neg "
                        "(share of the positive / negative contributions carried by the top-k proponents "
                        "/ opponents), coverage_logit (their sum over logit - intercept) and the top-k "
                        "proponents / opponents (training index, label, contribution W[c,i]·κ(x,x_i) "
                        "and kernel value κ(x,x_i))",
                "gallery": found.gallery,
                "disagreements": expl.disagreements,
                "points": [{"true_label": int(y_test[p.test_index]), **p.to_dict()} for p in expl],
            },
        },
    )


# --------------------------------------------------------------------------------------------------------
# The job.
# --------------------------------------------------------------------------------------------------------
def run_demo(
    config: DemoConfig | None = None,
    *,
    kernels: Sequence[KernelSpec] = KERNELS,
    surrogates: Sequence[SurrogateSpec] = SURROGATES,
    stdout: TextIO | None = None,
) -> DemoResult:
    """Run the main job and write the report folder.

    Args:
        config: settings; the defaults reproduce ``tangentlens demo``.
        kernels: the kernels to compute.
        surrogates: the surrogates to fit.
        stdout: where the table and a short log go (default ``sys.stdout``); progress bars go to stderr.

    Returns:
        A :class:`DemoResult`. Cost: dominated by the kernels — for each kind one train x train and one
        test x train block (about C = 10 batched backward passes over the ~1,800 images for the trace
        kernels) — and the surrogate fits (L-BFGS on a 1,200 x 1,200 kernel); well under a minute on 2 cores.

    Raises:
        InputError: for invalid settings (sizes, ``top_k``...).
        TangentLensError: from the engine, surrogate or metrics.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limits: Any = contextlib.nullcontext()
    else:
        # One BLAS thread: the surrogate fits are small GEMMs, for which OpenBLAS threads only add
        # overhead (and, on a busy machine, oversubscription stalls of ~100x); it also makes the fits
        # independent of the core count. (threadpoolctl limits the libraries loaded so far: this
        # module's imports loaded scipy and scikit-learn already.)
        limits = threadpool_limits(limits=1, user_api="blas")
    threads = torch.get_num_threads()
    cfg = config or DemoConfig()
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise InputError(f"threads must be >= 1 or None, got {cfg.threads}.")
        torch.set_num_threads(cfg.threads)
    try:
        with limits:
            return _run(cfg.resolved(), kernels, surrogates, stdout if stdout is not None else sys.stdout)
    finally:
        torch.set_num_threads(threads)


def _run(
    cfg: DemoConfig, kernel_specs: Sequence[KernelSpec], surrogates: Sequence[SurrogateSpec], out: TextIO
) -> DemoResult:
    """The steps in order, with their timings and the log lines."""
    from .. import __version__

    cfg.check()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    _seed_everything(cfg.seed)

    t0 = time.perf_counter()
    data = _load_data(cfg)
    timings["data"] = time.perf_counter() - t0
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()

    t0 = time.perf_counter()
    network = _train_network(data, cfg)
    timings["train CNN"] = time.perf_counter() - t0
    print(
        f"tangentlens {__version__} demo: digits {len(y_train)} train / {len(y_test)} test, seed "
        f"{cfg.seed}; CNN ({sum(p.numel() for p in network.model.parameters())} parameters) test accuracy "
        f"{100 * network.accuracy:.2f}% (trained in {timings['train CNN']:.1f} s)",
        file=out,
        flush=True,
    )

    kernels = _compute_kernels(network, data, kernel_specs, cfg)
    timings["kernels"] = sum(k.seconds for k in kernels)
    fits = _fit_surrogates(kernels, surrogates, y_train, network, cfg)
    timings["surrogate fits"] = sum(f.seconds for f in fits)

    rows, results = _score(fits, network, y_test)
    table = text_table(rows, digits=4)
    notes = [f"Gamma of {r['kernel']} / {r['target']}: {res.gamma_reason}."
             for r, res in zip(rows, results) if res.gamma_reason]
    print(table, *notes, sep="\n", file=out, flush=True)

    # The most faithful surrogate (highest τ; the first in table order on a tie) explains the network's
    # own predicted class on every test digit.
    best = max(range(len(rows)), key=lambda i: rows[i]["tau"])
    expl, shown = _explain_network(fits[best], y_train, y_test, network, cfg)
    verdict = verdict_in_words(rows, surrogates, cfg.alpha, expl, shown)
    print(f"verdict: {verdict}", file=out, flush=True)
    found = _Findings(fits, rows, results, best, expl, shown, verdict, notes)

    t0 = time.perf_counter()
    images = _draw_figures(cfg, data, network, kernels, surrogates, found)
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    meta = _meta(cfg, data, network, kernels, surrogates, timings)
    index = _write_report(cfg, found, images, meta, y_test)
    print(f"report: {index}  ({timings['total']:.1f} s)", file=out, flush=True)
    return DemoResult(rows=rows, table=table, index=index, images=[p for p, _ in images], meta=meta,
                      notes=notes, verdict=verdict, explanation=expl)
