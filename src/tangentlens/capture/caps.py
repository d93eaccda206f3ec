"""Compact captures of one block of examples and their Gram products.

A capture holds what one layer rule (or the fallback) recorded for a block of B examples and M probes, in
the cheapest form that still gives every inner product between per-example gradients exactly:

* :class:`OuterCap`: the factors (a, δ) of a weight gradient Σ_t δ_t a_tᵀ (Linear, Conv);
* :class:`EmbeddingCap`: the token ids and output gradients of an embedding table, Σ_t e_{idx_t} δ_tᵀ;
* :class:`DenseCap`: materialized per-example gradients (norm layers, the fallback, materialized layers,
  forward-only activations).

Every capture offers the same five operations: ``gram`` (a Gram block against a capture of the same layer),
``sqnorms`` (its diagonal), ``materialize`` (the flat per-example gradients), ``batch_sum`` (a weighted sum
over examples, for the first-block check) and ``nbytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def position_gram(d1: Tensor, d2: Tensor) -> Tensor:
    """Position-wise inner products of output gradients, summed over probes.

    Args:
        d1: (B1, M, T1, d) output gradients of the first block.
        d2: (B2, M, T2, d) output gradients of the second block.

    Returns:
        (B1, T1, B2, T2) with entry Σ_m δ1[i, m, t]·δ2[j, m, s]. Cost: one GEMM over (example, position)
        rows, B1·T1·B2·T2·M·d multiply-adds.
    """
    B1, M, T1, d = d1.shape
    B2, _, T2, _ = d2.shape
    D = d1.transpose(1, 2).reshape(B1 * T1, M * d) @ d2.transpose(1, 2).reshape(B2 * T2, M * d).T
    return D.reshape(B1, T1, B2, T2)


@dataclass
class OuterCap:
    """Per-example gradients Σ_t δ[b, m, t] a[b, t]ᵀ (weight) and Σ_t δ[b, m, t] (bias), kept factored.

    Inner products come from the factors, ⟨Σ_t δ_it a_itᵀ, Σ_s δ_js a_jsᵀ⟩ = Σ_{t,s} (δ_it·δ_js)(a_it·a_js)
    (plus Σ_{t,s} δ_it·δ_js for the bias), so no per-example gradient is formed.

    Attributes:
        group: the layer's module name.
        a: (B, T, d_in) input activations (or conv patches) per position.
        delta: (B, M, T, d_out) output gradients per probe and position.
        weight: the weight's parameter name, or None when the weight is not selected.
        bias: the bias's parameter name, or None when the bias is not selected (or absent).
        wshape: the weight's shape (for flattening in parameter order).
    """

    group: str
    a: Tensor
    delta: Tensor
    weight: str | None
    bias: str | None
    wshape: tuple[int, ...]

    def _a_gram(self, other: OuterCap) -> Tensor:
        # (B1, T1, B2, T2) inner products of activations (one GEMM), plus 1 for the bias, 0 without the weight
        B1, T1, _ = self.a.shape
        B2, T2, _ = other.a.shape
        if self.weight is None:
            return self.a.new_ones(B1, T1, B2, T2)
        A = (self.a.reshape(B1 * T1, -1) @ other.a.reshape(B2 * T2, -1).T).reshape(B1, T1, B2, T2)
        return A + 1 if self.bias is not None else A

    def gram(self, other: OuterCap, full: bool) -> Tensor:
        """Gram block between the per-example gradients of two captures of this layer.

        Args:
            other: the same layer's capture of another (or the same) block.
            full: keep the probe pairs.

        Returns:
            (B1, B2) Σ_m ⟨g_im, g_jm⟩, or (B1, B2, M, M) ⟨g_im, g_jn⟩ if ``full``. Cost: one position
            (T = 1): two GEMMs, B1·B2·(d_in + M·d_out); T positions: B1·B2·T1·T2·(d_in + M·d_out) with a
            (B1, T1, B2, T2) intermediate.
        """
        d1, d2 = self.delta, other.delta
        B1, M, T1, _ = d1.shape
        B2, _, T2, _ = d2.shape
        if T1 == 1 and T2 == 1:
            if self.weight is not None:
                A = self.a[:, 0] @ other.a[:, 0].T
                if self.bias is not None:
                    A = A + 1
            else:
                A = d1.new_ones(B1, B2)
            if full:
                D = d1[:, :, 0].reshape(B1 * M, -1) @ d2[:, :, 0].reshape(B2 * M, -1).T
                return A[:, :, None, None] * D.reshape(B1, M, B2, M).permute(0, 2, 1, 3)
            D = d1.reshape(B1, -1) @ d2.reshape(B2, -1).T
            return A * D
        A = self._a_gram(other)
        if full:
            return torch.einsum("itjs,imtd,jnsd->ijmn", A, d1, d2)
        return (A * position_gram(d1, d2)).sum((1, 3))

    def sqnorms(self) -> Tensor:
        """(B, M) squared norms ‖g_bm‖² of the per-example, per-probe gradients."""
        d = self.delta
        if d.shape[2] == 1:
            s = (d[:, :, 0] ** 2).sum(-1)
            if self.weight is not None:
                an = (self.a[:, 0] ** 2).sum(-1, keepdim=True)
                s = s * (an + 1 if self.bias is not None else an)
            return s
        D = d @ d.transpose(2, 3)  # (B, M, T, T)
        if self.weight is None:
            return D.sum((2, 3))
        A = self.a @ self.a.transpose(1, 2)
        if self.bias is not None:
            A = A + 1
        return (A[:, None] * D).sum((2, 3))

    def materialize(self) -> dict[str, Tensor]:
        """The per-example gradients ``{name: (B, M, p)}``: one einsum, B·M·T·d_in·d_out multiply-adds."""
        out: dict[str, Tensor] = {}
        B, M = self.delta.shape[:2]
        if self.weight is not None:
            g = torch.einsum("bmto,bti->bmoi", self.delta, self.a)
            out[self.weight] = g.reshape(B, M, -1)
        if self.bias is not None:
            out[self.bias] = self.delta.sum(2)
        return out

    def to_dense(self) -> DenseCap:
        """The same per-example gradients, materialized (see :meth:`materialize`)."""
        shapes = {}
        if self.weight:
            shapes[self.weight] = self.wshape
        if self.bias:
            shapes[self.bias] = (self.wshape[0],)
        return DenseCap(self.group, self.materialize(), shapes)

    def batch_sum(self, m: int, w: Tensor) -> dict[str, Tensor]:
        """Σ_b w_b g_bm for probe ``m``, in each parameter's own shape."""
        out: dict[str, Tensor] = {}
        d = self.delta[:, m] * w[:, None, None]
        if self.weight is not None:
            out[self.weight] = torch.einsum("bto,bti->oi", d, self.a).reshape(self.wshape)
        if self.bias is not None:
            out[self.bias] = d.sum((0, 1))
        return out

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        return self.a.numel() * self.a.element_size() + self.delta.numel() * self.delta.element_size()


