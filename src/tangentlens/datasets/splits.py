"""Binary splits of MNIST-like data: MNIST2 / FMNIST2 as in the method's protocol.

The reference builds its binary tasks by keeping classes ``a`` and ``b`` (0 and 1), taking the
**first** ``n`` examples of each class in file order, stacking all class-``a`` examples before all
class-``b`` ones, scaling pixels to [0, 1] and relabelling ``a -> 0``, ``b -> 1``. MNIST2 uses
5,000 train and 980 test examples per class; FMNIST2 5,000 and 1,000.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from tangentlens.datasets.idx import load_idx_pair
from tangentlens.errors import InputError

__all__ = ["BinarySplit", "binary_split", "mnist2", "fmnist2", "REFERENCE_SIZES"]

#: (train per class, test per class) of the reference's binary tasks.
REFERENCE_SIZES: dict[str, tuple[int, int]] = {"mnist2": (5000, 980), "fmnist2": (5000, 1000)}


@dataclass(frozen=True)
class BinarySplit:
    """A two-class train/test split.

    Attributes:
        x_train: float32 (N_train, 1, H, W) in [0, 1].
        y_train: int64 (N_train,) with values 0 / 1 (class-0 block first).
        x_test: float32 (N_test, 1, H, W).
        y_test: int64 (N_test,).
        classes: the original labels mapped to 0 and 1.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[int, int]


def _take(
    images: np.ndarray, labels: np.ndarray, classes: tuple[int, int], n: int | None, what: str
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for new, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if n is not None:
            if idx.size < n:
                raise InputError(
                    f"{what}: class {c} has only {idx.size} examples, {n} requested; "
                    "lower n_*_per_class."
                )
            idx = idx[:n]
        if idx.size == 0:
            raise InputError(f"{what}: class {c} has no examples; check `classes`.")
        xs.append(images[idx])
        ys.append(np.full(idx.size, new, dtype=np.int64))
    x = np.concatenate(xs).astype(np.float32)
    if np.issubdtype(images.dtype, np.integer):
        x /= 255.0
    if x.ndim == 3:
        x = x[:, None]
    return x, np.concatenate(ys)


def binary_split(
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[int, int] = (0, 1),
    n_train_per_class: int | None = 5000,
    n_test_per_class: int | None = None,
    *,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> BinarySplit:
    """Build a two-class split taking the first ``n`` examples of each class (reference order).

    Args:
        images: train images (N, H, W) (uint8 scaled by 1/255, floats kept) or (N, 1, H, W).
        labels: train labels (N,).
        classes: the two original labels; the first becomes 0, the second 1.
        n_train_per_class: examples per class from the train set; ``None`` keeps all.
        n_test_per_class: examples per class from the test set; ``None`` keeps all.
        test_images: test images; if omitted the test split is empty.
        test_labels: test labels.

    Returns:
        A :class:`BinarySplit`.

    Raises:
        InputError: mismatched lengths, identical classes, or too few examples of a class.
    """
    if len(classes) != 2 or classes[0] == classes[1]:
        raise InputError(f"classes must be two different labels, got {classes!r}.")
    if len(images) != len(labels):
        raise InputError(f"{len(images)} train images but {len(labels)} labels.")
    x_tr, y_tr = _take(np.asarray(images), np.asarray(labels), classes, n_train_per_class, "train")
    if test_images is None or test_labels is None:
        if (test_images is None) != (test_labels is None):
            raise InputError("pass both test_images and test_labels, or neither.")
        shape = (0,) + x_tr.shape[1:]
        x_te, y_te = np.zeros(shape, np.float32), np.zeros(0, np.int64)
    else:
        if len(test_images) != len(test_labels):
            raise InputError(f"{len(test_images)} test images but {len(test_labels)} labels.")
        x_te, y_te = _take(
            np.asarray(test_images), np.asarray(test_labels), classes, n_test_per_class, "test"
        )
    return BinarySplit(x_tr, y_tr, x_te, y_te, (int(classes[0]), int(classes[1])))


def _named(directory: str | os.PathLike[str], name: str, classes: tuple[int, int]) -> BinarySplit:
    n_tr, n_te = REFERENCE_SIZES[name]
    xtr, ytr = load_idx_pair(directory, "train")
    xte, yte = load_idx_pair(directory, "test")
    return binary_split(xtr, ytr, classes, n_tr, n_te, test_images=xte, test_labels=yte)


def mnist2(directory: str | os.PathLike[str], classes: tuple[int, int] = (0, 1)) -> BinarySplit:
    """MNIST2: 10,000 train (5,000 per class) and 1,960 test (980 per class) from an IDX folder."""
    return _named(directory, "mnist2", classes)


def fmnist2(directory: str | os.PathLike[str], classes: tuple[int, int] = (0, 1)) -> BinarySplit:
    """FMNIST2: 10,000 train (5,000 per class), 2,000 test (1,000 per class) from an IDX folder."""
    return _named(directory, "fmnist2", classes)
