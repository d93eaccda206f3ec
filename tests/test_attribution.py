"""The margin kernel against an explicit autograd oracle; counterfactual attribution (TRAK, kernel form)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tangentlens as tl
from tangentlens.attribution import DEFAULT_LAM_SCALE

from .models import ARCHS, data, mlp, quiet, rel
from .oracles import margin_grads

ARCH_NAMES = list(ARCHS)


@functools.cache
def model_of(arch: str, C: int = 3) -> nn.Module:
    return ARCHS[arch](C=C)


# ---------------------------------------------------------------------------------------------
# the margin kind
# ---------------------------------------------------------------------------------------------


@functools.cache
def margin_case(arch: str) -> tuple:
    """Inputs of two sizes with their labels, and the oracle's margin gradients of both."""
    m = model_of(arch)
    x1, x2 = data(arch, 7, 0), data(arch, 5, 1)
    y1, y2 = torch.arange(7) % 3, (torch.arange(5) + 1) % 3
    return m, x1, x2, y1, y2, margin_grads(m, x1, y1), margin_grads(m, x2, y2)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_margin_kernel_matches_oracle(arch: str) -> None:
    m, x1, _, y1, _, G1, _ = margin_case(arch)
    K = quiet(tl.kernel, m, x1, kind="margin", labels=y1, dtype=torch.float64, batch_size=3)
    assert rel(K, G1 @ G1.T) <= 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_cross_margin_kernel_matches_oracle(arch: str) -> None:
    m, x1, x2, y1, y2, G1, G2 = margin_case(arch)
    Kx = quiet(tl.kernel, m, x1, x2, kind="margin", labels=y1, other_labels=y2, dtype=torch.float64,
               batch_size=3)
    assert rel(Kx, G1 @ G2.T) <= 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_train_test_margin_kernels_match_oracle(arch: str) -> None:
    m, x1, x2, y1, y2, G1, G2 = margin_case(arch)
    K_tr, K_te = quiet(tl.train_test_kernels, m, (x1, y1), (x2, y2), kind="margin", dtype=torch.float64,
                       batch_size=3)
    assert rel(K_tr, G1 @ G1.T) <= 1e-6 and rel(K_te, G2 @ G1.T) <= 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_margin_features_match_oracle(arch: str) -> None:
    m, x1, _, y1, _, G1, _ = margin_case(arch)
    F = quiet(tl.features, m, x1, kind="margin", labels=y1, dtype=torch.float64)
    assert F.shape == G1.shape and rel(F, G1) <= 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_float32_margin_kernel_is_close_and_unnormalized(arch: str) -> None:
    m, x1, _, y1, _, G1, _ = margin_case(arch)
    K32 = quiet(tl.kernel, m, x1, kind="margin", labels=y1)
    assert K32.dtype == torch.float32 and rel(K32, G1 @ G1.T) <= 1e-4


def _one_logit() -> tuple:
    return mlp(C=1), data("mlp", 6, 0), torch.tensor([0, 1, 1, 0, 1, 0])


def test_margin_kernel_of_one_logit_matches_oracle() -> None:
    m, x, y = _one_logit()
    G = margin_grads(m, x, y)
    K = tl.kernel(m, x, kind="margin", labels=y, dtype=torch.float64)
    assert rel(K, G @ G.T) <= 1e-6


def test_margin_kernel_of_one_logit_is_sign_flipped_trntk0() -> None:
    # for one logit the margin is ±f: its gradient is ±∇f, so the kernel is sign-flipped trNTK0
    m, x, y = _one_logit()
    K = tl.kernel(m, x, kind="margin", labels=y, dtype=torch.float64)
    s = (2 * y - 1).double()
    J = tl.kernel(m, x, kind="trntk0", dtype=torch.float64)
    torch.testing.assert_close(K, s[:, None] * J * s[None, :])


def test_margin_of_predicted_labels_is_the_predictions_margin() -> None:
    m3 = model_of("mlp")
    x = data("mlp", 6, 0)
    with torch.no_grad():
        pred = m3(x).argmax(1)
    Kp = tl.kernel(m3, x, kind="margin", labels="predicted", dtype=torch.float64)
    Gp = margin_grads(m3, x, pred)
    assert rel(Kp, Gp @ Gp.T) <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "kind='margin' differentiates the margin and needs labels"),
        ({"labels": torch.zeros(5), "probes": 4}, "probes= applies only to"),
        ({"other": True, "labels": torch.zeros(5), "other_labels": "predicted"}, "predicted"),
        ({"labels": torch.full((5,), 3)}, "lie in"),
    ],
    ids=["no-labels", "probes", "mixed-modes", "range"],
)
def test_margin_kernel_bad_options(kwargs: dict, match: str) -> None:
    m = model_of("mlp")
    x = data("mlp", 5, 0)
    args = (x, x) if kwargs.pop("other", False) else (x,)
    with pytest.raises(tl.InputError, match=match):
        tl.kernel(m, *args, kind="margin", **kwargs)


