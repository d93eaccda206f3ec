"""Layer rules: exact per-example gradients of a layer's own parameters from hooks, one rule per module type.

A rule hooks one module. Its forward hook records the module's input (activations, conv patches, token ids,
or normalized inputs x̂) and keeps the module's output; a batched backward per probe then gives the output
gradients δ, and :meth:`Rule.finalize` turns (input, δ) into a compact capture:

* :class:`LinearRule`, :class:`ConvRule` (Conv1d/Conv2d, groups=1, zero padding): g = Σ_t δ_t a_tᵀ
  (:class:`~.caps.OuterCap`, or materialized when that is cheaper, see :func:`materialize_is_cheaper`);
* :class:`EmbeddingRule`: g = Σ_t e_{idx_t} δ_tᵀ (:class:`~.caps.EmbeddingCap`);
* :class:`NormRule` (LayerNorm with affine, BatchNorm in eval mode): g_w = Σ_t δ_t ⊙ x̂_t, g_b = Σ_t δ_t.

:data:`RULES` maps a module type to its rule class (:func:`register_rule` adds one); :func:`rule_for` says
which rule, if any, covers a given module. Parameters of every other module use the exact fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .caps import Cap, DenseCap, EmbeddingCap, OuterCap


class Rule:
    """Base class: hooks on one module, recording per call (input data, output gradient per probe).

    A call is *aligned* when the module's input and output carry the block's batch as their first
    dimension. A *broadcast* call (input and output of batch 1 in a block of B > 1 examples: a layer fed
    ``position_ids`` of shape (1, L), a buffer, a constant) is made per-example exactly: its output is
    expanded to (B, ...) before the rest of the network sees it (which broadcasting makes the same
    values), so the gradient of each example's output reaches its own copy, and its input is recorded
    expanded. Any other call (a batch laid out elsewhere, e.g. sequence-first) marks the rule
    ``misaligned``; its parameters then use the exact per-example fallback.

    Subclasses implement :meth:`record` (what to keep of an input) and :meth:`finalize` (the capture), and
    may override :meth:`accepts` (which configurations of the module the rule's math covers).

    Args:
        group: the module's name in the model.
        module: the module to hook.
        names: role (``"weight"``/``"bias"``) -> the selected parameter's name.
    """

    subclasses: ClassVar[bool] = False
    """Also cover subclasses of the registered types that keep its ``forward``."""

    def __init__(self, group: str, module: nn.Module, names: dict[str, str]) -> None:
        self.group = group
        self.module = module
        self.names = names
        self.active = False
        self.batch = 0  # examples in the block being captured
        self.expanded = False  # a broadcast call was expanded to the block's batch
        self.expand = True  # expand broadcast calls (False: pass them through, for the first-block check)
        self.misaligned: str | None = None  # why a call could not be attributed to examples
        self.records: list[Any] = []
        self.outs: list[Tensor] = []
        self.grads: list[Tensor | None] = []  # per recorded call: (B, M, *output shape) or None
        self.allow_dense = True  # may a factored capture be materialized when that is cheaper?
        self.dense: bool | None = None  # materialize? fixed on the first block (captures must pair)
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether the rule's math covers this module's configuration (all of them by default)."""
        return True

    def remove(self) -> None:
        """Remove the forward hook."""
        self.handle.remove()

    def reset(self) -> None:
        """Forget the recorded calls (before the next block)."""
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
        """Output gradients of one call for every probe: (B, M, *out_shape).

        When no probe's gradient reached this module (the output does not depend on it), zeros shaped
        (B, M, *shape[1:]) from ``shape``, the output's shape (B, *out_shape).
        """
        g = self.grads[call]
        return like.new_zeros((shape[0], M, *shape[1:])) if g is None else g

    def record(self, x: Tensor) -> Any:  # pragma: no cover - abstract
        """What to keep of one call's input ``x`` (detached)."""
        raise NotImplementedError

    def finalize(self, M: int) -> Cap:  # pragma: no cover - abstract
        """The block's capture from the recorded calls and their output gradients for ``M`` probes."""
        raise NotImplementedError

    @property
    def fired(self) -> bool:
        """Whether the module was called (through its forward) in the last capture."""
        return bool(self.records)

    def params(self) -> list[str]:
        """The selected parameter names the rule covers."""
        return list(self.names.values())


RULES: dict[type[nn.Module], type[Rule]] = {}
"""Module type -> the rule class that captures its parameters (see :func:`rule_for`)."""


def register_rule(*module_types: type[nn.Module]) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: register a :class:`Rule` subclass for ``module_types`` in :data:`RULES`."""

    def register(cls: type[Rule]) -> type[Rule]:
        for t in module_types:
            RULES[t] = cls
        return cls

    return register


def rule_for(module: nn.Module) -> type[Rule] | None:
    """The rule class that covers ``module``, or None (its parameters then use the fallback).

    The nearest registered type in the module's class hierarchy decides: the module's own type, or a base
    class when its rule covers subclasses (``Rule.subclasses``) and the module keeps the base's
    ``forward``; the rule must also accept the module's configuration (:meth:`Rule.accepts`).
    """
    kind = type(module)
    for t in kind.__mro__:
        cls = RULES.get(t)
        if cls is None:
            continue
        if t is not kind and not (cls.subclasses and kind.forward is t.forward):
            return None
        return cls if cls.accepts(module) else None
    return None


def materialize_is_cheaper(T: int, d_in: int, d_out: int, M: int, advantage: float = 1.0) -> bool:
    """Whether a Σ_t δ_t a_tᵀ layer's Gram is cheaper from materialized gradients than from its factors.

    Per pair of examples the factored Gram costs T²(d_in + M·d_out) and the materialized one M·d_in·d_out,
    so materializing pays when T > 1 and T²(d_in + M·d_out) > ``advantage``·M·d_in·d_out (with one
    position the factored form is always cheaper). A capture left to itself uses ``advantage`` 1; a
    planned call asks for :data:`~.plan.DENSE_ADVANTAGE`.
    """
    return T > 1 and T * T * (d_in + M * d_out) > advantage * M * d_in * d_out


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class OuterRule(Rule):
    """Layers whose weight gradient is Σ_t δ_t a_tᵀ: subclasses give (a, δ) per recorded call.

    The capture is an :class:`~.caps.OuterCap`, materialized (a :class:`~.caps.DenseCap`) when ``dense``
    says so; unless a plan set it, ``dense`` is fixed on the first block by
    :func:`materialize_is_cheaper` (and never when ``allow_dense`` is False).
    """

    def pair(self, call: int, M: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """(a (B, T, d_in), δ (B, M, T, d_out)) of one recorded call."""
        raise NotImplementedError

    def finalize(self, M: int) -> Cap:
        pairs = [self.pair(i, M) for i in range(len(self.records))]
        a = _cat([p[0] for p in pairs], 1)
        d = _cat([p[1] for p in pairs], 2)
        w = self.module.weight  # type: ignore[union-attr]
        cap = OuterCap(self.group, a, d, self.names.get("weight"), self.names.get("bias"), tuple(w.shape))
        if self.dense is None:
            self.dense = self.allow_dense and materialize_is_cheaper(a.shape[1], a.shape[2], d.shape[3], M)
        return cap.to_dense() if self.dense else cap


@register_rule(nn.Linear)
class LinearRule(OuterRule):
    """nn.Linear (and subclasses keeping its forward): a = the input's rows, one per leading position."""

    subclasses = True

    def record(self, x: Tensor) -> Tensor:
        return x.detach().reshape(x.shape[0], -1, x.shape[-1])

    def pair(self, call: int, M: int) -> tuple[Tensor, Tensor]:
        a = self.records[call]
        B, T, _ = a.shape
        dout = self.module.out_features  # type: ignore[union-attr]
        return a, self.deltas(call, M, (B, T, dout), a).reshape(B, M, T, dout)


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(OuterRule):
    """Conv1d/Conv2d with groups=1 and zero (or no) padding: a = the input's patches (unfold, im2col)."""

    subclasses = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        if module.groups != 1:
            return False
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return True
        return module.padding == "valid"

    def record(self, x: Tensor) -> Tensor:
        return x.detach()

    def _unfold(self, x: Tensor) -> Tensor:
        m = self.module
        pad = (0, 0) if isinstance(m.padding, str) else tuple(m.padding)  # "valid": no padding
        if isinstance(m, nn.Conv1d):
            x4 = x.unsqueeze(2)
            k, s, p, d = (1, m.kernel_size[0]), (1, m.stride[0]), (0, pad[0]), (1, m.dilation[0])  # type: ignore[index]
        else:
            x4 = x
            k, s, p, d = m.kernel_size, m.stride, pad, m.dilation  # type: ignore[assignment]
        cols = F.unfold(x4, k, dilation=d, padding=p, stride=s)  # (B, Cin*k, L)
        return cols.transpose(1, 2)

    def pair(self, call: int, M: int) -> tuple[Tensor, Tensor]:
        a = self._unfold(self.records[call])
        B, T, _ = a.shape
        cout = self.module.out_channels  # type: ignore[union-attr]
        d = self.deltas(call, M, (B, cout, T), a)
        return a, d.reshape(B, M, cout, T).transpose(2, 3)


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """nn.Embedding without ``max_norm`` or ``scale_grad_by_freq``; padding_idx rows get no gradient."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return module.max_norm is None and not module.scale_grad_by_freq

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


@register_rule(nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class NormRule(Rule):
    """LayerNorm (elementwise affine) and BatchNorm with running statistics (eval mode): y = x̂ ⊙ w + b."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        if isinstance(module, nn.LayerNorm):
            return module.elementwise_affine
        return bool(module.affine and module.track_running_stats and module.running_mean is not None)

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
        return t.reshape(B, M, t.shape[2], -1).sum(-1)

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
