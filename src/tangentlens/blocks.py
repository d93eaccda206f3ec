"""Kernel blocks as a value: the unnormalized train × train and test × train blocks of one computation, their
diagonals and configuration, and the one implementation of block-aware cosine normalization.

Normalization needs only the diagonals, so every normalized or scaled form derives from the unnormalized
blocks without recomputing a gradient: trNTK is :meth:`KernelBlocks.normalized` of trNTK⁰'s blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .config import KernelConfig
from .errors import InputError, NonFiniteError

FORMS = ("raw", "normalized", "scaled")


def cosine_normalize(K: Tensor, d1: Tensor, d2: Tensor, *, unit_diagonal: bool = False) -> Tensor:
    """Block-aware cosine normalization, in place: K[i, j] / sqrt(d1[i] d2[j]).

    For a full eNTK block (N1, N2, C, C), ``d1`` (N1, C) and ``d2`` (N2, C) are per-class diagonals and entry
    (i, j, c, c') becomes the cosine between g_c(x_i) and g_c'(x_j). Zero diagonals leave zeros.

    Args:
        K: the block, modified in place.
        d1, d2: the squared norms of the rows' and the columns' features (the kernel's diagonals).
        unit_diagonal: ``K`` is a symmetric block (rows = columns): set its diagonal to exactly 1 where
            ``d1 > 0`` (rounding would leave 1 ± 1e-7).

    Returns:
        ``K``. Cost O(K.numel()).
    """
    r1 = _rsqrt(d1)
    r2 = r1 if d2 is d1 else _rsqrt(d2)
    if K.dim() == 2:
        K.mul_(r1[:, None]).mul_(r2[None, :])
    else:
        K.mul_(r1[:, None, :, None]).mul_(r2[None, :, None, :])
    if unit_diagonal:
        # K[i, i] (or K[i, i, c, c], shaped (N, C)) as a view
        diag = K.diagonal() if K.dim() == 2 else K.diagonal(0, 0, 1).diagonal(0, 0, 1)
        diag.copy_(torch.where(d1 > 0, torch.ones_like(diag), diag))
    return K


def _rsqrt(d: Tensor) -> Tensor:
    """1/√d where d > 0, else 0."""
    return torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))


@dataclass(frozen=True)
class KernelBlocks:
    """What a kernel computation produces (:func:`tangentlens.compute`).

    Attributes:
        train: K(train, train), (N, N) — (N, N, C, C) for ``"entk"``.
        test: K(test, train), (T, N) (with the class axes for ``"entk"``), or ``None`` without test points.
        train_diag: k(x_i, x_i) of the training points, (N,) — (N, C) for ``"entk"``: the squared norms of
            their features.
        test_diag: the same for the test points, or ``None``.
        config: the :class:`~tangentlens.KernelConfig` that produced them.
        form: ``"raw"`` (unnormalized inner products, as computed), ``"normalized"`` (cosine, exact unit
            diagonal) or ``"scaled"`` (both blocks divided by the standard deviation of the raw train ×
            train block, the reference's scaling of trNTK⁰).

    The diagonals are always those of the raw blocks, so every form can be derived from the raw one.
    """

    train: Tensor
    test: Tensor | None
    train_diag: Tensor
    test_diag: Tensor | None
    config: KernelConfig
    form: str = "raw"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise InputError(f"form must be one of {FORMS}; got {self.form!r}.")
        if (self.test is None) != (self.test_diag is None):
            raise InputError("test and test_diag go together: pass both or neither.")

    def _raw(self, what: str) -> None:
        if self.form != "raw":
            raise InputError(
                f"{what}() derives from the raw blocks, but these are {self.form!r}; call it on the blocks "
                "tl.compute returned."
            )

    def normalized(self) -> KernelBlocks:
        """Cosine-normalized blocks: K(x, x') / sqrt(k(x, x) k(x', x')) (per class pair for ``"entk"``),
        the train × train block with an exact unit diagonal. Cost O(N² + T·N); no gradient is recomputed.

        Raises:
            InputError: the blocks are not raw.
        """
        self._raw("normalized")
        train = cosine_normalize(self.train.clone(), self.train_diag, self.train_diag, unit_diagonal=True)
        test = None
        if self.test is not None:
            assert self.test_diag is not None
            test = cosine_normalize(self.test.clone(), self.test_diag, self.train_diag)
        return replace(self, train=train, test=test, form="normalized")

    def scaled(self) -> KernelBlocks:
        """Both blocks divided by the standard deviation of the raw train × train block (the reference's
        scaling of trNTK⁰, which keeps a surrogate's regularization comparable across models).

        Raises:
            InputError: the blocks are not raw.
            NonFiniteError: the train × train block has zero spread.
        """
        self._raw("scaled")
        sd = float(self.train.double().std())
        if not sd > 0:
            raise NonFiniteError("The train x train block has zero spread; it cannot be scaled.")
        test = None if self.test is None else self.test / sd
        return replace(self, train=self.train / sd, test=test, form="scaled")

    def kernels(self) -> tuple[Tensor, Tensor | None]:
        """``(K_train_train, K_test_train)`` as the config asks for them: normalized when the config's
        ``normalize`` (or its kind's default) says so, else raw — what :func:`tangentlens.train_test_kernels`
        returns."""
        blocks = self.normalized() if self.form == "raw" and self.config.normalized else self
        return blocks.train, blocks.test


__all__ = ["KernelBlocks", "cosine_normalize"]
