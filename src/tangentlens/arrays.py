"""Array conversion shared by the estimator half: torch tensors or array-likes to numpy, without importing
torch (the estimators work on plain arrays and never need it)."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """``x`` as a numpy array: torch tensors are detached and moved to the CPU first, floating tensors
    widened to float64 before the conversion (so no precision is lost on the way).

    Args:
        x: a torch tensor, numpy array, or anything ``np.asarray`` accepts.
        dtype: the result's dtype (``None``: keep the converted dtype).

    Returns:
        A numpy array (a view of ``x`` where no copy is needed). Cost: one copy at most.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, recognized without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)
