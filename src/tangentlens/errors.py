"""Typed exceptions. Every message says what to change."""

from __future__ import annotations


class TangentLensError(Exception):
    """Base class of every error raised by tangentlens."""


class InputError(TangentLensError, ValueError):
    """Inputs, labels or kernels have the wrong shape, length, dtype or content (e.g. NaN)."""


class ModelCallError(InputError):
    """The user's model raised an exception when tangentlens called it on a block of the inputs.

    The message names the block's shapes and dtypes, the model and what to change; the model's own
    exception is chained as ``__cause__``.
    """


class DeviceError(InputError):
    """The requested compute device is unavailable or unusable (CUDA/MPS missing, ``meta``, bad string)."""


class MemoryBudgetError(InputError, MemoryError):
    """An allocation the call would make does not fit in the memory available; nothing was allocated."""


class ModelOutputError(TangentLensError, ValueError):
    """The model's output is not a 2-D tensor of logits (batch x classes)."""


class UnknownKindError(TangentLensError, ValueError):
    """An unknown kernel kind, projection kind, solver or option was requested."""


class ParameterSelectionError(TangentLensError, ValueError):
    """Parameters or modules selected by the caller do not exist in the model, or none are trainable."""


class NonFiniteError(TangentLensError, FloatingPointError):
    """A gradient, activation or kernel contains NaN or infinity."""


class StoreMismatchError(TangentLensError, ValueError):
    """A stored artifact does not match the configuration or data it is combined with."""


class WorkerLostError(TangentLensError, RuntimeError):
    """Dask workers kept dying while a distributed run needed them; what was written is kept (run again)."""


class UnsupportedLayerWarning(UserWarning):
    """A layer has no fast exact rule and falls back to per-example torch.func Jacobians."""


class UnsupportedLayerError(TangentLensError, ValueError):
    """A layer's per-example gradients cannot be computed as it is called; the message says what to change."""


class MemoryBudgetWarning(UserWarning):
    """A call splits its blocks (or keeps layers factored) to stay within its memory budget; said once."""


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside the library (the user's line), however
    deep in the library the warning is raised."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
