"""PNG figures for the report, drawn from plain arrays (no torch, no models).

Matplotlib runs on its non-interactive ``Agg`` backend, so the figures render on machines without a display.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tangentlens.errors import InputError

__all__ = ["scatter", "gallery"]


def _pyplot():  # returns the matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def scatter(
    path: str | Path,
    x: np.ndarray | Sequence[float],
    y: np.ndarray | Sequence[float],
    *,
    series: Sequence[tuple[str, np.ndarray, np.ndarray]] | None = None,
    correct: np.ndarray | Sequence[bool] | None = None,
    title: str = "",
    xlabel: str = "network",
    ylabel: str = "surrogate",
    annotation: str | None = None,
) -> Path:
    """Scatter plot of paired confidences (e.g. network vs surrogate true-class probability).

    Args:
        path: output PNG file; parent folders are created.
        x: first coordinate of each point (e.g. the network's confidence), shape (N,).
        y: second coordinate (e.g. the surrogate's confidence), shape (N,).
        series: optional extra ``(label, x, y)`` series drawn on the same axes in other colours.
        correct: optional booleans, shape (N,): points where this is False are drawn as crosses.
        title: figure title.
        xlabel: x-axis label.
        ylabel: y-axis label.
        annotation: optional text placed in the upper-left corner (e.g. "tau = 0.81").

    Returns:
        The path written. Cost: O(N) drawing.

    Raises:
        InputError: if ``x`` and ``y`` (or ``correct``) differ in length or are empty.
    """
    xs = np.asarray(x, dtype=float).ravel()
    ys = np.asarray(y, dtype=float).ravel()
    if xs.size == 0 or xs.shape != ys.shape:
        raise InputError(f"scatter needs x and y of one non-zero length, got {xs.size} and {ys.size}.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 5.0), dpi=110)
    lo = float(min(xs.min(), ys.min(), 0.0))
    hi = float(max(xs.max(), ys.max(), 1.0))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--", zorder=0)
    first_label = series[0][0] if series else None
    extra = list(series[1:]) if series else []
    if correct is not None:
        ok = np.asarray(correct, dtype=bool).ravel()
        if ok.shape != xs.shape:
            raise InputError(f"correct has {ok.size} entries, x has {xs.size}.")
        ax.scatter(xs[ok], ys[ok], s=9, alpha=0.6, label=first_label or "network correct")
        ax.scatter(xs[~ok], ys[~ok], s=22, marker="x", color="C3", label="network wrong")
    else:
        ax.scatter(xs, ys, s=9, alpha=0.6, label=first_label)
    for i, (label, sx, sy) in enumerate(extra):
        ax.scatter(np.asarray(sx).ravel(), np.asarray(sy).ravel(), s=9, alpha=0.5, label=label,
                   color=f"C{i + 1}")
    if annotation:
        ax.text(0.03, 0.97, annotation, transform=ax.transAxes, va="top", ha="left", fontsize=9,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(lo - 0.02, hi + 0.02)
    ax.set_ylim(lo - 0.02, hi + 0.02)
    if correct is not None or series:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def gallery(
    path: str | Path,
    queries: np.ndarray,
    proponents: np.ndarray,
    proponent_scores: np.ndarray,
    opponents: np.ndarray,
    opponent_scores: np.ndarray,
    *,
    query_titles: Sequence[str] | None = None,
    proponent_titles: Sequence[Sequence[str]] | None = None,
    opponent_titles: Sequence[Sequence[str]] | None = None,
    query_colors: Sequence[str] | None = None,
    title: str = "",
    cmap: str = "gray_r",
) -> Path:
    """A grid of images: each row is a query, then its top proponents, then its top opponents.

    Args:
        path: output PNG file; parent folders are created.
        queries: images of shape (R, H, W) (or (R, 1, H, W)), one per row; colour images as (R, H, W, 3) or
            (R, 3, H, W), each scaled to [0, 1] for display (``cmap`` applies to grey images only).
        proponents: images of shape (R, k_p, H, W) (or with a channel axis of 1, or colour as above).
        proponent_scores: contributions of shape (R, k_p), written above each image. A cell whose image
            is all NaN is left empty (use it to pad rows with fewer than k_p proponents).
        opponents: images of shape (R, k_o, H, W).
        opponent_scores: contributions of shape (R, k_o).
        query_titles: optional R titles of the query images (e.g. "test 17: y=3, net=3").
        proponent_titles: optional R x k_p extra captions (e.g. the training label), prefixed to the score.
        opponent_titles: optional R x k_o extra captions.
        query_colors: optional R matplotlib colours of the query titles and frames (default black;
            e.g. red to flag a row).
        title: figure title, wrapped to the figure's width.
        cmap: matplotlib colour map of the images.

    Returns:
        The path written. Cost: R * (1 + k_p + k_o) small images.

    Raises:
        InputError: if the shapes do not agree.
    """
    q = _as_images(np.asarray(queries, dtype=float), 3, "queries")
    p = _as_images(np.asarray(proponents, dtype=float), 4, "proponents")
    o = _as_images(np.asarray(opponents, dtype=float), 4, "opponents")
    if len({q.ndim - 3, p.ndim - 4, o.ndim - 4}) > 1:
        raise InputError("gallery images must be all grey or all colour; got queries "
                         f"{q.shape}, proponents {p.shape}, opponents {o.shape}.")
    ps = np.asarray(proponent_scores, dtype=float)
    os_ = np.asarray(opponent_scores, dtype=float)
    rows = q.shape[0]
    if rows == 0:
        raise InputError("gallery needs at least one query image.")
    if p.shape[0] != rows or o.shape[0] != rows:
        raise InputError(
            f"gallery rows disagree: {rows} queries, {p.shape[0]} proponent rows, {o.shape[0]} opponent rows."
        )
    if ps.shape != p.shape[:2] or os_.shape != o.shape[:2]:
        raise InputError(
            f"score shapes {ps.shape} / {os_.shape} do not match images {p.shape[:2]} / {o.shape[:2]}."
        )
    if query_colors is not None and len(query_colors) != rows:
        raise InputError(f"query_colors has {len(query_colors)} entries for {rows} query rows.")
    kp, ko = p.shape[1], o.shape[1]
    cols = 1 + kp + ko
    plt = _pyplot()
    # A row is a square image of ~1.3 in under its tallest caption (7 pt: ~0.15 in a line). The title is
    # wrapped to the width (9 pt: ~0.075 in a character, ~0.17 in a line): a title wider than a narrow
    # gallery (top_k of 1 or 2) was cut at both edges. Constrained layout keeps captions off the row above.
    lines = max([2, *(str(t).count("\n") + 1 for t in query_titles or ())])
    width = 1.3 * cols + 0.4
    title = "\n".join(textwrap.fill(line, max(20, int(width / 0.075))) for line in title.splitlines())
    height = (1.35 + 0.15 * lines) * rows + 0.2 + (0.17 * (title.count("\n") + 1) if title else 0.0)
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), dpi=110, squeeze=False,
                             layout="constrained")
    for r in range(rows):
        cells = [(q[r], query_titles[r] if query_titles else f"query {r}",
                  query_colors[r] if query_colors is not None else "black")]
        for j in range(kp):
            cap = "" if np.isnan(ps[r, j]) else f"{ps[r, j]:+.3g}"
            if proponent_titles and cap:
                cap = f"{proponent_titles[r][j]}\n{cap}"
            cells.append((p[r, j], cap, "tab:green"))
        for j in range(ko):
            cap = "" if np.isnan(os_[r, j]) else f"{os_[r, j]:+.3g}"
            if opponent_titles and cap:
                cap = f"{opponent_titles[r][j]}\n{cap}"
            cells.append((o[r, j], cap, "tab:red"))
        for c, (img, cap, colour) in enumerate(cells):
            ax = axes[r, c]
            if np.all(np.isnan(img)):  # an empty cell (fewer proponents/opponents than columns)
                ax.axis("off")
                continue
            if img.ndim == 3:
                ax.imshow(_rgb(img), interpolation="nearest")
            else:
                ax.imshow(img, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.0 if c else 1.0)
            ax.set_title(cap, fontsize=7, color=colour)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _as_images(a: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """Grey images with ``ndim`` axes (a singleton channel axis dropped), or colour images with ``ndim + 1``
    axes, RGB last (moved there from a channel-first axis of 3); check the result."""
    if a.ndim == ndim + 1 and a.shape[-3] == 1:
        a = a.reshape(*a.shape[:-3], *a.shape[-2:])
    elif a.ndim == ndim + 1 and a.shape[-3] == 3 and a.shape[-1] != 3:
        a = np.moveaxis(a, -3, -1)
    if not (a.ndim == ndim or (a.ndim == ndim + 1 and a.shape[-1] == 3)):
        raise InputError(f"{name} must have {ndim} axes (images last, H x W), or {ndim + 1} for colour "
                         f"images (H x W x 3 or 3 x H x W), got shape {a.shape}.")
    return a


def _rgb(img: np.ndarray) -> np.ndarray:
    """A colour image scaled to [0, 1] (inputs are often standardized): what ``imshow`` shows of RGB."""
    lo, hi = np.nanmin(img), np.nanmax(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(img)


def gallery_points(
    y_test: np.ndarray, net_pred: np.ndarray, n: int, sur_pred: np.ndarray | None = None
) -> list[int]:
    """A deterministic choice of ``n`` gallery rows: network mistakes first (at most half), then one point
    where network and surrogate disagree (if any), then correct points of distinct classes."""
    wrong = [int(i) for i in np.flatnonzero(net_pred != y_test)][: n // 2]
    chosen, seen = list(wrong), {int(y_test[i]) for i in wrong}
    if sur_pred is not None and len(chosen) < n:
        for i in np.flatnonzero(net_pred != sur_pred):
            if int(i) not in chosen:
                chosen.append(int(i))
                seen.add(int(y_test[i]))
                break
    for i in np.flatnonzero(net_pred == y_test):
        if len(chosen) >= n:
            break
        if int(y_test[i]) not in seen:
            chosen.append(int(i))
            seen.add(int(y_test[i]))
    return chosen


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out (tight, unless the figure has its own layout engine), write (creating the folder) and close
    a figure; return its path. The saved canvas grows to hold every artist (``bbox_inches="tight"``)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", pad_inches=0.1)
    _pyplot().close(fig)
    return out
