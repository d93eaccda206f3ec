"""Feature and kernel stores on Zarr: round trip, reopening checks, resume (a real SIGKILL), kernels out of
core against the in-memory kernels, bounded memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tangentlens as tl
from tangentlens.errors import InputError, MemoryBudgetWarning, NonFiniteError, StoreMismatchError
from tangentlens.store import FeatureStore, KernelStore, featurize, kernel_from_store

from .models import cnn, mlp
from .store_child import build

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "store_child.py"
PROJ = dict(kind="pntk", normalize=True, projection=tl.Projection(48, seed=3))


pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n: int = 40, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


class _Stop(Exception):
    pass


def _stop_after(k: int):
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) > k:  # the first call reports the chunks already done
            raise _Stop

    return progress


# ------------------------------------------------------------------------------------ feature stores
def test_round_trip(tmp_path):
    m, x = mlp(), _x()
    fs = featurize(m, x, tmp_path / "s", chunk_rows=16, **PROJ)
    back = FeatureStore.open(tmp_path / "s")
    assert back.complete and len(back) == 40 and back.n_chunks == 3 and back.row_shape == (48,)
    assert back.features.shape == (40, 48) and back.features.chunks == (16, 48)
    assert back.dtype == np.float32 and back.sqnorms.dtype == np.float64
    man = back.manifest
    assert man["status"] == "complete" and man["chunk_rows"] == 16 and man["block_size"] == fs.block_size
    assert set(man["versions"]) >= {"tangentlens", "torch", "zarr"}
    cfg = tl.KernelConfig(**PROJ)
    assert back.config == cfg and man["config_fingerprint"] == cfg.fingerprint()
    assert man["model_fingerprint"].startswith("sha256:") and man["data_fingerprint"].startswith("sha256:")
    raw = tl.features(m, x, kind="pntk", projection=PROJ["projection"]).numpy()  # rows are stored raw
    np.testing.assert_allclose(back[:], raw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(back.sqnorms[:], (raw.astype(np.float64) ** 2).sum(1), rtol=1e-6)
    starts, blocks = zip(*back.iter_blocks())
    assert starts == (0, 16, 32) and _bytes_equal(np.concatenate(blocks), back[:])
    unit = np.concatenate([b for _, b in back.iter_blocks(7, normalized=True)])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)


def test_a_dataloader_is_rechunked_to_the_same_rows(tmp_path):
    m, x = mlp(), _x(37)
    a = featurize(m, x, tmp_path / "a", chunk_rows=8, **PROJ)
    loader = DataLoader(TensorDataset(x), batch_size=5, shuffle=False)
    b = featurize(m, loader, tmp_path / "b", chunk_rows=8, **PROJ)
    assert b.manifest["data_fingerprint"] == a.manifest["data_fingerprint"]
    np.testing.assert_allclose(b[:], a[:], rtol=1e-6, atol=1e-7)


def test_a_finished_store_is_reused_without_recomputing(tmp_path):
    m, x = mlp(), _x()
    featurize(m, x, tmp_path / "s", chunk_rows=16, **PROJ)
    calls = []
    again = featurize(m, x, tmp_path / "s", progress=lambda d, t: calls.append((d, t)), **PROJ)
    assert again.complete and calls == []
    with pytest.raises(InputError, match="resume=True"):
        featurize(m, x, tmp_path / "s", resume=False, **PROJ)


def _changed_model() -> nn.Module:
    m = mlp()
    with torch.no_grad():
        m[2].weight[0, 0] += 1e-3  # a layer that is differentiated and one that is not both count
    return m


@pytest.mark.parametrize("change, field", [
    (dict(projection=tl.Projection(48, seed=4)), "config.projection.seed"),
    (dict(kind="trntk"), "config.kind"),
    (dict(normalize=False), "config.normalize"),
    (dict(model=_changed_model()), "model_fingerprint"),
    (dict(x=_x(seed=1)), "data_fingerprint"),
    (dict(x=_x(41)), "n"),
    (dict(chunk_rows=8), "chunk_rows"),
    (dict(model_id="v2"), "model_fingerprint"),
])
def test_reopening_with_other_settings_names_the_field(tmp_path, change, field):
    m, x = mlp(), _x()
    featurize(m, x, tmp_path / "s", chunk_rows=16, **PROJ)
    opts = {**PROJ, "chunk_rows": 16}
    model, data = change.pop("model", m), change.pop("x", x)
    opts.update(change)
    with pytest.raises(StoreMismatchError, match=rf"different {field}: stored .+, this call "):
        featurize(model, data, tmp_path / "s", **opts)


def test_execution_settings_do_not_count(tmp_path):
    m, x = mlp(), _x()
    featurize(m, x, tmp_path / "s", chunk_rows=16, **PROJ)
    featurize(m, x, tmp_path / "s", batch_size=7, memory_budget=10**7, **PROJ)  # no error


def test_labels_are_part_of_the_data_for_the_label_kinds(tmp_path):
    m, x = mlp(), _x()
    y = torch.arange(40) % 3
    opts = dict(kind="margin", projection=tl.Projection(32, seed=1), chunk_rows=16)
    featurize(m, x, tmp_path / "s", labels=y, **opts)
    with pytest.raises(StoreMismatchError, match="data_fingerprint"):
        featurize(m, x, tmp_path / "s", labels=y.flip(0), **opts)
    with pytest.raises(StoreMismatchError, match="labels: stored true, this call predicted"):
        featurize(m, x, tmp_path / "s", labels="predicted", **opts)


def test_model_id_names_the_weights_instead_of_hashing_them(tmp_path):
    m, x = mlp(), _x()
    fs = featurize(m, x, tmp_path / "s", model_id="ckpt-1", chunk_rows=16, **PROJ)
    assert fs.manifest["model_fingerprint"] == "id:ckpt-1"
    featurize(_changed_model(), x, tmp_path / "s", model_id="ckpt-1", **PROJ)  # the caller vouches


def test_an_interrupted_store_is_never_taken_for_a_complete_one(tmp_path):
    m, x = mlp(), _x()
    with pytest.raises(_Stop):
        featurize(m, x, tmp_path / "s", chunk_rows=8, progress=_stop_after(2), **PROJ)
    with pytest.raises(InputError, match=r"incomplete: its run stopped after 2 of 5 chunks.*tl\.featurize"):
        FeatureStore.open(tmp_path / "s")
    part = FeatureStore.open(tmp_path / "s", allow_incomplete=True)
    assert not part.complete and part.pending() == [2, 3, 4] and part.manifest["status"] == "running"
    with pytest.raises(InputError, match="incomplete"):
        kernel_from_store(part, out=tmp_path / "k")
    calls = []
    fs = featurize(m, x, tmp_path / "s", progress=lambda d, t: calls.append(d), **PROJ)
    assert calls == [2, 3, 4, 5] and fs.complete
    ref = featurize(m, x, tmp_path / "ref", chunk_rows=8, **PROJ)
    assert _bytes_equal(fs[:], ref[:]) and _bytes_equal(fs.sqnorms[:], ref.sqnorms[:])


def test_a_recorded_block_size_must_not_change(tmp_path):
    m, x = mlp(), _x()
    with pytest.raises(_Stop):
        featurize(m, x, tmp_path / "s", chunk_rows=8, block_size=4, progress=_stop_after(1), **PROJ)
    with pytest.raises(StoreMismatchError, match="block_size: stored 4, this call 2"):
        featurize(m, x, tmp_path / "s", block_size=2, **PROJ)
    assert featurize(m, x, tmp_path / "s", **PROJ).block_size == 4


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    model, x, options = build()
    path = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, str(CHILD), "featurize", str(path), "0.15"], cwd=ROOT, env=env,
                             stderr=subprocess.PIPE)
    done = 0
    deadline = time.monotonic() + 120
    while done < 3:
        assert child.poll() is None, child.stderr.read().decode()[-2000:] if child.stderr else ""
        assert time.monotonic() < deadline, "the child made no progress"
        time.sleep(0.01)
        try:
            done = int(FeatureStore.open(path, allow_incomplete=True).done().sum())
        except Exception:  # noqa: BLE001 - the store is being created
            done = 0
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()  # type: ignore[union-attr]
    assert child.returncode == -signal.SIGKILL
    part = FeatureStore.open(path, allow_incomplete=True)
    killed_at = int(part.done().sum())
    assert 3 <= killed_at < part.n_chunks and not part.complete
    assert part.block_size is not None  # planned under the child's memory budget, recorded with chunk 0
    calls = []
    resume_opts = {k: v for k, v in options.items() if k != "memory_budget"}  # the recorded size is reused
    fs = featurize(model, x, path, progress=lambda d, t: calls.append(d), **resume_opts)
    assert calls == list(range(killed_at, part.n_chunks + 1))  # only the chunks not done are computed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)
        ref = featurize(model, x, tmp_path / "ref", **options)
    assert ref.block_size == fs.block_size == part.block_size
    assert _bytes_equal(fs[:], ref[:]) and _bytes_equal(fs.sqnorms[:], ref.sqnorms[:])


def test_bad_inputs(tmp_path):
    m, x = mlp(), _x()
    with pytest.raises(InputError, match="chunk_rows"):
        featurize(m, x, tmp_path / "a", chunk_rows=0, **PROJ)
    with pytest.raises(InputError, match="model_id"):
        featurize(m, x, tmp_path / "a", model_id="", **PROJ)
    with pytest.raises(InputError, match="directory path"):
        featurize(m, x, None, **PROJ)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("not a store")
    with pytest.raises(InputError, match="not an empty directory"):
        featurize(m, x, tmp_path / "file", **PROJ)
    with pytest.raises(InputError, match="No feature store"):
        FeatureStore.open(tmp_path / "missing")
    with pytest.raises(InputError, match="labels"):
        featurize(m, x, tmp_path / "b", labels=torch.zeros(40, dtype=torch.long), **PROJ)
    bad = np.ones((10, 4), dtype=np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match="rows 0..9"):
        FeatureStore.from_array(tmp_path / "nan", bad, model_id="x")
    good = FeatureStore.from_array(tmp_path / "ok", np.ones((10, 4), dtype=np.float32), model_id="x")
    kernel_from_store(good, out=tmp_path / "k")
    with pytest.raises(InputError, match="not a tangentlens.features store"):
        FeatureStore.open(tmp_path / "k")
    with pytest.raises(InputError, match="block_rows"):
        kernel_from_store(good, out=tmp_path / "k2", block_rows=0)


# ------------------------------------------------------------------------------------ kernels out of core
@pytest.mark.parametrize("opts", [
    PROJ,
    dict(kind="trntk", projection=tl.Projection(40, kind="sjlt", seed=2)),
    dict(kind="trntk"),  # flat exact features of a small model
    dict(kind="entk", normalize=True, projection=tl.Projection(24, seed=1)),
])
def test_the_stored_kernel_equals_the_in_memory_kernel(tmp_path, opts):
    m, x = mlp(), _x(45)
    fs = featurize(m, x, tmp_path / "f", chunk_rows=16, **opts)
    ks = kernel_from_store(fs, out=tmp_path / "k", block_rows=20)
    K = tl.kernel(m, x, **opts).numpy()
    assert ks.symmetric and ks.shape == K.shape and ks.kernel.chunks[:2] == (20, 20)
    np.testing.assert_allclose(ks[...], K, rtol=2e-5, atol=2e-6)
    full = ks[...]
    assert _bytes_equal(full, full.swapaxes(0, 1).swapaxes(2, 3) if full.ndim == 4 else full.T)
    if ks.normalized and full.ndim == 2:
        assert (np.diag(full) == 1).all()


def test_test_by_train_blocks_equal_compute(tmp_path):
    m = cnn()
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(30, 1, 10, 10, generator=gen), torch.randn(11, 1, 10, 10, generator=gen)
    opts = dict(kind="pntk", projection=tl.Projection(64, kind="sjlt", seed=9))
    ftr = featurize(m, train, tmp_path / "tr", chunk_rows=8, **opts)
    fte = featurize(m, test, tmp_path / "te", chunk_rows=8, **opts)
    kb = tl.compute(m, train, test, **opts)
    raw = kernel_from_store(fte, ftr, out=tmp_path / "raw", block_rows=4, block_cols=7)
    assert not raw.symmetric and not raw.normalized and raw.shape == (11, 30)
    np.testing.assert_allclose(raw[...], kb.test.numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(fte.sqnorms[:], kb.test_diag.numpy(), rtol=2e-5)
    cos = kernel_from_store(fte, ftr, out=tmp_path / "cos", normalize=True, block_rows=5)
    np.testing.assert_allclose(cos[...], kb.normalized().test.numpy(), rtol=2e-5, atol=1e-6)


def test_margin_kernels_with_labels(tmp_path):
    m, x, y = mlp(), _x(), torch.arange(40) % 3
    xt, yt = _x(9, seed=2), torch.arange(9) % 3
    opts = dict(kind="margin", projection=tl.Projection(32, seed=1))
    ftr = featurize(m, x, tmp_path / "tr", labels=y, **opts)
    fte = featurize(m, xt, tmp_path / "te", labels=yt, **opts)
    ks = kernel_from_store(fte, ftr, out=tmp_path / "k")
    K = tl.kernel(m, xt, x, labels=yt, other_labels=y, **opts)
    np.testing.assert_allclose(ks[...], K.numpy(), rtol=2e-5, atol=1e-6)
    fpred = featurize(m, xt, tmp_path / "pred", labels="predicted", **opts)
    with pytest.raises(StoreMismatchError, match="label mode"):
        kernel_from_store(fpred, ftr, out=tmp_path / "k2")


def test_spot_check_on_larger_random_features(tmp_path):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((1500, 48)).astype(np.float32)
    B = rng.standard_normal((700, 48)).astype(np.float32)
    fa = FeatureStore.from_array(tmp_path / "a", A, model_id="random", chunk_rows=300)
    fb = FeatureStore.from_array(tmp_path / "b", B, model_id="random", chunk_rows=128)
    ks = kernel_from_store(fa, fb, out=tmp_path / "k", normalize=True, block_rows=256, block_cols=200)
    i, j = rng.integers(0, 1500, 100), rng.integers(0, 700, 100)
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    want = (A64[i] * B64[j]).sum(1) / np.linalg.norm(A64[i], axis=1) / np.linalg.norm(B64[j], axis=1)
    np.testing.assert_allclose(ks.entries(i, j), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ks.entries(i, j), ks.kernel.get_coordinate_selection((i, j)))
    sym = kernel_from_store(fa, out=tmp_path / "s", block_rows=256)  # trntk0 default: raw inner products
    np.testing.assert_allclose(sym.kernel.get_coordinate_selection((i, i[::-1])),
                               (A64[i] * A64[i[::-1]]).sum(1), rtol=1e-5, atol=1e-4)
    full = sym[...]
    assert _bytes_equal(full, full.T)


def test_a_kernel_resumes_to_the_same_bytes(tmp_path):
    rng = np.random.default_rng(1)
    fa = FeatureStore.from_array(tmp_path / "a", rng.standard_normal((500, 16)).astype(np.float32),
                                 model_id="random", chunk_rows=100)
    with pytest.raises(_Stop):
        kernel_from_store(fa, out=tmp_path / "k", normalize=True, block_rows=64, progress=_stop_after(7))
    with pytest.raises(InputError, match=r"incomplete: \d+ of 64 blocks.*kernel_from_store"):
        KernelStore.open(tmp_path / "k")
    with pytest.raises(StoreMismatchError, match="different normalized: stored true, this call false"):
        kernel_from_store(fa, out=tmp_path / "k", normalize=False, block_rows=64)
    calls = []
    ks = kernel_from_store(fa, out=tmp_path / "k", normalize=True, block_rows=64,
                           progress=lambda d, t: calls.append(d))
    assert 0 < calls[0] < 64 and calls[-1] == 64
    ref = kernel_from_store(fa, out=tmp_path / "ref", normalize=True, block_rows=64)
    assert _bytes_equal(KernelStore.open(tmp_path / "k")[...], ref[...]) and ks.complete
    assert ref.manifest["rows"]["config_fingerprint"] == fa.manifest["config_fingerprint"]


def test_stores_of_different_configurations_do_not_pair(tmp_path):
    m, x = mlp(), _x()
    fa = featurize(m, x, tmp_path / "a", **PROJ)
    fb = featurize(m, _x(seed=3), tmp_path / "b", **{**PROJ, "projection": tl.Projection(48, seed=4)})
    with pytest.raises(StoreMismatchError, match="config_fingerprint"):
        kernel_from_store(fa, fb, out=tmp_path / "k")


@pytest.mark.slow
def test_peak_memory_stays_within_a_few_blocks(tmp_path):
    # 6,000 x 6,000 float32 = 137 MiB of kernel, written in blocks of 500 rows (1 MiB each)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, str(CHILD), "rss", str(tmp_path / "f"), str(tmp_path / "k"), "6000", "64", "500"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 40 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    assert KernelStore.open(tmp_path / "k").shape == (6000, 6000)
