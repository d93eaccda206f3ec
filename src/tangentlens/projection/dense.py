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

from .base import FlatBackend, addmm_rows_, matmul_rows, row_step
from .hashing import column_keys, expand_bytes, gaussian_rows, rademacher_bytes, rademacher_rows

__all__ = ["DenseBackend", "RademacherBackend", "GaussianBackend"]

_BYTES_PER_ENTRY = {"int8": 1.0, "bits": 0.125}  # of the compact cache forms
_STREAMS = (
    "; or a kind that never materializes dense tiles of R: kind='sjlt' or 'kronecker', or 'khatri_rao' (the "
    "fastest with several probes)"
)


class DenseBackend(FlatBackend):
    """A dense i.i.d. matrix ``R`` (entries of unit variance, scaled by ``1/sqrt(K)``), tiled and cached."""

    out_width_padded = True
    uses_factors = True  # Linear/Conv layers with several probes: R applied through the factors
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
        return per_k, 0, _STREAMS

    def _workspace(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """A reused ``(rows, Kpad)`` buffer (at most ``tile x Kpad``) for uncached tiles."""
        buf = self.cache.workspace((device, dtype), self.tile * self.kpad, device, dtype)
        return buf[: rows * self.kpad].view(rows, self.kpad)

    def _tile(
        self, j0: int, j1: int, form: str, dev: torch.device, dt: torch.dtype, ws: Tensor | None = None
    ) -> Tensor:
        """``R^T[j0:j1]`` (within one column tile) in the compute dtype: the cached float tile, or the rows
        expanded from their compact form / generated into ``ws`` (a ``(j1 - j0, Kpad)`` buffer; the
        reused tile workspace when None)."""
        key = ("dense", form, j0, j1, dev, dt if form == "full" else None)
        stored = self.cache.get(key)
        if stored is None and form != "none":
            per_entry = dt.itemsize if form == "full" else _BYTES_PER_ENTRY[form]
            nbytes = int((j1 - j0) * self.kpad * per_entry)
            stored = self.cache.cached(key, lambda: self.stored_rows(form, j0, j1, dev, dt), nbytes)
        if form == "full":
            if ws is not None:
                return ws.copy_(stored)
            return stored
        ws = self._workspace(j1 - j0, dev, dt) if ws is None else ws
        return self.rows(j0, j1, dev, dt, out=ws) if stored is None else self.expand(stored, form, ws)

    def apply(self, g: Tensor, offset: int, out: Tensor, total: int) -> Tensor:
        """``out += g @ R^T`` tile by tile; returns the first ``K`` columns scaled by ``1/sqrt(K)``."""
        p = g.shape[1]
        dev, dt = g.device, g.dtype
        form = self.cache_form(total, dev, dt)
        for t in range(offset // self.tile, (offset + p - 1) // self.tile + 1):
            j0 = max(offset, t * self.tile)
            j1 = min(offset + p, (t + 1) * self.tile)
            addmm_rows_(out, g[:, j0 - offset : j1 - offset], self._tile(j0, j1, form, dev, dt))
        return out[:, : self.dim] * (1.0 / math.sqrt(self.dim))

    # ------------------------------------------------------------------ layers from their factors

    def takes_factors(self, d_in: int, d_out: int, positions: int, probes: int) -> bool:
        """From the factors when that is cheaper: ``T d_in d_out + M T d_out`` against ``M d_out d_in``
        multiply-adds per example and output coordinate (so for ``T = 1`` and ``M >= 2`` probes, e.g.
        proj-trNTK, about ``M`` times fewer than projecting the ``M`` materialized gradients)."""
        factored = positions * d_out * (d_in + probes)
        return factored < 0.8 * probes * d_out * d_in

    def _block(self, j0: int, j1: int, form: str, dev: torch.device, dt: torch.dtype) -> Tensor:
        """``R^T[j0:j1]`` assembled from the column tiles into a reused ``(j1 - j0, Kpad)`` buffer."""
        buf = self.cache.workspace(("block", dev, dt), (j1 - j0) * self.kpad, dev, dt)
        buf = buf[: (j1 - j0) * self.kpad].view(j1 - j0, self.kpad)
        for t in range(j0 // self.tile, (j1 - 1) // self.tile + 1):
            p0 = max(j0, t * self.tile)
            p1 = min(j1, (t + 1) * self.tile)
            self._tile(p0, p1, form, dev, dt, ws=buf[p0 - j0 : p1 - j0])
        return buf

    def project_factors(
        self, a: Tensor, delta: Tensor, key: str, weight_offset: int | None, bias_offset: int | None,
        total: int, out: Tensor | None,
    ) -> Tensor:
        """The same matrix as :meth:`project` of the materialized gradients, applied as ``sum_o sum_t
        delta_{t,o} (R_o a_t)`` where ``R_o`` holds the weight row ``o``'s columns: the products ``R_o
        a_t`` are shared by all ``M`` probes. Cost ``2 n K d_out (T d_in + M T)`` flops; the bias
        (``d_out`` columns) is projected flat."""
        n, big_t, d_in = a.shape
        m, d_out = delta.shape[1], delta.shape[3]
        dev, dt = a.device, a.dtype
        kp = self.kpad
        c = max(1, min(d_out, self.tile // d_in))  # weight rows per step (a function of the layer only)
        rows = row_step(n, big_t * c * kp)
        per_k = dt.itemsize * (n * m * (2 if out is None else 1) + 2 * c * d_in + rows * big_t * c)
        self.check_need(per_k, 0, _STREAMS, dev, f"{self.label} of a {d_out} x {d_in} layer on {n:,} rows")
        if out is None:
            out = a.new_zeros((n, m, self.dim))
        if weight_offset is not None:
            acc = a.new_zeros((n, m, kp))
            form = self.cache_form(total, dev, dt)
            a2 = a.reshape(n * big_t, d_in)
            wbuf = self.cache.workspace(("blockT", dev, dt), c * d_in * kp, dev, dt)
            for o0 in range(0, d_out, c):
                o1 = min(d_out, o0 + c)
                cc = o1 - o0
                blk = self._block(weight_offset + o0 * d_in, weight_offset + o1 * d_in, form, dev, dt)
                w = wbuf[: d_in * cc * kp].view(d_in, cc, kp)
                w.copy_(blk.view(cc, d_in, kp).permute(1, 0, 2))
                w = w.view(d_in, cc * kp)
                for r0 in range(0, n, rows):
                    r1 = min(n, r0 + rows)
                    v = self.cache.buffer(("factor-v", dev, dt), ((r1 - r0) * big_t, cc * kp), dev, dt)
                    v = matmul_rows(a2[r0 * big_t : r1 * big_t], w, out=v).view(r1 - r0, big_t * cc, kp)
                    d = delta[r0:r1, :, :, o0:o1].reshape(r1 - r0, m, big_t * cc)
                    acc[r0:r1].baddbmm_(d, v)
            out.add_(acc[:, :, : self.dim], alpha=self.reference_factor(total) / math.sqrt(self.dim))
        if bias_offset is not None:
            out += self.project(delta.sum(2).reshape(n * m, d_out), bias_offset, total).view(n, m, self.dim)
        return out


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
