"""What the three kernel surrogates share: kernel and target validation, and the linear read-out.

Every surrogate is a linear model on kernel rows with per-class weights ``class_coef_`` (C x N) and
intercepts ``class_intercept_`` (C,):

.. math:: z_c(x) = \\sum_i W_{c,i}\\,\\kappa(x, x_i) + b_c .

:class:`KernelMachineMixin` derives the scikit-learn surface (``logits``, ``decision_function``,
``predict``, ``contributions``) and :meth:`~KernelMachineMixin.comparison_logits` from those two
arrays; the estimators override what their wrapped scikit-learn model computes differently.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ..errors import InputError

Float64Array = NDArray[np.float64]


def check_finite(K: np.ndarray, what: str) -> None:
    """Raise :class:`InputError` naming the NaN and inf counts of ``K``. Cost: two passes over ``K``."""
    if not np.all(np.isfinite(K)):
        n_nan = int(np.isnan(K).sum())
        n_inf = int(np.isinf(K).sum())
        raise InputError(
            f"The {what} contains NaN or inf values ({n_nan} NaN, {n_inf} inf). Recompute the "
            "kernel (a zero-norm gradient makes a cosine-normalized row 0/0) or drop those points."
        )


def validate_train_kernel(est: Any, K: ArrayLike) -> Float64Array:
    """The (N, N) float64 train x train block; sets ``est.n_features_in_`` (= N) through scikit-learn.

    Raises:
        InputError: NaN/inf values or a non-square block.
    """
    K = validate_data(est, K, reset=True, dtype=np.float64, ensure_all_finite=False)
    check_finite(K, "train x train kernel")
    if K.shape[0] != K.shape[1]:
        raise InputError(
            f"fit() needs the square train x train kernel block, got shape {K.shape}. Pass "
            "K[train, train] (N x N) to fit() and K[test, train] (n x N) to predict()."
        )
    return K


def validate_test_kernel(est: Any, K: ArrayLike) -> Float64Array:
    """The (n, N) float64 test x train block, checked against the fitted number of training points.

    NaN/inf values are reported before any shape complaint.

    Raises:
        NotFittedError: ``est`` is not fitted.
        InputError: NaN/inf values, or not one column per training point.
    """
    check_is_fitted(est)
    try:
        probe = check_array(K, dtype=np.float64, ensure_all_finite=False, ensure_2d=False,
                            allow_nd=True, ensure_min_samples=0)
    except (TypeError, ValueError):
        probe = None
    if probe is not None:
        check_finite(probe, "test x train kernel")
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
    check_finite(K, "test x train kernel")
    return K


def check_sample_weight(sample_weight: ArrayLike | None, n: int) -> Float64Array:
    """(n,) float64 non-negative weights, not all zero (ones when ``sample_weight`` is None).

    Raises:
        InputError: wrong length, NaN/inf, negative or all-zero weights.
    """
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


def encode_targets(
    y: ArrayLike, n: int, *, allow_soft: bool, soft_kind: str = "soft probability targets"
) -> tuple[np.ndarray, np.ndarray | None, Float64Array | None]:
    """Return ``(classes, y_index, T)``.

    Hard labels: ``y_index`` (n,) class positions, ``T`` None. 2-D targets with >= 2 columns:
    ``classes = arange(C)``, ``y_index`` None, ``T`` the (n, C) float64 targets. A column vector
    (n, 1) is read as labels with scikit-learn's ``DataConversionWarning``.

    Raises:
        InputError: y missing, of the wrong shape or length, non-numeric or non-finite targets,
            2-D targets where ``allow_soft`` is False, NaN labels.
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


def one_class_error(classes: np.ndarray) -> InputError:
    """The error for training labels of a single class."""
    return InputError(
        f"The training labels contain only one class ({classes[0]!r}); a classifier needs at "
        "least two classes. Use a training set with examples of two or more classes."
    )


def symmetric_binary(w: Float64Array, b: float) -> tuple[Float64Array, Float64Array]:
    """Per-class form ``[-w/2, w/2]``, ``[-b/2, b/2]`` of one binary decision function ``K @ w + b``."""
    return np.stack([-0.5 * w, 0.5 * w]), np.array([-0.5 * b, 0.5 * b])


def linear_scores(est: Any, K: Float64Array) -> Float64Array:
    """``K @ class_coef_.T + class_intercept_`` of a fitted ``est`` on a validated (n, N) block: (n, C).

    Cost: one (n x N) @ (N x C) product.
    """
    return K @ est.class_coef_.T + est.class_intercept_


