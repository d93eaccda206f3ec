r"""The kGLM fitted from feature rows: :class:`KernelSurrogate`'s exact problem without the N x N kernel.

When the kernel is an inner product of D-dimensional feature rows, ``K = Φ Φᵀ`` (projected features
Φ, N x D, rows scaled to unit norm for the cosine kinds), the multinomial kGLM of
:class:`~tangentlens.surrogate.KernelSurrogate` (``solver="lbfgs"``)

.. math:: J(W, b) = \frac{1}{N} \sum_{j=1}^{N} s_j\, \mathrm{CE}\big(t_j,\; \mathrm{softmax}(W k_j + b)\big)
   + \frac{\alpha}{2} \lVert W \rVert_F^2, \qquad W \in \mathbb{R}^{C\times N},\; k_j = K_{j,:} = \Phi\phi_j,

(``t_j`` one-hot label or soft target row, ``s_j`` = sample weight x class weight, the loss a *mean*
over the N training rows, the penalty ``α/2 ‖W‖²_F`` on W only, the intercept b free) depends on W
only through ``V = W Φ`` (C x D, :attr:`PrimalKernelSurrogate.feature_coef_`): the logits are
``Z = K Wᵀ + 1bᵀ = Φ Vᵀ + 1bᵀ``.

**The exact D-dimensional problem.** Let ``G = ΦᵀΦ = Q Λ Qᵀ`` (D x D) and keep the r eigenvalues
``λ_k > rank_rtol · λ_max`` (r <= min(N, D)); ``Ψ = Φ Q Λ^{-1/2}`` (N x r) has orthonormal columns and
spans the column space of Φ, which is that of K. At the optimum ``∇_W J = Rᵀ K + α W = 0`` (R the N x C
loss residual), so every row of W lies in that space: ``W = Aᵀ Ψᵀ`` with ``A`` (r x C), and then
``‖W‖_F = ‖A‖_F`` and ``K Wᵀ = Ψ Λ Ψᵀ Ψ A = Φ Q Λ^{1/2} A``. Hence J is exactly

.. math:: J(A, b) = \frac{1}{N} \sum_j s_j\, \mathrm{CE}\big(t_j,\; \mathrm{softmax}(A^\top x_j + b)\big)
   + \frac{\alpha}{2} \lVert A \rVert_F^2, \qquad x_j = \Lambda^{1/2} Q^\top \phi_j \in \mathbb{R}^r,

an ordinary ridge-penalized multinomial logistic regression on the r-dimensional rows of
``X = Φ Q Λ^{1/2}`` (``X Xᵀ = K²``, the dual's own design Gram). In the issue's notation ``Vᵀ = Q Λ^{1/2}
A`` and ``‖A‖² = tr(V G⁺ Vᵀ)``: the minimum-norm W of a given V is ``W = (Φ G⁺ Vᵀ)ᵀ``. For ``α > 0`` both
problems are strongly convex on that space and have the same unique minimizer; W, V, b and every
contribution ``W_{c,i} K(x, x_i) = W_{c,i} ⟨φ(x), φ_i⟩`` follow exactly:

* ``feature_coef_ = V = Aᵀ Λ^{1/2} Qᵀ``; test logits ``z(x) = V φ(x) + b`` (no kernel row needed);
* ``dual_factor_ = U = Aᵀ Λ^{-1/2} Qᵀ`` (C x D) and ``class_coef_ = W = U Φᵀ`` (C x N), computed in one
  streamed pass at the end of the fit (C·N floats: the same size as the targets).

The intercept is handled as in :class:`KernelSurrogate`: the rows of X are centered (``x̄`` their
unweighted mean) during the solve and ``b = b' − Aᵀx̄`` afterwards, an exact reparameterization. The
centered design ``X_c X_cᵀ`` equals the dual's ``K_c K_cᵀ`` (``K_c = K − 1μᵀ``), and ``A = Ψᵀ Wᵀ`` is an
isometry, so L-BFGS-B (invariant under orthogonal changes of variables) walks the same iterates as the
dual solver, started at zero, up to rounding (on small problems the iteration counts coincide): the two
fits agree to the solvers' tolerance.

**Cost.** One Gram pass (N·D² flops, plus ``eigh`` D³), then per objective evaluation one pass over the
rows of Φ with 4·N·D·C flops, and a last N·D·C pass for W -- against 4·N²·C per evaluation and
16·N² bytes for the dual fit, which also needs the N²·D products that form K. Memory: the D x D Gram and
its eigenvectors, N x C targets, weights and W, and one block of ``block_rows`` x D rows in float64.
Measured at N = 20,000, D = 512, C = 10 (unit-norm random features, teacher labels, one thread, defaults):
13.7 s and 78 MB above the in-memory features, against 527 s (plus 28 s to form K) and 6.2 GB for
``KernelSurrogate(solver="lbfgs")`` -- 39x faster, 80x less memory.
Φ may be a numpy array (used in place, or converted to float64 once) or any array-like with ``.shape``
and row slicing ``Φ[i:j]`` (a Zarr or h5py array, a ``np.memmap``): then it is read block by block, once
into memory when its float64 rows fit ``cache_bytes`` (default 1 GiB: N = 60,000 rows of D = 1,024 take
491 MB), else on every pass without ever being loaded whole.

**Explanations without the N x N kernel.** :func:`tangentlens.explain` needs ``class_coef_``,
``class_intercept_``, ``classes_`` and a (T, N) test x train block; :meth:`PrimalKernelSurrogate.kernel_rows`
forms that block ``Φ_test Φᵀ`` streamed over training row blocks (T·N floats, T small), so::

    sur = PrimalKernelSurrogate(alpha=1e-3).fit(Phi_train, y)      # Phi_train may live in a store
    K_t = sur.kernel_rows(Phi_test[:100], Phi_train)              # (100, N), never N x N
    ex = explain(sur, K_t, k=5, network_logits=Z_test[:100])
    A = sur.contributions(K_t)                                    # (100, C, N) = W[c, i] * K_t[n, i]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from ..errors import InputError, UnknownKindError
from ._base import (
    Float64Array,
    check_finite,
    check_sample_weight,
    class_weights,
    decision_from_logits,
    encode_targets,
    one_class_error,
    soft_targets,
)

__all__ = ["PrimalKernelSurrogate"]

_BLOCK_ELEMENTS = 2**22
"""Default block size: about this many float64 feature values (32 MiB) per block of streamed rows."""


class _Rows:
    """Row blocks of a feature matrix Φ (N x D) in float64, optionally scaled to unit row norm.

    A plain ``np.ndarray`` is converted (and normalized) once and yielded as one block; anything else
    (a Zarr array, ``np.memmap``, an object with ``.shape`` and ``Φ[i:j]``) is read ``block_rows`` rows
    at a time: once into memory when its float64 rows take at most ``cache_bytes``, else on every pass.
    Every block is checked for NaN/inf.
    """

    def __init__(self, Phi: Any, what: str, block_rows: int | None, normalize: bool,
                 cache_bytes: int = 0) -> None:
        if not (hasattr(Phi, "shape") and hasattr(Phi, "__getitem__")):
            Phi = np.asarray(Phi, dtype=np.float64)
        shape = tuple(int(s) for s in Phi.shape)
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise InputError(
                f"{what} must be a 2-D (n, D) array of feature rows with n >= 1 and D >= 1, got shape "
                f"{shape}. Pass one feature row per example (reshape a single row to (1, D))."
            )
        self.n, self.d = shape
        self.what = what
        self.normalize = normalize
        self.rows = max(1, _BLOCK_ELEMENTS // self.d) if block_rows is None else int(block_rows)
        self._full: Float64Array | None = None
        self._src = Phi
        if type(Phi) is np.ndarray:
            self._full = self._prepare(Phi, 0)
            self.rows = self.n
        elif self.n * self.d * 8 <= cache_bytes:  # read once, block by block, into one float64 array
            full = np.empty((self.n, self.d))
            for start, stop, B in self.blocks():
                full[start:stop] = B
            self._full, self.rows = full, self.n

    def _prepare(self, block: Any, start: int) -> Float64Array:
        B = np.asarray(block, dtype=np.float64)
        if B.ndim != 2 or B.shape[1] != self.d:
            raise InputError(
                f"{self.what}[{start}:...] returned shape {B.shape}; row slicing must give (rows, {self.d})."
            )
        check_finite(B, self.what)
        if self.normalize:
            norms = np.sqrt(np.einsum("ij,ij->i", B, B))
            zero = np.flatnonzero(norms == 0)
            if zero.size:
                raise InputError(
                    f"{self.what} row {start + int(zero[0])} has zero norm and cannot be scaled to unit "
                    "norm (normalize=True); drop that example or pass normalize=False."
                )
            B = B / norms[:, None]
        return B

    def blocks(self) -> Iterator[tuple[int, int, Float64Array]]:
        """``(start, stop, rows)`` over the N rows in order; float64, finite, normalized on request."""
        if self._full is not None:
            yield 0, self.n, self._full
            return
        for start in range(0, self.n, self.rows):
            stop = min(self.n, start + self.rows)
            yield start, stop, self._prepare(self._src[start:stop], start)


def _objective(
    theta: Float64Array,
    rows: _Rows,
    M: Float64Array,
    xbar: Float64Array,
    T: Float64Array,
    s: Float64Array,
    alpha: float,
    fit_intercept: bool,
) -> tuple[float, Float64Array]:
    """J(A, b') and its gradient, streamed over the rows of Φ; ``M = Q Λ^{1/2}`` (D x r).

    Centered rows ``x_j − x̄`` with ``x_j = Mᵀφ_j``: ``Z = Φ (M A) + (b' − x̄ᵀA)``; gradient
    ``Mᵀ(ΦᵀR) − x̄ (1ᵀR) + αA`` and ``1ᵀR`` for b', with ``R = (s/N)(softmax(Z) − T)``.
    """
    r = M.shape[1]
    N, C = T.shape
    A = theta[: r * C].reshape(r, C)
    V = M @ A  # (D, C)
    offset = theta[r * C :] - xbar @ A if fit_intercept else np.zeros(C)
    loss = 0.0
    Ht = np.zeros((C, M.shape[0]))  # (ΦᵀR)ᵀ
    rsum = np.zeros(C)
    for start, stop, B in rows.blocks():
        Z = B @ V + offset
        logP = log_softmax(Z, axis=1)
        Tb, sb = T[start:stop], s[start:stop, None]
        loss -= float(np.sum(sb * Tb * logP))
        R = (sb / N) * (np.exp(logP) - Tb)
        Ht += R.T @ B
        rsum += R.sum(axis=0)
    gA = (Ht @ M).T + alpha * A
    if fit_intercept:
        gA -= np.outer(xbar, rsum)
    loss = loss / N + 0.5 * alpha * float(np.sum(A * A))
    if fit_intercept:
        return loss, np.concatenate([gA.ravel(), rsum])
    return loss, gA.ravel()


class PrimalKernelSurrogate(ClassifierMixin, BaseEstimator):
    """The kGLM of :class:`KernelSurrogate` (``solver="lbfgs"``) fitted on feature rows Φ, K = ΦΦᵀ.

    Same objective, class and sample weights, soft (distilled) targets, intercept and ``alpha``
    as ``KernelSurrogate(solver="lbfgs")`` fitted on ``K = Φ Φᵀ``, solved exactly in at most D
    dimensions (see :mod:`tangentlens.surrogate.primal` for the derivation and costs): the fitted
    ``class_coef_`` (C x N), ``class_intercept_`` and hence every contribution equal the dual model's
    to the solver tolerance. Deterministic: no randomness, repeated fits are bit-identical.

    Inputs are *features*, not kernel blocks: ``fit(Phi_train, y)``, and ``predict``,
    ``decision_function``, ``logits``, ``comparison_logits``, ``predict_proba`` take test feature
    rows (n, D) -- a numpy array or a row-sliceable array-like streamed in blocks. The kernel-block
    surface of the dual surrogates is :meth:`kernel_rows` (Φ_test Φ_trainᵀ) plus
    :meth:`contributions` on such a block, which is what :func:`tangentlens.explain` takes.

    Args:
        alpha: L2 strength on the dual weights W, as in :class:`KernelSurrogate` (> 0 for a unique
            solution; with 0 the minimum-norm W is returned once the solver stops).
        class_weight: ``"balanced"``, ``None`` or a ``{label: weight}`` dict (as the dual model).
        fit_intercept: Fit the unpenalized intercept.
        max_iter: L-BFGS-B iteration cap (``None``: 1000).
        tol: Stopping tolerance on the max-abs gradient in (A, b) (``None``: 1e-6), the dual
            solver's criterion in the isometric coordinates.
        normalize: Scale every feature row (training and test) to unit norm on the fly, so that
            K is the cosine-normalized kernel; leave False when the rows are already normalized.
        block_rows: Rows per streamed block of a non-numpy Φ (``None``: about 2**22 / D).
        cache_bytes: A non-numpy training Φ whose float64 rows take at most this many bytes is read once
            and kept in memory for the fit's passes (default 2**30); larger ones, or all with 0, are
            read again on every pass.
        rank_rtol: Eigenvalues of ΦᵀΦ at or below ``rank_rtol · λ_max`` are dropped (``None``:
            ``D · eps``, NumPy's ``pinv`` default).

    Attributes:
        classes_: (C,) class labels (``arange(C)`` for soft targets).
        feature_coef_: (C, D) ``V = W Φ``; ``logits(Φ_t) = Φ_t @ feature_coef_.T + class_intercept_``.
        dual_factor_: (C, D) ``U`` with ``class_coef_ = U @ Φᵀ``.
        class_coef_: (C, N) dual weights W (symmetric ``[-w/2, w/2]`` for two classes).
        class_intercept_: (C,) intercepts.
        coef_, intercept_: scikit-learn-shaped feature-space weights: (1, D) and (1,) for two classes
            (``feature_coef_[1] − feature_coef_[0]``), else ``feature_coef_`` and ``class_intercept_``.
        n_features_in_: D (the feature dimension). ``n_train_``: N. ``rank_``: r.
        n_iter_: (1,) L-BFGS-B iterations run.
    """

    def __init__(
        self,
        alpha: float = 1e-4,
        class_weight: Literal["balanced"] | dict[Any, float] | None = "balanced",
        fit_intercept: bool = True,
        max_iter: int | None = None,
        tol: float | None = None,
        normalize: bool = False,
        block_rows: int | None = None,
        cache_bytes: int = 2**30,
        rank_rtol: float | None = None,
    ) -> None:
        self.alpha = alpha
        self.class_weight = class_weight
        self.fit_intercept = fit_intercept
        self.max_iter = max_iter
        self.tol = tol
        self.normalize = normalize
        self.block_rows = block_rows
        self.cache_bytes = cache_bytes
        self.rank_rtol = rank_rtol

    def _check_params(self) -> None:
        if not isinstance(self.alpha, Real) or not self.alpha >= 0:
            raise InputError(f"alpha must be a non-negative number, got {self.alpha!r}.")
        if self.max_iter is not None and (not isinstance(self.max_iter, Integral) or self.max_iter < 1):
            raise InputError(f"max_iter must be a positive integer or None, got {self.max_iter!r}.")
        if self.tol is not None and (not isinstance(self.tol, Real) or self.tol < 0):
            raise InputError(f"tol must be a non-negative number or None, got {self.tol!r}.")
        if self.block_rows is not None and (
            not isinstance(self.block_rows, Integral) or isinstance(self.block_rows, bool)
            or self.block_rows < 1
        ):
            raise InputError(f"block_rows must be a positive integer or None, got {self.block_rows!r}.")
        cb = self.cache_bytes
        if not isinstance(cb, Integral) or isinstance(cb, bool) or cb < 0:
            raise InputError(f"cache_bytes must be a non-negative integer, got {self.cache_bytes!r}.")
        if self.rank_rtol is not None and (not isinstance(self.rank_rtol, Real) or not self.rank_rtol >= 0):
            raise InputError(f"rank_rtol must be a non-negative number or None, got {self.rank_rtol!r}.")
        cw = self.class_weight
        if not (cw is None or cw == "balanced" or isinstance(cw, dict)):
            raise UnknownKindError(f"class_weight must be 'balanced', None or a dict, got {cw!r}.")

    def _rows(self, Phi: Any, what: str) -> _Rows:
        return _Rows(Phi, what, self.block_rows, bool(self.normalize))

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, Phi: Any, y: ArrayLike, sample_weight: ArrayLike | None = None) -> PrimalKernelSurrogate:
        """Fit on the N training feature rows (K = ΦΦᵀ is never formed).

        Args:
            Phi: (N, D) training features: a numpy array, or an array-like with ``.shape`` and row
                slicing (read block by block on every pass, never whole).
            y: (N,) labels, or (N, C) soft targets (rows on the simplex: the distilled surrogate).
            sample_weight: Optional (N,) non-negative weights.

        Returns:
            self. Cost: see :mod:`tangentlens.surrogate.primal` -- one Gram pass, one pass per
            L-BFGS-B evaluation (tens to a few hundred, as the dual solver), one pass for ``class_coef_``.

        Raises:
            InputError: Φ not 2-D, NaN/inf in it, a zero row with ``normalize=True``, ``len(y)`` not
                N, only one class, soft targets off the simplex, a zero feature matrix.
            UnknownKindError: unknown class_weight.
        """
        self._check_params()
        rows = _Rows(Phi, "training feature matrix", self.block_rows, bool(self.normalize),
                     int(self.cache_bytes))
        N, D = rows.n, rows.d
        classes, y_index, T = encode_targets(y, N, allow_soft=True)
        sw = check_sample_weight(sample_weight, N)
        if T is None and len(classes) < 2:
            raise one_class_error(classes)
        if T is not None:
            T = soft_targets(T)
        else:
            T = np.zeros((N, len(classes)))
            T[np.arange(N), y_index] = 1.0
        C = T.shape[1]
        s = sw * (T @ class_weights(self.class_weight, classes, y_index, T))

        # Gram pass: G = ΦᵀΦ and the mean row.
        G = np.zeros((D, D))
        total = np.zeros(D)
        for _, _, B in rows.blocks():
            G += B.T @ B
            total += B.sum(axis=0)
        lam, Q = np.linalg.eigh(G)
        rtol = D * np.finfo(np.float64).eps if self.rank_rtol is None else float(self.rank_rtol)
        keep = lam > rtol * max(float(lam[-1]), 0.0)
        if not np.any(keep):
            raise InputError(
                "The training feature matrix is zero (ΦᵀΦ = 0): there is no kernel to fit on. Check the "
                "features (parameters selected, projection) before fitting."
            )
        lam, Q = lam[keep], Q[:, keep]
        r = lam.size
        M = Q * np.sqrt(lam)  # D x r: x_j = Mᵀ φ_j
        xbar = (total / N) @ M if self.fit_intercept else np.zeros(r)

        max_iter = 1000 if self.max_iter is None else int(self.max_iter)
        tol = 1e-6 if self.tol is None else float(self.tol)
        theta0 = np.zeros(r * C + (C if self.fit_intercept else 0))
        res = optimize.minimize(
            _objective,
            theta0,
            args=(rows, M, xbar, T, s, float(self.alpha), bool(self.fit_intercept)),
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
        if not res.success and res.nit >= max_iter:
            warnings.warn(
                f"PrimalKernelSurrogate stopped after max_iter={max_iter} iterations before reaching "
                f"tol={tol} (max |grad| = {np.max(np.abs(res.jac)):.2e}); raise max_iter, loosen tol or "
                "increase alpha.",
                ConvergenceWarning,
                stacklevel=2,
            )
        A = res.x[: r * C].reshape(r, C)
        b = res.x[r * C :] - xbar @ A if self.fit_intercept else np.zeros(C)
        V = (M @ A).T  # C x D
        U = ((Q / np.sqrt(lam)) @ A).T  # C x D
        W = np.empty((C, N))
        for start, stop, B in rows.blocks():
            W[:, start:stop] = U @ B.T
        self.classes_ = classes
        self.feature_coef_ = V
        self.dual_factor_ = U
        self.class_coef_ = W
        self.class_intercept_ = b
        if C == 2:
            self.coef_ = (V[1] - V[0])[None, :]
            self.intercept_ = np.array([b[1] - b[0]])
        else:
            self.coef_ = V
            self.intercept_ = b
        self.n_features_in_ = D
        self.n_train_ = N
        self.rank_ = r
        self.n_iter_ = np.array([int(res.nit)])
        return self

    # -- read-outs on test features ----------------------------------------------------------
    def _test_rows(self, Phi_test: Any) -> _Rows:
        check_is_fitted(self)
        rows = self._rows(Phi_test, "test feature matrix")
        if rows.d != self.n_features_in_:
            raise InputError(
                f"The test feature matrix has {rows.d} columns but the surrogate was fitted on "
                f"{self.n_features_in_}-dimensional features; pass features of the same kind and "
                "projection as the training rows."
            )
        return rows

    def logits(self, Phi_test: Any) -> Float64Array:
        """Class scores ``Φ_t @ feature_coef_.T + class_intercept_`` (n, C) -- the dual model's
        ``K_t @ class_coef_.T + class_intercept_`` with ``K_t = Φ_t Φᵀ``. Cost: n·D·C, streamed."""
        rows = self._test_rows(Phi_test)
        Z = np.empty((rows.n, len(self.classes_)))
        for start, stop, B in rows.blocks():
            Z[start:stop] = B @ self.feature_coef_.T + self.class_intercept_
        return Z

    def comparison_logits(self, Phi_test: Any) -> Float64Array:
        """The (n, C) scores to compare with the network's logits: :meth:`logits` (a multinomial
        model's probabilities are their softmax), as :meth:`KernelSurrogate.comparison_logits`."""
        return self.logits(Phi_test)

    def decision_function(self, Phi_test: Any) -> Float64Array:
        """scikit-learn decision values: (n,) for two classes (> 0: ``classes_[1]``), else (n, C)."""
        return decision_from_logits(self.logits(Phi_test))

    def predict(self, Phi_test: Any) -> np.ndarray:
        """Predicted labels ``classes_[argmax logits]`` (n,)."""
        return self.classes_[np.argmax(self.logits(Phi_test), axis=1)]

    def predict_proba(self, Phi_test: Any) -> Float64Array:
        """Class probabilities ``softmax(logits)`` (n, C)."""
        return softmax(self.logits(Phi_test), axis=1)

    def predict_log_proba(self, Phi_test: Any) -> Float64Array:
        """``log_softmax(logits)`` (n, C), computed stably."""
        return log_softmax(self.logits(Phi_test), axis=1)

    # -- the kernel-block surface (explanations) ---------------------------------------------
    def kernel_rows(self, Phi_test: Any, Phi_train: Any) -> Float64Array:
        """The (n, N) test x train kernel block ``Φ_t Φᵀ`` (rows normalized when ``normalize``).

        Streamed over training row blocks; the result is what :meth:`contributions`,
        :func:`tangentlens.explain` and :func:`tangentlens.most_similar` take. Pass the training
        features in the order used by :meth:`fit`.

        Cost: n·N·D flops, n·N floats of output (keep n small: slice the test points), one block
        of training rows at a time.

        Raises:
            InputError: feature dimensions or the number of training rows differ from the fit.
        """
        test = self._test_rows(Phi_test)
        train = self._rows(Phi_train, "training feature matrix")
        if train.d != self.n_features_in_ or train.n != self.n_train_:
            raise InputError(
                f"Phi_train has shape {(train.n, train.d)} but the surrogate was fitted on "
                f"{(self.n_train_, self.n_features_in_)}; pass the training features it was fitted on."
            )
        Pt = np.concatenate([B for _, _, B in test.blocks()]) if test._full is None else test._full
        K = np.empty((test.n, train.n))
        for start, stop, B in train.blocks():
            K[:, start:stop] = Pt @ B.T
        return K

    def contributions(self, K_test_train: ArrayLike) -> Float64Array:
        """``A[n, c, i] = class_coef_[c, i] * K[n, i]`` (n, C, N) for a test x train kernel block.

        ``A.sum(-1) == logits(Φ_t) − class_intercept_`` for ``K = kernel_rows(Φ_t, Φ)``; the same
        contract as :meth:`KernelSurrogate.contributions`. Cost: n·C·N products and floats.

        Raises:
            InputError: not one column per training point, or NaN/inf.
        """
        check_is_fitted(self)
        K = np.asarray(K_test_train, dtype=np.float64)
        if K.ndim == 1:
            K = K[None, :]
        if K.ndim != 2 or K.shape[1] != self.n_train_:
            raise InputError(
                f"The test x train kernel block must be (n, {self.n_train_}) -- one column per training "
                f"point, in training order; got shape {K.shape}. Form it with kernel_rows(Phi_test, "
                "Phi_train)."
            )
        check_finite(K, "test x train kernel")
        return K[:, None, :] * self.class_coef_[None, :, :]
