r"""Counterfactual attribution streamed from margin feature stores: TRAK's primal D×D form, out of core.

The estimator of :func:`tangentlens.attribute` with ``projection=`` R,

.. math:: \tau(x, z_i) = \phi(x)^\top (\Phi^\top\Phi + \lambda I_D)^{-1} \phi(z_i)\, q_i ,

read from a :class:`~tangentlens.FeatureStore` of projected margin features Φ (N×D, ``kind="margin"``)
instead of memory: one pass over the stored rows accumulates G = ΦᵀΦ in float64 block by block, λ defaults
to ``DEFAULT_LAM_SCALE`` · tr(G)/N (as in :func:`tangentlens.attribute`), G + λI is factored once
(Cholesky), A = φ_test (G + λI)⁻¹ is solved for the T targets, and a second pass forms the scores of each
block of training rows, τ[:, block] = A Φ_blockᵀ · q_block. :func:`attribute_from_store` keeps the (T, N)
scores; :func:`top_attributions_from_store` keeps only the running top-k per target, so N can be as large
as the store. q_i = 1 − p_{y_i}(x_i) comes from logits the caller has (:func:`tangentlens.attribution_q`)
or from one streamed forward pass (:func:`tangentlens.attribution_q_from_model`).

Usage::

    P = tl.Projection(2048, seed=0)                       # the same projection for both splits
    tr = tl.featurize(model, x_train, "run/train", kind="margin", labels=y_train, projection=P)
    te = tl.featurize(model, x_test, "run/test", kind="margin", labels=y_test, projection=P)
    q = tl.attribution_q_from_model(model, x_train, labels=y_train)   # or tl.attribution_q(logits, y_train)
    S = tl.attribute_from_store(tr, te, q=q)              # (T, N) == tl.attribute(..., projection=P)
    top = tl.top_attributions_from_store(tr, te, q=q, k=10)          # never holds (T, N)
    S5 = tl.attribute_from_store([tr1, tr2], [te1, te2], q=[q1, q2])  # ensemble: the members' mean
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from ..attribution_core import RunningTop, TopAttributions, check_lam, default_lam, shifted_cholesky
from ..errors import InputError, NonFiniteError, StoreMismatchError
from .features import FeatureStore, config_identity
from .fingerprint import shorten
from .manifest import flatten

__all__ = ["attribute_from_store", "top_attributions_from_store"]

StoreLike = FeatureStore | str | os.PathLike[str]
_ROW_VALUES = 2**20  # default block: at most this many float64 values of training rows (8 MiB) ...
_SCORE_VALUES = 2**18  # ... and of (T x rows) scores (2 MiB)
_FEATURIZE = ("featurize them with tl.featurize(model, data, path, kind='margin', labels=y, projection=R) "
              "(the same model, projection and options for the training and the test points)")


def attribute_from_store(
    train: StoreLike | Sequence[StoreLike],
    test: StoreLike | ArrayLike | Tensor | Sequence[Any],
    *,
    q: ArrayLike | Tensor | Sequence[Any],
    lam: float | None = None,
    block_rows: int | None = None,
) -> Tensor:
    r"""Counterfactual attribution scores τ(x, z_i) of T targets to the N training points of a margin store.

    τ = φ(x)ᵀ(ΦᵀΦ + λI_D)⁻¹Φᵀ diag(q) — :func:`tangentlens.attribute`'s primal form with ``projection=``,
    equal to it for the same projection (to rounding), with Φ streamed from ``train`` in blocks of
    ``block_rows`` rows: one pass accumulates G = ΦᵀΦ in float64, a second forms the scores block by block.

    Args:
        train: the margin :class:`~tangentlens.FeatureStore` of the N training points (or its path), or a
            list of them, one per ensemble member (the scores are averaged, as in
            :func:`tangentlens.attribute`; every member's store holds the same N points in the same order).
        test: the targets' margin features: a FeatureStore (or path) of the same model and configuration,
            or an in-memory (T, D) array / tensor; a list with one per member for an ensemble.
        q: (N,) weights q_i = 1 − p_{y_i}(x_i) of the training points, in the store's order
            (:func:`tangentlens.attribution_q` from logits, :func:`tangentlens.attribution_q_from_model`
            from one forward pass); for an ensemble one per member (a list, or an (M, N) array).
        lam: ridge λ > 0; ``None``: ``DEFAULT_LAM_SCALE`` · tr(ΦᵀΦ)/N per member, as
            :func:`tangentlens.attribute`.
        block_rows: training rows per block; default: the most whole chunks of the store that keep a block
            within 2²⁰ float64 values (8 MiB) and its T × block scores within 2¹⁸ (2 MiB).

    Returns:
        (T, N) float64 tensor on the CPU; entry (n, i) predicts how much training point i raises the
        margin of target n (positive: proponent, negative: opponent).

    Cost: per member two passes over the store (reads N·D values each), N·D² flops for G, D³/3 for the
    Cholesky factor, T·D² for the solve and T·N·D for the scores. Memory: 2·D² floats (G and its factor,
    while a member is solved), T·D per member, one block of rows, and the (T, N) result.

    Raises:
        StoreMismatchError: a store does not hold margin features, or the test features do not come from
            the same model and configuration as the training features (the message names the field).
        InputError: an incomplete store, a missing or wrong-length q, test rows of another dimension D,
            mismatched ensemble lists, a bad ``lam`` or ``block_rows``.
        NonFiniteError: non-finite test rows or q.
    """
    members, rows, n = _prepare(train, test, q, lam, block_rows)
    out = torch.empty(members[0].A.shape[0], n, dtype=torch.float64)
    for s, S in _score_blocks(members, rows):
        out[:, s : s + S.shape[1]] = S
    return out


def top_attributions_from_store(
    train: StoreLike | Sequence[StoreLike],
    test: StoreLike | ArrayLike | Tensor | Sequence[Any],
    *,
    q: ArrayLike | Tensor | Sequence[Any],
    k: int = 10,
    lam: float | None = None,
    block_rows: int | None = None,
) -> TopAttributions:
    """The top-k proponents and opponents of each target, streamed: (T, N) scores are never held.

    Equal to ``tl.top_attributions(tl.attribute_from_store(train, test, q=q, lam=lam), k)``, ties included
    (among equal scores the lower training index first), while keeping only the running k best and worst
    of each target as the blocks of scores pass.

    Args:
        train, test, q, lam, block_rows: as in :func:`attribute_from_store`.
        k: how many proponents and opponents per target; capped at N.

    Returns:
        :class:`~tangentlens.TopAttributions` with (T, k) indices and scores.

    Cost: that of :func:`attribute_from_store` plus a stable sort of T × (k + block) values per block.
    Memory: 2·D² floats while a member is solved, T·D per member, one block of rows and O(T·(k + block))
    for the merge — independent of N.

    Raises:
        InputError: ``k`` not a positive integer; and what :func:`attribute_from_store` raises.
    """
    members, rows, n = _prepare(train, test, q, lam, block_rows)
    top = RunningTop(members[0].A.shape[0], k, n)
    for s, S in _score_blocks(members, rows):
        top.update(s, S)
        del S  # one block of scores alive at a time
    return top.result()


# ------------------------------------------------------------------------------------------ internals
@dataclass
class _Member:
    """One ensemble member: its training store, A = φ_test(G + λI)⁻¹ (T, D) and q (N,)."""

    store: FeatureStore
    A: Tensor
    q: Tensor


def _prepare(train: Any, test: Any, q: Any, lam: Any, block_rows: Any
             ) -> tuple[list[_Member], int, int]:
    """Validate everything first (cheap), then solve each member (one pass over its store)."""
    lam = check_lam(lam)
    given = _listed(train, "train")
    M = len(given)
    names = ["train"] if M == 1 else [f"train[{i}]" for i in range(M)]
    stores = [_open(s, name) for s, name in zip(given, names)]
    tests = _per_member(test, M, "test")
    qs = _q_per_member(q, M)
    n = stores[0].n
    for name, fs in zip(names, stores):
        _check_margin(fs, f"The {name} store at {str(fs.path)!r}")
        if fs.n != n:
            raise InputError(f"The ensemble's training stores hold different numbers of examples ({n} and "
                             f"{fs.n}); every member's store must hold the same training points in the same "
                             "order.")
    rows_test = [_test_rows(t, fs, nm.replace("train", "test")) for t, fs, nm in zip(tests, stores, names)]
    qv = [_check_q(qq, fs, name) for qq, fs, name in zip(qs, stores, names)]
    rows = _block_rows(block_rows, stores[0], max(r.shape[0] for r in rows_test))
    return [_solve(fs, Ft, qq, lam, rows) for fs, Ft, qq in zip(stores, rows_test, qv)], rows, n


def _solve(fs: FeatureStore, Ft: Tensor, q: Tensor, lam: float | None, rows: int) -> _Member:
    D = Ft.shape[1]
    G = torch.zeros(D, D, dtype=torch.float64)
    for _, blk in fs.iter_blocks(rows):
        B = torch.from_numpy(np.asarray(blk, dtype=np.float64))
        G.addmm_(B.T, B)
    if not torch.isfinite(G).all():
        raise NonFiniteError(f"NaN or infinite values in the features of the store at {str(fs.path)!r}.")
    lam_m = default_lam(float(G.diagonal().sum()), fs.n) if lam is None else lam
    L = shifted_cholesky(G, lam_m, overwrite=True)
    del G
    A = torch.cholesky_solve(Ft.T.contiguous(), L).T.contiguous()
    return _Member(fs, A, q)


def _score_blocks(members: list[_Member], rows: int) -> Iterator[tuple[int, Tensor]]:
    """(start, (T, b) scores) per block of training rows, averaged over the members."""
    for blocks in zip(*(m.store.iter_blocks(rows) for m in members)):
        total: Tensor | None = None
        for m, (s, blk) in zip(members, blocks):
            B = torch.from_numpy(np.asarray(blk, dtype=np.float64))
            part = (m.A @ B.T).mul_(m.q[None, s : s + B.shape[0]])
            total = part if total is None else total.add_(part)
        assert total is not None
        yield blocks[0][0], total if len(members) == 1 else total.div_(len(members))
        del total, part, B  # before the next block's are made


def _listed(x: Any, arg: str) -> list[Any]:
    if isinstance(x, (list, tuple)):
        if not x:
            raise InputError(f"{arg} is an empty list; pass a feature store (or one per ensemble member).")
        return list(x)
    return [x]


def _open(s: Any, name: str) -> FeatureStore:
    if isinstance(s, FeatureStore):
        if not s.complete:
            raise InputError(f"The feature store at {str(s.path)!r} ({name}) is incomplete; finish its "
                             "featurization (call tl.featurize again with the same arguments) first.")
        return s
    if isinstance(s, (str, os.PathLike)):
        return FeatureStore.open(s)
    raise InputError(f"{name} must be a tangentlens.FeatureStore or the path of one; got {type(s).__name__}.")


def _per_member(test: Any, M: int, arg: str) -> list[Any]:
    if isinstance(test, (list, tuple)):
        if len(test) != M:
            raise InputError(f"{arg} lists {len(test)} entries for {M} training store(s); pass one test "
                             "store or (T, D) array per ensemble member, in the same order as train.")
        return list(test)
    if M != 1:
        raise InputError(f"train lists {M} stores (an ensemble) but {arg} is a single entry; pass a list "
                         "with each member's test features (its own store or (T, D) array).")
    return [test]


def _q_per_member(q: Any, M: int) -> list[Any]:
    if q is None:
        raise InputError("q is required: the (N,) weights 1 − p_y of the training points, e.g. "
                         "tl.attribution_q(train_logits, y_train) or tl.attribution_q_from_model(model, "
                         "x_train, labels=y_train).")
    arrays = (Tensor, np.ndarray, list, tuple)
    if isinstance(q, (list, tuple)) and q and all(isinstance(e, arrays) for e in q):
        items = list(q)
    else:
        arr = q.detach().cpu().numpy() if isinstance(q, Tensor) else np.asarray(q)
        items = list(arr) if arr.ndim == 2 else [arr]
    if len(items) != M:
        raise InputError(f"q holds weights for {len(items)} member(s) but train lists {M} store(s); pass one "
                         "(N,) q per ensemble member (a list, or an (M, N) array).")
    return items


def _check_q(q: Any, fs: FeatureStore, name: str) -> Tensor:
    a = q.detach().cpu().numpy() if isinstance(q, Tensor) else np.asarray(q)
    if a.dtype.kind not in "fiu":
        raise InputError(f"q must be numeric (the weights 1 − p_y); got dtype {a.dtype}.")
    a = a.astype(np.float64)
    if a.ndim != 1 or a.shape[0] != fs.n:
        raise InputError(
            f"q for {name} has shape {a.shape} but the store at {str(fs.path)!r} holds N = {fs.n} training "
            "points; compute q on the same training data in the store's order (tl.attribution_q(logits, "
            "labels) or tl.attribution_q_from_model(model, data, labels=...)).")
    if not np.isfinite(a).all():
        raise NonFiniteError(f"q for {name} contains NaN or infinite values.")
    return torch.from_numpy(a)


def _check_margin(fs: FeatureStore, what: str) -> None:
    kind = fs.config.kind
    if kind != "margin":
        raise StoreMismatchError(f"{what} holds kind={kind!r} features, but counterfactual attribution "
                                 f"needs margin features: {_FEATURIZE}.")
    if fs.row_shape is None or len(fs.row_shape) != 1:
        raise StoreMismatchError(f"{what} holds rows of shape {fs.row_shape}, not (D,) feature rows.")


def _test_rows(t: Any, train: FeatureStore, name: str) -> Tensor:
    """The targets' rows (T, D) in float64 after checking them against the training store."""
    D = train.row_shape[0]  # type: ignore[index]
    if isinstance(t, (FeatureStore, str, os.PathLike)):
        fs = _open(t, name)
        what = f"The {name} store at {str(fs.path)!r}"
        _check_margin(fs, what)
        if fs.row_shape != train.row_shape:
            raise StoreMismatchError(
                f"{what} holds rows of D = {fs.row_shape[0]} but the training store at "  # type: ignore[index]
                f"{str(train.path)!r} holds D = {D}: {_FEATURIZE}.")
        a, b = (flatten(config_identity(s.config)) for s in (train, fs))
        for field in sorted(set(a) | set(b)):
            if a.get(field) != b.get(field):
                raise StoreMismatchError(
                    f"{what} was featurized with {field} = {shorten(b.get(field))} but the training store at "
                    f"{str(train.path)!r} with {shorten(a.get(field))}: {_FEATURIZE}.")
        ma, mb = train.manifest["model_fingerprint"], fs.manifest["model_fingerprint"]
        if ma != mb:
            raise StoreMismatchError(
                f"{what} comes from another model (fingerprint {shorten(mb)}) than the training store at "
                f"{str(train.path)!r} ({shorten(ma)}): {_FEATURIZE}.")
        rows = np.asarray(fs[:], dtype=np.float64)
    else:
        arr = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
        if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != D:
            raise InputError(
                f"{name} must be a (T, D) array of margin features with D = {D} (the training store's row "
                f"dimension) and T >= 1, or a FeatureStore; got {arr.dtype} array of shape {arr.shape}.")
        rows = arr.astype(np.float64)
        if not np.isfinite(rows).all():
            raise NonFiniteError(f"{name} contains NaN or infinite feature values.")
    return torch.from_numpy(rows)


def _block_rows(block_rows: Any, fs: FeatureStore, T: int) -> int:
    if block_rows is not None:
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise InputError(f"block_rows must be a positive integer; got {block_rows!r}.")
        return int(block_rows)
    D = fs.row_shape[0]  # type: ignore[index]
    rows = max(1, min(_ROW_VALUES // D, _SCORE_VALUES // max(T, 1)))
    c = fs.chunk_rows
    return min(fs.n, rows // c * c if rows >= c else rows)  # whole chunks where they fit
