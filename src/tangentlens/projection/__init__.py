"""Seeded random projections (sketches) of per-example gradients, and tools to measure their fidelity.

:class:`Projection` is the public object (:mod:`.core`); it dispatches to one backend per kind
(:mod:`.dense`, :mod:`.sjlt`, :mod:`.srht`, :mod:`.kronecker`, :mod:`.khatri_rao`), all built from the
counter-based hashing of :mod:`.hashing`. :mod:`.fidelity` compares projected kernels with exact ones.
"""

from .base import LayerFactors
from .core import FLAT_KINDS, KINDS, SCALES, Projection
from .fidelity import FidelityReport, cosine_gram, fidelity, fidelity_curve, loglog_slope, plot_fidelity

__all__ = [
    "Projection",
    "LayerFactors",
    "KINDS",
    "FLAT_KINDS",
    "SCALES",
    "cosine_gram",
    "FidelityReport",
    "fidelity",
    "fidelity_curve",
    "loglog_slope",
    "plot_fidelity",
]
