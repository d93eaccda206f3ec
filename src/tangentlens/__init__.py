"""tangentlens: explain neural networks with empirical neural tangent kernel surrogates.

Functional core: :func:`kernel`, :func:`features`, :func:`iter_features`.
"""

from .api import available_kinds, features, iter_features, kernel, rademacher_probes
from .errors import (
    InputError,
    ModelOutputError,
    NonFiniteError,
    ParameterSelectionError,
    StoreMismatchError,
    TangentLensError,
    UnknownKindError,
    UnsupportedLayerWarning,
)

__version__ = "0.1.0"

__all__ = [
    "kernel",
    "features",
    "iter_features",
    "available_kinds",
    "rademacher_probes",
    "TangentLensError",
    "InputError",
    "ModelOutputError",
    "UnknownKindError",
    "ParameterSelectionError",
    "NonFiniteError",
    "StoreMismatchError",
    "UnsupportedLayerWarning",
    "__version__",
]
