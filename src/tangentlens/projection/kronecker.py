"""Kronecker projections (``"kronecker"``): layers projected from their captured factors.

A Linear or convolution layer's per-example gradient is ``G = sum_t delta_t a_t^T`` (``T`` positions,
input activations ``a_t``, output gradients ``delta_t``). It is sketched as ``vec(sum_t (P_out
delta_t)(P_in a_t)^T) = (P_out (x) P_in) vec(G)`` without forming ``G``: ``P_in`` (``k_in x d_in``) and
``P_out`` (``k_out x d_out``) have i.i.d. +-1/sqrt(k) entries seeded by ``(seed, layer key, side)``, so
``E[(P_out (x) P_in)^T (P_out (x) P_in)] = I`` (unbiased). With ``fold=True`` the ``k_out k_in``
features are then CountSketched (``s = 1``, keyed by the layer) into ``K`` coordinates, still unbiased,
so that the features of all layers and of the flat part can be summed into one ``K``-vector. Flattened
parameters without that structure (biases, norm affines, ...) go through the ``fallback`` flat kind.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..memory import check_memory
from .base import FactoredBackend, layer_shapes, matmul_rows
from .hashing import GEN_VERSION, check_int, column_keys, rademacher_rows, seed_words
from .sjlt import countsketch

__all__ = ["KroneckerBackend"]


class KroneckerBackend(FactoredBackend):
    """``"kronecker"``: per-layer Kronecker sketches of ``kron_dim`` coordinates, plus the flat ``fallback``.

    Args:
        spec: The projection's options (``kron_dim``, ``fold``, ``fallback`` are used here).
        label: How memory-error messages name the projection.
        flat: The fallback kind's backend (own cache and budget), used by :meth:`project`.
    """

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(kron_dim=self.spec.kron_dim, fold=self.spec.fold, fallback=d.pop("fallback"))
        return d

    def kronecker_dims(self, d_in: int, d_out: int) -> tuple[int, int]:
        """The ``(k_in, k_out)`` for a layer with ``d_in`` inputs and ``d_out`` outputs.

        The relative variance of a Kronecker sketch is about ``1/k_in + 1/k_out``, minimized at ``k_in =
        k_out = sqrt(kron_dim)`` under ``k_in k_out <= kron_dim``. Each side is capped at its dimension (a
        side with ``k = d`` uses the identity: exact, no variance), and the budget freed by a cap goes to
        the other side. So ``k_in k_out <= kron_dim``, with equality when the layer allows.
        """
        d_in = check_int("d_in", d_in, minimum=1)
        d_out = check_int("d_out", d_out, minimum=1)
        budget = self.spec.kron_dim
        if d_in * d_out <= budget:
            return d_in, d_out
        k_in = min(d_in, max(1, math.isqrt(budget)))
        k_out = min(d_out, max(1, budget // k_in))
        k_in = min(d_in, max(1, budget // k_out))
        return k_in, k_out

    def factor(
        self, key: str | int, side: str, d: int, k: int, device: torch.device, dtype: torch.dtype
    ) -> Tensor | None:
        """``P^T`` of shape ``(d, k)`` with +-1/sqrt(k) entries for ``side`` ``"in"`` or ``"out"`` of
        layer ``key``, or None for the identity (``k == d``). Cost ``d k`` entries, cached."""
        if k == d:
            return None
        words = seed_words("tangentlens.kron", GEN_VERSION, self.spec.seed, str(key), side)

        def make() -> Tensor:
            keys = column_keys(0, d, words, device)
            return rademacher_rows(keys, k, words[2], dtype) * (1.0 / math.sqrt(k))

        return self.cache.cached(
            ("kron", str(key), side, d, k, device, dtype),
            make,
            d * k * torch.empty((), dtype=dtype).element_size(),
        )

    def project_kronecker(
        self,
        a: Tensor,
        delta: Tensor,
        key: str | int,
        d_in: int,
        d_out: int,
        total_dim: int | None,
        k_in: int | None,
        k_out: int | None,
    ) -> Tensor:
        """See :meth:`tangentlens.projection.Projection.project_kronecker` (same arguments)."""
        a, delta = layer_shapes(a, delta, d_in, d_out, "project_kronecker's factors")
        n, big_t = a.shape[:2]
        reference = self.spec.scale == "reference"
        if reference and total_dim is None:
            raise InputError("scale='reference' divides by sqrt(P): pass total_dim=P.")
        ki, ko = self.kronecker_dims(d_in, d_out)
        if k_in is not None:
            ki = check_int("k_in", k_in, minimum=1)
        if k_out is not None:
            ko = check_int("k_out", k_out, minimum=1)
        if ki > d_in or ko > d_out:
            raise InputError(
                f"k_in={ki} > d_in={d_in} or k_out={ko} > d_out={d_out}: a side cannot be "
                f"projected to more coordinates than it has; use k <= d (k = d: no projection)."
            )
        dtype = self.spec.dtype or a.dtype
        m = delta.shape[1]
        dim, fold = self.dim, self.spec.fold
        folded = 2 * n * m * dim if fold else 0
        need = dtype.itemsize * (n * big_t * ki + n * m * big_t * ko + 2 * n * m * ko * ki + folded)
        check_memory(
            need, a.device,
            f"project_kronecker of layer {key!r} (dim={dim:,}, kron_dim={self.spec.kron_dim:,}, "
            f"k_in={ki:,}, k_out={ko:,}) on {n:,} rows",
            "use a smaller kron_dim (and dim), or fewer rows per call (a smaller batch_size)",
        )
        a = a.to(dtype)
        delta = delta.to(dtype)
        pin = self.factor(key, "in", d_in, ki, a.device, dtype)
        pout = self.factor(key, "out", d_out, ko, a.device, dtype)
        pa = a if pin is None else matmul_rows(a.reshape(n * big_t, d_in), pin).view(n, big_t, ki)
        if pout is None:
            pd = delta
        else:
            pd = matmul_rows(delta.reshape(n * m * big_t, d_out), pout).view(n, m, big_t, ko)
        # sum_t pd[n, m, t, o] pa[n, t, i]  -> (n, M, ko, ki); one position: an outer product (same values)
        if big_t == 1:
            feats = (pd[:, :, 0, :, None] * pa[:, None, 0, None, :]).reshape(n, m, ko * ki)
        else:
            feats = torch.matmul(pd.transpose(2, 3), pa[:, None]).reshape(n, m, ko * ki)
        if fold:
            words = seed_words("tangentlens.kron.fold", GEN_VERSION, self.spec.seed, str(key))
            out = feats.new_zeros((n * m, dim))
            countsketch(feats.reshape(n * m, ko * ki), 0, out, words, 1, self.cache, f"fold:{key}")
            feats = out.view(n, m, dim)
        if reference:
            assert total_dim is not None
            feats = feats * self.reference_factor(check_int("total_dim", total_dim, minimum=1))
        return feats
