"""Naive oracles: explicit per-example, per-output autograd loops in float64.

Deliberately independent of tangentlens' capture code: every Jacobian row is one call of
``torch.autograd.grad`` on one example's scalar output.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def _call(model: nn.Module, x):
    out = model(**x) if isinstance(x, Mapping) else model(x)
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _row(x, i):
    if isinstance(x, Mapping):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def _n(x) -> int:
    return next(iter(x.values())).shape[0] if isinstance(x, Mapping) else x.shape[0]


def to64(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).double().eval()
    return m


def cast(x):
    if isinstance(x, Mapping):
        return {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}
    return x.double() if x.is_floating_point() else x


def _setup(model: nn.Module, x, names: list[str] | None):
    """A float64 eval-mode copy of the model, its selected parameters, and the float64 inputs."""
    m = to64(model)
    params = dict(m.named_parameters())
    for p in m.parameters():
        p.requires_grad_(True)
    return m, [params[n] for n in (names or list(params))], cast(x)


def _flat(gs, sel) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, sel)])


def jacobians(model: nn.Module, x, names: list[str] | None = None) -> Tensor:
    """J of shape (N, C, P) in float64, parameters in named_parameters order (or ``names``)."""
    m, sel, x = _setup(model, x, names)
    rows = []
    for i in range(_n(x)):
        out = _call(m, _row(x, i))[0]
        per_c = []
        for c in range(out.shape[0]):
            gs = torch.autograd.grad(out[c], sel, retain_graph=True, allow_unused=True)
            per_c.append(_flat(gs, sel))
        rows.append(torch.stack(per_c))
    return torch.stack(rows)


def loss_grads(model: nn.Module, x, y: Tensor, names: list[str] | None = None) -> Tensor:
    """Per-example gradients of cross-entropy (BCE-with-logits for one logit), float64, (N, P)."""
    m, sel, x = _setup(model, x, names)
    rows = []
    for i in range(_n(x)):
        out = _call(m, _row(x, i))
        if out.shape[1] == 1:
            loss = nn.functional.binary_cross_entropy_with_logits(out[:, 0], y[i : i + 1].double())
        else:
            loss = nn.functional.cross_entropy(out, y[i : i + 1].long())
        gs = torch.autograd.grad(loss, sel, allow_unused=True)
        rows.append(_flat(gs, sel))
    return torch.stack(rows)


def margin_grads(model: nn.Module, x, y: Tensor, names: list[str] | None = None) -> Tensor:
    """Per-example gradients of TRAK's margin, float64, (N, P).

    m = f_y − log Σ_{c≠y} exp f_c (written out with ``torch.logsumexp`` over the other logits); for one
    logit m = f if y = 1 and −f if y = 0.
    """
    m, sel, x = _setup(model, x, names)
    rows = []
    for i in range(_n(x)):
        out = _call(m, _row(x, i))[0]
        yi = int(y[i])
        if out.shape[0] == 1:
            margin = out[0] if yi == 1 else -out[0]
        else:
            rest = torch.cat([out[:yi], out[yi + 1 :]])
            margin = out[yi] - torch.logsumexp(rest, 0)
        gs = torch.autograd.grad(margin, sel, allow_unused=True)
        rows.append(_flat(gs, sel))
    return torch.stack(rows)


def margins(model: nn.Module, x, y: Tensor) -> Tensor:
    """The margins m(x_i, y_i) themselves, float64, (N,)."""
    m, _, x = _setup(model, x, None)
    with torch.no_grad():
        out = _call(m, x)
    if out.shape[1] == 1:
        return torch.where(y.reshape(-1) == 1, out[:, 0], -out[:, 0])
    idx = y.long().reshape(-1, 1)
    rest = out.scatter(1, idx, float("-inf"))
    return out.gather(1, idx)[:, 0] - torch.logsumexp(rest, 1)


def cosine(K: Tensor, d1: Tensor, d2: Tensor) -> Tensor:
    return K / torch.sqrt(d1[:, None] * d2[None, :])


def oracle_kernel(model: nn.Module, x1, x2=None, kind: str = "trntk", names=None, y1=None, y2=None):
    """Reference kernels from explicit Jacobians (float64)."""
    if kind == "gradcos":
        G1 = loss_grads(model, x1, y1, names)
        G2 = loss_grads(model, x2, y2, names) if x2 is not None else G1
        return cosine(G1 @ G2.T, (G1 * G1).sum(1), (G2 * G2).sum(1))
    J1 = jacobians(model, x1, names)
    J2 = jacobians(model, x2, names) if x2 is not None else J1
    return kernel_from_jacobians(J1, J2, kind)


def kernel_from_jacobians(J1: Tensor, J2: Tensor, kind: str) -> Tensor:
    """eNTK, trNTK, trNTK0 or pNTK from Jacobians (N, C, P)."""
    if kind == "entk":
        return torch.einsum("icp,jdp->ijcd", J1, J2)
    if kind in ("trntk", "trntk0"):
        K = torch.einsum("icp,jcp->ij", J1, J2)
        if kind == "trntk0":
            return K
        d1 = torch.einsum("icp,icp->i", J1, J1)
        d2 = torch.einsum("icp,icp->i", J2, J2)
        return cosine(K, d1, d2)
    if kind == "pntk":
        C = J1.shape[1]
        s1, s2 = J1.sum(1), J2.sum(1)
        return s1 @ s2.T / C
    raise ValueError(kind)
