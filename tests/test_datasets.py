"""Tests for the IDX reader, the binary splits and the SpamAssassin reader (generated data only)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tangentlens.datasets.idx import find_idx, load_idx_pair, read_idx, write_idx
from tangentlens.datasets.splits import binary_split, fmnist2, mnist2
from tangentlens.datasets.text import message_text, read_spam_assassin
from tangentlens.errors import InputError


def _mnist_like(d: Path, n_train: int = 40, n_test: int = 20, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 3).astype(np.uint8)  # classes 0, 1, 2 interleaved
        images = rng.integers(0, 256, size=(n, 4, 5), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)  # tag each image with its file position
        write_idx(d / f"{prefix}-images-idx3-ubyte{sfx}", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{sfx}", labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path: Path, dtype: type, gz: bool) -> None:
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    if dtype is np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a)
    b = read_idx(p, expect_ndim=3, expect_shape=(None, 3, 4))
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    np.testing.assert_array_equal(a, b)
    if gz:
        assert p.read_bytes()[:2] == b"\x1f\x8b"


def test_idx_header_is_mnist_format(tmp_path: Path) -> None:
    p = tmp_path / "labels"
    write_idx(p, np.array([7, 2, 1], dtype=np.uint8))
    raw = p.read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x01"  # magic 2049 of MNIST label files
    assert int.from_bytes(raw[4:8], "big") == 3 and raw[8:] == bytes([7, 2, 1])


def test_idx_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_idx(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(InputError, match="magic"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(InputError, match="type code"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x02" + (3).to_bytes(4, "big"))
    with pytest.raises(InputError, match="header"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00")
    with pytest.raises(InputError, match="too short"):
        read_idx(bad)
    ok = tmp_path / "ok"
    write_idx(ok, np.zeros((2, 3), np.uint8))
    with pytest.raises(InputError, match="dimensions"):
        read_idx(ok, expect_ndim=3)
    with pytest.raises(InputError, match="expected shape"):
        read_idx(ok, expect_shape=(2, 4))
    trunc = tmp_path / "t.gz"
    trunc.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")[:-6])
    with pytest.raises(InputError):
        read_idx(trunc)
    with pytest.raises(InputError, match="no IDX type code"):
        write_idx(tmp_path / "c", np.zeros(3, np.complex64))


@pytest.mark.parametrize("gz", [False, True])
def test_load_pair_and_find(tmp_path: Path, gz: bool) -> None:
    _mnist_like(tmp_path, gz=gz)
    x, y = load_idx_pair(tmp_path, "train")
    assert x.shape == (40, 4, 5) and y.shape == (40,) and x.dtype == np.uint8
    xt, _ = load_idx_pair(tmp_path, "test")
    assert xt.shape[0] == 20
    assert find_idx(tmp_path, "train-labels-idx1-ubyte").name.startswith("train-labels")
    with pytest.raises(InputError, match="split"):
        load_idx_pair(tmp_path, "val")


def test_load_pair_count_mismatch(tmp_path: Path) -> None:
    _mnist_like(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(39, np.uint8))
    with pytest.raises(InputError, match="labels"):
        load_idx_pair(tmp_path, "train")


def test_binary_split_takes_first_per_class_in_order(tmp_path: Path) -> None:
    _mnist_like(tmp_path)
    x, y = load_idx_pair(tmp_path, "train")
    xt, yt = load_idx_pair(tmp_path, "test")
    s = binary_split(x, y, (1, 2), 5, 3, test_images=xt, test_labels=yt)
    assert s.x_train.shape == (10, 1, 4, 5) and s.x_train.dtype == np.float32
    np.testing.assert_array_equal(s.y_train, [0] * 5 + [1] * 5)
    # positions of the first five label-1 and label-2 images in file order
    tags = np.rint(s.x_train[:, 0, 0, 0] * 255).astype(int)
    np.testing.assert_array_equal(tags, [1, 4, 7, 10, 13, 2, 5, 8, 11, 14])
    assert s.x_train.max() <= 1.0 and s.x_test.shape == (6, 1, 4, 5)
    assert s.classes == (1, 2)
    # no test set given -> empty
    s2 = binary_split(x, y, (0, 1), None)
    assert s2.x_test.shape == (0, 1, 4, 5) and s2.x_train.shape[0] == 27


def test_binary_split_errors(tmp_path: Path) -> None:
    _mnist_like(tmp_path)
    x, y = load_idx_pair(tmp_path, "train")
    with pytest.raises(InputError, match="only"):
        binary_split(x, y, (0, 1), 100)
    with pytest.raises(InputError, match="different"):
        binary_split(x, y, (1, 1))
    with pytest.raises(InputError, match="no examples"):
        binary_split(x, y, (0, 9), None)
    with pytest.raises(InputError, match="labels"):
        binary_split(x, y[:-1])
    with pytest.raises(InputError, match="both"):
        binary_split(x, y, (0, 1), 5, test_images=x)


def test_named_splits_need_enough_data(tmp_path: Path) -> None:
    _mnist_like(tmp_path)
    with pytest.raises(InputError, match="only"):
        mnist2(tmp_path)
    with pytest.raises(InputError, match="install_data"):
        fmnist2(tmp_path / "nothing")


_SPAM = """From: a@b.c
Subject: Cheap meds
Content-Type: text/html; charset="default_charset"

<html><b>BUY</b>   now</html>
"""
_HAM = """From: x@y.z
Subject: Re: meeting
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/plain; charset=us-ascii

See you at 10.
--XX
Content-Type: image/png

iVBORw0KGgo=
--XX--
"""


def test_message_text() -> None:
    assert message_text(_SPAM) == "Cheap meds . BUY now"
    assert message_text(_HAM) == "Re: meeting . See you at 10."
    assert message_text(_HAM, headers=True) == _HAM


def test_read_spam_assassin(tmp_path: Path) -> None:
    files = ["easy-ham-1/0001.aa.txt", "spam-1/0001.bb.txt", "hard-ham-1/0002.cc.txt"]
    for f, raw in zip(files, [_HAM, _SPAM, _HAM], strict=True):
        p = tmp_path / f.replace(".txt", ".json")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"id": "1", "group": f.split("/")[0], "text": raw}))
    (tmp_path / "file_list.json").write_text(json.dumps(files))
    texts, labels = read_spam_assassin(tmp_path)
    assert texts[1] == "Cheap meds . BUY now"
    np.testing.assert_array_equal(labels, [0, 1, 0])
    texts, labels = read_spam_assassin(tmp_path, groups=("spam-1",))
    assert len(texts) == 1 and labels.tolist() == [1]
    with pytest.raises(InputError, match="unknown"):
        read_spam_assassin(tmp_path, groups=("ham",))
    with pytest.raises(InputError, match="install_data"):
        read_spam_assassin(tmp_path / "none")
    (tmp_path / "spam-1/0001.bb.json").unlink()
    with pytest.raises(InputError, match="missing"):
        read_spam_assassin(tmp_path)