def test_true_labels_on_both_sides_do_not_warn() -> None:
    # true labels on both sides are the attribution's target: no leakage warning (unlike gradcos)
    m = model_of("mlp")
    x = data("mlp", 5, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tl.kernel(m, x, x, kind="margin", labels=torch.zeros(5), other_labels=torch.ones(5))


def test_projected_margin_features_give_the_projected_kernel() -> None:
    # projected margin features: R applied to the gradient
    m = model_of("mlp")
    x = data("mlp", 5, 0)
    y = torch.arange(5) % 3
    P = tl.Projection(32, seed=1)
    Fp = tl.features(m, x, kind="margin", labels=y, projection=P, dtype=torch.float64)
    Kp = tl.kernel(m, x, kind="margin", labels=y, projection=P, dtype=torch.float64)
    assert Fp.shape == (5, 32)
    torch.testing.assert_close(Kp, Fp @ Fp.T)


# ---------------------------------------------------------------------------------------------
# attribute
# ---------------------------------------------------------------------------------------------


def _probs(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(m.double()(x.double()), 1)


def explicit_scores(m: nn.Module, x_tr, y_tr, x_te, y_te, lam: float | None = None) -> torch.Tensor:
    """TRAK's primal formula with exact gradients: φ(x)ᵀ(ΦᵀΦ + λI)⁻¹Φᵀ diag(q), P×P in float64."""
    Phi, phi = margin_grads(m, x_tr, y_tr), margin_grads(m, x_te, y_te)
    N, P = Phi.shape
    lam = DEFAULT_LAM_SCALE * float((Phi * Phi).sum()) / N if lam is None else lam
    q = 1 - _probs(mlp_copy(m), x_tr)[torch.arange(N), y_tr]
    H = Phi.T @ Phi + lam * torch.eye(P, dtype=torch.float64)
    return phi @ torch.linalg.solve(H, Phi.T) * q[None, :]


def mlp_copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).eval()


def train_test(arch: str = "mlp", n: int = 12, t: int = 4):
    return data(arch, n, 0), torch.arange(n) % 3, data(arch, t, 1), (torch.arange(t) + 2) % 3


@functools.cache
def mlp_reference() -> torch.Tensor:
    """TRAK's explicit scores of the mlp on ``train_test()`` with the default λ."""
    x_tr, y_tr, x_te, y_te = train_test()
    return explicit_scores(model_of("mlp"), x_tr, y_tr, x_te, y_te)


def test_attribute_equals_explicit_primal_computation() -> None:
    m = model_of("mlp")
    x_tr, y_tr, x_te, y_te = train_test()
    s = tl.attribute(m, x_tr, x_te, labels=y_tr, test_labels=y_te, dtype=torch.float64, batch_size=5)
    assert s.shape == (4, 12) and s.dtype == torch.float64
    assert rel(s, mlp_reference()) <= 1e-6


def test_attribute_reads_labels_from_pairs_and_uses_lam_as_given() -> None:
    m = model_of("mlp")
    x_tr, y_tr, x_te, y_te = train_test()
    s2 = tl.attribute(m, (x_tr, y_tr), (x_te, y_te), lam=0.37, dtype=torch.float64)
    assert rel(s2, explicit_scores(m, x_tr, y_tr, x_te, y_te, lam=0.37)) <= 1e-6


def test_attribute_with_float32_kernels_is_close() -> None:
    # float32 kernels, float64 solve: close
    m = model_of("mlp")
    x_tr, y_tr, x_te, y_te = train_test()
    assert rel(tl.attribute(m, x_tr, x_te, labels=y_tr, test_labels=y_te), mlp_reference()) <= 1e-3


def test_attribute_predicted_test_labels_attribute_the_predictions_margin() -> None:
    m = model_of("mlp")
    x_tr, y_tr, x_te, _ = train_test()
    pred = _probs(mlp_copy(m), x_te).argmax(1)
    sp = tl.attribute(m, x_tr, x_te, labels=y_tr, test_labels="predicted", dtype=torch.float64)
    assert rel(sp, explicit_scores(m, x_tr, y_tr, x_te, pred)) <= 1e-6


def test_attribute_cnn_matches_explicit() -> None:
    m = model_of("cnn")
    x_tr, y_tr, x_te, y_te = train_test("cnn", 8, 3)
    ref = explicit_scores(m, x_tr, y_tr, x_te, y_te)
    s = quiet(tl.attribute, m, x_tr, x_te, labels=y_tr, test_labels=y_te, dtype=torch.float64)
    assert rel(s, ref) <= 1e-6


def test_attribute_one_logit() -> None:
    m = mlp(C=1)
    x_tr, x_te = data("mlp", 10, 0), data("mlp", 3, 1)
    y_tr, y_te = torch.arange(10) % 2, torch.tensor([1, 0, 1])
    Phi, phi = margin_grads(m, x_tr, y_tr), margin_grads(m, x_te, y_te)
    lam = DEFAULT_LAM_SCALE * float((Phi * Phi).sum()) / 10
    with torch.no_grad():
        z = m.double()(x_tr.double())[:, 0]
    q = torch.sigmoid(-(2 * y_tr.double() - 1) * z)  # 1 − p(y)
    ref = phi @ torch.linalg.solve(Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=torch.float64),
                                   Phi.T) * q[None, :]
    s = tl.attribute(m, x_tr, x_te, labels=y_tr, test_labels=y_te, dtype=torch.float64)
    assert rel(s, ref) <= 1e-6


