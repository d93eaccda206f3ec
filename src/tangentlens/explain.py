"""Explaining predictions by training examples: proponents, opponents and similar examples.

For a fitted kernel surrogate with per-class weights ``W`` (``surrogate.class_coef_``, C x N) the
logit of class ``c`` at a test point ``x`` decomposes over the N training points:

.. math:: z_c(x) - b_c = \\sum_i A_{c,i}(x), \\qquad A_{c,i}(x) = W_{c,i}\\,\\kappa(x, x_i).

*Proponents* of class ``c`` are the training points with the largest positive ``A_{c,i}``,
*opponents* those with the most negative. *Similar examples* are the largest entries of the kernel
row ``kappa(x, .)`` itself (no surrogate involved).

Which class is explained matters: :func:`explain` explains the *network's* predicted class when
given the network's logits (``target="network"``, the default then), and flags the points where
network and surrogate disagree. Every explained class reports its *coverage*: the share of the
logit's positive (negative) mass that the k listed proponents (opponents) carry -- often small,
because a kernel machine's logit is a sum of many small, partly cancelling terms.

The results are the records of :mod:`tangentlens.explanation` (:class:`Explanation`,
:class:`SimilarExamples`; coverage is defined on :class:`ClassExplanation`), whose ``to_dict()``
returns plain Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike

from .arrays import to_numpy
from .errors import InputError
from .explanation import Attribution, ClassExplanation, Explanation, PointExplanation, SimilarExamples
from .logits import as_logits, class_positions

__all__ = ["contributions", "explain", "most_similar"]


class SurrogateLike(Protocol):
    """What :func:`explain` needs: a fitted kernel surrogate from :mod:`tangentlens.surrogate`."""

    classes_: np.ndarray
    class_coef_: np.ndarray
    class_intercept_: np.ndarray
    n_features_in_: int

    def contributions(self, K_test_train: ArrayLike) -> np.ndarray: ...


def _as_kernel(K: ArrayLike, n_train: int | None) -> np.ndarray:
    A = to_numpy(K, np.float64)
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
    lab = to_numpy(train_labels)
    if lab.ndim != 1 or lab.shape[0] != n_train:
        raise InputError(
            f"train_labels must be 1-D with one label per training point ({n_train}), got shape "
            f"{lab.shape}."
        )
    return lab.tolist()


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


def _network_classes(network_logits: ArrayLike, n: int, C: int) -> np.ndarray:
    """(n,) argmax class positions of the network's logits (``z > 0`` for one logit)."""
    Z = as_logits(network_logits, "network_logits")  # float64; (n,) / (n, 1) -> [0, z]
    if Z.shape[0] != n:
        raise InputError(
            f"network_logits has {Z.shape[0]} rows but K_test_train has {n}; pass the network's "
            "logits on the same test points, in the same order."
        )
    if Z.shape[1] != C:
        raise InputError(
            f"network_logits has {Z.shape[1]} classes (a single logit counts as two) but the "
            f"surrogate has {C}; pass (n, {C}) logits whose columns follow surrogate.classes_."
        )
    return np.argmax(Z, axis=1)


_TARGET_HELP = (
    "pass target='network' (the network's predicted class; needs network_logits=), "
    "target='surrogate' (the surrogate's predicted class) or an (n,) integer array of class "
    "positions 0..{last} (one per test point; for one class everywhere np.full(n, c))"
)


def _resolve_target(
    target: Literal["network", "surrogate"] | ArrayLike | None,
    network_pred: np.ndarray | None,
    n: int,
    C: int,
) -> tuple[np.ndarray | None, str]:
    """``(explicit (n,) class positions or None for 'surrogate', source name)``."""
    help_ = _TARGET_HELP.format(last=C - 1)
    if target is None:
        target = "surrogate" if network_pred is None else "network"
    if isinstance(target, str):
        if target == "network":
            if network_pred is None:
                raise InputError(
                    "target='network' needs the network's logits: pass network_logits= (n, C) "
                    "on the same test points, or use target='surrogate'."
                )
            return network_pred, "network"
        if target == "surrogate":
            return None, "surrogate"
        raise InputError(f"Unknown target {target!r}; {help_}.")
    return class_positions(target, n, C, name="target", rows="test points", fix=help_ + "."), "given"


def _class_explanation(
    c: int,
    a: np.ndarray,
    z: float,
    b: float,
    krow: np.ndarray,
    k: int,
    class_label: Any,
    labels: list[Any] | None,
) -> ClassExplanation:
    return ClassExplanation(
        class_index=c,
        class_label=class_label,
        logit=z,
        intercept=b,
        proponents=_attributions(_top(a, k, +1), a, krow, labels),
        opponents=_attributions(_top(a, k, -1), a, krow, labels),
        positive_total=float(a[a > 0].sum()),
        negative_total=float(a[a < 0].sum()),
    )