@dataclass
class EmbeddingCap:
    """Per-example gradient of an embedding table, Σ_t e_{idx[b, t]} δ[b, m, t]ᵀ (one-hot rows), factored.

    Two positions contribute to an inner product only when they look up the same row:
    ⟨g_i, g_j⟩ = Σ_{t,s} [idx_it = idx_js] δ_it·δ_js.

    Attributes:
        group: the layer's module name.
        idx: (B, T) token ids; padding positions are -1.
        delta: (B, M, T, d) output gradients per probe and position.
        weight: the table's parameter name.
        num_embeddings: the table's rows V.
    """

    group: str
    idx: Tensor
    delta: Tensor
    weight: str
    num_embeddings: int

    def _match(self, other: EmbeddingCap) -> Tensor:
        # (B1, T1, B2, T2): do positions t of example i and s of example j look up the same (non-pad) row?
        i1, i2 = self.idx, other.idx
        S = (i1.reshape(-1, 1) == i2.reshape(1, -1)) & (i1.reshape(-1, 1) >= 0)
        return S.reshape(*i1.shape, *i2.shape)

    def gram(self, other: EmbeddingCap, full: bool) -> Tensor:
        """Gram block (B1, B2), or (B1, B2, M, M) if ``full``; cost B1·T1·B2·T2·M·d."""
        S = self._match(other).to(self.delta.dtype)
        if full:
            return torch.einsum("itjs,imtd,jnsd->ijmn", S, self.delta, other.delta)
        return (S * position_gram(self.delta, other.delta)).sum((1, 3))

    def sqnorms(self) -> Tensor:
        """(B, M) squared norms of the per-example, per-probe gradients."""
        S = (self.idx[:, :, None] == self.idx[:, None, :]) & (self.idx[:, :, None] >= 0)
        D = self.delta @ self.delta.transpose(2, 3)  # (B, M, T, T)
        return (S[:, None].to(D.dtype) * D).sum((2, 3))

    def _dense(self, delta: Tensor) -> Tensor:
        # delta (B, M, T, d) -> (B, M, V, d)
        B, M, T, d = delta.shape
        out = delta.new_zeros(B, M, self.num_embeddings, d)
        idx = self.idx.clamp(min=0)
        mask = (self.idx >= 0).to(delta.dtype)
        src = delta * mask[:, None, :, None]
        out.scatter_add_(2, idx[:, None, :, None].expand(B, M, T, d), src)
        return out

    def materialize(self) -> dict[str, Tensor]:
        """The per-example gradients ``{weight: (B, M, V·d)}`` (a scatter; B·M·V·d floats)."""
        B, M = self.delta.shape[:2]
        return {self.weight: self._dense(self.delta).reshape(B, M, -1)}

    def batch_sum(self, m: int, w: Tensor) -> dict[str, Tensor]:
        """Σ_b w_b g_bm for probe ``m``, scattered straight into the (V, d) table."""
        d = self.delta[:, m] * w[:, None, None]
        keep = self.idx >= 0
        out = d.new_zeros(self.num_embeddings, d.shape[-1])
        out.index_add_(0, self.idx[keep], d[keep])
        return {self.weight: out}

    def nbytes(self) -> int:
        """Bytes held by the ids and the output gradients."""
        return self.idx.numel() * 8 + self.delta.numel() * self.delta.element_size()


