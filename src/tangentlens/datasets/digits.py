"""scikit-learn's bundled 8x8 digits as a seeded, stratified, normalized train/test split.

The data ship with scikit-learn (1,797 grey-scale images, 10 classes, pixel values 0..16), so nothing is
downloaded. The split is stratified by class and fixed by a seed; pixels are scaled to [0, 1] and then
standardized with the mean and standard deviation of the *training* pixels (one scalar each), so the test set
never leaks into the normalization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tangentlens.errors import InputError

__all__ = ["DigitsSplit", "load_digits_split"]

N_DIGITS = 1797


@dataclass(frozen=True)
class DigitsSplit:
    """A train/test split of the digits.

    Attributes:
        x_train: float32 tensor of shape (N_train, 1, 8, 8), standardized.
        y_train: int64 tensor of shape (N_train,), classes 0..9.
        x_test: float32 tensor of shape (N_test, 1, 8, 8), standardized with the training statistics.
        y_test: int64 tensor of shape (N_test,).
        mean: training pixel mean (of the [0, 1]-scaled pixels) that was subtracted.
        std: training pixel standard deviation that was divided by.
        seed: the seed of the split.
        train_index: positions of the training images in ``sklearn.datasets.load_digits()``.
        test_index: positions of the test images there.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float
    seed: int
    train_index: np.ndarray
    test_index: np.ndarray

    @property
    def n_classes(self) -> int:
        """Number of classes (10)."""
        return 10

    def to_image(self, x: torch.Tensor) -> np.ndarray:
        """Undo the standardization: (..., 1, 8, 8) tensor -> (..., 8, 8) array in [0, 1]."""
        arr = x.detach().cpu().numpy() * self.std + self.mean
        return np.clip(arr.reshape(*arr.shape[:-3], 8, 8), 0.0, 1.0)


def _stratified_take(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` items of ``y`` in (nearly) class-proportional numbers, in a seeded order."""
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    # Hand out the remainder to the classes with the largest fractional parts (ties: lowest class).
    frac = counts / counts.sum() * n - quota
    for j in np.argsort(-frac, kind="stable")[: n - quota.sum()]:
        quota[j] += 1
    picks = []
    for c, q in zip(classes, quota, strict=True):
        idx = np.flatnonzero(y == c)
        picks.append(rng.permutation(idx)[:q])
    out = np.concatenate(picks)
    return out[rng.permutation(out.size)]


def load_digits_split(
    n_train: int = 1200,
    n_test: int = 597,
    *,
    seed: int = 0,
) -> DigitsSplit:
    """Load the digits and split them, stratified by class, into train and test tensors.

    Args:
        n_train: number of training images (at least 10, at most 1,787).
        n_test: number of test images (at least 10); ``n_train + n_test`` must not exceed 1,797.
        seed: seed of the split (a ``numpy.random.default_rng`` stream); the same seed gives the same split.

    Returns:
        A :class:`DigitsSplit`. Cost: reading 1,797 x 64 bytes and one permutation; negligible.

    Raises:
        InputError: if the requested sizes are not positive or exceed the 1,797 images.
    """
    from sklearn.datasets import load_digits

    if n_train < 10 or n_test < 10:
        raise InputError(f"n_train and n_test must each be >= 10, got {n_train} and {n_test}.")
    if n_train + n_test > N_DIGITS:
        raise InputError(
            f"n_train + n_test = {n_train + n_test} exceeds the {N_DIGITS} digits; ask for fewer."
        )
    data = load_digits()
    images = np.asarray(data.images, dtype=np.float64) / 16.0
    labels = np.asarray(data.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = _stratified_take(labels, n_train + n_test, rng)
    # Stratify the train/test cut inside the chosen subset as well.
    train_pos = _stratified_take(labels[chosen], n_train, rng)
    mask = np.zeros(chosen.size, dtype=bool)
    mask[train_pos] = True
    train_idx = chosen[train_pos]
    test_idx = chosen[~mask]
    test_idx = test_idx[rng.permutation(test_idx.size)]

    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    x = ((images - mean) / std).astype(np.float32)[:, None, :, :]
    return DigitsSplit(
        x_train=torch.from_numpy(np.ascontiguousarray(x[train_idx])),
        y_train=torch.from_numpy(labels[train_idx].copy()),
        x_test=torch.from_numpy(np.ascontiguousarray(x[test_idx])),
        y_test=torch.from_numpy(labels[test_idx].copy()),
        mean=mean,
        std=std,
        seed=seed,
        train_index=train_idx,
        test_index=test_idx,
    )
