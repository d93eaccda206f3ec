"""Per-example gradient structure: one batched forward, one batched backward per output probe.

For a probe vector v (over the C logits) the per-example gradient of v·f(x) with respect to the parameters of
a Linear, Conv1d/Conv2d or Embedding layer is a sum over positions t of outer products δ_t a_tᵀ (output
gradient times input activation or patch); for norm-affine parameters it is Σ_t δ_t ⊙ x̂_t. Forward hooks
record a (or x̂, or token ids); tensor hooks on the module outputs record δ during a batched backward pass
per probe. Captures are *compact*: inner products between examples are computed from the factors,

    ⟨Σ_t δ_it a_itᵀ, Σ_s δ_js a_jsᵀ⟩ = Σ_{t,s} (δ_it·δ_js)(a_it·a_js),

so for an MLP (one position) a Gram block costs two small matrix products and never forms a per-example
gradient. Where the factored form is more expensive than the gradient itself (many positions, e.g.
convolutions), the capture materializes per-example gradients (one batched einsum) instead.

Every other selected parameter (custom layers, attention in-projections, weight-tied parameters, layers
called functionally) falls back to per-example vector-Jacobian products with ``torch.func`` (``vmap`` over
examples), and to a plain per-example loop if ``vmap`` cannot trace the model.

Modules must be called batch-first. A module called on an input shared by the whole batch (first
dimension 1 in a block of B > 1: BERT's default ``position_ids`` of shape (1, L), a buffer, a constant)
has its output expanded to (B, ...) before the network uses it, so each example's gradient reaches its own
copy and stays exact; if that expansion changes the network's logits (the output was broadcast along
another axis, or reduced), or a module's input is not batch-first at all (unbatched, sequence-first), its
parameters use the fallback.

On the first block of every call, a randomly weighted sum over examples of the hook-based per-example
gradients, Σ_i w_i g_i with fixed pseudo-random w_i in [0.5, 1.5), is checked against autograd's gradient
of Σ_i w_i v_i·f(x_i) (one extra backward pass). Unlike a plain batch sum, this sees gradients credited to
the wrong example. A parameter whose hook-based gradient does not match (a weight also used outside its
module, a batch laid out elsewhere) is moved to the fallback path with a warning, so results are exact
either way.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError, NonFiniteError, UnsupportedLayerError, UnsupportedLayerWarning
from .inputs import Batch, batch_size_of, slice_batch
from .network import call_model, extract_logits

ProbeFn = Callable[[Tensor, "Tensor | None"], Tensor]
"""Maps detached logits (B, C) and labels (B,) or None to probe vectors (B, M, C)."""


# --------------------------------------------------------------------------------------------------
# Compact captures of one block and their Gram products
# --------------------------------------------------------------------------------------------------


@dataclass
class OuterCap:
    """Per-example gradients Σ_t δ[b, m, t] a[b, t]ᵀ (weight) and Σ_t δ[b, m, t] (bias).

    a: (B, T, d_in); delta: (B, M, T, d_out). ``weight``/``bias`` are parameter names, or None when that
    parameter is not selected; ``wshape`` is the weight's shape (for flattening in parameter order).
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
                D = (d1[:, :, 0].reshape(B1 * M, -1) @ d2[:, :, 0].reshape(B2 * M, -1).T)
                return A[:, :, None, None] * D.reshape(B1, M, B2, M).permute(0, 2, 1, 3)
            D = d1.reshape(B1, -1) @ d2.reshape(B2, -1).T
            return A * D
        # Σ_{t,s} (a_it·a_js)(δ_it·δ_js): two GEMMs over (example, position) rows, O(B1·T1·B2·T2) memory
        A = self._a_gram(other)
        if full:
            return torch.einsum("itjs,imtd,jnsd->ijmn", A, d1, d2)
        return (A * _position_gram(d1, d2)).sum((1, 3))

    def sqnorms(self) -> Tensor:
        """(B, M) squared norms of the per-example, per-probe gradients."""
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
        out: dict[str, Tensor] = {}
        B, M = self.delta.shape[:2]
        if self.weight is not None:
            g = torch.einsum("bmto,bti->bmoi", self.delta, self.a)
            out[self.weight] = g.reshape(B, M, -1)
        if self.bias is not None:
            out[self.bias] = self.delta.sum(2)
        return out

    def batch_sum(self, m: int, w: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        d = self.delta[:, m] * w[:, None, None]
        if self.weight is not None:
            out[self.weight] = torch.einsum("bto,bti->oi", d, self.a).reshape(self.wshape)
        if self.bias is not None:
            out[self.bias] = d.sum((0, 1))
        return out

    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.delta.numel() * self.delta.element_size()


@dataclass
class EmbeddingCap:
    """Per-example gradient of an embedding table: Σ_t e_{idx[b, t]} δ[b, m, t]ᵀ (one-hot rows)."""

    group: str
    idx: Tensor  # (B, T) long; padding positions already set to -1
    delta: Tensor  # (B, M, T, d)
    weight: str
    num_embeddings: int

    def _match(self, other: EmbeddingCap) -> Tensor:
        # (B1, T1, B2, T2): do positions t of example i and s of example j look up the same (non-pad) row?
        i1, i2 = self.idx, other.idx
        S = (i1.reshape(-1, 1) == i2.reshape(1, -1)) & (i1.reshape(-1, 1) >= 0)
        return S.reshape(*i1.shape, *i2.shape)

    def gram(self, other: EmbeddingCap, full: bool) -> Tensor:
        S = self._match(other).to(self.delta.dtype)
        if full:
            return torch.einsum("itjs,imtd,jnsd->ijmn", S, self.delta, other.delta)
        return (S * _position_gram(self.delta, other.delta)).sum((1, 3))

    def sqnorms(self) -> Tensor:
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
        B, M = self.delta.shape[:2]
        return {self.weight: self._dense(self.delta).reshape(B, M, -1)}

    def batch_sum(self, m: int, w: Tensor) -> dict[str, Tensor]:
        # Σ_i w_i Σ_t e_{idx[i, t]} δ[i, m, t]ᵀ scattered straight into the (V, d) table
        d = self.delta[:, m] * w[:, None, None]
        keep = self.idx >= 0
        out = d.new_zeros(self.num_embeddings, d.shape[-1])
        out.index_add_(0, self.idx[keep], d[keep])
        return {self.weight: out}

    def nbytes(self) -> int:
        return self.idx.numel() * 8 + self.delta.numel() * self.delta.element_size()


@dataclass
class DenseCap:
    """Materialized per-example, per-probe gradients ``{name: (B, M, p)}``."""

    group: str
    grads: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def gram(self, other: DenseCap, full: bool) -> Tensor:
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
        # a batched dot product: one pass over the (large) gradients, no squared copy
        return sum(torch.linalg.vecdot(g, g) for g in self.grads.values())  # type: ignore[return-value]

    def materialize(self) -> dict[str, Tensor]:
        return dict(self.grads)

    def batch_sum(self, m: int, w: Tensor) -> dict[str, Tensor]:
        return {n: (w @ g[:, m]).reshape(self.shapes[n]) for n, g in self.grads.items()}

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grads.values())


