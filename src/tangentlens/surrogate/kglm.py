"""The kernel general linear model (kGLM): logistic regression whose features are kernel rows.

:class:`KernelSurrogate` checks its parameters and targets, then hands the fit and the read-outs to
one solver strategy per ``solver`` value (:data:`_SOLVERS`):

* :class:`_LbfgsSolver` -- exact, deterministic L2-regularized multinomial logistic regression
  (SciPy's L-BFGS-B); read-outs from the linear model (``softmax(logits)``);
* :class:`_SGDSolver` -- the reference: scikit-learn's ``SGDClassifier`` (log loss, one-vs-rest);
  read-outs are the wrapped classifier's.

The strategy that *fitted* a model (``solver_used_``) answers its predictions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize
from scipy.special import log_expit, log_softmax, logsumexp, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import SGDClassifier

from ..errors import InputError, UnknownKindError
from ._base import (
    Float64Array,
    KernelMachineMixin,
    check_sample_weight,
    class_weights,
    decision_from_logits,
    encode_targets,
    linear_scores,
    one_class_error,
    soft_targets,
    symmetric_binary,
    validate_test_kernel,
    validate_train_kernel,
)

__all__ = ["KernelSurrogate"]


# --------------------------------------------------------------------------------------------
# solver strategies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FitData:
    """What :meth:`KernelSurrogate.fit` validated, for the solver.

    Attributes:
        K: (N, N) float64 train x train block.
        y: the labels as given, raveled (hard labels only; ``None`` for soft targets).
        classes: (C,) class labels.
        y_index: (N,) class positions of hard labels, else ``None``.
        T: (N, C) soft targets (rows on the simplex), else ``None``.
        sw: (N,) checked sample weights (ones when none were given).
        sample_weight: the sample weights as given (``None`` or array-like).
    """

    K: Float64Array
    y: np.ndarray | None
    classes: np.ndarray
    y_index: np.ndarray | None
    T: Float64Array | None
    sw: Float64Array
    sample_weight: ArrayLike | None


class _LinearReadout:
    """Read-outs of the fitted linear model ``z = K @ class_coef_.T + class_intercept_``.

    Every method takes a fitted estimator and an already validated (n, N) block. Cost: one
    (n x N) @ (N x C) product each.
    """

    soft_targets = True

    def decision_function(self, est: KernelSurrogate, K: Float64Array) -> Float64Array:
        return decision_from_logits(linear_scores(est, K))

    def predict(self, est: KernelSurrogate, K: Float64Array) -> np.ndarray:
        return est.classes_[np.argmax(linear_scores(est, K), axis=1)]

    def predict_proba(self, est: KernelSurrogate, K: Float64Array) -> Float64Array:
        return softmax(linear_scores(est, K), axis=1)

    def predict_log_proba(self, est: KernelSurrogate, K: Float64Array) -> Float64Array:
        return log_softmax(linear_scores(est, K), axis=1)

    def comparison_logits(self, est: KernelSurrogate, K: Float64Array) -> Float64Array:
        return linear_scores(est, K)


def _multinomial_loss_grad(
    theta: Float64Array,
    K: Float64Array,
    T: Float64Array,
    s: Float64Array,
    alpha: float,
    fit_intercept: bool,
) -> tuple[float, Float64Array]:
    """Objective and gradient of the weighted, L2-regularized multinomial logistic regression."""
    n, N = K.shape
    C = T.shape[1]
    W = theta[: C * N].reshape(C, N)
    Z = K @ W.T
    if fit_intercept:
        Z += theta[C * N :]
    logP = log_softmax(Z, axis=1)
    loss = -float(np.sum(s[:, None] * T * logP)) / n + 0.5 * alpha * float(np.sum(W * W))
    R = (s[:, None] / n) * (np.exp(logP) - T)  # d loss / d Z, (n, C)
    gW = R.T @ K + alpha * W
    if fit_intercept:
        return loss, np.concatenate([gW.ravel(), R.sum(axis=0)])
    return loss, gW.ravel()


class _LbfgsSolver(_LinearReadout):
    """Exact multinomial logistic regression by L-BFGS-B; predictions from the linear model."""

    name = "lbfgs"

    def fit(self, est: KernelSurrogate, d: _FitData) -> None:
        """Minimize the objective of :class:`KernelSurrogate` and store the fitted attributes."""
        K = d.K
        n, N = K.shape
        C = len(d.classes)
        T = d.T
        if T is None:
            T = np.zeros((n, C))
            T[np.arange(n), d.y_index] = 1.0
        cw = class_weights(est.class_weight, d.classes, d.y_index, T)
        s = d.sw * (T @ cw)
        # Exact reparameterization for conditioning: with column means mu,
        # z = (K - 1 mu^T) W^T + b' and b = b' - W mu. The penalty is on W only, so the optimum is
        # unchanged, but the near-constant top eigenvector of a normalized kernel (its mean) no
        # longer dominates the Hessian: L-BFGS needs tens instead of thousands of iterations.
        mu = K.mean(axis=0) if est.fit_intercept else np.zeros(N)
        Kc = K - mu if est.fit_intercept else K
        theta0 = np.zeros(C * N + (C if est.fit_intercept else 0))
        if (
            est.warm_start
            and hasattr(est, "class_coef_")
            and est.class_coef_.shape == (C, N)
            and getattr(est, "solver_used_", None) == self.name
        ):
            theta0[: C * N] = est.class_coef_.ravel()
            if est.fit_intercept:
                theta0[C * N :] = est.class_intercept_ + est.class_coef_ @ mu
        max_iter = 1000 if est.max_iter is None else int(est.max_iter)
        tol = 1e-6 if est.tol is None else float(est.tol)
        res = optimize.minimize(
            _multinomial_loss_grad,
            theta0,
            args=(Kc, T, s, float(est.alpha), bool(est.fit_intercept)),
            method="L-BFGS-B",
            jac=True,
            options={
                "maxiter": max_iter,
                "maxfun": 2 * max_iter + 20,
                "gtol": tol,
                "ftol": 64 * np.finfo(np.float64).eps,
                "maxls": 50,
            },
        )
        del Kc
        if not res.success and res.nit >= max_iter:
            warnings.warn(
                f"KernelSurrogate(solver='lbfgs') stopped after max_iter={max_iter} iterations "
                f"before reaching tol={tol} (max |grad| = {np.max(np.abs(res.jac)):.2e}); raise "
                "max_iter, loosen tol or increase alpha.",
                ConvergenceWarning,
                stacklevel=3,
            )
        W = res.x[: C * N].reshape(C, N).copy()
        b = res.x[C * N :] - W @ mu if est.fit_intercept else np.zeros(C)
        est.classes_ = d.classes
        est.class_coef_ = W
        est.class_intercept_ = b
        if C == 2:
            est.coef_ = (W[1] - W[0])[None, :]
            est.intercept_ = np.array([b[1] - b[0]])
        else:
            est.coef_ = W
            est.intercept_ = b
        est.n_iter_ = np.array([int(res.nit)])


class _SGDSolver(_LinearReadout):
    """The reference's ``SGDClassifier`` (log loss, one-vs-rest); predictions are its own."""

    name = "sgd"
    soft_targets = False

    @staticmethod
    def params(est: KernelSurrogate) -> dict[str, Any]:
        """The ``SGDClassifier`` parameters of ``est`` (scikit-learn's defaults elsewhere)."""
        return dict(
            loss="log_loss",
            penalty="l2",
            alpha=est.alpha,
            fit_intercept=est.fit_intercept,
            class_weight=est.class_weight,
            random_state=est.random_state,
            max_iter=1000 if est.max_iter is None else est.max_iter,
            tol=1e-3 if est.tol is None else est.tol,
            warm_start=est.warm_start,
        )

    def fit(self, est: KernelSurrogate, d: _FitData) -> None:
        """Fit (or, with ``warm_start``, continue) the wrapped ``SGDClassifier``."""
        if est.warm_start and hasattr(est, "estimator_"):
            sgd = est.estimator_
            sgd.set_params(**self.params(est))
        else:
            sgd = SGDClassifier(**self.params(est))
        sgd.fit(d.K, d.y, sample_weight=d.sample_weight)
        est.estimator_ = sgd
        est.classes_ = sgd.classes_
        est.coef_ = sgd.coef_
        est.intercept_ = sgd.intercept_
        est.n_iter_ = sgd.n_iter_
        if len(est.classes_) == 2:
            est.class_coef_, est.class_intercept_ = symmetric_binary(
                sgd.coef_[0], float(sgd.intercept_[0])
            )
        else:
            est.class_coef_ = sgd.coef_
            est.class_intercept_ = sgd.intercept_

    def decision_function(self, est: KernelSurrogate, K: Float64Array) -> Float64Array:
        return est.estimator_.decision_function(K)

    def predict(self, est: KernelSurrogate, K: Float64Array) -> np.ndarray:
        return est.estimator_.predict(K)

    def predict_proba(self, est: KernelSurrogate, K: Float64Array) -> Float64Array:
        return est.estimator_.predict_proba(K)

    def predict_log_proba(self, est: KernelSurrogate, K: Float64Array) -> Float64Array:
        """The log of scikit-learn's one-vs-rest probabilities, computed in log space.

        With decision values ``d``: ``[log σ(−d), log σ(d)]`` for two classes; otherwise
        ``log σ(d_c) − log Σ_k σ(d_k)`` (scikit-learn's normalized sigmoids). Finite where
        ``predict_proba`` underflows to 0, equal to ``log(predict_proba)`` elsewhere up to rounding.
        """
        D = est.estimator_.decision_function(K)
        if D.ndim == 1:
            return np.stack([log_expit(-D), log_expit(D)], axis=1)
        L = log_expit(D)
        return L - logsumexp(L, axis=1, keepdims=True)

    def comparison_logits(self, est: KernelSurrogate, K: Float64Array) -> Float64Array:
        return self.predict_log_proba(est, K)


