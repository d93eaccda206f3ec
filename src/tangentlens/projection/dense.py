"""Dense projections: i.i.d. Rademacher (+-1/sqrt(K)) or Gaussian (N(0, 1/K)) entries.

``phi = g @ R^T`` is one matrix product per column tile, ``2 n p K`` flops. ``R^T`` is generated tile
by tile (``tile`` columns of ``Kpad = 32 ceil(K / 32)`` entries). The first call for a given ``P``
picks the densest cache form that fits the budget left -- float tiles, or for Rademacher int8 tiles
(1 byte per entry, expanded by a cast) or packed bits (1 bit per entry, expanded by a table lookup)
-- and otherwise regenerates every tile on every call into one reused workspace of at most ``tile x
Kpad`` floats. All forms give bit-identical results.

- ``"rademacher"``: entry ``(k, j)`` is a bit of the hash of the global column ``j`` (one hash per 32
  entries), ~1-2 ns per entry to generate.
- ``"gaussian"``: ``torch.randn`` per seeded block of 64 columns, always on a CPU generator (device
  independent), ~5-10 ns per entry.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from .base import FlatBackend, addmm_rows_
from .hashing import column_keys, expand_bytes, gaussian_rows, rademacher_bytes, rademacher_rows

__all__ = ["DenseBackend", "RademacherBackend", "GaussianBackend"]

_BYTES_PER_ENTRY = {"int8": 1.0, "bits": 0.125}  # of the compact cache forms


class DenseBackend(FlatBackend):
    """A dense i.i.d. matrix ``R`` (entries of unit variance, scaled by ``1/sqrt(K)``), tiled and cached."""

    out_width_padded = True
    compact_forms: ClassVar[tuple[str, ...]] = ()  # cache forms below the compute dtype, densest first
    draws: ClassVar[int] = 1  # tile-sized buffers a generation needs

    @abstractmethod
    def rows(
        self, j0: int, j1: int, device: torch.device, dtype: torch.dtype, out: Tensor | None = None
    ) -> Tensor:
        """``R^T[j0:j1]`` with unit-variance entries, shape ``(j1 - j0, Kpad)``, into ``out`` when given."""

    def stored_rows(self, form: str, j0: int, j1: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``R^T[j0:j1]`` as the cache form ``form`` holds it (``"full"``: the compute dtype)."""
        return self.rows(j0, j1, device, dtype)

    def expand(self, stored: Tensor, form: str, out: Tensor) -> Tensor:
        """Rows held in a compact cache form, expanded into the workspace ``out`` (kinds with
        ``compact_forms`` override this)."""
        raise NotImplementedError(f"{type(self).__name__} has no compact cache form {form!r}")

    def cache_form(self, total_dim: int, device: torch.device, dtype: torch.dtype) -> str:
        """How this matrix is cached, decided once per ``(P, device, dtype)`` from the budget left:
        ``"full"`` (compute dtype), then the kind's compact forms (Rademacher: ``"int8"``, 1 byte per
        entry, and ``"bits"``, 1 bit per entry), else ``"none"`` (regenerated on every call into a
        reused workspace)."""

        def decide() -> str:
            entries = total_dim * self.kpad
            if entries * torch.empty((), dtype=dtype).element_size() <= self.cache.free:
                return "full"
            for form in self.compact_forms:
                if int(entries * _BYTES_PER_ENTRY[form]) <= self.cache.free:
                    return form
            return "none"

        return self.cache.cached(("tier", total_dim, device, dtype), decide, 0)

    def working_set(self, n: int, p: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, str]:
        isz = dtype.itemsize
        per_k = 3 * n * isz  # padded output, its scaled slice, the reference-scaled copy
        if (device, dtype) not in self.cache.work:
            per_k += self.tile * isz * self.draws  # tile workspace (+ the draw)
        return per_k, 0, "; or a kind that never materializes dense tiles of R: kind='sjlt' or 'kronecker'"

    def _workspace(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """A reused ``(rows, Kpad)`` buffer (at most ``tile x Kpad``) for uncached tiles."""
        buf = self.cache.workspace((device, dtype), self.tile * self.kpad, device, dtype)
        return buf[: rows * self.kpad].view(rows, self.kpad)

    def apply(self, g: Tensor, offset: int, out: Tensor, total: int) -> Tensor:
        """``out += g @ R^T`` tile by tile; returns the first ``K`` columns scaled by ``1/sqrt(K)``."""
        p = g.shape[1]
        dev, dt = g.device, g.dtype
        form = self.cache_form(total, dev, dt)
        for t in range(offset // self.tile, (offset + p - 1) // self.tile + 1):
            j0 = max(offset, t * self.tile)
            j1 = min(offset + p, (t + 1) * self.tile)
            key = ("dense", form, j0, j1, dev, dt if form == "full" else None)
            stored = self.cache.get(key)
            if stored is None and form != "none":
                per_entry = g.element_size() if form == "full" else _BYTES_PER_ENTRY[form]
                nbytes = int((j1 - j0) * self.kpad * per_entry)
                stored = self.cache.cached(
                    key, lambda j0=j0, j1=j1: self.stored_rows(form, j0, j1, dev, dt), nbytes
                )
            if form == "full":
                rt = stored
            else:
                ws = self._workspace(j1 - j0, dev, dt)
                rt = self.rows(j0, j1, dev, dt, out=ws) if stored is None else self.expand(stored, form, ws)
            addmm_rows_(out, g[:, j0 - offset : j1 - offset], rt)
        return out[:, : self.dim] * (1.0 / math.sqrt(self.dim))


class RademacherBackend(DenseBackend):
    """``"rademacher"``: i.i.d. +-1/sqrt(K) entries, cacheable as float, int8 or packed bits."""

    compact_forms = ("int8", "bits")

    def rows(
        self, j0: int, j1: int, device: torch.device, dtype: torch.dtype, out: Tensor | None = None
    ) -> Tensor:
        keys = column_keys(j0, j1, self.words, device)
        return rademacher_rows(keys, self.kpad, self.words[2], dtype, out=out)

    def stored_rows(self, form: str, j0: int, j1: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        if form == "full":
            return self.rows(j0, j1, device, dtype)
        if form == "int8":
            return self.rows(j0, j1, device, torch.int8)
        return rademacher_bytes(column_keys(j0, j1, self.words, device), self.kpad, self.words[2])

    def expand(self, stored: Tensor, form: str, out: Tensor) -> Tensor:
        return out.copy_(stored) if form == "int8" else expand_bytes(stored, out.dtype, out=out)


class GaussianBackend(DenseBackend):
    """``"gaussian"``: i.i.d. N(0, 1/K) entries, cached as float tiles only."""

    draws = 2  # drawn in float32, then cast into the workspace

    def rows(
        self, j0: int, j1: int, device: torch.device, dtype: torch.dtype, out: Tensor | None = None
    ) -> Tensor:
        return gaussian_rows(j0, j1, self.kpad, self.words, device, dtype, out=out)