Cap = OuterCap | EmbeddingCap | DenseCap


def _position_gram(d1: Tensor, d2: Tensor) -> Tensor:
    """(B1, T1, B2, T2) = Σ_m δ1[i, m, t]·δ2[j, m, s], as one GEMM over (example, position) rows."""
    B1, M, T1, d = d1.shape
    B2, _, T2, _ = d2.shape
    D = d1.transpose(1, 2).reshape(B1 * T1, M * d) @ d2.transpose(1, 2).reshape(B2 * T2, M * d).T
    return D.reshape(B1, T1, B2, T2)


@dataclass
class BlockCapture:
    """All compact captures of one block of examples (one per layer rule, plus the fallback group)."""

    caps: list[Cap]
    size: int

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caps)


# --------------------------------------------------------------------------------------------------
# Layer rules: forward hooks record inputs, tensor hooks record output gradients per probe
# --------------------------------------------------------------------------------------------------


class _Rule:
    """Base class: hooks on one module, recording per call (input data, output gradient per probe).

    A call is *aligned* when the module's input and output carry the block's batch as their first
    dimension. A *broadcast* call (input and output of batch 1 in a block of B > 1 examples: a layer fed
    ``position_ids`` of shape (1, L), a buffer, a constant) is made per-example exactly: its output is
    expanded to (B, ...) before the rest of the network sees it (which broadcasting makes the same
    values), so the gradient of each example's output reaches its own copy, and its input is recorded
    expanded. Any other call (a batch laid out elsewhere, e.g. sequence-first) marks the rule
    ``misaligned``; its parameters then use the exact per-example fallback.
    """

    def __init__(self, group: str, module: nn.Module, names: dict[str, str]) -> None:
        self.group = group
        self.module = module
        self.names = names  # role ("weight"/"bias") -> selected parameter name
        self.active = False
        self.batch = 0  # examples in the block being captured
        self.expanded = False  # a broadcast call was expanded to the block's batch
        self.expand = True  # expand broadcast calls (False: pass them through, for the first-block check)
        self.misaligned: str | None = None  # why a call could not be attributed to examples
        self.records: list[Any] = []
        self.outs: list[Tensor] = []
        self.grads: list[list[Tensor | None]] = []
        self.allow_dense = True  # may a factored capture be materialized when that is cheaper?
        self.dense: bool | None = None  # materialize? fixed on the first block (captures must pair)
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    def reset(self) -> None:
        self.records, self.outs, self.grads = [], [], []
        self.expanded = False
        self.misaligned = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        if not self.active or not isinstance(out, Tensor) or not out.requires_grad:
            return None
        x = args[0] if args else kwargs.get("input")
        B = self.batch
        bx = int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else None
        bo = int(out.shape[0]) if out.dim() > 0 else None
        if bx == B and bo == B:
            seen = out
        elif bx == 1 and bo == 1 and B > 1:
            if not self.expand:
                return None
            x = x.expand(B, *x.shape[1:])  # type: ignore[union-attr]
            seen = out.expand(B, *out.shape[1:])
            self.expanded = True
        else:
            shape = None if not isinstance(x, Tensor) else tuple(x.shape)
            self.misaligned = (
                f"called on an input of shape {shape} with output {tuple(out.shape)} in a block of {B} "
                "examples"
            )
            return None
        self.records.append(self.record(x))
        self.outs.append(seen)
        # Downstream code gets a copy, so an in-place op after this module (ReLU(inplace=True)) cannot
        # change the tensor whose gradient we request.
        return seen.clone()

    def deltas(self, call: int, M: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Output gradients of one call stacked over probes: (B, M, *out_shape).

        Probes whose gradient never reached this module (the output does not depend on it) give zeros of
        ``shape``, the output's shape.
        """
        got = [g for g in self.grads[call] if g is not None]
        if got:
            shape = tuple(got[0].shape)
        zero = like.new_zeros(shape)
        return torch.stack([zero if g is None else g for g in self.grads[call]], 1)

    def record(self, x: Tensor) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self, M: int) -> Cap:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def fired(self) -> bool:
        return bool(self.records)

    def params(self) -> list[str]:
        return list(self.names.values())


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _materialize_is_cheaper(T: int, d_in: int, d_out: int, M: int) -> bool:
    # pairwise cost of the factored form vs the materialized gradient (per pair of examples)
    return T > 1 and T * T * (d_in + M * d_out) > M * d_in * d_out


def _to_dense(cap: OuterCap) -> DenseCap:
    shapes = {}
    if cap.weight:
        shapes[cap.weight] = cap.wshape
    if cap.bias:
        shapes[cap.bias] = (cap.wshape[0],)
    return DenseCap(cap.group, cap.materialize(), shapes)


class _OuterRule(_Rule):
    """Layers whose weight gradient is Σ_t δ_t a_tᵀ: subclasses give (a, δ) per recorded call."""

    def pair(self, call: int, M: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self, M: int) -> Cap:
        pairs = [self.pair(i, M) for i in range(len(self.records))]
        a = _cat([p[0] for p in pairs], 1)
        d = _cat([p[1] for p in pairs], 2)
        w = self.module.weight  # type: ignore[union-attr]
        cap = OuterCap(self.group, a, d, self.names.get("weight"), self.names.get("bias"), tuple(w.shape))
        if self.dense is None:
            self.dense = self.allow_dense and _materialize_is_cheaper(a.shape[1], a.shape[2], d.shape[3], M)
        return _to_dense(cap) if self.dense else cap


class LinearRule(_OuterRule):
    def record(self, x: Tensor) -> Tensor:
        return x.detach().reshape(x.shape[0], -1, x.shape[-1])

    def pair(self, call: int, M: int) -> tuple[Tensor, Tensor]:
        a = self.records[call]
        B, T, _ = a.shape
        dout = self.module.out_features  # type: ignore[union-attr]
        return a, self.deltas(call, M, (B, T, dout), a).reshape(B, M, T, dout)


class ConvRule(_OuterRule):
    """Conv1d/Conv2d with groups=1 and zero padding: patches via unfold (im2col)."""

    def record(self, x: Tensor) -> Tensor:
        return x.detach()

    def _unfold(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.Conv1d):
            x4 = x.unsqueeze(2)
            k, s, p, d = (1, m.kernel_size[0]), (1, m.stride[0]), (0, m.padding[0]), (1, m.dilation[0])  # type: ignore[index]
        else:
            x4 = x
            k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation  # type: ignore[assignment]
        cols = F.unfold(x4, k, dilation=d, padding=p, stride=s)  # (B, Cin*k, L)
        return cols.transpose(1, 2)

    def pair(self, call: int, M: int) -> tuple[Tensor, Tensor]:
        a = self._unfold(self.records[call])
        B, T, _ = a.shape
        cout = self.module.out_channels  # type: ignore[union-attr]
        d = self.deltas(call, M, (B, cout, T), a)
        return a, d.reshape(B, M, cout, T).transpose(2, 3)


class EmbeddingRule(_Rule):
    def record(self, x: Tensor) -> Tensor:
        idx = x.detach().reshape(x.shape[0], -1).long()
        pad = self.module.padding_idx  # type: ignore[union-attr]
        if pad is not None:
            idx = torch.where(idx == pad, torch.full_like(idx, -1), idx)
        return idx

    def finalize(self, M: int) -> Cap:
        m = self.module
        d_model = m.embedding_dim  # type: ignore[union-attr]
        w = m.weight  # type: ignore[union-attr]
        idx_parts, d_parts = [], []
        for i, idx in enumerate(self.records):
            B, T = idx.shape
            d = self.deltas(i, M, (B, T, d_model), w)
            idx_parts.append(idx)
            d_parts.append(d.reshape(B, M, T, d_model))
        return EmbeddingCap(
            self.group,
            _cat(idx_parts, 1),
            _cat(d_parts, 2),
            self.names["weight"],
            m.num_embeddings,  # type: ignore[union-attr]
        )


class NormRule(_Rule):
    """LayerNorm (elementwise affine) and BatchNorm with running statistics (eval mode): y = x̂ ⊙ w + b."""

    def record(self, x: Tensor) -> Tensor:
        m = self.module
        x = x.detach()
        if isinstance(m, nn.LayerNorm):
            dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            return (x - mean) / torch.sqrt(var + m.eps)
        assert isinstance(m, nn.modules.batchnorm._BatchNorm)
        shape = [1, -1] + [1] * (x.dim() - 2)
        rm = m.running_mean.reshape(shape)  # type: ignore[union-attr]
        rv = m.running_var.reshape(shape)  # type: ignore[union-attr]
        return (x - rm) / torch.sqrt(rv + m.eps)

    def _reduce(self, t: Tensor) -> Tensor:
        # sum a (B, M, *shape) tensor over the positions that share the affine parameters -> (B, M, p)
        m = self.module
        B, M = t.shape[:2]
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            t = t.reshape(B, M, -1, *t.shape[t.dim() - k :]).sum(2)
            return t.reshape(B, M, -1)
        t = t.reshape(B, M, t.shape[2], -1).sum(-1)
        return t

    def finalize(self, M: int) -> Cap:
        grads: dict[str, Tensor] = {}
        for i, xh in enumerate(self.records):
            d = self.deltas(i, M, tuple(xh.shape), xh)
            if "weight" in self.names:
                gw = self._reduce(d * xh[:, None])
                n = self.names["weight"]
                grads[n] = grads[n] + gw if n in grads else gw
            if "bias" in self.names:
                gb = self._reduce(d)
                n = self.names["bias"]
                grads[n] = grads[n] + gb if n in grads else gb
        shapes = {n: tuple(getattr(self.module, r).shape) for r, n in self.names.items()}
        return DenseCap(self.group, grads, shapes)


def _rule_class(module: nn.Module) -> type[_Rule] | None:
    if type(module) is nn.Linear or (
        isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    ):
        return LinearRule
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and type(module).forward in (
        nn.Conv1d.forward,
        nn.Conv2d.forward,
    ):
        if module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return ConvRule
        if module.groups == 1 and module.padding == "valid":
            return ConvRule
        return None
    if type(module) is nn.Embedding:
        if module.max_norm is None and not module.scale_grad_by_freq:
            return EmbeddingRule
        return None
    if type(module) is nn.LayerNorm and module.elementwise_affine:
        return NormRule
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if module.affine and module.track_running_stats and module.running_mean is not None:
            return NormRule
    return None


# --------------------------------------------------------------------------------------------------
# Fallback: per-example vector-Jacobian products with torch.func
# --------------------------------------------------------------------------------------------------


def _unsqueeze(x: Batch) -> Batch:
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    return {k: (v.unsqueeze(0) if isinstance(v, Tensor) else v) for k, v in x.items()}


class Fallback:
    """Per-example, per-probe gradients of arbitrary parameters via ``torch.func`` (vmap of vjp).

    Cost: one per-example forward and M vector-Jacobian products per example (vectorized by ``vmap``);
    memory B·M·P_fallback per block.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.model = model
        self.params = params
        self.use_loop = False

    def _single(self, p: dict[str, Tensor], x: Batch) -> Tensor:
        xb = _unsqueeze(x)
        if isinstance(xb, dict):
            res = torch.func.functional_call(self.model, p, args=(), kwargs=xb, strict=False)
        else:
            res = torch.func.functional_call(self.model, p, (xb,), strict=False)
        return extract_logits(res, check=False)[0]

    def __call__(self, x: Batch, V: Tensor) -> DenseCap:
        names = list(self.params)
        shapes = {n: tuple(self.params[n].shape) for n in names}
        if not self.use_loop:
            try:
                grads = self._vmap(x, V)
            except Exception as e:  # noqa: BLE001 - any tracing failure falls back to the loop
                warnings.warn(
                    f"torch.func.vmap could not trace the model ({type(e).__name__}: {e}); "
                    "falling back to a per-example loop for the fallback parameters (slower, still exact).",
                    UnsupportedLayerWarning,
                    stacklevel=4,
                )
                self.use_loop = True
        if self.use_loop:
            grads = self._loop(x, V)
        B, M = V.shape[:2]
        return DenseCap("<fallback>", {n: grads[n].reshape(B, M, -1) for n in names}, shapes)

    def _vmap(self, x: Batch, V: Tensor) -> dict[str, Tensor]:
        primals = {n: p.detach() for n, p in self.params.items()}

        def one(x_i: Batch, v_i: Tensor) -> dict[str, Tensor]:
            _, vjp_fn = torch.func.vjp(lambda p: self._single(p, x_i), primals)
            return torch.func.vmap(vjp_fn)(v_i)[0]

        with torch.no_grad():  # torch.func transforms still differentiate; no outer graph is recorded
            out = torch.func.vmap(one)(x, V)
        return {n: g.detach() for n, g in out.items()}

    def _loop(self, x: Batch, V: Tensor) -> dict[str, Tensor]:
        B, M = V.shape[:2]
        ps = list(self.params.values())
        out: dict[str, list[Tensor]] = {n: [] for n in self.params}
        for i in range(B):
            xi = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]
            logits = extract_logits(call_model(self.model, xi), 1)[0]
            per_m = []
            for m in range(M):
                per_m.append(torch.autograd.grad(logits, ps, V[i, m], retain_graph=True, allow_unused=True))
            for k, n in enumerate(self.params):
                out[n].append(
                    torch.stack([g[k] if g[k] is not None else torch.zeros_like(ps[k]) for g in per_m])
                )
        return {n: torch.stack(v).detach() for n, v in out.items()}