def decision_from_logits(Z: Float64Array) -> Float64Array:
    """scikit-learn decision values: ``Z[:, 1] - Z[:, 0]`` (n,) for two classes, else ``Z`` itself."""
    if Z.shape[1] == 2:
        return Z[:, 1] - Z[:, 0]
    return Z


class KernelMachineMixin:
    """Shared surface: logits, decision values, labels, comparison scores and contributions.

    Everything is read from ``class_coef_`` (C x N) and ``class_intercept_`` (C,); an estimator
    whose wrapped scikit-learn model decides differently overrides the method concerned.
    """

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
        return linear_scores(self, validate_test_kernel(self, K_test_train))

    def comparison_logits(self, K_test_train: ArrayLike) -> Float64Array:
        """The scores to compare with the network's logits (faithfulness, plots), shape (n, C).

        ``softmax`` of a row is the surrogate's own class probability, so
        ``faithfulness(network_logits, surrogate.comparison_logits(K), labels)`` compares the two
        models' probabilities. Here: the linear scores :meth:`logits` (a multinomial model's
        probabilities are their softmax); the reference SGD kGLM and the Platt-scaled SVM return
        their log-probabilities instead.

        Args:
            K_test_train: (n, N) test x train kernel block.

        Returns:
            (n, C) float64 array, finite. Cost: one (n x N) @ (N x C) product.
        """
        return self.logits(K_test_train)

    def decision_function(self, K_test_train: ArrayLike) -> Float64Array:
        """scikit-learn decision values: (n,) for 2 classes (> 0: ``classes_[1]``), else (n, C).

        For two classes this is ``logits[:, 1] - logits[:, 0]``; otherwise the logits.
        """
        return decision_from_logits(self.logits(K_test_train))

    def predict(self, K_test_train: ArrayLike) -> np.ndarray:
        """Predicted labels ``classes_[argmax logits]`` (n,)."""
        Z = self.logits(K_test_train)  # validates first: NotFittedError before any attribute
        return self.classes_[np.argmax(Z, axis=1)]

    def contributions(self, K_test_train: ArrayLike) -> Float64Array:
        """Per-training-point contributions ``A[n, c, i] = class_coef_[c, i] * K[n, i]``.

        ``A.sum(-1) == logits(K) - class_intercept_`` exactly up to float rounding. For two classes
        (symmetric storage, see :mod:`tangentlens.surrogate`) ``(A[:, 1] - A[:, 0]).sum(-1)`` equals
        ``decision_function(K) - intercept_[0]``.

        Args:
            K_test_train: (n, N) test x train kernel block.

        Returns:
            (n, C, N) float64 array. Cost: n*C*N multiplications and 8*n*C*N bytes -- slice the
            rows of a large test block (``tangentlens.explain`` does so in chunks).
        """
        K = validate_test_kernel(self, K_test_train)
        return K[:, None, :] * self.class_coef_[None, :, :]


def class_weights(
    class_weight: Literal["balanced"] | dict[Any, float] | None,
    classes: np.ndarray,
    y_index: np.ndarray | None,
    T: Float64Array | None,
) -> Float64Array:
    """(C,) class weights: ones (None), ``N / (C * count_c)`` ("balanced"; soft targets count
    ``T.sum(0)``) or the given ``{label: weight}`` dict (other classes 1).

    Raises:
        InputError: the dict names a class that is not among the labels.
    """
    C = len(classes)
    if class_weight is None:
        return np.ones(C)
    if class_weight == "balanced":
        counts = np.bincount(y_index, minlength=C) if T is None else T.sum(axis=0)
        n = counts.sum()
        with np.errstate(divide="ignore"):
            w = n / (C * counts.astype(np.float64))
        w[~np.isfinite(w)] = 0.0
        return w
    w = np.ones(C)
    for key, val in class_weight.items():
        hits = np.flatnonzero(classes == key)
        if hits.size == 0:
            raise InputError(
                f"class_weight names class {key!r}, which is not among the labels "
                f"{classes.tolist()}."
            )
        w[hits[0]] = float(val)
    return w


def soft_targets(T: Float64Array) -> Float64Array:
    """Validate (N, C) soft targets (probability rows) and renormalize them after clipping rounding noise.

    Raises:
        InputError: fewer than two columns, or rows that are not probability vectors.
    """
    if T.shape[1] < 2:
        raise InputError("Soft targets need at least two columns (classes).")
    if np.any(T < -1e-12) or not np.allclose(T.sum(axis=1), 1.0, atol=1e-5):
        raise InputError(
            "2-D y is read as soft targets: every row must be a probability vector "
            "(non-negative, summing to 1). Pass softmax probabilities, not logits "
            "(use KernelRidgeSurrogate to regress logits)."
        )
    T = np.clip(T, 0.0, None)
    return T / T.sum(axis=1, keepdims=True)
