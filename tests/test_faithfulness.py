"""Tests of tangentlens.faithfulness against scipy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy import stats
from scipy.special import expit, softmax

from tangentlens.errors import InputError, UnknownKindError
from tangentlens.faithfulness import (
    FaithfulnessResult,
    MeanSE,
    aggregate,
    faithfulness,
    format_mean_se,
    log_odds64,
    misclassification_overlap,
    softmax64,
)


@pytest.fixture()
def multiclass():
    rng = np.random.RandomState(0)
    n, C = 200, 4
    y = rng.randint(0, C, size=n)
    Zn = rng.normal(size=(n, C)) * 2
    Zn[np.arange(n), y] += 2.0
    Zs = Zn + rng.normal(size=(n, C))
    return Zn, Zs, y


def test_tau_true_class_matches_scipy(multiclass):
    Zn, Zs, y = multiclass
    r = faithfulness(Zn, Zs, y)
    rows = np.arange(len(y))
    ref = stats.kendalltau(softmax(Zn, 1)[rows, y], softmax(Zs, 1)[rows, y])
    assert r.tau == pytest.approx(ref.statistic, abs=1e-12)
    assert r.tau_p == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.n == r.n_tau == len(y)
    assert r.tau_mode == "true_class"


def test_logit_mode_is_true_class_log_odds(multiclass):
    Zn, Zs, y = multiclass
    rows = np.arange(len(y))

    def log_odds(Z):
        p = softmax(Z, 1)[rows, y]
        return np.log(p) - np.log1p(-p)

    r = faithfulness(Zn, Zs, y, tau_mode="logit")
    ref = stats.kendalltau(log_odds(Zn), log_odds(Zs)).statistic
    assert r.tau == pytest.approx(ref, abs=1e-12)


def test_logit_mode_ranks_like_the_true_class_probability_without_saturation(multiclass):
    Zn, Zs, y = multiclass
    r = faithfulness(Zn, Zs, y, tau_mode="logit")
    assert r.tau == pytest.approx(faithfulness(Zn, Zs, y).tau, abs=1e-12)


@pytest.fixture()
def binary():
    """A single-logit binary network z and a two-column surrogate with decision values d."""
    rng = np.random.RandomState(1)
    n = 120
    y = rng.randint(0, 2, size=n)
    z = rng.normal(size=n) * 3 + (2 * y - 1)  # single-logit binary network
    d = z + rng.normal(size=n)  # a surrogate's decision values
    Zs = np.stack([-d / 2, d / 2], 1)  # KernelSurrogate.logits convention
    return z, d, Zs, y


def test_class1_mode_ranks_the_class1_probability(binary):
    z, d, Zs, y = binary
    r = faithfulness(z, Zs, y, tau_mode="class1")
    assert r.tau == pytest.approx(stats.kendalltau(expit(z), expit(d)).statistic, abs=1e-12)


def test_single_logit_reads_as_two_logits_zero_and_z(binary):
    # (n, 1) network logits and 2-column [0, z] logits are the same model
    z, d, Zs, y = binary
    r = faithfulness(z, Zs, y, tau_mode="class1")
    r2 = faithfulness(z[:, None], np.stack([np.zeros(len(y)), d], 1), y, tau_mode="class1")
    assert r2.tau == pytest.approx(r.tau, abs=1e-12)


def test_true_class_probability_of_a_single_logit(binary):
    # true-class probability differs from class-1 probability
    z, d, Zs, y = binary
    rows = np.arange(len(y))
    p_n = np.stack([1 - expit(z), expit(z)], 1)[rows, y]
    p_s = np.stack([1 - expit(d), expit(d)], 1)[rows, y]
    assert faithfulness(z, Zs, y).tau == pytest.approx(
        stats.kendalltau(p_n, p_s).statistic, abs=1e-12
    )


def test_single_logit_predicts_class1_where_z_is_positive(binary):
    z, _, Zs, y = binary
    r = faithfulness(z, Zs, y, tau_mode="class1")
    assert r.network_acc == pytest.approx(((z > 0).astype(int) == y).mean())


def test_class1_mode_needs_two_classes():
    with pytest.raises(InputError, match="binary"):
        faithfulness(np.zeros((5, 3)), np.zeros((5, 3)), np.zeros(5, int), tau_mode="class1")


@pytest.fixture()
def saturated():
    """A float32 single-logit network saturated on its first 15 points, and a surrogate's logits."""
    rng = np.random.RandomState(2)
    n = 60
    y = (np.arange(n) % 2).astype(int)
    z = rng.normal(size=n).astype(np.float32) * 3
    z[:10] = 40.0  # sigmoid(40) == 1.0 in float32 (and in float64)
    z[10:15] = -120.0  # sigmoid(-120) == 0.0 in float32
    d = (z.astype(np.float64) + rng.normal(size=n)).clip(-30, 30)
    return rng, z, d, y


