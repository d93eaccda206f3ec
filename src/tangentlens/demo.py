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
   overlap Γ with its binomial p-value, linearization R², all in float64) from
   :func:`tangentlens.faithfulness.faithfulness`;
6. the most faithful surrogate (highest τ) explains the *network's* predicted class on every test digit
   (:func:`tangentlens.explain.explain` with ``target="network"``): top proponents and opponents, their
   coverage of the logit, and whether network and surrogate agree;
7. a report folder: ``index.html`` (self-contained: a verdict in words, the tables with every column
   explained, the figures, the configuration), ``scatter.png`` (network vs surrogate true-class
   confidence, trNTK), ``gallery.png`` (test digits with the top proponents and opponents of the network's
   class) and ``results.json`` (the table, the full metrics, the verdict and the per-digit explanations).

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
        from tangentlens.projection import Projection

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
            import tangentlens.projection  # noqa: F401
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
        verdict: the report's conclusion in plain English (most faithful surrogate, what its τ means,
            coverage and disagreements of its explanations).
        explanation: the :class:`tangentlens.explain.Explanation` of the network's predicted class on
            every test digit by the most faithful surrogate.
    """

    rows: list[dict[str, Any]]
    table: str
    index: Path
    images: list[Path]
    meta: dict[str, Any]
    notes: list[str]
    verdict: str = ""
    explanation: Any = None


# --------------------------------------------------------------------------------------------------------
# Adapters to the surrogate, faithfulness and explanation modules.
# --------------------------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax in float64 whatever ``z``'s dtype (:func:`tangentlens.faithfulness.softmax64`)."""
    from tangentlens.faithfulness import softmax64

    return softmax64(z)


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


def _metrics(
    network_logits: np.ndarray, surrogate_logits: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, Any], Any]:
    """The table's τ, TAD, Γ, p, R² and accuracy, and the full
    :class:`~tangentlens.faithfulness.FaithfulnessResult` (float64 throughout)."""
    from tangentlens.faithfulness import faithfulness

    res = faithfulness(network_logits, surrogate_logits, labels)
    row = {
        "tau": res.tau,
        "TAD (pp)": 100.0 * res.tad,
        "Gamma": res.gamma,
        "p": res.gamma_p,
        "R2": res.r2,
        "acc": res.surrogate_acc,
    }
    return row, res


#: What each column of the faithfulness table means (the report's legend and header tooltips).
FAITHFULNESS_COLUMNS: dict[str, str] = {
    "kernel": "the kernel the surrogate is built on (definitions under Configuration > kernels)",
    "target": "what the surrogate was fitted to (definitions under Configuration > surrogates)",
    "tau": "Kendall tau-b between the network's and the surrogate's softmax probability of the true "
           "class over the test digits (float64); -1 to 1, 1 = both rank every pair of digits the "
           "same way; (1 + tau)/2 is about the share of pairs ranked alike",
    "TAD (pp)": "test accuracy differential: surrogate minus network test accuracy, in percentage "
                "points",
    "Gamma": "misclassification overlap: |both wrong| / |either wrong| over the test digits, 0 to 1; "
             "'–' where undefined (the reason is given under the table)",
    "p": "binomial p-value of Gamma under independent errors (the reference's test); small means the "
         "two share mistakes more than chance would",
    "R2": "linearization R²: squared correlation between the network's and the surrogate's centered "
          "logits over all test digits and classes, 0 to 1",
    "acc": "surrogate test accuracy, as a fraction of the test digits (0 to 1)",
    "kernel s": "seconds to compute this kernel's train x train and test x train blocks (shared by the "
                "rows of the kernel)",
    "fit s": "seconds to fit this surrogate on the train x train block",
}

#: What each column of the explanation table means.
EXPLANATION_COLUMNS: dict[str, str] = {
    "test digit": "row of the test set (an index into the demo's test split)",
    "true": "the digit's true label",
    "network": "the network's predicted class: the class that is explained",
    "surrogate": "the surrogate's predicted class",
    "agree": "whether network and surrogate predict the same class",
    "logit − b": "the surrogate's logit of the network's class minus its intercept: the sum of all "
                 "training points' contributions W[c,i]·κ(x,x_i)",
    "sum +": "the sum of all positive contributions to that logit (the proponents' total mass)",
    "sum −": "the sum of all negative contributions (the opponents' total mass)",
    "top-k + (%)": "share of the positive mass carried by the k proponents shown: "
                   "Σ top-k positive / Σ all positive, in percent",
    "top-k − (%)": "share of the negative mass carried by the k opponents shown, in percent",
    "shown/logit (%)": "(Σ top-k proponents + Σ top-k opponents) / (logit − b), in percent; can "
                       "exceed 100 or be negative when large positive and negative masses cancel",
}


