"""Statistical and exactness tests of tangentlens.projection and the output probes (seeded, fast)."""

from __future__ import annotations

import hashlib
import math
import pickle

import pytest
import torch

import tangentlens as tl
from tangentlens.errors import InputError, UnknownKindError
from tangentlens.probes import output_probes, probe_variance
from tangentlens.projection import (
    FLAT_KINDS,
    KINDS,
    FidelityReport,
    Projection,
    cosine_gram,
    fidelity,
    fidelity_curve,
    loglog_slope,
    plot_fidelity,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is faster and immune to oversubscription on shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, generator=gen, dtype=torch.float64)
    b = 0.6 * a + torch.randn(p, generator=gen, dtype=torch.float64)
    return a, b


def _kron_inputs(n: int = 4, m: int = 2, t: int = 3, d_in: int = 7, d_out: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d_in, generator=gen, dtype=torch.float64)
    delta = torch.randn(n, m, t, d_out, generator=gen, dtype=torch.float64)
    grad = torch.einsum("nmto,nti->nmoi", delta, a).reshape(n, m, d_out * d_in)
    return a, delta, grad


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("kind", FLAT_KINDS + ("kronecker",))
def test_flat_projection_is_unbiased(kind: str) -> None:
    p, k, seeds = 300, 32, 200
    a, b = _pair(p)
    exact = float(a @ b)
    x = torch.stack([a, b])
    est = []
    for seed in range(seeds):
        phi = Projection(k, kind, seed=seed, tile=256 if kind == "srht" else None).project(x, 0, p)
        est.append(float(phi[0] @ phi[1]))
    est_t = torch.tensor(est, dtype=torch.float64)
    se = float(est_t.std()) / math.sqrt(seeds)
    assert abs(float(est_t.mean()) - exact) < 4.0 * se, (kind, est_t.mean(), exact, se)
    # JL variance scale: sd of one estimate ~ sqrt((|a|^2|b|^2 + <a,b>^2)/K) (dense Gaussian)
    jl_sd = math.sqrt((float(a @ a) * float(b @ b) + exact**2) / k)
    assert 0.5 * jl_sd < float(est_t.std()) < 1.5 * jl_sd


@pytest.mark.parametrize("fold", [False, True])
def test_kronecker_projection_is_unbiased(fold: bool) -> None:
    a, delta, grad = _kron_inputs(n=2, m=1, t=3, d_in=12, d_out=10)
    exact = float(grad[0, 0] @ grad[1, 0])
    est = []
    for seed in range(200):
        pr = Projection(24, "kronecker", seed=seed, fold=fold)
        phi = pr.project_kronecker(a, delta, "layer", d_in=12, d_out=10)
        est.append(float(phi[0, 0] @ phi[1, 0]))
    est_t = torch.tensor(est, dtype=torch.float64)
    se = float(est_t.std()) / math.sqrt(len(est))
    assert abs(float(est_t.mean()) - exact) < 4.0 * se


