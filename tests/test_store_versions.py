"""An unfinished store is resumed only by the tangentlens and torch releases that started it (the rows written
later must be bit-identical to one uninterrupted run); a finished store is read by any release."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import tangentlens as tl
from tangentlens.errors import StoreMismatchError
from tangentlens.store import FeatureStore, featurize, kernel_from_store

from .test_store import _Stop, _stop_after  # the progress callback that stops a run after k chunks


def _written_by(path: os.PathLike[str], **libs: str) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    g.attrs["versions"] = {**g.attrs["versions"], **libs}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def test_an_unfinished_feature_store_resumes_only_with_its_release(tmp_path: os.PathLike[str]) -> None:
    m, x = _model(), torch.randn(40, 6)
    proj = {"kind": "pntk", "projection": tl.Projection(16, seed=0)}
    with pytest.raises(_Stop):
        featurize(m, x, tmp_path / "s", chunk_rows=8, progress=_stop_after(2), **proj)
    _written_by(tmp_path / "s", tangentlens="0.0.1")
    with pytest.raises(StoreMismatchError, match=r"started with tangentlens 0\.0\.1.*last bits.*delete it"):
        featurize(m, x, tmp_path / "s", chunk_rows=8, **proj)
    _written_by(tmp_path / "s", tangentlens=_current("tangentlens"), torch="1.0")
    with pytest.raises(StoreMismatchError, match=r"started with torch 1\.0"):
        featurize(m, x, tmp_path / "s", chunk_rows=8, **proj)
    _written_by(tmp_path / "s", torch=torch.__version__)
    done = featurize(m, x, tmp_path / "s", chunk_rows=8, **proj)
    whole = featurize(m, x, tmp_path / "whole", chunk_rows=8, **proj)
    assert np.array_equal(done.features[...], whole.features[...])
    # a finished store is read, and reused by featurize, whatever wrote it
    _written_by(tmp_path / "s", tangentlens="0.0.1", torch="1.0")
    again = featurize(m, x, tmp_path / "s", chunk_rows=8, **proj)
    assert again.complete and np.array_equal(again.features[...], whole.features[...])
    assert kernel_from_store(again, out=tmp_path / "k").complete


def test_an_unfinished_kernel_store_resumes_only_with_its_release(tmp_path: os.PathLike[str]) -> None:
    rng = np.random.default_rng(0)
    fs = FeatureStore.from_array(tmp_path / "f", rng.standard_normal((300, 8)).astype(np.float32),
                                 model_id="random", chunk_rows=50)
    with pytest.raises(_Stop):
        kernel_from_store(fs, out=tmp_path / "k", block_rows=64, progress=_stop_after(3))
    _written_by(tmp_path / "k", torch="1.0")
    with pytest.raises(StoreMismatchError, match=r"unfinished kernel store.*started with torch 1\.0"):
        kernel_from_store(fs, out=tmp_path / "k", block_rows=64, resume=True)
    _written_by(tmp_path / "k", torch=torch.__version__)
    ks = kernel_from_store(fs, out=tmp_path / "k", block_rows=64, resume=True)
    whole = kernel_from_store(fs, out=tmp_path / "k2", block_rows=64)
    assert np.array_equal(ks[...], whole[...])


def _current(lib: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(lib)
