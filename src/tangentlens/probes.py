"""Output probes: what the backward passes differentiate for each kind, and the labels some kinds need.

A probe is a (B, M, C) tensor of vectors v over the C logits; the engine backpropagates Σ_m v_m·f(x) per
example, so each probe gives one per-example gradient v_m J(x).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .errors import InputError, UnknownKindError
from .inputs import Source
from .kinds import KindSpec
from .projection.hashing import GEN_VERSION, check_int, column_keys, rademacher_rows, seed_words

LabelSpec = Any  # tensor-like labels, or the string "predicted"


def check_labels(y: Tensor | None, C: int, kind: str = "gradcos") -> Tensor:
    if y is None:
        what = "the margin" if kind == "margin" else "the loss"
        raise InputError(
            f"kind={kind!r} differentiates {what} and needs labels: pass labels=... (and other_labels=... "
            "for `other`), (inputs, labels) pairs, or labels='predicted' to use the network's predictions."
        )
    y = y.reshape(-1)
    if C == 1:
        if not bool(((y == 0) | (y == 1)).all()):
            raise InputError("With one logit (binary model) labels must be 0 or 1.")
        return y
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise InputError("Labels must be integer class indices.")
    y = y.long()
    if bool((y < 0).any()) or bool((y >= C).any()):
        raise InputError(f"Labels must lie in [0, {C - 1}] for a model with {C} logits.")
    return y


def make_probe_fn(spec: KindSpec, probes: int | Tensor | None, seed: int, predicted: bool):
    """Probe vectors (B, M, C) for a kind: what is differentiated in the backward passes.

    * one-hot (M = C): g_c = ∇f_c, the rows of the Jacobian (trace NTK, eNTK);
    * sum (M = 1): ∇ Σ_c f_c / √C, so ⟨·,·⟩ = (1/C)⟨Σ_c g_c, Σ_c g_c⟩ (pseudo-NTK);
    * loss (M = 1): ∂L/∂f = softmax(f) − onehot(y) (sigmoid(f) − y for one logit), the chain rule's loss
      gradient ∇_θ L(x, y);
    * margin (M = 1): ∂m/∂f of TRAK's margin m = f_y − logsumexp_{c≠y} f_c = log(p_y / (1 − p_y)):
      U_y = 1, U_c = −softmax_{c≠y}(f)_c (the softmax over the other classes); for one logit
      m = ±f (+ for y = 1, − for y = 0), U = 2y − 1, the same log-odds of the label;
    * ``probes=m`` (M = m, sketched trace): Rademacher vectors v_k / √m, Σ_k ⟨v_k J, v_k J'⟩ is unbiased
      for Tr(J J'ᵀ); a tensor (M, C) is used as given.
    """

    def fn(logits: Tensor, y: Tensor | None) -> Tensor:
        B, C = logits.shape
        if spec.probes in ("loss", "margin"):
            if predicted:
                yy = (logits[:, 0] > 0).to(logits.dtype) if C == 1 else logits.argmax(1)
            else:
                yy = check_labels(None if y is None else y.to(logits.device), C, spec.name)
            if spec.probes == "margin":
                return _margin_probe(logits, yy)[:, None, :]
            if C == 1:
                v = torch.sigmoid(logits) - yy.reshape(-1, 1).to(logits.dtype)
            else:
                v = torch.softmax(logits, 1) - torch.nn.functional.one_hot(yy.long(), C).to(logits.dtype)
            return v[:, None, :]
        if probes is not None:
            if isinstance(probes, Tensor):
                P = probes.to(device=logits.device, dtype=logits.dtype)
                if P.dim() != 2 or P.shape[1] != C:
                    raise InputError(f"probes must have shape (M, {C}); got {tuple(P.shape)}.")
            else:
                P = output_probes(C, probes, seed, dtype=torch.float64).to(logits.device, logits.dtype)
            return P[None].expand(B, -1, -1)
        if spec.probes == "sum":
            return logits.new_full((B, 1, C), 1.0 / math.sqrt(C))
        return torch.eye(C, dtype=logits.dtype, device=logits.device)[None].expand(B, C, C)

    return fn


def _margin_probe(logits: Tensor, y: Tensor) -> Tensor:
    """(B, C) derivative of the margin m = f_y − logsumexp_{c≠y} f_c with respect to the logits f.

    U_y = 1 and U_c = −exp(f_c) / Σ_{c'≠y} exp(f_c') for c ≠ y; with one logit U = 2y − 1 (m = ±f)."""
    B, C = logits.shape
    if C == 1:
        return (2 * y.reshape(-1, 1) - 1).to(logits.dtype)
    hot = torch.nn.functional.one_hot(y.long(), C).to(torch.bool)
    others = torch.softmax(logits.detach().masked_fill(hot, float("-inf")), 1)
    return hot.to(logits.dtype) - others


def labels_mode(labels: LabelSpec) -> tuple[Any, bool]:
    if isinstance(labels, str):
        if labels != "predicted":
            raise InputError(f"labels must be a tensor of class indices or 'predicted'; got {labels!r}.")
        return None, True
    return labels, False


def check_label_modes(
    rows: Source, rows_predicted: bool, cols_predicted: bool, names: tuple[str, str], warn: bool = True
) -> None:
    """Grad-Cos of a rows × columns block: true labels of the rows (the points a surrogate explains) leak
    into it — warned whenever the rows' source yields labels (a ``labels=`` tensor, an ``(x, y)`` pair, or
    a Dataset / DataLoader whose items carry labels); both sides must use the same label mode.
    ``names``: the rows' and columns' label arguments. ``warn=False`` (the margin kind, whose true test
    labels define the attributed output rather than leak into a surrogate) only checks the modes."""
    if warn and not rows_predicted and rows.yields_labels:
        warnings.warn(
            f"kind='gradcos' with true labels for the rows ({names[0]}) leaks them into a surrogate for "
            f"those points (the reference saw +5 pp accuracy). Use {names[0]}='predicted' and "
            f"{names[1]}='predicted' for an honest surrogate.",
            UserWarning,
            stacklevel=3,
        )
    if rows_predicted != cols_predicted:
        raise InputError(f"Use {names[0]}='predicted' and {names[1]}='predicted', or true labels for both.")


def output_probes(
    num_classes: int, m: int | str, seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Probe vectors ``v_1..v_m`` over the ``C`` outputs; the engine backpropagates ``v . f(x)``.

    With ``V`` the ``(m, C)`` result and ``Theta = J(x) J(x')^T``:
    ``sum_m <v_m J(x), v_m J(x')> = Tr(V Theta V^T)``.

    - ``m == C`` (or ``"trace"``): the identity (one-hot probes) -- the exact trNTK^0 = Tr(Theta).
    - ``1 <= m < C``: i.i.d. Rademacher entries scaled by ``1/sqrt(m)``, so ``E[V^T V] = I`` and the
      estimate is unbiased for Tr(Theta). Its variance is
      ``Var = (1/m) sum_{i != j} Theta_ij (Theta_ij + Theta_ji)``: zero when Theta is diagonal, and
      shrinking like ``1/m``. (Cost: ``m`` backward passes instead of ``C``.)
    - ``"pseudo"``: one all-ones probe scaled by ``1/sqrt(C)``: gives the pNTK
      ``(1/C) <sum_c g_c(x), sum_c g_c(x')>`` (a different kernel, not an estimate of the trace).

    Raises:
        InputError: ``num_classes < 1``, ``m`` not an integer in ``[1, C]`` nor a known string, or a
            non-integer seed.
    """
    c = check_int("num_classes", num_classes, minimum=1)
    seed = check_int("seed", seed)
    if isinstance(m, str):
        if m == "trace":
            return torch.eye(c, dtype=dtype)
        if m == "pseudo":
            return torch.full((1, c), 1.0 / math.sqrt(c), dtype=dtype)
        raise UnknownKindError(f"Unknown probe spec {m!r}; use an integer 1..C, 'trace' or 'pseudo'.")
    m = check_int("m (number of output probes)", m, minimum=1)
    if m > c:
        raise InputError(
            f"m={m} probes exceed C={c} classes: m = C already gives the exact trace; use m <= C."
        )
    if m == c:
        return torch.eye(c, dtype=dtype)
    words = seed_words("tangentlens.probes", GEN_VERSION, seed, c, m)
    keys = column_keys(0, m, words, torch.device("cpu"))
    return rademacher_rows(keys, c, words[2], dtype) * (1.0 / math.sqrt(m))


def probe_variance(theta: Tensor, m: int) -> Tensor:
    """Exact variance of the ``m``-probe Rademacher trace estimate of ``Tr(theta)`` for ``(..., C, C)``
    blocks: ``(1/m) sum_{i != j} theta_ij (theta_ij + theta_ji)`` (0 for ``m >= C``: the exact trace).

    Raises:
        InputError: ``m`` not a positive integer.
    """
    m = check_int("m", m, minimum=1)
    c = theta.shape[-1]
    if m >= c:
        return torch.zeros(theta.shape[:-2], dtype=theta.dtype)
    off = theta - torch.diag_embed(torch.diagonal(theta, dim1=-2, dim2=-1))
    return (off * (off + off.transpose(-1, -2))).sum((-1, -2)) / m
