"""What the demo computes, as data: the kernels (:class:`KernelSpec`) and the surrogates
(:class:`SurrogateSpec`). Add a row to :data:`KERNELS` or :data:`SURROGATES` to add one to the demo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..api import train_test_kernels
from ..arrays import to_numpy
from ..errors import TangentLensError
from ..faithfulness import softmax64
from ..projection import Projection
from ..surrogate import KernelSurrogate

__all__ = ["KERNELS", "SURROGATES", "KernelSpec", "SurrogateSpec"]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel of the demo.

    Attributes:
        name: the label in the table (e.g. ``"trNTK"``).
        kind: the engine's kind (``"trntk"``, ``"trntk0"``, ``"pntk"``, ``"em"``, ``"ck"``, ...).
        normalize: passed to :func:`tangentlens.api.kernel`; ``None`` keeps the kind's default.
        scale: ``"train_std"`` divides both blocks by the standard deviation of the train x train block (the
            method's scaling of trNTK⁰); ``None`` leaves the kernel as it is.
        projection: for projected kernels, a factory ``(seed) -> tangentlens.projection.Projection``.
        description: one line for the report.
    """

    name: str
    kind: str
    normalize: bool | None = None
    scale: str | None = None
    projection: Callable[[int], Projection] | None = None
    description: str = ""

    def blocks(
        self, model: nn.Module, x_train: Tensor, x_test: Tensor, *, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (N, N) train x train and (T, N) test x train blocks of this kernel, float64.

        Computed in one pass by :func:`tangentlens.api.train_test_kernels`; with ``scale="train_std"``
        both are divided by ``std(K_train_train)``. Cost: the engine's (for the trace kernels about C
        batched backward passes over the N + T inputs).

        Raises:
            TangentLensError: the train x train block has zero spread where it is to be scaled.
        """
        options: dict[str, Any] = {"kind": self.kind}
        if self.normalize is not None:
            options["normalize"] = self.normalize
        if self.projection is not None:
            options["projection"] = self.projection(seed)
        k_tr, k_te = (to_numpy(k, np.float64) for k in train_test_kernels(model, x_train, x_test, **options))
        if self.scale == "train_std":
            s = float(k_tr.std())
            if not s > 0.0:
                raise TangentLensError(f"{self.name}: train x train block has zero spread; cannot scale.")
            k_tr, k_te = k_tr / s, k_te / s
        return k_tr, k_te


@dataclass(frozen=True)
class SurrogateSpec:
    """One surrogate fitted on every kernel it names.

    Attributes:
        name: the label in the table's ``target`` column.
        target: ``"labels"`` (true training labels) or ``"soft"`` (the network's softmax probabilities on the
            training points: a distilled surrogate).
        solver: the :class:`~tangentlens.surrogate.KernelSurrogate` solver (``"lbfgs"`` or ``"sgd"``).
        kernels: names of the kernels to fit on; ``None`` means every kernel.
        temperature: for ``"soft"``: the targets are ``softmax(logits / temperature)``; above 1 it
            un-saturates the probabilities of a confident network, so the surrogate sees its ranking.
        options: further keyword arguments of ``KernelSurrogate`` (they override the demo's ``alpha``).
    """

    name: str
    target: str
    solver: str
    kernels: tuple[str, ...] | None = None
    temperature: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def fits_on(self, kernel: str) -> bool:
        """Whether this surrogate is fitted on the kernel named ``kernel``."""
        return self.kernels is None or kernel in self.kernels

    def fit(
        self,
        k_train: np.ndarray,
        y_train: np.ndarray,
        network_train_logits: np.ndarray,
        *,
        alpha: float,
        seed: int,
    ) -> KernelSurrogate:
        """Fit this surrogate on the (N, N) train x train block.

        Args:
            k_train: the train x train block.
            y_train: (N,) true training labels (``target="labels"``).
            network_train_logits: (N, C) network logits on the training points (``target="soft"``:
                the targets are ``softmax(logits / temperature)`` in float64).
            alpha: the L2 strength, unless ``options`` sets its own.
            seed: the SGD solver's seed.

        Returns:
            The fitted :class:`~tangentlens.surrogate.KernelSurrogate`. Cost: the solver's (L-BFGS:
            tens of (N x N) @ (N x C) products).
        """
        model = KernelSurrogate(**{"solver": self.solver, "alpha": alpha, "random_state": seed,
                                   **self.options})
        if self.target == "labels":
            target = y_train
        elif self.temperature == 1.0:
            target = softmax64(network_train_logits)
        else:
            target = softmax64(network_train_logits / self.temperature)
        return model.fit(k_train, target)

    def describe(self, alpha: float) -> str:
        """One line for the report: solver, penalty, target and kernels."""
        target = "true labels" if self.target == "labels" else f"softmax(logits / {self.temperature:g})"
        kernels = ", ".join(self.kernels) if self.kernels else "all kernels"
        return (f"KernelSurrogate(solver={self.solver!r}, alpha={self.options.get('alpha', alpha):g}) "
                f"on {target}; {kernels}")

    def in_words(self, kernel: str, alpha: float) -> str:
        """e.g. "the trNTK kGLM distilled from the network's softmax at temperature 2 (L2 alpha = 1e-06)"."""
        a = self.options.get("alpha", alpha)
        if self.target == "labels":
            how = "fitted on the true labels"
        elif self.temperature == 1.0:
            how = "distilled from the network's softmax probabilities"
        else:
            how = f"distilled from the network's softmax at temperature {self.temperature:g}"
        solver = "the reference's SGD solver, " if self.solver == "sgd" else ""
        return f"the {kernel} kGLM {how} ({solver}L2 alpha = {a:g})"


def _projection_factory(dim: int) -> Callable[[int], Projection]:
    """A factory ``seed -> tangentlens.projection.Projection(dim, seed=seed)`` (the default kind,
    ``"khatri_rao"``)."""

    def make(seed: int) -> Projection:
        return Projection(dim, seed=seed)

    return make


#: The kernels of the demo, in table order. trNTK first: the scatter and the gallery use it.
KERNELS: tuple[KernelSpec, ...] = (
    KernelSpec("trNTK", "trntk",
               description="trace NTK: cosine of the concatenated per-class logit gradients (exact)"),
    KernelSpec("trNTK0", "trntk0", normalize=False, scale="train_std",
               description="unnormalized trace NTK, divided by the std of its train x train block"),
    KernelSpec("pNTK", "pntk", normalize=True,
               description="pseudo-NTK: cosine of the gradients of the summed logits"),
    KernelSpec("Em", "em", description="embedding kernel: cosine of the concatenated layer outputs"),
    KernelSpec("CK", "ck", description="conjugate kernel: cosine of the penultimate features"),
    KernelSpec("proj-trNTK", "trntk", projection=_projection_factory(512),
               description="trNTK of gradients projected to K = 512 (Khatri-Rao, seeded)"),
    KernelSpec("proj-pNTK", "pntk", normalize=True, projection=_projection_factory(512),
               description="pNTK of gradients projected to K = 512 (Khatri-Rao, seeded)"),
)

#: The surrogates of the demo.
SURROGATES: tuple[SurrogateSpec, ...] = (
    SurrogateSpec("labels", "labels", "lbfgs"),
    SurrogateSpec("distilled", "soft", "lbfgs"),
    SurrogateSpec("labels (SGD ref)", "labels", "sgd", kernels=("trNTK",)),
    SurrogateSpec("distilled T=2 a=1e-6", "soft", "lbfgs", kernels=("trNTK",), temperature=2.0,
                  options={"alpha": 1e-6}),
)