def test_drop_saturated_like_the_reference(saturated):
    _, z, d, y = saturated
    n = len(y)
    assert np.all(expit(z[:10]) == 1.0) and np.all(expit(z[10:15]) == 0.0)
    r = faithfulness(z, d, y, tau_mode="class1", drop_saturated=True)
    keep = np.ones(n, bool)
    keep[:15] = False
    ref = stats.kendalltau(expit(z[keep]), expit(d[keep])).statistic
    assert r.n_tau == 45 and r.n == 60
    assert r.tau == pytest.approx(ref, abs=1e-6)


def test_without_drop_saturated_every_point_is_ranked(saturated):
    _, z, d, y = saturated
    r = faithfulness(z, d, y, tau_mode="class1", drop_saturated=True)
    full = faithfulness(z, d, y, tau_mode="class1")
    assert full.n_tau == 60 and full.tau != pytest.approx(r.tau)


def _half_at_twenty(rng, n):
    z32 = np.full(n, 20.0, np.float32)
    z32[::2] = rng.normal(size=n // 2)
    return z32


def test_saturation_mask_is_float32_whatever_the_callers_dtype(saturated):
    # the saturation mask is the reference's float32 one whatever the caller's dtype
    rng, _, d, y = saturated
    n = len(y)
    z32 = _half_at_twenty(rng, n)
    r32 = faithfulness(z32, d, y, tau_mode="class1", drop_saturated=True)
    r64 = faithfulness(z32.astype(np.float64), d, y, tau_mode="class1", drop_saturated=True)
    assert r32 == r64 and r32.n_tau == n // 2


def test_float64_saturation_precision_keeps_float32_saturated_points(saturated):
    # a float64 mask keeps the points whose float32 sigmoid(20) == 1.0
    rng, _, d, y = saturated
    n = len(y)
    f64 = faithfulness(_half_at_twenty(rng, n), d, y, tau_mode="class1", drop_saturated=True,
                       saturation_precision="float64")
    assert f64.n_tau == n


def test_unknown_saturation_precision_raises(saturated):
    rng, _, d, y = saturated
    with pytest.raises(UnknownKindError, match="saturation_precision"):
        faithfulness(_half_at_twenty(rng, len(y)), d, y, drop_saturated=True,
                     saturation_precision="float16")


@pytest.fixture()
def hand():
    # N = 10; network wrong on {0, 1, 2}; surrogate wrong on {1, 2, 3, 4}
    y = np.zeros(10, int)
    Zn = np.tile([2.0, 0.0], (10, 1))
    Zs = Zn.copy()
    Zn[[0, 1, 2]] = [0.0, 2.0]
    Zs[[1, 2, 3, 4]] = [0.0, 2.0]
    return faithfulness(Zn, Zs, y)


def test_accuracy_and_tad_hand_computed(hand):
    assert hand.network_acc == pytest.approx(0.7)
    assert hand.surrogate_acc == pytest.approx(0.6)
    assert hand.tad == pytest.approx(-0.1)


def test_error_counts_and_gamma_hand_computed(hand):
    assert (hand.network_errors, hand.surrogate_errors, hand.both_errors) == (3, 4, 2)
    assert hand.gamma == pytest.approx(2 / 5)


def test_gamma_p_is_the_references_binomial_test(hand):
    # reference: P_both = 4*3/100 = 0.12; p = 1 - BinomCDF(floor(3*0.4) = 1; 3, 0.12)
    p_ref = 1 - (0.88**3 + 3 * 0.12 * 0.88**2)
    assert p_ref == pytest.approx(0.039744)
    assert hand.gamma_p == pytest.approx(p_ref, rel=1e-12)
    assert hand.gamma_p == pytest.approx(1 - stats.binom.cdf(3 * 0.4, 3, 0.12), rel=1e-12)


def test_gamma_p_fisher_is_the_exact_hypergeometric_test(hand):
    # Fisher: P(X >= 2), X ~ Hypergeom(10, 3, 4) = (3*21 + 7)/210
    assert hand.gamma_p_fisher == pytest.approx(70 / 210, rel=1e-12)


def _errors(n_wrong: int) -> np.ndarray:
    wrong = np.zeros(8, bool)
    wrong[:n_wrong] = True
    return wrong


def test_overlap_is_nan_when_nobody_errs():
    g, p, pf = misclassification_overlap(_errors(0), _errors(0))
    assert math.isnan(g) and math.isnan(p) and math.isnan(pf)


def test_overlap_is_trivial_when_one_side_never_errs():
    assert misclassification_overlap(_errors(0), _errors(2)) == (0.0, 1.0, 1.0)
    assert misclassification_overlap(_errors(2), _errors(0)) == (0.0, 1.0, 1.0)


def test_overlap_of_identical_errors():
    g, p, pf = misclassification_overlap(_errors(2), _errors(2))
    assert g == 1.0
    assert p == pytest.approx(stats.binom.sf(2, 2, 4 / 64))  # = 0: P(X > 2) with 2 trials
    assert pf == pytest.approx(1 / math.comb(8, 2))


def test_overlap_needs_equal_lengths():
    with pytest.raises(InputError, match="same length"):
        misclassification_overlap(_errors(0), _errors(2)[:-1])


def test_tiny_p_values_do_not_round_to_zero():
    N = 2000
    a = np.zeros(N, bool)
    a[:40] = True
    b = np.zeros(N, bool)
    b[10:50] = True  # 30 common errors out of 50
    g, p, pf = misclassification_overlap(a, b)
    assert g == pytest.approx(0.6)
    assert 0.0 < p < 1e-50 and 0.0 < pf < 1e-40
    assert p < pf  # the reference's test is far less conservative than the exact one
    assert p == pytest.approx(stats.binom.sf(24, 40, 40 * 40 / N**2), rel=1e-12)


def test_references_p_value_is_zero_for_identical_error_sets():
    # the reference's formula is P(X > floor(W * gamma)): identical error sets give exactly 0
    a = np.zeros(2000, bool)
    a[:40] = True
    assert misclassification_overlap(a, a)[1] == 0.0


def test_r2_linearization(multiclass):
    Zn, _, y = multiclass
    shift = np.random.RandomState(3).normal(size=(len(y), 1))
    r = faithfulness(Zn, 2.5 * Zn + shift, y)  # affine in the logits up to a per-row shift
    assert r.r2 == pytest.approx(1.0, abs=1e-12)


def test_r2_is_the_squared_correlation_of_centered_logits(multiclass):
    Zn, _, y = multiclass
    Zs = Zn + np.random.RandomState(4).normal(size=Zn.shape)
    a = (Zn - Zn.mean(1, keepdims=True)).ravel()
    b = (Zs - Zs.mean(1, keepdims=True)).ravel()
    lin = stats.linregress(b, a)
    assert faithfulness(Zn, Zs, y).r2 == pytest.approx(lin.rvalue**2, abs=1e-12)


def test_r2_of_a_constant_surrogate_is_nan(multiclass):
    Zn, _, y = multiclass
    assert math.isnan(faithfulness(Zn, np.zeros_like(Zn), y).r2)


def test_torch_inputs(multiclass):
    Zn, Zs, y = multiclass
    r = faithfulness(torch.tensor(Zn), torch.tensor(Zs), torch.tensor(y))
    assert r == faithfulness(Zn, Zs, y)


def test_result_to_dict_is_plain_python(multiclass):
    d = faithfulness(*multiclass).to_dict()
    assert set(d) >= {"tau", "tau_p", "tad", "gamma", "gamma_p", "r2", "n", "network_acc"}
    assert all(type(v) in (int, float, str) for k, v in d.items() if k != "gamma_reason")
    assert d["gamma_reason"] is None


def test_result_is_frozen(multiclass):
    r = faithfulness(*multiclass)
    with pytest.raises(AttributeError):
        r.tau = 0.0  # frozen


def _nan_first(Z: np.ndarray) -> np.ndarray:
    bad = Z.copy()
    bad[0, 0] = np.nan
    return bad


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda Zn, Zs, y: faithfulness(Zn, Zs[:-1], y), InputError, "same test points"),
        (lambda Zn, Zs, y: faithfulness(Zn, Zs, y[:-1]), InputError, "same test points"),
        (lambda Zn, Zs, y: faithfulness(Zn, Zs[:, :3], y), InputError, "classes"),
        (lambda Zn, Zs, y: faithfulness(Zn, Zs, y + 1), InputError, "0..3"),
        (lambda Zn, Zs, y: faithfulness(Zn, _nan_first(Zs), y), InputError, "NaN"),
        (lambda Zn, Zs, y: faithfulness(Zn, Zs, y, tau_mode="class0"), UnknownKindError, "tau_mode"),
        (lambda Zn, Zs, y: faithfulness(np.full(4, 50.0), np.full(4, 50.0), np.ones(4, int),
                                        drop_saturated=True), InputError, "left for Kendall"),
    ],
    ids=["logit-rows", "labels", "classes", "label-range", "nan", "tau-mode", "too-few-for-tau"],
)
def test_bad_inputs(multiclass, call, error, match):
    with pytest.raises(error, match=match):
        call(*multiclass)