# --------------------------------------------------------------------------------------------------
# The capturer: sets up rules, checks them on the first block, captures blocks
# --------------------------------------------------------------------------------------------------

IMPLEMENTATIONS = ("auto", "hooks", "functional")
"""How per-example gradients are computed (see :class:`GradientCapture`)."""

DENSE_ADVANTAGE = 4
"""Materialize a layer's per-example gradients only where the factored Gram is this many times more work
per pair: materializing costs T·M·d_in·d_out per example and its Gram is bound by memory traffic."""


@dataclass
class CapturePlan:
    """How a call captures its blocks (see :meth:`GradientCapture.plan`).

    Attributes:
        block: examples per capture (≤ the caller's ``batch_size``).
        fits: the most examples per capture the working budget allows (``block`` may be smaller, to keep
            Gram tiles near ``GRAM_TILE_BYTES``).
        per_example: bytes of one example's captures (what a cached column costs).
        working: bytes of working memory per example of a block.
        activations: bytes the forward saves for backward, per example.
        dropped: layers not materialized because the captures would not fit the cache budget.
        capture: the trial's capture when the trial was the whole first block (to be used as its capture).
    """

    block: int
    fits: int
    per_example: int
    working: int
    activations: int
    dropped: list[str]
    capture: BlockCapture | None = None


