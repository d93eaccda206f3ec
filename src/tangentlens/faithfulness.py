"""Faithfulness of a surrogate to its network: rank correlation, accuracy, error overlap, R².

:func:`faithfulness` compares the network's and the surrogate's logits on the same test points;
:func:`aggregate` summarizes results over independently trained models (seeds) as mean ± standard
error; :func:`format_mean_se` writes the "0.809(9)" notation.

Logits are read as :mod:`tangentlens.logits` describes: (n, C) logits with C >= 2, or (n,) / (n, 1)
single logits ``z`` of a binary model, read as ``[0, z]`` (``p(class 1) = sigmoid(z)``, prediction
``z > 0``); labels are (n,) integer class positions ``0..C-1``.

Precision: every input is converted to float64 numpy *before* anything is computed, so softmax
probabilities, log-odds, ranks and every metric are the same whether the caller hands over float32
or float64 logits (or torch tensors of either). A float32 softmax saturates to exactly 1.0 once the
true-class log-odds exceed about 16.6 (1 − p < 2⁻²⁵), which ties every confident point and lowers τ;
in float64 that happens only above about 37.4 (1 − p < 2⁻⁵⁴). ``tau_mode="logit"`` never
saturates. :func:`softmax64` and :func:`log_odds64` are the same float64 helpers for callers that
need the probabilities themselves (the demo and :mod:`tangentlens.attribution` use them). To compare
probabilities that are not a softmax of logits (e.g. Platt-scaled SVM probabilities or scikit-learn's
one-vs-rest SGD probabilities) pass ``np.log(p)``: ``softmax(log p) = p``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from scipy.special import logsumexp, softmax

from .errors import InputError, UnknownKindError
from .logits import as_logits, class_positions

__all__ = [
    "AggregateResult",
    "FaithfulnessResult",
    "MeanSE",
    "aggregate",
    "faithfulness",
    "format_mean_se",
    "log_odds64",
    "misclassification_overlap",
    "softmax64",
]

TauMode = Literal["true_class", "class1", "logit"]
_TAU_MODES = ("true_class", "class1", "logit")
SaturationPrecision = Literal["float32", "float64"]
_SATURATION_PRECISIONS = ("float32", "float64")
_MAP_LABELS = "Map class labels to positions with np.searchsorted(classes_, y)."


@dataclass(frozen=True)
class FaithfulnessResult:
    """Faithfulness metrics of one surrogate against one network on n test points.

    Attributes:
        tau: Kendall tau-b between network and surrogate confidence (see ``tau_mode``).
        tau_p: Two-sided p-value of ``tau`` (``scipy.stats.kendalltau``).
        tad: Test accuracy differential, ``surrogate_acc - network_acc`` (a fraction, not pp).
        network_acc: Network accuracy (argmax of its logits vs ``labels``).
        surrogate_acc: Surrogate accuracy.
        gamma: Misclassification overlap ``|both wrong| / |either wrong|``; NaN when neither errs
            (``gamma_reason`` then says so).
        gamma_p: The reference's binomial p-value of ``gamma`` under independence (see
            :func:`misclassification_overlap`); NaN when ``gamma`` is NaN.
        gamma_p_fisher: One-sided exact (hypergeometric, Fisher) p-value of observing at least
            ``|both wrong|`` common errors given the two error counts; NaN when ``gamma`` is NaN.
        r2: Linearization R²: squared Pearson correlation (= R² of the least-squares line) between
            the network's and the surrogate's *centered* logits ``z_c - mean_c z``, flattened over
            points and classes. Centering removes softmax's per-point shift freedom; for two
            classes it is the R² between the two log-odds. NaN if either side is constant.
        n: Number of test points.
        n_tau: Points used for tau (fewer than ``n`` with ``drop_saturated``).
        network_errors: W, the number of network errors.
        surrogate_errors: Omega, the number of surrogate errors.
        both_errors: Points both get wrong.
        tau_mode: The confidence used for tau.
        gamma_reason: ``None`` when Γ is defined and informative. Otherwise a sentence saying why
            it is not: ``"neither model misclassifies any test point ..."`` (Γ = 0/0, reported as
            NaN with NaN p-values), or ``"the network makes no errors ..."`` /
            ``"the surrogate makes no errors ..."`` (Γ = 0 trivially, p-values 1).
        n_saturated: Points (of the ``n_tau`` used) whose network or surrogate τ probability is
            exactly 0.0 or 1.0 in float64, i.e. tied by rounding (true-class log-odds beyond
            about ±37.4); 0 for ``tau_mode="logit"``. When it is a large share of ``n_tau``,
            prefer ``tau_mode="logit"``.
    """

    tau: float
    tau_p: float
    tad: float
    network_acc: float
    surrogate_acc: float
    gamma: float
    gamma_p: float
    gamma_p_fisher: float
    r2: float
    n: int
    n_tau: int
    network_errors: int
    surrogate_errors: int
    both_errors: int
    tau_mode: str
    gamma_reason: str | None = None
    n_saturated: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (floats, ints, str, and ``None`` for an absent ``gamma_reason``)."""
        return asdict(self)


