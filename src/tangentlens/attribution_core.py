r"""What in-memory and streamed counterfactual attribution share: q, λ, the ridge solves, the top-k record.

:func:`tangentlens.attribute` (everything in memory) and :func:`tangentlens.attribute_from_store` (feature
rows streamed from Zarr stores) evaluate the same estimator, TRAK's

.. math:: \tau(x, z_i) = \phi(x)^\top (\Phi^\top\Phi + \lambda I)^{-1} \phi(z_i)\, q_i ,
   \qquad q_i = 1 - p_{y_i}(x_i),

so the pieces live here, below both: the weights q (from logits the caller already has,
:func:`attribution_q`, or from one streamed forward pass, :func:`attribution_q_from_model`), the default
ridge λ = ``DEFAULT_LAM_SCALE`` · tr(K)/N, the shifted Cholesky factor, the dual (N×N) and primal (D×D)
solves, :class:`TopAttributions` and the running top-k (:class:`RunningTop`) that keeps k proponents and
opponents per target while the scores stream past in blocks of training points.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.special import expit
from torch import Tensor, nn

from .errors import InputError, NonFiniteError
from .faithfulness import log_odds64, softmax64
from .inputs import Source, move_batch
from .network import call_model, extract_logits, prepared
from .probes import check_labels, labels_mode

__all__ = [
    "DEFAULT_LAM_SCALE", "TopAttributions", "RunningTop", "attribution_q", "attribution_q_from_model",
    "check_k", "check_lam", "default_lam", "shifted_cholesky", "solve_dual", "solve_primal", "q_of_logits",
    "iter_logits",
]

DEFAULT_LAM_SCALE: float = 1.0
"""Default ridge λ = ``DEFAULT_LAM_SCALE`` · tr(K)/N (relative to the kernel's scale)."""


# ------------------------------------------------------------------------------------------------ q
def q_of_logits(z: Tensor, y: Tensor) -> Tensor:
    """q_i = 1 − p_{y_i}(x_i) = σ(−m_i) (N,) float64, m the label's log-odds; one logit z reads as [0, z].

    Through the log-odds (:func:`tangentlens.faithfulness.log_odds64`), so q keeps its relative
    precision when p_y rounds to 1 (a confident, correctly classified training point)."""
    y = check_labels(y, z.shape[1], "margin")
    return torch.from_numpy(expit(-log_odds64(z, y)))


def attribution_q(logits: ArrayLike | Tensor, labels: ArrayLike | Tensor | str) -> Tensor:
    """The attribution weights q_i = 1 − p_{y_i}(x_i) of training points, from logits you already have.

    q_i = σ(−m_i) with m_i = z_{y_i} − log Σ_{c≠y_i} exp z_c the label's log-odds, in float64 (so q keeps
    its relative precision where p_y rounds to 1). These are the q that :func:`tangentlens.attribute`
    computes internally and that :func:`tangentlens.attribute_from_store` takes as ``q=``.

    Args:
        logits: (N, C) logits of the training points in the network's eval mode (numpy or torch, any
            float dtype), or (N,) / (N, 1) single logits of a binary model (read as [0, z]).
        labels: (N,) class indices — the labels the margin features were computed with — or
            ``"predicted"`` (the logits' argmax; for one logit, 1 where z > 0).

    Returns:
        (N,) float64 tensor. Cost O(N·C).

    Raises:
        InputError: non-finite or badly shaped logits; labels of the wrong length or range.
    """
    z = _logits2d(logits)
    lab, pred = labels_mode(labels)
    if pred:
        y = torch.from_numpy(softmax64(z.numpy()).argmax(1))
    elif lab is None:
        raise InputError("attribution_q needs labels: the (N,) class indices the margin features were "
                         "computed with, or labels='predicted'.")
    else:
        y = torch.as_tensor(lab.detach().cpu() if isinstance(lab, Tensor) else np.asarray(lab)).reshape(-1)
        if y.shape[0] != z.shape[0]:
            raise InputError(f"labels has {y.shape[0]} entries but logits has {z.shape[0]} rows; pass one "
                             "label per training point, in the same order.")
    return q_of_logits(z, y)


def _logits2d(logits: Any) -> Tensor:
    a = logits.detach().cpu().numpy() if isinstance(logits, Tensor) else np.asarray(logits)
    if a.dtype.kind not in "fiu":
        raise InputError(f"logits must be a numeric array; got dtype {a.dtype}.")
    a = a.astype(np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise InputError(f"logits must be (N, C) or (N,) with N >= 1; got shape {a.shape}.")
    if not np.isfinite(a).all():
        raise NonFiniteError("logits contain NaN or infinite values.")
    return torch.from_numpy(a)


def iter_logits(model: nn.Module, src: Source, *, device: Any = None, dtype: torch.dtype | None = None
                ) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The network's logits block by block (float64, CPU, eval mode) over ``src``, with the block's labels.

    Raises:
        NonFiniteError: NaN or infinite logits.
    """
    with prepared(model, device=device, dtype=dtype) as (work, dev, dt), torch.no_grad():
        for blk in src.blocks():
            x = move_batch(blk.x, dev, dt)
            z = extract_logits(call_model(work, x), blk.size).double().cpu()
            if not torch.isfinite(z).all():
                raise NonFiniteError(f"NaN or infinite logits on {src.name}.")
            yield z, blk.y


def attribution_q_from_model(
    model: nn.Module,
    data: Any,
    *,
    labels: Any = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """q_i = 1 − p_{y_i}(x_i) of every training point from one streamed forward pass (eval mode).

    Memory: one block of inputs and its logits, plus the (N,) result — the logits are never held whole.
    Pass the model, data and labels that :func:`tangentlens.featurize` wrote the margin store with.

    Args:
        model: the network (one ensemble member: one call per member).
        data: the training examples in the store's order (any input form of :func:`tangentlens.kernel`).
        labels: (N,) labels; ``None`` takes them from ``(x, y)`` pairs / labelled datasets;
            ``"predicted"``: this model's own predictions (what ``featurize(..., labels="predicted")``
            differentiates).
        batch_size: examples per forward pass.
        device, dtype: as in :func:`tangentlens.kernel` (``dtype=torch.float64`` for exact q; q is
            computed in float64 from the logits either way).

    Returns:
        (N,) float64 tensor on the CPU. Cost: one forward pass over ``data``.

    Raises:
        InputError: no labels anywhere (the message says how to pass them); labels of the wrong length or
            range.
        NonFiniteError: non-finite logits.
    """
    lab, pred = labels_mode(labels)
    src = Source(data, batch_size, lab, "data")
    if not pred and not src.yields_labels:
        raise InputError(
            "attribution_q_from_model needs the labels of data: pass labels=... (one class index per "
            "example, those the store was featurized with), (inputs, labels) pairs as data, or "
            "labels='predicted' for the network's own predictions.")
    out: list[Tensor] = []
    with closing(iter_logits(model, src, device=device, dtype=dtype)) as blocks:  # restores the model's mode
        for z, y in blocks:
            if pred:
                y = torch.from_numpy(softmax64(z.numpy()).argmax(1))
            elif y is None:
                raise InputError("Some blocks of data carry no labels; pass labels=... explicitly.")
            out.append(q_of_logits(z, torch.as_tensor(y)))
    return torch.cat(out)


# ------------------------------------------------------------------------------------- λ and solves
def check_lam(lam: Any) -> float | None:
    """``lam`` as a float, or ``None``.

    Raises:
        InputError: not a positive finite number.
    """
    if lam is None:
        return None
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise InputError(f"lam must be a positive finite number (the ridge λ); got {lam!r}.")
    return float(lam)


def default_lam(trace: float, n: int) -> float:
    """λ = ``DEFAULT_LAM_SCALE`` · tr(K)/N (tr(K) = tr(ΦᵀΦ), the sum of the squared feature norms).

    Raises:
        InputError: a zero kernel (nothing to attribute).
    """
    lam = DEFAULT_LAM_SCALE * trace / n
    if not lam > 0:
        raise InputError(
            "The margin kernel of the training points is zero (no parameter gradient reaches the margins); "
            "check parameters= or pass lam= explicitly."
        )
    return lam


def shifted_cholesky(A: Tensor, lam: float, *, overwrite: bool = False) -> Tensor:
    """Lower Cholesky factor of A + λI. Cost n³/3; memory one n×n factor (two unless ``overwrite``).

    Args:
        A: symmetric (n, n).
        lam: the shift λ.
        overwrite: add λ to A's diagonal in place (A is then spent) instead of working on a copy.

    Raises:
        InputError: A + λI is not numerically positive definite (the message asks for a larger λ).
    """
    A = A if overwrite else A.clone()
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise InputError(f"K + λI is not numerically positive definite for λ = {lam:.3g}; pass a larger "
                         "lam=.")
    return L


def solve_dual(K: Tensor, Kt: Tensor, q: Tensor, lam: float | None) -> Tensor:
    """k(x, X)(K + λI)⁻¹ diag(q): (T, N)."""
    if not (torch.isfinite(K).all() and torch.isfinite(Kt).all()):
        raise NonFiniteError("NaN or infinite margin kernel values.")
    lam = default_lam(float(K.diagonal().sum()), K.shape[0]) if lam is None else lam
    L = shifted_cholesky(K, lam)
    return torch.cholesky_solve(Kt.T.contiguous(), L).T * q[None, :]


def solve_primal(F: Tensor, Ft: Tensor, q: Tensor, lam: float | None) -> Tensor:
    """φ(x)ᵀ(ΦᵀΦ + λI)⁻¹Φᵀ diag(q): (T, N), with Φ = F (N, D) and φ = Ft (T, D)."""
    if not (torch.isfinite(F).all() and torch.isfinite(Ft).all()):
        raise NonFiniteError("NaN or infinite projected margin features.")
    lam = default_lam(float((F * F).sum()), F.shape[0]) if lam is None else lam
    L = shifted_cholesky(F.T @ F, lam)
    return (F @ torch.cholesky_solve(Ft.T.contiguous(), L)).T * q[None, :]


# ------------------------------------------------------------------------------------------- top-k
@dataclass(frozen=True)
class TopAttributions:
    """The k most positive (proponents) and most negative (opponents) scores of each test target.

    Attributes:
        proponents: (T, k) training indices of the largest scores, largest first.
        proponent_scores: (T, k) their scores.
        opponents: (T, k) training indices of the smallest (most negative) scores, most negative first.
        opponent_scores: (T, k) their scores.

    With fewer than k positive (negative) scores the lists continue with the next ones in order, so
    check the sign of the scores before calling a point a proponent (opponent).
    """

    proponents: Tensor
    proponent_scores: Tensor
    opponents: Tensor
    opponent_scores: Tensor

    def to_dict(self) -> dict[str, list[list[Any]]]:
        """Plain-python dict of lists (one list per target)."""
        return {
            "proponents": self.proponents.tolist(),
            "proponent_scores": self.proponent_scores.tolist(),
            "opponents": self.opponents.tolist(),
            "opponent_scores": self.opponent_scores.tolist(),
        }


def check_k(k: Any) -> int:
    """``k`` as an int.

    Raises:
        InputError: not a positive integer.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer; got {k!r}.")
    return int(k)


class RunningTop:
    """The top-k proponents and opponents of T targets over N columns that arrive in blocks, in order.

    After every block the kept lists are exactly :func:`tangentlens.top_attributions` of the columns seen
    so far, ties included (among equal scores the lower training index first). Per block, ``torch.topk``
    picks each target's k best columns of the block in O(b) (rows where a tie at the k-th value was cut
    are redone with a stable sort), they are ordered by (score, index), and a stable sort merges them
    after the kept k — which have lower indices, so ties keep the lower index. Memory 4·T·k plus a few
    (T, b) arrays; cost O(T·b + T·k log k) per block of b columns.

    Args:
        n_targets: T.
        k: how many of each to keep; capped at ``n`` (the total number of columns).
        n: total number of columns N.
    """

    def __init__(self, n_targets: int, k: int, n: int) -> None:
        self.k = min(check_k(k), n)
        self.n = n
        self._seen = 0
        empty = (torch.empty(n_targets, 0, dtype=torch.float64), torch.empty(n_targets, 0, dtype=torch.long))
        self._hi = self._lo = empty

    def update(self, start: int, scores: Tensor) -> None:
        """Merge the (T, b) scores of columns ``start .. start + b − 1`` (blocks must come in order).

        Raises:
            InputError: a block out of order.
            NonFiniteError: non-finite scores.
        """
        if start != self._seen:
            raise InputError(f"blocks must arrive in order: expected column {self._seen}, got {start}.")
        s = scores.to(torch.float64)
        if not torch.isfinite(s).all():
            raise NonFiniteError(f"NaN or infinite attribution scores in columns {start}.."
                                 f"{start + s.shape[1] - 1}.")
        self._hi = self._merge(self._hi, s, start, descending=True)
        self._lo = self._merge(self._lo, s, start, descending=False)
        self._seen += s.shape[1]

    def _merge(self, kept: tuple[Tensor, Tensor], s: Tensor, start: int, descending: bool
               ) -> tuple[Tensor, Tensor]:
        """Merge the block's k largest (``descending``) or smallest scores into ``kept``."""
        def order(v: Tensor) -> Tensor:  # top_attributions' order: stable, by -S (proponents) or S
            return torch.argsort(-v if descending else v, dim=1, stable=True)

        kk = min(self.k, s.shape[1])
        v, i = torch.topk(s, kk, dim=1, largest=descending, sorted=False)
        kth = (v.min(dim=1, keepdim=True) if descending else v.max(dim=1, keepdim=True)).values
        cut = ((s == kth).sum(1) != (v == kth).sum(1)).nonzero().flatten()  # a tie at the k-th value
        if cut.numel():
            i[cut] = order(s[cut])[:, :kk]
        i = i.sort(dim=1).values  # by index, then stably by score
        i = i.gather(1, order(s.gather(1, i)))
        vals = torch.cat([kept[0], s.gather(1, i)], dim=1)
        cols = torch.cat([kept[1], i + start], dim=1)
        best = order(vals)[:, : self.k]
        return vals.gather(1, best), cols.gather(1, best)

    def result(self) -> TopAttributions:
        """The kept lists as :class:`TopAttributions`.

        Raises:
            InputError: not every column has been seen.
        """
        if self._seen != self.n:
            raise InputError(f"only {self._seen} of {self.n} columns were merged.")
        return TopAttributions(self._hi[1], self._hi[0], self._lo[1], self._lo[0])
