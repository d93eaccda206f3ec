r"""Counterfactual data attribution from the exact margin kernel (TRAK's estimator, in kernel form).

The question answered here is counterfactual: *if training point z_i were removed and the network
retrained, how would the margin of a test target x change?* TRAK (Park et al., 2023) estimates it as

.. math:: \tau(x, z_i) = \phi(x)^\top (\Phi^\top\Phi + \lambda I)^{-1} \phi(z_i)\, q_i,

with φ = ∇_θ m the gradient of the margin m(x, y) = f_y(x) − log Σ_{c≠y} exp f_c(x) = log(p_y/(1 − p_y)),
Φ the N training rows and q_i = 1 − p_{y_i}(x_i). TRAK approximates φ with a random projection; by the
push-through (Woodbury) identity the same quantity is

.. math:: \tau(x, \cdot) = k(x, X)\,(K + \lambda I)^{-1} \operatorname{diag}(q),

with K the N×N ``kind="margin"`` kernel of the training points and k(x, X) its test × train block —
exact, and with no P×P matrix. A positive τ(x, z_i) means z_i raises the target's margin (removing it
would lower it): a *proponent*; a negative one is an *opponent*.

This is a different explanation from the kGLM decomposition (:meth:`KernelSurrogate.contributions`,
:func:`tangentlens.explain`): that one says what the surrogate's prediction *consists of*; attribution
says how the prediction would *change* if training points were removed. :func:`kglm_contributions`
returns the former in the same (n_test, N) layout, so both can be compared on one prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor, nn

from .api import features, train_test_kernels
from .attribution_core import (
    DEFAULT_LAM_SCALE,
    TopAttributions,
    check_k,
    check_lam,
    iter_logits,
    q_of_logits,
    solve_dual,
    solve_primal,
)
from .errors import InputError
from .faithfulness import softmax64
from .inputs import Source
from .network import ParameterSpec
from .probes import labels_mode
from .projection import Projection

__all__ = ["DEFAULT_LAM_SCALE", "TopAttributions", "attribute", "kglm_contributions", "top_attributions"]


def attribute(
    model: nn.Module | Sequence[nn.Module],
    train: Any,
    test: Any,
    *,
    labels: Any = None,
    test_labels: Any = None,
    lam: float | None = None,
    projection: Projection | None = None,
    parameters: ParameterSpec = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    r"""Counterfactual attribution scores τ(x, z_i) of every test target to every training point.

    Exact (default): τ = k(x, X)(K + λI)⁻¹ diag(q), with K (N×N) and k(x, X) (T×N) the margin kernels
    (``kind="margin"``, unnormalized) of ONE :func:`tangentlens.train_test_kernels` call, q_i =
    1 − p_{y_i}(x_i) (softmax probability of the label; sigmoid for one logit) and a Cholesky solve in
    float64. This is TRAK's estimator φ(x)ᵀ(ΦᵀΦ + λI)⁻¹φ(z_i)q_i evaluated without projection error.

    With ``projection=`` R (a :class:`tangentlens.Projection`, D dimensions): the projected margin features
    Φ = features (N×D) and φ(x) (T×D) in the primal form τ = φ(x)ᵀ(ΦᵀΦ + λI_D)⁻¹Φᵀ diag(q) — TRAK's own
    computation, for N too large for an N×N kernel. It converges to the exact scores as D grows.

    ``model`` may be a list of models (checkpoints of one run, or independently trained networks): each
    gets its own kernels, q and default λ, and the scores are averaged (TRAK's ensembling).

    The default ridge is λ = tr(K)/N (the mean squared margin-gradient norm; ``DEFAULT_LAM_SCALE`` = 1),
    relative to the kernel's scale so it does not depend on the network's parametrization. The scale was
    chosen by the LDS of a sweep on our own settings (``benchmarks/attribution_lambda.py``: scikit-learn
    digits, N = 1,500, 200 targets, 100 retrained halves): LDS rises with the scale up to ≈ 1 and is flat
    from 1 to 3 on both an MLP (1 model: 0.25 at 0.001, 0.42 at 0.1, 0.55 at 1 and 3) and a CNN (0.14,
    0.30, 0.38, 0.37); 5-model ensembles likewise. Pass ``lam=`` to override it (smaller λ: closer to the
    unregularized influence, noisier; larger λ: closer to the similarity ranking k(x, X)·diag(q)).

    Args:
        model: a network returning logits (B, C), or a non-empty list of them (scores averaged).
        train: the N training examples (any input form of :func:`tangentlens.kernel`).
        test: the T targets to attribute.
        labels: labels of ``train`` (N,); ``None`` takes them from ``(x, y)`` pairs / labelled datasets;
            ``"predicted"`` uses the network's predictions (the ensemble's mean-probability argmax).
        test_labels: labels whose margins are attributed (T,): the targets' true labels as in TRAK, or
            ``"predicted"`` (the prediction's own margin); ``None`` takes them from ``test``.
        lam: ridge λ > 0; ``None``: tr(K)/N per model (tr(ΦᵀΦ)/N with a projection).
        projection: project the margin gradients and use the primal D×D form.
        parameters, batch_size, device, dtype, memory_budget: as in :func:`tangentlens.kernel`
            (``dtype=torch.float64`` for exact kernels; the solve is float64 either way).

    Returns:
        (T, N) float64 tensor on the CPU; entry (n, i) predicts how much training point i raises the
        margin of target n (positive: proponent, negative: opponent).

    Cost: per model one forward pass over ``train`` (for q; over ``test`` too with
    ``test_labels="predicted"``) plus one margin-kernel call (one forward and one backward per example,
    Gram work N²/2 + T·N pairs); then a Cholesky factorization N³/3 and a solve T·N² flops; memory
    2 N² floats (the kernel and its float64 factor). With a projection: features N·D + T·D, then
    N·D² + D³/3 + T·N·D flops and D² + (N + T)·D floats.

    Raises:
        InputError: an empty model list or a non-module in it; missing labels (name the argument);
            labels of the wrong length or range; ``lam`` not a positive finite number; a zero margin
            kernel (nothing to attribute); a ``projection`` that is not a Projection.
        NonFiniteError: non-finite logits or kernels.
    """
    models = _models(model)
    lam = check_lam(lam)
    if projection is not None and not isinstance(projection, Projection):
        raise InputError(f"projection must be a tangentlens.Projection; got {type(projection).__name__}.")
    src_tr = Source(train, batch_size, None if _is_predicted(labels) else labels, "train")
    src_te = Source(test, batch_size, None if _is_predicted(test_labels) else test_labels, "test")
    kw: dict[str, Any] = dict(device=device, dtype=dtype)
    logits_tr, y_src_tr = zip(*(_logits(m, src_tr, **kw) for m in models))
    y_tr = _resolve_labels(labels, logits_tr, y_src_tr[0], "labels", "train")
    if _is_predicted(test_labels):
        logits_te = [_logits(m, src_te, **kw)[0] for m in models]
        y_te = _resolve_labels(test_labels, logits_te, None, "test_labels", "test")
    else:
        from_src = _source_labels(src_te) if test_labels is None else None
        y_te = _resolve_labels(test_labels, [], from_src, "test_labels", "test")
    total: Tensor | None = None
    common: dict[str, Any] = dict(parameters=parameters, batch_size=batch_size, device=device, dtype=dtype,
                                  memory_budget=memory_budget)
    for m, z in zip(models, logits_tr):
        q = q_of_logits(z, y_tr)
        if projection is None:
            K, Kt = train_test_kernels(m, train, test, kind="margin", normalize=False, labels=y_tr,
                                       test_labels=y_te, **common)
            s = solve_dual(K.double(), Kt.double(), q, lam)  # type: ignore[union-attr]
        else:
            F = features(m, train, kind="margin", normalize=False, labels=y_tr, projection=projection,
                         **common)
            Ft = features(m, test, kind="margin", normalize=False, labels=y_te, projection=projection,
                          **common)
            s = solve_primal(F.double(), Ft.double(), q, lam)
        total = s if total is None else total + s
    assert total is not None
    return total / len(models)


def _models(model: Any) -> list[nn.Module]:
    if isinstance(model, nn.Module):
        return [model]
    if isinstance(model, (str, bytes)) or not isinstance(model, Sequence):
        raise InputError(f"model must be an nn.Module or a list of them; got {type(model).__name__}.")
    models = list(model)
    if not models:
        raise InputError("model is an empty list; pass at least one trained network.")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise InputError(f"model[{i}] is a {type(m).__name__}, not an nn.Module.")
    return models


def _is_predicted(labels: Any) -> bool:
    return labels_mode(labels)[1]


def _source_labels(src: Source) -> Tensor | None:
    ys = [b.y for b in src.blocks()] if src.yields_labels else []
    if not ys or any(y is None for y in ys):
        return None
    return torch.cat([torch.as_tensor(y).reshape(-1) for y in ys])  # type: ignore[misc]


def _logits(model: nn.Module, src: Source, *, device: Any, dtype: torch.dtype | None
            ) -> tuple[Tensor, Tensor | None]:
    """The network's logits (N, C) (float64, CPU) over ``src`` in eval mode, and the source's labels."""
    zs: list[Tensor] = []
    ys: list[Tensor | None] = []
    for z, y in iter_logits(model, src, device=device, dtype=dtype):
        zs.append(z)
        ys.append(y)
    y = None if any(t is None for t in ys) else torch.cat([torch.as_tensor(t).reshape(-1) for t in ys])
    return torch.cat(zs), y


def _resolve_labels(labels: Any, logits: Sequence[Tensor], from_src: Tensor | None, arg: str, name: str
                    ) -> Tensor:
    """Labels as a long (or 0/1) tensor: the ensemble's predictions, the given ones, or the source's."""
    if _is_predicted(labels):  # argmax of the mean probability; one logit: [1 − σ(z), σ(z)]
        return torch.from_numpy(np.mean([softmax64(z) for z in logits], axis=0).argmax(1))
    y = from_src if labels is None else torch.as_tensor(labels)
    if y is None:
        raise InputError(
            f"attribute needs the labels of {name}: pass {arg}=... (one class index per example), "
            f"(inputs, labels) pairs as {name}, or {arg}='predicted' to use the network's predictions."
        )
    return y.reshape(-1)


def top_attributions(scores: Tensor | ArrayLike, k: int = 10) -> TopAttributions:
    """Top-k proponents and opponents per test target of a (T, N) score matrix.

    Works on :func:`attribute`'s scores and on :func:`kglm_contributions` alike (a (N,) vector is one
    target). Cost: two stable sorts, O(T·N log N).

    Args:
        scores: (T, N) or (N,) scores.
        k: how many of each; capped at N.

    Raises:
        InputError: ``k`` is not a positive integer, or ``scores`` is not 1-D/2-D, empty or non-finite.
    """
    k = check_k(k)
    S = torch.as_tensor(np.asarray(scores) if not isinstance(scores, Tensor) else scores)
    if S.dim() == 1:
        S = S[None]
    if S.dim() != 2 or S.shape[1] == 0:
        raise InputError(f"scores must have shape (n_test, N) with N ≥ 1; got {tuple(S.shape)}.")
    if not torch.isfinite(S).all():
        raise InputError("scores contain NaN or infinite values.")
    kk = min(int(k), S.shape[1])
    # stable sorts: among equal scores the lower training index comes first (as in tangentlens.explain)
    hi = torch.argsort(-S, dim=1, stable=True)[:, :kk]
    lo = torch.argsort(S, dim=1, stable=True)[:, :kk]
    return TopAttributions(hi, S.gather(1, hi), lo, S.gather(1, lo))


def kglm_contributions(surrogate: Any, K_test_train: ArrayLike, target: ArrayLike | None = None) -> Tensor:
    """The kGLM decomposition of one class's logit per test point, in :func:`attribute`'s layout.

    For a fitted :class:`tangentlens.KernelSurrogate` (weights W, C×N) and the kernel block
    K(test, train) it fits on (e.g. ``kind="trntk"``), entry (n, i) is A_{c_n, i}(x_n) = W[c_n, i]·K[n, i]
    (``surrogate.contributions``), so row n sums to z_{c_n}(x_n) − b_{c_n}. Side by side with
    :func:`attribute`'s scores for the same targets (e.g. through :func:`top_attributions`) this compares
    *what the surrogate's prediction consists of* with *how the prediction would change if training
    points were removed*. Cost: T·N multiplications (only the explained class's row of W is used).

    Args:
        surrogate: a fitted kernel surrogate (``class_coef_``, ``classes_``, ``logits``).
        K_test_train: (T, N) kernel block.
        target: (T,) class labels (values of ``surrogate.classes_``) to explain, e.g. the test labels
            used with :func:`attribute`; ``None``: the surrogate's predicted classes.

    Returns:
        (T, N) float64 tensor.

    Raises:
        InputError: ``target`` has the wrong length or a label the surrogate does not know.
    """
    K = np.asarray(K_test_train, dtype=np.float64)
    W = np.asarray(surrogate.class_coef_, dtype=np.float64)
    if K.ndim != 2 or K.shape[1] != W.shape[1]:
        raise InputError(f"K_test_train must be a 2-D (n_test, N) kernel block against the surrogate's "
                         f"N = {W.shape[1]} training points; got shape {K.shape}.")
    classes = list(np.asarray(surrogate.classes_).tolist())
    if target is None:
        idx = np.argmax(surrogate.logits(K), axis=1)
    else:
        t = np.asarray(target).reshape(-1)
        if t.shape[0] != K.shape[0]:
            raise InputError(f"target has {t.shape[0]} entries but K_test_train has {K.shape[0]} rows.")
        pos = {c: i for i, c in enumerate(classes)}
        missing = [v for v in t.tolist() if v not in pos]
        if missing:
            raise InputError(f"target labels {sorted(set(missing))[:5]} are not among the surrogate's "
                             f"classes {classes}.")
        idx = np.array([pos[v] for v in t.tolist()], dtype=np.int64)
    return torch.from_numpy(W[idx] * K)  # = surrogate.contributions(K)[n, idx[n], :], row by row
