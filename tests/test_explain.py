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


# ------------------------------------------------------------------ targets, coverage, agreement


class _Fake:
    """A surrogate with hand-set weights: with a kernel row of ones the contributions are W."""

    classes_ = np.array([10, 20, 30])
    class_coef_ = np.array([
        [3.0, -1.0, 2.0, -4.0, 0.5, 0.0],   # S+ = 5.5, S- = -5, z - b = 0.5
        [1.0, 1.0, 1.0, 1.0, 1.0, -2.0],    # S+ = 5, S- = -2, z - b = 3
        [-1.0, -1.0, 0.0, 0.0, 0.0, -1.0],  # no positive contribution; z - b = -3
    ])
    class_intercept_ = np.array([0.0, -2.0, 0.0])  # logits 0.5, 1.0, -3.0: the surrogate says 20
    n_features_in_ = 6


def test_coverage_against_a_hand_computation():
    ex = explain(_Fake(), np.ones((1, 6)), k=2)
    p = ex[0]
    assert p.predicted_index == 1 and p.predicted_label == 20
    c0, c1, c2 = p.classes
    # class 0: proponents 3, 2 of S+ = 5.5; opponents -4, -1 of S- = -5; logit - b = 0.5
    assert [a.index for a in c0.proponents] == [0, 2] and [a.index for a in c0.opponents] == [3, 1]
    assert (c0.positive_total, c0.negative_total) == (5.5, -5.0)
    assert c0.coverage_pos == pytest.approx(5 / 5.5)
    assert c0.coverage_neg == pytest.approx(1.0)
    assert c0.coverage_logit == pytest.approx((5 - 5) / 0.5)
    # class 1: proponents 1, 1 (lowest indices first) of S+ = 5; the one opponent -2 of S- = -2
    assert [a.index for a in c1.proponents] == [0, 1]
    assert c1.coverage_pos == pytest.approx(2 / 5) and c1.coverage_neg == pytest.approx(1.0)
    assert c1.coverage_logit == pytest.approx((2 - 2) / 3)
    # class 2: nothing positive -> coverage_pos undefined (None), opponents -1, -1 of -3
    assert c2.proponents == () and c2.coverage_pos is None
    assert c2.coverage_neg == pytest.approx(2 / 3) and c2.coverage_logit == pytest.approx(2 / 3)
    # the point's coverage is its target's (the surrogate's class 20 without network logits)
    assert p.target_source == "surrogate" and p.target is c1
    assert (p.coverage_pos, p.coverage_neg, p.coverage_logit) == (
        c1.coverage_pos, c1.coverage_neg, c1.coverage_logit)
    d = p.to_dict()
    assert d["coverage_pos"] == pytest.approx(0.4) and d["classes"][2]["coverage_pos"] is None
    json.dumps(d)
    # every contribution shown: coverage_logit is exactly 1
    full = explain(_Fake(), np.ones((1, 6)), k=6)[0]
    assert all(c.coverage_logit == pytest.approx(1.0) for c in full.classes)
    assert full.classes[0].coverage_pos == pytest.approx(1.0)
    # a logit that is exactly its intercept has no coverage_logit
    class Zero(_Fake):
        class_coef_ = np.array([[1.0, -1.0, 0, 0, 0, 0]] * 3)

    assert explain(Zero(), np.ones((1, 6)), k=1)[0].coverage_logit is None


def test_coverage_matches_contributions_on_a_fitted_surrogate(model, data):
    _, Kt, _, _ = data
    k = 3
    ex = explain(model, Kt[:20], k=k, classes="target")
    A = model.contributions(Kt[:20])
    for p in ex:
        a = A[p.test_index, p.target_index]
        pos, neg = np.sort(a[a > 0])[::-1][:k], np.sort(a[a < 0])[:k]
        assert p.coverage_pos == pytest.approx(pos.sum() / a[a > 0].sum(), rel=1e-12)
        assert p.coverage_neg == pytest.approx(neg.sum() / a[a < 0].sum(), rel=1e-12)
        assert p.coverage_logit == pytest.approx((pos.sum() + neg.sum()) / a.sum(), rel=1e-9)
        assert 0.0 <= p.coverage_pos <= 1.0 and 0.0 <= p.coverage_neg <= 1.0


def _network_logits(model, Kt, n_flip: int) -> tuple[np.ndarray, np.ndarray]:
    """Network logits that agree with the surrogate except on the first n_flip points."""
    Z = model.logits(Kt).copy()
    flipped = np.arange(n_flip)
    second = np.argsort(Z[flipped], axis=1)[:, -2]
    Z[flipped, second] += 2 * (Z.max(1)[flipped] - Z[flipped, second]) + 1.0  # second becomes top
    return Z, second


