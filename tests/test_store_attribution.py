"""Counterfactual attribution streamed from margin feature stores: equal to the in-memory primal form,
top-k equal to the full scores' top-k, ensembles, q from logits or a streamed forward pass, the errors, and
peak memory that does not grow with N."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tangentlens as tl
from tangentlens.attribution_core import RunningTop
from tangentlens.errors import InputError, NonFiniteError, StoreMismatchError

from .models import cnn, data, mlp, quiet, rel

ROOT = Path(__file__).resolve().parents[1]
P = tl.Projection(64, seed=2)
F64 = dict(kind="margin", projection=P, dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def split(arch: str = "mlp", n: int = 23, t: int = 5):
    return data(arch, n, 0), torch.arange(n) % 3, data(arch, t, 1), (torch.arange(t) + 1) % 3


@functools.cache
def case(root: str, arch: str = "mlp"):
    """A model, its train / test split, their margin stores (float64, chunks of 7 rows) and q."""
    m = mlp() if arch == "mlp" else cnn()
    x, y, xt, yt = split(arch)
    tr = quiet(tl.featurize, m, x, Path(root) / f"{arch}-train", labels=y, chunk_rows=7, **F64)
    te = quiet(tl.featurize, m, xt, Path(root) / f"{arch}-test", labels=yt, chunk_rows=7, **F64)
    q = tl.attribution_q_from_model(m, x, labels=y, dtype=torch.float64, batch_size=8)
    return m, x, y, xt, yt, tr, te, q


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("attr"))


# ------------------------------------------------------------------------------ equal to tl.attribute
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_equals_in_memory_primal_attribute(root, arch):
    m, x, y, xt, yt, tr, te, q = case(root, arch)
    ref = quiet(tl.attribute, m, x, xt, labels=y, test_labels=yt, projection=P, dtype=torch.float64)
    S = tl.attribute_from_store(tr, te, q=q, block_rows=5)  # blocks straddle the 7-row chunks
    assert S.shape == (5, 23) and S.dtype == torch.float64
    assert rel(S, ref) <= 1e-8
    # a path for the store and an in-memory (T, D) array / tensor for the targets give the same
    assert rel(tl.attribute_from_store(str(tr.path), te[:], q=q.numpy()), ref) <= 1e-8
    assert rel(tl.attribute_from_store(tr.path, torch.from_numpy(te[:]), q=q), ref) <= 1e-8


def test_q_from_logits_equals_q_from_a_streamed_forward_pass(root):
    m, x, y, *_, q = case(root)
    z = _logits64(m, x)
    q2 = tl.attribution_q(z, y)
    assert q2.dtype == torch.float64 and torch.allclose(q, q2, rtol=1e-12, atol=0)
    torch.testing.assert_close(tl.attribution_q(z.numpy(), y.numpy()), q2)
    # labels from (x, y) pairs; "predicted" = the argmax's own q = 1 − max p
    torch.testing.assert_close(tl.attribution_q_from_model(m, (x, y), dtype=torch.float64), q)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    torch.testing.assert_close(tl.attribution_q_from_model(m, loader, dtype=torch.float64), q)
    qp = tl.attribution_q(z, "predicted")
    torch.testing.assert_close(qp, 1 - torch.softmax(z, 1).max(1).values)
    torch.testing.assert_close(tl.attribution_q_from_model(m, x, labels="predicted", dtype=torch.float64), qp)


def _logits64(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    with torch.no_grad():
        return copy.deepcopy(m).eval().double()(x.double())


def test_q_of_one_logit_is_one_minus_the_labels_probability():
    z = torch.tensor([2.0, -1.0, 0.5])
    y = torch.tensor([1, 1, 0])
    p1 = torch.sigmoid(z.double())
    torch.testing.assert_close(tl.attribution_q(z, y), torch.where(y == 1, 1 - p1, p1))


def test_default_lam_is_tl_attributes(root):
    m, x, y, xt, yt, tr, te, q = case(root)
    F = torch.from_numpy(tr[:])
    lam = float((F * F).sum()) / tr.n  # DEFAULT_LAM_SCALE · tr(ΦᵀΦ)/N
    S = tl.attribute_from_store(tr, te, q=q)
    assert rel(S, tl.attribute_from_store(tr, te, q=q, lam=lam)) <= 1e-12
    assert rel(S, tl.attribute_from_store(tr, te, q=q, lam=10 * lam)) > 1e-3  # λ matters
    ref = tl.attribute(m, x, xt, labels=y, test_labels=yt, projection=P, dtype=torch.float64, lam=0.37)
    assert rel(tl.attribute_from_store(tr, te, q=q, lam=0.37), ref) <= 1e-8


def test_ensemble_is_the_mean_of_the_members(root):
    m1, x, y, xt, yt, tr1, te1, q1 = case(root)
    torch.manual_seed(5)
    m2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))
    tr2 = tl.featurize(m2, x, Path(root) / "ens-train", labels=y, chunk_rows=6, **F64)
    te2 = tl.featurize(m2, xt, Path(root) / "ens-test", labels=yt, chunk_rows=6, **F64)
    q2 = tl.attribution_q(_logits64(m2, x), y)
    ref = tl.attribute([m1, m2], x, xt, labels=y, test_labels=yt, projection=P, dtype=torch.float64)
    S = tl.attribute_from_store([tr1, tr2], [te1, te2], q=[q1, q2], block_rows=4)
    assert rel(S, ref) <= 1e-8
    assert rel(tl.attribute_from_store([tr1, tr2], [te1, te2], q=torch.stack([q1, q2])), ref) <= 1e-8
    top = tl.top_attributions_from_store([tr1, tr2], [te1, te2], q=[q1, q2], k=3, block_rows=4)
    _same_top(top, tl.top_attributions(S, 3))


# ------------------------------------------------------------------------------------------- top-k
def _same_top(a: tl.TopAttributions, b: tl.TopAttributions) -> None:
    for f in ("proponents", "proponent_scores", "opponents", "opponent_scores"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("block_rows", [2, 7, 100])
def test_top_k_equals_the_full_scores_top_k(root, block_rows):
    *_, tr, te, q = case(root)
    S = tl.attribute_from_store(tr, te, q=q, block_rows=block_rows)
    for k in (1, 3, 23, 50):
        top = tl.top_attributions_from_store(tr, te, q=q, k=k, block_rows=block_rows)
        assert top.proponents.shape == (5, min(k, 23))
        _same_top(top, tl.top_attributions(S, k))


def test_top_k_breaks_ties_by_the_lower_index(root):
    # a zero target scores 0 against every training point: all ties, the first k indices win
    *_, tr, te, q = case(root)
    Ft = np.concatenate([te[:2], np.zeros((1, te[:].shape[1]))])
    top = tl.top_attributions_from_store(tr, Ft, q=q, k=4, block_rows=3)
    assert top.proponents[2].tolist() == [0, 1, 2, 3] and top.opponents[2].tolist() == [0, 1, 2, 3]
    _same_top(top, tl.top_attributions(tl.attribute_from_store(tr, Ft, q=q, block_rows=3), 4))


@pytest.mark.parametrize("block", [1, 2, 5, 13, 40])
def test_running_top_k_with_many_ties_equals_top_attributions(block):
    # scores drawn from 5 values: ties everywhere, inside blocks and across them
    S = torch.from_numpy(np.random.default_rng(block).integers(-2, 3, size=(6, 40)).astype(np.float64))
    for k in (1, 3, 7, 40):
        top = RunningTop(6, k, 40)
        for s in range(0, 40, block):
            top.update(s, S[:, s : s + block])
        _same_top(top.result(), tl.top_attributions(S, k))


# ------------------------------------------------------------------------------------------ errors
def test_a_store_of_another_kind_is_refused(root, tmp_path):
    *_, tr, te, q = case(root)
    other = tl.featurize(mlp(), split()[0], tmp_path / "pntk", kind="pntk", projection=P, chunk_rows=7)
    with pytest.raises(StoreMismatchError, match=r"kind='pntk'.*kind='margin'"):
        tl.attribute_from_store(other, te, q=q)
    with pytest.raises(StoreMismatchError, match="needs margin features"):
        tl.attribute_from_store(tr, other, q=q)


def test_test_features_of_another_dimension_projection_or_model_are_refused(root, tmp_path):
    m, x, y, xt, yt, tr, te, q = case(root)
    d32 = tl.featurize(m, xt, tmp_path / "d32", labels=yt, **{**F64, "projection": tl.Projection(32, seed=2)})
    with pytest.raises(StoreMismatchError, match="D = 32.*D = 64.*same model, projection"):
        tl.attribute_from_store(tr, d32, q=q)
    P9 = tl.Projection(64, seed=9)
    seed = tl.featurize(m, xt, tmp_path / "seed", labels=yt, **{**F64, "projection": P9})
    with pytest.raises(StoreMismatchError, match="projection.seed = 9"):
        tl.attribute_from_store(tr, seed, q=q)
    torch.manual_seed(3)
    m2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))
    other = tl.featurize(m2, xt, tmp_path / "model", labels=yt, **F64)
    with pytest.raises(StoreMismatchError, match="another model"):
        tl.attribute_from_store(tr, other, q=q)
    with pytest.raises(InputError, match="D = 64"):
        tl.attribute_from_store(tr, np.zeros((3, 32)), q=q)


def test_q_of_the_wrong_length_or_missing_is_refused(root):
    *_, tr, te, q = case(root)
    with pytest.raises(InputError, match=r"N = 23 training points; compute q on the same training data"):
        tl.attribute_from_store(tr, te, q=q[:-1])
    with pytest.raises(InputError, match="q is required"):
        tl.top_attributions_from_store(tr, te, q=None)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteError, match="q for train"):
        tl.attribute_from_store(tr, te, q=torch.full((23,), float("nan")))
    with pytest.raises(InputError, match="one \\(N,\\) q per ensemble member"):
        tl.attribute_from_store([tr, tr], [te, te], q=q)
    with pytest.raises(InputError, match="one test store or \\(T, D\\) array per ensemble member"):
        tl.attribute_from_store([tr, tr], [te], q=[q, q])
    with pytest.raises(InputError, match="single entry"):
        tl.attribute_from_store([tr, tr], te, q=[q, q])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lam": 0}, "lam must be"), ({"lam": float("nan")}, "lam must be"), ({"block_rows": 0}, "block_rows"),
     ({"block_rows": 2.5}, "block_rows"), ({"k": 0}, "k must be")],
)
def test_bad_options(root, kwargs, match):
    *_, tr, te, q = case(root)
    with pytest.raises(InputError, match=match):
        tl.top_attributions_from_store(tr, te, q=q, **kwargs)


def test_incomplete_or_missing_stores_and_labels(root, tmp_path):
    m, x, y, xt, yt, tr, te, q = case(root)
    with pytest.raises(InputError, match="No feature store"):
        tl.attribute_from_store(tmp_path / "nothing", te, q=q)
    with pytest.raises(InputError, match="FeatureStore or the path"):
        tl.attribute_from_store(42, te, q=q)  # type: ignore[arg-type]
    part = tl.FeatureStore.create(tmp_path / "part", config=tr.config, n=23, chunk_rows=7,
                                  model_fingerprint="id:m", data_fingerprint="id:d")
    part.allocate((64,), np.float64)
    part.write_chunk(0, tr[0:7])
    with pytest.raises(InputError, match="incomplete"):
        tl.attribute_from_store(part, te, q=q)
    m.train()
    with pytest.raises(InputError, match="needs the labels of data"):
        tl.attribution_q_from_model(m, x)
    tl.attribution_q_from_model(m, x, labels=y)
    assert m.training  # the caller's mode is restored
    with pytest.raises(InputError, match="needs labels"):
        tl.attribution_q(torch.zeros(3, 3), None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="2 entries but logits has 3 rows"):
        tl.attribution_q(torch.zeros(3, 3), [0, 1])
    with pytest.raises(InputError, match="lie in"):
        tl.attribution_q(torch.zeros(3, 3), [0, 1, 5])


# ----------------------------------------------------------------------------------------- memory
_CHILD = textwrap.dedent("""
    import sys
    import numpy as np, torch
    torch.set_num_threads(1)
    import tangentlens as tl
    def peak():  # the high-water mark of the resident set, reset below
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    path, T = sys.argv[1], int(sys.argv[2])
    fs, small = tl.FeatureStore.open(path), tl.FeatureStore.open(path + "-small")
    rng = np.random.default_rng(1)
    Ft = rng.standard_normal((T, fs.row_shape[0]))
    q = rng.uniform(size=fs.n)
    tl.top_attributions_from_store(small, Ft, q=q[: small.n], k=10)  # warm-up: same code paths, small N
    reset()
    base = peak()
    top = tl.top_attributions_from_store(fs, Ft, q=q, k=10)
    grown_top = peak() - base
    reset()
    base = peak()
    S = tl.attribute_from_store(fs, Ft, q=q)
    grown_full = peak() - base
    assert torch.equal(top.proponents, tl.top_attributions(S, 10).proponents)
    print(grown_top, grown_full)
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
def test_top_k_peak_memory_does_not_grow_with_n(tmp_path):
    # N = 20,000 random margin rows (D = 128) and T = 1,000 targets: the (T, N) scores are 160 MB; top-k
    # holds one block of rows and a (T, block) slice of scores (block = 2^18 / T -> 250 rows)
    N, D, T = 20_000, 128, 1_000
    rng = np.random.default_rng(0)
    cfg = tl.KernelConfig(kind="margin")
    tl.FeatureStore.from_array(tmp_path / "big", rng.standard_normal((N, D), dtype=np.float32), config=cfg,
                               model_id="random", chunk_rows=250)
    tl.FeatureStore.from_array(tmp_path / "big-small", rng.standard_normal((1_000, D), dtype=np.float32),
                               config=cfg, model_id="random", chunk_rows=250)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "big"), str(T)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    grown_top, grown_full = map(int, out.stdout.split()[-2:])
    full = T * N * 8
    assert grown_full > 0.9 * full, f"the full scores grew the peak by only {grown_full / 2**20:.1f} MiB"
    assert grown_top < 0.2 * full, f"top-k grew the peak by {grown_top / 2**20:.1f} MiB"
