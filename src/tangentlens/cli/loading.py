"""Building what a config names: the model (factory + checkpoint), the data (factory), the network's logits.

Checkpoints are read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects, unless the config sets ``weights_only = false`` for a file it trusts.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..arrays import to_numpy
from ..errors import InputError, NonFiniteError
from ..inputs import Batch, batch_size_of, slice_batch
from ..logits import as_logits
from ..network import call_model, eval_mode, extract_logits
from .config import ConfigError, FactorySpec, ModelSection, RunConfig

__all__ = ["UserData", "build_model", "load_data", "load_factory", "network_logits", "on_path"]

_STATE_KEYS = ("state_dict", "model_state_dict", "model")


@contextlib.contextmanager
def on_path(folders: Sequence[Path]) -> Iterator[None]:
    """Put ``folders`` first on ``sys.path`` for the duration (to import the user's factories)."""
    added = [str(f) for f in folders if str(f) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(f)


def load_factory(spec: FactorySpec, cfg: RunConfig) -> Callable[..., Any]:
    """Import ``package.module`` and return its ``function`` (``python_path`` on ``sys.path`` meanwhile).

    Raises:
        ConfigError: the module cannot be imported, or has no such callable.
    """
    with on_path(cfg.python_path):
        try:
            module = importlib.import_module(spec.module)
        except ImportError as exc:
            raise ConfigError(
                f"{cfg.path}: {spec.where} {spec.text!r}: cannot import {spec.module!r} ({exc}). Put the "
                f"package's folder in python_path (searched: {[str(p) for p in cfg.python_path]}) or install "
                "it in this environment.") from exc
    fn = getattr(module, spec.function, None)
    if fn is None or not callable(fn):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"{cfg.path}: {spec.where} {spec.text!r}: module {spec.module!r} has no callable "
                          f"{spec.function!r}; its callables: {public[:20]}.")
    return fn


def _call(fn: Callable[..., Any], spec: FactorySpec, cfg: RunConfig) -> Any:
    try:
        inspect.signature(fn).bind(**spec.options)
    except TypeError as exc:
        raise ConfigError(f"{cfg.path}: {spec.where.replace('factory', 'options')} do not fit "
                          f"{spec.text}{inspect.signature(fn)}: {exc}; change the options table.") from None
    except ValueError:  # no signature (a builtin): let the call say
        pass
    return fn(**spec.options)


# ----------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------
def _state_dict(obj: Any, section: ModelSection, where: str) -> Mapping[str, Tensor]:
    def is_state(d: Any) -> bool:
        return isinstance(d, Mapping) and bool(d) and all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())

    if section.checkpoint_key is not None:
        if not isinstance(obj, Mapping) or section.checkpoint_key not in obj:
            keys = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ConfigError(f"{where} checkpoint_key: {section.checkpoint_key!r} is not in the checkpoint "
                              f"(its keys: {keys}); write one of them, or remove checkpoint_key.")
        obj = obj[section.checkpoint_key]
    if isinstance(obj, nn.Module):  # only with weights_only = false
        return obj.state_dict()
    if is_state(obj):
        return obj
    if isinstance(obj, Mapping):
        inner = [k for k in obj if is_state(obj[k])]
        if len(inner) == 1 and inner[0] in _STATE_KEYS and section.checkpoint_key is None:
            return obj[inner[0]]
        if inner:
            raise ConfigError(f"{where} checkpoint: the file holds a dict whose entries {inner} are state "
                              f"dicts; set checkpoint_key = {inner[0]!r} to choose one.")
    raise ConfigError(f"{where} checkpoint: the file holds a {type(obj).__name__}, not a state dict of "
                      "tensors; save it with torch.save(model.state_dict(), path).")