# --------------------------------------------------------------------------- aggregation


def _six_seeds(multiclass):
    """Results of six noisy surrogates (stand-ins for six seeds) and their aggregate."""
    Zn, Zs, y = multiclass
    rng = np.random.RandomState(5)
    results = [faithfulness(Zn, Zs + rng.normal(size=Zs.shape), y) for _ in range(6)]
    return results, aggregate(results)


def test_aggregate_mean_and_standard_error(multiclass):
    results, agg = _six_seeds(multiclass)
    taus = np.array([r.tau for r in results])
    assert agg["tau"].mean == pytest.approx(taus.mean())
    assert agg["tau"].se == pytest.approx(taus.std(ddof=1) / np.sqrt(6))
    assert agg["tau"].n == 6 and agg.n_results == 6


def test_aggregate_keeps_numeric_metrics_only(multiclass):
    _, agg = _six_seeds(multiclass)
    assert isinstance(agg["tad"], MeanSE)
    assert "tau_mode" not in agg.metrics


def test_aggregate_formatted_and_to_dict(multiclass):
    _, agg = _six_seeds(multiclass)
    assert agg.formatted()["tau"] == format_mean_se(agg["tau"].mean, agg["tau"].se)
    d = agg.to_dict()
    assert d["metrics"]["tau"]["n"] == 6