def test_reference_scale_is_unbiased_times_sqrt_k_over_p() -> None:
    p, k = 500, 64
    g = torch.randn(5, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for kind in FLAT_KINDS:
        unb = Projection(k, kind, seed=7, tile=128 if kind == "srht" else None).project(g, 0, p)
        ref = Projection(k, kind, seed=7, scale="reference", tile=128 if kind == "srht" else None)
        torch.testing.assert_close(ref.project(g, 0, p), unb * math.sqrt(k / p))
        assert ref.to_dict()["scale"] == "reference"
    # the reference Rademacher matrix has entries +-1/sqrt(P) (TRAK / the method's convention)
    r = Projection(k, "rademacher", seed=7, scale="reference").matrix(p)
    assert torch.allclose(r.abs(), torch.full_like(r, 1 / math.sqrt(p)))


# ----------------------------------------------------------------------------- 1/sqrt(K) scaling


@pytest.mark.parametrize("kind", FLAT_KINDS)
def test_error_shrinks_like_inverse_sqrt_k(kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    p = 2048
    x = torch.randn(24, p, generator=gen, dtype=torch.float64)
    x = x + 0.8 * x[torch.arange(24) // 4]  # correlated rows: cosines spread over [0, 0.9]
    exact = cosine_gram(x)
    reports = []
    for k in [16, 64, 256, 1024]:
        reps = [
            fidelity(cosine_gram(Projection(k, kind, seed=s).project(x, 0, p)), exact, k) for s in range(3)
        ]
        mean_abs = sum(r.mean_abs for r in reps) / len(reps)
        reports.append(FidelityReport(k, reps[0].n_entries, mean_abs, 0.0, 0.0, 0.0, k * mean_abs))
    slope = loglog_slope(reports)
    assert -0.65 < slope < -0.38, (kind, slope, [r.mean_abs for r in reports])


# ----------------------------------------------------------------------------- Kronecker oracle


@pytest.mark.parametrize(("k_in", "k_out"), [(3, 2), (7, 2), (3, 5), (None, None)])
def test_kronecker_equals_dense_kron_oracle(k_in: int | None, k_out: int | None) -> None:
    a, delta, grad = _kron_inputs()
    pr = Projection(8, "kronecker", seed=11)
    feats = pr.project_kronecker(a, delta, "conv1", d_in=7, d_out=5, k_in=k_in, k_out=k_out)
    ki, ko = pr.kronecker_dims(7, 5) if k_in is None else (k_in, k_out)
    assert feats.shape == (4, 2, ko * ki)
    pin, pout = pr.kronecker_factors("conv1", 7, 5, k_in=k_in, k_out=k_out)
    assert pin.shape == (ki, 7) and pout.shape == (ko, 5)
    if ki < 7:
        assert torch.allclose(pin.abs(), torch.full_like(pin, 1 / math.sqrt(ki)))
    else:
        assert torch.equal(pin, torch.eye(7, dtype=torch.float64))  # a side with k = d is exact
    oracle = grad @ torch.kron(pout, pin).T
    torch.testing.assert_close(feats, oracle, rtol=1e-10, atol=1e-10)
    # a different layer key gives a different (independent) sketch
    other = pr.project_kronecker(a, delta, "conv2", d_in=7, d_out=5, k_in=k_in, k_out=k_out)
    if ki < 7 or ko < 5:
        assert not torch.allclose(other, feats)


def test_kronecker_allocation_and_shapes() -> None:
    pr = Projection(256, "kronecker")
    assert pr.kronecker_dims(784, 100) == (16, 16)
    assert pr.kronecker_dims(10, 1000) == (10, 25)  # capped side is exact, budget moves over
    assert pr.kronecker_dims(8, 16) == (8, 16)  # small layer: identity, exact
    a = torch.randn(3, 10)
    d = torch.randn(3, 2, 1000)
    assert pr.project_kronecker(a, d, 0, d_in=10, d_out=1000).shape == (3, 2, 250)
    folded = Projection(256, "kronecker", fold=True).project_kronecker(a, d, 0, d_in=10, d_out=1000)
    assert folded.shape == (3, 2, 256)


def test_kronecker_rows_bit_identical_across_batch_sizes() -> None:
    a, delta, _ = _kron_inputs(n=37, m=3, t=5, d_in=40, d_out=30, seed=2)
    a, delta = a.float(), delta.float()
    for fold in (False, True):
        pr = Projection(64, "kronecker", seed=1, fold=fold)
        full = pr.project_kronecker(a, delta, "l", d_in=40, d_out=30)
        for bs in (1, 5, 16, 20):
            parts = [
                pr.project_kronecker(a[i : i + bs], delta[i : i + bs], "l", d_in=40, d_out=30)
                for i in range(0, 37, bs)
            ]
            assert torch.equal(torch.cat(parts), full), (fold, bs)


# ----------------------------------------------------------------------------- partitions, batches


def _random_partition(p: int, pieces: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, p, (pieces - 1,), generator=gen).tolist()))
    return [0, *cuts, p]


@pytest.mark.parametrize("kind", FLAT_KINDS + ("kronecker",))
def test_partition_of_columns_sums_to_whole(kind: str) -> None:
    p, k = 3000, 64
    tile = 256 if kind == "srht" else 100  # many tile boundaries inside the pieces
    pr = Projection(k, kind, seed=5, tile=tile)
    g = torch.randn(9, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = pr.project(g, 0, p)
    for seed in range(3):
        cuts = _random_partition(p, 12, seed) + [p]
        cuts = sorted(set(cuts[:-1] + [1, 2, 255, 256, 257]))  # tiny and boundary-aligned pieces
        cuts = [c for c in cuts if c < p] + [p]
        total = sum(pr.project(g[:, c0:c1], c0, p) for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True))
        torch.testing.assert_close(total, full, rtol=1e-10, atol=1e-10)
    # float32: same within float32 summation-order noise
    g32 = g.float()
    f32 = pr.project(g32, 0, p)
    t32 = pr.project(g32[:, :1234], 0, p) + pr.project(g32[:, 1234:], 1234, p)
    assert float((f32 - t32).abs().max()) <= 1e-6 * float(f32.abs().max()) * 10


@pytest.mark.parametrize("kind", FLAT_KINDS)
def test_rows_bit_identical_across_batch_sizes(kind: str) -> None:
    p = 2500
    g = torch.randn(70, p, generator=torch.Generator().manual_seed(4))
    pr = Projection(128, kind, seed=2)
    full = pr.project(g, 0, p)
    for bs in (1, 3, 8, 15, 16, 17, 33):
        rows = torch.cat([pr.project(g[i : i + bs], 0, p) for i in range(0, 70, bs)])
        assert torch.equal(rows, full), (kind, bs)
    # also per layer slice (what the engine does), with a cache-less twin
    twin = Projection(128, kind, seed=2, memory_budget_bytes=0)
    part = twin.project(g[:5, 100:900], 100, p)
    assert torch.equal(part, pr.project(g[:, 100:900], 100, p)[:5])


def test_matrix_is_a_function_of_seed_and_columns_only() -> None:
    for kind in FLAT_KINDS:
        pr = Projection(64, kind, seed=9, tile=128 if kind == "srht" else None)
        m32 = pr.matrix(300, dtype=torch.float32)
        torch.testing.assert_close(m32.double(), pr.matrix(300), rtol=1e-6, atol=1e-7)
        a = Projection(64, kind, seed=9, tile=128 if kind == "srht" else 50).matrix(300)
        b = Projection(64, kind, seed=9, tile=128 if kind == "srht" else 4096).matrix(300)
        c = Projection(64, kind, seed=10, tile=128 if kind == "srht" else None).matrix(300)
        if kind != "srht":  # srht's tile is part of its definition; dense tiles are not
            assert torch.equal(a, b), kind
        assert not torch.allclose(a, c), kind
        # the first 100 columns of a longer vector's matrix are the same columns
        longer = Projection(64, kind, seed=9, tile=128 if kind == "srht" else 50).matrix(500)
        torch.testing.assert_close(longer[:, :300], a)


def test_matrix_structure_per_kind() -> None:
    k, p = 64, 512
    rad = Projection(k, "rademacher", seed=1).matrix(p)
    assert torch.allclose(rad.abs(), torch.full_like(rad, 1 / math.sqrt(k)))
    assert abs(float(rad.mean())) < 4 / math.sqrt(k * p) / math.sqrt(k)
    col_corr = (rad.T @ rad - torch.eye(p, dtype=rad.dtype)).abs().max()
    assert float(col_corr) < 0.75  # no duplicated columns
    gau = Projection(k, "gaussian", seed=1).matrix(p) * math.sqrt(k)
    assert abs(float(gau.mean())) < 0.02 and abs(float(gau.var()) - 1) < 0.03
    assert abs(float((gau**4).mean()) - 3) < 0.15  # Gaussian kurtosis
    sj = Projection(k, "sjlt", seed=1, s=4).matrix(p)
    nnz = (sj != 0).sum(0)
    assert torch.equal(nnz, torch.full_like(nnz, 4))
    assert torch.allclose(sj[sj != 0].abs(), torch.full_like(sj[sj != 0], 0.5))
    sr = Projection(k, "srht", seed=1, tile=256).matrix(p)
    assert torch.allclose(sr.abs(), torch.full_like(sr, 1 / math.sqrt(k)))
    for t in range(2):  # rows of one tile are orthogonal: S H D (S H D)^T = (T / K) I after scaling
        block = sr[:, 256 * t : 256 * (t + 1)]
        torch.testing.assert_close(block @ block.T, torch.eye(k, dtype=sr.dtype) * 256 / k)


def test_to_dict_roundtrip_pickle_and_equality() -> None:
    for kind in KINDS:
        pr = Projection(48, kind, seed=4, scale="reference", s=3, fold=True)
        d = pr.to_dict()
        assert d["kind"] == kind and d["scale"] == "reference" and d["seed"] == 4
        again = Projection.from_dict(d)
        assert again == pr
        clone = pickle.loads(pickle.dumps(pr))
        g = torch.randn(3, 300, dtype=torch.float64)
        torch.testing.assert_close(clone.project(g, 0, 300), pr.project(g, 0, 300))
        torch.testing.assert_close(again.project(g, 0, 300), pr.project(g, 0, 300))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def test_matrices_are_those_of_generator_v1() -> None:
    """The reproducibility contract: a stored to_dict() rebuilds the same matrix bit for bit (these
    entries are exact: +-1/sqrt(K), sums of +-1 and zeros). Gaussian draws come from torch.randn and
    are left out. A change here needs a new generator version."""
    golden = {"rademacher": ("f64166b0836e9c41", {}), "sjlt": ("84059167ddf5b0e2", {"s": 3}),
              "srht": ("99684a607c9746f7", {"tile": 128}), "kronecker": ("df94a255484223b7", {"fold": True})}
    for kind, (want, kw) in golden.items():
        pr = Projection(40, kind, seed=3, **kw)
        assert pr.to_dict()["generator"] == "tangentlens-mix32-v1"
        assert _digest(Projection.from_dict(pr.to_dict()).matrix(300)) == want, kind
    pin, pout = Projection(16, "kronecker", seed=3).kronecker_factors("layer", 7, 9)
    assert (pin.shape, pout.shape) == ((4, 7), (4, 9))
    assert (_digest(pin), _digest(pout)) == ("4b88bd3da2dda460", "87a0d3ec257f849f")
    assert _digest(output_probes(10, 3, seed=4, dtype=torch.float64)) == "5a436ff3062237dc"
    fa, fb = Projection(40, "khatri_rao", seed=3).khatri_rao_factors("fc1", 7, 5)
    assert (fa.shape, fb.shape) == ((40, 5), (40, 8))
    assert (_digest(fa), _digest(fb)) == ("1a56e927cda03eb9", "2ec0da31abae84f7")
    assert Projection(16, "kronecker", seed=3).to_dict() == {
        "kind": "kronecker", "dim": 16, "seed": 3, "scale": "unbiased",
        "expectation": "<phi(a),phi(b)> ~ <a,b>", "dtype": None, "generator": "tangentlens-mix32-v1",
        "s": 2, "kron_dim": 16, "fold": False, "fallback": "sjlt",
    }
    assert tl.output_probes is output_probes


def test_uses_factors_and_kronecker_only_calls() -> None:
    for kind in ("kronecker", "khatri_rao", "rademacher", "gaussian"):  # may take Linear/Conv factors
        assert Projection(8, kind).uses_factors
    assert Projection(8, "khatri_rao").takes_factors(784, 100, 50, 1)  # its definition
    assert Projection(8).kind == "khatri_rao"  # the default: the fastest kind at any N
    dense = Projection(8, "rademacher")
    assert dense.takes_factors(784, 100, 1, 10)  # dense: T = 1 and several probes
    assert not dense.takes_factors(784, 100, 1, 1)  # one probe: no saving
    assert not dense.takes_factors(25, 16, 576, 10)  # many positions: materialize
    a, d = torch.randn(2, 4), torch.randn(2, 1, 3)
    for kind in ("sjlt", "srht", "kronecker"):
        assert not Projection(8, kind).takes_factors(4, 3, 1, 10)
        with pytest.raises(InputError, match="project_layer"):
            Projection(8, kind).project_layer(a, d, "l", weight_offset=0, total_dim=12)
    for kind in FLAT_KINDS:
        pr = Projection(8, kind)
        assert pr.uses_factors == (kind in ("rademacher", "gaussian"))
        with pytest.raises(InputError, match="kind='kronecker'"):
            pr.project_kronecker(torch.randn(2, 4), torch.randn(2, 1, 3), 0, d_in=4, d_out=3)
        with pytest.raises(InputError, match="kind='kronecker'"):
            pr.kronecker_dims(4, 3)


def test_dtype_option_and_cache_budget() -> None:
    g = torch.randn(20, 700)
    pr64 = Projection(32, "rademacher", dtype=torch.float64)
    assert pr64.project(g, 0, 700).dtype == torch.float64
    big = Projection(32, "gaussian", seed=3)
    none = Projection(32, "gaussian", seed=3, memory_budget_bytes=0)
    assert torch.equal(big.project(g, 0, 700), none.project(g, 0, 700))
    assert big.cache_bytes > 0 and none.cache_bytes == 0
    big.clear_cache()
    assert big.cache_bytes == 0


@pytest.mark.parametrize(
    ("budget", "tier"), [(10**6, "full"), (30000, "int8"), (5000, "bits"), (100, "none")]
)
def test_rademacher_cache_tiers_give_identical_results(budget: int, tier: str) -> None:
    g = torch.randn(40, 700, generator=torch.Generator().manual_seed(0))
    ref = Projection(32, "rademacher", seed=3, memory_budget_bytes=0, tile=64)
    pr = Projection(32, "rademacher", seed=3, memory_budget_bytes=budget, tile=64)
    for _ in range(2):  # first call fills the cache, second reads it
        got = pr.project(g[:, 100:], 100, 700) + pr.project(g[:, :100], 0, 700)
        want = ref.project(g[:, 100:], 100, 700) + ref.project(g[:, :100], 0, 700)
        assert torch.equal(got, want)
    assert pr.cache_form(700, device=g.device, dtype=g.dtype) == tier
    assert pr.cache_bytes <= budget
    assert Projection(32, "sjlt").cache_form(700) is None  # no dense tiles to hold


# ----------------------------------------------------------------------------- output probes


def test_output_probes_exact_and_pseudo() -> None:
    assert torch.equal(output_probes(10, 10), torch.eye(10))
    assert torch.equal(output_probes(10, "trace"), torch.eye(10))
    ps = output_probes(4, "pseudo", dtype=torch.float64)
    assert ps.shape == (1, 4)
    gen = torch.Generator().manual_seed(0)
    jx = torch.randn(4, 30, generator=gen, dtype=torch.float64)  # J(x): C x P
    jy = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    pntk = float(jx.sum(0) @ jy.sum(0)) / 4
    assert math.isclose(float((ps @ jx) @ (ps @ jy).T), pntk, rel_tol=1e-12)
    trace = float((jx * jy).sum())
    one_hot = output_probes(4, 4, dtype=torch.float64)
    assert math.isclose(float(((one_hot @ jx) * (one_hot @ jy)).sum()), trace, rel_tol=1e-12)


@pytest.mark.parametrize("m", [1, 3, 6])
def test_sketched_trace_is_unbiased_with_documented_variance(m: int) -> None:
    c = 10
    gen = torch.Generator().manual_seed(1)
    jx = torch.randn(c, 40, generator=gen, dtype=torch.float64)
    jy = jx + 0.7 * torch.randn(c, 40, generator=gen, dtype=torch.float64)
    theta = jx @ jy.T
    exact = float(torch.trace(theta))
    est = []
    for seed in range(400):
        v = output_probes(c, m, seed=seed, dtype=torch.float64)
        assert v.shape == (m, c)
        est.append(float(((v @ jx) * (v @ jy)).sum()))
    est_t = torch.tensor(est, dtype=torch.float64)
    var = float(probe_variance(theta, m))
    assert abs(float(est_t.mean()) - exact) < 4 * math.sqrt(var / len(est))
    assert 0.8 * var < float(est_t.var()) < 1.2 * var
    assert float(probe_variance(theta, c)) == 0.0


# ----------------------------------------------------------------------------- fidelity tools


def test_fidelity_statistics_and_plot(tmp_path) -> None:
    exact = torch.eye(4, dtype=torch.float64) + 0.5 * (1 - torch.eye(4, dtype=torch.float64))
    noise = torch.tensor(
        [
            [0, 0.01, -0.02, 0.03],
            [0.01, 0, 0.04, -0.01],
            [-0.02, 0.04, 0, 0.02],
            [0.03, -0.01, 0.02, 0],
        ],
        dtype=torch.float64,
    )
    rep = fidelity(exact + noise + 0.3 * torch.eye(4), exact, dim=100)  # diagonal is ignored
    r = noise[~torch.eye(4, dtype=torch.bool)].abs()
    assert rep.n_entries == 12 and math.isclose(rep.mean_abs, float(r.mean()))
    assert math.isclose(rep.max_abs, 0.04) and math.isclose(rep.exp_cdf_a, 100 * float(r.mean()))
    assert math.isclose(rep.rel_frobenius, float(r.norm()) / (0.5 * math.sqrt(12)))
    assert len(rep.quantiles) == 101 and rep.to_dict()["K"] == 100

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 600, generator=gen, dtype=torch.float64)
    x = x + x[torch.arange(16) // 4]
    ex = cosine_gram(x)
    reps = fidelity_curve(lambda k: cosine_gram(Projection(k, seed=1).project(x, 0, 600)), ex, [256, 32, 64])
    assert [r.K for r in reps] == [32, 64, 256]
    assert reps[0].mean_abs > reps[-1].mean_abs
    out = plot_fidelity({"rademacher": reps, "sjlt": reps[:2]}, str(tmp_path / "fid.png"), title="test")
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError):
        fidelity(ex, ex[:3])


