"""Explaining predictions by training examples: proponents, opponents and similar examples.

For a fitted kernel surrogate with per-class weights ``W`` (``surrogate.class_coef_``, C x N) the
logit of class ``c`` at a test point ``x`` decomposes over the N training points:

.. math:: z_c(x) - b_c = \\sum_i A_{c,i}(x), \\qquad A_{c,i}(x) = W_{c,i}\\,\\kappa(x, x_i).

*Proponents* of class ``c`` are the training points with the largest positive ``A_{c,i}``,
*opponents* those with the most negative. *Similar examples* are the largest entries of the kernel
row ``kappa(x, .)`` itself (no surrogate involved).

Results are small frozen dataclasses whose ``to_dict()`` returns plain Python (ints, floats, str,
lists, None), so consumers need neither numpy nor pandas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike

from tangentlens.errors import InputError

__all__ = [
    "Attribution",
    "ClassExplanation",
    "Explanation",
    "PointExplanation",
    "SimilarExamples",
    "contributions",
    "explain",
    "most_similar",
]


class SurrogateLike(Protocol):
    """What :func:`explain` needs: a fitted kernel surrogate from :mod:`tangentlens.surrogate`."""

    classes_: np.ndarray
    class_coef_: np.ndarray
    class_intercept_: np.ndarray
    n_features_in_: int

    def contributions(self, K_test_train: ArrayLike) -> np.ndarray: ...


def _py(v: Any) -> Any:
    """numpy scalars -> python scalars (labels may be ints, floats or strings)."""
    if isinstance(v, np.generic):
        return v.item()
    return v


@dataclass(frozen=True)
class Attribution:
    """One training point's role in a prediction.

    Attributes:
        index: Position of the training point (row/column of the train x train kernel).
        contribution: ``A_{c,i}(x) = W[c, i] * K[x, i]`` (:func:`most_similar`: the kernel value).
        kernel: ``K[x, i]``, the kernel value between the test and the training point.
        label: The training point's label when ``train_labels`` was given, else None.
    """

    index: int
    contribution: float
    kernel: float
    label: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return {
            "index": self.index,
            "contribution": self.contribution,
            "kernel": self.kernel,
            "label": self.label,
        }


@dataclass(frozen=True)
class ClassExplanation:
    """Top proponents and opponents of one class at one test point.

    Attributes:
        class_index: Position of the class (column of the logits).
        class_label: ``surrogate.classes_[class_index]``.
        logit: The surrogate's logit ``z_c(x)``.
        intercept: ``b_c``; ``logit - intercept`` is the sum of all N contributions.
        proponents: Up to k training points with the largest positive contributions, largest
            first (fewer if fewer are positive).
        opponents: Up to k training points with the most negative contributions, most negative
            first.
    """

    class_index: int
    class_label: Any
    logit: float
    intercept: float
    proponents: tuple[Attribution, ...]
    opponents: tuple[Attribution, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return {
            "class_index": self.class_index,
            "class_label": self.class_label,
            "logit": self.logit,
            "intercept": self.intercept,
            "proponents": [a.to_dict() for a in self.proponents],
            "opponents": [a.to_dict() for a in self.opponents],
        }


@dataclass(frozen=True)
class PointExplanation:
    """Explanation of one test point.

    Attributes:
        test_index: Row of the test x train block.
        predicted_index: Position of the surrogate's predicted class (argmax of its logits).
        predicted_label: ``classes_[predicted_index]``.
        classes: One :class:`ClassExplanation` per explained class.
    """

    test_index: int
    predicted_index: int
    predicted_label: Any
    classes: tuple[ClassExplanation, ...]

    def for_class(self, class_index: int) -> ClassExplanation:
        """The explanation of class position ``class_index``."""
        for c in self.classes:
            if c.class_index == class_index:
                return c
        raise InputError(
            f"class {class_index} was not explained for test point {self.test_index}."
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return {
            "test_index": self.test_index,
            "predicted_index": self.predicted_index,
            "predicted_label": self.predicted_label,
            "classes": [c.to_dict() for c in self.classes],
        }


@dataclass(frozen=True)
class Explanation:
    """Explanations of a set of test points (one :class:`PointExplanation` each, in row order)."""

    points: tuple[PointExplanation, ...]
    k: int

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> PointExplanation:
        return self.points[i]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.points)

    def to_dict(self) -> dict[str, Any]:
        """``{"k": int, "points": [...]}``, plain python."""
        return {"k": self.k, "points": [p.to_dict() for p in self.points]}


@dataclass(frozen=True)
class SimilarExamples:
    """The k training points with the largest kernel values to one test point.

    Attributes:
        test_index: Row of the test x train block.
        neighbors: :class:`Attribution` objects, most similar first; ``contribution`` and
            ``kernel`` both hold the kernel value.
    """

    test_index: int
    neighbors: tuple[Attribution, ...]

    @property
    def indices(self) -> list[int]:
        """Training indices, most similar first."""
        return [a.index for a in self.neighbors]

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return {"test_index": self.test_index, "neighbors": [a.to_dict() for a in self.neighbors]}


def _as_kernel(K: ArrayLike, n_train: int | None) -> np.ndarray:
    if hasattr(K, "detach"):
        K = K.detach().cpu().numpy()  # type: ignore[union-attr]
    A = np.asarray(K, dtype=np.float64)
    if A.ndim == 1:
        A = A[None, :]
    if A.ndim != 2:
        raise InputError(
            f"The test x train kernel block must be 2-D (n, N), got shape {A.shape}."
        )
    if n_train is not None and A.shape[1] != n_train:
        raise InputError(
            f"The test x train kernel block has {A.shape[1]} columns but the surrogate was fitted "
            f"on {n_train} training points; pass K[test, train] with one column per training "
            "point."
        )
    if not np.all(np.isfinite(A)):
        raise InputError("The test x train kernel block contains NaN or inf values.")
    return A


def _labels(train_labels: ArrayLike | None, n_train: int) -> list[Any] | None:
    if train_labels is None:
        return None
    if hasattr(train_labels, "detach"):
        train_labels = train_labels.detach().cpu().numpy()  # type: ignore[union-attr]
    lab = np.asarray(train_labels)
    if lab.ndim != 1 or lab.shape[0] != n_train:
        raise InputError(
            f"train_labels must be 1-D with one label per training point ({n_train}), got shape "
            f"{lab.shape}."
        )
    return [_py(v) for v in lab]


def _top(values: np.ndarray, k: int, sign: int) -> np.ndarray:
    """Indices of the k largest (sign=+1, only > 0) or most negative (sign=-1, only < 0) values.

    Ties are broken by the lower training index (stable sort).
    """
    v = sign * values
    order = np.argsort(-v, kind="stable")[:k]
    return order[v[order] > 0]


def _attributions(
    idx: np.ndarray, contrib: np.ndarray, krow: np.ndarray, labels: list[Any] | None
) -> tuple[Attribution, ...]:
    return tuple(
        Attribution(
            index=int(i),
            contribution=float(contrib[i]),
            kernel=float(krow[i]),
            label=None if labels is None else labels[i],
        )
        for i in idx
    )


def contributions(surrogate: SurrogateLike, K_test_train: ArrayLike) -> np.ndarray:
    """``A[n, c, i] = W[c, i] * K[n, i]`` (n, C, N); same as ``surrogate.contributions(K)``.

    ``A.sum(-1) == logits - class_intercept_`` to float rounding. Cost: n*C*N multiplications and
    8*n*C*N bytes.
    """
    return surrogate.contributions(K_test_train)


def explain(
    surrogate: SurrogateLike,
    K_test_train: ArrayLike,
    k: int = 5,
    train_labels: ArrayLike | None = None,
    *,
    classes: Literal["all", "predicted"] | Sequence[int] = "all",
    chunk_elements: int = 2**24,
) -> Explanation:
    """Top-k proponents and opponents per test point and class.

    Args:
        surrogate: A fitted surrogate with ``class_coef_`` (C x N), ``class_intercept_`` and
            ``contributions`` -- :class:`~tangentlens.surrogate.KernelSurrogate`,
            :class:`~tangentlens.surrogate.KernelRidgeSurrogate` or a two-class
            :class:`~tangentlens.surrogate.KernelSVMSurrogate`. For two-class logistic
            surrogates the per-class weights are symmetric (``[-w/2, w/2]``), so the proponents
            of one class are the opponents of the other with contributions ``w_i K_i / 2``.
        K_test_train: (n, N) test x train kernel block (a single row (N,) is accepted).
        k: Number of proponents and of opponents per class (>= 1).
        train_labels: Optional (N,) training labels, copied into each :class:`Attribution`.
        classes: ``"all"``, ``"predicted"`` (the surrogate's predicted class only) or a list of
            class positions.
        chunk_elements: Rows are processed in chunks of about this many ``n*C*N`` contributions
            (8 bytes each) to bound memory.

    Returns:
        An :class:`Explanation` with one :class:`PointExplanation` per row.
        Cost: O(n C N) time (contributions and an argsort per class), O(chunk_elements) memory.

    Raises:
        InputError: unfitted surrogate, wrong number of columns, NaN/inf, bad ``k``, labels or
            classes.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}.")
    W = getattr(surrogate, "class_coef_", None)
    if W is None:
        raise InputError(
            "explain() needs a fitted surrogate with per-class weights (class_coef_); fit it "
            "first (KernelSVMSurrogate has them for two classes only)."
        )
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(surrogate.class_intercept_, dtype=np.float64)
    C, N = W.shape
    K = _as_kernel(K_test_train, N)
    labels = _labels(train_labels, N)
    class_labels = [_py(c) for c in np.asarray(surrogate.classes_)]
    if isinstance(classes, str):
        if classes not in ("all", "predicted"):
            raise InputError(
                f"classes must be 'all', 'predicted' or a list of positions; got {classes!r}."
            )
        wanted: list[int] | None = list(range(C)) if classes == "all" else None
    else:
        wanted = [int(c) for c in classes]
        bad = [c for c in wanted if not 0 <= c < C]
        if bad:
            raise InputError(f"class positions {bad} are out of range 0..{C - 1}.")
    k = int(min(k, N))
    rows = max(1, int(chunk_elements // max(1, C * N)))
    points: list[PointExplanation] = []
    for start in range(0, K.shape[0], rows):
        Kb = K[start : start + rows]
        A = Kb[:, None, :] * W[None, :, :]  # (rows, C, N) == surrogate.contributions(Kb)
        Z = A.sum(axis=2) + b
        for r in range(Kb.shape[0]):
            pred = int(np.argmax(Z[r]))
            cls_list = [pred] if wanted is None else wanted
            expl = []
            for c in cls_list:
                a = A[r, c]
                expl.append(
                    ClassExplanation(
                        class_index=c,
                        class_label=class_labels[c],
                        logit=float(Z[r, c]),
                        intercept=float(b[c]),
                        proponents=_attributions(_top(a, k, +1), a, Kb[r], labels),
                        opponents=_attributions(_top(a, k, -1), a, Kb[r], labels),
                    )
                )
            points.append(
                PointExplanation(
                    test_index=start + r,
                    predicted_index=pred,
                    predicted_label=class_labels[pred],
                    classes=tuple(expl),
                )
            )
    return Explanation(points=tuple(points), k=k)


def most_similar(
    K_test_train: ArrayLike, k: int = 5, train_labels: ArrayLike | None = None
) -> tuple[SimilarExamples, ...]:
    """The k training points with the largest kernel values to each test point.

    Meant for a normalized kernel (cosine, e.g. trNTK), whose values are comparable across
    training points. Ties are broken by the lower training index.

    Args:
        K_test_train: (n, N) test x train kernel block (a single row (N,) is accepted).
        k: Number of neighbors (>= 1; capped at N).
        train_labels: Optional (N,) training labels copied into the results.

    Returns:
        One :class:`SimilarExamples` per test row. Cost: O(n N log N) (a stable argsort per row).

    Raises:
        InputError: non-2-D or non-finite kernel, bad ``k`` or labels.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}.")
    K = _as_kernel(K_test_train, None)
    N = K.shape[1]
    labels = _labels(train_labels, N)
    k = int(min(k, N))
    out = []
    for r in range(K.shape[0]):
        idx = np.argsort(-K[r], kind="stable")[:k]
        out.append(SimilarExamples(r, _attributions(idx, K[r], K[r], labels)))
    return tuple(out)
