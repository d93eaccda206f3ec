"""Tests of tangentlens.explain: proponents, opponents and similar examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.datasets import load_digits
from sklearn.metrics.pairwise import rbf_kernel

from tangentlens.errors import InputError
from tangentlens.explain import (
    Attribution,
    Explanation,
    contributions,
    explain,
    most_similar,
)
from tangentlens.surrogate import KernelRidgeSurrogate, KernelSurrogate, KernelSVMSurrogate


@pytest.fixture(scope="module")
def data():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    idx = np.random.RandomState(1).permutation(len(y))[:300]
    tr, te = idx[:240], idx[240:]
    K = rbf_kernel(X[tr], X[tr], gamma=0.05)
    Kt = rbf_kernel(X[te], X[tr], gamma=0.05)
    return K, Kt, y[tr], y[te]


@pytest.fixture(scope="module")
def model(data):
    K, _, y, _ = data
    return KernelSurrogate(alpha=1e-3).fit(K, y)


def _plain(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or type(obj) in (int, float, str, bool)


def test_proponents_and_opponents_are_the_extreme_contributions(model, data):
    _, Kt, ytr, _ = data
    k = 4
    ex = explain(model, Kt, k=k, train_labels=ytr)
    A = model.contributions(Kt)
    Z = model.logits(Kt)
    assert isinstance(ex, Explanation) and len(ex) == len(Kt)
    for p in ex:
        assert p.predicted_index == int(np.argmax(Z[p.test_index]))
        assert p.predicted_label == int(model.classes_[p.predicted_index])
        assert len(p.classes) == 10
        for ce in p.classes:
            a = A[p.test_index, ce.class_index]
            pos = np.sort(a[a > 0])[::-1][:k]
            neg = np.sort(a[a < 0])[:k]
            assert_allclose([x.contribution for x in ce.proponents], pos)
            assert_allclose([x.contribution for x in ce.opponents], neg)
            for x in ce.proponents + ce.opponents:
                assert x.contribution == a[x.index]
                assert x.kernel == Kt[p.test_index, x.index]
                assert x.label == int(ytr[x.index])
            assert ce.logit == pytest.approx(Z[p.test_index, ce.class_index], rel=1e-12)
            assert ce.logit - ce.intercept == pytest.approx(a.sum(), rel=1e-9, abs=1e-9)


def test_contributions_function_matches_method(model, data):
    _, Kt, _, _ = data
    A = contributions(model, Kt[:5])
    assert_allclose(A.sum(-1), model.logits(Kt[:5]) - model.class_intercept_, atol=1e-10)


def test_chunking_does_not_change_results(model, data):
    _, Kt, _, _ = data
    a = explain(model, Kt, k=3)
    b = explain(model, Kt, k=3, chunk_elements=1)  # one row at a time
    assert a == b


def test_to_dict_is_plain_python(model, data):
    _, Kt, ytr, _ = data
    d = explain(model, Kt[:3], k=2, train_labels=ytr).to_dict()
    assert _plain(d)
    json.dumps(d)
    assert d["k"] == 2 and len(d["points"]) == 3
    s = [x.to_dict() for x in most_similar(Kt[:3], 2, train_labels=ytr)]
    assert _plain(s)


def test_classes_selection(model, data):
    _, Kt, _, _ = data
    ex = explain(model, Kt[:6], k=2, classes="predicted")
    for p in ex:
        assert [c.class_index for c in p.classes] == [p.predicted_index]
    ex = explain(model, Kt[:6], k=2, classes=[3, 7])
    assert [c.class_index for c in ex[0].classes] == [3, 7]
    assert ex[0].for_class(7).class_index == 7
    with pytest.raises(InputError):
        ex[0].for_class(1)
    with pytest.raises(InputError, match="out of range"):
        explain(model, Kt[:2], classes=[10])
    with pytest.raises(InputError):
        explain(model, Kt[:2], classes="best")


def test_binary_proponents_mirror_opponents(data):
    K, Kt, y, _ = data
    yb = (y >= 5).astype(int)
    for m in (
        KernelSurrogate(alpha=1e-3).fit(K, yb),
        KernelSurrogate(solver="sgd", random_state=0).fit(K, yb),
        KernelSVMSurrogate(random_state=0).fit(K, yb),
    ):
        ex = explain(m, Kt[:5], k=3)
        for p in ex:
            c0, c1 = p.for_class(0), p.for_class(1)
            assert [a.index for a in c1.proponents] == [a.index for a in c0.opponents]
            assert_allclose(
                [a.contribution for a in c1.proponents], [-a.contribution for a in c0.opponents]
            )
            # class-1 contributions are half the reference's w_i K_i of the decision function
            w = m.coef_[0]
            i = c1.proponents[0].index
            assert c1.proponents[0].contribution == pytest.approx(
                0.5 * w[i] * Kt[p.test_index, i]
            )


def test_ridge_surrogate_can_be_explained(data):
    K, Kt, y, _ = data
    m = KernelRidgeSurrogate(alpha=1e-2).fit(K, y)
    ex = explain(m, Kt[:2], k=2)
    assert len(ex[0].classes) == 10


def test_fewer_than_k_signed_contributions():
    class Fake:
        classes_ = np.array([0, 1])
        class_coef_ = np.array([[1.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
        class_intercept_ = np.zeros(2)
        n_features_in_ = 3

    ex = explain(Fake(), np.array([[1.0, 1.0, 1.0]]), k=5)
    c0, c1 = ex[0].classes
    assert [a.index for a in c0.proponents] == [1, 0]
    assert [a.index for a in c0.opponents] == [2]
    assert c1.proponents == () and c1.opponents == ()
    assert ex.k == 3  # capped at N


def test_most_similar(data):
    _, Kt, ytr, _ = data
    sims = most_similar(Kt, k=5, train_labels=ytr)
    assert len(sims) == len(Kt)
    for s in sims:
        row = Kt[s.test_index]
        assert s.indices == list(np.argsort(-row, kind="stable")[:5])
        vals = [a.kernel for a in s.neighbors]
        assert vals == sorted(vals, reverse=True)
        assert all(isinstance(a, Attribution) and a.label == int(ytr[a.index]) for a in s.neighbors)
    # ties broken by lower index; a single row is accepted
    s = most_similar(np.array([0.5, 0.9, 0.9, 0.1]), k=2)[0]
    assert s.indices == [1, 2]


def test_bad_inputs(model, data):
    _, Kt, ytr, _ = data
    with pytest.raises(InputError, match="one column per training point"):
        explain(model, Kt[:, :-1])
    bad = Kt[:2].copy()
    bad[0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        explain(model, bad)
    with pytest.raises(InputError, match="k must be"):
        explain(model, Kt, k=0)
    with pytest.raises(InputError, match="train_labels"):
        explain(model, Kt[:2], train_labels=ytr[:-1])
    with pytest.raises(InputError, match="fitted"):
        explain(KernelSurrogate(), Kt[:2])
    with pytest.raises(InputError, match="2-D"):
        most_similar(np.zeros((2, 2, 2)))
    with pytest.raises(InputError, match="k must be"):
        most_similar(Kt, k=-1)
