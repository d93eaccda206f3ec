"""Logit and label inputs of the estimators: one reading of each, shared by faithfulness, explain and lds.

* Logits: an (n, C) array with C >= 2 is read as is; an (n,) or (n, 1) array is a single-logit binary
  model (e.g. the reference's MLP ``784-...-1``), read as the two-class logits ``[0, z]``, so
  ``p(class 1) = sigmoid(z)`` and the prediction is ``z > 0``. Everything is converted to float64
  numpy first, whatever the caller's dtype (float16/32/64, integers, torch tensors), so nothing
  downstream depends on the caller's precision.
* Labels (or any per-point class choice): (n,) integer class positions ``0..C-1``, the columns of the
  logits; integral floats are accepted, booleans and other dtypes are not.

Neither function imports torch (:func:`tangentlens.arrays.to_numpy` converts tensors).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .arrays import to_numpy
from .errors import InputError

__all__ = ["as_logits", "class_positions"]


def as_logits(x: ArrayLike, name: str) -> np.ndarray:
    """(n, C >= 2) float64 logits; single-logit binary inputs (n,) / (n, 1) become ``[0, z]``.

    Args:
        x: (n, C), (n,) or (n, 1) logits (numpy or torch, any numeric dtype).
        name: The argument's name, for the error messages.

    Returns:
        (n, C) float64 array (C = 2 for single logits). Cost: one copy, O(n·C).

    Raises:
        InputError: non-numeric, empty, non-finite or more than 2-D input.
    """
    a = to_numpy(x)
    if a.dtype.kind not in "fiu":
        raise InputError(f"{name} must be a numeric array of logits, got dtype {a.dtype}.")
    a = a.astype(np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise InputError(f"{name} must be (n,) or (n, C) logits, got shape {a.shape}.")
    if a.shape[0] == 0:
        raise InputError(f"{name} is empty: pass the logits of at least two test points.")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or inf values; pass finite logits.")
    if a.shape[1] == 1:
        a = np.concatenate([np.zeros_like(a), a], axis=1)
    return a


def class_positions(values: ArrayLike, n: int, C: int, *, name: str, rows: str, fix: str) -> np.ndarray:
    """(n,) int64 class positions in ``0..C-1``, or an :class:`InputError` that says what to pass.

    Args:
        values: (n,) or (n, 1) class positions (numpy or torch; integers, or floats with integral
            values).
        n: The number of rows they must cover.
        C: The number of classes (logit columns).
        name: The argument's name, for the error messages.
        rows: What the n rows are, for the messages (e.g. ``"test points"``).
        fix: The sentence that ends every message: what to pass instead.

    Returns:
        (n,) int64 array. Cost O(n).

    Raises:
        InputError: a shape other than (n,) / (n, 1), a non-integer dtype or value, or a position
            outside ``0..C-1``.
    """
    y = to_numpy(values)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"{name} has shape {y.shape} but there are {n} {rows}; {fix}")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu" or (n and (y.min() < 0 or y.max() >= C)):
        got = f"values in [{y.min()}, {y.max()}]" if n and y.dtype.kind in "iuf" else f"dtype {y.dtype}"
        raise InputError(f"{name} must hold integer class positions 0..{C - 1} (the logit columns), got "
                         f"{got}; {fix}")
    return y.astype(np.int64)
