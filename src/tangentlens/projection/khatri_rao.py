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

Where the time goes: the GEMMs above, plus passes over ``(rows, M, K)`` intermediates as large as the
features. These are made a few rows at a time (``base.cache_rows``: about 2**19 entries), so they stay in
the CPU caches: the one-position layers of a block are summed chunk by chunk of rows, every layer adding to
the chunk before the next chunk (:meth:`KhatriRaoBackend.project_factor_layers`); a layer with positions
computes ``B a_t`` for a step of rows in one GEMM and the per-probe products row by row; through the gradient,
the bias is one more input column of the same GEMM; and the products of the one-position layers are made in
panels of at most 2048 columns (``base.column_panels``: wider GEMMs run ~40% slower here). Measured (one
thread, ``K = 2,048``, 10 probes, time inside the projection, against the same computation a whole block at
a time, alternating runs on a shared machine): the method's MLP 1.1 to 1.4 times faster, a small CNN 1.5
to 1.6 times.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..memory import check_memory
from .base import FactoredBackend, LayerFactors, cache_rows, column_panels, matmul_rows, row_step
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
        lay = LayerFactors(a, delta, key, weight_offset, bias_offset)
        return self.project_factor_layers([lay], total, out)

    def project_factor_layers(
        self, layers: list[LayerFactors], total: int, out: Tensor | None, add: bool = True
    ) -> Tensor:
        """Several layers summed into ``out``: each weight with positions (``T > 1``) on its own
        (:meth:`_positions_layer`), then every one-position layer and every bias-only part together
        (:meth:`_one_position_layers`). Rows are computed a few at a time so that their intermediates stay
        in the CPU caches; a row never depends on the others."""
        fresh = out is None or not add  # the first part written, not added (no zero fill)
        single: list[LayerFactors] = []
        for lay in layers:
            if lay.a.shape[1] > 1 and lay.weight_offset is not None:
                out, fresh = self._positions_layer(lay, total, out, fresh), False
            else:
                single.append(lay)
        if single:
            out = self._one_position_layers(single, total, out, fresh)
        assert out is not None
        return out

    def _buf(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return self.cache.buffer(("kr", name, like.device, like.dtype), shape, like.device, like.dtype)

    def _check(self, need_entries: int, dev: torch.device, dt: torch.dtype, what: str) -> None:
        check_memory(need_entries * dt.itemsize, dev, f"{self.label} of {what}",
                     "use a smaller projection dim, or fewer rows per call (a smaller batch_size)")

    def _one_position_layers(
        self, layers: list[LayerFactors], total: int, out: Tensor | None, fresh: bool
    ) -> Tensor:
        """One-position layers (and bias-only parts: ``delta`` summed over positions) fused: per step of
        rows, ``u_l = (B_l [a_l; 1]) / sqrt(K)`` of each layer (one GEMM per layer, ``(rows, Kpad)``); then
        chunk by chunk of a few rows (``cache_rows``), for each layer in turn, ``v = delta_l A_l^T``
        (``(chunk M, Kpad)``) and ``out_chunk += v * u_l``: the chunk's features and ``v`` stay in the CPU
        caches across the layers instead of streaming through memory once per layer."""
        a0, m = layers[0].a, layers[0].delta.shape[1]
        n, dev, dt, kp, k = a0.shape[0], a0.device, a0.dtype, self.kpad, self.dim
        panels = column_panels(k)  # GEMMs of at most 2048 output columns
        width = panels[0][1]
        rows = row_step(n, len(layers) * kp)  # the u_l of a step
        chunk = cache_rows(rows, m * width)
        factors = sum(lay.a.shape[2] + 1 + lay.delta.shape[3] for lay in layers) * kp
        self._check((n * m * k if out is None else 0) + rows * len(layers) * kp + chunk * m * width + factors,
                    dev, dt, f"{len(layers)} layers on {n:,} rows")
        if out is None:
            out = a0.new_empty((n, m, k))
        scale = self.reference_factor(total) / math.sqrt(k)
        parts = []
        for lay in layers:
            d_in, d_out = lay.a.shape[2], lay.delta.shape[3]
            at, bt = self.factors(lay.key, d_in, d_out, dev, dt)
            delta = lay.delta.sum(2) if lay.delta.shape[2] > 1 else lay.delta[:, :, 0]  # (n, M, d_out)
            parts.append((lay, at, bt, delta))
        vbuf = self._buf("v", (chunk * m * width,), a0)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            us = []
            for i, (lay, _, bt, _) in enumerate(parts):
                d_in = lay.a.shape[2]
                if lay.weight_offset is None:  # the bias alone: (A sum_t delta_t) * beta_bias
                    us.append((bt[d_in] * scale).expand(r1 - r0, kp))
                    continue
                u = matmul_rows(lay.a[r0:r1, 0], bt[:d_in], out=self._buf(f"u{i}", (r1 - r0, kp), a0))
                if lay.bias_offset is not None:
                    u += bt[d_in]
                us.append(u.mul_(scale))
            for c0 in range(r0, r1, chunk):
                c1 = min(r1, c0 + chunk)
                for j0, j1 in panels:
                    o = out[c0:c1, :, j0:j1]
                    v = vbuf[: (c1 - c0) * m * (j1 - j0)].view((c1 - c0) * m, j1 - j0)
                    for i, (_, at, _, delta) in enumerate(parts):
                        d = delta[c0:c1].reshape((c1 - c0) * m, -1)
                        vv = matmul_rows(d, at[:, j0:j1], out=v).view(c1 - c0, m, j1 - j0)
                        u = us[i][c0 - r0 : c1 - r0, None, j0:j1]
                        if fresh and i == 0:
                            torch.mul(vv, u, out=o)
                        else:
                            o.addcmul_(vv, u)
        return out

    def _positions_layer(self, lay: LayerFactors, total: int, out: Tensor | None, fresh: bool) -> Tensor:
        """``out += sum_t (A delta_t) * (B [a_t; 1]) / sqrt(K)`` of a weight with ``T > 1`` positions, by
        the cheaper route: through the gradient ``[G | g_b] = sum_t delta_t [a_t; 1]^T`` (``M d_out (d_in
        + 1)`` per example), ``phi_k = alpha_k^T [G | g_b] beta_k``; or from the factors, ``u_t = B [a_t;
        1]`` for a step of rows (one GEMM), then per row ``sum_t (A delta_t) * u_t``."""
        a, delta = lay.a, lay.delta
        n, big_t, d_in = a.shape
        m, d_out = delta.shape[1], delta.shape[3]
        dev, dt, kp, k = a.device, a.dtype, self.kpad, self.dim
        bias = lay.bias_offset is not None
        at, bt = self.factors(lay.key, d_in, d_out, dev, dt)
        grad = self.through_gradient(d_in, d_out, big_t, m, self.dim)
        if grad:
            rows = chunk = cache_rows(n, m * d_out * (d_in + 1 + kp))
            per_row = m * d_out * kp
        else:  # u of a step of rows (about 2 CACHE_ELEMS entries: a GEMM on enough rows), then a few rows
            rows = cache_rows(n, big_t * kp // 2)
            per_row = m * (min(d_out, big_t) + (big_t if d_out > big_t else 0)) * kp
            chunk = cache_rows(rows, per_row)
        self._check((n * m * k if out is None else 0) + rows * big_t * kp + chunk * per_row
                    + (d_in + 1 + d_out) * kp, dev, dt, f"a {d_out} x {d_in} layer on {n:,} rows")
        if out is None:
            out = a.new_empty((n, m, k))
        scale = self.reference_factor(total) / math.sqrt(k)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            if grad:
                f = self._through_gradient(a[r0:r1], delta[r0:r1], at, bt, bias)[..., :k]
                self._write(out[r0:r1], f, scale, fresh)
                continue
            u = self._buf("u", ((r1 - r0) * big_t, kp), a)
            u = matmul_rows(a[r0:r1].reshape(-1, d_in), bt[:d_in], out=u)
            if bias:
                u += bt[d_in]
            u = u.view(r1 - r0, 1, big_t, kp)
            for c0 in range(r0, r1, chunk):
                c1 = min(r1, c0 + chunk)
                f = self._positions(delta[c0:c1], u[c0 - r0 : c1 - r0], at)[..., :k]
                self._write(out[c0:c1], f, scale, fresh)
        return out

    @staticmethod
    def _write(out: Tensor, f: Tensor, scale: float, fresh: bool) -> None:
        if fresh:
            torch.mul(f, scale, out=out)
        else:
            out.add_(f, alpha=scale)

    def _through_gradient(self, a: Tensor, delta: Tensor, at: Tensor, bt: Tensor, bias: bool) -> Tensor:
        """``alpha_k^T [G | g_b] beta_k`` of a few rows, ``(n, M, Kpad)`` (a reused buffer)."""
        n, m, d_out = a.shape[0], delta.shape[1], delta.shape[3]
        g = torch.einsum("bmto,bti->bmoi", delta, a)
        if bias:
            g = torch.cat([g, delta.sum(2)[..., None]], 3)
        cols = g.shape[3]
        w = self._buf("w", (n * m * d_out, at.shape[1]), a)
        w = matmul_rows(g.reshape(n * m * d_out, cols), bt[:cols], out=w)
        return w.view(n, m, d_out, -1).mul_(at).sum(2)

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
