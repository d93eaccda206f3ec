"""The main job: train a small CNN on the bundled digits, explain it with kernel surrogates, write a report.

Steps (each seeded; the same seed gives the same table):

1. a stratified split of scikit-learn's 8x8 digits (:func:`tangentlens.datasets.digits.load_digits_split`);
2. a small CNN (:class:`DigitsCNN`, about 3.7k parameters) trained for a few seconds with Adam;
3. for every kernel in :data:`KERNELS` the train x train block K and the test x train block K* via
   :func:`tangentlens.api.kernel` (trNTK⁰ is scaled by the standard deviation of its train x train block,
   as in the method);
4. for every surrogate in :data:`SURROGATES` a :class:`tangentlens.surrogate.KernelSurrogate` fitted on K,
   evaluated on K*: the exact L-BFGS solver on the true labels (the reference's target), the same solver on
   the network's soft probabilities (a distilled surrogate), and the reference SGD settings on trNTK;
5. faithfulness (Kendall-τ of the true-class probability, test accuracy differential, misclassification
   overlap Γ with its binomial p-value, linearization R²) from :func:`tangentlens.faithfulness.faithfulness`;
6. a report folder: ``index.html`` (self-contained), ``scatter.png`` (network vs surrogate true-class
   confidence, trNTK), ``gallery.png`` (test digits with their top proponents and opponents) and
   ``results.json``.

Kernels and surrogates are *data* (:class:`KernelSpec`, :class:`SurrogateSpec`): add a row to the tuples to
add one to the demo.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from tangentlens.datasets.digits import DigitsSplit, load_digits_split
from tangentlens.errors import InputError, TangentLensError

__all__ = [
    "KERNELS",
    "SURROGATES",
    "DemoConfig",
    "DemoResult",
    "DigitsCNN",
    "KernelSpec",
    "SurrogateSpec",
    "available_kernels",
    "run_demo",
    "train_cnn",
]


# --------------------------------------------------------------------------------------------------------
# What the demo computes: kernels and surrogates as data.
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSpec:
    """One kernel of the demo.

    Attributes:
        name: the label in the table (e.g. ``"trNTK"``).
        kind: the engine's kind (``"trntk"``, ``"trntk0"``, ``"pntk"``, ``"em"``, ``"ck"``, ...).
        normalize: passed to :func:`tangentlens.api.kernel`; ``None`` keeps the kind's default.
        scale: ``"train_std"`` divides both blocks by the standard deviation of the train x train block (the
            method's scaling of trNTK⁰); ``None`` leaves the kernel as it is.
        projection: for projected kernels, a factory ``(seed) -> tangentlens.sketch.Projection``; the spec is
            skipped when the engine has no ``projection`` argument yet.
        description: one line for the report.
    """

    name: str
    kind: str
    normalize: bool | None = None
    scale: str | None = None
    projection: Callable[[int], Any] | None = None
    description: str = ""


@dataclass(frozen=True)
class SurrogateSpec:
    """One surrogate fitted on every kernel it names.

    Attributes:
        name: the label in the table's ``target`` column.
        target: ``"labels"`` (true training labels) or ``"soft"`` (the network's softmax probabilities on the
            training points: a distilled surrogate).
        temperature: for ``"soft"``: the targets are ``softmax(logits / temperature)``; above 1 it
            un-saturates the probabilities of a confident network, so the surrogate sees its ranking.
        solver: the :class:`~tangentlens.surrogate.KernelSurrogate` solver (``"lbfgs"`` or ``"sgd"``).
        kernels: names of the kernels to fit on; ``None`` means every kernel.
        options: further keyword arguments of ``KernelSurrogate`` (they override the demo's ``alpha``).
    """

    name: str
    target: str
    solver: str
    kernels: tuple[str, ...] | None = None
    temperature: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


def _projection_factory(dim: int) -> Callable[[int], Any]:
    """A factory ``seed -> tangentlens.sketch.Projection(dim, seed=seed)`` (dense Rademacher)."""

    def make(seed: int) -> Any:
        from tangentlens.sketch import Projection

        return Projection(dim, seed=seed)

    return make


#: The kernels of the demo, in table order. trNTK first: the scatter and the gallery use it.
KERNELS: tuple[KernelSpec, ...] = (
    KernelSpec("trNTK", "trntk",
               description="trace NTK: cosine of the concatenated per-class logit gradients (exact)"),
    KernelSpec("trNTK0", "trntk0", normalize=False, scale="train_std",
               description="unnormalized trace NTK, divided by the std of its train x train block"),
    KernelSpec("pNTK", "pntk", normalize=True,
               description="pseudo-NTK: cosine of the gradients of the summed logits"),
    KernelSpec("Em", "em", description="embedding kernel: cosine of the concatenated layer outputs"),
    KernelSpec("CK", "ck", description="conjugate kernel: cosine of the penultimate features"),
    KernelSpec("proj-trNTK", "trntk", projection=_projection_factory(512),
               description="trNTK of gradients projected to K = 512 (dense Rademacher, seeded)"),
    KernelSpec("proj-pNTK", "pntk", normalize=True, projection=_projection_factory(512),
               description="pNTK of gradients projected to K = 512 (dense Rademacher, seeded)"),
)

#: The surrogates of the demo.
SURROGATES: tuple[SurrogateSpec, ...] = (
    SurrogateSpec("labels", "labels", "lbfgs"),
    SurrogateSpec("distilled", "soft", "lbfgs"),
    SurrogateSpec("labels (SGD ref)", "labels", "sgd", kernels=("trNTK",)),
    SurrogateSpec("distilled T=2 a=1e-6", "soft", "lbfgs", kernels=("trNTK",), temperature=2.0,
                  options={"alpha": 1e-6}),
)


def available_kernels(specs: Sequence[KernelSpec] = KERNELS) -> tuple[list[KernelSpec], list[str]]:
    """Split ``specs`` into those the installed engine can compute and notes on those skipped.

    A projected kernel needs ``tangentlens.sketch.Projection`` and a ``projection`` keyword argument of
    :func:`tangentlens.api.kernel`.

    Returns:
        ``(usable specs, notes)``.
    """
    from tangentlens.api import kernel

    has_projection = "projection" in inspect.signature(kernel).parameters
    if has_projection:
        try:
            import tangentlens.sketch  # noqa: F401
        except ImportError:
            has_projection = False
    usable, notes = [], []
    for spec in specs:
        if spec.projection is not None and not has_projection:
            notes.append(f"{spec.name}: skipped (this engine has no projection support yet).")
            continue
        usable.append(spec)
    return usable, notes


# --------------------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: 3,706 parameters.

    conv(1→8, 3x3) · BN · ReLU · maxpool 2 → conv(8→16, 3x3) · BN · ReLU · maxpool 2 → flatten (64)
    → linear(64→32) · ReLU → linear(32→10). The input of the last linear layer (32 features) is what the
    conjugate kernel (CK) uses.
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, 10) for inputs of shape (N, 1, 8, 8)."""
        return self.head(self.act(self.hidden(self.features(x))))


def train_cnn(
    data: DigitsSplit,
    *,
    seed: int,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    progress: bool = False,
) -> DigitsCNN:
    """Train a :class:`DigitsCNN` with Adam and a cosine learning-rate schedule, deterministically.

    The initialization and the mini-batch order are drawn from ``torch.manual_seed(seed)`` and a
    ``torch.Generator`` seeded with ``seed``. Training runs on one CPU thread (restored afterwards): a
    multi-threaded reduction order would make the weights, hence every number downstream, depend on the
    core count. Cost: ``epochs * N_train`` forward and backward passes (about 1-3 s for the full split).

    Returns:
        The trained model, in eval mode.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trajectory then does not depend on the machine's core count
    try:
        return _train(data, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    data: DigitsSplit,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    progress: bool,
) -> DigitsCNN:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = DigitsCNN(data.n_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(range(epochs), desc="train CNN", unit="epoch", disable=not progress, file=sys.stderr,
               leave=False)
    for _ in bar:
        order = torch.randperm(len(data.y_train), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(order):.3f}")
    bar.close()
    model.eval()
    return model


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


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        rows: the faithfulness table, one dict per (kernel, surrogate).
        table: the same table as fixed-width text.
        index: path of ``index.html``.
        images: paths of the PNG figures.
        meta: configuration, versions and timings written into the report.
        notes: remarks (skipped kernels, ...).
    """

    rows: list[dict[str, Any]]
    table: str
    index: Path
    images: list[Path]
    meta: dict[str, Any]
    notes: list[str]


# --------------------------------------------------------------------------------------------------------
# Adapters to the surrogate, faithfulness and explanation modules.
# --------------------------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_surrogate(
    spec: SurrogateSpec,
    k_train: np.ndarray,
    y_train: np.ndarray,
    z_train: np.ndarray,
    *,
    alpha: float,
    seed: int,
) -> Any:
    """Fit one ``KernelSurrogate`` of ``spec`` on the train x train kernel."""
    from tangentlens.surrogate import KernelSurrogate

    kwargs: dict[str, Any] = {"solver": spec.solver, "alpha": alpha, "random_state": seed}
    kwargs.update(spec.options)
    model = KernelSurrogate(**kwargs)
    if spec.target == "labels":
        target = y_train
    elif spec.temperature == 1.0:
        target = _softmax(z_train)
    else:
        target = _softmax(z_train / spec.temperature)
    return model.fit(k_train, target)


def _describe_surrogate(spec: SurrogateSpec, alpha: float) -> str:
    """One line for the report: solver, penalty, target and kernels of ``spec``."""
    target = "true labels" if spec.target == "labels" else f"softmax(logits / {spec.temperature:g})"
    kernels = ", ".join(spec.kernels) if spec.kernels else "all kernels"
    return (f"KernelSurrogate(solver={spec.solver!r}, alpha={spec.options.get('alpha', alpha):g}) "
            f"on {target}; {kernels}")


def _surrogate_logits(surrogate: Any, k_test: np.ndarray) -> np.ndarray:
    """(n, C) surrogate scores whose softmax is the surrogate's class probability.

    The L-BFGS kGLM is multinomial: its logits. The reference SGD solver is one-vs-rest, and its
    probabilities are scikit-learn's normalized one-vs-rest sigmoids, so its scores are the log of
    ``predict_proba`` (softmax of those gives back exactly those probabilities, and the argmax is
    unchanged).
    """
    if getattr(surrogate, "solver", None) == "sgd":
        with np.errstate(divide="ignore"):
            return np.log(np.clip(_to_numpy(surrogate.predict_proba(k_test)), 1e-300, None))
    if hasattr(surrogate, "logits"):
        return _to_numpy(surrogate.logits(k_test))
    z = _to_numpy(surrogate.decision_function(k_test))
    if z.ndim == 1:  # binary decision values -> two-column logits
        z = np.stack([np.zeros_like(z), z], axis=1)
    return z


def _metrics(network_logits: np.ndarray, surrogate_logits: np.ndarray, labels: np.ndarray) -> dict:
    """τ, TAD, Γ, p, R² and accuracies from :func:`tangentlens.faithfulness.faithfulness`."""
    from tangentlens.faithfulness import faithfulness

    res = faithfulness(network_logits, surrogate_logits, labels)

    def pick(*names: str) -> float | None:
        for n in names:
            if isinstance(res, dict) and n in res:
                return res[n]
            if hasattr(res, n):
                return getattr(res, n)
        return None

    tad = pick("tad", "test_accuracy_differential")
    sacc = pick("surrogate_acc", "surrogate_accuracy")
    if sacc is None:
        sacc = float((surrogate_logits.argmax(1) == labels).mean())
    return {
        "tau": pick("tau", "kendall_tau"),
        "TAD (pp)": None if tad is None else 100.0 * float(tad),
        "Gamma": pick("gamma", "overlap", "misclassification_overlap"),
        "p": pick("gamma_p", "p_value"),
        "R2": pick("r2", "linearization_r2", "r_squared"),
        "acc": float(sacc),
    }


def _explain_rows(
    surrogate: Any,
    k_test_rows: np.ndarray,
    k: int,
    train_labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` proponents and opponents of the surrogate's predicted class at each test row.

    Uses :func:`tangentlens.explain.explain` (contributions A[c, i] = W[c, i] κ(x, x_i)). Proponents
    have positive, opponents negative contributions; when fewer than ``k`` exist the rest is padded
    with index -1 and a NaN contribution.

    Returns:
        ``(proponent indices, proponent contributions, opponent indices, opponent contributions)``,
        each of shape (R, k); proponents in decreasing, opponents in increasing contribution.
    """
    from tangentlens.explain import explain

    expl = explain(surrogate, k_test_rows, k=k, train_labels=train_labels, classes="predicted")
    out = [np.full((len(expl), k), -1, dtype=np.int64), np.full((len(expl), k), np.nan),
           np.full((len(expl), k), -1, dtype=np.int64), np.full((len(expl), k), np.nan)]
    for r, point in enumerate(expl):
        cls = point.classes[0]
        for j, att in enumerate(cls.proponents):
            out[0][r, j], out[1][r, j] = att.index, att.contribution
        for j, att in enumerate(cls.opponents):
            out[2][r, j], out[3][r, j] = att.index, att.contribution
    return out[0], out[1], out[2], out[3]


def _gallery_points(y_test: np.ndarray, net_pred: np.ndarray, n: int) -> list[int]:
    """Deterministic choice of gallery rows: network mistakes first (at most half), then correct points of
    distinct classes."""
    wrong = [int(i) for i in np.flatnonzero(net_pred != y_test)][: n // 2]
    chosen, seen = list(wrong), {int(y_test[i]) for i in wrong}
    for i in np.flatnonzero(net_pred == y_test):
        if len(chosen) >= n:
            break
        if int(y_test[i]) not in seen:
            chosen.append(int(i))
            seen.add(int(y_test[i]))
    return chosen


# --------------------------------------------------------------------------------------------------------
# The job.
# --------------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - only for third-party code that reads the global state
    torch.use_deterministic_algorithms(True, warn_only=True)


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


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
        kernels: the kernels to compute (projected ones are skipped when unsupported).
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
    # Load every BLAS-backed library first: threadpoolctl only limits libraries already loaded.
    import scipy.optimize  # noqa: F401
    import sklearn.linear_model  # noqa: F401

    import tangentlens.explain  # noqa: F401
    import tangentlens.faithfulness  # noqa: F401
    import tangentlens.surrogate  # noqa: F401

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limits: Any = contextlib.nullcontext()
    else:
        # One BLAS thread: the surrogate fits are small GEMMs, for which OpenBLAS threads only add
        # overhead (and, on a busy machine, oversubscription stalls of ~100x); it also makes the fits
        # independent of the core count.
        limits = threadpool_limits(limits=1, user_api="blas")
    threads = torch.get_num_threads()
    cfg = config or DemoConfig()
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise InputError(f"threads must be >= 1 or None, got {cfg.threads}.")
        torch.set_num_threads(cfg.threads)
    try:
        with limits:
            return _run_demo(cfg, kernels=kernels, surrogates=surrogates, stdout=stdout)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    config: DemoConfig | None,
    *,
    kernels: Sequence[KernelSpec],
    surrogates: Sequence[SurrogateSpec],
    stdout: TextIO | None,
) -> DemoResult:
    from tqdm.auto import tqdm

    from tangentlens import __version__
    from tangentlens.api import train_test_kernels
    from tangentlens.report import gallery, scatter, text_table, write_report

    cfg = (config or DemoConfig()).resolved()
    out = stdout if stdout is not None else sys.stdout
    if cfg.top_k < 1 or cfg.gallery_rows < 1:
        raise InputError("top_k and gallery_rows must be >= 1.")
    if cfg.epochs is None or cfg.epochs < 1:
        raise InputError(f"epochs must be >= 1, got {cfg.epochs}.")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise InputError(f"--out {cfg.out} exists and is not a folder; choose another path.")

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    _seed_everything(cfg.seed)

    t0 = time.perf_counter()
    data = load_digits_split(cfg.n_train or 0, cfg.n_test or 0, seed=cfg.seed)
    timings["data"] = time.perf_counter() - t0
    y_train = data.y_train.numpy()
    y_test = data.y_test.numpy()

    t0 = time.perf_counter()
    model = train_cnn(data, seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress)
    timings["train CNN"] = time.perf_counter() - t0
    with torch.no_grad():
        net_train = _to_numpy(model(data.x_train))
        net_test = _to_numpy(model(data.x_test))
    net_acc = float((net_test.argmax(1) == y_test).mean())
    print(
        f"tangentlens {__version__} demo: digits {len(y_train)} train / {len(y_test)} test, seed "
        f"{cfg.seed}; CNN ({sum(p.numel() for p in model.parameters())} parameters) test accuracy "
        f"{100 * net_acc:.2f}% (trained in {timings['train CNN']:.1f} s)",
        file=out,
        flush=True,
    )

    specs, notes = available_kernels(kernels)
    blocks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    kernel_time: dict[str, float] = {}
    bar = tqdm(specs, desc="kernels", unit="kernel", disable=not cfg.progress, file=sys.stderr,
               leave=False)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        kwargs: dict[str, Any] = {"kind": spec.kind}
        if spec.normalize is not None:
            kwargs["normalize"] = spec.normalize
        if spec.projection is not None:
            kwargs["projection"] = spec.projection(cfg.seed)
        t0 = time.perf_counter()
        k_tr, k_te = (_to_numpy(k) for k in train_test_kernels(model, data.x_train, data.x_test, **kwargs))
        if spec.scale == "train_std":
            s = float(k_tr.std())
            if not s > 0.0:
                raise TangentLensError(f"{spec.name}: train x train block has zero spread; cannot scale.")
            k_tr, k_te = k_tr / s, k_te / s
        kernel_time[spec.name] = time.perf_counter() - t0
        blocks[spec.name] = (k_tr, k_te)
    bar.close()
    timings["kernels"] = sum(kernel_time.values())

    rows: list[dict[str, Any]] = []
    fitted: dict[tuple[str, str], tuple[Any, np.ndarray]] = {}
    jobs = [(s, k) for s in surrogates for k in specs if s.kernels is None or k.name in s.kernels]
    bar = tqdm(jobs, desc="surrogates", unit="fit", disable=not cfg.progress, file=sys.stderr,
               leave=False)
    t_fits = 0.0
    for sspec, kspec in bar:
        bar.set_postfix_str(f"{kspec.name}/{sspec.name}")
        k_tr, k_te = blocks[kspec.name]
        t0 = time.perf_counter()
        sur = _fit_surrogate(sspec, k_tr, y_train, net_train, alpha=cfg.alpha, seed=cfg.seed)
        fit_s = time.perf_counter() - t0
        t_fits += fit_s
        sur_test = _surrogate_logits(sur, k_te)
        fitted[(kspec.name, sspec.name)] = (sur, sur_test)
        row: dict[str, Any] = {"kernel": kspec.name, "target": sspec.name}
        row.update(_metrics(net_test, sur_test, y_test))
        row["kernel s"] = kernel_time[kspec.name]
        row["fit s"] = fit_s
        rows.append(row)
    bar.close()
    timings["surrogate fits"] = t_fits

    table = text_table(rows, digits=4)
    print(table, file=out, flush=True)
    for note in notes:
        print(note, file=out)

    # Figures (trNTK, or the first kernel if trNTK is not among them).
    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[Path, str]] = []
    main_kernel = "trNTK" if "trNTK" in blocks else specs[0].name
    lab_key = (main_kernel, surrogates[0].name)
    idx = np.arange(len(y_test))
    if lab_key in fitted:
        net_conf = _softmax(net_test)[idx, y_test]
        series = []
        for sspec in surrogates:
            key = (main_kernel, sspec.name)
            # Same solver as the first surrogate and untempered targets: their probabilities are
            # on the network's own scale, so the diagonal means agreement.
            if key in fitted and sspec.solver == surrogates[0].solver and sspec.temperature == 1.0:
                series.append((f"{sspec.name}", net_conf, _softmax(fitted[key][1])[idx, y_test]))
        tau_txt = "\n".join(
            f"τ {r['target']} = {r['tau']:.3f}"
            for r in rows
            if r["kernel"] == main_kernel and r["tau"] is not None
            and any(r["target"] == s[0] for s in series)
        )
        path = scatter(
            cfg.out / "scatter.png",
            series[0][1],
            series[0][2],
            series=series,
            title=f"true-class confidence on {len(y_test)} test digits ({main_kernel} surrogates)",
            xlabel="network softmax p(true class)",
            ylabel="surrogate softmax p(true class)",
            annotation=tau_txt or None,
        )
        images.append((path, f"Network vs {main_kernel}-surrogate confidence in the true class, per test "
                             "digit; the dashed line is perfect agreement."))

        sur, sur_test = fitted[lab_key]
        sur_pred = sur_test.argmax(1)
        net_pred = net_test.argmax(1)
        rows_idx = _gallery_points(y_test, net_pred, cfg.gallery_rows)
        k_te = blocks[main_kernel][1]
        k = min(cfg.top_k, len(y_train))
        pi, pv, oi, ov = _explain_rows(sur, k_te[rows_idx], k, y_train)
        titles = [
            f"test {i}: y={y_test[i]}\nnet {net_pred[i]}, sur {sur_pred[i]}" for i in rows_idx
        ]

        def pictures(index: np.ndarray) -> np.ndarray:
            imgs = data.to_image(data.x_train[torch.as_tensor(np.maximum(index.ravel(), 0))])
            imgs[index.ravel() < 0] = np.nan  # padding: an empty cell
            return imgs.reshape(*index.shape, 8, 8)

        def captions(index: np.ndarray) -> list[list[str]]:
            return [[f"train {j} (y={y_train[j]})" if j >= 0 else "" for j in r] for r in index]

        path = gallery(
            cfg.out / "gallery.png",
            data.to_image(data.x_test[rows_idx]),
            pictures(pi),
            pv,
            pictures(oi),
            ov,
            query_titles=titles,
            proponent_titles=captions(pi),
            opponent_titles=captions(oi),
            title=f"Top proponents (green) and opponents (red) of the surrogate's predicted class "
                  f"({main_kernel}, {surrogates[0].name}); numbers are contributions W[c,i]·κ(x,x_i)",
        )
        images.append((path, "Test digits (left) with the training digits that push the surrogate's "
                             "predicted class up most (proponents) and down most (opponents)."))
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    import scipy
    import sklearn

    meta: dict[str, Any] = {
        "tangentlens": __version__,
        "command": "tangentlens demo " + " ".join(
            [f"--out {cfg.out}", f"--seed {cfg.seed}"] + (["--quick"] if cfg.quick else [])
        ),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "data": {"dataset": "scikit-learn digits (8x8, 10 classes)", "n_train": len(y_train),
                 "n_test": len(y_test), "pixel mean": data.mean, "pixel std": data.std},
        "network": {"architecture": "DigitsCNN", "parameters": sum(p.numel() for p in
                                                                    model.parameters()),
                    "test accuracy": net_acc},
        "timings (s)": {k: round(v, 3) for k, v in timings.items()},
        "kernel timings (s)": {k: round(v, 3) for k, v in kernel_time.items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "scipy": scipy.__version__,
                     "scikit-learn": sklearn.__version__},
        "kernels": {k.name: k.description or k.kind for k in specs},
        "surrogates": {sp.name: _describe_surrogate(sp, cfg.alpha) for sp in surrogates},
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    report_notes = [
        "tau: Kendall tau-b between the network's and the surrogate's softmax probability of the true class "
        "over the test digits. TAD: surrogate minus network test accuracy, percentage points. Gamma: "
        "misclassification overlap |both wrong| / |either wrong|, p its binomial p-value under "
        "independence. R2: linearization R² of network logits against surrogate logits. acc: surrogate "
        "test accuracy. 'labels' surrogates are fitted on the true training labels (the reference's "
        "target), 'distilled' on the network's softmax probabilities (the same L-BFGS solver and "
        "alpha), 'SGD ref' with the reference's SGDClassifier settings (seeded; its probabilities are "
        "scikit-learn's normalized one-vs-rest sigmoids), 'distilled T=2 a=1e-6' on the network's "
        "probabilities at temperature 2 with a 100x weaker L2 penalty. kernel s: time of the kernel's "
        "train x train and test x train blocks (shared by its rows); fit s: time of the fit.",
        "trNTK0 is the unnormalized trace NTK divided by the standard deviation of its train x train block.",
        *notes,
    ]
    index = write_report(
        cfg.out,
        rows,
        images,
        meta,
        title="tangentlens demo: kernel surrogates of a digits CNN",
        intro=(
            f"A {meta['network']['parameters']}-parameter CNN trained on {len(y_train)} digits "
            f"(test accuracy {100 * net_acc:.2f}%), explained by kernel machines on its empirical "
            "neural tangent kernels and on two forward-only baselines (Em, CK)."
        ),
        notes=report_notes,
    )
    print(f"report: {index}  ({timings['total']:.1f} s)", file=out, flush=True)
    return DemoResult(rows=rows, table=table, index=index, images=[p for p, _ in images], meta=meta,
                      notes=notes)
