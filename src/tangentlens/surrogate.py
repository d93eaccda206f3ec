"""Kernel surrogates: linear models on a *precomputed* kernel, fitted to mimic a network.

Every estimator here is a scikit-learn classifier whose input ``X`` is a kernel block, not features:

* ``fit(K_train_train, y)`` takes the N x N train x train block (normalized kernel, e.g. trNTK);
* ``predict``, ``decision_function``, ``predict_proba``, ``logits``, ``contributions`` take the
  n x N test x train block (one row per test point, one column per training point, in the training
  order).

A *kernel general linear model* (kGLM) has per-class logits

.. math:: z_c(x) = \\sum_i W_{c,i}\\,\\kappa(x, x_i) + b_c,

so the logit decomposes over training points: the contribution of training point ``i`` to class
``c`` at ``x`` is ``A[c, i] = W[c, i] * K[x, i]`` and ``sum_i A[c, i] = z_c(x) - b_c`` (see
:meth:`KernelSurrogate.contributions`). That decomposition is the explanation.

Estimators:

* :class:`KernelSurrogate` -- the kGLM. ``solver="sgd"`` reproduces the reference (scikit-learn
  ``SGDClassifier``, log loss, one-vs-rest, seeded); ``solver="lbfgs"`` (default) is an exact,
  deterministic L2-regularized multinomial logistic regression that also fits *soft* targets (the
  network's own probabilities: a distilled surrogate).
* :class:`KernelSVMSurrogate` -- the reference's kernel SVM baseline
  (``SVC(kernel="precomputed")``).
* :class:`KernelRidgeSurrogate` -- kernel ridge regression on the network's logits (or on labels).

Conventions shared by all three:

* ``classes_`` -- the class labels; with 2-D soft/regression targets of C columns it is
  ``arange(C)``.
* ``logits(K)`` -- always (n, C) class scores. ``decision_function(K)`` follows scikit-learn: (n,)
  for two classes (positive means ``classes_[1]``), (n, C) otherwise.
* ``class_coef_`` (C x N) and ``class_intercept_`` (C,) -- per-class weights with
  ``logits(K) == K @ class_coef_.T + class_intercept_``. ``coef_`` / ``intercept_`` keep
  scikit-learn's shapes: for two classes ``coef_`` is (1, N) and equals
  ``class_coef_[1] - class_coef_[0]``.
* Binary models are stored symmetrically: ``class_coef_ = [-w/2, w/2]``,
  ``class_intercept_ = [-b/2, b/2]`` where ``(w, b)`` is the single binary decision function
  ``d = K @ w + b``. Hence ``logits = [-d/2, d/2]``, ``softmax(logits)[:, 1] = sigmoid(d)``, the
  contributions to class 1 are ``+w_i K_i / 2`` and to class 0 ``-w_i K_i / 2``, and
  ``A[:, 1] - A[:, 0]`` sums to ``d - b`` (the reference's contributions ``w_i K_i``). The L-BFGS
  multinomial solver reaches this symmetric form by itself (its optimum has ``sum_c W_c = 0``).
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import linalg as sla
from scipy import optimize
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning, DataConversionWarning
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from tangentlens.errors import InputError, UnknownKindError

__all__ = [
    "KernelRidgeSurrogate",
    "KernelSVMSurrogate",
    "KernelSurrogate",
]

Float64Array = NDArray[np.float64]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_finite(K: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(K)):
        n_nan = int(np.isnan(K).sum())
        n_inf = int(np.isinf(K).sum())
        raise InputError(
            f"The {what} contains NaN or inf values ({n_nan} NaN, {n_inf} inf). Recompute the "
            "kernel (a zero-norm gradient makes a cosine-normalized row 0/0) or drop those points."
        )


def _validate_train_kernel(est: BaseEstimator, K: ArrayLike) -> Float64Array:
    """Validate the train x train block; sets ``n_features_in_`` (= N) through scikit-learn."""
    K = validate_data(est, K, reset=True, dtype=np.float64, ensure_all_finite=False)
    _check_finite(K, "train x train kernel")
    if K.shape[0] != K.shape[1]:
        raise InputError(
            f"fit() needs the square train x train kernel block, got shape {K.shape}. Pass "
            "K[train, train] (N x N) to fit() and K[test, train] (n x N) to predict()."
        )
    return K


def _validate_test_kernel(est: BaseEstimator, K: ArrayLike) -> Float64Array:
    """Validate a test x train block against the fitted number of training points."""
    check_is_fitted(est)
    try:  # report NaN/inf before any shape complaint
        probe = check_array(K, dtype=np.float64, ensure_all_finite=False, ensure_2d=False,
                            allow_nd=True, ensure_min_samples=0)
    except (TypeError, ValueError):
        probe = None
    if probe is not None:
        _check_finite(probe, "test x train kernel")
        if not hasattr(K, "columns"):  # keep DataFrames for scikit-learn's feature-name check
            K = probe  # already converted: no second copy
    try:
        K = validate_data(est, K, reset=False, dtype=np.float64, ensure_all_finite=False)
    except ValueError as err:
        if "features, but" in str(err):
            raise InputError(
                f"{err} The test x train kernel block must have one column per training point, "
                f"in training order ({est.n_features_in_} columns)."
            ) from err
        raise
    _check_finite(K, "test x train kernel")
    return K


def _check_sample_weight(sample_weight: ArrayLike | None, n: int) -> Float64Array:
    if sample_weight is None:
        return np.ones(n, dtype=np.float64)
    sw = np.asarray(sample_weight, dtype=np.float64)
    if sw.ndim == 0:
        sw = np.full(n, float(sw))
    if sw.ndim != 1 or sw.shape[0] != n:
        raise InputError(
            f"sample_weight must be 1-D with one weight per training point ({n}), got shape "
            f"{sw.shape}."
        )
    if not np.all(np.isfinite(sw)):
        raise InputError("sample_weight contains NaN or inf values; pass finite weights.")
    if np.any(sw < 0):
        raise InputError("sample_weight must be non-negative.")
    if not np.any(sw > 0):
        raise InputError(
            "Sample weights must contain at least one non-zero number: all weights are zero."
        )
    return sw


def _encode_targets(
    y: ArrayLike, n: int, *, allow_soft: bool, soft_kind: str = "soft probability targets"
) -> tuple[np.ndarray, np.ndarray | None, Float64Array | None]:
    """Return ``(classes, y_index, T)``.

    Hard labels: ``y_index`` (n,) class positions, ``T`` None. 2-D targets with >= 2 columns:
    ``classes = arange(C)``, ``y_index`` None, ``T`` the (n, C) float64 targets.
    """
    if y is None:
        raise InputError(
            "This kernel surrogate requires y to be passed, but the target y is None: pass the "
            "training labels (N,) or targets (N, C)."
        )
    y_arr = np.asarray(y)
    if y_arr.ndim == 2 and y_arr.shape[1] == 1:
        warnings.warn(
            "A column-vector y was passed when a 1d array was expected. Please change the shape "
            "of y to (n_samples, ), for example using ravel().",
            DataConversionWarning,
            stacklevel=3,
        )
        y_arr = y_arr[:, 0]
    if y_arr.ndim == 2:
        if not allow_soft:
            raise InputError(
                f"This estimator fits hard labels: y must be 1-D (n,), got shape {y_arr.shape}. "
                "Pass y.argmax(1) or use KernelSurrogate(solver='lbfgs') for soft targets."
            )
        if y_arr.shape[0] != n:
            raise InputError(
                f"y has {y_arr.shape[0]} rows but the train x train kernel has {n}; pass one "
                "target row per training point, in the kernel's order."
            )
        try:
            T = np.asarray(y_arr, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise InputError(f"2-D y ({soft_kind}) must be numeric.") from err
        if not np.all(np.isfinite(T)):
            raise InputError(f"y ({soft_kind}) contains NaN or inf values.")
        return np.arange(T.shape[1]), None, T
    if y_arr.ndim != 1:
        raise InputError(
            f"y must be 1-D labels (n,) or 2-D targets (n, C); got shape {y_arr.shape}."
        )
    if y_arr.shape[0] != n:
        raise InputError(
            f"y has {y_arr.shape[0]} labels but the train x train kernel is {n} x {n}; pass one "
            "label per training point, in the kernel's order."
        )
    if y_arr.dtype.kind == "f" and np.any(np.isnan(y_arr)):
        raise InputError("Input y contains NaN; pass finite class labels.")
    check_classification_targets(y_arr)
    classes, y_index = np.unique(y_arr, return_inverse=True)
    return classes, y_index.ravel(), None


def _one_class_error(classes: np.ndarray) -> InputError:
    return InputError(
        f"The training labels contain only one class ({classes[0]!r}); a classifier needs at "
        "least two classes. Use a training set with examples of two or more classes."
    )


def _symmetric_binary(w: Float64Array, b: float) -> tuple[Float64Array, Float64Array]:
    """Per-class form ``[-w/2, w/2]``, ``[-b/2, b/2]`` of one binary decision function."""
    return np.stack([-0.5 * w, 0.5 * w]), np.array([-0.5 * b, 0.5 * b])


class _KernelMachineMixin:
    """Shared surface: logits, decision values, probabilities and contributions."""

    classes_: np.ndarray
    class_coef_: Float64Array
    class_intercept_: Float64Array
    n_features_in_: int

    def __sklearn_tags__(self):  # type: ignore[no-untyped-def]
        tags = super().__sklearn_tags__()  # type: ignore[misc]
        tags.input_tags.pairwise = True
        return tags

    def logits(self, K_test_train: ArrayLike) -> Float64Array:
        """Class scores ``K @ class_coef_.T + class_intercept_``, always shape (n, C).

        Args:
            K_test_train: (n, N) test x train kernel block.

        Returns:
            (n, C) float64 array. Cost: one (n x N) @ (N x C) product.
        """
        K = _validate_test_kernel(self, K_test_train)  # type: ignore[arg-type]
        return K @ self.class_coef_.T + self.class_intercept_

    def decision_function(self, K_test_train: ArrayLike) -> Float64Array:
        """scikit-learn decision values: (n,) for 2 classes (> 0: ``classes_[1]``), else (n, C).

        For two classes this is ``logits[:, 1] - logits[:, 0]``; otherwise the logits.
        """
        Z = self.logits(K_test_train)
        if Z.shape[1] == 2:
            return Z[:, 1] - Z[:, 0]
        return Z

    def predict(self, K_test_train: ArrayLike) -> np.ndarray:
        """Predicted labels ``classes_[argmax logits]`` (n,)."""
        Z = self.logits(K_test_train)
        return self.classes_[np.argmax(Z, axis=1)]

    def contributions(self, K_test_train: ArrayLike) -> Float64Array:
        """Per-training-point contributions ``A[n, c, i] = class_coef_[c, i] * K[n, i]``.

        ``A.sum(-1) == logits(K) - class_intercept_`` exactly up to float rounding. For two classes
        (symmetric storage, see the module docstring) ``(A[:, 1] - A[:, 0]).sum(-1)`` equals
        ``decision_function(K) - intercept_[0]``.

        Args:
            K_test_train: (n, N) test x train kernel block.

        Returns:
            (n, C, N) float64 array. Cost: n*C*N multiplications and 8*n*C*N bytes -- slice the
            rows of a large test block (``tangentlens.explain`` does so in chunks).
        """
        K = _validate_test_kernel(self, K_test_train)  # type: ignore[arg-type]
        return K[:, None, :] * self.class_coef_[None, :, :]


# --------------------------------------------------------------------------------------------
# the kGLM
# --------------------------------------------------------------------------------------------


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


class KernelSurrogate(_KernelMachineMixin, ClassifierMixin, BaseEstimator):
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
      scikit-learn's normalized one-vs-rest sigmoid, *not* ``softmax(logits)``; pass
      ``np.log(predict_proba(K))`` to :func:`tangentlens.faithfulness.faithfulness` if you want
      those probabilities. For two classes both agree.

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
        if self.solver not in ("lbfgs", "sgd"):
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

    def _class_weights(
        self, classes: np.ndarray, y_index: np.ndarray | None, T: Float64Array | None
    ) -> Float64Array:
        C = len(classes)
        cw = self.class_weight
        if cw is None:
            return np.ones(C)
        if cw == "balanced":
            counts = np.bincount(y_index, minlength=C) if T is None else T.sum(axis=0)
            n = counts.sum()
            with np.errstate(divide="ignore"):
                w = n / (C * counts.astype(np.float64))
            w[~np.isfinite(w)] = 0.0
            return w
        w = np.ones(C)
        for key, val in cw.items():
            hits = np.flatnonzero(classes == key)
            if hits.size == 0:
                raise InputError(
                    f"class_weight names class {key!r}, which is not among the labels "
                    f"{classes.tolist()}."
                )
            w[hits[0]] = float(val)
        return w

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
        K = _validate_train_kernel(self, K_train_train)
        n = K.shape[0]
        classes, y_index, T = _encode_targets(y, n, allow_soft=self.solver == "lbfgs")
        sw = _check_sample_weight(sample_weight, n)
        if T is None and len(classes) < 2:
            raise _one_class_error(classes)
        if T is not None:
            if T.shape[1] < 2:
                raise InputError("Soft targets need at least two columns (classes).")
            if np.any(T < -1e-12) or not np.allclose(T.sum(axis=1), 1.0, atol=1e-5):
                raise InputError(
                    "2-D y is read as soft targets: every row must be a probability vector "
                    "(non-negative, summing to 1). Pass softmax probabilities, not logits "
                    "(use KernelRidgeSurrogate to regress logits)."
                )
            T = np.clip(T, 0.0, None)
            T /= T.sum(axis=1, keepdims=True)
        if self.solver == "sgd":
            return self._fit_sgd(K, np.asarray(y).ravel() if T is None else y, sample_weight)
        return self._fit_lbfgs(K, classes, y_index, T, sw)

    def _fit_sgd(
        self, K: Float64Array, y: ArrayLike, sample_weight: ArrayLike | None
    ) -> KernelSurrogate:
        if self.warm_start and hasattr(self, "estimator_"):
            est = self.estimator_
            est.set_params(**self._sgd_params())
        else:
            est = SGDClassifier(**self._sgd_params())
        est.fit(K, y, sample_weight=sample_weight)
        self.estimator_ = est
        self.classes_ = est.classes_
        self.coef_ = est.coef_
        self.intercept_ = est.intercept_
        self.n_iter_ = est.n_iter_
        if len(self.classes_) == 2:
            self.class_coef_, self.class_intercept_ = _symmetric_binary(
                est.coef_[0], float(est.intercept_[0])
            )
        else:
            self.class_coef_ = est.coef_
            self.class_intercept_ = est.intercept_
        return self

    def _sgd_params(self) -> dict[str, Any]:
        return dict(
            loss="log_loss",
            penalty="l2",
            alpha=self.alpha,
            fit_intercept=self.fit_intercept,
            class_weight=self.class_weight,
            random_state=self.random_state,
            max_iter=1000 if self.max_iter is None else self.max_iter,
            tol=1e-3 if self.tol is None else self.tol,
            warm_start=self.warm_start,
        )

    def _fit_lbfgs(
        self,
        K: Float64Array,
        classes: np.ndarray,
        y_index: np.ndarray | None,
        T: Float64Array | None,
        sw: Float64Array,
    ) -> KernelSurrogate:
        n, N = K.shape
        C = len(classes)
        if T is None:
            T = np.zeros((n, C))
            T[np.arange(n), y_index] = 1.0
        cw = self._class_weights(classes, y_index, T)
        s = sw * (T @ cw)
        # Exact reparameterization for conditioning: with column means mu, z = (K - 1 mu^T) W^T + b'
        # and b = b' - W mu. The penalty is on W only, so the optimum is unchanged, but the
        # near-constant top eigenvector of a normalized kernel (its mean) no longer dominates the
        # Hessian: L-BFGS needs tens instead of thousands of iterations.
        mu = K.mean(axis=0) if self.fit_intercept else np.zeros(N)
        Kc = K - mu if self.fit_intercept else K
        size = C * N + (C if self.fit_intercept else 0)
        theta0 = np.zeros(size)
        if (
            self.warm_start
            and hasattr(self, "class_coef_")
            and self.class_coef_.shape == (C, N)
            and getattr(self, "solver_used_", None) == "lbfgs"
        ):
            theta0[: C * N] = self.class_coef_.ravel()
            if self.fit_intercept:
                theta0[C * N :] = self.class_intercept_ + self.class_coef_ @ mu
        max_iter = 1000 if self.max_iter is None else int(self.max_iter)
        tol = 1e-6 if self.tol is None else float(self.tol)
        res = optimize.minimize(
            _multinomial_loss_grad,
            theta0,
            args=(Kc, T, s, float(self.alpha), bool(self.fit_intercept)),
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
        b = res.x[C * N :] - W @ mu if self.fit_intercept else np.zeros(C)
        self.classes_ = classes
        self.class_coef_ = W
        self.class_intercept_ = b
        if C == 2:
            self.coef_ = (W[1] - W[0])[None, :]
            self.intercept_ = np.array([b[1] - b[0]])
        else:
            self.coef_ = W
            self.intercept_ = b
        self.n_iter_ = np.array([int(res.nit)])
        self.solver_used_ = "lbfgs"
        return self

    # -- prediction ------------------------------------------------------------------------------
    def decision_function(self, K_test_train: ArrayLike) -> Float64Array:
        """Decision values (n,) for two classes (> 0: ``classes_[1]``), else (n, C).

        For ``solver="sgd"`` exactly ``SGDClassifier.decision_function``.
        """
        if self.solver == "sgd" and hasattr(self, "estimator_"):
            K = _validate_test_kernel(self, K_test_train)
            return self.estimator_.decision_function(K)
        return super().decision_function(K_test_train)

    def predict(self, K_test_train: ArrayLike) -> np.ndarray:
        """Predicted labels (n,); for ``solver="sgd"`` exactly ``SGDClassifier.predict``."""
        if self.solver == "sgd" and hasattr(self, "estimator_"):
            K = _validate_test_kernel(self, K_test_train)
            return self.estimator_.predict(K)
        return super().predict(K_test_train)

    def predict_proba(self, K_test_train: ArrayLike) -> Float64Array:
        """Class probabilities (n, C): ``softmax(logits)``; for ``solver="sgd"`` scikit-learn's.

        For ``solver="sgd"`` with more than two classes this is the normalized one-vs-rest
        sigmoid of ``SGDClassifier.predict_proba`` (the reference), which differs from
        ``softmax(logits)``.
        """
        if self.solver == "sgd" and hasattr(self, "estimator_"):
            K = _validate_test_kernel(self, K_test_train)
            return self.estimator_.predict_proba(K)
        return softmax(self.logits(K_test_train), axis=1)

    def predict_log_proba(self, K_test_train: ArrayLike) -> Float64Array:
        """Log of :meth:`predict_proba`, computed stably for the lbfgs solver."""
        if self.solver == "sgd" and hasattr(self, "estimator_"):
            with np.errstate(divide="ignore"):
                return np.log(self.predict_proba(K_test_train))
        return log_softmax(self.logits(K_test_train), axis=1)


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------


def _svc_has_probability() -> bool:
    """Whether this scikit-learn's ``SVC`` still takes ``probability`` (removed in 1.11)."""
    return "probability" in SVC().get_params()