def test_aggregate_skips_nan_and_accepts_dicts():
    rows = [{"gamma": 0.5, "tau": 0.8}, {"gamma": float("nan"), "tau": 0.9}, {"gamma": 0.7}]
    agg = aggregate(rows)
    assert agg["gamma"].n == 2 and agg["gamma"].mean == pytest.approx(0.6)
    assert agg["gamma"].se == pytest.approx(np.std([0.5, 0.7], ddof=1) / np.sqrt(2))
    assert agg["tau"].n == 2


def test_aggregate_of_one_value_has_no_standard_error():
    one = aggregate([{"tau": 0.8}])
    assert math.isnan(one["tau"].se) and str(one["tau"]) == "0.8"


def test_aggregate_of_nothing_raises():
    with pytest.raises(InputError):
        aggregate([])


def test_faithfulness_result_is_a_public_type():
    assert isinstance(FaithfulnessResult, type)


@pytest.mark.parametrize(
    ("mean", "se", "text"),
    [
        (0.8093, 0.0091, "0.809(9)"),
        (0.74, 0.012, "0.74(1)"),
        (0.5, 0.1, "0.5(1)"),
        (0.8093, 0.0096, "0.81(1)"),  # SE rounds up to the next decade
        (0.857, 0.0004, "0.8570(4)"),
        (0.72, 0.02, "0.72(2)"),
        (0.5, 0.15, "0.5(2)"),  # half-up
        (-0.0004, 0.01, "0.00(1)"),
        (-0.021, 0.003, "-0.021(3)"),
        (12.3, 1.2, "12(1)"),
        (123.4, 25.0, "120(30)"),
    ],
)
def test_format_mean_se(mean, se, text):
    assert format_mean_se(mean, se) == text


