"""Kernel ridge regression of the network's logits on a precomputed kernel."""

from __future__ import annotations

from numbers import Real

import numpy as np
from numpy.typing import ArrayLike
from scipy import linalg as sla
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin

from ..errors import InputError
from ._base import (
    Float64Array,
    KernelMachineMixin,
    check_sample_weight,
    encode_targets,
    one_class_error,
    validate_train_kernel,
)

__all__ = ["KernelRidgeSurrogate"]


class KernelRidgeSurrogate(KernelMachineMixin, ClassifierMixin, BaseEstimator):
    """Kernel ridge regression of the network's logits; predicts ``argmax`` of the fitted logits.

    Solves, for ``A`` (N x C) and an unpenalized intercept ``b`` (C,),

    .. math:: \\min_{A, b} \\sum_j s_j \\lVert y_j - (K_j A + b) \\rVert^2
       + \\alpha\\, \\mathrm{tr}(A^\\top K A),

    whose stationarity conditions are the bordered linear system
    ``[[K + alpha S^-1, 1], [1^T, 0]] [A; b^T] = [Y; 0]`` (``S = diag(s)``; zero-weight samples get
    ``A_j = 0``), solved exactly with a symmetric LAPACK factorization. Deterministic; cost
    O(N^3) time and 8 N^2 bytes.

    Targets ``y``: 2-D ``(N, C)`` real targets (the network's logits, the intended use; then
    ``classes_ = arange(C)``), or 1-D labels, regressed as +1 for the label's column and -1
    elsewhere (scikit-learn's ``RidgeClassifier`` coding). ``logits = K @ A + b`` (also the
    :meth:`comparison_logits`); ``predict_proba = softmax(logits)`` (meaningful when the targets
    were logits). ``class_coef_ = A.T``. Unlike the logistic models the two-class storage is not
    symmetrized (the two columns are fitted independently); ``coef_`` is ``A[:, 1] - A[:, 0]`` for
    two classes.

    Args:
        alpha: Ridge strength (> 0).
        fit_intercept: Fit ``b``; otherwise solves ``(K + alpha S^-1) A = Y``.
    """

    def __init__(self, alpha: float = 1.0, fit_intercept: bool = True) -> None:
        self.alpha = alpha
        self.fit_intercept = fit_intercept

    def fit(
        self, K_train_train: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> KernelRidgeSurrogate:
        """Fit on the N x N train x train kernel.

        Args:
            K_train_train: (N, N) train x train block.
            y: (N, C) target logits, or (N,) labels.
            sample_weight: Optional (N,) non-negative weights.

        Raises:
            InputError: bad kernel or targets (see :meth:`KernelSurrogate.fit`), ``alpha <= 0``.
        """
        if not isinstance(self.alpha, Real) or not self.alpha > 0:
            raise InputError(f"alpha must be a positive number, got {self.alpha!r}.")
        K = validate_train_kernel(self, K_train_train)
        n = K.shape[0]
        classes, y_index, T = encode_targets(y, n, allow_soft=True, soft_kind="target logits")
        sw = check_sample_weight(sample_weight, n)
        if T is None:
            if len(classes) < 2:
                raise one_class_error(classes)
            T = -np.ones((n, len(classes)))
            T[np.arange(n), y_index] = 1.0
        elif T.shape[1] < 2:
            raise InputError("2-D targets need at least two columns (one logit per class).")
        C = T.shape[1]
        keep = np.flatnonzero(sw > 0)
        Kk = K[np.ix_(keep, keep)]
        m = len(keep)
        A = np.zeros((n, C))
        if self.fit_intercept:
            M = np.zeros((m + 1, m + 1))
            M[:m, :m] = Kk
            M[np.arange(m), np.arange(m)] += self.alpha / sw[keep]
            M[:m, m] = 1.0
            M[m, :m] = 1.0
            rhs = np.zeros((m + 1, C))
            rhs[:m] = T[keep]
            sol = sla.solve(M, rhs, assume_a="sym")
            A[keep] = sol[:m]
            b = sol[m].copy()
        else:
            M = Kk.copy()
            M[np.arange(m), np.arange(m)] += self.alpha / sw[keep]
            A[keep] = sla.solve(M, T[keep], assume_a="sym")
            b = np.zeros(C)
        self.classes_ = classes
        self.dual_coef_ = A
        self.class_coef_ = A.T.copy()
        self.class_intercept_ = b
        if C == 2:
            self.coef_ = (A[:, 1] - A[:, 0])[None, :]
            self.intercept_ = np.array([b[1] - b[0]])
        else:
            self.coef_ = self.class_coef_
            self.intercept_ = b
        return self

    def predict_proba(self, K_test_train: ArrayLike) -> Float64Array:
        """``softmax(logits)`` (n, C)."""
        return softmax(self.logits(K_test_train), axis=1)
