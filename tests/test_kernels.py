"""Every kernel kind against the naive float64 oracle on four architectures, plus the identities."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tangentlens as tl
from tangentlens.errors import InputError, UnsupportedLayerError, UnsupportedLayerWarning

from .models import ARCHS, data, quiet, rel
from .oracles import jacobians, kernel_from_jacobians, oracle_kernel

ARCH_NAMES = list(ARCHS)
KINDS = ["entk", "trntk", "trntk0", "pntk"]


@functools.cache
def model_of(arch: str, C: int = 3) -> nn.Module:
    return ARCHS[arch](C=C)


@functools.cache
def jac(arch: str, n: int, seed: int) -> torch.Tensor:
    return jacobians(model_of(arch), data(arch, n, seed))


def oracle(arch: str, kind: str, cross: bool) -> torch.Tensor:
    J1 = jac(arch, 7, 0)
    return kernel_from_jacobians(J1, jac(arch, 5, 1) if cross else J1, kind)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cross", [False, True])
def test_kernel_matches_oracle(arch: str, kind: str, cross: bool) -> None:
    m = model_of(arch)
    x1 = data(arch, 7, 0)
    x2 = data(arch, 5, 1) if cross else None
    ref = oracle(arch, kind, cross)
    k64 = quiet(tl.kernel, m, x1, x2, kind=kind, dtype=torch.float64, batch_size=3)
    k32 = quiet(tl.kernel, m, x1, x2, kind=kind, batch_size=3)
    assert k64.dtype == torch.float64 and k32.dtype == torch.float32
    assert k64.shape == ref.shape
    assert rel(k64, ref) <= 1e-6
    assert rel(k32, ref) <= 1e-4


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_gradcos_matches_oracle(arch: str) -> None:
    m = model_of(arch)
    x1, x2 = data(arch, 6, 0), data(arch, 4, 1)
    y1, y2 = torch.arange(6) % 3, torch.arange(4) % 3
    ref = oracle_kernel(m, x1, x2, kind="gradcos", y1=y1, y2=y2)
    with pytest.warns(UserWarning, match="leaks"):
        k = quiet(tl.kernel, m, x1, x2, kind="gradcos", labels=y1, other_labels=y2, dtype=torch.float64)
    assert rel(k, ref) <= 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", [None, 0])
def test_train_test_kernels_match_oracle(arch: str, kind: str, cache: int | None) -> None:
    m = model_of(arch)
    K_tr, K_te = quiet(
        tl.train_test_kernels, m, data(arch, 7, 0), data(arch, 5, 1), kind=kind, dtype=torch.float64,
        batch_size=3, cache_bytes=cache,
    )
    J_tr, J_te = jac(arch, 7, 0), jac(arch, 5, 1)
    assert rel(K_tr, kernel_from_jacobians(J_tr, J_tr, kind)) <= 1e-6
    assert rel(K_te, kernel_from_jacobians(J_te, J_tr, kind)) <= 1e-6


def test_train_test_kernels_equal_two_kernel_calls() -> None:
    m = model_of("cnn")
    x_tr, x_te = data("cnn", 9, 0), data("cnn", 4, 1)
    y_tr, y_te = torch.arange(9) % 3, torch.arange(4) % 3
    for kw in ({"kind": "trntk"}, {"kind": "entk", "normalize": True}, {"kind": "pntk", "normalize": True},
               {"kind": "ck"}):
        K_tr, K_te = tl.train_test_kernels(m, x_tr, x_te, batch_size=4, **kw)
        torch.testing.assert_close(K_tr, tl.kernel(m, x_tr, batch_size=4, **kw))
        torch.testing.assert_close(K_te, tl.kernel(m, x_te, x_tr, batch_size=4, **kw))
    # layer kernels
    L_tr, L_te = tl.train_test_kernels(m, x_tr, x_te, kind="trntk0", by_layer=True, dtype=torch.float64)
    ref_te = tl.kernel(m, x_te, x_tr, kind="trntk0", by_layer=True, dtype=torch.float64)
    assert L_te.keys() == ref_te.keys()
    for k in ref_te:
        torch.testing.assert_close(L_te[k], ref_te[k])
    torch.testing.assert_close(sum(L_tr.values()), tl.kernel(m, x_tr, kind="trntk0", dtype=torch.float64))
    # loss gradients: predicted labels on both sides, or true labels (which leak, and are warned about)
    K_tr, K_te = tl.train_test_kernels(m, x_tr, x_te, kind="gradcos", labels="predicted",
                                       test_labels="predicted", dtype=torch.float64)
    torch.testing.assert_close(K_te, tl.kernel(m, x_te, x_tr, kind="gradcos", labels="predicted",
                                               other_labels="predicted", dtype=torch.float64))
    with pytest.warns(UserWarning, match="leaks"):
        K_tr, K_te = tl.train_test_kernels(m, x_tr, x_te, kind="gradcos", labels=y_tr, test_labels=y_te,
                                           dtype=torch.float64)
    torch.testing.assert_close(K_te, oracle_kernel(m, x_te, x_tr, kind="gradcos", y1=y_te, y2=y_tr))
    with pytest.raises(tl.InputError, match="predicted"):
        tl.train_test_kernels(m, x_tr, x_te, kind="gradcos", labels=y_tr, test_labels="predicted")
    # projected kernels: the same projection on both sides
    P = tl.Projection(64, seed=3)
    K_tr, K_te = tl.train_test_kernels(m, x_tr, x_te, kind="trntk", projection=P)
    torch.testing.assert_close(K_te, tl.kernel(m, x_te, x_tr, kind="trntk", projection=P))
    torch.testing.assert_close(K_tr, tl.kernel(m, x_tr, kind="trntk", projection=P))
    assert torch.equal(K_tr.diagonal(), torch.ones(9))


def test_gradcos_predicted_labels_and_pairs() -> None:
    m = model_of("mlp")
    x = data("mlp", 8)
    pred = m.eval()(x).argmax(1)
    m.train()
    ref = oracle_kernel(m, x, kind="gradcos", y1=pred)
    k = tl.kernel(m, x, kind="gradcos", labels="predicted", dtype=torch.float64)
    assert rel(k, ref) <= 1e-6
    k2 = tl.kernel(m, (x, pred), kind="gradcos", dtype=torch.float64)
    assert rel(k2, ref) <= 1e-6


def test_binary_single_logit_gradcos() -> None:
    m = model_of("mlp", 1)
    x, y = data("mlp", 6), torch.tensor([0, 1, 1, 0, 1, 0])
    ref = oracle_kernel(m, x, kind="gradcos", y1=y)
    assert rel(tl.kernel(m, x, kind="gradcos", labels=y, dtype=torch.float64), ref) <= 1e-6


def test_hf_style_dict_inputs_with_attention_mask() -> None:
    m = model_of("transformer")
    ids = data("transformer", 6)
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    ref = oracle_kernel(m, batch, kind="trntk")
    k = quiet(tl.kernel, m, batch, kind="trntk", dtype=torch.float64, batch_size=4)
    assert rel(k, ref) <= 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_single_output_identities(arch: str) -> None:
    m = model_of(arch, 1)
    x = data(arch, 6)
    tr = quiet(tl.kernel, m, x, kind="trntk", dtype=torch.float64)
    en = quiet(tl.kernel, m, x, kind="entk", normalize=True, dtype=torch.float64)[:, :, 0, 0]
    pn = quiet(tl.kernel, m, x, kind="pntk", normalize=True, dtype=torch.float64)
    torch.testing.assert_close(tr, en, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tr, pn, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_normalized_diagonal_psd_and_cosine_of_jacobians(arch: str) -> None:
    m = model_of(arch)
    x = data(arch, 7, 0)
    k = quiet(tl.kernel, m, x, kind="trntk", dtype=torch.float64, batch_size=3)
    assert torch.equal(k.diagonal(), torch.ones(7, dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(k).min()) > -1e-10
    J = jac(arch, 7, 0).reshape(7, -1)
    Jn = J / J.norm(dim=1, keepdim=True)
    torch.testing.assert_close(k, Jn @ Jn.T, rtol=1e-9, atol=1e-12)
    k0 = quiet(tl.kernel, m, x, kind="trntk0", dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(k0).min()) > -1e-8 * float(k0.diagonal().max())
    e = quiet(tl.kernel, m, x, kind="entk", normalize=True, dtype=torch.float64)
    for c in range(3):
        assert torch.equal(e[torch.arange(7), torch.arange(7), c, c], torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layer_kernels_sum_and_parameter_subsets(arch: str) -> None:
    m = model_of(arch)
    x = data(arch, 5)
    total = quiet(tl.kernel, m, x, kind="trntk0", dtype=torch.float64)
    parts = quiet(tl.kernel, m, x, kind="trntk0", dtype=torch.float64, by_layer=True)
    assert isinstance(parts, dict) and len(parts) >= 2
    torch.testing.assert_close(sum(parts.values()), total, rtol=1e-10, atol=1e-12)
    names = [n for n, _ in m.named_parameters()]
    half = names[: len(names) // 2]
    sub = quiet(tl.kernel, m, x, kind="trntk0", parameters=half, dtype=torch.float64)
    rest = quiet(tl.kernel, m, x, kind="trntk0", parameters=names[len(names) // 2 :],
                 dtype=torch.float64)
    torch.testing.assert_close(sub + rest, total, rtol=1e-10, atol=1e-12)
    ref = oracle_kernel(m, x, kind="trntk0", names=half)
    assert rel(sub, ref) <= 1e-6


def test_parameter_selection_by_module_and_object() -> None:
    m = model_of("mlp")
    x = data("mlp", 5)
    by_name = tl.kernel(m, x, kind="trntk0", parameters="4", dtype=torch.float64)
    by_mod = tl.kernel(m, x, kind="trntk0", parameters=m[4], dtype=torch.float64)
    by_par = tl.kernel(m, x, kind="trntk0", parameters=[m[4].weight, m[4].bias], dtype=torch.float64)
    torch.testing.assert_close(by_name, by_mod)
    torch.testing.assert_close(by_name, by_par)
    assert rel(by_name, oracle_kernel(m, x, kind="trntk0", names=["4.weight", "4.bias"])) <= 1e-6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_mode_restored_and_model_untouched(arch: str) -> None:
    m = ARCHS[arch]()
    m.train()
    if arch == "cnn":
        m.bn2.eval()  # a mixed state must come back exactly
    modes = {n: s.training for n, s in m.named_modules()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    quiet(tl.kernel, m, data(arch, 4), kind="trntk")
    quiet(tl.kernel, m, data(arch, 4), kind="trntk", dtype=torch.float64)
    assert modes == {n: s.training for n, s in m.named_modules()}
    assert flags == {n: p.requires_grad for n, p in m.named_parameters()}
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_features_inner_products_equal_kernels(arch: str) -> None:
    m = model_of(arch)
    x = data(arch, 7, 0)
    for kind in ("trntk", "trntk0", "pntk"):
        f = quiet(tl.features, m, x, kind=kind, dtype=torch.float64, batch_size=4)
        k = quiet(tl.kernel, m, x, kind=kind, dtype=torch.float64)
        torch.testing.assert_close(f @ f.T, k, rtol=1e-9, atol=1e-10)
    J = jac(arch, 7, 0)
    fe = quiet(tl.features, m, x, kind="entk", dtype=torch.float64)
    torch.testing.assert_close(fe, J, rtol=1e-9, atol=1e-12)


def test_batch_size_invariance_and_input_forms() -> None:
    m = model_of("cnn")
    x = data("cnn", 10)
    y = torch.arange(10) % 3
    ref = tl.kernel(m, x, kind="trntk", dtype=torch.float64, batch_size=10)
    for bs in (1, 3, 7):
        torch.testing.assert_close(tl.kernel(m, x, kind="trntk", dtype=torch.float64, batch_size=bs), ref)
    ds = TensorDataset(x, y)
    torch.testing.assert_close(tl.kernel(m, ds, kind="trntk", dtype=torch.float64, batch_size=4), ref)
    dl = DataLoader(ds, batch_size=3, shuffle=False)
    torch.testing.assert_close(tl.kernel(m, dl, kind="trntk", dtype=torch.float64), ref)
    torch.testing.assert_close(tl.kernel(m, (x, y), kind="trntk", dtype=torch.float64), ref)
    torch.testing.assert_close(tl.kernel(m, x.numpy(), kind="trntk", dtype=torch.float64), ref)
    cross = tl.kernel(m, x[:4], x[4:], kind="trntk", dtype=torch.float64, batch_size=3)
    torch.testing.assert_close(cross, ref[:4, 4:])
    recomputed = tl.kernel(m, x[:4], x[4:], kind="trntk", dtype=torch.float64, batch_size=3,
                           cache_bytes=0)
    torch.testing.assert_close(recomputed, cross)
    sym_recomputed = tl.kernel(m, x, kind="trntk", dtype=torch.float64, batch_size=3, cache_bytes=0)
    torch.testing.assert_close(sym_recomputed, ref)
    # the default budget follows the free memory; explicit budgets are taken as given
    from tangentlens.memory import resolve_budget

    cpu = torch.device("cpu")
    b = resolve_budget(None, None, cpu)
    assert b.total >= 2**29 and b.cache == b.total // 2 and b.work >= b.total // 2
    assert resolve_budget(2**30, 12345, cpu).cache == 12345 and resolve_budget(2**30, None, cpu).work == 2**29
    full = tl.kernel(m, x, kind="entk", dtype=torch.float64, batch_size=3, normalize=True)
    full0 = tl.kernel(m, x, kind="entk", dtype=torch.float64, batch_size=3, normalize=True, cache_bytes=0)
    torch.testing.assert_close(full0, full)
    idx = torch.arange(10)
    torch.testing.assert_close(full[idx, idx][:, torch.arange(3), torch.arange(3)], torch.ones(10, 3,
                               dtype=torch.float64))


def test_embedding_and_conjugate_kernels() -> None:
    m = model_of("mlp").eval()
    x = data("mlp", 6).double()
    m64 = m.double()
    try:
        h1 = m64[0](x)
        h2 = m64[2](torch.relu(h1))
        pen = torch.tanh(h2)
        ck_ref = pen @ pen.T
        d = ck_ref.diagonal().sqrt()
        ck = tl.kernel(m64, x, kind="ck")
        torch.testing.assert_close(ck, ck_ref / d[:, None] / d[None, :])
        em_ref = h1 @ h1.T + h2 @ h2.T
        d = em_ref.diagonal().sqrt()
        em = tl.kernel(m64, x, kind="em")
        torch.testing.assert_close(em, em_ref / d[:, None] / d[None, :])
        em1 = tl.kernel(m64, x, kind="em", modules=["1"], normalize=False)
        a = torch.relu(h1)
        torch.testing.assert_close(em1, a @ a.T)
    finally:
        m.float()


def test_sketched_probes_with_all_classes_equal_exact_trace() -> None:
    m = model_of("mlp")
    x = data("mlp", 5)
    exact = tl.kernel(m, x, kind="trntk", dtype=torch.float64)
    torch.testing.assert_close(tl.kernel(m, x, kind="trntk", probes=3, dtype=torch.float64), exact)


@pytest.mark.slow
def test_sketched_probes_unbiased() -> None:
    m = model_of("mlp", 8)
    x = data("mlp", 4)
    exact = tl.kernel(m, x, kind="trntk0", dtype=torch.float64)
    est = torch.stack([tl.kernel(m, x, kind="trntk0", probes=2, probe_seed=s, dtype=torch.float64)
                       for s in range(400)])
    mean, se = est.mean(0), est.std(0) / np.sqrt(len(est))
    z = ((mean - exact).abs() / se.clamp_min(1e-12))
    assert float(z.max()) < 4.5


def test_weight_tying_is_detected_and_exact() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.mix = nn.Linear(4, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.mix(self.emb(ids))).mean(1)
            return nn.functional.linear(h, self.emb.weight)  # logits over the vocabulary, tied

    torch.manual_seed(0)
    m = Tied()
    ids = torch.randint(0, 7, (5, 3))
    with pytest.warns(UnsupportedLayerWarning, match="disagree"):
        k = tl.kernel(m, ids, kind="trntk0", dtype=torch.float64)
    assert rel(k, oracle_kernel(m, ids, kind="trntk0")) <= 1e-6


def test_inplace_activation_after_hooked_layer() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    assert rel(tl.kernel(m, x, kind="trntk0", dtype=torch.float64), oracle_kernel(m, x, kind="trntk0")) < 1e-6


def test_tuple_and_model_output_objects_give_their_logits() -> None:
    base = model_of("mlp")
    x = data("mlp", 5)
    ref = tl.kernel(base, x, kind="trntk", dtype=torch.float64)

    class Out:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits
            self.hidden = logits * 2

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module, how: str) -> None:
            super().__init__()
            self.inner, self.how = inner, how

        def forward(self, x: torch.Tensor):
            z = self.inner(x)
            return {"tuple": (z, z.sum()), "object": Out(z), "dict": {"logits": z}}[self.how]

    for how in ("tuple", "object", "dict"):
        k = tl.kernel(Wrap(base, how), x, kind="trntk", dtype=torch.float64)
        torch.testing.assert_close(k, ref)


def test_zero_gradient_parameter_is_not_flagged() -> None:
    # the bias of a key projection has an exactly zero gradient (softmax is shift-invariant per query)
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.q(x) @ self.k(x).transpose(1, 2)
            return self.out((s.softmax(-1) @ self.v(x)).mean(1))

    torch.manual_seed(0)
    m = Attn()
    x = torch.randn(6, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedLayerWarning)
        k = tl.kernel(m, x, kind="trntk0")
    assert rel(k, oracle_kernel(m, x, kind="trntk0")) < 1e-4


def test_same_inputs_twice_is_the_symmetric_kernel() -> None:
    # kernel(model, x, x) takes the symmetric path: the same values as kernel(model, x), exact unit diagonal
    m = model_of("cnn")
    x = data("cnn", 9)
    for kind in ("trntk", "entk", "pntk"):
        torch.testing.assert_close(tl.kernel(m, x, x, kind=kind, batch_size=4), tl.kernel(m, x, kind=kind,
                                   batch_size=4), rtol=0, atol=0)
    y = torch.arange(9) % 3
    torch.testing.assert_close(tl.kernel(m, x, x, kind="gradcos", labels=y, other_labels=y),
                               tl.kernel(m, x, kind="gradcos", labels=y), rtol=0, atol=0)
    K = tl.kernel(m, x, x.clone(), kind="trntk", dtype=torch.float64)  # another tensor: the cross path
    torch.testing.assert_close(K, tl.kernel(m, x, kind="trntk", dtype=torch.float64))


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("kind", ["trntk0", "entk", "pntk"])
def test_functional_implementation_equals_layer_rules(arch: str, kind: str) -> None:
    # two independent implementations: factored layer rules vs torch.func per-example VJPs for every parameter
    m = model_of(arch)
    x1, x2 = data(arch, 7, 0), data(arch, 5, 1)
    a = quiet(tl.kernel, m, x1, x2, kind=kind, dtype=torch.float64, batch_size=4)
    b = quiet(tl.kernel, m, x1, x2, kind=kind, dtype=torch.float64, batch_size=4, implementation="functional")
    assert rel(b, a) <= 1e-6


def test_hooks_implementation_refuses_the_fallback() -> None:
    m = model_of("mlp")
    x = data("mlp", 5)
    torch.testing.assert_close(tl.kernel(m, x, implementation="hooks"), tl.kernel(m, x))
    with pytest.raises(UnsupportedLayerError, match="implementation='auto'"):
        tl.kernel(model_of("transformer"), data("transformer", 4), implementation="hooks")
    with pytest.raises(InputError, match="implementation"):
        tl.kernel(m, x, implementation="vmap")
    with pytest.raises(InputError, match="gradient kernels"):
        tl.kernel(m, x, kind="em", implementation="functional")