def test_format_mean_se_degenerate():
    assert format_mean_se(float("nan"), 0.1) == "nan"
    assert format_mean_se(0.8093, float("nan")) == "0.809"
    assert format_mean_se(0.5, 0.0) == "0.5(0)"


def test_se_of_reference_style_results_roundtrip():
    vals = np.array([0.80, 0.82, 0.79, 0.83])
    agg = aggregate([{"tau": v} for v in vals])
    se = vals.std(ddof=1) / 2
    assert_allclose([agg["tau"].mean, agg["tau"].se], [vals.mean(), se])
    assert agg["tau"].format() == "0.810(9)"


def test_drop_saturated_matches_the_reference_computation() -> None:
    """The reference: τ between a softmax *across test points* of the surrogate logit and the network's
    float32 sigmoid, dropping points where either is exactly 0 or 1 — a huge surrogate logit must not
    drop points (its float64 sigmoid would saturate, the across-points softmax does not)."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    n = 300
    z_net = (rng.normal(size=n) * 30).astype(np.float32)  # many saturated float32 sigmoids
    z_sur = z_net.astype(np.float64) * 3 + rng.normal(size=n) * 5  # |z| up to ~300: float64 sigmoid saturates
    y = (z_net > 0).astype(int)
    e = np.exp((z_sur - z_sur.max()) / 100)  # a monotone stand-in for the reference's across-points softmax
    X = e / e.sum()
    # the network's float32 class-1 probability, as the library computes it for one logit ([0, z])
    Y = softmax(np.stack([np.zeros_like(z_net), z_net], 1), axis=1)[:, 1]
    keep = ~((Y == 0) | (Y == 1) | (X == 0) | (X == 1))
    ref = kendalltau(X[keep], Y[keep]).correlation
    res = faithfulness(z_net, z_sur, y, tau_mode="class1", drop_saturated=True)
    assert res.n_tau == int(keep.sum())  # the same points are dropped
    # the kept points are ranked in float64: no float32 ties among near-saturated probabilities
    Y64 = softmax(np.stack([np.zeros(n), z_net.astype(np.float64)], 1), axis=1)[:, 1]
    assert res.tau == pytest.approx(kendalltau(X[keep], Y64[keep]).correlation, abs=1e-12)
    assert res.tau == pytest.approx(ref, abs=1e-3)  # the float32 ties of the literal reference
    # a float64 copy of the same logits gives the same result
    assert faithfulness(z_net.astype(np.float64), z_sur, y, tau_mode="class1",
                        drop_saturated=True) == res


# --------------------------------------------------------------------------- caller's dtype


def _confident_network(scale: float, seed: int = 0, n: int = 400, C: int = 10):
    """A confident 10-class network: true-class margins up to 0.8 * scale (scale 30-50), and a
    softer, noisy surrogate with the same ranking. A float32 softmax saturates to exactly 1.0 on
    about half of these points; float64 on (almost) none."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    Zn = rng.normal(size=(n, C))
    Zn[np.arange(n), y] += scale * rng.uniform(0.0, 0.8, n)
    Zs = 0.5 * Zn + rng.normal(size=(n, C))
    return Zn, Zs, y