def test_cosine_gram_normalizes_after_summing_over_classes() -> None:
    feats = torch.randn(5, 3, 8, dtype=torch.float64)
    gram = cosine_gram(feats)
    flat = feats.reshape(5, -1)
    torch.testing.assert_close(
        gram,
        torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T,
    )
    torch.testing.assert_close(torch.diagonal(gram), torch.ones(5, dtype=torch.float64))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "8", None])
def test_bad_dim(dim: object) -> None:
    with pytest.raises(InputError):
        Projection(dim)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [1.5, True, "1", None])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(InputError, match="seed"):
        Projection(8, seed=seed)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="seed"):
        output_probes(5, 2, seed=seed)  # type: ignore[arg-type]


def test_bad_kind_scale_and_options() -> None:
    with pytest.raises(UnknownKindError, match="rademacher"):
        Projection(8, "fastjl")
    with pytest.raises(UnknownKindError):
        Projection(8, scale="trak")
    with pytest.raises(UnknownKindError):
        Projection(8, "kronecker", fallback="kronecker")
    with pytest.raises(InputError, match="s <= dim"):
        Projection(4, "sjlt", s=8)
    with pytest.raises(InputError, match="tile"):
        Projection(4096, "srht", tile=1024)
    with pytest.raises(InputError, match="power of two"):
        Projection(8, "srht", tile=100)
    with pytest.raises(InputError):
        Projection(8, dtype=torch.int64)


