"""``FeatureStore``: per-example feature rows on disk (a Zarr v3 group), chunked by blocks of examples.

Layout of the group (``path/``)::

    zarr.json      the manifest (group attributes, JSON): format, version, config (KernelConfig.to_dict())
                   and its fingerprint, model / data fingerprints, label mode, n, chunk_rows, n_chunks,
                   row_shape, dtype, the capture block size, library versions, status
    features       (N, *row_shape) raw (unnormalized) feature rows: (N, D), or (N, C, D) for "entk";
                   chunks of chunk_rows examples (the last axis split beyond 64 MiB per chunk)
    sqnorms        (N,) float64 squared row norms ‖φ(x_i)‖² = k(x_i, x_i), the kernel's diagonal
                   ((N, C) per class for "entk")
    done           (n_chunks,) uint8, 1 once a chunk's rows and norms are written

Rows are stored raw, so the normalized kernel (cosine, from ``sqnorms``) and the raw one both come from the
same store. Float16 rows are stored as float16, bfloat16 rows as float32 (exact), others as they are.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..config import EXECUTION_FIELDS, KernelConfig
from ..errors import InputError, NonFiniteError, StoreMismatchError
from .fingerprint import shorten
from .manifest import (
    COMPLETE,
    RUNNING,
    VERSION,
    check_identity,
    check_writer,
    chunk_columns,
    mark_done,
    new_array,
    new_flags,
    open_group,
    read_flags,
    store_path,
    versions,
)

if TYPE_CHECKING:  # zarr is imported when a store is opened: `import tangentlens` stays fast
    import zarr

__all__ = ["FeatureStore", "FORMAT", "config_identity"]

FORMAT = "tangentlens.features"
# the fields a resumed run must share with the stored one, in the order they are compared
IDENTITY = ("format", "config", "config_fingerprint", "model_fingerprint", "n", "labels", "data_fingerprint",
            "chunk_rows")
_RESUME = ("Resume with the same model, data, labels and configuration, or write to a new path (or delete "
           "the store to start over).")


def config_identity(cfg: KernelConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that define the result (what :meth:`KernelConfig.fingerprint` hashes)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS}
    d["normalize"] = cfg.normalized
    return d


def _stored_dtype(dtype: torch.dtype | np.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = str(np.dtype(dtype))
        except TypeError:
            name = str(dtype)
    if name == "bfloat16":
        return "float32"
    if name not in ("float16", "float32", "float64"):
        raise InputError(f"Feature rows must be floating point; got dtype {name}.")
    return name


class FeatureStore:
    """A feature store on a local path: :func:`tangentlens.featurize` writes one, :meth:`open` reads one.

    ``store[a:b]`` reads rows as a NumPy array, :meth:`iter_blocks` streams them chunk by chunk;
    :attr:`features` and :attr:`sqnorms` are the Zarr arrays themselves. Writers (a featurization, or a
    distributed worker) call :meth:`allocate` once, then :meth:`write_chunk` per chunk and :meth:`finish`.
    """

    def __init__(self, group: zarr.Group, path: Path, manifest: dict[str, Any]) -> None:
        self._group = group
        self.path = path
        self._manifest = manifest

    # ------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_incomplete: bool = False,
             writable: bool = False) -> FeatureStore:
        """Open a store (read-only unless ``writable``).

        Args:
            path: the store's directory.
            allow_incomplete: open a store whose run has not finished (to inspect it); its unwritten rows
                read as zeros.
            writable: open it to write chunks (what a distributed worker does); implies
                ``allow_incomplete``.

        Raises:
            InputError: no feature store at ``path``, or its run did not finish (the message says how many
                chunks are done and how to resume).
        """
        p = store_path(path, "path")
        group, manifest = open_group(p, FORMAT, create=False, writable=writable)
        assert manifest is not None
        store = cls(group, p, manifest)
        if not (allow_incomplete or writable) and not store.complete:
            done = int(store.done().sum()) if "done" in group else 0
            raise InputError(
                f"The feature store at {str(p)!r} is incomplete: its run stopped after {done} of "
                f"{store.n_chunks} chunks. Resume it by calling tl.featurize(model, data, {str(p)!r}, ...) "
                "again with the same model, data, labels and options (finished chunks are kept), or open it "
                "with allow_incomplete=True to inspect it.")
        return store

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        config: KernelConfig,
        n: int,
        chunk_rows: int | None,
        model_fingerprint: str,
        data_fingerprint: str,
        labels: str = "none",
        block_size: int | None = None,
        resume: bool = True,
    ) -> FeatureStore:
        """A new store for ``n`` examples (no arrays until :meth:`allocate`), or the existing one at ``path``
        after checking that it was made by the same configuration, model, data and labels.

        Args:
            path: the store's directory (created; must be new or empty unless it holds this store).
            config: the kernel configuration (its result-defining fields are compared on reopen).
            n: number of examples.
            chunk_rows: examples per chunk; ``None``: the stored value (or ``config.batch_size`` when new).
            model_fingerprint, data_fingerprint: from :mod:`tangentlens.store.fingerprint` (or user ids).
            labels: ``"none"``, ``"true"`` or ``"predicted"``.
            block_size: examples per capture, if fixed by the caller (compared with a recorded one).
            resume: reuse an existing store; ``False`` refuses one.

        Raises:
            StoreMismatchError: the existing store differs in a field (named, with both values).
            InputError: ``resume=False`` and a store exists; bad arguments.
        """
        p = store_path(path, "store")
        for name, v in (("n", n), ("chunk_rows", chunk_rows), ("block_size", block_size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be a positive integer; got {v!r}.")
        group, stored = open_group(p, FORMAT, create=True)
        if stored is not None and not resume:
            raise InputError(
                f"A feature store already exists at {str(p)!r}; pass resume=True to continue (or reuse) it, "
                "or delete it / choose a new path to start over.")
        rows = chunk_rows if chunk_rows is not None else (
            stored["chunk_rows"] if stored is not None else config.batch_size)
        given = {
            "format": FORMAT, "config": config_identity(config), "config_fingerprint": config.fingerprint(),
            "model_fingerprint": model_fingerprint, "n": n, "labels": labels,
            "data_fingerprint": data_fingerprint, "chunk_rows": rows,
        }
        if stored is not None:
            try:
                stored_cfg = config_identity(KernelConfig.from_dict(stored["config"]))
            except (InputError, KeyError, TypeError) as e:
                raise StoreMismatchError(
                    f"The feature store at {str(p)!r} holds a configuration this tangentlens cannot read "
                    f"({e}). {_RESUME}") from None
            check_identity({**stored, "config": stored_cfg}, given, IDENTITY,
                           what=f"The feature store at {str(p)!r}", fix=_RESUME)
            if block_size is not None and stored.get("block_size") not in (None, block_size):
                raise StoreMismatchError(
                    f"The feature store at {str(p)!r} was made with a different block_size: stored "
                    f"{stored['block_size']}, this call {block_size}. Resumed rows are bit-identical only "
                    "with the recorded capture size: omit block_size= (it is reused) or start a new store.")
            store = cls(group, p, stored)
            if not store.complete:
                check_writer(stored, what=f"The unfinished feature store at {str(p)!r}",
                             fix="delete it to start over (or write to a new path).")
            return store
        manifest = {
            **given, "version": VERSION, "config": config.to_dict(), "n_chunks": math.ceil(n / rows),
            "row_shape": None, "dtype": None, "block_size": block_size, "versions": versions(),
            "status": RUNNING, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        group.attrs.update(manifest)
        new_flags(group, "done", (manifest["n_chunks"],))
        return cls(group, p, manifest)

    @classmethod
    def from_array(
        cls,
        path: str | os.PathLike[str],
        features: np.ndarray | Tensor,
        *,
        config: KernelConfig | None = None,
        model_id: str,
        data_id: str | None = None,
        chunk_rows: int = 256,
    ) -> FeatureStore:
        """A complete store holding given feature rows (features computed elsewhere, or random ones).

        Args:
            path: a new directory.
            features: (N, D) raw rows ((N, C, D) for ``config.kind == "entk"``).
            config: what the rows are features of (default ``KernelConfig(kind="trntk0")``: raw inner
                products, unnormalized); decides the kernel's default normalization.
            model_id: names the model the rows come from (stored as the model fingerprint).
            data_id: names the data; default: a SHA-256 of the rows.
            chunk_rows: examples per chunk.
        """
        F = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
        if F.ndim < 2 or F.shape[0] == 0:
            raise InputError(f"features must be an (N, D) array with N >= 1; got shape {F.shape}.")
        cfg = config if config is not None else KernelConfig(kind="trntk0")
        if not isinstance(model_id, str) or not model_id:
            raise InputError("model_id must be a non-empty string naming the model the rows come from.")
        if data_id is None:
            import hashlib

            data_id = "sha256:" + hashlib.sha256(np.ascontiguousarray(F).tobytes()).hexdigest()
        store = cls.create(path, config=cfg, n=int(F.shape[0]), chunk_rows=chunk_rows,
                           model_fingerprint="id:" + model_id, data_fingerprint="id:" + data_id, resume=False)
        store.allocate(tuple(F.shape[1:]), F.dtype)
        for k in store.pending():
            sl = store.chunk_slice(k)
            store.write_chunk(k, F[sl])
        store.finish()
        return store

    # ---------------------------------------------------------------------------------------- properties
    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest (plain JSON values)."""
        return dict(self._manifest)

    @property
    def identity(self) -> dict[str, Any]:
        """What identifies the rows, recorded by the kernels and surrogates made from them: the config, model
        and data fingerprints, the label mode and N."""
        m = self._manifest
        keys = ("config_fingerprint", "model_fingerprint", "data_fingerprint", "labels")
        return {**{k: m.get(k) for k in keys}, "n": self.n}

    @property
    def config(self) -> KernelConfig:
        """The :class:`~tangentlens.KernelConfig` the rows were computed with."""
        return KernelConfig.from_dict(self._manifest["config"])

    @property
    def n(self) -> int:
        return int(self._manifest["n"])

    def __len__(self) -> int:
        return self.n

    @property
    def chunk_rows(self) -> int:
        return int(self._manifest["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return int(self._manifest["n_chunks"])

    @property
    def row_shape(self) -> tuple[int, ...] | None:
        """Shape of one row: (D,), or (C, D) for ``"entk"``; ``None`` before the first chunk."""
        rs = self._manifest.get("row_shape")
        return None if rs is None else tuple(rs)

    @property
    def dtype(self) -> np.dtype | None:
        d = self._manifest.get("dtype")
        return None if d is None else np.dtype(d)

    @property
    def block_size(self) -> int | None:
        """Examples per capture of the run (recorded on its first block; reused on resume)."""
        return self._manifest.get("block_size")

    @property
    def full(self) -> bool:
        """Rows are (C, D) per example (the full ``"entk"`` kind)."""
        return self.row_shape is not None and len(self.row_shape) == 2

    @property
    def features(self) -> zarr.Array:
        """The (N, *row_shape) Zarr array of raw feature rows."""
        self._need_arrays()
        return self._group["features"]

    @property
    def sqnorms(self) -> zarr.Array:
        """The (N,) float64 Zarr array of squared row norms (the raw kernel's diagonal; (N, C) for entk)."""
        self._need_arrays()
        return self._group["sqnorms"]

    @property
    def allocated(self) -> bool:
        return "features" in self._group

    def _need_arrays(self) -> None:
        if not self.allocated:
            raise InputError(
                f"The feature store at {str(self.path)!r} holds no rows yet (no chunk was written).")

    def done(self) -> np.ndarray:
        """(n_chunks,) booleans: which chunks are written."""
        return read_flags(self._group["done"])

    def pending(self) -> list[int]:
        """Indices of the chunks not written yet."""
        return [int(k) for k in np.flatnonzero(~self.done())]

    @property
    def complete(self) -> bool:
        """The run finished: status ``"complete"`` and every chunk's flag set."""
        return self._manifest.get("status") == COMPLETE and bool(self.done().all())

    def chunk_slice(self, k: int) -> slice:
        """Rows of chunk ``k``."""
        if not 0 <= k < self.n_chunks:
            raise InputError(f"chunk index {k} is out of range (the store has {self.n_chunks} chunks).")
        return slice(k * self.chunk_rows, min((k + 1) * self.chunk_rows, self.n))

    def __getitem__(self, key: Any) -> np.ndarray:
        """Rows as a NumPy array (``store[a:b]``, ``store[idx]``)."""
        return np.asarray(self.features[key])

    def iter_blocks(self, rows: int | None = None, *, normalized: bool = False
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` blocks in order, ``rows`` examples each (default: one chunk).

        Args:
            rows: examples per block.
            normalized: divide each row by its norm (per class for entk); zero rows stay zero.
        """
        step = self.chunk_rows if rows is None else rows
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise InputError(f"rows must be a positive integer; got {rows!r}.")
        F, d = self.features, self.sqnorms
        for s in range(0, self.n, step):
            e = min(s + step, self.n)
            block = np.asarray(F[s:e])
            if normalized:
                norms = np.sqrt(np.asarray(d[s:e]))
                scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
                block = (block * scale[..., None]).astype(block.dtype, copy=False)
            yield s, block

    # ------------------------------------------------------------------------------------------ writing
    def allocate(self, row_shape: tuple[int, ...], dtype: torch.dtype | np.dtype | str,
                 block_size: int | None = None) -> None:
        """Create the arrays for rows of ``row_shape`` (once; a resumed run checks them instead) and record
        the row shape, dtype and capture block size in the manifest.

        Raises:
            StoreMismatchError: the store already holds rows of another shape or dtype.
        """
        row_shape = tuple(int(v) for v in row_shape)
        if len(row_shape) not in (1, 2) or min(row_shape) < 1:
            raise InputError(f"Feature rows must be (D,) or (C, D) per example; got {row_shape}.")
        dt = _stored_dtype(dtype)
        if self.allocated:
            checks = (("row_shape", self.row_shape, row_shape), ("dtype", str(self.dtype), dt))
            for field, have, want in checks:
                if have != want:
                    raise StoreMismatchError(
                        f"The feature store at {str(self.path)!r} holds rows with {field} {shorten(have)}; "
                        f"this run produces {shorten(want)}. {_RESUME}")
            return
        update: dict[str, Any] = {"row_shape": list(row_shape), "dtype": dt}
        if self.block_size is None and block_size is not None:
            update["block_size"] = int(block_size)
        self._group.attrs.update(update)
        self._manifest.update(update)
        chunks = chunk_columns(self.chunk_rows, row_shape, np.dtype(dt).itemsize)
        new_array(self._group, "sqnorms", (self.n, *row_shape[:-1]), (self.chunk_rows, *row_shape[:-1]),
                  "float64")
        new_array(self._group, "features", (self.n, *row_shape), chunks, dt)

    def write_chunk(self, k: int, rows: np.ndarray | Tensor) -> None:
        """Write chunk ``k``'s rows and squared norms, then mark it done.

        Raises:
            InputError: wrong number of rows or row shape.
            NonFiniteError: NaN or infinite values (nothing is written).
        """
        self._need_arrays()
        sl = self.chunk_slice(k)
        if isinstance(rows, Tensor):
            rows = rows.detach().cpu()
            if rows.dtype == torch.bfloat16:
                rows = rows.float()
            rows = rows.numpy()
        rows = np.asarray(rows)
        want = (sl.stop - sl.start, *self.row_shape)  # type: ignore[misc]
        if rows.shape != want:
            raise InputError(f"Chunk {k} takes rows of shape {want}; got {rows.shape}.")
        if not np.isfinite(rows).all():
            raise NonFiniteError(
                f"NaN or infinite features in rows {sl.start}..{sl.stop - 1} (chunk {k}); nothing was "
                "written for them. Check the model's outputs on those examples (or compute in float64).")
        rows = rows.astype(self.dtype, copy=False)
        sq = np.square(rows, dtype=np.float64).sum(-1)
        self._group["features"][sl] = rows
        self._group["sqnorms"][sl] = sq
        mark_done(self._group["done"], k)

    def finish(self) -> None:
        """Mark the run complete.

        Raises:
            InputError: some chunks are not written yet.
        """
        left = self.pending()
        if left:
            raise InputError(f"{len(left)} chunk(s) of the feature store at {str(self.path)!r} are not "
                             f"written yet (e.g. {left[:5]}); write them before finish().")
        update = {"status": COMPLETE, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._group.attrs.update(update)
        self._manifest.update(update)

    def __repr__(self) -> str:
        done = int(self.done().sum())
        state = "complete" if self.complete else f"incomplete, {done}/{self.n_chunks} chunks"
        return (f"FeatureStore({str(self.path)!r}, n={self.n}, row_shape={self.row_shape}, "
                f"kind={self._manifest['config'].get('kind')!r}, {state})")