SCALES = [30.0, 40.0, 50.0]


@pytest.mark.parametrize("scale", SCALES)
def test_the_float32_softmax_does_saturate_here(scale):
    Zn, _, y = _confident_network(scale)
    p32 = softmax(Zn.astype(np.float32), 1)[np.arange(len(y)), y]
    assert np.mean(p32 == 1.0) > 0.2


@pytest.mark.parametrize("scale", SCALES)
def test_tau_does_not_depend_on_the_callers_dtype(scale):
    Zn, Zs, y = _confident_network(scale)
    r64 = faithfulness(Zn, Zs, y)
    r32 = faithfulness(Zn.astype(np.float32), Zs.astype(np.float32), y)
    rt = faithfulness(torch.tensor(Zn, dtype=torch.float32), torch.tensor(Zs, dtype=torch.float32),
                      torch.tensor(y))
    assert abs(r32.tau - r64.tau) < 1e-3 and abs(rt.tau - r64.tau) < 1e-3


@pytest.mark.parametrize("scale", SCALES)
def test_tau_ranks_float64_probabilities(scale):
    Zn, Zs, y = _confident_network(scale)
    rows = np.arange(len(y))
    ref = stats.kendalltau(softmax(Zn, 1)[rows, y], softmax(Zs, 1)[rows, y]).statistic
    assert faithfulness(Zn, Zs, y).tau == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("scale", [40.0, 50.0])
def test_a_float32_softmax_would_lower_tau_by_ties(scale):
    # (0.849 -> 0.804 at scale 40)
    Zn, Zs, y = _confident_network(scale)
    rows = np.arange(len(y))
    p32 = softmax(Zn.astype(np.float32), 1)[rows, y]
    lowered = stats.kendalltau(p32, softmax(Zs.astype(np.float32), 1)[rows, y]).statistic
    assert faithfulness(Zn, Zs, y).tau - lowered > 0.03


@pytest.mark.parametrize("scale", SCALES)
def test_other_metrics_do_not_depend_on_the_callers_dtype(scale):
    Zn, Zs, y = _confident_network(scale)
    r64 = faithfulness(Zn, Zs, y)
    r32 = faithfulness(Zn.astype(np.float32), Zs.astype(np.float32), y)
    for name in ("tad", "gamma", "r2", "network_acc", "surrogate_acc"):
        assert getattr(r32, name) == pytest.approx(getattr(r64, name), abs=1e-6, nan_ok=True)


@pytest.mark.parametrize("scale", SCALES)
def test_logit_mode_does_not_depend_on_the_callers_dtype(scale):
    Zn, Zs, y = _confident_network(scale)
    lo32 = faithfulness(Zn.astype(np.float32), Zs.astype(np.float32), y, tau_mode="logit")
    assert lo32.tau == pytest.approx(faithfulness(Zn, Zs, y, tau_mode="logit").tau, abs=1e-3)


def test_n_saturated_counts_float64_ties():
    Zn, Zs, y = _confident_network(50.0)
    r = faithfulness(Zn, Zs, y)
    rows = np.arange(len(y))
    pn, ps = softmax(Zn, 1)[rows, y], softmax(Zs, 1)[rows, y]
    expect = int(np.sum((pn == 0) | (pn == 1) | (ps == 0) | (ps == 1)))
    assert expect > 0 and r.n_saturated == expect
    assert faithfulness(Zn.astype(np.float32), Zs, y).n_saturated == expect


def test_logit_mode_never_saturates():
    Zn, Zs, y = _confident_network(50.0)
    assert faithfulness(Zn, Zs, y, tau_mode="logit").n_saturated == 0


def test_softmax64_is_float64_whatever_the_input():
    Zn, _, _ = _confident_network(40.0)
    z32 = Zn.astype(np.float32)
    p = softmax64(z32)
    assert p.dtype == np.float64
    assert_allclose(p, softmax(z32.astype(np.float64), 1), rtol=1e-15, atol=0)
    assert_allclose(softmax64(torch.tensor(z32)), p, rtol=0, atol=0)


