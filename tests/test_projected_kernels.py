"""proj-trNTK / proj-pNTK through the engine: equal to projecting explicit Jacobians, convergent in K,
reproducible across batch sizes."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tangentlens as tl
from tangentlens.errors import InputError
from tangentlens.projection import Projection

from .models import ARCHS, data, quiet
from .oracles import jacobians


@functools.cache
def model_of(arch: str) -> nn.Module:
    return ARCHS[arch](C=3)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_projected_features_equal_projected_jacobians(arch: str, kind: str) -> None:
    m = model_of(arch)
    x = data(arch, 6)
    J = jacobians(m, x)  # (N, C, P) float64
    P = J.shape[2]
    proj = Projection(64, kind=kind, seed=5)
    R = proj.matrix(P)  # (K, P)
    f = quiet(tl.features, m, x, kind="trntk0", projection=proj, dtype=torch.float64, batch_size=4)
    ref = (J @ R.T).reshape(6, -1)
    torch.testing.assert_close(f, ref, rtol=1e-9, atol=1e-10)
    fp = quiet(tl.features, m, x, kind="pntk", projection=proj, dtype=torch.float64)
    torch.testing.assert_close(fp, J.sum(1) @ R.T / 3**0.5, rtol=1e-9, atol=1e-10)


def test_kronecker_features_equal_dense_kronecker_oracle() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 10, bias=False), nn.Tanh(), nn.Linear(10, 3, bias=False))
    x = torch.randn(5, 12)
    proj = Projection(16, kind="kronecker", seed=2)  # k_in = k_out = 4 < layer sizes
    f = tl.features(m, x, kind="trntk0", projection=proj, dtype=torch.float64).reshape(5, 3, -1)
    J = jacobians(m, x)
    off = 0
    parts = []
    for name, p in m.named_parameters():
        d_out, d_in = p.shape
        k_in, k_out = proj.kronecker_dims(d_in, d_out)
        assert k_in < d_in  # really projected (a side with k == d is the identity)
        f64 = torch.float64
        P_in, P_out = proj.kronecker_factors(name, d_in, d_out, dtype=f64)  # (k_in, d_in), (k_out, d_out)
        Pin, Pout = P_in.T, P_out.T
        G = J[:, :, off : off + p.numel()].reshape(5, 3, d_out, d_in)
        parts.append(torch.einsum("ncoi,ok,ij->nckj", G, Pout, Pin).reshape(5, 3, -1))
        off += p.numel()
    torch.testing.assert_close(f, torch.cat(parts, 2), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", ["rademacher", "sjlt", "kronecker"])
def test_proj_trntk_approaches_trntk(arch: str, kind: str) -> None:
    m = model_of(arch)
    x = data(arch, 12)
    exact = quiet(tl.kernel, m, x, kind="trntk", dtype=torch.float64)
    errs = []
    for K in (16, 256, 2048):
        e = []
        for seed in range(2):
            pk = quiet(tl.kernel, m, x, kind="trntk", projection=Projection(K, kind=kind, seed=seed),
                       dtype=torch.float64)
            assert torch.equal(pk.diagonal(), torch.ones(12, dtype=torch.float64))
            e.append(float((pk - exact).abs().mean()))
        errs.append(sum(e) / 2)
    assert errs[2] < errs[0] / 4, errs
    assert errs[2] < 0.02, errs


def test_seeded_projection_is_bit_identical_across_batch_sizes() -> None:
    m = model_of("cnn")
    x = data("cnn", 11)
    for kind in ("rademacher", "gaussian", "sjlt", "srht", "kronecker"):
        proj = Projection(64, kind=kind, seed=7)
        a = tl.features(m, x, kind="trntk", projection=proj, batch_size=11)
        b = tl.features(m, x, kind="trntk", projection=Projection(64, kind=kind, seed=7), batch_size=3)
        assert torch.equal(a, b), kind
        c = tl.features(m, x, kind="trntk", projection=Projection(64, kind=kind, seed=8), batch_size=3)
        assert not torch.equal(a, c), kind


def test_proj_pntk_is_cosine_and_entk_projection_shape() -> None:
    m = model_of("mlp")
    x = data("mlp", 7)
    proj = Projection(32, seed=1)
    k = tl.kernel(m, x, kind="pntk", normalize=True, projection=proj)
    assert torch.equal(k.diagonal(), torch.ones(7))
    e = tl.kernel(m, x, data("mlp", 4, 1), kind="entk", projection=proj)
    assert e.shape == (7, 4, 3, 3)


def test_projection_errors() -> None:
    m = model_of("mlp")
    x = data("mlp", 4)
    with pytest.raises(InputError):
        Projection(0)
    with pytest.raises(InputError):
        Projection(8, seed="a")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="gradient kernels"):
        tl.kernel(m, x, kind="ck", projection=Projection(8))
    with pytest.raises(InputError, match="by_layer"):
        tl.kernel(m, x, kind="trntk", projection=Projection(8), by_layer=True)