def _percent(v: float | None) -> float | None:
    """A share as a percentage rounded to 0.1 (``None`` stays ``None``)."""
    return None if v is None else round(100.0 * v, 1)


def _explanation_records(expl: Any, y_test: np.ndarray) -> list[dict[str, Any]]:
    """One plain record per explained test point, for ``results.json``."""
    records = []
    for p in expl:
        t = p.target
        records.append({
            "test_index": p.test_index,
            "true_label": int(y_test[p.test_index]),
            "target_class": p.target_label,
            "target_source": p.target_source,
            "network_class": p.network_label,
            "surrogate_class": p.predicted_label,
            "agrees": p.agrees,
            "logit": t.logit,
            "intercept": t.intercept,
            "positive_total": t.positive_total,
            "negative_total": t.negative_total,
            "coverage_pos": t.coverage_pos,
            "coverage_neg": t.coverage_neg,
            "coverage_logit": t.coverage_logit,
            "proponents": [{"train_index": a.index, "label": a.label, "contribution": a.contribution}
                           for a in t.proponents],
            "opponents": [{"train_index": a.index, "label": a.label, "contribution": a.contribution}
                          for a in t.opponents],
        })
    return records


def _gallery_arrays(points: Sequence[Any], k: int) -> tuple[np.ndarray, ...]:
    """``(proponent indices, contributions, opponent indices, contributions)``, each (R, k), of the
    target classes of ``points``; padded with index -1 and NaN where fewer than ``k`` exist."""
    out = [np.full((len(points), k), -1, dtype=np.int64), np.full((len(points), k), np.nan),
           np.full((len(points), k), -1, dtype=np.int64), np.full((len(points), k), np.nan)]
    for r, point in enumerate(points):
        for j, att in enumerate(point.target.proponents):
            out[0][r, j], out[1][r, j] = att.index, att.contribution
        for j, att in enumerate(point.target.opponents):
            out[2][r, j], out[3][r, j] = att.index, att.contribution
    return tuple(out)


