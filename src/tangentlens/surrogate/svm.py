"""The reference's kernel SVM baseline on a precomputed kernel (libsvm's ``SVC``, Platt-scaled)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted

from ..errors import InputError
from ._base import (
    Float64Array,
    KernelMachineMixin,
    check_sample_weight,
    encode_targets,
    one_class_error,
    symmetric_binary,
    validate_test_kernel,
    validate_train_kernel,
)

__all__ = ["KernelSVMSurrogate"]


def _svc_has_probability() -> bool:
    """Whether this scikit-learn's ``SVC`` still takes ``probability`` (removed in 1.11)."""
    return "probability" in SVC().get_params()


class KernelSVMSurrogate(KernelMachineMixin, ClassifierMixin, BaseEstimator):
    """The reference's kernel SVM baseline: ``SVC(kernel="precomputed", probability=True)``.

    ``predict``, ``decision_function`` and ``predict_proba`` are exactly the wrapped ``SVC``'s
    (``predict_proba`` is Platt-scaled, fitted with an internal 5-fold CV seeded by
    ``random_state``). scikit-learn 1.11 removes ``SVC(probability=...)``; there the Platt
    scaling is the replacement scikit-learn names, ``CalibratedClassifierCV(SVC(), method="sigmoid",
    ensemble=False)`` on a seeded stratified 5-fold split (stored as ``calibrator_``; ``None``
    where libsvm's own Platt scaling is used), and ``decision_function``/``predict`` remain the
    full-data ``SVC``'s. ``logits`` are decision values: ``[-d/2, d/2]`` for two classes (so
    ``softmax(logits)`` is ``sigmoid(d)``, *not* the Platt probability), the one-vs-rest
    ``decision_function`` otherwise. :meth:`comparison_logits` -- the scores to compare with a
    network -- are the log of the Platt probabilities (the decision-value logits with
    ``probability=False``).

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
        K = validate_train_kernel(self, K_train_train)
        K = np.require(K, dtype=np.float64, requirements=["C", "W"])
        n = K.shape[0]
        classes, _, _ = encode_targets(y, n, allow_soft=False)
        if len(classes) < 2:
            raise one_class_error(classes)
        if sample_weight is not None:
            sample_weight = check_sample_weight(sample_weight, n)
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
            self.class_coef_, self.class_intercept_ = symmetric_binary(
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
        K = validate_test_kernel(self, K_test_train)
        return np.require(K, dtype=np.float64, requirements=["C", "W"])

    def logits(self, K_test_train: ArrayLike) -> Float64Array:
        """Decision-value logits (n, C); see the class docstring."""
        K = self._test_kernel(K_test_train)
        d = self.estimator_.decision_function(K)
        if d.ndim == 1:
            return np.stack([-0.5 * d, 0.5 * d], axis=1)
        return d

    def comparison_logits(self, K_test_train: ArrayLike) -> Float64Array:
        """The scores to compare with the network's logits, shape (n, C).

        ``log(predict_proba)``, the log of the Platt probabilities (``softmax`` of a row gives them
        back; a probability that underflows to 0 is floored at the smallest normal float64, log
        about -708); with ``probability=False`` the decision-value :meth:`logits`. Cost: one
        libsvm prediction.
        """
        if not self.probability:
            return self.logits(K_test_train)
        P = self.predict_proba(K_test_train)
        return np.log(np.maximum(P, np.finfo(np.float64).tiny))

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