def test_ensemble_averages_single_model_scores() -> None:
    x_tr, y_tr, x_te, y_te = train_test()
    m1 = mlp()
    torch.manual_seed(5)
    m2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))
    kw = dict(labels=y_tr, test_labels=y_te, dtype=torch.float64)
    s1, s2 = tl.attribute(m1, x_tr, x_te, **kw), tl.attribute(m2, x_tr, x_te, **kw)
    s12 = tl.attribute([m1, m2], x_tr, x_te, **kw)
    torch.testing.assert_close(s12, (s1 + s2) / 2)
    assert rel(s1, s2) > 0.1  # the two members do differ


@functools.cache
def projection_case() -> tuple:
    """30 training points, 6 targets, the exact scores at the default λ (computed from the oracle)."""
    m = model_of("mlp")
    x_tr, y_tr, x_te, y_te = train_test(n=30, t=6)
    kw = dict(labels=y_tr, test_labels=y_te, dtype=torch.float64)
    G = margin_grads(m, x_tr, y_tr)
    lam = DEFAULT_LAM_SCALE * float((G * G).sum()) / 30  # the default λ: only the projection differs
    return m, x_tr, x_te, kw, lam, tl.attribute(m, x_tr, x_te, lam=lam, **kw)


def test_projected_attribution_converges_to_exact() -> None:
    m, x_tr, x_te, kw, lam, exact = projection_case()
    errs = []
    for dim in (64, 512, 4096):
        errs.append(np.mean([rel(tl.attribute(m, x_tr, x_te, lam=lam, projection=tl.Projection(dim, seed=s),
                                              **kw), exact) for s in range(3)]))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.25 * errs[0] and errs[2] < 0.1


def test_default_lam_of_the_projected_form_converges_too() -> None:
    # the default λ of the projected form (tr(ΦᵀΦ)/N, an estimate of tr(K)/N) converges too
    m, x_tr, x_te, kw, _, exact = projection_case()
    d = tl.attribute(m, x_tr, x_te, projection=tl.Projection(4096, seed=0), **kw)
    assert rel(d, exact) < 0.1


_BAD_ATTRIBUTE_CALLS = [
    (lambda m, tr, ytr, te, yte: tl.attribute([], tr, te, labels=ytr, test_labels=yte), "empty list"),
    (lambda m, tr, ytr, te, yte: tl.attribute([m, "not a model"], tr, te, labels=ytr, test_labels=yte),
     r"model\[1\]"),
    (lambda m, tr, ytr, te, yte: tl.attribute(m, tr, te, test_labels=yte), "labels of train"),
    (lambda m, tr, ytr, te, yte: tl.attribute(m, tr, te, labels=ytr), "test_labels="),
    (lambda m, tr, ytr, te, yte: tl.attribute(m, tr, te, labels=ytr[:5], test_labels=yte),
     "entries but the data has"),
    (lambda m, tr, ytr, te, yte: tl.attribute(m, tr, te, labels=ytr, test_labels=yte[:2]),
     "entries but the data has"),
    *[
        (lambda m, tr, ytr, te, yte, lam=lam: tl.attribute(m, tr, te, labels=ytr, test_labels=yte, lam=lam),
         "lam must be")
        for lam in (0, -1.0, float("nan"), float("inf"), True, "big")
    ],
    (lambda m, tr, ytr, te, yte: tl.attribute(m, tr, te, labels=ytr + 5, test_labels=yte), "lie in"),
    (lambda m, tr, ytr, te, yte: tl.attribute(m, tr, te, labels="true", test_labels=yte), "'predicted'"),
    (lambda m, tr, ytr, te, yte: tl.attribute(m, tr, te, labels=ytr, test_labels=yte, projection=64),
     "Projection"),
]


