"""Kernel kinds as data, block Gram accumulation and block-aware cosine normalization."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .capture import BlockCapture
from .errors import UnknownKindError


@dataclass(frozen=True)
class KindSpec:
    """What a kernel kind differentiates and how it is assembled.

    Attributes:
        name: the kind's name.
        probes: "onehot" (the C logits: trace / full eNTK), "sum" (Σ_c f_c / √C: pseudo-NTK),
            "loss" (∂L/∂f: loss gradient), or "none" (forward-only kinds).
        full: keep every probe pair (the C×C eNTK blocks) instead of the trace over matching probes.
        normalize: default of the block-aware cosine normalization.
        needs_labels: labels are required (loss gradients).
    """

    name: str
    probes: str
    full: bool
    normalize: bool
    needs_labels: bool = False


KINDS: dict[str, KindSpec] = {
    "entk": KindSpec("entk", "onehot", True, False),
    "trntk": KindSpec("trntk", "onehot", False, True),
    "trntk0": KindSpec("trntk0", "onehot", False, False),
    "pntk": KindSpec("pntk", "sum", False, False),
    "gradcos": KindSpec("gradcos", "loss", False, True, needs_labels=True),
    "em": KindSpec("em", "none", False, True),
    "ck": KindSpec("ck", "none", False, True),
}


def kind_spec(kind: str) -> KindSpec:
    """Look up a kind; raise :class:`UnknownKindError` listing the valid ones."""
    if not isinstance(kind, str) or kind.lower() not in KINDS:
        raise UnknownKindError(f"Unknown kernel kind {kind!r}; choose one of {sorted(KINDS)}.")
    return KINDS[kind.lower()]


def block_gram(c1: BlockCapture, c2: BlockCapture, full: bool, groups: bool = False
               ) -> Tensor | dict[str, Tensor]:
    """Gram block between two captured blocks: (B1, B2) trace over probes, or (B1, B2, M, M) if ``full``.

    With ``groups=True`` returns ``{layer group: block}`` (the kernel is the sum of its layer kernels).
    Cost per layer with one position: B1·B2·(d_in + M·d_out) multiply-adds; materialized groups
    B1·B2·M·p.
    """
    parts: dict[str, Tensor] = {}
    for a, b in zip(c1.caps, c2.caps):
        g = a.gram(b, full)  # type: ignore[arg-type]
        parts[a.group] = parts[a.group] + g if a.group in parts else g
    if groups:
        return parts
    vals = list(parts.values())
    out = vals[0]
    for v in vals[1:]:
        out = out + v
    return out


def block_sqnorms(c: BlockCapture) -> Tensor:
    """(B, M) squared norms of the per-example, per-probe gradients (the kernel's diagonal)."""
    vals = [cap.sqnorms() for cap in c.caps]
    out = vals[0]
    for v in vals[1:]:
        out = out + v
    return out


def cosine_normalize(K: Tensor, d1: Tensor, d2: Tensor) -> Tensor:
    """Block-aware cosine normalization, in place: K[i, j] / sqrt(d1[i] d2[j]).

    For a full eNTK block (N1, N2, C, C), ``d1`` (N1, C) and ``d2`` (N2, C) are per-class diagonals and entry
    (i, j, c, c') becomes the cosine between g_c(x_i) and g_c'(x_j). Zero diagonals leave zeros.
    """
    r1 = _rsqrt(d1)
    r2 = _rsqrt(d2)
    if K.dim() == 2:
        K.mul_(r1[:, None]).mul_(r2[None, :])
    else:
        K.mul_(r1[:, None, :, None]).mul_(r2[None, :, None, :])
    return K


def _rsqrt(d: Tensor) -> Tensor:
    d = d.clamp(min=0)
    out = torch.zeros_like(d)
    pos = d > 0
    out[pos] = d[pos].rsqrt()
    return out