GRAM_TILE_BYTES = 4 * 2**20
"""Position-wise Gram intermediates of one pair of blocks are kept near this size: larger tiles are no
faster (a MiniLM-sized BERT, 30 tokens, N = 48, 1 thread: blocks of 12 or 16 examples 4.7-4.8 s, 24
5.8 s, one block of 48 6.4 s), and a symmetric kernel computes only the upper triangle of its block pairs."""


class _RuleCost(NamedTuple):
    """Per-example bytes of one layer rule, measured by the planning capture."""

    rule: _Rule
    factored: float  # its compact capture
    dense: float  # its materialized per-example gradients
    pair: float  # the largest intermediate of one pair of examples in a position-wise Gram block
    candidate: bool  # materialize it if the cache allows


def _largest_block(w: float, g: float, budget: float, limit: int, tile: bool = True) -> int:
    """The largest s ≤ limit (at least 1) with s·w + s²·g ≤ budget (and s²·g ≤ ``GRAM_TILE_BYTES``)."""
    if g > 0:
        s = (-w + math.sqrt(w * w + 4 * g * budget)) / (2 * g)
        if tile:
            s = min(s, math.sqrt(GRAM_TILE_BYTES / g))
    else:
        s = budget / max(w, 1.0)
    return int(max(1, min(limit, math.floor(s))))


