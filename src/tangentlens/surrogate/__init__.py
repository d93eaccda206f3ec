"""Kernel surrogates: linear models on a *precomputed* kernel, fitted to mimic a network.

Every estimator here is a scikit-learn classifier whose input ``X`` is a kernel block, not features:

* ``fit(K_train_train, y)`` takes the N x N train x train block (normalized kernel, e.g. trNTK);
* ``predict``, ``decision_function``, ``predict_proba``, ``logits``, ``comparison_logits``,
  ``contributions`` take the n x N test x train block (one row per test point, one column per
  training point, in the training order).

A *kernel general linear model* (kGLM) has per-class logits

.. math:: z_c(x) = \\sum_i W_{c,i}\\,\\kappa(x, x_i) + b_c,

so the logit decomposes over training points: the contribution of training point ``i`` to class
``c`` at ``x`` is ``A[c, i] = W[c, i] * K[x, i]`` and ``sum_i A[c, i] = z_c(x) - b_c`` (see
:meth:`KernelSurrogate.contributions`). That decomposition is the explanation.

Estimators, one module each:

* :class:`KernelSurrogate` (``kglm``) -- the kGLM. ``solver="sgd"`` reproduces the reference
  (scikit-learn ``SGDClassifier``, log loss, one-vs-rest, seeded); ``solver="lbfgs"`` (default) is
  an exact, deterministic L2-regularized multinomial logistic regression that also fits *soft*
  targets (the network's own probabilities: a distilled surrogate).
* :class:`KernelSVMSurrogate` (``svm``) -- the reference's kernel SVM baseline
  (``SVC(kernel="precomputed")``).
* :class:`KernelRidgeSurrogate` (``ridge``) -- kernel ridge regression on the network's logits (or
  on labels).

Conventions shared by all three:

* ``classes_`` -- the class labels; with 2-D soft/regression targets of C columns it is
  ``arange(C)``.
* ``logits(K)`` -- always (n, C) linear class scores. ``decision_function(K)`` follows
  scikit-learn: (n,) for two classes (positive means ``classes_[1]``), (n, C) otherwise.
* ``comparison_logits(K)`` -- the (n, C) scores to compare with the network's logits (pass them
  to :func:`tangentlens.faithfulness.faithfulness`): ``softmax`` of a row is the surrogate's own
  class probability. The log-probabilities for the SGD kGLM (scikit-learn's one-vs-rest
  probabilities) and the Platt-scaled SVM; the linear scores ``logits(K)`` otherwise.
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

from .kglm import KernelSurrogate
from .primal import PrimalKernelSurrogate
from .ridge import KernelRidgeSurrogate
from .svm import KernelSVMSurrogate

__all__ = [
    "KernelRidgeSurrogate",
    "KernelSVMSurrogate",
    "KernelSurrogate",
    "PrimalKernelSurrogate",
]