def softmax64(logits: ArrayLike) -> np.ndarray:
    """Softmax over the last axis, computed in float64 whatever the input dtype.

    ``p_c = exp(z_c − max z) / Σ_c' exp(z_c' − max z)`` after converting ``logits`` (numpy, torch,
    any float or integer dtype) to float64. A (n,) or (n, 1) input is a single-logit binary model
    and gives the (n, 2) probabilities of ``[0, z]``, i.e. ``[1 − σ(z), σ(z)]``.

    Args:
        logits: (n, C) logits, or (n,) / (n, 1) single logits.

    Returns:
        (n, C) float64 probabilities (C = 2 for single logits). Cost O(n C).

    Raises:
        InputError: non-numeric, empty, non-finite or more than 2-D input.
    """
    return softmax(as_logits(logits, "logits"), axis=1)


def log_odds64(logits: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Log-odds of the labelled class, ``z_y − logsumexp_{c≠y} z_c``, in float64.

    Equal to ``log p_y − log(1 − p_y)`` with ``p = softmax(z)``, but computed without forming
    ``p``, so it never saturates (float64 ``p_y`` rounds to 1.0 once this exceeds about 37.4). For
    two classes it is ``z_y − z_other``; for a single logit ``z`` it is ``z`` (label 1) or ``−z``
    (label 0).

    Args:
        logits: (n, C) logits, or (n,) / (n, 1) single logits (any float dtype; converted to
            float64 first).
        labels: (n,) integer class positions ``0..C-1``.

    Returns:
        (n,) float64 log-odds. Cost O(n C).

    Raises:
        InputError: bad logits, or labels of the wrong length or out of range.
    """
    Z = as_logits(logits, "logits")
    y = class_positions(labels, Z.shape[0], Z.shape[1], name="labels", rows="logit rows",
                        fix="pass one label per row, to match the logits' rows. " + _MAP_LABELS)
    return _confidence(Z, y, "logit")


def _gamma_reason(network_errors: int, surrogate_errors: int) -> str | None:
    """Why Γ is undefined or trivial for these error counts (``None`` when it is informative)."""
    if network_errors == 0 and surrogate_errors == 0:
        return (
            "neither model misclassifies any test point, so there are no errors to overlap "
            "(Γ = 0/0 is undefined)"
        )
    if network_errors == 0:
        return (
            "the network makes no errors on these test points, so no error can be shared "
            "(Γ = 0 trivially, p = 1)"
        )
    if surrogate_errors == 0:
        return (
            "the surrogate makes no errors on these test points, so no error can be shared "
            "(Γ = 0 trivially, p = 1)"
        )
    return None


def misclassification_overlap(
    network_wrong: ArrayLike, surrogate_wrong: ArrayLike
) -> tuple[float, float, float]:
    """Misclassification overlap Γ and its p-values under independence.

    With W network errors, Ω surrogate errors, B common errors and N points:

    * ``gamma = B / |either wrong|`` (NaN when nobody errs);
    * ``gamma_p`` -- exactly the reference's test: ``P_both = Ω·W / N²`` and
      ``p = 1 − BinomCDF(⌊W·Γ⌋; W, P_both)`` (``binom.cdf`` floors a non-integer argument),
      computed as ``binom.sf`` so that tiny p-values do not round to 0. Edge cases: NaN when
      ``gamma`` is NaN; 1.0 when ``W == 0`` or ``Ω == 0`` (no overlap is possible, so no evidence
      of correlated errors, while the raw formula would give 0);
    * ``gamma_p_fisher`` -- the exact one-sided test that conditions on W and Ω:
      ``P(X >= B)`` for ``X ~ Hypergeometric(N, W, Ω)``; NaN when ``gamma`` is NaN.

    Caveat on ``gamma_p``: under independence each of the W network errors is also a surrogate
    error with probability Ω/N, not Ω·W/N², and the statistic ⌊W·Γ⌋ is not the count of common
    errors. The reference's p-value therefore understates the chance overlap (it is much smaller
    than the exact test's, and exactly 0 whenever the error sets coincide). It is kept to compare
    with the published numbers; ``gamma_p_fisher`` is the statistically sound one.

    Args:
        network_wrong: (N,) booleans, True where the network errs.
        surrogate_wrong: (N,) booleans, True where the surrogate errs.

    Returns:
        ``(gamma, gamma_p, gamma_p_fisher)``. Cost O(N).
    """
    a = np.asarray(network_wrong, dtype=bool).ravel()
    b = np.asarray(surrogate_wrong, dtype=bool).ravel()
    if a.shape != b.shape:
        raise InputError(
            f"network_wrong and surrogate_wrong must have the same length, got {a.size} and "
            f"{b.size}."
        )
    N = a.size
    W = int(a.sum())
    Om = int(b.sum())
    B = int(np.logical_and(a, b).sum())
    U = int(np.logical_or(a, b).sum())
    if U == 0:
        return math.nan, math.nan, math.nan
    gamma = B / U
    if W == 0 or Om == 0:
        return gamma, 1.0, 1.0
    p_both = Om * W / N**2
    gamma_p = float(stats.binom.sf(math.floor(W * gamma), W, p_both))
    gamma_p_fisher = float(stats.hypergeom.sf(B - 1, N, W, Om))
    return gamma, gamma_p, gamma_p_fisher


def _confidence(Z: np.ndarray, labels: np.ndarray, mode: str) -> np.ndarray:
    n, C = Z.shape
    rows = np.arange(n)
    if mode == "true_class":
        return softmax(Z, axis=1)[rows, labels]
    if mode == "class1":
        return softmax(Z, axis=1)[:, 1]
    # "logit": true-class log-odds z_y - logsumexp_{c != y} z_c, stable, never saturates
    other = Z.copy()
    other[rows, labels] = -np.inf
    return Z[rows, labels] - logsumexp(other, axis=1)


def _log_odds(Z: np.ndarray, labels: np.ndarray, mode: str) -> np.ndarray:
    """Log-odds of the probability that ``_confidence`` returns for ``mode`` (rank-equivalent to it)."""
    if mode == "class1":
        return _confidence(Z, np.ones(Z.shape[0], dtype=np.int64), "logit")
    return _confidence(Z, labels, "logit")


def _r2(a: np.ndarray, b: np.ndarray) -> float:
    x = (a - a.mean(axis=1, keepdims=True)).ravel().astype(np.float64)
    y = (b - b.mean(axis=1, keepdims=True)).ravel().astype(np.float64)
    x = x - x.mean()
    y = y - y.mean()
    sxx = float(x @ x)
    syy = float(y @ y)
    if sxx == 0.0 or syy == 0.0:
        return math.nan
    return float((x @ y) ** 2 / (sxx * syy))


def faithfulness(
    network_logits: ArrayLike,
    surrogate_logits: ArrayLike,
    labels: ArrayLike,
    *,
    tau_mode: TauMode = "true_class",
    drop_saturated: bool = False,
    saturation_precision: SaturationPrecision = "float32",
) -> FaithfulnessResult:
    """Compare a surrogate with its network on the same test points.

    Both logit arrays are converted to float64 first, so every number below is the same for
    float32 and float64 inputs (see the module docstring). Kendall τ-b
    (``scipy.stats.kendalltau``) is taken between the network's and the surrogate's confidence
    per test point:

    * ``"true_class"`` (default): softmax probability of the true class,
      ``p_y = exp(z_y) / Σ_c exp(z_c)`` (float64);
    * ``"class1"``: probability of class 1 (binary models only) -- the reference's choice;
    * ``"logit"``: true-class log-odds ``z_y − logsumexp_{c≠y} z_c`` (for two classes
      ``z_y − z_other``; for a single-logit model ``±z``). Rank-equivalent to ``"true_class"`` in
      exact arithmetic, but computed without ever saturating, so it has no float ties.

    τ-b = (n_c − n_d) / sqrt((n_0 − n_1)(n_0 − n_2)) over the n_0 = n(n−1)/2 pairs (n_c concordant,
    n_d discordant pairs, n_1 / n_2 pairs tied in the network's / surrogate's confidence). Without
    ties a random pair of test points is ranked the same way by both with probability (1 + τ)/2.

    With ``drop_saturated=True`` (the reference's handling; probability modes only) points where the
    *network's* τ probability is exactly 0.0 or 1.0 at ``saturation_precision`` are dropped before
    τ. The default ``"float32"`` is the reference's: a softmax computed in float32 (as its float32
    networks did) from the logits rounded to float32, which is 1.0 once the log-odds exceed about
    16.6 and 0.0 below about −88.7. Only this mask uses float32, and it is computed the same way
    for float32 and float64 inputs, so the dropped points do not depend on the caller's dtype
    (beyond float64 logits within a float32 rounding of the threshold). The kept points are ranked in
    float64, the network by its probability and the surrogate by the log-odds of the same
    probability (rank-equivalent, never saturating), as the reference's softmax across test points
    of the surrogate logits was. A surrogate with huge logits thus loses no points to its own float
    saturation.

    Accuracy, TAD, Γ and R² always use all points. Predictions are the argmax of the logits
    (``z > 0`` for single-logit models); labels are class positions ``0..C-1``. Γ is undefined when
    neither model errs and trivial (0) when only one does; ``gamma_reason`` then says which.

    Args:
        network_logits: (n, C) or (n,) network logits (numpy or torch, any float dtype).
        surrogate_logits: (n, C) or (n,) surrogate logits (e.g. ``KernelSurrogate.logits``).
        labels: (n,) integer true labels in ``0..C-1``.
        tau_mode: ``"true_class"``, ``"class1"`` or ``"logit"``.
        drop_saturated: Drop saturated network probabilities before τ.
        saturation_precision: ``"float32"`` (default, the reference's) or ``"float64"``: the
            precision at which ``drop_saturated`` tests for exactly 0 or 1.

    Returns:
        A :class:`FaithfulnessResult`. Cost: O(n log n) for τ, O(n C) otherwise.

    Raises:
        InputError: shapes or lengths disagree, labels out of range, non-finite logits,
            ``"class1"`` on a model with more than two classes, fewer than 2 points left for τ.
        UnknownKindError: unknown ``tau_mode`` or ``saturation_precision``.
    """
    if tau_mode not in _TAU_MODES:
        raise UnknownKindError(f"Unknown tau_mode {tau_mode!r}; use one of {_TAU_MODES}.")
    if saturation_precision not in _SATURATION_PRECISIONS:
        raise UnknownKindError(
            f"Unknown saturation_precision {saturation_precision!r}; use one of "
            f"{_SATURATION_PRECISIONS}."
        )
    Zn = as_logits(network_logits, "network_logits")
    Zs = as_logits(surrogate_logits, "surrogate_logits")
    n = Zn.shape[0]
    if Zs.shape[0] != n:
        raise InputError(
            f"network_logits, surrogate_logits and labels must cover the same test points: got "
            f"{n} and {Zs.shape[0]} logit rows."
        )
    if Zn.shape[1] != Zs.shape[1]:
        raise InputError(
            f"network_logits has {Zn.shape[1]} classes and surrogate_logits {Zs.shape[1]} "
            "(a single logit counts as two classes); pass logits over the same classes."
        )
    C = Zn.shape[1]
    y = class_positions(labels, n, C, name="labels", rows="test points",
                        fix="network_logits, surrogate_logits and labels must cover the same test "
                            "points. " + _MAP_LABELS)
    if tau_mode == "class1" and C != 2:
        raise InputError(
            f"tau_mode='class1' is for binary models, but the logits have {C} classes; use "
            "tau_mode='true_class'."
        )

    an = _confidence(Zn, y, tau_mode)
    keep = np.ones(n, dtype=bool)
    if drop_saturated and tau_mode != "logit":
        # the reference: drop points whose *network* probability is exactly 0 or 1 (at the
        # reference's float32 precision by default), and rank the surrogate by a monotone,
        # non-saturating score of the same probability (its log-odds)
        if saturation_precision == "float32":
            # the reference's float32 softmax (computed in float32, as its network did); only the
            # mask comes from it, so float32 and float64 logits drop the same points
            sat = _confidence(Zn.astype(np.float32), y, tau_mode)
        else:
            sat = an
        keep = (sat > 0) & (sat < 1)
        as_ = _log_odds(Zs, y, tau_mode)
    else:
        as_ = _confidence(Zs, y, tau_mode)
    n_tau = int(keep.sum())
    if n_tau < 2:
        raise InputError(
            f"Only {n_tau} test points are left for Kendall tau (after dropping saturated "
            "probabilities); pass more points, use tau_mode='logit' or drop_saturated=False."
        )
    res = stats.kendalltau(an[keep], as_[keep], variant="b")
    tau = float(res.statistic)
    tau_p = float(res.pvalue)
    if tau_mode == "logit":
        n_saturated = 0
    else:
        sat_n = (an == 0.0) | (an == 1.0)
        # with drop_saturated the surrogate is ranked by its log-odds, which never saturate
        sat_s = np.zeros(n, dtype=bool) if drop_saturated else (as_ == 0.0) | (as_ == 1.0)
        n_saturated = int(((sat_n | sat_s) & keep).sum())

    pred_n = np.argmax(Zn, axis=1)
    pred_s = np.argmax(Zs, axis=1)
    wrong_n = pred_n != y
    wrong_s = pred_s != y
    net_acc = 1.0 - float(wrong_n.mean())
    sur_acc = 1.0 - float(wrong_s.mean())
    gamma, gamma_p, gamma_p_f = misclassification_overlap(wrong_n, wrong_s)
    return FaithfulnessResult(
        tau=tau,
        tau_p=tau_p,
        tad=sur_acc - net_acc,
        network_acc=net_acc,
        surrogate_acc=sur_acc,
        gamma=float(gamma),
        gamma_p=float(gamma_p),
        gamma_p_fisher=float(gamma_p_f),
        r2=_r2(Zn, Zs),
        n=int(n),
        n_tau=n_tau,
        network_errors=int(wrong_n.sum()),
        surrogate_errors=int(wrong_s.sum()),
        both_errors=int(np.logical_and(wrong_n, wrong_s).sum()),
        tau_mode=tau_mode,
        gamma_reason=_gamma_reason(int(wrong_n.sum()), int(wrong_s.sum())),
        n_saturated=n_saturated,
    )


# --------------------------------------------------------------------------------------------
# aggregation over seeds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanSE:
    """Mean and standard error ``std(ddof=1)/sqrt(n)`` of one metric over ``n`` finite values."""

    mean: float
    se: float
    n: int

    def format(self) -> str:
        """The "0.809(9)" notation (see :func:`format_mean_se`)."""
        return format_mean_se(self.mean, self.se)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return asdict(self)


@dataclass(frozen=True)
class AggregateResult:
    """Per-metric :class:`MeanSE` over several :class:`FaithfulnessResult` (or dicts).

    Attributes:
        metrics: ``{metric: MeanSE}`` over the finite values of each numeric metric.
        n_results: Number of results aggregated.
        notes: Why values were left out, e.g. ``"gamma: 2 of 5 results left out (neither model
            misclassifies any test point, ...)"`` -- one line per metric with undefined values
            whose results carried a ``gamma_reason``.
    """

    metrics: Mapping[str, MeanSE]
    n_results: int
    notes: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> MeanSE:
        return self.metrics[name]

    def formatted(self) -> dict[str, str]:
        """``{metric: "0.809(9)"}``."""
        return {k: v.format() for k, v in self.metrics.items()}

    def to_dict(self) -> dict[str, Any]:
        """``{"n_results", "metrics": {name: {"mean", "se", "n"}}, "notes"}``, plain python."""
        return {
            "n_results": self.n_results,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "notes": list(self.notes),
        }


_NUMERIC_FIELDS = tuple(
    f.name for f in fields(FaithfulnessResult) if f.name not in ("tau_mode", "gamma_reason")
)


def aggregate(results: Iterable[FaithfulnessResult | Mapping[str, Any]]) -> AggregateResult:
    """Mean ± standard error of every numeric metric over independent models (seeds).

    ``se = std(values, ddof=1) / sqrt(k)`` over the ``k`` finite values of a metric; NaN values
    (e.g. ``gamma`` for a seed where neither model errs -- the reference skipped those seeds)
    are left out and ``MeanSE.n`` says how many remained; the results' ``gamma_reason`` strings
    are summarized in ``AggregateResult.notes``. With one value the SE is NaN.

    Args:
        results: :class:`FaithfulnessResult` objects or dicts of metric -> number.

    Returns:
        An :class:`AggregateResult`. Cost O(k * metrics).
    """
    rows = [r.to_dict() if isinstance(r, FaithfulnessResult) else dict(r) for r in results]
    if not rows:
        raise InputError("aggregate() needs at least one result.")
    names: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in names and isinstance(v, (int, float, np.integer, np.floating)) and not (
                isinstance(v, bool)
            ):
                names.append(k)
    out: dict[str, MeanSE] = {}
    for name in names:
        vals = np.array([float(r[name]) for r in rows if name in r], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        k = int(vals.size)
        if k == 0:
            out[name] = MeanSE(math.nan, math.nan, 0)
            continue
        se = float(np.std(vals, ddof=1) / math.sqrt(k)) if k > 1 else math.nan
        out[name] = MeanSE(float(vals.mean()), se, k)
    notes: list[str] = []
    undefined = [r for r in rows if "gamma" in r and not math.isfinite(float(r["gamma"]))]
    trivial = [r for r in rows if r.get("gamma_reason") and r not in undefined]
    for group, what in ((undefined, "left out"), (trivial, "trivial")):
        why = [str(r.get("gamma_reason") or "no reason given") for r in group]
        for w in dict.fromkeys(why):
            notes.append(f"gamma: {why.count(w)} of {len(rows)} results {what} ({w}).")
    return AggregateResult(metrics=out, n_results=len(rows), notes=tuple(notes))


def _round_half_up(x: float, decimals: int) -> Decimal:
    q = Decimal(1).scaleb(-decimals)
    return Decimal(repr(x)).quantize(q, rounding=ROUND_HALF_UP)


def format_mean_se(mean: float, se: float) -> str:
    """Write ``mean ± se`` as ``"0.809(9)"``: the SE to one significant digit, in units of the
    mean's last shown digit.

    The SE is rounded half-up to one significant digit (``0.0096 -> 0.01``), which fixes the
    number of decimals ``d``; the mean is rounded half-up to ``d`` decimals. Examples:
    ``(0.8093, 0.0091) -> "0.809(9)"``, ``(0.74, 0.012) -> "0.74(1)"``, ``(0.5, 0.1) -> "0.5(1)"``,
    ``(0.8093, 0.0096) -> "0.81(1)"``, ``(123.4, 25) -> "120(30)"``. Degenerate inputs: a NaN mean
    gives ``"nan"``; a NaN or infinite SE gives the mean to 3 significant digits; a zero SE gives
    ``"<mean>(0)"`` with ``repr``-style digits.

    Args:
        mean: The mean.
        se: Its standard error (>= 0).

    Returns:
        The formatted string.
    """
    if not math.isfinite(mean):
        return str(mean)
    if not math.isfinite(se):
        return f"{mean:.3g}"
    se = abs(se)
    if se == 0:
        return f"{mean!r}(0)"
    d = -math.floor(math.log10(se))
    digit = _round_half_up(se, d)
    if digit == Decimal(1).scaleb(-d + 1):  # 0.0096 -> 0.010: one digit fewer
        d -= 1
        digit = _round_half_up(se, d)
    m = _round_half_up(mean, d)
    if m == 0:
        m = abs(m)  # no "-0.00"
    if d > 0:
        unit = int(digit.scaleb(d))
        return f"{m:.{d}f}({unit})"
    # SE >= 1: integer mean, SE written in full
    return f"{int(m)}({int(digit)})"

