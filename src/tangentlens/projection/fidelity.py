"""Fidelity of a projected kernel: residual statistics against the exact kernel, curves over ``K``, plots.

For a JL projection the residual ``r = K_proj - K_exact`` of a cosine kernel shrinks like ``K^-1/2``;
method.md fits its distribution with ``CDF(|r|) = 1 - exp(-|r| K / a)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .hashing import check_int

__all__ = ["cosine_gram", "FidelityReport", "fidelity", "fidelity_curve", "loglog_slope", "plot_fidelity"]


def cosine_gram(features: Tensor, other: Tensor | None = None, *, eps: float = 0.0) -> Tensor:
    """Cosine kernel of feature rows: ``(n, ...)`` features are flattened per row (so ``(n, C, K)``
    proj-trNTK features are normalized after summing over classes). Cost ``2 n1 n2 F`` flops."""
    x = features.reshape(features.shape[0], -1)
    y = x if other is None else other.reshape(other.shape[0], -1)
    nx = x.norm(dim=1).clamp_min(eps)
    ny = y.norm(dim=1).clamp_min(eps)
    return (x @ y.T) / nx[:, None] / ny[None, :]


@dataclass(frozen=True)
class FidelityReport:
    """Residual statistics ``r = K_proj - K_exact`` over the off-diagonal entries of a square block.

    ``exp_cdf_a`` is the constant of method.md's fit ``CDF(|r|) = 1 - exp(-|r| K / a)``; its maximum
    likelihood estimate is ``a = K mean|r|`` (so mean|r| ~ a / K). ``quantiles`` are the 0, 1, ...,
    100 percentiles of ``|r|`` (for plotting the empirical CDF).
    """

    K: int | None
    n_entries: int
    mean_abs: float
    median_abs: float
    max_abs: float
    rel_frobenius: float
    exp_cdf_a: float
    quantiles: tuple[float, ...] = field(repr=False, default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (quantiles included)."""
        d = asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d


def fidelity(
    k_proj: Tensor, k_exact: Tensor, dim: int | None = None, *, offdiagonal: bool | None = None
) -> FidelityReport:
    """Compare a projected kernel block with the exact one.

    Args:
        k_proj, k_exact: Same-shape kernel blocks (normally cosine-normalized train x train).
        dim: The projection dimension ``K`` (for ``exp_cdf_a``; NaN when omitted).
        offdiagonal: Use only off-diagonal entries (default: True for square blocks).

    Returns:
        A :class:`FidelityReport`. ``rel_frobenius = ||r||_F / ||K_exact||_F`` over the same
        entries.

    Raises:
        InputError: shapes differ, or no entries remain.
    """
    if k_proj.shape != k_exact.shape or k_proj.dim() != 2:
        raise InputError(
            f"fidelity needs two 2-D kernel blocks of the same shape, got "
            f"{tuple(k_proj.shape)} and {tuple(k_exact.shape)}."
        )
    square = k_proj.shape[0] == k_proj.shape[1]
    off = square if offdiagonal is None else offdiagonal
    if off and not square:
        raise InputError("offdiagonal=True needs a square block.")
    kp = k_proj.detach().to(torch.float64).cpu()
    ke = k_exact.detach().to(torch.float64).cpu()
    if off:
        mask = ~torch.eye(kp.shape[0], dtype=torch.bool)
        kp, ke = kp[mask], ke[mask]
    else:
        kp, ke = kp.reshape(-1), ke.reshape(-1)
    if kp.numel() == 0:
        raise InputError("no kernel entries to compare (need at least 2 x 2 for off-diagonal stats).")
    r = (kp - ke).abs()
    mean = float(r.mean())
    sample = r
    if r.numel() > 2**24:  # torch.quantile's size limit: a seeded subsample
        gen = torch.Generator().manual_seed(0)
        sample = r[torch.randperm(r.numel(), generator=gen)[: 2**24]]
    qs = torch.quantile(sample, torch.linspace(0, 1, 101, dtype=torch.float64))
    denom = float(ke.norm())
    return FidelityReport(
        K=dim,
        n_entries=int(r.numel()),
        mean_abs=mean,
        median_abs=float(qs[50]),
        max_abs=float(r.max()),
        rel_frobenius=float(r.norm()) / denom if denom > 0 else float("inf"),
        exp_cdf_a=dim * mean if dim is not None else float("nan"),
        quantiles=tuple(float(q) for q in qs),
    )