@pytest.mark.parametrize(("call", "match"), _BAD_ATTRIBUTE_CALLS)
def test_attribute_bad_inputs(call, match: str) -> None:
    with pytest.raises(tl.InputError, match=match):
        call(model_of("mlp"), *train_test())


# ---------------------------------------------------------------------------------------------
# top-k and the kGLM decomposition side by side
# ---------------------------------------------------------------------------------------------


S_TOP = torch.tensor([[0.5, -2.0, 1.5, 0.0], [-1.0, 3.0, 2.0, -0.5]])


def test_top_attributions() -> None:
    top = tl.top_attributions(S_TOP, k=2)
    assert top.proponents.tolist() == [[2, 0], [1, 2]]
    assert top.proponent_scores.tolist() == [[1.5, 0.5], [3.0, 2.0]]
    assert top.opponents.tolist() == [[1, 3], [0, 3]]
    assert top.opponent_scores.tolist() == [[-2.0, 0.0], [-1.0, -0.5]]


def test_top_attributions_of_one_numpy_row_are_capped_at_n() -> None:
    assert tl.top_attributions(S_TOP[0].numpy(), k=10).proponents.shape == (1, 4)  # capped at N


def test_top_attributions_to_dict() -> None:
    assert tl.top_attributions(S_TOP, k=2).to_dict()["proponents"] == [[2, 0], [1, 2]]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_top_attributions_bad_k(bad) -> None:
    with pytest.raises(tl.InputError, match="positive integer"):
        tl.top_attributions(S_TOP, k=bad)


def test_top_attributions_reject_nan() -> None:
    with pytest.raises(tl.InputError, match="NaN"):
        tl.top_attributions(torch.tensor([[float("nan"), 1.0]]))


@functools.cache
def kglm_case() -> tuple:
    """A trNTK kGLM of the mlp on 15 training points, 4 test targets, and its test logits."""
    m = model_of("mlp")
    x_tr, y_tr, x_te, y_te = train_test(n=15, t=4)
    K_tr, K_te = tl.train_test_kernels(m, x_tr, x_te, kind="trntk", dtype=torch.float64)
    sur = tl.KernelSurrogate().fit(K_tr.numpy(), y_tr.numpy())
    return m, x_tr, y_tr, x_te, y_te, sur, K_te.numpy(), sur.logits(K_te.numpy())


def test_kglm_contributions_sum_to_the_explained_logit() -> None:
    *_, y_te, sur, K_te, Z = kglm_case()
    A = tl.kglm_contributions(sur, K_te, y_te.numpy())
    assert A.shape == (4, 15)
    idx = y_te.numpy()
    np.testing.assert_allclose(A.sum(1).numpy(), Z[np.arange(4), idx] - sur.class_intercept_[idx], atol=1e-10)


def test_kglm_contributions_default_to_the_surrogates_class() -> None:
    *_, sur, K_te, Z = kglm_case()
    P = tl.kglm_contributions(sur, K_te)
    pred = Z.argmax(1)
    np.testing.assert_allclose(P.sum(1).numpy(), Z[np.arange(4), pred] - sur.class_intercept_[pred],
                               atol=1e-10)


def test_kglm_and_attribution_side_by_side() -> None:
    # the two explanations of the same targets, through the same top-k helper
    m, x_tr, y_tr, x_te, y_te, sur, K_te, _ = kglm_case()
    A = tl.kglm_contributions(sur, K_te, y_te.numpy())
    s = tl.attribute(m, x_tr, x_te, labels=y_tr, test_labels=y_te)
    assert tl.top_attributions(s, 3).proponents.shape == tl.top_attributions(A, 3).proponents.shape


def test_kglm_contributions_bad_target() -> None:
    *_, sur, K_te, _ = kglm_case()
    with pytest.raises(tl.InputError, match="not among"):
        tl.kglm_contributions(sur, K_te, np.array([0, 1, 2, 9]))
    with pytest.raises(tl.InputError, match="entries"):
        tl.kglm_contributions(sur, K_te, np.array([0, 1]))


@pytest.mark.parametrize("C", [3, 1])
def test_predicted_train_labels_are_the_networks_predictions(C: int) -> None:
    m = mlp(C=C)
    x_tr, _, x_te, _ = train_test()
    with torch.no_grad():
        z = m(x_tr)
    pred = (z[:, 0] > 0).long() if C == 1 else z.argmax(1)
    y_te = torch.zeros(len(x_te), dtype=torch.long)
    kw = dict(test_labels=y_te, dtype=torch.float64)
    torch.testing.assert_close(tl.attribute(m, x_tr, x_te, labels="predicted", **kw),
                               tl.attribute(m, x_tr, x_te, labels=pred, **kw))
