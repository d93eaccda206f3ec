"""``SurrogateStore``: a fitted surrogate's coefficients on disk (a Zarr v3 group), read back without pickle.

Layout of the group (``path/``)::

    zarr.json      the manifest (group attributes, JSON): format, version, the estimator's class and its
                   constructor parameters, its fitted scalars, the names of its fitted arrays, the identity
                   of the training feature store it was fitted on (if given), the caller's ``meta``, the
                   library versions, status
    class_coef     (C, N) the dual weights W: contribution of training point i to class c at x is
                   W[c, i] K(x, x_i)
    class_intercept, classes, ...   every other fitted array of the estimator (``feature_coef``, ``coef``,
                   ``intercept``, ...), one Zarr array each, named after the attribute without its
                   trailing underscore

Saved are the surrogates whose fitted state is numbers only: :class:`~tangentlens.surrogate.KernelSurrogate`
(``solver="lbfgs"``), :class:`~tangentlens.surrogate.PrimalKernelSurrogate` and
:class:`~tangentlens.surrogate.KernelRidgeSurrogate`. Loading rebuilds the same class from an allow-list with
the stored parameters and sets the stored attributes: ``predict``, ``logits``, ``contributions`` and
:func:`tangentlens.explain` give the same numbers as the saved object (bit for bit: arrays are stored in
their own dtype). Nothing is unpickled.

The group is written in a sibling temporary directory and renamed into place when complete, so a crash
never leaves a half-written surrogate that looks complete. Cost: the arrays' bytes (``C N`` floats for
``class_coef``), written once.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, StoreMismatchError
from .fingerprint import shorten
from .manifest import COMPLETE, VERSION, open_group, store_path, versions

__all__ = ["SurrogateStore", "save_surrogate", "load_surrogate", "FORMAT"]

FORMAT = "tangentlens.surrogate"
_CHUNK_BYTES = 64 * 2**20
_TRAIN_KEYS = ("config_fingerprint", "model_fingerprint", "data_fingerprint", "n")


def _classes() -> dict[str, type]:
    """The estimators a store may hold (the allow-list: nothing else is ever instantiated)."""
    from ..surrogate import KernelRidgeSurrogate, KernelSurrogate, PrimalKernelSurrogate

    return {c.__name__: c for c in (KernelSurrogate, PrimalKernelSurrogate, KernelRidgeSurrogate)}


def _encode(value: Any, what: str) -> Any:
    """``value`` as JSON: dicts as ``{"__items__": [[key, value], ...]}`` so non-string keys survive."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(v, what) for v in value]
    if isinstance(value, dict):
        return {"__items__": [[_encode(k, what), _encode(v, what)] for k, v in value.items()]}
    raise InputError(f"{what} is a {type(value).__name__}, which a surrogate store cannot hold without "
                     "pickling; use numbers, strings, lists or dicts of them.")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict) and set(value) == {"__items__"}:
        return {_decode(k): _decode(v) for k, v in value["__items__"]}
    return value


def _identity(train: Any) -> dict[str, Any]:
    """The identifying fields of a :class:`~tangentlens.store.FeatureStore`'s manifest.

    Raises:
        InputError: ``train`` is not a feature store.
    """
    from .features import FeatureStore

    if not isinstance(train, FeatureStore):
        raise InputError(f"train must be the FeatureStore of the training features (tl.featurize's result or "
                         f"FeatureStore.open(path)); got a {type(train).__name__}.")
    ident = train.identity
    return {k: ident[k] for k in _TRAIN_KEYS}


def _fitted_state(sur: Any) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, list[Any]]]:
    """The fitted attributes (public names ending in ``_``): numeric arrays, JSON scalars, and arrays of
    strings / mixed labels (kept as JSON lists).

    Raises:
        InputError: an attribute that is neither (e.g. a scikit-learn estimator object).
    """
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    lists: dict[str, list[Any]] = {}
    for name, value in sorted(vars(sur).items()):
        if not name.endswith("_") or name.startswith("_"):
            continue
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biuf":
                arrays[name] = np.ascontiguousarray(value)
            elif value.ndim == 1:
                lists[name] = _encode(value.tolist(), f"{type(sur).__name__}.{name}")
            else:
                raise InputError(f"{type(sur).__name__}.{name} is a {value.ndim}-D {value.dtype} array; a "
                                 "surrogate store holds numeric arrays and 1-D label arrays.")
        else:
            scalars[name] = _encode(value, f"{type(sur).__name__}.{name} ({type(value).__name__})")
    return arrays, scalars, lists