def fidelity_curve(
    make_kernel: Callable[[int], Tensor], k_exact: Tensor, dims: Sequence[int]
) -> list[FidelityReport]:
    """``fidelity(make_kernel(K), k_exact, K)`` for every ``K`` in ``dims`` (ascending).

    ``make_kernel(K)`` returns the projected kernel block at dimension ``K`` (e.g. the cosine Gram
    of ``Projection(K, ...)`` features). Cost: that of ``len(dims)`` projected kernels.
    """
    reports = []
    for k in sorted(check_int("dim", k, minimum=1) for k in dims):
        reports.append(fidelity(make_kernel(k), k_exact, k))
    return reports


def loglog_slope(reports: Sequence[FidelityReport], stat: str = "mean_abs") -> float:
    """Least-squares slope of ``log(stat)`` against ``log(K)``; about -0.5 for a JL projection."""
    ks = [r.K for r in reports]
    if len(reports) < 2 or any(k is None for k in ks):
        raise InputError("loglog_slope needs at least two reports with K set.")
    x = torch.log(torch.tensor(ks, dtype=torch.float64))
    y = torch.log(torch.tensor([getattr(r, stat) for r in reports], dtype=torch.float64))
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def plot_fidelity(
    reports: Sequence[FidelityReport] | dict[str, Sequence[FidelityReport]],
    path: str,
    *,
    title: str | None = None,
) -> str:
    """Write a two-panel PNG: mean and max ``|r|`` against ``K`` (log-log, with a ``K^-1/2`` guide),
    and the empirical CDF of ``|r| K`` against the fitted ``1 - exp(-x / a)``. ``reports`` may be a
    dict ``label -> reports`` to overlay several projection kinds. Returns ``path``."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    series = dict(reports) if isinstance(reports, dict) else {"projection": list(reports)}
    fig = Figure(figsize=(9, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    for label, reps in series.items():
        reps = [r for r in reps if r.K is not None]
        if not reps:
            continue
        ks = [r.K for r in reps]
        line = ax1.loglog(ks, [r.mean_abs for r in reps], "o-", label=f"{label} mean|r|")[0]
        ax1.loglog(ks, [r.max_abs for r in reps], "^:", color=line.get_color(), alpha=0.6)
        last = reps[-1]
        if last.quantiles:
            q = torch.tensor(last.quantiles) * last.K
            p = torch.linspace(0, 1, len(last.quantiles))
            ax2.plot(q, p, color=line.get_color(), label=f"{label} K={last.K}")
            xs = torch.linspace(0, float(q[-1]), 200)
            ax2.plot(
                xs,
                1 - torch.exp(-xs / last.exp_cdf_a),
                "--",
                color=line.get_color(),
                alpha=0.6,
                label=f"1-exp(-x/a), a={last.exp_cdf_a:.3g}",
            )
    all_reps = [r for reps in series.values() for r in reps if r.K is not None]
    if all_reps:
        k0 = min(r.K for r in all_reps)
        k1 = max(r.K for r in all_reps)
        m0 = max(r.mean_abs for r in all_reps if r.K == k0)
        ax1.loglog([k0, k1], [m0, m0 * math.sqrt(k0 / k1)], "k--", lw=0.8, label="K^-1/2")
    if all_reps:
        ticks = sorted({int(r.K) for r in all_reps if r.K is not None})
        ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax1.set_xticks(ticks, [str(k) for k in ticks])
    ax1.set_xlabel("projection dim K")
    ax1.set_ylabel("|projected - exact| (o mean, ^ max)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("|r| K")
    ax2.set_ylabel("empirical CDF")
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