def _tensors(c: Cap) -> list[Tensor]:
    if isinstance(c, DenseCap):
        return list(c.grads.values()) or [torch.empty(0)]
    return [c.delta]


_EXPANSION_FAILED = (
    "These modules are called on inputs shared by the whole batch (batch dimension 1), and giving each "
    "example its own copy of their output changes the network's result"
)


def _check_weights(B: int, like: Tensor) -> Tensor:
    """Per-example weights of the first-block check: fixed pseudo-random values in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(0x7A6E)
    return (0.5 + torch.rand(B, generator=g, dtype=torch.float64)).to(like.device, like.dtype)



class GradientCapture:
    """Captures compact per-example gradients of ``params`` for blocks of examples.

    Args:
        model: a prepared model (eval mode, final device and dtype).
        params: the selected parameters ``{name: parameter}`` of ``model``.
        probe_fn: builds the probe vectors (B, M, C) from logits and labels.
        verify: check hook-based gradients against autograd on the first block (recommended).
        keep_factors: never materialize factored (Linear/Conv) captures, e.g. for Kronecker projections.
        implementation: "auto" (layer rules where they apply and are verified, the ``torch.func``
            fallback elsewhere), "hooks" (layer rules only: a parameter that would need the fallback is an
            :class:`UnsupportedLayerError`) or "functional" (every parameter through the fallback — the
            independent implementation the rules are cross-checked against).

    Use as a context manager; hooks are removed on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        probe_fn: ProbeFn,
        verify: bool = True,
        keep_factors: bool = False,
        implementation: str = "auto",
    ) -> None:
        if implementation not in IMPLEMENTATIONS:
            raise InputError(
                f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}."
            )
        self.model = model
        self.params = params
        self.probe_fn = probe_fn
        self.verify = verify
        self.implementation = implementation
        self.rules: list[_Rule] = []
        self.fallback_names: list[str] = []
        self._checked = False
        self._warned = False
        self._fallback: Fallback | None = None
        self._measure = False  # record the bytes the forward saves for backward (planning)
        self._saved: dict[int, int] = {}  # storage address -> bytes, per-example activations only
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        by_id = {id(p): n for n, p in params.items()}
        covered: set[str] = set()
        for mname, mod in model.named_modules() if implementation != "functional" else ():
            own = {r: p for r, p in mod.named_parameters(recurse=False) if id(p) in by_id}
            if not own:
                continue
            cls = _rule_class(mod)
            if cls is None or not set(own) <= {"weight", "bias"}:
                continue
            names = {r: by_id[id(p)] for r, p in own.items()}
            if any(n in covered for n in names.values()):
                continue  # shared module used twice in the tree: first one wins
            rule = cls(mname or "<root>", mod, names)
            rule.allow_dense = not keep_factors
            self.rules.append(rule)
            covered.update(names.values())
        self.fallback_names = [n for n in params if n not in covered]
        self._warned = implementation == "functional"  # the fallback was asked for: nothing to warn about

    def __enter__(self) -> GradientCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        for r in self.rules:
            r.remove()

    def _demote(self, rules: list[_Rule], why: str) -> None:
        if not rules:
            return
        names = [n for r in rules for n in r.params()]
        if self.implementation == "hooks":
            raise UnsupportedLayerError(
                f"{why}: {', '.join(r.group for r in rules)}. With implementation='hooks' their parameters "
                f"({names[:6]}) cannot use the torch.func fallback: pass implementation='auto', or exclude "
                "them with parameters=..."
            )
        warnings.warn(
            f"{why}: {', '.join(r.group for r in rules)}. Their parameters ({len(names)}) use the "
            "per-example torch.func fallback (exact, slower).",
            UnsupportedLayerWarning,
            stacklevel=4,
        )
        for r in rules:
            r.remove()
            self.rules.remove(r)
        keep = set(self.fallback_names) | set(names)
        self.fallback_names = [n for n in self.params if n in keep]
        self._fallback = None

    def _warn_unsupported(self) -> None:
        warned, self._warned = self._warned, True
        if self.fallback_names and self.implementation == "hooks":
            raise UnsupportedLayerError(
                f"No layer rule covers parameters {self.fallback_names[:6]}; with implementation='hooks' "
                "they cannot use the torch.func fallback: pass implementation='auto', or exclude them with "
                "parameters=..."
            )
        if self.fallback_names and not warned:
            warnings.warn(
                "No fast exact rule for parameters "
                f"{self.fallback_names[:6]}{' ...' if len(self.fallback_names) > 6 else ''}; "
                "they use the per-example torch.func fallback (exact, slower).",
                UnsupportedLayerWarning,
                stacklevel=4,
            )

    def capture(self, x: Batch, y: Tensor | None) -> BlockCapture:
        """Capture one block: one forward, one backward per probe (+ fallback vjps)."""
        first = not self._checked
        if first:
            self._warn_unsupported()
        B = batch_size_of(x)
        for r in self.rules:
            r.reset()
            r.batch = B
            r.active = True
        self._saved.clear()
        try:
            with self._measuring():
                logits = extract_logits(call_model(self.model, x), B)
        except Exception:
            expanded = [r for r in self.rules if r.expanded]
            for r in self.rules:
                r.active = False
            if first and expanded:
                # expanding a broadcast output broke the forward: those rules use the fallback
                self._demote(self._bad_expansions(x, expanded, None), _EXPANSION_FAILED)
                return self.capture(x, y)
            raise
        for r in self.rules:
            r.active = False
        if not torch.isfinite(logits).all():
            raise NonFiniteError(
                "The model produced NaN or infinite logits; check the inputs (NaN pixels?) and the weights."
            )
        misaligned = [r for r in self.rules if r.misaligned is not None]
        if misaligned:
            if not first:
                r = misaligned[0]
                raise UnsupportedLayerError(
                    f"Module {r.group!r} was {r.misaligned}, although on the first block its calls carried "
                    "the batch as their first dimension, so its per-example gradients cannot be attributed. "
                    f"Exclude its parameters with parameters=... or make its inputs batch-first."
                )
            self._demote(misaligned, "These modules are not called batch-first (their input's first "
                         "dimension is not the block's examples)")
            return self.capture(x, y)
        if first:
            silent = [r for r in self.rules if not r.fired]
            if silent:
                self._demote(silent, "These modules were never called through their forward()")
            expanded = [r for r in self.rules if r.expanded]
            bad = self._bad_expansions(x, expanded, logits) if expanded else []
            if bad:
                self._demote(bad, _EXPANSION_FAILED)
                return self.capture(x, y)
        V = self.probe_fn(logits.detach(), y)
        M = V.shape[1]
        outs = [o for r in self.rules for o in r.outs]
        for r in self.rules:
            r.grads = [[] for _ in r.outs]
        if outs and logits.requires_grad:
            # one batched backward per probe, straight to the module outputs (no weight gradients)
            for m in range(M):
                gs = torch.autograd.grad(logits, outs, V[:, m], retain_graph=True, allow_unused=True)
                k = 0
                for r in self.rules:
                    for slot in r.grads:
                        slot.append(None if gs[k] is None else gs[k].detach())
                        k += 1
        check: dict[str, Tensor] | None = None
        w = _check_weights(B, logits)
        if first and self.verify and outs and logits.requires_grad:
            # autograd's gradient of Σ_i w_i v_i·f(x_i): random per-example weights make a capture that
            # credits the wrong example (a broadcast input, a batch laid out elsewhere) disagree
            names = [n for r in self.rules for n in r.params()]
            gs = torch.autograd.grad(
                logits, [self.params[n] for n in names], V[:, 0] * w[:, None], allow_unused=True
            )
            check = {n: (torch.zeros_like(self.params[n]) if g is None else g) for n, g in zip(names, gs)}
        del outs
        caps: list[Cap] = [r.finalize(M) for r in self.rules]
        for r in self.rules:
            r.reset()
        if check is not None:
            self._checked = True
            bad = self._verify(caps, check, w)
            if bad:
                self._demote(bad, "Hook-based per-example gradients disagree with autograd (a parameter used "
                             "outside its module, e.g. weight tying, or a batch laid out elsewhere)")
                return self.capture(x, y)
        self._checked = True
        if self.fallback_names:
            if self._fallback is None:
                self._fallback = Fallback(self.model, {n: self.params[n] for n in self.fallback_names})
            caps.append(self._fallback(x, V))
        return BlockCapture(caps, B)

    def _bad_expansions(self, x: Batch, expanded: list[_Rule], logits: Tensor | None) -> list[_Rule]:
        """The rules whose expanded broadcast output changes the network's logits (first block only).

        ``logits``: the forward with every rule expanding (None if it raised). If they equal the plain
        model's, no rule is bad; otherwise each expanded rule is tried alone (one forward each).
        """
        B = batch_size_of(x)
        with torch.no_grad():
            plain = extract_logits(call_model(self.model, x), B)
        tol = (1e-10 if plain.dtype == torch.float64 else 1e-4) * (float(plain.abs().max()) + 1)

        def same(out: Tensor | None) -> bool:
            return out is not None and out.shape == plain.shape and float((plain - out).abs().max()) <= tol

        if same(None if logits is None else logits.detach()):
            return []
        bad = []
        for only in expanded:
            for r in self.rules:
                r.reset()
                r.expand = r is only
                r.active = True
            try:
                out: Tensor | None = extract_logits(call_model(self.model, x), B).detach()
            except Exception:  # noqa: BLE001 - an expansion that breaks the forward is a wrong one
                out = None
            finally:
                for r in self.rules:
                    r.reset()
                    r.expand = True
                    r.active = False
            if not same(out):
                bad.append(only)
        return bad or expanded

    def _measuring(self) -> Any:
        if not self._measure:
            return contextlib.nullcontext()

        def pack(t: Tensor) -> Tensor:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self._param_ptrs:  # weights are saved too, but are not per-example memory
                self._saved[ptr] = st.nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def plan(
        self,
        x: Batch,
        y: Tensor | None,
        *,
        limit: int,
        n_cache: int,
        cache_budget: int,
        work_budget: int,
        materialize: str = "chosen",
        trial: int = 4,
    ) -> CapturePlan:
        """Choose the examples per capture and which layers to materialize, from one memory budget.

        Captures a trial slice of at most ``trial`` examples of the first block (which also runs the
        first-block checks), measures per example: the activations the forward saves for backward, the compact
        captures of every layer, the materialized gradients and the fallback's gradients; then

        * materializes a Linear/Conv layer with T > 1 positions (weight gradient Σ_t δ_t a_tᵀ) only where
          the factored Gram is over ``DENSE_ADVANTAGE`` times more work per pair,
          T²(d_in + M d_out) > 4 M d_in d_out, *and* the captures of ``n_cache`` examples still fit
          ``cache_budget`` (layers with the largest materialized size are dropped first);
        * takes the largest block s ≤ ``limit`` with s·w + s²·g ≤ ``work_budget`` and s²·g ≤
          ``GRAM_TILE_BYTES``, where w is the per-example working memory (saved activations and backward
          transients, captures, materialized and fallback gradients, each counted twice for the
          temporaries that build them) and g the largest per-pair intermediate of a position-wise Gram
          block (3·T1·T2 values).

        ``materialize``: "chosen" (kernels), "all" (flat features: every gradient is materialized) or
        "kronecker" (Kronecker-projected features: Linear/Conv factors stay, other layers materialize).
        Cost: one capture of the trial slice. The decisions hold for every later block of the call. When
        the slice is the whole block and the plan keeps it whole, that capture is returned in the plan
        (``capture``) to be used as the block's own, so small calls capture nothing twice.
        """
        B = batch_size_of(x)
        b0 = min(B, trial)
        xs = slice_batch(x, 0, b0)
        ys = None if y is None else y[:b0]
        for r in self.rules:
            r.dense = False
        self._measure = True
        try:
            cap = self.capture(xs, ys)
        finally:
            self._measure = False
        graph = sum(self._saved.values()) / b0
        self._saved.clear()
        stats: list[_RuleCost] = []
        for rule, c in zip(self.rules, cap.caps):
            es = _tensors(c)[0].element_size()
            pair, dense_pe, candidate = 0.0, 0.0, False
            fact_pe = c.nbytes() / b0
            if isinstance(c, OuterCap):
                T, din, dout, M = c.a.shape[1], c.a.shape[2], c.delta.shape[3], c.delta.shape[1]
                dense_pe = M * (din * dout * (c.weight is not None) + dout * (c.bias is not None)) * es
                pair = 3.0 * T * T * es if T > 1 else 0.0
                candidate = (
                    materialize != "kronecker" and rule.allow_dense and T > 1
                    and T * T * (din + M * dout) > DENSE_ADVANTAGE * M * din * dout
                )
                candidate = candidate or materialize == "all"
            elif isinstance(c, EmbeddingCap):
                T, d, M = c.delta.shape[2], c.delta.shape[3], c.delta.shape[1]
                dense_pe = M * c.num_embeddings * d * es
                pair = 4.0 * T * T * es
                candidate = materialize != "chosen"  # features materialize the table's gradient
            stats.append(_RuleCost(rule, fact_pe, dense_pe, pair, candidate))
        fallback = cap.caps[-1].nbytes() / b0 if len(cap.caps) > len(self.rules) else 0.0
        dense = {id(st.rule) for st in stats if st.candidate}
        dropped: list[str] = []

        def cache_pe() -> float:
            return fallback + sum(st.dense if id(st.rule) in dense else st.factored for st in stats)

        if materialize == "chosen":
            for st in sorted(stats, key=lambda st: st.dense - st.factored, reverse=True):
                if n_cache * cache_pe() <= cache_budget:
                    break
                if id(st.rule) in dense:
                    dense.discard(id(st.rule))
                    dropped.append(st.rule.group)
        per_example = cache_pe()
        # saved activations and backward transients; captures and the temporaries that build them
        w = 2 * graph + 2 * per_example + sum(st.factored for st in stats)
        # Gram intermediates of factored layers (features form no Gram blocks)
        pairs = [st.pair for st in stats if id(st.rule) not in dense] if materialize == "chosen" else []
        g = max(pairs, default=0.0)
        block = _largest_block(w, g, work_budget, limit)
        fits = _largest_block(w, g, work_budget, limit, tile=False)
        for st in stats:
            if isinstance(st.rule, _OuterRule):
                st.rule.dense = materialize == "chosen" and id(st.rule) in dense
        whole: BlockCapture | None = None
        if b0 == B and block >= B:
            caps = [_to_dense(c) if isinstance(c, OuterCap) and r.dense else c
                    for r, c in zip(self.rules, cap.caps)]
            whole = BlockCapture(caps + cap.caps[len(self.rules):], B)
        return CapturePlan(block, fits, int(per_example), int(w), int(graph), dropped, whole)

    def _verify(self, caps: list[Cap], ref: dict[str, Tensor], w: Tensor) -> list[_Rule]:
        bad: list[_Rule] = []
        dtype = next((v.dtype for v in ref.values() if v is not None), torch.float32)
        tol = 1e-8 if dtype == torch.float64 else 1e-3
        # a gradient that is zero up to rounding (e.g. an attention key bias, exactly shift-invariant) must
        # not be flagged: differences are also judged against the largest gradient of the block
        floor = 1e-3 * tol * max((float(v.norm()) for v in ref.values()), default=0.0)
        for rule, cap in zip(self.rules, caps):
            sums = cap.batch_sum(0, w)
            for n, s in sums.items():
                r = ref[n]
                scale = float(r.norm()) + float(s.norm())
                if float((s - r).norm()) > tol * scale + floor:
                    bad.append(rule)
                    break
        return bad