def test_target_network_is_the_default_with_network_logits(model, data):
    _, Kt, ytr, yte = data
    Kt = Kt[:12]
    Z, second = _network_logits(model, Kt, 4)
    sur_pred = model.logits(Kt).argmax(1)
    ex = explain(model, Kt, k=2, train_labels=ytr, network_logits=Z.astype(np.float32))
    assert ex == explain(model, Kt, k=2, train_labels=ytr, network_logits=Z, target="network")
    for p in ex:
        assert p.target_source == "network"
        assert p.network_index == int(Z[p.test_index].argmax()) == p.target_index
        assert p.network_label == int(model.classes_[p.network_index]) == p.target_label
        assert p.predicted_index == p.surrogate_index == int(sur_pred[p.test_index])
        assert p.agrees is (p.test_index >= 4)
        # the target's explanation is the same as that class's entry among all classes
        assert p.target == p.for_class(p.target_index)
    assert [p.target_index for p in ex[:4]] == list(second)
    assert ex.disagreements == [0, 1, 2, 3]
    d = ex.to_dict()["points"][0]
    assert d["agrees"] is False and d["network_index"] == int(second[0])
    assert d["target"]["class_index"] == int(second[0])
    assert _plain(ex.to_dict())
    # target="surrogate" explains the surrogate's class and still flags the disagreement
    sur = explain(model, Kt, k=2, network_logits=Z, target="surrogate", classes="target")
    for p in sur:
        assert p.target_index == p.predicted_index and p.target_source == "surrogate"
        assert [c.class_index for c in p.classes] == [p.predicted_index]
        assert p.agrees is (p.test_index >= 4)
    # without network logits: the surrogate's class, and no agreement flag
    plain = explain(model, Kt, k=2, classes="target")
    for p in plain:
        assert p.target_index == p.predicted_index and p.agrees is None
        assert p.network_index is None and p.network_label is None
    assert plain.disagreements == []
    # torch logits work too
    import torch

    assert explain(model, Kt, k=2, train_labels=ytr, network_logits=torch.tensor(Z)) == ex


def test_explicit_target_array(model, data):
    _, Kt, _, yte = data
    Kt, y = Kt[:10], yte[:10]
    ex = explain(model, Kt, k=2, target=y, classes="target")
    A = model.contributions(Kt)
    for p in ex:
        assert p.target_index == int(y[p.test_index]) and p.target_source == "given"
        assert [c.class_index for c in p.classes] == [p.target_index]
        a = A[p.test_index, p.target_index]
        assert p.target.proponents[0].contribution == pytest.approx(a.max())
    # integral floats are accepted; the target is explained even when classes= omits it
    other = explain(model, Kt, k=2, target=y.astype(float), classes=[0])
    assert [p.target_index for p in other] == [int(v) for v in y]
    assert all([c.class_index for c in p.classes] == [0] for p in other)
    assert other[0].for_class(int(y[0])) == other[0].target


def test_binary_single_logit_network(data):
    K, Kt, y, _ = data
    yb = (y >= 5).astype(int)
    m = KernelSurrogate(alpha=1e-3).fit(K, yb)
    z = -m.decision_function(Kt[:6])  # a one-logit network that disagrees everywhere
    ex = explain(m, Kt[:6], k=2, network_logits=z, classes="target")
    for p in ex:
        assert p.network_index == int(z[p.test_index] > 0) == p.target_index
        assert p.agrees is False
        # the target's contributions are +-w_i K_i / 2 (the symmetric binary convention)
        i = p.target.proponents[0].index
        sign = 1 if p.target_index == 1 else -1
        assert p.target.proponents[0].contribution == pytest.approx(
            sign * 0.5 * m.coef_[0, i] * Kt[p.test_index, i])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "network"}, "needs the network's logits: pass network_logits="),
        ({"target": "best"}, "pass target='network'"),
        ({"target": "Network"}, "target='surrogate'"),
        ({"target": 3}, r"np.full\(n, c\)"),
        ({"target": [1, 2]}, "there are 4 test points"),
        ({"target": [0, 1, 2, 10]}, "class positions 0..9"),
        ({"target": [0, 1, 2, -1]}, "class positions 0..9"),
        ({"target": [0.5, 1, 2, 3]}, "integer class positions"),
        ({"target": ["a", "b", "c", "d"]}, "integer class positions"),
        ({"target": [True, False, True, False]}, "integer class positions"),
        ({"network_logits": np.zeros((3, 10))}, "3 rows but K_test_train has 4"),
        ({"network_logits": np.zeros((4, 9))}, "has 9 classes"),
        ({"network_logits": np.zeros(4)}, "a single logit counts as two"),
        ({"classes": "network"}, "'target'"),
    ],
)
def test_bad_targets_raise_input_error(model, data, kwargs, match):
    _, Kt, _, _ = data
    with pytest.raises(InputError, match=match):
        explain(model, Kt[:4], k=2, **kwargs)