def _gallery_points(
    y_test: np.ndarray, net_pred: np.ndarray, n: int, sur_pred: np.ndarray | None = None
) -> list[int]:
    """Deterministic choice of gallery rows: network mistakes first (at most half), then one point where
    network and surrogate disagree (if any), then correct points of distinct classes."""
    wrong = [int(i) for i in np.flatnonzero(net_pred != y_test)][: n // 2]
    chosen, seen = list(wrong), {int(y_test[i]) for i in wrong}
    if sur_pred is not None and len(chosen) < n:
        for i in np.flatnonzero(net_pred != sur_pred):
            if int(i) not in chosen:
                chosen.append(int(i))
                seen.add(int(y_test[i]))
                break
    for i in np.flatnonzero(net_pred == y_test):
        if len(chosen) >= n:
            break
        if int(y_test[i]) not in seen:
            chosen.append(int(i))
            seen.add(int(y_test[i]))
    return chosen


def _surrogate_in_words(spec: SurrogateSpec, kernel: str, alpha: float) -> str:
    """e.g. "the trNTK kGLM distilled from the network's softmax at temperature 2 (L2 alpha = 1e-06)"."""
    a = spec.options.get("alpha", alpha)
    if spec.target == "labels":
        how = "fitted on the true labels"
    elif spec.temperature == 1.0:
        how = "distilled from the network's softmax probabilities"
    else:
        how = f"distilled from the network's softmax at temperature {spec.temperature:g}"
    solver = "the reference's SGD solver, " if spec.solver == "sgd" else ""
    return f"the {kernel} kGLM {how} ({solver}L2 alpha = {a:g})"


def _verdict(
    rows: Sequence[dict[str, Any]],
    specs: dict[str, SurrogateSpec],
    alpha: float,
    best: dict[str, Any],
    expl: Any,
    n_test: int,
    k: int,
    gallery_rows: Sequence[int],
) -> str:
    """The report's conclusion in plain English."""
    tau = float(best["tau"])
    words = _surrogate_in_words(specs[best["target"]], best["kernel"], alpha)
    tad = float(best["TAD (pp)"])
    text = (
        f"{words[0].upper()}{words[1:]} tracks the network most closely: Kendall τ = {tau:.2f} means "
        f"that for a random pair of test digits the network and this surrogate rank their confidence "
        f"in the true class the same way {50 * (1 + tau):.1f}% of the time ((1 + τ)/2, ties aside). "
    )
    if tad == 0:
        text += "It is exactly as accurate as the network."
    else:
        text += (f"It is {abs(tad):.1f} percentage points {'more' if tad > 0 else 'less'} accurate "
                 "than the network.")
    labelled = [r for r in rows if specs[r["target"]].target == "labels" and r["tau"] is not None]
    if labelled and specs[best["target"]].target != "labels":
        lb = max(labelled, key=lambda r: r["tau"])
        text += (
            f" Among surrogates fitted only on the true labels (the method's protocol) the most faithful "
            f"is the {lb['kernel']} kGLM ({lb['target']}), τ = {lb['tau']:.2f} "
            f"({50 * (1 + lb['tau']):.1f}% of pairs)."
        )
    worst = min(rows, key=lambda r: r["tau"])
    text += f" The least faithful is {worst['kernel']} / {worst['target']} (τ = {worst['tau']:.2f})."
    cov = [p.coverage_pos for p in expl if p.coverage_pos is not None]
    covn = [p.coverage_neg for p in expl if p.coverage_neg is not None]
    dis = len(expl.disagreements)
    if cov:
        text += (
            f" Explaining the network's own predicted class with it, the top {k} proponents carry a "
            f"median {100 * float(np.median(cov)):.0f}% of the positive contributions"
        )
        if covn:
            text += f" and the top {k} opponents {100 * float(np.median(covn)):.0f}% of the negative ones"
        text += (
            "; the rest is spread over the other training digits, so the gallery shows the largest "
            "pieces of each decision, not all of it."
        )
    text += f" Network and surrogate predict different classes on {dis} of {n_test} test digits"
    disagree = set(expl.disagreements)
    in_gallery = [i for i in gallery_rows if i in disagree]
    if in_gallery:
        text += (f"; the gallery shows {len(in_gallery)} of them (test digit"
                 f"{'s' if len(in_gallery) > 1 else ''} {', '.join(map(str, in_gallery))}, marked ✗).")
    else:
        text += "."
    return text


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
    full: list[dict[str, Any]] = []
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
        metrics, res = _metrics(net_test, sur_test, y_test)
        row.update(metrics)
        full.append({"kernel": kspec.name, "target": sspec.name, **res.to_dict()})
        row["kernel s"] = kernel_time[kspec.name]
        row["fit s"] = fit_s
        rows.append(row)
    bar.close()
    timings["surrogate fits"] = t_fits

    table = text_table(rows, digits=4)
    print(table, file=out, flush=True)
    for note in notes:
        print(note, file=out)
    gamma_notes = [
        f"Gamma of {f['kernel']} / {f['target']}: {f['gamma_reason']}."
        for f in full
        if f["gamma_reason"]
    ]

    # The most faithful surrogate (highest τ; the first in table order on a tie) explains the network's
    # own predicted class on every test digit.
    spec_by_name = {sp.name: sp for sp in surrogates}
    best = max(rows, key=lambda r: r["tau"])
    best_key = (best["kernel"], best["target"])
    best_sur = fitted[best_key][0]
    k = min(cfg.top_k, len(y_train))
    from tangentlens.explain import explain

    expl = explain(best_sur, blocks[best["kernel"]][1], k=k, train_labels=y_train,
                   network_logits=net_test, target="network", classes="target")
    net_pred = net_test.argmax(1)
    sur_pred = np.array([p.predicted_index for p in expl])
    rows_idx = _gallery_points(y_test, net_pred, cfg.gallery_rows, sur_pred)
    verdict = _verdict(rows, spec_by_name, cfg.alpha, best, expl, len(y_test), k, rows_idx)
    print(f"verdict: {verdict}", file=out, flush=True)

    # Figures: the scatter on trNTK (or the first kernel), the gallery on the most faithful surrogate.
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

    shown = [expl[i] for i in rows_idx]
    pi, pv, oi, ov = _gallery_arrays(shown, k)

    def cov_text(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.0f}%"

    titles = [
        f"test {p.test_index}: true {y_test[p.test_index]}\n"
        f"net {p.network_label} / sur {p.predicted_label} "
        + ("(agree)" if p.agrees else "✗ disagree")
        + f"\ntop-{k} carry {cov_text(p.coverage_pos)} of +,\n{cov_text(p.coverage_neg)} of −"
        for p in shown
    ]

    def pictures(index: np.ndarray) -> np.ndarray:
        imgs = data.to_image(data.x_train[torch.as_tensor(np.maximum(index.ravel(), 0))])
        imgs[index.ravel() < 0] = np.nan  # padding: an empty cell
        return imgs.reshape(*index.shape, 8, 8)

    def captions(index: np.ndarray) -> list[list[str]]:
        return [[f"train {j} (y={y_train[j]})" if j >= 0 else "" for j in r] for r in index]

    best_words = f"{best['kernel']} / {best['target']}, τ = {best['tau']:.3f}"
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
        query_colors=["black" if p.agrees else "tab:red" for p in shown],
        title=f"Why the network predicts its class, told by the most faithful surrogate ({best_words}):\n"
              f"top {k} proponents (green) and opponents (red) of the network's class; numbers are "
              f"contributions W[c,i]·κ(x,x_i) to the surrogate's logit",
    )
    images.append((path, f"Test digits (left; network class 'net', surrogate class 'sur', ✗ where they "
                         f"disagree) with the {k} training digits that push the surrogate's logit of "
                         f"the network's class up most (proponents, green) and down most (opponents, "
                         f"red), from the most faithful surrogate ({best_words}). 'top-{k} carry' is "
                         f"the share of all positive (negative) contributions that these {k} carry."))
    explain_rows = [
        {
            "test digit": p.test_index,
            "true": int(y_test[p.test_index]),
            "network": p.network_label,
            "surrogate": p.predicted_label,
            "agree": bool(p.agrees),
            "logit − b": p.target.logit - p.target.intercept,
            "sum +": p.target.positive_total,
            "sum −": p.target.negative_total,
            "top-k + (%)": _percent(p.coverage_pos),
            "top-k − (%)": _percent(p.coverage_neg),
            "shown/logit (%)": _percent(p.coverage_logit),
        }
        for p in shown
    ]
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
        "Surrogates ('target' column): 'labels' are fitted on the true training labels (the reference's "
        "target), 'distilled' on the network's softmax probabilities (the same L-BFGS solver and alpha), "
        "'labels (SGD ref)' with the reference's SGDClassifier settings (seeded; its probabilities are "
        "scikit-learn's normalized one-vs-rest sigmoids), 'distilled T=2 a=1e-6' on the network's "
        "probabilities at temperature 2 with a 100x weaker L2 penalty. All metrics are computed in "
        "float64 (tangentlens.faithfulness).",
        "trNTK0 is the unnormalized trace NTK divided by the standard deviation of its train x train block.",
        *gamma_notes,
        *notes,
    ]
    explanation_heading = (
        f"Explanations of the network's decisions (gallery digits; {best['kernel']} / {best['target']}, "
        f"top {k})"
    )
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
        verdict=verdict,
        columns=FAITHFULNESS_COLUMNS,
        tables=[(explanation_heading, explain_rows, EXPLANATION_COLUMNS)],
        extra={
            "most_faithful": {"kernel": best["kernel"], "target": best["target"], "tau": best["tau"]},
            "faithfulness": full,
            "explanations": {
                "surrogate": {"kernel": best["kernel"], "target": best["target"]},
                "target": "network",
                "k": k,
                "what": "for every test digit: the network's predicted class (the explained target), "
                        "the surrogate's class, whether they agree, the surrogate's logit of the target "
                        "class (logit, intercept, positive_total + negative_total = logit - intercept), "
                        "coverage_pos / coverage_neg (share of the positive / negative contributions "
                        "carried by the top-k proponents / opponents) and coverage_logit (their sum over "
                        "logit - intercept), and the top-k proponents / opponents (training indices, "
                        "labels, contributions W[c,i]·κ(x,x_i))",
                "gallery": rows_idx,
                "disagreements": expl.disagreements,
                "points": _explanation_records(expl, y_test),
            },
        },
    )
    print(f"report: {index}  ({timings['total']:.1f} s)", file=out, flush=True)
    return DemoResult(rows=rows, table=table, index=index, images=[p for p, _ in images], meta=meta,
                      notes=notes, verdict=verdict, explanation=expl)
