"""``ModelRecipe`` and ``DataRecipe``: how another process (a Dask worker) rebuilds the model — a factory plus
a checkpoint — and, optionally, the data.

A distributed featurization (:func:`tangentlens.featurize` with ``scheduler=``) needs the model on every
worker. Two ways to get it there:

* a :class:`ModelRecipe` — a picklable zero-argument factory (a module-level function, or a
  ``functools.partial`` of one) and optionally the path of a state dict saved with
  ``torch.save(model.state_dict(), path)``. Each worker imports the factory, calls it and loads the weights
  (read with ``weights_only=True``: no pickled objects). Only the recipe travels; the factory's module must be
  importable on the workers and the checkpoint readable at the same path.
* the ``nn.Module`` itself, pickled to every worker (its class must be importable there too). Simple, but
  the whole module crosses the network once per worker.

Either way each worker hashes the weights it ends up with and refuses to write when they differ from the
client's (:class:`~tangentlens.StoreMismatchError`): a factory that initializes randomly without a seed or a
checkpoint gives every worker another network.

The data travel from the client, a chunk per task, unless they are a :class:`DataRecipe`: a picklable
factory that every worker calls once per run to build the same data set (e.g. a Dataset over files on a
shared file system), reading only the examples of its own chunks. The client builds it too, to count and
fingerprint the examples (one pass over them, no transfer).
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..errors import InputError
from ..inputs import slice_batch

__all__ = ["ModelRecipe", "DataRecipe", "slice_data"]

_STATE_KEYS = ("state_dict", "model_state_dict", "model")
_BUILD_LOCK = threading.Lock()  # one factory call at a time per process (worker threads build concurrently)


@dataclass(frozen=True)
class ModelRecipe:
    """A model built by ``factory()`` with the weights of ``checkpoint`` (if given) loaded strictly.

    Pass it wherever :func:`tangentlens.featurize` takes a model: the client builds it once (for the
    configuration, the fingerprint and the plan), and with ``scheduler=`` every worker builds its own copy.

    Attributes:
        factory: a picklable callable with no arguments returning the ``nn.Module`` (a module-level
            function or a ``functools.partial`` of one; lambdas and local functions cannot be sent to
            worker processes).
        checkpoint: path of a state dict (``torch.save(model.state_dict(), path)``), or of a dict holding
            one under ``checkpoint_key`` (or under ``"state_dict"`` / ``"model_state_dict"`` / ``"model"``).
            Stored as an absolute path; every worker must read it at that path (a shared file system).
        checkpoint_key: the key of the state dict inside the checkpoint's dict.

    Example::

        recipe = tl.ModelRecipe(functools.partial(make_cnn, width=32), checkpoint="ckpt/cnn.pt")
        tl.featurize(recipe, x_train, "store/train", kind="pntk", projection=tl.Projection(512),
                     scheduler="tcp://scheduler:8786")
    """

    factory: Callable[[], nn.Module]
    checkpoint: str | os.PathLike[str] | None = None
    checkpoint_key: str | None = None

    def __post_init__(self) -> None:
        if not callable(self.factory):
            raise InputError(f"ModelRecipe's factory must be callable (returning an nn.Module); got "
                             f"{self.factory!r}.")
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, (str, os.PathLike)):
                raise InputError(f"ModelRecipe's checkpoint must be a path; got {self.checkpoint!r}.")
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).resolve()))

    def build(self) -> nn.Module:
        """Call the factory and load the checkpoint's weights (strictly).

        Factory calls are serialized within a process: worker threads that build at once would otherwise
        interleave a factory's ``torch.manual_seed`` and initialization and get different weights.

        Returns:
            The model, in the mode the factory left it.

        Raises:
            InputError: the factory does not return an ``nn.Module``; the checkpoint is missing, holds
                pickled objects, or does not fit the model (the message says what to change).
        """
        with _BUILD_LOCK:  # a factory that seeds torch's global RNG must not interleave with another's
            model = self.factory()
        if not isinstance(model, nn.Module):
            raise InputError(f"ModelRecipe's factory {self.factory!r} returned a {type(model).__name__}, "
                             "not a torch.nn.Module; return the network.")
        if self.checkpoint is not None:
            try:
                model.load_state_dict(self._state(), strict=True)
            except RuntimeError as exc:
                raise InputError(f"The checkpoint {self.checkpoint!r} does not fit the factory's model: "
                                 f"{' '.join(str(exc).split())} Check the factory or checkpoint_key."
                                 ) from None
        return model

    def _state(self) -> Mapping[str, Tensor]:
        path = str(self.checkpoint)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InputError(f"The checkpoint {path!r} holds pickled Python objects, which are not loaded "
                             "(loading them runs code from the file); save the weights with "
                             "torch.save(model.state_dict(), path).") from None
        except (RuntimeError, OSError, EOFError) as exc:
            raise InputError(f"The checkpoint {path!r} cannot be read by torch.load ({exc}); every worker "
                             "must read it at this path (a shared file system).") from None

        def is_state(d: Any) -> bool:
            return isinstance(d, Mapping) and bool(d) and all(
                isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())

        if self.checkpoint_key is not None:
            if not isinstance(obj, Mapping) or not is_state(obj.get(self.checkpoint_key)):
                keys = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
                raise InputError(f"The checkpoint {path!r} has no state dict under {self.checkpoint_key!r} "
                                 f"(its keys: {keys}); pass one of them as checkpoint_key.")
            return obj[self.checkpoint_key]
        if is_state(obj):
            return obj
        inner = [k for k in _STATE_KEYS if isinstance(obj, Mapping) and is_state(obj.get(k))]
        if inner:
            return obj[inner[0]]
        raise InputError(f"The checkpoint {path!r} holds a {type(obj).__name__}, not a state dict of "
                         "tensors; save it with torch.save(model.state_dict(), path) or pass checkpoint_key.")


@dataclass(frozen=True)
class DataRecipe:
    """A data set built by ``factory()`` in every process that needs it, instead of sent from the client.

    Pass it wherever :func:`tangentlens.featurize` takes data. Without ``scheduler`` it is simply built and
    featurized. With ``scheduler`` the client builds it to count and fingerprint the examples, and each
    worker builds its own copy once per run and reads only its chunks' examples: the inputs never cross the
    network. The store is the one the built data give in one process, bit for bit.

    Attributes:
        factory: a picklable callable with no arguments (a module-level function or a ``functools.partial``
            of one) returning the data in the same order everywhere: a tensor, a dict of tensors, an
            ``(inputs, labels)`` pair or a map-style ``torch.utils.data.Dataset`` (not a DataLoader: chunks
            are read by index).

    Example::

        data = tl.DataRecipe(functools.partial(ImageFolderDataset, "/shared/train"))
        tl.featurize(recipe, data, "/shared/train.zarr", kind="pntk", projection=P,
                     scheduler="tcp://scheduler:8786")
    """

    factory: Callable[[], Any]

    def __post_init__(self) -> None:
        if not callable(self.factory):
            raise InputError(f"DataRecipe's factory must be callable (returning the data); got "
                             f"{self.factory!r}.")

    def build(self) -> Any:
        """Call the factory.

        Raises:
            InputError: it returned a DataLoader or an iterable-style dataset (chunks are read by index).
        """
        data = self.factory()
        if isinstance(data, (DataLoader, IterableDataset)):
            raise InputError(f"DataRecipe's factory {self.factory!r} returned a {type(data).__name__}; "
                             "return a map-style Dataset, a tensor, a dict of tensors or an (inputs, labels) "
                             "pair: workers read their chunks by index.")
        return data


def slice_data(data: Any, start: int, stop: int) -> Any:
    """Examples ``[start, stop)`` of a data set in any form a :class:`DataRecipe` may return, without copying
    a tensor (a view) or reading other examples (a ``Subset`` of a Dataset)."""
    if isinstance(data, Dataset) and not isinstance(data, Tensor):
        return Subset(data, range(start, stop))
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return (slice_batch(data[0], start, stop), data[1][start:stop])
    return slice_batch(data, start, stop)