@dataclass
class DenseCap:
    """Materialized per-example, per-probe gradients (or activations).

    Attributes:
        group: the layer's module name (``"<fallback>"`` for the torch.func fallback).
        grads: ``{name: (B, M, p)}``.
        shapes: each parameter's own shape (for :meth:`batch_sum`).
    """

    group: str
    grads: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def gram(self, other: DenseCap, full: bool) -> Tensor:
        """Gram block (B1, B2), or (B1, B2, M, M) if ``full``: one GEMM per parameter, B1·B2·M·p."""
        out: Tensor | None = None
        for n, g1 in self.grads.items():
            g2 = other.grads[n]
            B1, M, _ = g1.shape
            B2 = g2.shape[0]
            if full:
                D = g1.reshape(B1 * M, -1) @ g2.reshape(B2 * M, -1).T
                D = D.reshape(B1, M, B2, M).permute(0, 2, 1, 3)
            else:
                D = g1.reshape(B1, -1) @ g2.reshape(B2, -1).T
            out = D if out is None else out + D
        assert out is not None
        return out

    def sqnorms(self) -> Tensor:
        """(B, M) squared norms: a batched dot product, one pass over the gradients, no squared copy."""
        return sum(torch.linalg.vecdot(g, g) for g in self.grads.values())  # type: ignore[return-value]

    def materialize(self) -> dict[str, Tensor]:
        """The gradients themselves (a shallow copy of the mapping)."""
        return dict(self.grads)

    def batch_sum(self, m: int, w: Tensor) -> dict[str, Tensor]:
        """Σ_b w_b g_bm for probe ``m``, in each parameter's own shape."""
        return {n: (w @ g[:, m]).reshape(self.shapes[n]) for n, g in self.grads.items()}

    def nbytes(self) -> int:
        """Bytes held by the gradients."""
        return sum(g.numel() * g.element_size() for g in self.grads.values())


Cap = OuterCap | EmbeddingCap | DenseCap
"""Any compact capture of one layer (or of the fallback's parameters)."""


@dataclass
class BlockCapture:
    """All compact captures of one block of examples: one per layer rule, plus the fallback's group.

    Attributes:
        caps: the captures, in the capturer's rule order (the fallback's last).
        size: the block's examples B.
    """

    caps: list[Cap]
    size: int

    def nbytes(self) -> int:
        """Bytes held by all captures of the block."""
        return sum(c.nbytes() for c in self.caps)
