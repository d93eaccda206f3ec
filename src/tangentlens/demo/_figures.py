"""The demo's two figures: the confidence scatter and the gallery of proponents and opponents."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets.digits import DigitsSplit
from ..faithfulness import softmax64
from ..report import gallery, scatter
from .specs import SurrogateSpec


def confidence_scatter(
    path: Path,
    kernel: str,
    surrogates: Sequence[SurrogateSpec],
    scores: Mapping[str, np.ndarray],
    rows: Sequence[Mapping[str, Any]],
    network_test_logits: np.ndarray,
    y_test: np.ndarray,
) -> tuple[Path, str]:
    """Network vs surrogate softmax probability of the true class, one series per surrogate on ``kernel``.

    Only surrogates with the first one's solver and untempered targets are drawn: their probabilities
    are on the network's own scale, so the diagonal means agreement.

    Args:
        path: the PNG to write.
        kernel: the kernel's name.
        surrogates: the specs, in table order.
        scores: each surrogate's comparison logits on ``kernel`` (by spec name), (T, C).
        rows: the faithfulness table (the τ of each series goes into the annotation).
        network_test_logits: (T, C) network logits.
        y_test: (T,) test labels.

    Returns:
        ``(path, caption)``.
    """
    idx = np.arange(len(y_test))
    net_conf = softmax64(network_test_logits)[idx, y_test]
    series = [
        (spec.name, net_conf, softmax64(scores[spec.name])[idx, y_test])
        for spec in surrogates
        if spec.name in scores and spec.solver == surrogates[0].solver and spec.temperature == 1.0
    ]
    drawn = {name for name, _, _ in series}
    tau_txt = "\n".join(
        f"τ {r['target']} = {r['tau']:.3f}"
        for r in rows
        if r["kernel"] == kernel and r["tau"] is not None and r["target"] in drawn
    )
    path = scatter(
        path,
        series[0][1],
        series[0][2],
        series=series,
        title=f"true-class confidence on {len(y_test)} test digits ({kernel} surrogates)",
        xlabel="network softmax p(true class)",
        ylabel="surrogate softmax p(true class)",
        annotation=tau_txt or None,
    )
    return path, (f"Network vs {kernel}-surrogate confidence in the true class, per test digit; the dashed "
                  "line is perfect agreement.")


def _attribution_arrays(points: Sequence[Any], k: int) -> tuple[np.ndarray, ...]:
    """``(proponent indices, contributions, opponent indices, contributions)``, each (R, k), of the
    target classes of ``points``; padded with index -1 and NaN where fewer than ``k`` exist."""
    out = [np.full((len(points), k), -1, dtype=np.int64), np.full((len(points), k), np.nan),
           np.full((len(points), k), -1, dtype=np.int64), np.full((len(points), k), np.nan)]
    for r, point in enumerate(points):
        for j, att in enumerate(point.target.proponents):
            out[0][r, j], out[1][r, j] = att.index, att.contribution
        for j, att in enumerate(point.target.opponents):
            out[2][r, j], out[3][r, j] = att.index, att.contribution
    return tuple(out)


def _coverage_text(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def explanation_gallery(
    path: Path,
    data: DigitsSplit,
    shown: Sequence[Any],
    k: int,
    surrogate_words: str,
) -> tuple[Path, str]:
    """Test digits (left) with the top-k proponents and opponents of the network's class.

    Args:
        path: the PNG to write.
        data: the split (images and labels).
        shown: the :class:`~tangentlens.explanation.PointExplanation` of each gallery row.
        k: proponents and opponents per row.
        surrogate_words: which surrogate explains, e.g. ``"trNTK / labels, τ = 0.700"``.

    Returns:
        ``(path, caption)``.
    """
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    pi, pv, oi, ov = _attribution_arrays(shown, k)
    titles = [
        f"test {p.test_index}: true {y_test[p.test_index]}\n"
        f"net {p.network_label} / sur {p.predicted_label} "
        + ("(agree)" if p.agrees else "✗ disagree")
        + f"\ntop-{k} carry {_coverage_text(p.coverage_pos)} of +,\n{_coverage_text(p.coverage_neg)} of −"
        for p in shown
    ]

    def pictures(index: np.ndarray) -> np.ndarray:
        imgs = data.to_image(data.x_train[torch.as_tensor(np.maximum(index.ravel(), 0))])
        imgs[index.ravel() < 0] = np.nan  # padding: an empty cell
        return imgs.reshape(*index.shape, 8, 8)

    def captions(index: np.ndarray) -> list[list[str]]:
        return [[f"train {j} (y={y_train[j]})" if j >= 0 else "" for j in r] for r in index]

    path = gallery(
        path,
        data.to_image(data.x_test[[p.test_index for p in shown]]),
        pictures(pi),
        pv,
        pictures(oi),
        ov,
        query_titles=titles,
        proponent_titles=captions(pi),
        opponent_titles=captions(oi),
        query_colors=["black" if p.agrees else "tab:red" for p in shown],
        title=f"Why the network predicts its class, told by the most faithful surrogate "
              f"({surrogate_words}):\ntop {k} proponents (green) and opponents (red) of the network's "
              f"class; numbers are contributions W[c,i]·κ(x,x_i) to the surrogate's logit",
    )
    return path, (f"Test digits (left; network class 'net', surrogate class 'sur', ✗ where they "
                  f"disagree) with the {k} training digits that push the surrogate's logit of "
                  f"the network's class up most (proponents, green) and down most (opponents, "
                  f"red), from the most faithful surrogate ({surrogate_words}). 'top-{k} carry' is "
                  f"the share of all positive (negative) contributions that these {k} carry.")
