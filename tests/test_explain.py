"""Tests of tangentlens.explain: proponents, opponents and similar examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.datasets import load_digits
from sklearn.metrics.pairwise import rbf_kernel

from tangentlens.errors import InputError
from tangentlens.explain import contributions, explain, most_similar
from tangentlens.explanation import Attribution, Explanation
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


def test_explanation_to_dict_is_plain_python(model, data):
    _, Kt, ytr, _ = data
    d = explain(model, Kt[:3], k=2, train_labels=ytr).to_dict()
    assert _plain(d)
    json.dumps(d)
    assert d["k"] == 2 and len(d["points"]) == 3


def test_similar_examples_to_dict_is_plain_python(data):
    _, Kt, ytr, _ = data
    s = [x.to_dict() for x in most_similar(Kt[:3], 2, train_labels=ytr)]
    assert _plain(s)


def test_point_to_dict_names_each_coverage_figure_once(model, data):
    _, Kt, _, _ = data
    d = explain(model, Kt[:1], k=2).to_dict()["points"][0]
    assert not {"coverage_pos", "coverage_neg", "coverage_logit", "surrogate_index"} & set(d)
    assert {"coverage_pos", "coverage_neg", "coverage_logit"} <= set(d["target"])


def test_classes_predicted_lists_the_surrogates_class(model, data):
    _, Kt, _, _ = data
    ex = explain(model, Kt[:6], k=2, classes="predicted")
    for p in ex:
        assert [c.class_index for c in p.classes] == [p.predicted_index]


def test_classes_list_selects_those_classes(model, data):
    _, Kt, _, _ = data
    ex = explain(model, Kt[:6], k=2, classes=[3, 7])
    assert [c.class_index for c in ex[0].classes] == [3, 7]
    assert ex[0].for_class(7).class_index == 7


def test_for_class_of_an_unexplained_class_raises(model, data):
    _, Kt, _, _ = data
    ex = explain(model, Kt[:6], k=2, classes=[3, 7])
    with pytest.raises(InputError):
        ex[0].for_class(1)


def test_bad_classes_raise(model, data):
    _, Kt, _, _ = data
    with pytest.raises(InputError, match="out of range"):
        explain(model, Kt[:2], classes=[10])
    with pytest.raises(InputError):
        explain(model, Kt[:2], classes="best")


_BINARY = {
    "lbfgs": lambda: KernelSurrogate(alpha=1e-3),
    "sgd": lambda: KernelSurrogate(solver="sgd", random_state=0),
    "svm": lambda: KernelSVMSurrogate(random_state=0),
}


@pytest.fixture(scope="module", params=list(_BINARY))
def binary(request, data):
    K, Kt, y, _ = data
    m = _BINARY[request.param]().fit(K, (y >= 5).astype(int))
    return m, Kt[:5], explain(m, Kt[:5], k=3)


def test_binary_proponents_mirror_opponents(binary):
    _, _, ex = binary
    for p in ex:
        c0, c1 = p.for_class(0), p.for_class(1)
        assert [a.index for a in c1.proponents] == [a.index for a in c0.opponents]
        assert_allclose(
            [a.contribution for a in c1.proponents], [-a.contribution for a in c0.opponents]
        )


def test_binary_class1_contributions_are_half_the_decision_terms(binary):
    # class-1 contributions are half the reference's w_i K_i of the decision function
    m, Kt, ex = binary
    w = m.coef_[0]
    for p in ex:
        c1 = p.for_class(1)
        i = c1.proponents[0].index
        assert c1.proponents[0].contribution == pytest.approx(0.5 * w[i] * Kt[p.test_index, i])


def test_ridge_surrogate_can_be_explained(data):
    K, Kt, y, _ = data
    m = KernelRidgeSurrogate(alpha=1e-2).fit(K, y)
    ex = explain(m, Kt[:2], k=2)
    assert len(ex[0].classes) == 10


class _Three:
    """Three training points, two classes; class 1 has no signed contribution at all."""

    classes_ = np.array([0, 1])
    class_coef_ = np.array([[1.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
    class_intercept_ = np.zeros(2)
    n_features_in_ = 3


def test_fewer_than_k_signed_contributions():
    ex = explain(_Three(), np.array([[1.0, 1.0, 1.0]]), k=5)
    c0, c1 = ex[0].classes
    assert [a.index for a in c0.proponents] == [1, 0]
    assert [a.index for a in c0.opponents] == [2]
    assert c1.proponents == () and c1.opponents == ()


def test_k_is_capped_at_the_training_set_size():
    ex = explain(_Three(), np.array([[1.0, 1.0, 1.0]]), k=5)
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


def test_most_similar_breaks_ties_by_lower_index_and_takes_one_row():
    s = most_similar(np.array([0.5, 0.9, 0.9, 0.1]), k=2)[0]
    assert s.indices == [1, 2]


def _inf_kernel(Kt):
    bad = Kt[:2].copy()
    bad[0, 0] = np.inf
    return bad


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, Kt, ytr: explain(m, Kt[:, :-1]), "one column per training point"),
        (lambda m, Kt, ytr: explain(m, _inf_kernel(Kt)), "NaN or inf"),
        (lambda m, Kt, ytr: explain(m, Kt, k=0), "k must be"),
        (lambda m, Kt, ytr: explain(m, Kt[:2], train_labels=ytr[:-1]), "train_labels"),
        (lambda m, Kt, ytr: explain(KernelSurrogate(), Kt[:2]), "fitted"),
        (lambda m, Kt, ytr: most_similar(np.zeros((2, 2, 2))), "2-D"),
        (lambda m, Kt, ytr: most_similar(Kt, k=-1), "k must be"),
    ],
    ids=["columns", "inf", "k-explain", "train-labels", "unfitted", "3-d", "k-similar"],
)
def test_bad_inputs(model, data, call, match):
    _, Kt, ytr, _ = data
    with pytest.raises(InputError, match=match):
        call(model, Kt, ytr)


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


@pytest.fixture()
def hand():
    """The one test point of :class:`_Fake` explained with k = 2."""
    return explain(_Fake(), np.ones((1, 6)), k=2)[0]


def test_hand_computed_prediction(hand):
    assert hand.predicted_index == 1 and hand.predicted_label == 20


def test_hand_computed_class_with_cancelling_masses(hand):
    c0 = hand.classes[0]
    # class 0: proponents 3, 2 of S+ = 5.5; opponents -4, -1 of S- = -5; logit - b = 0.5
    assert [a.index for a in c0.proponents] == [0, 2] and [a.index for a in c0.opponents] == [3, 1]
    assert (c0.positive_total, c0.negative_total) == (5.5, -5.0)
    assert c0.coverage_pos == pytest.approx(5 / 5.5)
    assert c0.coverage_neg == pytest.approx(1.0)
    assert c0.coverage_logit == pytest.approx((5 - 5) / 0.5)


def test_hand_computed_ties_take_the_lowest_indices(hand):
    c1 = hand.classes[1]
    # class 1: proponents 1, 1 (lowest indices first) of S+ = 5; the one opponent -2 of S- = -2
    assert [a.index for a in c1.proponents] == [0, 1]
    assert c1.coverage_pos == pytest.approx(2 / 5) and c1.coverage_neg == pytest.approx(1.0)
    assert c1.coverage_logit == pytest.approx((2 - 2) / 3)


def test_hand_computed_class_without_positive_mass(hand):
    c2 = hand.classes[2]
    # class 2: nothing positive -> coverage_pos undefined (None), opponents -1, -1 of -3
    assert c2.proponents == () and c2.coverage_pos is None
    assert c2.coverage_neg == pytest.approx(2 / 3) and c2.coverage_logit == pytest.approx(2 / 3)


def test_point_coverage_is_its_targets(hand):
    # the point's coverage is its target's (the surrogate's class 20 without network logits)
    c1 = hand.classes[1]
    assert hand.target_source == "surrogate" and hand.target is c1
    assert (hand.coverage_pos, hand.coverage_neg, hand.coverage_logit) == (
        c1.coverage_pos, c1.coverage_neg, c1.coverage_logit)


def test_point_to_dict_keeps_undefined_coverage_as_none(hand):
    d = hand.to_dict()
    assert d["target"]["coverage_pos"] == pytest.approx(0.4) and d["classes"][2]["coverage_pos"] is None
    json.dumps(d)


def test_coverage_logit_is_one_when_every_contribution_is_shown():
    full = explain(_Fake(), np.ones((1, 6)), k=6)[0]
    assert all(c.coverage_logit == pytest.approx(1.0) for c in full.classes)
    assert full.classes[0].coverage_pos == pytest.approx(1.0)


def test_no_coverage_logit_when_the_logit_is_its_intercept():
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


@pytest.fixture(scope="module")
def net(model, data):
    """12 test points whose network logits disagree with the surrogate on the first 4, explained with
    the default target."""
    _, Kt, ytr, _ = data
    Kt = Kt[:12]
    Z, second = _network_logits(model, Kt, 4)
    ex = explain(model, Kt, k=2, train_labels=ytr, network_logits=Z.astype(np.float32))
    return Kt, Z, second, ex


def test_target_network_is_the_default_with_network_logits(model, data, net):
    _, _, ytr, _ = data
    Kt, Z, _, ex = net
    assert ex == explain(model, Kt, k=2, train_labels=ytr, network_logits=Z, target="network")
    assert all(p.target_source == "network" for p in ex)


def test_network_target_is_the_networks_class(model, net):
    Kt, Z, _, ex = net
    sur_pred = model.logits(Kt).argmax(1)
    for p in ex:
        assert p.network_index == int(Z[p.test_index].argmax()) == p.target_index
        assert p.network_label == int(model.classes_[p.network_index]) == p.target_label
        assert p.predicted_index == int(sur_pred[p.test_index])
        assert p.agrees is (p.test_index >= 4)
        # the target's explanation is the same as that class's entry among all classes
        assert p.target == p.for_class(p.target_index)


def test_disagreements_are_the_points_the_network_decides_otherwise(net):
    _, _, second, ex = net
    assert [p.target_index for p in ex[:4]] == list(second)
    assert ex.disagreements == [0, 1, 2, 3]


def test_network_explanation_to_dict(net):
    _, _, second, ex = net
    d = ex.to_dict()["points"][0]
    assert d["agrees"] is False and d["network_index"] == int(second[0])
    assert d["target"]["class_index"] == int(second[0])
    assert _plain(ex.to_dict())


def test_target_surrogate_still_flags_the_disagreement(model, net):
    # target="surrogate" explains the surrogate's class and still flags the disagreement
    Kt, Z, _, _ = net
    sur = explain(model, Kt, k=2, network_logits=Z, target="surrogate", classes="target")
    for p in sur:
        assert p.target_index == p.predicted_index and p.target_source == "surrogate"
        assert [c.class_index for c in p.classes] == [p.predicted_index]
        assert p.agrees is (p.test_index >= 4)


def test_without_network_logits_the_surrogates_class_and_no_agreement_flag(model, net):
    Kt = net[0]
    plain = explain(model, Kt, k=2, classes="target")
    for p in plain:
        assert p.target_index == p.predicted_index and p.agrees is None
        assert p.network_index is None and p.network_label is None
    assert plain.disagreements == []


def test_torch_network_logits(model, data, net):
    import torch

    _, _, ytr, _ = data
    Kt, Z, _, ex = net
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


def test_integral_float_target_is_explained_even_when_classes_omits_it(model, data):
    _, Kt, _, yte = data
    Kt, y = Kt[:10], yte[:10]
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