def build_model(cfg: RunConfig) -> nn.Module:
    """Call the model factory, load the checkpoint's state dict into it (strictly), switch to eval mode.

    Raises:
        ConfigError: the factory cannot be imported or called, does not return an ``nn.Module``, the
            checkpoint holds pickled objects (with ``weights_only``) or does not match the model.
    """
    section = cfg.model
    where = f"{cfg.path}: [model]"
    model = _call(load_factory(section.factory, cfg), section.factory, cfg)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where} factory {section.factory.text!r} returned a {type(model).__name__}, not "
                          "a torch.nn.Module; return the network (built, without weights or with them).")
    if section.checkpoint is not None:
        try:
            obj = torch.load(section.checkpoint, map_location="cpu", weights_only=section.weights_only)
        except pickle.UnpicklingError as exc:
            raise ConfigError(
                f"{where} checkpoint {str(section.checkpoint)!r} holds pickled Python objects, which are not "
                "loaded by default (loading them runs code from the file). Save the weights with "
                "torch.save(model.state_dict(), path), or set weights_only = false in [model] if you trust "
                f"the file. ({str(exc).splitlines()[0]})") from None
        except (RuntimeError, OSError, EOFError) as exc:
            raise ConfigError(f"{where} checkpoint {str(section.checkpoint)!r} cannot be read by torch.load "
                              f"({exc}); write the path of a file saved with torch.save.") from None
        state = _state_dict(obj, section, where)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(
                f"{where} checkpoint {str(section.checkpoint)!r} does not fit the factory's model: "
                f"{' '.join(str(exc).split())} Check [model] factory / options (the architecture) or "
                "checkpoint_key.") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# The data.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserData:
    """What the data factory returned, checked.

    Attributes:
        x_train, x_test: inputs: tensors (N, ...) or dicts of tensors (``model(**batch)``).
        y_train, y_test: (N,) / (T,) integer class positions.
        classes: optional class names, by position.
        images_train, images_test: optional arrays shown in the report's gallery instead of the inputs.
        tokens_train, tokens_test: optional token strings per example (the report's text view).
        vocab: optional token strings by id (decodes ``input_ids`` when no tokens are given).
    """

    x_train: Batch
    y_train: Tensor
    x_test: Batch
    y_test: Tensor
    classes: tuple[str, ...] | None = None
    images_train: np.ndarray | None = None
    images_test: np.ndarray | None = None
    tokens_train: list[list[str]] | None = None
    tokens_test: list[list[str]] | None = None
    vocab: tuple[str, ...] | None = None

    @property
    def n_train(self) -> int:
        return batch_size_of(self.x_train)

    @property
    def n_test(self) -> int:
        return batch_size_of(self.x_test)


_DATA_KEYS = ("x_train", "y_train", "x_test", "y_test")
_DATA_OPTIONAL = ("classes", "images_train", "images_test", "tokens_train", "tokens_test", "vocab")


def _inputs(x: Any, name: str, where: str) -> Batch:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if isinstance(x, Mapping):
        x = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in x.items()}
        if not x or not all(isinstance(v, Tensor) for v in x.values()):
            raise ConfigError(f"{where}: {name} is a dict; every value must be a tensor (a batch for "
                              "model(**batch)).")
    elif not isinstance(x, Tensor):
        raise ConfigError(f"{where}: {name} is a {type(x).__name__}; return a tensor (or numpy array) with "
                          "the examples first, or a dict of such tensors.")
    try:
        batch_size_of(x)
    except InputError as exc:
        raise ConfigError(f"{where}: {name}: {exc}") from None
    return x


def _labels(y: Any, n: int, name: str, where: str) -> Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"{where}: {name} must be (N,) integer class positions, one per input ({n}); got "
                          f"shape {tuple(t.shape)} and dtype {t.dtype}.")
    if n and int(t.min()) < 0:
        raise ConfigError(f"{where}: {name} has negative entries; labels are class positions 0..C-1.")
    return t.long()


