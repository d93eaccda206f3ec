"""The records :func:`tangentlens.explain.explain` and :func:`~tangentlens.explain.most_similar` return.

For a kernel surrogate with per-class weights ``W`` (C x N) the logit of class ``c`` at a test point
``x`` is ``z_c(x) = b_c + Σ_i A_{c,i}(x)`` with ``A_{c,i}(x) = W_{c,i} κ(x, x_i)``. The records hold the
top-k proponents (largest positive ``A_{c,i}``) and opponents (most negative) of a class, and define
its *coverage*: the share of the logit's positive (negative) mass that the listed points carry
(:class:`ClassExplanation`).

Every record is a small frozen dataclass whose ``to_dict()`` returns plain Python (ints, floats, str,
lists, None), each figure under one name, so consumers need neither numpy nor pandas.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import InputError

__all__ = ["Attribution", "ClassExplanation", "Explanation", "PointExplanation", "SimilarExamples"]


@dataclass(frozen=True)
class Attribution:
    """One training point's role in a prediction.

    Attributes:
        index: Position of the training point (row/column of the train x train kernel).
        contribution: ``A_{c,i}(x) = W[c, i] * K[x, i]`` (:func:`most_similar`: the kernel value).
        kernel: ``K[x, i]``, the kernel value between the test and the training point.
        label: The training point's label when ``train_labels`` was given, else None.
    """

    index: int
    contribution: float
    kernel: float
    label: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return {
            "index": self.index,
            "contribution": self.contribution,
            "kernel": self.kernel,
            "label": self.label,
        }


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0.0 else float(num / den)


@dataclass(frozen=True)
class ClassExplanation:
    """Top proponents and opponents of one class at one test point, and how much they carry.

    With ``a_i = A_{c,i}(x)`` the N contributions to class ``c``, ``S+ = Σ_{a_i > 0} a_i`` and
    ``S- = Σ_{a_i < 0} a_i`` (so ``S+ + S- = z_c(x) − b_c``), and ``P+`` / ``P-`` the top-k
    proponents / opponents:

    * ``coverage_pos = Σ_{i∈P+} a_i / S+`` -- the share of the positive mass that the top-k
      proponents carry, in [0, 1] (``None`` when no contribution is positive);
    * ``coverage_neg = Σ_{i∈P-} a_i / S-`` -- the same for the opponents and the negative mass,
      in [0, 1] (``None`` when none is negative);
    * ``coverage_logit = (Σ_{i∈P+} a_i + Σ_{i∈P-} a_i) / (z_c(x) − b_c)`` -- the share of the
      logit (minus intercept) that the shown proponents and opponents sum to (``None`` when
      ``z_c = b_c``). It is not confined to [0, 1]: when large positive and negative masses cancel
      (a logit of +45 − 34 = 11) a few extreme contributions can sum to more than the logit, or
      to the opposite sign.

    A small ``coverage_pos`` means the explanation is spread over many training points and the
    top-k list shows only a sliver of it.

    Attributes:
        class_index: Position of the class (column of the logits).
        class_label: ``surrogate.classes_[class_index]``.
        logit: The surrogate's logit ``z_c(x)``.
        intercept: ``b_c``; ``logit - intercept`` is the sum of all N contributions.
        proponents: Up to k training points with the largest positive contributions, largest
            first (fewer if fewer are positive).
        opponents: Up to k training points with the most negative contributions, most negative
            first.
        positive_total: ``S+``, the sum of all positive contributions (>= 0).
        negative_total: ``S-``, the sum of all negative contributions (<= 0).
    """

    class_index: int
    class_label: Any
    logit: float
    intercept: float
    proponents: tuple[Attribution, ...]
    opponents: tuple[Attribution, ...]
    positive_total: float = 0.0
    negative_total: float = 0.0

    @property
    def coverage_pos(self) -> float | None:
        """``Σ top-k proponents / S+`` in [0, 1]; ``None`` when ``S+ = 0``."""
        return _ratio(sum(a.contribution for a in self.proponents), self.positive_total)

    @property
    def coverage_neg(self) -> float | None:
        """``Σ top-k opponents / S-`` in [0, 1]; ``None`` when ``S- = 0``."""
        return _ratio(sum(a.contribution for a in self.opponents), self.negative_total)

    @property
    def coverage_logit(self) -> float | None:
        """``(Σ top-k proponents + Σ top-k opponents) / (logit − intercept)``; ``None`` if 0/0."""
        shown = sum(a.contribution for a in self.proponents + self.opponents)
        return _ratio(shown, self.positive_total + self.negative_total)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (coverages are ``None`` where undefined)."""
        return {
            "class_index": self.class_index,
            "class_label": self.class_label,
            "logit": self.logit,
            "intercept": self.intercept,
            "positive_total": self.positive_total,
            "negative_total": self.negative_total,
            "coverage_pos": self.coverage_pos,
            "coverage_neg": self.coverage_neg,
            "coverage_logit": self.coverage_logit,
            "proponents": [a.to_dict() for a in self.proponents],
            "opponents": [a.to_dict() for a in self.opponents],
        }