def _chunks(arr: np.ndarray) -> tuple[int, ...]:
    """Whole leading axes, the last axis split so that one chunk stays within 64 MiB."""
    if arr.ndim == 0:
        return ()
    inner = int(np.prod(arr.shape[:-1], dtype=np.int64)) * arr.itemsize
    last = max(1, min(arr.shape[-1], _CHUNK_BYTES // max(1, inner)))
    return (*(max(1, s) for s in arr.shape[:-1]), last)


class SurrogateStore:
    """A saved surrogate: :func:`save_surrogate` writes one, :meth:`open` reads it back.

    Attributes:
        path: the group's directory.
        manifest: the group's attributes (see the module docstring).
        meta: what the caller passed as ``meta`` when saving (kernel name, target, ...).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.meta: dict[str, Any] = _decode(manifest.get("meta") or {})

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SurrogateStore:
        """Open a saved surrogate (read-only).

        Raises:
            InputError: nothing there, another kind of store, or an unfinished write.
        """
        p = store_path(path, "path")
        if not (p / "zarr.json").is_file():
            raise InputError(f"No surrogate store at {str(p)!r} (no zarr.json there); save one with "
                             "tangentlens.store.save_surrogate (or `tangentlens fit`) first.")
        _, manifest = open_group(p, FORMAT, create=False)
        assert manifest is not None
        if manifest.get("status") != COMPLETE:
            raise InputError(f"The surrogate store at {str(p)!r} was not finished; save the surrogate again.")
        return cls(p, manifest)

    @property
    def estimator_class(self) -> str:
        """The saved estimator's class name."""
        return str(self.manifest["estimator"])

    def estimator(self, train: Any | None = None) -> Any:
        """The fitted estimator, rebuilt from the stored parameters and arrays.

        Args:
            train: the :class:`~tangentlens.store.FeatureStore` of training features the surrogate will be
                used with (kernel rows against it); checked against the one it was fitted on, if that was
                recorded.

        Returns:
            A fitted ``KernelSurrogate`` / ``PrimalKernelSurrogate`` / ``KernelRidgeSurrogate``.

        Raises:
            StoreMismatchError: ``train`` is not the store the surrogate was fitted on (the field that
                differs is named), or holds another number of rows than the surrogate's weights.
            InputError: an estimator class this tangentlens does not know.
        """
        import zarr

        m = self.manifest
        known = _classes()
        cls = known.get(m.get("estimator", ""))
        if cls is None:
            raise InputError(f"The surrogate store at {str(self.path)!r} holds a {m.get('estimator')!r}, not "
                             f"one of {sorted(known)}; it was written by another tangentlens.")
        if train is not None:
            self.check_train(train)
        est = cls(**{k: _decode(v) for k, v in m["params"].items()})
        group = zarr.open_group(str(self.path), mode="r")
        for attr, name in m["arrays"].items():
            setattr(est, attr, np.asarray(group[name][...]))
        for attr, value in m["lists"].items():
            setattr(est, attr, np.asarray(_decode(value)))
        for attr, value in m["scalars"].items():
            setattr(est, attr, _decode(value))
        return est

    def check_train(self, train: Any) -> None:
        """Check that ``train`` is the feature store the surrogate was fitted on.

        Raises:
            StoreMismatchError: a differing field (named, with both values), or another number of rows.
        """
        stored, given = self.manifest.get("train"), _identity(train)
        fix = ("Use the training features the surrogate was fitted on, or fit it again on these "
               "(`tangentlens fit`).")
        if stored is not None:
            for key in _TRAIN_KEYS:
                if stored.get(key) != given.get(key):
                    raise StoreMismatchError(
                        f"The surrogate at {str(self.path)!r} was fitted on training features with another "
                        f"{key} (stored {shorten(stored.get(key))}, the store at {str(train.path)!r} has "
                        f"{shorten(given.get(key))}). {fix}")
        n = self.manifest.get("n_train")
        if n is not None and n != given.get("n"):
            raise StoreMismatchError(
                f"The surrogate at {str(self.path)!r} has weights for {n} training points; the store at "
                f"{str(train.path)!r} holds {given.get('n')}. {fix}")

    def __repr__(self) -> str:
        n = self.manifest["n_train"]
        return f"SurrogateStore({str(self.path)!r}, {self.estimator_class}, n_train={n})"


def save_surrogate(
    path: str | os.PathLike[str],
    surrogate: Any,
    *,
    train: Any | None = None,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> SurrogateStore:
    """Save a fitted surrogate's parameters and coefficients to a new Zarr group at ``path``.

    Args:
        path: a new directory (or an existing surrogate store with ``overwrite=True``).
        surrogate: a fitted ``KernelSurrogate`` (``solver="lbfgs"``), ``PrimalKernelSurrogate`` or
            ``KernelRidgeSurrogate``.
        train: the :class:`~tangentlens.store.FeatureStore` of training features it was fitted on; its
            identity (config, model and data fingerprints, N) is recorded and checked when the surrogate is
            loaded with one.
        meta: JSON-able facts to keep with it (kernel name, target, ...): :attr:`SurrogateStore.meta`.
        overwrite: replace a surrogate store already at ``path`` (never anything else).

    Returns:
        The saved :class:`SurrogateStore`.

    Raises:
        InputError: an unfitted or unsupported surrogate (e.g. the SGD kGLM or the SVM, whose fitted state
            holds scikit-learn objects), state that is not numbers, ``path`` taken (by a surrogate store
            without ``overwrite``, or by anything else).
        StoreMismatchError: ``train`` holds another number of rows than the surrogate's weights.
    """
    import zarr

    p = store_path(path, "path")
    name = type(surrogate).__name__
    if _classes().get(name) is not type(surrogate):
        raise InputError(f"save_surrogate saves {sorted(_classes())}; got a {name}. (The SVM and the SGD "
                         "kGLM hold scikit-learn objects: keep them with joblib if you trust the file.)")
    coef = getattr(surrogate, "class_coef_", None)
    if not isinstance(coef, np.ndarray):
        raise InputError(f"The {name} is not fitted (no class_coef_); call fit first.")
    if getattr(surrogate, "estimator_", None) is not None:
        raise InputError(f"This {name} was fitted with solver='sgd' and holds a scikit-learn SGDClassifier; "
                         "only solver='lbfgs' models are saved (they need no pickle).")
    arrays, scalars, lists = _fitted_state(surrogate)
    params = {k: _encode(v, f"{name} parameter {k!r}") for k, v in surrogate.get_params(deep=False).items()}
    n_train = int(coef.shape[1])
    if train is not None and _identity(train)["n"] != n_train:
        raise StoreMismatchError(f"The {name} has weights for {n_train} training points but the feature "
                                 f"store at {str(train.path)!r} holds {train.n}; pass the store it was "
                                 "fitted on.")
    if (p / "zarr.json").is_file():
        try:
            SurrogateStore.open(p)
        except InputError:
            raise InputError(f"{str(p)!r} holds something that is not a finished surrogate store; choose "
                             "another path.") from None
        if not overwrite:
            raise InputError(f"A surrogate is already saved at {str(p)!r}; pass overwrite=True to replace "
                             "it.")
    elif p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise InputError(f"{str(p)!r} exists and is not an empty directory nor a surrogate store; choose a "
                         "new path.")
    manifest = {
        "format": FORMAT, "version": VERSION, "estimator": name, "params": params,
        "arrays": {attr: attr.removesuffix("_") for attr in arrays}, "lists": lists, "scalars": scalars,
        "n_train": n_train, "n_classes": int(coef.shape[0]),
        "train": None if train is None else _identity(train),
        "meta": _encode(dict(meta or {}), "meta"), "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running",
    }
    tmp, old = (p.parent / f".{p.name}.{what}-{os.getpid()}" for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        group = zarr.open_group(str(tmp), mode="w-")
        group.attrs.update(manifest)
        for attr, arr in arrays.items():
            group.create_array(attr.removesuffix("_"), shape=arr.shape, dtype=arr.dtype,
                               chunks=_chunks(arr), fill_value=0, compressors=None)[...] = arr
        group.attrs.update({"status": COMPLETE})
        if p.exists():  # the old store steps aside first: a crash leaves it at `old`, never half of one
            os.replace(p, old)
        os.replace(tmp, p)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SurrogateStore(p, {**manifest, "status": COMPLETE})


def load_surrogate(path: str | os.PathLike[str], *, train: Any | None = None) -> Any:
    """The fitted surrogate saved at ``path``: ``SurrogateStore.open(path).estimator(train)``.

    Raises:
        InputError: no finished surrogate store there.
        StoreMismatchError: ``train`` is not the feature store it was fitted on.
    """
    return SurrogateStore.open(path).estimator(train)
