"""PrimalKernelSurrogate (the kGLM fitted from feature rows, K = ΦΦᵀ) equals KernelSurrogate(solver="lbfgs")
fitted on the N x N kernel: decision values, dual coefficients W and contributions to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from tangentlens import explain
from tangentlens.errors import InputError
from tangentlens.surrogate import KernelSurrogate, PrimalKernelSurrogate

TIGHT = dict(tol=1e-10, max_iter=20000)
ATOL = 1e-6


class RowStore:
    """A row-sliceable, non-numpy array-like (like a Zarr array): counts reads and bounds their size."""

    def __init__(self, A: np.ndarray, max_rows: int) -> None:
        self._A = np.array(A, dtype=np.float64)
        self.shape = self._A.shape
        self.max_rows = max_rows
        self.reads = 0
        self.most = 0

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step in (None, 1), f"not a row slice: {key!r}"
        rows = len(range(*key.indices(self.shape[0])))
        assert rows <= self.max_rows, f"read {rows} rows at once (bound {self.max_rows})"
        self.reads += 1
        self.most = max(self.most, rows)
        return self._A[key].copy()


def _data(N: int, D: int, C: int, soft: bool, seed: int = 0, unit: bool = True):
    rng = np.random.default_rng(seed)
    Phi = rng.normal(size=(N, D)).astype(np.float32).astype(np.float64)
    Pt = rng.normal(size=(6, D))
    if unit:
        Phi /= np.linalg.norm(Phi, axis=1, keepdims=True)
        Pt /= np.linalg.norm(Pt, axis=1, keepdims=True)
    if soft:
        y = rng.dirichlet(np.ones(C), N)
    else:
        y = rng.integers(0, C, N)
        y[:C] = np.arange(C)
    return Phi, Pt, y


def _assert_same(p: PrimalKernelSurrogate, d: KernelSurrogate, Phi: np.ndarray, Pt: np.ndarray) -> None:
    Kt = Pt @ Phi.T
    assert_array_equal(p.classes_, d.classes_)
    assert_allclose(p.decision_function(Pt), d.decision_function(Kt), atol=ATOL, rtol=0)
    assert_allclose(p.logits(Pt), d.logits(Kt), atol=ATOL, rtol=0)
    assert_allclose(p.class_coef_, d.class_coef_, atol=ATOL, rtol=0)
    assert_allclose(p.class_intercept_, d.class_intercept_, atol=ATOL, rtol=0)
    K_rows = p.kernel_rows(Pt, Phi)
    assert_allclose(K_rows, Kt, atol=1e-12, rtol=0)
    assert_allclose(p.contributions(K_rows), d.contributions(Kt), atol=ATOL, rtol=0)
    assert_allclose(p.predict_proba(Pt), d.predict_proba(Kt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("N,D", [(30, 50), (90, 12)], ids=["N<D", "N>D"])
@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
def test_primal_equals_dual(N, D, C, soft):
    Phi, Pt, y = _data(N, D, C, soft)
    d = KernelSurrogate(solver="lbfgs", alpha=1e-3, **TIGHT).fit(Phi @ Phi.T, y)
    p = PrimalKernelSurrogate(alpha=1e-3, **TIGHT).fit(Phi, y)
    assert p.rank_ == min(N, D)
    _assert_same(p, d, Phi, Pt)
    # the identities the module states
    assert_allclose(p.class_coef_ @ Phi, p.feature_coef_, atol=1e-10)
    assert_allclose(p.dual_factor_ @ Phi.T, p.class_coef_, atol=1e-12)
    assert_array_equal(p.predict(Pt), d.predict(Pt @ Phi.T))
    assert_allclose(p.comparison_logits(Pt), p.logits(Pt))
    if C == 2:
        assert p.coef_.shape == (1, D)
        assert_allclose(p.class_coef_.sum(axis=0), 0, atol=1e-12)  # symmetric binary storage
    else:
        assert p.coef_.shape == (C, D)


@pytest.mark.parametrize("N,D,C,soft", [(30, 50, 3, False), (90, 12, 2, True), (90, 12, 4, False)])
def test_streamed_array_like_equals_dual(N, D, C, soft):
    Phi, Pt, y = _data(N, D, C, soft, seed=1)
    store = RowStore(Phi, max_rows=16)
    p = PrimalKernelSurrogate(alpha=1e-3, block_rows=16, cache_bytes=0, **TIGHT).fit(store, y)
    assert store.most <= 16 and store.reads >= 3 * int(np.ceil(N / 16))  # Gram, >= 1 L-BFGS pass, W
    d = KernelSurrogate(solver="lbfgs", alpha=1e-3, **TIGHT).fit(Phi @ Phi.T, y)
    _assert_same(p, d, Phi, Pt)
    # streamed test rows and kernel rows
    test_store = RowStore(Pt, max_rows=16)
    assert_allclose(p.logits(test_store), p.logits(Pt), atol=1e-12)
    store.reads = 0
    assert_allclose(p.kernel_rows(Pt, store), Pt @ Phi.T, atol=1e-12)
    assert store.reads == int(np.ceil(N / 16))


def test_rows_within_cache_bytes_are_read_once():
    Phi, Pt, y = _data(90, 12, 3, False, seed=4)
    store = RowStore(Phi, max_rows=16)
    cached = PrimalKernelSurrogate(alpha=1e-3, block_rows=16, **TIGHT).fit(store, y)
    assert store.most <= 16 and store.reads == int(np.ceil(90 / 16))  # one pass, in blocks
    streamed = PrimalKernelSurrogate(alpha=1e-3, block_rows=16, cache_bytes=90 * 12 * 8 - 1, **TIGHT)
    store.reads = 0
    streamed.fit(store, y)
    assert store.reads >= 3 * int(np.ceil(90 / 16))
    assert_allclose(cached.class_coef_, streamed.class_coef_, atol=1e-9)
    with pytest.raises(InputError, match="cache_bytes"):
        PrimalKernelSurrogate(cache_bytes=-1).fit(Phi, y)


def test_memmap_is_streamed(tmp_path):
    Phi, Pt, y = _data(40, 20, 3, False, seed=2)
    mm = np.lib.format.open_memmap(tmp_path / "phi.npy", mode="w+", dtype=np.float32, shape=Phi.shape)
    mm[:] = Phi
    mm.flush()
    stored = np.load(tmp_path / "phi.npy", mmap_mode="r")
    p = PrimalKernelSurrogate(alpha=1e-3, block_rows=7, **TIGHT).fit(stored, y)
    q = PrimalKernelSurrogate(alpha=1e-3, **TIGHT).fit(np.asarray(stored, dtype=np.float64), y)
    assert_allclose(p.class_coef_, q.class_coef_, atol=1e-9)


def test_options_match_the_dual():
    """Sample weights, a class-weight dict, no intercept, unnormalized features with normalize=True."""
    Phi, Pt, y = _data(40, 25, 3, False, seed=3, unit=False)
    sw = np.random.default_rng(3).uniform(0.2, 2.0, len(y))
    U = Phi / np.linalg.norm(Phi, axis=1, keepdims=True)
    Ut = Pt / np.linalg.norm(Pt, axis=1, keepdims=True)
    for kw in (dict(class_weight={0: 2.0, 2: 0.5}), dict(fit_intercept=False), dict(class_weight=None)):
        d = KernelSurrogate(alpha=1e-2, **kw, **TIGHT).fit(U @ U.T, y, sample_weight=sw)
        p = PrimalKernelSurrogate(alpha=1e-2, normalize=True, **kw, **TIGHT).fit(Phi, y, sample_weight=sw)
        _assert_same(p, d, U, Ut)
        assert_allclose(p.logits(Pt), p.logits(Ut), atol=1e-12)  # test rows normalized too
        assert_allclose(p.kernel_rows(Pt, Phi), Ut @ U.T, atol=1e-12)
        if not kw.get("fit_intercept", True):
            assert_array_equal(p.class_intercept_, 0)


def test_explain_without_the_full_kernel():
    Phi, Pt, y = _data(60, 16, 3, False, seed=4)
    d = KernelSurrogate(alpha=1e-3, **TIGHT).fit(Phi @ Phi.T, y)
    p = PrimalKernelSurrogate(alpha=1e-3, block_rows=8, **TIGHT).fit(RowStore(Phi, 8), y)
    ep = explain(p, p.kernel_rows(Pt, RowStore(Phi, 8)), k=4, train_labels=y)
    ed = explain(d, Pt @ Phi.T, k=4, train_labels=y)
    for a, b in zip(ep.points, ed.points):
        assert a.predicted_index == b.predicted_index
        for ca, cb in zip(a.classes, b.classes):
            assert [t.index for t in ca.proponents] == [t.index for t in cb.proponents]
            assert [t.index for t in ca.opponents] == [t.index for t in cb.opponents]
            assert_allclose([t.contribution for t in ca.proponents],
                            [t.contribution for t in cb.proponents], atol=ATOL)
    A = p.contributions(p.kernel_rows(Pt, Phi))
    assert_allclose(A.sum(-1), p.logits(Pt) - p.class_intercept_, atol=1e-10)


def test_deterministic_and_rank_deficient():
    Phi, Pt, y = _data(30, 8, 2, False, seed=5)
    Phi = np.hstack([Phi, Phi[:, :3]])  # D = 11, rank 8
    a = PrimalKernelSurrogate(alpha=1e-3, **TIGHT).fit(Phi, y)
    b = PrimalKernelSurrogate(alpha=1e-3, **TIGHT).fit(Phi, y)
    assert a.rank_ == 8
    assert_array_equal(a.class_coef_, b.class_coef_)
    d = KernelSurrogate(alpha=1e-3, **TIGHT).fit(Phi @ Phi.T, y)
    assert_allclose(a.class_coef_, d.class_coef_, atol=ATOL)


def test_errors():
    Phi, Pt, y = _data(20, 6, 2, False)
    with pytest.raises(InputError, match="2-D"):
        PrimalKernelSurrogate().fit(Phi[0], y)
    bad = Phi.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        PrimalKernelSurrogate().fit(bad, y)
    with pytest.raises(InputError, match="NaN"):
        PrimalKernelSurrogate(block_rows=4).fit(RowStore(bad, 4), y)
    zero = Phi.copy()
    zero[5] = 0
    with pytest.raises(InputError, match="row 5 has zero norm"):
        PrimalKernelSurrogate(normalize=True).fit(zero, y)
    with pytest.raises(InputError, match="zero"):
        PrimalKernelSurrogate().fit(np.zeros((20, 6)), y)
    with pytest.raises(InputError, match="one class"):
        PrimalKernelSurrogate().fit(Phi, np.zeros(20, dtype=int))
    with pytest.raises(InputError, match="probability"):
        PrimalKernelSurrogate().fit(Phi, np.full((20, 2), 0.7))
    with pytest.raises(InputError, match="block_rows"):
        PrimalKernelSurrogate(block_rows=0).fit(Phi, y)
    m = PrimalKernelSurrogate().fit(Phi, y)
    with pytest.raises(InputError, match="6-dimensional"):
        m.logits(np.ones((2, 5)))
    with pytest.raises(InputError, match="one column per training point"):
        m.contributions(np.ones((2, 19)))
    with pytest.raises(InputError, match="fitted on"):
        m.kernel_rows(Pt, Phi[:10])
