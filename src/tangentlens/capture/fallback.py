"""The exact fallback: per-example vector-Jacobian products with ``torch.func`` for any parameter.

Parameters no layer rule covers (custom layers, attention in-projections, weight-tied parameters, layers
called functionally, layers demoted by the first-block check) get their per-example, per-probe gradients
v_m J_θ(x_i) here: ``vmap`` over examples of a ``vjp`` of the single-example forward, and a plain
per-example autograd loop when ``vmap`` cannot trace the model (``.item()``, data-dependent control flow,
in-place batch statistics).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..errors import UnsupportedLayerWarning
from ..inputs import Batch
from ..network import call_model, extract_logits
from .caps import DenseCap


def _unsqueeze(x: Batch) -> Batch:
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    return {k: (v.unsqueeze(0) if isinstance(v, Tensor) else v) for k, v in x.items()}


class Fallback:
    """Per-example, per-probe gradients of arbitrary parameters via ``torch.func`` (vmap of vjp).

    Args:
        model: the prepared model.
        params: ``{name: parameter}`` of ``model`` to differentiate.

    Attributes:
        use_loop: use the per-example autograd loop (set after ``vmap`` failed once, with a warning; may be
            set to force the loop).

    Cost: one per-example forward and M vector-Jacobian products per example (vectorized by ``vmap``, or
    B forwards and B·M backward passes in the loop); memory B·M·P_fallback per block.
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
        """Per-example gradients of a block.

        Args:
            x: the block's inputs (B examples).
            V: (B, M, C) probe vectors.

        Returns:
            A :class:`~.caps.DenseCap` (group ``"<fallback>"``) with ``{name: (B, M, p)}``, the gradient
            of v_m·f(x_i) for each example i and probe m.
        """
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