def test_bad_project_inputs() -> None:
    pr = Projection(16)
    with pytest.raises(InputError, match="2-D"):
        pr.project(torch.randn(10))
    with pytest.raises(InputError, match="floating"):
        pr.project(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(InputError, match="total_dim"):
        pr.project(torch.randn(2, 10), offset=5, total_dim=12)
    with pytest.raises(InputError, match="srht"):
        Projection(64, "srht").project(torch.randn(2, 40), 0, 40)  # K > P makes no sense here
    assert Projection(64).project(torch.randn(2, 40), 0, 40).shape == (2, 64)  # dense: allowed
    kr = Projection(16, "kronecker")
    with pytest.raises(InputError, match="k_in"):
        kr.project_kronecker(torch.randn(2, 4), torch.randn(2, 1, 3), 0, d_in=4, d_out=3, k_in=5)
    with pytest.raises(InputError, match="shape"):
        kr.project_kronecker(torch.randn(2, 4), torch.randn(2, 1, 3), 0, d_in=5, d_out=3)
    with pytest.raises(InputError, match="total_dim"):
        Projection(16, "kronecker", scale="reference").project_kronecker(
            torch.randn(2, 4), torch.randn(2, 1, 3), 0, d_in=4, d_out=3
        )
    with pytest.raises(InputError, match="m <= C"):
        output_probes(3, 5)
    with pytest.raises(UnknownKindError):
        output_probes(3, "all")
