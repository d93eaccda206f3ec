"""Saved surrogates: the coefficients round trip bit for bit, loading checks the training store, bad input
gets a typed error, and no write leaves a half-made store behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tangentlens as tl
from tangentlens.errors import InputError, StoreMismatchError
from tangentlens.store import FeatureStore, SurrogateStore, load_surrogate, save_surrogate
from tangentlens.surrogate import (
    KernelRidgeSurrogate,
    KernelSurrogate,
    KernelSVMSurrogate,
    PrimalKernelSurrogate,
)


def _data(n: int = 60, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Phi = rng.standard_normal((n, d)).astype(np.float32)
    y = (Phi[:, 0] + 0.3 * Phi[:, 1] > 0).astype(int) + (Phi[:, 2] > 0.8)
    test = rng.standard_normal((7, d)).astype(np.float32)
    return Phi, y, test


def _same_state(a: object, b: object) -> None:
    va, vb = vars(a), vars(b)
    fitted = {k for k in va if k.endswith("_") and not k.startswith("_")}
    assert fitted == {k for k in vb if k.endswith("_") and not k.startswith("_")}
    for k in fitted:
        x, y = va[k], vb[k]
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), k
        else:
            assert x == y and type(x) is type(y), k
    assert a.get_params() == b.get_params()  # type: ignore[attr-defined]


def test_primal_surrogate_round_trip_with_its_training_store(tmp_path: os.PathLike[str]) -> None:
    Phi, y, test = _data()
    train = FeatureStore.from_array(tmp_path / "train", Phi, model_id="m", chunk_rows=16)
    sur = PrimalKernelSurrogate(alpha=1e-3, normalize=True, class_weight={0: 1.0, 1: 2.0, 2: 1.5})
    sur.fit(train.features, y)
    meta = {"kernel": "proj-pNTK", "target": "labels"}
    saved = save_surrogate(tmp_path / "sur", sur, train=train, meta=meta)
    assert saved.meta == {"kernel": "proj-pNTK", "target": "labels"}
    back = load_surrogate(tmp_path / "sur", train=train)
    assert type(back) is PrimalKernelSurrogate
    _same_state(sur, back)
    assert back.class_weight == {0: 1.0, 1: 2.0, 2: 1.5}  # integer keys survive JSON
    assert np.array_equal(back.logits(test), sur.logits(test))
    K = sur.kernel_rows(test, Phi)
    assert np.array_equal(back.contributions(K), sur.contributions(K))
    ex, ex_back = tl.explain(sur, K, k=3), tl.explain(back, K, k=3)
    assert [p.target.proponents for p in ex.points] == [p.target.proponents for p in ex_back.points]
    # the arrays are plain Zarr arrays: class_coef is (C, N), readable without tangentlens
    import zarr

    g = zarr.open_group(str(tmp_path / "sur"), mode="r")
    assert np.array_equal(g["class_coef"][...], sur.class_coef_)
    assert json.loads((tmp_path / "sur" / "zarr.json").read_text())["attributes"]["estimator"] == \
        "PrimalKernelSurrogate"


@pytest.mark.parametrize("make", [
    lambda: KernelSurrogate(alpha=1e-3),
    lambda: KernelRidgeSurrogate(alpha=1e-2),
])
def test_dual_surrogates_round_trip(tmp_path: os.PathLike[str], make: object) -> None:
    Phi, y, test = _data(seed=1)
    P = Phi.astype(np.float64)
    K, Kt = P @ P.T, test.astype(np.float64) @ P.T
    labels = np.array(["cat", "dog", "emu"])[y]  # string classes
    sur = make().fit(K, labels)  # type: ignore[operator]
    save_surrogate(tmp_path / "s", sur)
    back = load_surrogate(tmp_path / "s")
    _same_state(sur, back)
    assert list(back.classes_) == ["cat", "dog", "emu"]
    assert np.array_equal(back.predict(Kt), sur.predict(Kt))
    assert np.array_equal(back.logits(Kt), sur.logits(Kt))


def test_loading_against_another_training_store_is_refused(tmp_path: os.PathLike[str]) -> None:
    Phi, y, _ = _data()
    train = FeatureStore.from_array(tmp_path / "train", Phi, model_id="m")
    other_model = FeatureStore.from_array(tmp_path / "o1", Phi, model_id="another")
    fewer = FeatureStore.from_array(tmp_path / "o2", Phi[:50], model_id="m")
    sur = PrimalKernelSurrogate(alpha=1e-2).fit(Phi, y)
    save_surrogate(tmp_path / "sur", sur, train=train)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        load_surrogate(tmp_path / "sur", train=other_model)
    with pytest.raises(StoreMismatchError, match="data_fingerprint|n "):
        load_surrogate(tmp_path / "sur", train=fewer)
    with pytest.raises(StoreMismatchError, match="60 training points"):
        save_surrogate(tmp_path / "sur2", sur, train=fewer)
    assert not (tmp_path / "sur2").exists()
    # saved without a training store: only the number of rows can be checked
    save_surrogate(tmp_path / "loose", sur)
    with pytest.raises(StoreMismatchError, match="weights for 60 training points"):
        load_surrogate(tmp_path / "loose", train=fewer)
    assert load_surrogate(tmp_path / "loose", train=other_model).n_train_ == 60
    with pytest.raises(InputError, match="must be the FeatureStore"):
        load_surrogate(tmp_path / "loose", train=Phi)


def test_bad_input_gets_a_typed_error_and_nothing_is_written(tmp_path: os.PathLike[str]) -> None:
    Phi, y, _ = _data()
    P = Phi.astype(np.float64)
    K = P @ P.T
    with pytest.raises(InputError, match="not fitted"):
        save_surrogate(tmp_path / "a", PrimalKernelSurrogate())
    with pytest.raises(InputError, match="solver='sgd'"):
        save_surrogate(tmp_path / "b", KernelSurrogate(solver="sgd", random_state=0).fit(K, y))
    with pytest.raises(InputError, match="KernelSVMSurrogate"):
        save_surrogate(tmp_path / "c", KernelSVMSurrogate().fit(K, y))
    assert not any(p.name in "abc" for p in tmp_path.iterdir())
    with pytest.raises(InputError, match="No surrogate store"):
        SurrogateStore.open(tmp_path / "nothing")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    sur = PrimalKernelSurrogate(alpha=1e-2).fit(Phi, y)
    with pytest.raises(InputError, match="not an empty directory"):
        save_surrogate(tmp_path / "taken", sur)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    FeatureStore.from_array(tmp_path / "fs", Phi, model_id="m")
    with pytest.raises(InputError, match="not a finished surrogate store"):
        save_surrogate(tmp_path / "fs", sur, overwrite=True)
    assert FeatureStore.open(tmp_path / "fs").n == 60  # untouched


def test_overwrite_replaces_and_leaves_no_temporary_files(tmp_path: os.PathLike[str]) -> None:
    Phi, y, test = _data()
    first = PrimalKernelSurrogate(alpha=1e-1).fit(Phi, y)
    second = PrimalKernelSurrogate(alpha=1e-2).fit(Phi, y)
    save_surrogate(tmp_path / "s", first)
    with pytest.raises(InputError, match="overwrite=True"):
        save_surrogate(tmp_path / "s", second)
    assert load_surrogate(tmp_path / "s").alpha == 1e-1
    save_surrogate(tmp_path / "s", second, overwrite=True)
    back = load_surrogate(tmp_path / "s")
    assert back.alpha == 1e-2 and np.array_equal(back.logits(test), second.logits(test))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_an_unfinished_write_is_not_taken_for_a_surrogate(tmp_path: os.PathLike[str]) -> None:
    import zarr

    g = zarr.open_group(str(tmp_path / "half"), mode="w-")
    g.attrs.update({"format": "tangentlens.surrogate", "version": 1, "status": "running"})
    with pytest.raises(InputError, match="not finished"):
        load_surrogate(tmp_path / "half")