def load_data(cfg: RunConfig) -> UserData:
    """Call the data factory and check what it returns.

    The factory returns a dict with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally
    ``classes``, ``images_train`` / ``images_test``, ``tokens_train`` / ``tokens_test``, ``vocab``), or
    the tuple ``(x_train, y_train, x_test, y_test)``.

    Raises:
        ConfigError: the factory cannot be imported or called, or returns something else (the message
            says what was expected).
    """
    spec = cfg.data.factory
    where = f"{cfg.path}: [data] factory {spec.text!r}"
    out = _call(load_factory(spec, cfg), spec, cfg)
    if isinstance(out, (tuple, list)) and len(out) == 4:
        out = dict(zip(_DATA_KEYS, out))
    if not isinstance(out, Mapping):
        raise ConfigError(f"{where} returned a {type(out).__name__}; return a dict with keys "
                          f"{list(_DATA_KEYS)} (or the tuple (x_train, y_train, x_test, y_test)).")
    missing = [k for k in _DATA_KEYS if k not in out]
    unknown = [k for k in out if k not in _DATA_KEYS + _DATA_OPTIONAL]
    if missing or unknown:
        raise ConfigError(f"{where} returned a dict with missing keys {missing} / unknown keys {unknown}; "
                          f"the keys are {list(_DATA_KEYS)} and optionally {list(_DATA_OPTIONAL)}.")
    x_train, x_test = _inputs(out["x_train"], "x_train", where), _inputs(out["x_test"], "x_test", where)
    n, t = batch_size_of(x_train), batch_size_of(x_test)
    if n < 2 or t < 1:
        raise ConfigError(f"{where} returned {n} training and {t} test examples; a surrogate needs at least "
                          "2 training points and 1 test point.")
    extras: dict[str, Any] = {}
    if out.get("classes") is not None:
        extras["classes"] = tuple(str(c) for c in out["classes"])
    for key, size in (("images_train", n), ("images_test", t)):
        if out.get(key) is not None:
            a = to_numpy(out[key], np.float64)
            if a.shape[0] != size or a.ndim not in (3, 4):
                raise ConfigError(f"{where}: {key} must be ({size}, H, W) or ({size}, C, H, W) images; got "
                                  f"shape {a.shape}.")
            extras[key] = a
    for key, size in (("tokens_train", n), ("tokens_test", t)):
        if out.get(key) is not None:
            toks = [[str(s) for s in row] for row in out[key]]
            if len(toks) != size:
                raise ConfigError(f"{where}: {key} has {len(toks)} rows for {size} examples.")
            extras[key] = toks
    if out.get("vocab") is not None:
        extras["vocab"] = tuple(str(s) for s in out["vocab"])
    return UserData(x_train, _labels(out["y_train"], n, "y_train", where), x_test,
                    _labels(out["y_test"], t, "y_test", where), **extras)


# ----------------------------------------------------------------------------------------------------------
# The network's outputs.
# ----------------------------------------------------------------------------------------------------------
def network_logits(model: nn.Module, x: Batch, batch_size: int = 256) -> np.ndarray:
    """The model's logits on ``x`` (N, C), float64, in eval mode and without gradients, batch by batch
    (one logit z reads as the two logits [0, z]).

    Raises:
        ModelCallError, ModelOutputError: the forward fails or does not return (B, C) logits.
        NonFiniteError: NaN or infinite logits.
    """
    n = batch_size_of(x)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    parts = []
    with eval_mode(model), torch.no_grad():
        for s in range(0, n, batch_size):
            xb = slice_batch(x, s, min(s + batch_size, n))
            xb = xb.to(device) if isinstance(xb, Tensor) else {k: v.to(device) for k, v in xb.items()}
            parts.append(extract_logits(call_model(model, xb), batch_size_of(xb)).double().cpu())
    z = to_numpy(torch.cat(parts), np.float64)
    if not np.isfinite(z).all():
        raise NonFiniteError("The network's logits contain NaN or infinity; check the checkpoint and inputs.")
    return as_logits(z, "the network's logits")
