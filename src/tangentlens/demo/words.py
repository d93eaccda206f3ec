"""The demo report's words: what every column means, the explanation table and the verdict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .specs import SurrogateSpec

__all__ = ["EXPLANATION_COLUMNS", "FAITHFULNESS_COLUMNS", "explanation_table", "verdict_in_words"]

#: What each column of the faithfulness table means (the report's legend and header tooltips).
FAITHFULNESS_COLUMNS: dict[str, str] = {
    "kernel": "the kernel the surrogate is built on (definitions under Configuration > kernels)",
    "target": "what the surrogate was fitted to (definitions under Configuration > surrogates)",
    "tau": "Kendall tau-b between the network's and the surrogate's softmax probability of the true "
           "class over the test digits (float64); -1 to 1, 1 = both rank every pair of digits the "
           "same way; (1 + tau)/2 is about the share of pairs ranked alike",
    "TAD (pp)": "test accuracy differential: surrogate minus network test accuracy, in percentage "
                "points",
    "Gamma": "misclassification overlap: |both wrong| / |either wrong| over the test digits, 0 to 1; "
             "'–' where undefined (the reason is given under the table)",
    "p": "binomial p-value of Gamma under independent errors (the reference's test); small means the "
         "two share mistakes more than chance would",
    "R2": "linearization R²: squared correlation between the network's and the surrogate's centered "
          "logits over all test digits and classes, 0 to 1",
    "acc": "surrogate test accuracy, as a fraction of the test digits (0 to 1)",
    "kernel s": "seconds to compute this kernel's train x train and test x train blocks (shared by the "
                "rows of the kernel)",
    "fit s": "seconds to fit this surrogate on the train x train block",
}

#: What each column of the explanation table means.
EXPLANATION_COLUMNS: dict[str, str] = {
    "test digit": "row of the test set (an index into the demo's test split)",
    "true": "the digit's true label",
    "network": "the network's predicted class: the class that is explained",
    "surrogate": "the surrogate's predicted class",
    "agree": "whether network and surrogate predict the same class",
    "logit − b": "the surrogate's logit of the network's class minus its intercept: the sum of all "
                 "training points' contributions W[c,i]·κ(x,x_i)",
    "sum +": "the sum of all positive contributions to that logit (the proponents' total mass)",
    "sum −": "the sum of all negative contributions (the opponents' total mass)",
    "top-k + (%)": "share of the positive mass carried by the k proponents shown: "
                   "Σ top-k positive / Σ all positive, in percent",
    "top-k − (%)": "share of the negative mass carried by the k opponents shown, in percent",
    "shown/logit (%)": "(Σ top-k proponents + Σ top-k opponents) / (logit − b), in percent; can "
                       "exceed 100 or be negative when large positive and negative masses cancel",
}


def _percent(v: float | None) -> float | None:
    """A share as a percentage rounded to 0.1 (``None`` stays ``None``)."""
    return None if v is None else round(100.0 * v, 1)


def explanation_table(points: Iterable[Any], true_labels: np.ndarray) -> list[dict[str, Any]]:
    """The report's explanation table: one row of :data:`EXPLANATION_COLUMNS` per explained point.

    Args:
        points: :class:`~tangentlens.explanation.PointExplanation` objects (with network logits).
        true_labels: the test labels, indexed by ``point.test_index``.
    """
    return [
        {
            "test digit": p.test_index,
            "true": int(true_labels[p.test_index]),
            "network": p.network_label,
            "surrogate": p.predicted_label,
            "agree": bool(p.agrees),
            "logit − b": p.target.logit - p.target.intercept,
            "sum +": p.target.positive_total,
            "sum −": p.target.negative_total,
            "top-k + (%)": _percent(p.coverage_pos),
            "top-k − (%)": _percent(p.coverage_neg),
            "shown/logit (%)": _percent(p.coverage_logit),
        }
        for p in points
    ]


def verdict_in_words(
    rows: Sequence[Mapping[str, Any]],
    surrogates: Iterable[SurrogateSpec],
    alpha: float,
    explanation: Any,
    gallery: Sequence[int],
) -> str:
    """The report's conclusion in plain English.

    Names the most faithful surrogate (highest τ; the first in table order on a tie) and reads its τ
    as the share ``(1 + τ)/2`` of test pairs ranked alike, its accuracy differential, the most
    faithful surrogate on the true labels where the winner is distilled, the least faithful one, the
    median coverage of the explanation's top-k lists, and the disagreements (those in the gallery).

    Args:
        rows: the faithfulness table (``kernel``, ``target``, ``tau``, ``TAD (pp)`` per row).
        surrogates: the specs named in the rows' ``target`` column.
        alpha: the demo's L2 strength (for specs that do not set their own).
        explanation: the :class:`~tangentlens.explanation.Explanation` of the network's class by the
            most faithful surrogate, on every test digit (``len``, ``k``, ``disagreements``, points with
            ``coverage_pos`` / ``coverage_neg``).
        gallery: the test digits shown in the gallery.
    """
    specs = {s.name: s for s in surrogates}
    best = max(rows, key=lambda r: r["tau"])
    k, n_test = explanation.k, len(explanation)
    tau = float(best["tau"])
    words = specs[best["target"]].in_words(best["kernel"], alpha)
    tad = float(best["TAD (pp)"])
    text = (
        f"{words[0].upper()}{words[1:]} tracks the network most closely: Kendall τ = {tau:.2f} means "
        f"that for a random pair of test digits the network and this surrogate rank their confidence "
        f"in the true class the same way {50 * (1 + tau):.1f}% of the time ((1 + τ)/2, ties aside). "
    )
    if tad == 0:
        text += "It is exactly as accurate as the network."
    else:
        text += (f"It is {abs(tad):.1f} percentage points {'more' if tad > 0 else 'less'} accurate "
                 "than the network.")
    labelled = [r for r in rows if specs[r["target"]].target == "labels" and r["tau"] is not None]
    if labelled and specs[best["target"]].target != "labels":
        lb = max(labelled, key=lambda r: r["tau"])
        text += (
            f" Among surrogates fitted only on the true labels (the method's protocol) the most faithful "
            f"is the {lb['kernel']} kGLM ({lb['target']}), τ = {lb['tau']:.2f} "
            f"({50 * (1 + lb['tau']):.1f}% of pairs)."
        )
    worst = min(rows, key=lambda r: r["tau"])
    text += f" The least faithful is {worst['kernel']} / {worst['target']} (τ = {worst['tau']:.2f})."
    cov = [p.coverage_pos for p in explanation if p.coverage_pos is not None]
    covn = [p.coverage_neg for p in explanation if p.coverage_neg is not None]
    if cov:
        text += (
            f" Explaining the network's own predicted class with it, the top {k} proponents carry a "
            f"median {100 * float(np.median(cov)):.0f}% of the positive contributions"
        )
        if covn:
            text += f" and the top {k} opponents {100 * float(np.median(covn)):.0f}% of the negative ones"
        text += (
            "; the rest is spread over the other training digits, so the gallery shows the largest "
            "pieces of each decision, not all of it."
        )
    disagree = set(explanation.disagreements)
    text += f" Network and surrogate predict different classes on {len(disagree)} of {n_test} test digits"
    in_gallery = [i for i in gallery if i in disagree]
    if in_gallery:
        text += (f"; the gallery shows {len(in_gallery)} of them (test digit"
                 f"{'s' if len(in_gallery) > 1 else ''} {', '.join(map(str, in_gallery))}, marked ✗).")
    else:
        text += "."
    return text