def explain(
    surrogate: SurrogateLike,
    K_test_train: ArrayLike,
    k: int = 5,
    train_labels: ArrayLike | None = None,
    *,
    network_logits: ArrayLike | None = None,
    target: Literal["network", "surrogate"] | ArrayLike | None = None,
    classes: Literal["all", "target", "predicted"] | Sequence[int] = "all",
    chunk_elements: int = 2**24,
) -> Explanation:
    """Top-k proponents and opponents per test point and class, for a chosen target class.

    Each point's *target* is the class whose logit ``z_c(x) − b_c = Σ_i A_{c,i}(x)`` is explained:

    * ``target="network"`` -- the network's own decision, ``argmax`` of ``network_logits`` (the
      default when ``network_logits`` is given). The surrogate's decomposition of *that* class's
      logit says which training points push the surrogate towards the network's answer;
    * ``target="surrogate"`` -- the surrogate's predicted class (the default without
      ``network_logits``: then the explanation answers "why does the surrogate decide this",
      which differs from the network's decision wherever the two disagree);
    * an (n,) integer array of class positions -- any class per point (e.g. the true labels).

    With ``network_logits`` every point also records the network's class and ``agrees``, whether
    the network and the surrogate predict the same class. Each point's target class carries the
    coverage figures defined in :class:`ClassExplanation`: ``coverage_pos`` (share of the positive
    contributions carried by the top-k proponents), ``coverage_neg`` (the same for opponents) and
    ``coverage_logit`` (share of ``z − b`` that the shown proponents and opponents sum to).

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
        network_logits: Optional (n, C) logits of the network on the same test points, columns in
            the order of ``surrogate.classes_`` (numpy or torch, any float dtype; (n,) or (n, 1)
            for a single-logit binary network, class 1 where ``z > 0``).
        target: ``"network"``, ``"surrogate"``, an (n,) array of class positions, or ``None``
            (``"network"`` when ``network_logits`` is given, else ``"surrogate"``).
        classes: Which classes to list in ``PointExplanation.classes``: ``"all"``, ``"target"``
            (the target class only), ``"predicted"`` (the surrogate's predicted class only) or a
            list of class positions. The target class is explained in ``PointExplanation.target``
            in every case.
        chunk_elements: Rows are processed in chunks of about this many ``n*C*N`` contributions
            (8 bytes each) to bound memory.

    Returns:
        An :class:`Explanation` with one :class:`PointExplanation` per row.
        Cost: O(n C N) time (contributions and an argsort per class), O(chunk_elements) memory.

    Raises:
        InputError: unfitted surrogate, wrong number of columns, NaN/inf, bad ``k``, labels,
            classes, ``network_logits`` of the wrong shape, or a ``target`` that is not
            ``"network"`` / ``"surrogate"`` / an (n,) array of class positions (the message says
            what to pass); ``target="network"`` without ``network_logits``.
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
    n = K.shape[0]
    labels = _labels(train_labels, N)
    class_labels = np.asarray(surrogate.classes_).tolist()
    net_pred = None if network_logits is None else _network_classes(network_logits, n, C)
    given, source = _resolve_target(target, net_pred, n, C)
    if isinstance(classes, str):
        if classes not in ("all", "target", "predicted"):
            raise InputError(
                f"classes must be 'all', 'target', 'predicted' or a list of positions; got "
                f"{classes!r}."
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
    for start in range(0, n, rows):
        Kb = K[start : start + rows]
        A = Kb[:, None, :] * W[None, :, :]  # (rows, C, N) == surrogate.contributions(Kb)
        Z = A.sum(axis=2) + b
        for r in range(Kb.shape[0]):
            i = start + r
            pred = int(np.argmax(Z[r]))
            tgt = pred if given is None else int(given[i])
            if wanted is not None:
                cls_list = wanted
            else:
                cls_list = [tgt] if classes == "target" else [pred]
            expl = {
                c: _class_explanation(c, A[r, c], float(Z[r, c]), float(b[c]), Kb[r], k,
                                      class_labels[c], labels)
                for c in dict.fromkeys([*cls_list, tgt])
            }
            net = None if net_pred is None else int(net_pred[i])
            points.append(
                PointExplanation(
                    test_index=i,
                    predicted_index=pred,
                    predicted_label=class_labels[pred],
                    classes=tuple(expl[c] for c in cls_list),
                    target_index=tgt,
                    target_label=class_labels[tgt],
                    target_source=source,
                    network_index=net,
                    network_label=None if net is None else class_labels[net],
                    agrees=None if net is None else net == pred,
                    target=expl[tgt],
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