@dataclass(frozen=True)
class PointExplanation:
    """Explanation of one test point.

    Attributes:
        test_index: Row of the test x train block.
        predicted_index: Position of the surrogate's predicted class (argmax of its logits).
        predicted_label: ``classes_[predicted_index]``.
        classes: One :class:`ClassExplanation` per class selected with ``classes=``.
        target_index: The class whose logit is explained (see ``target`` of :func:`explain`).
        target_label: ``classes_[target_index]``.
        target_source: ``"network"``, ``"surrogate"`` or ``"given"`` (an explicit class array).
        network_index: Position of the network's predicted class (argmax of ``network_logits``;
            ``z > 0`` for a single logit), ``None`` when no network logits were given.
        network_label: ``classes_[network_index]`` or ``None``.
        agrees: ``network_index == predicted_index``; ``None`` without network logits. Where it
            is ``False`` the surrogate's logit of the network's class is not the surrogate's own
            decision, and the explanation describes a model that decides differently.
        target: The :class:`ClassExplanation` of ``target_index`` (always computed, whether or not
            ``classes`` selects it); its coverages are this point's coverage figures.
    """

    test_index: int
    predicted_index: int
    predicted_label: Any
    classes: tuple[ClassExplanation, ...]
    target_index: int
    target_label: Any
    target_source: str
    network_index: int | None
    network_label: Any
    agrees: bool | None
    target: ClassExplanation

    @property
    def coverage_pos(self) -> float | None:
        """``target.coverage_pos``: share of the positive mass carried by the top-k proponents."""
        return self.target.coverage_pos

    @property
    def coverage_neg(self) -> float | None:
        """``target.coverage_neg``: share of the negative mass carried by the top-k opponents."""
        return self.target.coverage_neg

    @property
    def coverage_logit(self) -> float | None:
        """``target.coverage_logit``: share of ``z − b`` that the shown points sum to."""
        return self.target.coverage_logit

    def for_class(self, class_index: int) -> ClassExplanation:
        """The explanation of class position ``class_index`` (the target's is always there)."""
        for c in self.classes:
            if c.class_index == class_index:
                return c
        if class_index == self.target_index:
            return self.target
        raise InputError(
            f"class {class_index} was not explained for test point {self.test_index}."
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return {
            "test_index": self.test_index,
            "predicted_index": self.predicted_index,
            "predicted_label": self.predicted_label,
            "target_index": self.target_index,
            "target_label": self.target_label,
            "target_source": self.target_source,
            "network_index": self.network_index,
            "network_label": self.network_label,
            "agrees": self.agrees,
            "target": self.target.to_dict(),
            "classes": [c.to_dict() for c in self.classes],
        }


@dataclass(frozen=True)
class Explanation:
    """Explanations of a set of test points (one :class:`PointExplanation` each, in row order)."""

    points: tuple[PointExplanation, ...]
    k: int

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> PointExplanation:
        return self.points[i]

    def __iter__(self) -> Iterator[PointExplanation]:
        return iter(self.points)

    @property
    def disagreements(self) -> list[int]:
        """Test indices where the network and the surrogate predict different classes."""
        return [p.test_index for p in self.points if p.agrees is False]

    def to_dict(self) -> dict[str, Any]:
        """``{"k": int, "points": [...]}``, plain python."""
        return {"k": self.k, "points": [p.to_dict() for p in self.points]}


@dataclass(frozen=True)
class SimilarExamples:
    """The k training points with the largest kernel values to one test point.

    Attributes:
        test_index: Row of the test x train block.
        neighbors: :class:`Attribution` objects, most similar first; ``contribution`` and
            ``kernel`` both hold the kernel value.
    """

    test_index: int
    neighbors: tuple[Attribution, ...]

    @property
    def indices(self) -> list[int]:
        """Training indices, most similar first."""
        return [a.index for a in self.neighbors]

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict."""
        return {"test_index": self.test_index, "neighbors": [a.to_dict() for a in self.neighbors]}