class KernelSVMSurrogate(_KernelMachineMixin, ClassifierMixin, BaseEstimator):
    """The reference's kernel SVM baseline: ``SVC(kernel="precomputed", probability=True)``.

    ``predict``, ``decision_function`` and ``predict_proba`` are exactly the wrapped ``SVC``'s
    (``predict_proba`` is Platt-scaled, fitted with an internal 5-fold CV seeded by
    ``random_state``). scikit-learn 1.11 removes ``SVC(probability=...)``; there the Platt
    scaling is the replacement scikit-learn names, ``CalibratedClassifierCV(SVC(), method="sigmoid",
    ensemble=False)`` on a seeded stratified 5-fold split (stored as ``calibrator_``; ``None``
    where libsvm's own Platt scaling is used), and ``decision_function``/``predict`` remain the
    full-data ``SVC``'s. ``logits`` are decision values: ``[-d/2, d/2]`` for two classes (so
    ``softmax(logits)`` is ``sigmoid(d)``, *not* the Platt probability), the one-vs-rest
    ``decision_function`` otherwise. For Kendall-tau on Platt probabilities pass
    ``np.log(predict_proba(K))`` as the surrogate logits.

    ``class_coef_`` (and so :meth:`contributions`) exists for two classes only: the dual
    coefficients scattered onto the N training points (zero off the support vectors), stored
    symmetrically. Cost of fitting: libsvm's SMO, O(N^2)-O(N^3) kernel lookups, plus 5 extra fits
    for Platt scaling.

    Args:
        C: SVM regularization (inverse strength).
        class_weight: ``None``, ``"balanced"`` or a dict.
        probability: Fit Platt scaling (needed for ``predict_proba``).
        tol: libsvm tolerance.
        max_iter: libsvm iteration cap (-1: none).
        random_state: Seed of the Platt-scaling CV split.
    """

    def __init__(
        self,
        C: float = 1.0,
        class_weight: Literal["balanced"] | dict[Any, float] | None = None,
        probability: bool = True,
        tol: float = 1e-3,
        max_iter: int = -1,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.C = C
        self.class_weight = class_weight
        self.probability = probability
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(
        self, K_train_train: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None
    ) -> KernelSVMSurrogate:
        """Fit on the N x N train x train kernel with labels ``y`` (N,).

        Raises:
            InputError: as :meth:`KernelSurrogate.fit`; 2-D (soft) targets are refused.
        """
        K = _validate_train_kernel(self, K_train_train)
        K = np.require(K, dtype=np.float64, requirements=["C", "W"])
        n = K.shape[0]
        classes, _, _ = _encode_targets(y, n, allow_soft=False)
        if len(classes) < 2:
            raise _one_class_error(classes)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, n)
        y1 = np.asarray(y)
        y1 = y1[:, 0] if y1.ndim == 2 else y1
        params: dict[str, Any] = dict(
            kernel="precomputed",
            C=self.C,
            class_weight=self.class_weight,
            tol=self.tol,
            max_iter=self.max_iter,
            random_state=self.random_state,
        )
        self.calibrator_ = None
        if _svc_has_probability():
            est = SVC(probability=self.probability, **params)
            with warnings.catch_warnings():
                # scikit-learn 1.9 deprecates SVC(probability=True) (removal planned for 1.11); it
                # is the reference's estimator, so we keep it while it exists and silence the notice.
                warnings.filterwarnings("ignore", message=".*probability.*", category=FutureWarning)
                est.fit(K, y1, sample_weight=sample_weight)
        elif self.probability:
            # scikit-learn >= 1.11: the replacement it names -- Platt scaling fitted on 5-fold
            # out-of-fold decision values, then one SVC fitted on all the data.
            cv = StratifiedKFold(5, shuffle=True, random_state=self.random_state)
            cal = CalibratedClassifierCV(SVC(**params), method="sigmoid", cv=cv, ensemble=False)
            cal.fit(K, y1, sample_weight=sample_weight)
            self.calibrator_ = cal
            est = cal.calibrated_classifiers_[0].estimator
        else:
            est = SVC(**params).fit(K, y1, sample_weight=sample_weight)
        self.estimator_ = est
        self.classes_ = est.classes_
        self.support_ = est.support_
        self.dual_coef_ = est.dual_coef_
        self.intercept_ = est.intercept_
        self.n_iter_ = est.n_iter_
        if len(self.classes_) == 2:
            w = np.zeros(n)
            w[est.support_] = est.dual_coef_[0]
            self.coef_ = w[None, :]
            self.class_coef_, self.class_intercept_ = _symmetric_binary(
                w, float(est.intercept_[0])
            )
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        # libsvm writes into its arrays: un-pickling from a read-only memmap must copy them
        super().__setstate__(state)
        est = self.__dict__.get("estimator_")
        if est is not None:
            for key, val in list(vars(est).items()):
                if isinstance(val, np.ndarray) and not val.flags.writeable:
                    setattr(est, key, np.array(val))

    def _test_kernel(self, K_test_train: ArrayLike) -> Float64Array:
        # libsvm needs a writeable C-contiguous block (read-only memmaps fail inside it)
        K = _validate_test_kernel(self, K_test_train)
        return np.require(K, dtype=np.float64, requirements=["C", "W"])

    def logits(self, K_test_train: ArrayLike) -> Float64Array:
        """Decision-value logits (n, C); see the class docstring."""
        K = self._test_kernel(K_test_train)
        d = self.estimator_.decision_function(K)
        if d.ndim == 1:
            return np.stack([-0.5 * d, 0.5 * d], axis=1)
        return d

    def decision_function(self, K_test_train: ArrayLike) -> Float64Array:
        """``SVC.decision_function``: (n,) for two classes, else (n, C) one-vs-rest."""
        K = self._test_kernel(K_test_train)
        return self.estimator_.decision_function(K)

    def predict(self, K_test_train: ArrayLike) -> np.ndarray:
        """``SVC.predict`` (from decision values, not from the Platt probabilities)."""
        K = self._test_kernel(K_test_train)
        return self.estimator_.predict(K)

    def predict_proba(self, K_test_train: ArrayLike) -> Float64Array:
        """Platt-scaled ``SVC.predict_proba`` (requires ``probability=True``)."""
        K = self._test_kernel(K_test_train)
        if not self.probability:
            raise InputError("predict_proba needs KernelSVMSurrogate(probability=True).")
        calibrator = getattr(self, "calibrator_", None)  # absent in models pickled before it existed
        if calibrator is not None:
            return calibrator.predict_proba(K)
        return self.estimator_.predict_proba(K)

    def contributions(self, K_test_train: ArrayLike) -> Float64Array:
        """As :meth:`KernelSurrogate.contributions`; two classes only.

        Raises:
            NotImplementedError: for more than two classes (one-vs-one SVMs have no per-class
                linear form).
        """
        check_is_fitted(self)
        if len(self.classes_) != 2:
            raise NotImplementedError(
                "KernelSVMSurrogate.contributions supports two classes only (libsvm's multiclass "
                "SVM is one-vs-one); use KernelSurrogate for multiclass explanations."
            )
        return super().contributions(K_test_train)


class KernelRidgeSurrogate(_KernelMachineMixin, ClassifierMixin, BaseEstimator):
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
    elsewhere (scikit-learn's ``RidgeClassifier`` coding). ``logits = K @ A + b``;
    ``predict_proba = softmax(logits)`` (meaningful when the targets were logits).
    ``class_coef_ = A.T``. Unlike the logistic models the two-class storage is not symmetrized
    (the two columns are fitted independently); ``coef_`` is ``A[:, 1] - A[:, 0]`` for two classes.

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
        K = _validate_train_kernel(self, K_train_train)
        n = K.shape[0]
        classes, y_index, T = _encode_targets(y, n, allow_soft=True, soft_kind="target logits")
        sw = _check_sample_weight(sample_weight, n)
        if T is None:
            if len(classes) < 2:
                raise _one_class_error(classes)
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
