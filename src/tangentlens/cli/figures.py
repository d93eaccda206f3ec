"""The report's figures for your own data: image gallery, highlighted tokens for text, confidence scatter.

Which view is drawn depends on the inputs (``[data] inputs``, or guessed from them): images (N, H, W),
(N, 1|3, H, W) or (N, H, W, 3) get the gallery of :func:`tangentlens.report.gallery`; token inputs
(``input_ids``) get rows of highlighted tokens; other inputs get no picture (the tables say it all).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arrays import to_numpy
from ..faithfulness import softmax64
from ..report import gallery, scatter
from .loading import UserData

__all__ = ["confidence_figure", "image_gallery", "input_view", "text_gallery", "tokens_of"]

_CHAR = 0.066  # inches per character of the 8 pt monospace font
_LINE = 0.19  # inches per line of text


def input_view(data: UserData, setting: str) -> str:
    """How the report shows the inputs: ``"image"``, ``"text"`` or ``"tabular"`` (``setting`` unless
    ``"auto"``; then images when there are display images or image-shaped float inputs, text when there are
    tokens or integer token ids, else tabular)."""
    if setting != "auto":
        return setting
    x = data.x_train
    if data.images_train is not None:
        return "image"
    if data.tokens_train is not None or (isinstance(x, dict) and "input_ids" in x):
        return "text"
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point() and x.dim() == 2:
            return "text"
        if x.dim() == 3 and min(x.shape[1:]) >= 4:
            return "image"
        if x.dim() == 4 and (x.shape[1] in (1, 3) or x.shape[-1] == 3) and min(x.shape[2:3]) >= 4:
            return "image"
    return "tabular"


def _display_images(a: Any) -> np.ndarray:
    """Float images for ``imshow``: (n, H, W) grey (channel axes of 1 dropped) or (n, H, W, 3) colour."""
    img = to_numpy(a, np.float64)
    if img.ndim == 4 and img.shape[1] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img[:, 0] if img.shape[1] == 1 else np.moveaxis(img, 1, -1)
    elif img.ndim == 4 and img.shape[-1] == 1:
        img = img[..., 0]
    if not (img.ndim == 3 or (img.ndim == 4 and img.shape[-1] == 3)):
        raise ValueError(f"images must be (n, H, W), (n, 1|3, H, W) or (n, H, W, 3); got {img.shape}")
    return img


def _label(data: UserData, c: int) -> str:
    return data.classes[c] if data.classes is not None and 0 <= c < len(data.classes) else str(c)


def _titles(data: UserData, shown: Sequence[Any], k: int, noun: str) -> list[str]:
    y_test = data.y_test.numpy()

    def cov(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.0f}%"

    return [
        f"{noun} {p.test_index}: true {_label(data, int(y_test[p.test_index]))}\n"
        f"net {_label(data, p.network_index)} / sur {_label(data, p.predicted_index)} "
        + ("(agree)" if p.agrees else "✗ disagree")
        + f"\ntop-{k} carry {cov(p.coverage_pos)} of +,\n{cov(p.coverage_neg)} of −"
        for p in shown
    ]


def _attributions(shown: Sequence[Any], k: int) -> tuple[np.ndarray, ...]:
    """(proponent indices, contributions, opponent indices, contributions), each (R, k), padded with -1 and
    NaN."""
    out = [np.full((len(shown), k), -1, dtype=np.int64), np.full((len(shown), k), np.nan),
           np.full((len(shown), k), -1, dtype=np.int64), np.full((len(shown), k), np.nan)]
    for r, p in enumerate(shown):
        for j, a in enumerate(p.target.proponents[:k]):
            out[0][r, j], out[1][r, j] = a.index, a.contribution
        for j, a in enumerate(p.target.opponents[:k]):
            out[2][r, j], out[3][r, j] = a.index, a.contribution
    return tuple(out)


def image_gallery(path: Path, data: UserData, shown: Sequence[Any], k: int, words: str) -> tuple[Path, str]:
    """Test images (left) with the top-k proponents and opponents of the network's class.

    Args:
        path: the PNG to write.
        data: the data (display images, or the inputs themselves).
        shown: the :class:`~tangentlens.explanation.PointExplanation` of each row.
        k: proponents and opponents per row.
        words: which surrogate explains, e.g. ``"trNTK / labels, τ = 0.70"``.

    Returns:
        ``(path, caption)``.
    """
    train = _display_images(data.images_train if data.images_train is not None else data.x_train)
    test = _display_images(data.images_test if data.images_test is not None else data.x_test)
    y_train = data.y_train.numpy()
    pi, pv, oi, ov = _attributions(shown, k)

    def pictures(index: np.ndarray) -> np.ndarray:
        imgs = train[np.maximum(index.ravel(), 0)].copy()
        imgs[index.ravel() < 0] = np.nan
        return imgs.reshape(*index.shape, *train.shape[1:])

    def captions(index: np.ndarray) -> list[list[str]]:
        return [[f"train {j} (y={_label(data, int(y_train[j]))})" if j >= 0 else "" for j in r]
                for r in index]

    gallery(path, test[[p.test_index for p in shown]], pictures(pi), pv, pictures(oi), ov,
            query_titles=_titles(data, shown, k, "test"), proponent_titles=captions(pi),
            opponent_titles=captions(oi), query_colors=["black" if p.agrees else "tab:red" for p in shown],
            title=f"Why the network predicts its class, told by the most faithful surrogate ({words}):\n"
                  f"top {k} proponents (green) and opponents (red) of the network's class; numbers are "
                  "contributions W[c,i]·κ(x,x_i) to the surrogate's logit")
    return path, (f"Test inputs (left; network class 'net', surrogate class 'sur', ✗ where they disagree) "
                  f"with the {k} training inputs that push the surrogate's logit of the network's class up "
                  "most (proponents, green) and down most (opponents, red), from the most faithful "
                  f"surrogate ({words}). 'top-{k} carry' is the share of all positive (negative) "
                  f"contributions that these {k} carry.")


# ----------------------------------------------------------------------------------------------------------
# Text.
# ----------------------------------------------------------------------------------------------------------
def tokens_of(data: UserData, split: str, i: int) -> list[str]:
    """The tokens of example ``i`` of ``split`` (``"train"`` / ``"test"``): the data's token strings, or its
    ``input_ids`` decoded with ``vocab`` (ids where there is none), without the padding
    (``attention_mask`` 0)."""
    given = data.tokens_train if split == "train" else data.tokens_test
    if given is not None:
        return list(given[i])
    x = data.x_train if split == "train" else data.x_test
    ids = x.get("input_ids") if isinstance(x, dict) else x
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return []
    row = ids[i].tolist()
    if isinstance(x, dict) and isinstance(x.get("attention_mask"), torch.Tensor):
        row = [t for t, m in zip(row, x["attention_mask"][i].tolist()) if m]
    vocab = data.vocab
    return [vocab[t] if vocab is not None and 0 <= t < len(vocab) else str(t) for t in row]


def _wrap(tokens: Sequence[str], width: int, max_lines: int) -> list[list[tuple[int, str]]]:
    """Tokens placed on lines of ``width`` characters: (column, token) per line; cut with '…'."""
    lines: list[list[tuple[int, str]]] = [[]]
    col = 0
    for tok in tokens:
        tok = tok if len(tok) <= width - 2 else tok[: width - 3] + "…"
        if col and col + len(tok) > width:
            if len(lines) == max_lines:
                lines[-1].append((col, "…"))
                return lines
            lines.append([])
            col = 0
        lines[-1].append((col, tok))
        col += len(tok) + 1
    return lines


def text_gallery(path: Path, data: UserData, shown: Sequence[Any], k: int, words: str) -> tuple[Path, str]:
    """Test texts with the top-k proponent and opponent training texts of the network's class; in every
    training text the tokens it shares with the test text are highlighted (green for a proponent, red for
    an opponent), and in the test text the tokens shared with any proponent (yellow).

    Returns:
        ``(path, caption)``.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    width_chars, max_lines = 120, 3
    y_train, titles = data.y_train.numpy(), _titles(data, shown, k, "test")
    blocks: list[tuple[str, str, list[list[tuple[int, str]]], set[str], str]] = []
    for p, title in zip(shown, titles):
        test = tokens_of(data, "test", p.test_index)
        shared = {t for a in p.target.proponents[:k] for t in tokens_of(data, "train", a.index)}
        blocks.append((title.replace("\n", "  "), "black" if p.agrees else "tab:red",
                       _wrap(test, width_chars, max_lines), shared & set(test), "#ffe680"))
        for a, colour, sign in ([(a, "#b7e4b0", "+") for a in p.target.proponents[:k]]
                                + [(a, "#f4b6b0", "−") for a in p.target.opponents[:k]]):
            toks = tokens_of(data, "train", a.index)
            head = (f"  {sign} train {a.index} (y={_label(data, int(y_train[a.index]))}), "
                    f"contribution {a.contribution:+.3g}")
            blocks.append((head, "tab:green" if sign == "+" else "tab:red",
                           _wrap(toks, width_chars - 4, max_lines), set(test) & set(toks), colour))
    lines = sum(1 + len(b[2]) for b in blocks) + 3
    fig = plt.figure(figsize=(width_chars * _CHAR + 0.6, lines * _LINE + 0.3), dpi=110)
    y = lines * _LINE + 0.1
    fig.text(0.2, y - _LINE, f"Why the network predicts its class, told by the most faithful surrogate "
             f"({words}):", fontsize=9, transform=fig.dpi_scale_trans)
    fig.text(0.2, y - 2 * _LINE, f"top {k} proponents (green) and opponents (red); highlighted: tokens "
             "shared with the test text (in the test text: shared with a proponent)", fontsize=8,
             color="0.3", transform=fig.dpi_scale_trans)
    y -= 3.2 * _LINE
    for head, colour, wrapped, marked, mark in blocks:
        indent = 0.2 if not head.startswith("  ") else 0.45
        fig.text(indent, y, head.strip(), fontsize=8, color=colour, weight="bold",
                 transform=fig.dpi_scale_trans, va="baseline")
        y -= _LINE
        for line in wrapped:
            for col, tok in line:
                box = {"facecolor": mark, "edgecolor": "none", "pad": 0.6} if tok in marked else None
                fig.text(indent + col * _CHAR, y, tok, fontsize=8, family="monospace",
                         transform=fig.dpi_scale_trans, va="baseline", bbox=box)
            y -= _LINE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path, (f"Test texts (bold; ✗ in red where network and surrogate disagree) with the {k} training "
                  f"texts that push the surrogate's logit of the network's class up most (proponents, green) "
                  f"and down most (opponents, red), from the most faithful surrogate ({words}). Highlighted "
                  "tokens are shared with the test text: a cue to what the two have in common, not a "
                  "per-token attribution.")


# ----------------------------------------------------------------------------------------------------------
# Faithfulness.
# ----------------------------------------------------------------------------------------------------------
def confidence_figure(path: Path, kernel: str, scores: dict[str, np.ndarray], taus: dict[str, float],
                      network_test_logits: np.ndarray, y_test: np.ndarray) -> tuple[Path, str]:
    """Network vs surrogate softmax probability of the true class, one series per surrogate on ``kernel``.

    Returns:
        ``(path, caption)``.
    """
    idx = np.arange(len(y_test))
    net = softmax64(network_test_logits)[idx, y_test]
    series = [(name, net, softmax64(z)[idx, y_test]) for name, z in scores.items()]
    scatter(path, series[0][1], series[0][2], series=series,
            title=f"true-class confidence on {len(y_test)} test points ({kernel} surrogates)",
            xlabel="network softmax p(true class)", ylabel="surrogate softmax p(true class)",
            annotation="\n".join(f"τ {n} = {t:.3f}" for n, t in taus.items()) or None)
    return path, (f"Network vs {kernel}-surrogate confidence in the true class, per test point; the dashed "
                  "line is perfect agreement.")
