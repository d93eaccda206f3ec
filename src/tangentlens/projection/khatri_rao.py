"""Khatri-Rao projections (``"khatri_rao"``): every ``K`` coordinate of a layer from its captured factors.

A Linear or convolution layer's per-example gradient is ``G = sum_t delta_t a_t^T`` (``d_out x d_in``), with
the bias gradient ``sum_t delta_t`` as one more input column (``a_t`` extended by a 1). Row ``k`` of the
layer's part of ``R`` is the Kronecker product ``alpha_k (x) beta_k / sqrt(K)`` of two +-1 vectors seeded by
``(seed, layer key, side)``, so

    phi_k = alpha_k^T G beta_k / sqrt(K) = sum_t (alpha_k . delta_t)(beta_k . a_t) / sqrt(K),

i.e. ``phi = sum_t (A delta_t) * (B a_t) / sqrt(K)`` (``A``: ``K x d_out``, ``B``: ``K x (d_in + 1)``, ``*``
elementwise) -- a row-wise Kronecker ("Khatri-Rao", or tensor) random projection. ``E[R^T R] = I``
(unbiased) and every layer lands in the same ``K`` coordinates, so the layers' parts and the ``fallback``
flat kind's part (parameters without factors: norm affines, embeddings, ...) are summed into one
``K``-vector. (A Kronecker sketch ``(P_out delta)(P_in a)^T`` of a rank-one gradient instead estimates
``<delta, delta'><a, a'>`` as the product of a ``k_out``- and a ``k_in``-dimensional projection, so its
``k_in k_out`` coordinates are only as accurate as ``min(k_in, k_out)`` dense ones; here the ``K`` rows
are independent.)

Variance (one layer, ``T = 1``, Gaussian entries, cosines ``c_a`` between the inputs and ``c_d`` between the
output gradients): ``Var <phi, phi'> = |G|^2 |G'|^2 (1 + 2 c_d^2 + 2 c_a^2 + 3 c_d^2 c_a^2) / K``, against
``|G|^2 |G'|^2 (1 + c_d^2 c_a^2) / K`` for a dense ``R``: 1 to 4 times the dense variance, the most for
aligned inputs (ReLU activations, image patches). Measured (proj-trNTK, K = 2,048, mean |projected cosine
- exact cosine|, ``benchmarks/projection_speed.py``): 1.1 times the dense Rademacher residual on the method's
MLP, 1.6 times on a small CNN.

Cost per example (multiply-adds): ``K T (d_in + M d_out)`` from the factors, or ``M d_out d_in (T + K)``
through the materialized gradient (chosen per layer, whichever is fewer; the same matrix). A dense kind
costs ``M d_out d_in K`` (``d_out d_in (T + M) K`` from the factors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..memory import check_memory
from .base import FactoredBackend, matmul_rows, row_step
from .hashing import GEN_VERSION, column_keys, rademacher_rows, seed_words

__all__ = ["KhatriRaoBackend"]


class KhatriRaoBackend(FactoredBackend):
    """``"khatri_rao"``: Linear/Conv layers from their factors into ``K`` coordinates, plus ``fallback``.

    Args:
        spec: The projection's options.
        label: How memory-error messages name the projection.
        flat: The fallback kind's backend (own cache and budget), used by :meth:`project`.
    """

    def repr_extra(self) -> str:
        return f", fallback={self.spec.fallback!r}"

    def factors(self, key: str, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype) -> tuple[
        Tensor, Tensor
    ]:
        """``(A^T, B^T)``: ``(d_out, Kpad)`` and ``(d_in + 1, Kpad)`` +-1 matrices of layer ``key`` (row
        ``d_in`` of ``B^T`` is the bias's), cached while the budget allows. Entry ``(i, k)`` is a pure
        function of ``(seed, key, side, i, k)``: a side's rows do not depend on the other side's size."""

        def side(name: str, d: int) -> Tensor:
            words = seed_words("tangentlens.khatri_rao", GEN_VERSION, self.spec.seed, str(key), name)
            return self.cache.cached(
                ("kr", str(key), name, d, device, dtype),
                lambda: rademacher_rows(column_keys(0, d, words, device), self.kpad, words[2], dtype),
                d * self.kpad * dtype.itemsize,
            )

        return side("out", d_out), side("in", d_in + 1)

    def takes_factors(self, d_in: int, d_out: int, positions: int, probes: int) -> bool:
        """Always: the kind is defined on the layer's factors."""
        return True

    @staticmethod
    def through_gradient(d_in: int, d_out: int, positions: int, probes: int, dim: int) -> bool:
        """Whether the materialized gradient is the cheaper route (fewer multiply-adds per example)."""
        t, m = positions, probes
        factored = dim * t * (d_in + m * d_out) + (dim * m * min(d_out, t) if t > 1 else 0)
        gradient = m * d_out * d_in * (t + dim) + m * d_out * dim
        return gradient < factored

    def project_factors(
        self, a: Tensor, delta: Tensor, key: str, weight_offset: int | None, bias_offset: int | None,
        total: int, out: Tensor | None,
    ) -> Tensor:
        """``out += sum_t (A delta_t) * (B a_t) / sqrt(K)`` for the weight (``weight_offset`` not None) and /
        or the bias (``bias_offset`` not None); the offsets only say which parts are selected."""
        n, big_t, d_in = a.shape
        m, d_out = delta.shape[1], delta.shape[3]
        dev, dt = a.device, a.dtype
        kp = self.kpad
        weight, bias = weight_offset is not None, bias_offset is not None
        if not weight:  # the bias alone: (A sum_t delta_t) * beta_bias
            delta = delta.sum(2, keepdim=True)
            a = a[:, :1]
            big_t = 1
        at, bt = self.factors(key, d_in, d_out, dev, dt)
        grad = weight and big_t > 1 and self.through_gradient(d_in, d_out, big_t, m, self.dim)
        if grad:
            per_row = m * d_out * (d_in + 2 * kp)
        elif big_t == 1:
            per_row = (m + 1) * kp
        else:
            per_row = big_t * kp + m * (min(d_out, big_t) + (big_t if d_out > big_t else 0)) * kp
        rows = row_step(n, per_row)
        check_memory(
            (n * m * kp * (1 if out is None else 0) + rows * per_row + (d_in + 1 + d_out) * kp) * dt.itemsize,
            dev, f"{self.label} of a {d_out} x {d_in} layer on {n:,} rows",
            "use a smaller projection dim, or fewer rows per call (a smaller batch_size)",
        )
        fresh = out is None  # written, not added to: no zero fill
        if out is None:
            out = a.new_empty((n, m, self.dim))
        scale = self.reference_factor(total) / math.sqrt(self.dim)
        k = self.dim
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            self._add_rows(out[r0:r1], a[r0:r1], delta[r0:r1], at, bt, weight, bias, grad, scale, k, fresh)
        return out

    def _buf(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return self.cache.buffer(("kr", name, like.device, like.dtype), shape, like.device, like.dtype)

    def _add_rows(
        self, out: Tensor, a: Tensor, delta: Tensor, at: Tensor, bt: Tensor, weight: bool, bias: bool,
        grad: bool, scale: float, k: int, fresh: bool,
    ) -> None:
        """``out += scale * features`` of a few rows (``out = ...`` when ``fresh``; one step of
        :meth:`project_factors`). Intermediates go to reused buffers."""
        n, big_t, d_in = a.shape
        m, d_out = delta.shape[1], delta.shape[3]
        kp = at.shape[1]
        if grad:  # G = sum_t delta_t a_t^T, then phi_k = alpha_k^T G beta_k
            g = torch.einsum("bmto,bti->bmoi", delta, a)
            w = torch.matmul(g, bt[:d_in], out=self._buf("w", (n, m, d_out, kp), a))
            if bias:
                w += delta.sum(2)[..., None] * bt[d_in]
            f = w.mul_(at).sum(2)[..., :k]
            if fresh:
                torch.mul(f, scale, out=out)
            else:
                out.add_(f, alpha=scale)
            return
        if weight:
            u = matmul_rows(a.reshape(n * big_t, d_in), bt[:d_in], out=self._buf("u", (n * big_t, kp), a))
            if bias:
                u += bt[d_in]
        else:
            u = bt[d_in].expand(n * big_t, kp)
        if big_t == 1:
            v = matmul_rows(delta.reshape(n * m, d_out), at, out=self._buf("v", (n * m, kp), a))
            v = v.view(n, m, kp)
            us = (u * scale).reshape(n, 1, kp)[..., :k]
            if fresh:
                torch.mul(v[..., :k], us, out=out)
            else:
                out.addcmul_(v[..., :k], us)
            return
        f = self._positions(delta, u.reshape(n, 1, big_t, kp), at)[..., :k]
        if fresh:
            torch.mul(f, scale, out=out)
        else:
            out.add_(f, alpha=scale)

    def _positions(self, delta: Tensor, u: Tensor, at: Tensor) -> Tensor:
        """``sum_t (A delta_t) * u_t``, ``(n, M, Kpad)``, for ``T > 1`` positions."""
        n, m, big_t, d_out = delta.shape
        kp = at.shape[1]
        if d_out <= big_t:  # H_m = sum_t delta_{m,t} (B a_t)^T, then phi_k = sum_o A[k, o] H_m[o, k]
            dt = delta.transpose(2, 3).reshape(n, m * d_out, big_t)
            h = torch.bmm(dt, u.reshape(n, big_t, kp), out=self._buf("h", (n, m * d_out, kp), u))
            return h.view(n, m, d_out, kp).mul_(at).sum(2)  # no copy of u per probe
        v = matmul_rows(delta.reshape(n * m * big_t, d_out), at, out=self._buf("v", (n * m * big_t, kp), u))
        return v.view(n, m, big_t, kp).mul_(u).sum(2)
