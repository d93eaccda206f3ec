"""Subsampled randomized Hadamard transform (``"srht"``) per fixed column tile.

With tiles of width ``T = 2^t >= K``: ``phi = (1/sqrt(K)) sum_t S_t H_T D_t x_t``, ``D_t`` random signs
(from the global column index), ``H_T`` the +-1 Sylvester-Hadamard matrix, and ``S_t`` a seeded choice
of ``K`` of its ``T`` rows, drawn independently per tile. Each tile term is unbiased and cross-tile terms
have mean zero (independent ``D_t``), so the sum is a valid JL map whose definition does not depend on
how the columns are split among calls; ``T`` is part of the definition. ``H_T`` is applied as ``H_a (x)
H_b`` (``T = a b``): ``2 T (a + b)`` flops per row and tile instead of the dense ``2 T K``. A tile
touched by only a few columns uses the explicit ``K x p`` submatrix instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from .base import FlatBackend, matmul_rows
from .hashing import M32, check_int, column_keys, hadamard, mix32, parity_sign

__all__ = ["SRHTBackend"]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class SRHTBackend(FlatBackend):
    """``"srht"``: ``tile`` is the Hadamard order ``T`` (a power of two >= dim; default
    ``max(4096, next power of two >= dim)``).

    Raises:
        InputError: ``tile`` not a power of two >= 2, or smaller than ``dim``.
    """

    def resolve_tile(self, tile: int | None) -> int:
        t = _next_pow2(max(self.dim, 4096)) if tile is None else check_int("tile", tile)
        if t & (t - 1) or t < 2:
            raise InputError(f"srht tile must be a power of two >= 2, got {t}.")
        if self.dim > t:
            raise InputError(
                f"srht subsamples dim={self.dim} rows of a Hadamard tile of order {t}; use "
                f"tile >= {_next_pow2(self.dim)} (or leave tile=None)."
            )
        return t

    def describe(self) -> dict[str, int]:
        return {"tile": self.tile}

    def check_total(self, total: int) -> None:
        if self.dim > total:
            raise InputError(
                f"srht cannot map P={total} coordinates to more (dim={self.dim}) rows; use a "
                f"smaller dim, or kind='rademacher'/'gaussian' if you need K > P."
            )

    def working_set(self, n: int, p: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, str]:
        # output, plus the padded tile and two transform buffers of T >= K columns per row
        isz = dtype.itemsize
        return n * isz * (2 + 3 * self.tile // self.dim), n * p * isz, ""

    def _selection(self, t: int, device: torch.device) -> Tensor:
        """Sorted indices of the K Hadamard rows kept for tile ``t``."""

        def make() -> Tensor:
            tk = mix32(torch.tensor([(t & M32) ^ self.words[3]], dtype=torch.int64))
            tk = mix32((tk + (t >> 32) + self.words[1]) & M32)
            r = torch.arange(self.tile, dtype=torch.int64)
            keys = mix32(mix32(r ^ tk) ^ self.words[2])
            order = torch.argsort(keys * self.tile + r)  # ties broken by index: deterministic
            return torch.sort(order[: self.dim]).values.to(device)

        return self.cache.cached(("srht-sel", t, device), make, 8 * self.dim)

    def _factors(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``H_a`` and ``H_b`` with ``a b = T`` (``a >= b``)."""
        tbits = self.tile.bit_length() - 1
        a = 1 << ((tbits + 1) // 2)
        b = 1 << (tbits // 2)
        return self.cache.cached(
            ("srht-h", device, dtype),
            lambda: (hadamard(a, device, dtype), hadamard(b, device, dtype)),
            (a * a + b * b) * torch.empty((), dtype=dtype).element_size(),
        )

    def apply(self, g: Tensor, offset: int, out: Tensor, total: int) -> Tensor:
        n, p = g.shape
        big_t = self.tile
        ha, hb = self._factors(g.device, g.dtype)
        a, b = ha.shape[0], hb.shape[0]
        for t in range(offset // big_t, (offset + p - 1) // big_t + 1):
            j0 = max(offset, t * big_t)
            j1 = min(offset + p, (t + 1) * big_t)
            keys = column_keys(j0, j1, self.words, g.device)
            signs = (((mix32(keys ^ self.words[3]) & 1) * 2) - 1).to(g.dtype)
            x = g[:, j0 - offset : j1 - offset] * signs
            sel = self._selection(t, g.device)
            width = j1 - j0
            if width * self.dim <= big_t * (a + b):
                # explicit K x width block of S H: entries (-1)^popcount(sel & local column)
                local = torch.arange(j0 - t * big_t, j1 - t * big_t, device=g.device)
                block = self.cache.cached(
                    ("srht-block", t, j0, j1, g.device, g.dtype),
                    lambda sel=sel, local=local: parity_sign(sel[None, :] & local[:, None]).to(g.dtype),
                    width * self.dim * g.element_size(),
                )
                out += matmul_rows(x, block)
            else:
                if width == big_t:
                    full = x
                else:
                    full = x.new_zeros((n, big_t))
                    full[:, j0 - t * big_t : j1 - t * big_t] = x
                y = torch.matmul(ha, full.view(n, a, b))  # H_a X per row (one GEMM per row)
                y = matmul_rows(y.view(n * a, b), hb).view(n, big_t)  # (H_a X) H_b, H symmetric
                out += y[:, sel]
        out *= 1.0 / math.sqrt(self.dim)
        return out
