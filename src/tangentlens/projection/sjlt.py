"""Sparse JL / CountSketch projections (``"sjlt"``), also the Kronecker route's fold.

``K`` is split into ``s`` blocks; every column has one nonzero ``+-1/sqrt(s)`` at a hashed row of every
block (so the ``s`` nonzeros of a column are distinct rows), hence ``E[R^T R] = I``. Applied as a
row-blocked scatter-add, ``O(n p s)`` and memory-bound; the structure takes ``16 p s`` bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from .base import FlatBackend, Spec, TileCache
from .hashing import column_keys, word_hash

__all__ = ["SJLTBackend", "countsketch"]


def _structure(
    j0: int, j1: int, words: Sequence[int], k: int, s: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Row index ``(s, p)`` and sign ``(s, p)`` of every nonzero of columns ``[j0, j1)``: level ``b``
    puts column ``j`` at a hashed row of block ``[b K / s, (b + 1) K / s)``."""
    keys = column_keys(j0, j1, words, device)
    h = word_hash(keys, s, words[3])  # (p, s)
    b = torch.arange(s, dtype=torch.int64, device=device)
    lo = (b * k) // s
    size = ((b + 1) * k) // s - lo
    rows = lo[None, :] + (h >> 1) % size[None, :]
    signs = (h & 1) * 2 - 1
    return rows.T.contiguous(), signs.T.contiguous()


def countsketch(
    g: Tensor, offset: int, out: Tensor, words: Sequence[int], s: int, cache: TileCache, cache_tag: str
) -> None:
    """``out += g @ S[:, offset:offset+p].T`` for the CountSketch ``S`` (``K = out.shape[1]`` rows, ``s``
    nonzeros ``+-1/sqrt(s)`` per column) defined by ``words``.

    A row-blocked ``scatter_add_`` along the columns: each block of 16 rows is read once per nonzero
    level, contiguously, and scattered into its ``K``-wide output rows (cache-resident), ``O(n p s)``.
    Every output row is accumulated in column order whatever the batch, so rows are bit-identical across
    batch sizes on CPU (CUDA's scatter uses atomics: not bit-identical). The structure is kept in
    ``cache`` under ``cache_tag`` while the budget allows.
    """
    n, p = g.shape
    k = out.shape[1]
    key = (cache_tag, offset, p, k, s, g.device)
    rows, signs = cache.cached(key, lambda: _structure(offset, offset + p, words, k, s, g.device), p * s * 16)
    scaled = [signs[b].to(g.dtype) * (1.0 / math.sqrt(s)) for b in range(s)]
    block = 16
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        for b in range(s):
            out[i0:i1].scatter_add_(1, rows[b].expand(i1 - i0, p), g[i0:i1] * scaled[b])


class SJLTBackend(FlatBackend):
    """``"sjlt"``: ``s`` nonzeros per column (``1 <= s <= K``).

    Raises:
        InputError: ``s > dim``.
    """

    def __init__(self, spec: Spec, label: str) -> None:
        if spec.s > spec.dim:
            raise InputError(f"sjlt needs s <= dim, got s={spec.s} > dim={spec.dim}; lower s.")
        super().__init__(spec, label)

    def describe(self) -> dict[str, int]:
        return {"s": self.spec.s}

    def repr_extra(self) -> str:
        return f", s={self.spec.s}"

    def working_set(self, n: int, p: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, str]:
        isz = dtype.itemsize
        return 2 * n * isz, 16 * p * self.spec.s + 2 * 16 * p * isz, ""

    def apply(self, g: Tensor, offset: int, out: Tensor, total: int) -> Tensor:
        countsketch(g, offset, out, self.words, self.spec.s, self.cache, "sjlt")
        return out