# --------------------------------------------------------------------------------------------------
# Forward-only (embedding and conjugate kernel) captures
# --------------------------------------------------------------------------------------------------


class ActivationCapture:
    """Forward hooks recording flattened activations: module outputs (Em) or the last Linear's input (CK)."""

    def __init__(self, model: nn.Module, kind: str, modules: Sequence[str | nn.Module] | None) -> None:
        self.model = model
        self.kind = kind
        self.store: dict[str, list[Tensor]] = {}
        self.handles: list[Any] = []
        self.names: list[str] = []
        named = dict(model.named_modules())
        by_obj = {id(m): n for n, m in named.items()}
        order: list[str] = []
        probe_handles = []
        if modules is None or kind == "ck":
            # learn the call order of the candidate modules from the first forward
            for n, m in named.items():
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
                    probe_handles.append(m.register_forward_hook(
                        lambda mod, a, o, n=n: order.append(n) if n not in order else None))
            self._order = order
            self._probe_handles = probe_handles
            self.modules: list[str] | None = None
        else:
            sel = []
            for m in modules:
                if isinstance(m, str):
                    if m not in named:
                        raise InputError(f"No module named {m!r} in the model.")
                    sel.append(m)
                elif isinstance(m, nn.Module) and id(m) in by_obj:
                    sel.append(by_obj[id(m)])
                else:
                    raise InputError("modules= must list module names or modules of the model.")
            self.modules = sel
            self._probe_handles = []
            self._install(sel)

    def _install(self, names: list[str]) -> None:
        named = dict(self.model.named_modules())
        self.names = names
        for n in names:
            if self.kind == "ck":
                h = named[n].register_forward_hook(
                    lambda mod, a, o, n=n: self.store.setdefault(n, []).append(
                        a[0].detach().reshape(a[0].shape[0], -1)))
            else:
                h = named[n].register_forward_hook(
                    lambda mod, a, o, n=n: self.store.setdefault(n, []).append(
                        _first_tensor(o).detach().reshape(_first_tensor(o).shape[0], -1)))
            self.handles.append(h)

    def close(self) -> None:
        for h in self.handles + self._probe_handles:
            h.remove()

    def capture(self, x: Batch) -> BlockCapture:
        B = batch_size_of(x)
        self.store = {}
        with torch.no_grad():
            extract_logits(call_model(self.model, x), B)  # validates the output
        if self.modules is None and not self.names:
            for h in self._probe_handles:
                h.remove()
            self._probe_handles = []
            linears = [n for n in self._order if isinstance(dict(self.model.named_modules())[n], nn.Linear)]
            if self.kind == "ck":
                if not linears:
                    raise InputError("kind='ck' needs a final nn.Linear layer (its input is the feature).")
                chosen = [linears[-1]]
            else:
                chosen = [n for n in self._order if n != (linears[-1] if linears else None)]
                if not chosen:
                    raise InputError("kind='em' found no layer outputs to use; pass modules=[...].")
            self._install(chosen)
            return self.capture(x)
        caps = []
        for n in self.names:
            parts = self.store.get(n)
            if not parts:
                raise InputError(f"Module {n!r} was not called during the forward pass.")
            a = torch.cat(parts, 1)
            if not torch.isfinite(a).all():
                raise NonFiniteError(f"NaN or infinite activations in module {n!r}.")
            caps.append(DenseCap(n, {n: a[:, None, :]}, {n: (a.shape[1],)}))
        return BlockCapture(caps, B)


def _first_tensor(o: Any) -> Tensor:
    if isinstance(o, Tensor):
        return o
    if isinstance(o, (tuple, list)) and o and isinstance(o[0], Tensor):
        return o[0]
    if hasattr(o, "last_hidden_state"):
        return o.last_hidden_state
    raise InputError(
        f"Cannot use the output of type {type(o).__name__} as an embedding; choose other modules."
    )
