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


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0.0 else float(num / den)


@dataclass(frozen=True)
class ClassExplanation:
    """Top proponents and opponents of one class at one test point, and how much they carry.

    With ``a_i = A_{c,i}(x)`` the N contributions to class ``c``, ``S+ = Σ_{a_i > 0} a_i`` and
    ``S- = Σ_{a_i < 0} a_i`` (so ``S+ + S- = z_c(x) − b_c``), and ``P+`` / ``P-`` the top-k
    proponents / opponents:

    * ``coverage_pos = Σ_{i∈P+} a_i / S+`` -- the share of the positive mass that the top-k
      proponents carry, in [0, 1] (``None`` when no contribution is positive);
    * ``coverage_neg = Σ_{i∈P-} a_i / S-`` -- the same for the opponents and the negative mass,
      in [0, 1] (``None`` when none is negative);
    * ``coverage_logit = (Σ_{i∈P+} a_i + Σ_{i∈P-} a_i) / (z_c(x) − b_c)`` -- the share of the
      logit (minus intercept) that the shown proponents and opponents sum to (``None`` when
      ``z_c = b_c``). It is not confined to [0, 1]: when large positive and negative masses cancel
      (a logit of +45 − 34 = 11) a few extreme contributions can sum to more than the logit, or
      to the opposite sign.

    A small ``coverage_pos`` means the explanation is spread over many training points and the
    top-k list shows only a sliver of it.

    Attributes:
        class_index: Position of the class (column of the logits).
        class_label: ``surrogate.classes_[class_index]``.
        logit: The surrogate's logit ``z_c(x)``.
        intercept: ``b_c``; ``logit - intercept`` is the sum of all N contributions.
        proponents: Up to k training points with the largest positive contributions, largest
            first (fewer if fewer are positive).
        opponents: Up to k training points with the most negative contributions, most negative
            first.
        positive_total: ``S+``, the sum of all positive contributions (>= 0).
        negative_total: ``S-``, the sum of all negative contributions (<= 0).
    """

    class_index: int
    class_label: Any
    logit: float
    intercept: float
    proponents: tuple[Attribution, ...]
    opponents: tuple[Attribution, ...]
    positive_total: float = 0.0
    negative_total: float = 0.0

    @property
    def coverage_pos(self) -> float | None:
        """``Σ top-k proponents / S+`` in [0, 1]; ``None`` when ``S+ = 0``."""
        return _ratio(sum(a.contribution for a in self.proponents), self.positive_total)

    @property
    def coverage_neg(self) -> float | None:
        """``Σ top-k opponents / S-`` in [0, 1]; ``None`` when ``S- = 0``."""
        return _ratio(sum(a.contribution for a in self.opponents), self.negative_total)

    @property
    def coverage_logit(self) -> float | None:
        """``(Σ top-k proponents + Σ top-k opponents) / (logit − intercept)``; ``None`` if 0/0."""
        shown = sum(a.contribution for a in self.proponents + self.opponents)
        return _ratio(shown, self.positive_total + self.negative_total)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (coverages are ``None`` where undefined)."""
        return {
            "class_index": self.class_index,
            "class_label": self.class_label,
            "logit": self.logit,
            "intercept": self.intercept,
            "positive_total": self.positive_total,
            "negative_total": self.negative_total,
            "coverage_pos": self.coverage_pos,
            "coverage_neg": self.coverage_neg,
            "coverage_logit": self.coverage_logit,
            "proponents": [a.to_dict() for a in self.proponents],
            "opponents": [a.to_dict() for a in self.opponents],
        }


@dataclass(frozen=True)
class PointExplanation:
    """Explanation of one test point.

    Attributes:
        test_index: Row of the test x train block.
        predicted_index: Position of the surrogate's predicted class (argmax of its logits); also
            available as ``surrogate_index``.
        predicted_label: ``classes_[predicted_index]``.
        classes: One :class:`ClassExplanation` per class selected with ``classes=``.
        target_index: The class whose logit is explained (see ``target`` of :func:`explain`).
        target_label: ``classes_[target_index]``.
        target_source: ``"network"``, ``"surrogate"`` or ``"given"`` (an explicit class array).
        network_index: Position of the network's predicted class (argmax of ``network_logits``;
            ``z > 0`` for a single logit), ``None`` when no network logits were given.
        network_label: ``classes_[network_index]`` or ``None``.
        agrees: ``network_index == predicted_index``; ``None`` without network logits. Where it
            is ``False`` the surrogate's logit of the network's class is not the surrogate's own
            decision, and the explanation describes a model that decides differently.
        target: The :class:`ClassExplanation` of ``target_index`` (always computed, whether or not
            ``classes`` selects it); its coverages are this point's coverage figures.
    """

    test_index: int
    predicted_index: int
    predicted_label: Any
    classes: tuple[ClassExplanation, ...]
    target_index: int
    target_label: Any
    target_source: str
    network_index: int | None
    network_label: Any
    agrees: bool | None
    target: ClassExplanation

    @property
    def surrogate_index(self) -> int:
        """The surrogate's predicted class position (= ``predicted_index``)."""
        return self.predicted_index

    @property
    def coverage_pos(self) -> float | None:
        """``target.coverage_pos``: share of the positive mass carried by the top-k proponents."""
        return self.target.coverage_pos

    @property
    def coverage_neg(self) -> float | None:
        """``target.coverage_neg``: share of the negative mass carried by the top-k opponents."""
        return self.target.coverage_neg

    @property
    def coverage_logit(self) -> float | None:
        """``target.coverage_logit``: share of ``z − b`` that the shown points sum to."""
        return self.target.coverage_logit

    def for_class(self, class_index: int) -> ClassExplanation:
        """The explanation of class position ``class_index`` (the target's is always there)."""
        for c in self.classes:
            if c.class_index == class_index:
                return c
        if class_index == self.target_index:
            return self.target
        raise InputError(
            f"class {class_index} was not explained for test point {self.test_index}."
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return {
            "test_index": self.test_index,
            "predicted_index": self.predicted_index,
            "predicted_label": self.predicted_label,
            "target_index": self.target_index,
            "target_label": self.target_label,
            "target_source": self.target_source,
            "network_index": self.network_index,
            "network_label": self.network_label,
            "agrees": self.agrees,
            "coverage_pos": self.coverage_pos,
            "coverage_neg": self.coverage_neg,
            "coverage_logit": self.coverage_logit,
            "target": self.target.to_dict(),
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

    @property
    def disagreements(self) -> list[int]:
        """Test indices where the network and the surrogate predict different classes."""
        return [p.test_index for p in self.points if p.agrees is False]

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


def _network_classes(network_logits: ArrayLike, n: int, C: int) -> np.ndarray:
    """(n,) argmax class positions of the network's logits (``z > 0`` for one logit)."""
    from tangentlens.faithfulness import _as_logits

    Z = _as_logits(network_logits, "network_logits")  # float64; (n,) / (n, 1) -> [0, z]
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
    if hasattr(target, "detach"):
        target = target.detach().cpu().numpy()  # type: ignore[union-attr]
    t = np.asarray(target)
    if t.ndim != 1 or t.shape[0] != n:
        raise InputError(f"target has shape {t.shape} but there are {n} test points; {help_}.")
    if t.dtype.kind == "f" and np.all(np.isfinite(t)) and np.all(t == np.round(t)):
        t = t.astype(np.int64)
    if t.dtype.kind not in "iu" or (n and (t.min() < 0 or t.max() >= C)):
        raise InputError(f"target must hold integer class positions 0..{C - 1}; {help_}.")
    return t.astype(np.int64), "given"


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
    class_labels = [_py(c) for c in np.asarray(surrogate.classes_)]
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
