"""proj-trNTK / proj-pNTK through the engine: equal to projecting explicit Jacobians, convergent in K,
reproducible across batch sizes."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tangentlens as tl
from tangentlens.errors import InputError
from tangentlens.projection import LayerFactors, Projection

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
@pytest.mark.parametrize("kind", ["rademacher", "sjlt", "kronecker", "khatri_rao"])
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
    for kind in ("rademacher", "gaussian", "sjlt", "srht", "kronecker", "khatri_rao"):
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


# ----------------------------------------------------------------------------- layers from their factors


def _layer(n: int, m: int, t: int, d_in: int, d_out: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d_in, generator=gen, dtype=dtype)
    a = a + 0.5 * a.mean(0)  # aligned inputs, like activations
    delta = torch.randn(n, m, t, d_out, generator=gen, dtype=dtype)
    g_w = torch.einsum("nmto,nti->nmoi", delta, a).reshape(n, m, -1)
    return a, delta, g_w, delta.sum(2)


@pytest.mark.parametrize(("t", "d_in", "d_out"), [(1, 9, 7), (6, 5, 3), (6, 4, 9), (40, 3, 4)])
def test_khatri_rao_layer_equals_its_factor_oracle(t: int, d_in: int, d_out: int) -> None:
    # T = 1; T > 1 with d_out <= T and with d_out > T; many positions (the materialized-gradient route)
    a, delta, g_w, g_b = _layer(5, 3, t, d_in, d_out)
    pr = Projection(48, "khatri_rao", seed=4)
    A, B = pr.khatri_rao_factors("fc", d_in, d_out)  # (K, d_out), (K, d_in + 1): +-1
    assert torch.equal(A.abs(), torch.ones_like(A)) and torch.equal(B.abs(), torch.ones_like(B))
    # phi_k = alpha_k^T [G | g_b] beta_k / sqrt(K)
    G = torch.cat([g_w.reshape(5, 3, d_out, d_in), g_b[..., None]], 3)
    want = torch.einsum("ko,nmoi,ki->nmk", A, G, B) / 48**0.5
    P = d_out * (d_in + 1)
    got = pr.project_layer(a, delta, "fc", weight_offset=0, bias_offset=d_out * d_in, total_dim=P)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    w_only = pr.project_layer(a, delta, "fc", weight_offset=0, total_dim=d_out * d_in)
    w_want = torch.einsum("ko,nmoi,ki->nmk", A, G[..., :d_in], B[:, :d_in]) / 48**0.5
    torch.testing.assert_close(w_only, w_want, rtol=1e-10, atol=1e-10)
    b_only = pr.project_layer(a, delta, "fc", weight_offset=None, bias_offset=0, total_dim=d_out)
    b_want = torch.einsum("ko,nmo,k->nmk", A, g_b, B[:, d_in]) / 48**0.5
    torch.testing.assert_close(b_only, b_want, rtol=1e-10, atol=1e-10)
    ref = Projection(48, "khatri_rao", seed=4, scale="reference").project_layer(
        a, delta, "fc", weight_offset=0, total_dim=1000)
    torch.testing.assert_close(ref, w_only * (48 / 1000) ** 0.5)
    other = pr.project_layer(a, delta, "fc2", weight_offset=0, total_dim=d_out * d_in)
    assert not torch.allclose(other, w_only)  # another layer key: another, independent sketch


def test_khatri_rao_is_unbiased_and_rows_are_batch_independent() -> None:
    a, delta, g_w, g_b = _layer(2, 1, 3, 12, 10, seed=1)
    exact = float(g_w[0, 0] @ g_w[1, 0] + g_b[0, 0] @ g_b[1, 0])
    est = []
    for seed in range(300):
        phi = Projection(32, "khatri_rao", seed=seed).project_layer(
            a, delta, "l", weight_offset=0, bias_offset=120, total_dim=130)
        est.append(float(phi[0, 0] @ phi[1, 0]))
    est_t = torch.tensor(est, dtype=torch.float64)
    assert abs(float(est_t.mean()) - exact) < 4.0 * float(est_t.std()) / len(est) ** 0.5
    for t in (1, 5):
        a, delta, _, _ = _layer(37, 3, t, 40, 30, seed=2, dtype=torch.float32)
        for kind in ("khatri_rao", "rademacher", "gaussian"):
            pr = Projection(64, kind, seed=1)
            where = dict(weight_offset=7, bias_offset=1207, total_dim=1300)
            full = pr.project_layer(a, delta, "l", **where)
            for bs in (1, 5, 16, 20):
                parts = [pr.project_layer(a[i : i + bs], delta[i : i + bs], "l", **where)
                         for i in range(0, 37, bs)]
                assert torch.equal(torch.cat(parts), full), (kind, t, bs)
            acc = torch.ones_like(full)  # out= adds in place
            assert pr.project_layer(a, delta, "l", **where, out=acc) is acc
            torch.testing.assert_close(acc, torch.ones_like(full) + full)


@pytest.mark.parametrize("t", [1, 4])
def test_dense_layer_from_factors_is_the_flat_matrix(t: int) -> None:
    a, delta, g_w, g_b = _layer(6, 4, t, 11, 7)
    for kind in ("rademacher", "gaussian"):
        pr = Projection(40, kind, seed=3, tile=20)  # weight rows straddle tile boundaries
        R = pr.matrix(100)
        got = pr.project_layer(a, delta, "ignored", weight_offset=5, bias_offset=90, total_dim=100)
        want = g_w @ R[:, 5:82].T + g_b @ R[:, 90:97].T
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(InputError, match="exceed"):
        pr.project_layer(a, delta, "l", weight_offset=50, total_dim=100)
    with pytest.raises(InputError, match="weight_offset or bias_offset"):
        pr.project_layer(a, delta, "l", weight_offset=None, total_dim=100)
    with pytest.raises(InputError, match="shape mismatch"):
        pr.project_layer(a, delta[:2], "l", weight_offset=0, total_dim=100)


def test_khatri_rao_features_through_the_engine_equal_the_oracle() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3), nn.LayerNorm(3))
    x = torch.randn(5, 12)
    proj = Projection(24, kind="khatri_rao", seed=2)
    f = tl.features(m, x, kind="trntk0", projection=proj, dtype=torch.float64).reshape(5, 3, -1)
    J = jacobians(m, x)  # (N, C, P) in named_parameters order
    off, want = 0, torch.zeros(5, 3, 24, dtype=torch.float64)
    for layer in ("0", "2"):
        d_out, d_in = m.get_submodule(layer).weight.shape
        A, B = proj.khatri_rao_factors(layer, d_in, d_out)
        G = J[:, :, off : off + d_out * (d_in + 1)]
        G = torch.cat([G[..., : d_out * d_in].reshape(5, 3, d_out, d_in), G[..., d_out * d_in :, None]], 3)
        want += torch.einsum("ko,nmoi,ki->nmk", A, G, B) / 24**0.5
        off += d_out * (d_in + 1)
    want += J[:, :, off:] @ proj.matrix(J.shape[2])[:, off:].T  # the LayerNorm through the sjlt fallback
    torch.testing.assert_close(f, want, rtol=1e-9, atol=1e-10)


def test_materialized_gradients_are_projected_in_steps_of_rows() -> None:
    # 2.1M parameters, one probe (dense kinds materialize): a block of 20 examples is projected in steps of 7
    # rows (2**24 entries); blocks of 3 rows take one step each (the captures differ by rounding only)
    m = nn.Sequential(nn.Linear(1400, 1500), nn.Tanh(), nn.Linear(1500, 1))
    x = torch.randn(20, 1400, generator=torch.Generator().manual_seed(0))
    proj = Projection(16, kind="rademacher", seed=1)
    f = tl.features(m, x, kind="pntk", projection=proj, batch_size=20)
    g = tl.features(m, x, kind="pntk", projection=proj, batch_size=3)
    torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-4 * float(f.abs().max()))  # sums of 2.1M floats


def _khatri_rao_matrix(pr: Projection, key: str, d_in: int, d_out: int, weight: bool, bias: bool):
    """The explicit (K, P_layer) rows alpha_k (x) beta_k / sqrt(K) of a layer (weight row-major, bias)."""
    A, B = pr.khatri_rao_factors(key, d_in, d_out)
    cols = []
    if weight:
        cols.append(torch.einsum("ko,ki->koi", A, B[:, :d_in]).reshape(pr.dim, -1))
    if bias:
        cols.append(A * B[:, d_in : d_in + 1])
    return torch.cat(cols, 1) / pr.dim**0.5


def test_project_layers_fused_equals_the_explicit_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    # several layers fused chunk by chunk (one position; weight + bias, weight only, bias only of a layer
    # with positions) and one layer with positions: phi = R g with the explicit R, in float64
    import tangentlens.projection.base as base

    n, m, k = 13, 3, 40
    shapes = [(1, 9, 7, True, True), (1, 6, 5, True, False), (4, 3, 6, False, True), (5, 4, 3, True, True)]
    layers, grads, mats = [], [], []
    pr = Projection(k, "khatri_rao", seed=6)
    off = 0
    for i, (t, d_in, d_out, w, b) in enumerate(shapes):
        a, delta, g_w, g_b = _layer(n, m, t, d_in, d_out, seed=i)
        w_off = off if w else None
        b_off = off + (d_out * d_in if w else 0) if b else None
        off += (d_out * d_in if w else 0) + (d_out if b else 0)
        layers.append(LayerFactors(a if t > 1 else a[:, 0], delta, f"l{i}", w_off, b_off))
        grads.append(torch.cat([g for g, keep in ((g_w, w), (g_b, b)) if keep], 2))
        mats.append(_khatri_rao_matrix(pr, f"l{i}", d_in, d_out, w, b))
    want = torch.cat(grads, 2) @ torch.cat(mats, 1).T  # (n, m, K)
    got = pr.project_layers(layers, total_dim=off)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    seq = None
    for lay in layers:
        seq = pr.project_layer(lay.a, lay.delta, lay.key, weight_offset=lay.weight_offset,
                               bias_offset=lay.bias_offset, total_dim=off, out=seq)
    torch.testing.assert_close(got, seq, rtol=1e-12, atol=1e-12)
    acc = torch.ones_like(got)
    assert pr.project_layers(layers, total_dim=off, out=acc) is acc
    torch.testing.assert_close(acc, got + 1)
    for kind in ("khatri_rao", "rademacher"):  # add=False writes over out (no zero fill needed)
        other = Projection(k, kind, seed=6)
        dest = torch.full_like(got, float("nan"))
        assert other.project_layers(layers, total_dim=off, out=dest, add=False) is dest
        assert torch.equal(dest, other.project_layers(layers, total_dim=off)), kind
    # the chunks of rows are a speed knob: 1 row per chunk, and other calls' rows, give the same bits
    monkeypatch.setattr(base, "CACHE_ELEMS", 1)
    assert torch.equal(pr.project_layers(layers, total_dim=off), got)
    monkeypatch.setattr(base, "CACHE_ELEMS", 3 * 64 * 5)  # 5 rows per chunk
    for bs in (2, 6):
        parts = [pr.project_layers([LayerFactors(lay.a[i : i + bs], lay.delta[i : i + bs], *lay[2:])
                                    for lay in layers], total_dim=off) for i in range(0, n, bs)]
        torch.testing.assert_close(torch.cat(parts), got, rtol=0, atol=0)
    # float32: chunks and batches give bit-identical rows too
    layers32 = [lay._replace(a=lay.a.float(), delta=lay.delta.float()) for lay in layers]
    full = pr.project_layers(layers32, total_dim=off)
    for elems, bs in ((1, 1), (3 * 64 * 5, 4), (base.STEP_ELEMS, 13)):
        monkeypatch.setattr(base, "CACHE_ELEMS", elems)
        parts = [pr.project_layers([LayerFactors(lay.a[i : i + bs], lay.delta[i : i + bs], *lay[2:])
                                    for lay in layers32], total_dim=off) for i in range(0, n, bs)]
        assert torch.equal(torch.cat(parts), full), (elems, bs)
    monkeypatch.setattr(base, "PANEL_COLS", 16)  # K in panels of 16, 16 and 8 columns
    torch.testing.assert_close(pr.project_layers(layers, total_dim=off), got, rtol=1e-12, atol=1e-12)


def test_project_layers_of_dense_kinds_and_errors() -> None:
    a1, d1, g1, b1 = _layer(6, 4, 1, 11, 7, seed=1)
    a2, d2, g2, _ = _layer(6, 4, 1, 7, 5, seed=2)
    for kind in ("rademacher", "gaussian"):
        pr = Projection(40, kind, seed=3)
        R = pr.matrix(125)
        got = pr.project_layers([LayerFactors(a1[:, 0], d1, "x", 0, 77), LayerFactors(a2, d2, "y", 84)],
                                total_dim=125)
        want = g1 @ R[:, :77].T + b1 @ R[:, 77:84].T + g2 @ R[:, 84:119].T
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    pr = Projection(40, "khatri_rao", seed=3)
    with pytest.raises(InputError, match="at least one layer"):
        pr.project_layers([], total_dim=10)
    with pytest.raises(InputError, match="same rows and probes"):
        pr.project_layers([LayerFactors(a1, d1, "x", 0), LayerFactors(a2[:5], d2[:5], "y", 77)],
                          total_dim=200)
    with pytest.raises(InputError, match="same rows and probes"):
        pr.project_layers([LayerFactors(a1, d1, "x", 0), LayerFactors(a2, d2[:, :2], "y", 77)],
                          total_dim=200)
    with pytest.raises(InputError, match="out must be"):
        pr.project_layers([LayerFactors(a1, d1, "x", 0)], total_dim=200, out=torch.zeros(6, 4, 41))
    with pytest.raises(InputError, match="kind='sjlt'"):
        Projection(40, "sjlt").project_layers([LayerFactors(a1, d1, "x", 0)], total_dim=200)


def test_featurizer_writes_blocks_in_place_into_one_result() -> None:
    # Featurizer.features writes every block after the first into its rows of the result: the same bits as
    # the blocks (projected kinds, the exact features, normalized or not), and transform(out=) checks out
    m = model_of("cnn")
    x = data("cnn", 11)
    for kind, proj in (("trntk", Projection(24, seed=2)), ("trntk", Projection(24, "sjlt", seed=2)),
                       ("pntk", Projection(24, "rademacher", seed=2)), ("entk", Projection(24, seed=2)),
                       ("trntk", Projection(24, "kronecker", seed=2)), ("trntk", None)):
        for norm in (False, True):
            cfg = tl.KernelConfig(kind=kind, projection=proj, normalize=norm, batch_size=4)
            with quiet(tl.Featurizer, m, cfg) as f:
                blocks = torch.cat([rows for _, rows in f.blocks(x)])
            with quiet(tl.Featurizer, m, cfg) as f:
                whole = f.features(x)
            assert torch.equal(whole, blocks), (kind, proj, norm)
    cfg = tl.KernelConfig(kind="trntk", projection=Projection(24, seed=2), batch_size=4)
    with quiet(tl.Featurizer, m, cfg) as f:
        blk = next(iter(tl.inputs.Source(x, 4, None, "inputs").blocks()))
        with pytest.raises(InputError, match="out must be"):
            f.transform(blk, out=torch.empty(4, 71))
        dest = torch.full((4, 72), float("nan"))
        assert f.transform(blk, out=dest) is dest and torch.isfinite(dest).all()