def test_log_odds64_is_float64_and_never_saturates():
    Zn, _, y = _confident_network(40.0)
    z32 = Zn.astype(np.float32)
    lo = log_odds64(z32, y)
    rows = np.arange(len(y))
    other = z32.astype(np.float64).copy()
    other[rows, y] = -np.inf
    assert_allclose(lo, z32[rows, y].astype(np.float64) - np.log(np.exp(other).sum(1)), rtol=1e-12)
    assert np.all(np.isfinite(lo)) and lo.max() > 30  # never saturates


def test_single_logit_probabilities_and_log_odds():
    # a single logit z is [0, z]: probabilities [1 - sigmoid, sigmoid], log-odds +-z
    z = np.array([-3.0, 0.5, 40.0], np.float32)
    assert_allclose(softmax64(z)[:, 1], expit(z.astype(np.float64)), rtol=1e-15)
    assert_allclose(log_odds64(z, [1, 0, 1]), [-3.0, -0.5, 40.0])


def test_log_odds64_rejects_labels_out_of_range():
    z = np.array([-3.0, 0.5, 40.0], np.float32)
    with pytest.raises(InputError, match="0..1"):
        log_odds64(z, [2, 0, 1])


# --------------------------------------------------------------------------- Γ's reason


@pytest.fixture()
def reasons():
    """Results where neither model errs (r), only the surrogate (r2), only the network (r3), both (both)."""
    y = np.array([0, 1, 1, 0, 1])
    Z = np.where(y[:, None] == np.arange(2), 3.0, -1.0)
    r = faithfulness(Z, 0.5 * Z + 0.1 * np.arange(5)[:, None], y)
    Zs = Z.copy()
    Zs[0] = Zs[0, ::-1]
    return r, faithfulness(Z, Zs, y), faithfulness(Zs, Z, y), faithfulness(Zs, Zs, y)


def test_gamma_reason_when_neither_model_errs(reasons):
    r = reasons[0]
    assert math.isnan(r.gamma) and math.isnan(r.gamma_p) and math.isnan(r.gamma_p_fisher)
    assert r.gamma_reason is not None and "neither model misclassifies" in r.gamma_reason
    assert r.to_dict()["gamma_reason"] == r.gamma_reason


def test_gamma_reason_when_only_one_model_errs(reasons):
    # only the surrogate errs: Γ = 0 trivially, with the reason
    _, r2, r3, _ = reasons
    assert r2.gamma == 0.0 and r2.gamma_p == 1.0
    assert "network makes no errors" in r2.gamma_reason
    assert r3.gamma == 0.0 and "surrogate makes no errors" in r3.gamma_reason


def test_informative_gamma_has_no_reason(reasons):
    both = reasons[3]
    assert both.gamma == 1.0 and both.gamma_reason is None


def test_aggregate_leaves_undefined_gamma_out_and_says_why(reasons):
    r, r2, _, both = reasons
    agg = aggregate([r, r2, both])
    assert agg["gamma"].n == 2 and agg["gamma"].mean == pytest.approx(0.5)
    assert "gamma_reason" not in agg.metrics and "n_saturated" in agg.metrics
    assert any("1 of 3 results left out (neither model misclassifies" in s for s in agg.notes)
    assert any("trivial (the network makes no errors" in s for s in agg.notes)
    assert agg.to_dict()["notes"] == list(agg.notes)


def test_aggregate_of_an_all_undefined_metric(reasons):
    r = reasons[0]
    only = aggregate([r, r])
    assert only["gamma"].n == 0 and only.formatted()["gamma"] == "nan"
    assert only.notes == (f"gamma: 2 of 2 results left out ({r.gamma_reason}).",)


def test_aggregate_notes_dicts_without_a_reason():
    assert aggregate([{"gamma": float("nan")}]).notes == (
        "gamma: 1 of 1 results left out (no reason given).",
    )