_SOLVERS: dict[str, _LbfgsSolver | _SGDSolver] = {"lbfgs": _LbfgsSolver(), "sgd": _SGDSolver()}


# --------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------


class KernelSurrogate(KernelMachineMixin, ClassifierMixin, BaseEstimator):
    """Kernel general linear model (kGLM): logistic regression whose features are kernel rows.

    Logits ``z_c(x) = sum_i W[c, i] K[x, i] + b_c`` over the N training points.

    Solvers:

    * ``"lbfgs"`` (default, recommended): exact deterministic multinomial logistic regression.
      It minimizes, over ``W`` (C x N) and ``b`` (C,),

      .. math:: J(W, b) = \\frac{1}{n} \\sum_{j=1}^{n} s_j \\, \\mathrm{CE}\\big(t_j,\\;
         \\mathrm{softmax}(W k_j + b)\\big) + \\frac{\\alpha}{2} \\lVert W \\rVert_F^2,

      with ``k_j`` the j-th row of the train x train kernel, ``t_j`` the one-hot label or the soft
      target row, ``s_j = sample_weight_j * class_weight`` and the intercept unpenalized. The
      ``1/n`` and ``alpha/2`` convention is scikit-learn SGD's, so ``alpha`` means the same thing
      for both solvers. Solved with SciPy's L-BFGS-B from zeros (or from the previous solution
      with ``warm_start=True``) to ``max |grad| <= tol``, on column-centered kernel rows with the
      intercept shifted accordingly (an exact reparameterization that makes the problem well
      conditioned); float64 throughout, no randomness: repeated fits are bit-identical.
      Cost per iteration: two (N x N) @ (N x C) products, typically tens of iterations;
      memory: two float64 copies of the kernel (16 N^2 bytes) during the fit.
    * ``"sgd"``: the reference. Wraps ``SGDClassifier(loss="log_loss", penalty="l2", alpha=alpha,
      fit_intercept=fit_intercept, class_weight=class_weight, random_state=random_state)`` with
      scikit-learn's defaults for everything else (``max_iter=1000``, ``tol=1e-3`` unless given),
      so the fitted ``coef_`` equals that of the directly constructed estimator with the same
      seed. One-vs-rest; hard labels only. For more than two classes ``predict_proba`` is
      scikit-learn's normalized one-vs-rest sigmoid, *not* ``softmax(logits)``;
      :meth:`comparison_logits` returns its logarithm (so ``softmax`` of it gives back exactly
      those probabilities). For two classes both agree.

    Targets (``y`` in :meth:`fit`):

    * 1-D labels (the reference fits the true training labels; the network's predicted labels
      give a hard-distilled surrogate);
    * 2-D ``(N, C)`` soft targets with rows on the probability simplex (e.g. the network's
      softmax outputs on the training points): the *distilled* surrogate. ``solver="lbfgs"``
      only; ``classes_`` becomes ``arange(C)``. With ``class_weight="balanced"`` the class
      weights are ``N / (C * T.sum(0))`` and a row's weight is ``sum_c T[j, c] * w_c``.

    Args:
        solver: ``"lbfgs"`` or ``"sgd"``.
        alpha: L2 strength (the reference uses 1e-4 for small models, 1e-2 for BERT).
        class_weight: ``"balanced"`` (the reference), ``None`` or a ``{label: weight}`` dict.
        fit_intercept: Fit the unpenalized intercept ``b``.
        max_iter: Iteration cap; ``None`` means 1000 for both solvers (SGD: epochs).
        tol: Stopping tolerance; ``None`` means 1e-6 (lbfgs: max-abs gradient) or 1e-3 (sgd).
        warm_start: Reuse the previous solution as the starting point.
        random_state: Seed of the SGD solver (shuffling); the L-BFGS solver is deterministic and
            ignores it.

    Attributes:
        classes_: (C,) class labels.
        coef_: scikit-learn-shaped weights: (1, N) for two classes (decision = positive class),
            else (C, N).
        intercept_: (1,) or (C,).
        class_coef_: (C, N) per-class weights ``W`` (symmetric ``[-w/2, w/2]`` for two classes).
        class_intercept_: (C,) per-class intercepts.
        n_iter_: Iterations (lbfgs) or epochs (sgd) run.
        solver_used_: The solver of the last fit, which answers the predictions.
        estimator_: The fitted ``SGDClassifier`` (``solver="sgd"`` only).
        n_features_in_: N, the number of training points (kernel columns).
    """

    def __init__(
        self,
        solver: Literal["lbfgs", "sgd"] = "lbfgs",
        alpha: float = 1e-4,
        class_weight: Literal["balanced"] | dict[Any, float] | None = "balanced",
        fit_intercept: bool = True,
        max_iter: int | None = None,
        tol: float | None = None,
        warm_start: bool = False,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.solver = solver
        self.alpha = alpha
        self.class_weight = class_weight
        self.fit_intercept = fit_intercept
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.random_state = random_state

    # -- parameter checks -------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.solver not in _SOLVERS:
            raise UnknownKindError(
                f"Unknown solver {self.solver!r}; use solver='lbfgs' (exact, deterministic) or "
                "'sgd' (the reference's SGDClassifier)."
            )
        if not isinstance(self.alpha, Real) or not self.alpha >= 0:
            raise InputError(f"alpha must be a non-negative number, got {self.alpha!r}.")
        if self.max_iter is not None and (
            not isinstance(self.max_iter, Integral) or self.max_iter < 1
        ):
            raise InputError(f"max_iter must be a positive integer or None, got {self.max_iter!r}.")
        if self.tol is not None and (not isinstance(self.tol, Real) or self.tol < 0):
            raise InputError(f"tol must be a non-negative number or None, got {self.tol!r}.")
        cw = self.class_weight
        if not (cw is None or cw == "balanced" or isinstance(cw, dict)):
            raise UnknownKindError(
                f"class_weight must be 'balanced', None or a dict, got {cw!r}."
            )

    # -- fitting -------------------------------------------------------------------------------
    def fit(
        self,
        K_train_train: ArrayLike,
        y: ArrayLike,
        sample_weight: ArrayLike | None = None,
    ) -> KernelSurrogate:
        """Fit on the N x N train x train kernel.

        Args:
            K_train_train: (N, N) train x train block (same row/column order as ``y``).
            y: (N,) labels, or (N, C) soft targets (rows on the simplex; ``solver="lbfgs"``).
            sample_weight: Optional (N,) non-negative weights.

        Returns:
            self.

        Raises:
            InputError: kernel not square, NaN/inf in it, ``len(y)`` not N, y of the wrong shape,
                only one class, soft targets off the simplex or with ``solver="sgd"``.
            UnknownKindError: unknown solver or class_weight.
        """
        self._check_params()
        solver = _SOLVERS[self.solver]
        K = validate_train_kernel(self, K_train_train)
        n = K.shape[0]
        classes, y_index, T = encode_targets(y, n, allow_soft=solver.soft_targets)
        sw = check_sample_weight(sample_weight, n)
        if T is None and len(classes) < 2:
            raise one_class_error(classes)
        if T is not None:
            T = soft_targets(T)
        labels = np.asarray(y).ravel() if T is None else None
        solver.fit(self, _FitData(K, labels, classes, y_index, T, sw, sample_weight))
        self.solver_used_ = solver.name
        return self

    # -- prediction ------------------------------------------------------------------------------
    def _fitted_solver(self) -> _LbfgsSolver | _SGDSolver:
        """The strategy that fitted this model (after the test block was validated)."""
        name = getattr(self, "solver_used_", None)
        if name is None:  # a model fitted before solver_used_ was recorded for every solver
            name = "sgd" if hasattr(self, "estimator_") else "lbfgs"
        return _SOLVERS[name]

    def decision_function(self, K_test_train: ArrayLike) -> Float64Array:
        """Decision values (n,) for two classes (> 0: ``classes_[1]``), else (n, C).

        For ``solver="sgd"`` exactly ``SGDClassifier.decision_function``.
        """
        K = validate_test_kernel(self, K_test_train)
        return self._fitted_solver().decision_function(self, K)

    def predict(self, K_test_train: ArrayLike) -> np.ndarray:
        """Predicted labels (n,); for ``solver="sgd"`` exactly ``SGDClassifier.predict``."""
        K = validate_test_kernel(self, K_test_train)
        return self._fitted_solver().predict(self, K)

    def predict_proba(self, K_test_train: ArrayLike) -> Float64Array:
        """Class probabilities (n, C): ``softmax(logits)``; for ``solver="sgd"`` scikit-learn's.

        For ``solver="sgd"`` with more than two classes this is the normalized one-vs-rest
        sigmoid of ``SGDClassifier.predict_proba`` (the reference), which differs from
        ``softmax(logits)``.
        """
        K = validate_test_kernel(self, K_test_train)
        return self._fitted_solver().predict_proba(self, K)

    def predict_log_proba(self, K_test_train: ArrayLike) -> Float64Array:
        """Log of :meth:`predict_proba` (n, C), computed stably (in log space) for both solvers.

        ``log_softmax(logits)`` for the lbfgs solver; for ``solver="sgd"`` the log of
        scikit-learn's one-vs-rest probabilities, finite even where they underflow to 0.
        """
        K = validate_test_kernel(self, K_test_train)
        return self._fitted_solver().predict_log_proba(self, K)

    def comparison_logits(self, K_test_train: ArrayLike) -> Float64Array:
        """The scores to compare with the network's logits, shape (n, C).

        ``softmax`` of a row is this model's :meth:`predict_proba`: the linear scores
        :meth:`logits` for the multinomial lbfgs solver, :meth:`predict_log_proba` (the log of
        scikit-learn's one-vs-rest probabilities, finite) for ``solver="sgd"``. Pass them to
        :func:`tangentlens.faithfulness.faithfulness`. For two classes they are ``[-d/2, d/2]``
        (lbfgs) and ``[log σ(−d), log σ(d)]`` (sgd): in both the difference of the two columns is
        the decision value ``d``.
        Cost: one (n x N) @ (N x C) product.
        """
        K = validate_test_kernel(self, K_test_train)
        return self._fitted_solver().comparison_logits(self, K)
