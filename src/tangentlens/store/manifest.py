"""What every store shares: the Zarr v3 group on a local path, its JSON manifest (the group's attributes),
the comparison of a stored manifest with a call's, the per-chunk "done" flags and the run's status.

A manifest is plain JSON in the group's ``zarr.json`` (Zarr writes it atomically: a temporary file, then a
rename); nothing in a store is ever unpickled. A run's status is ``"running"`` until every chunk is marked
done, then ``"complete"``; a chunk's flag is set only after its data are written, each flag in its own
one-byte chunk so that concurrent writers never share a file.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InputError, StoreMismatchError
from .fingerprint import shorten

if TYPE_CHECKING:  # zarr is imported when a store is opened: `import tangentlens` stays fast
    import zarr

__all__ = [
    "RUNNING", "COMPLETE", "VERSION", "versions", "open_group", "read_manifest", "flatten", "check_identity",
    "chunk_columns", "new_array", "new_flags", "read_flags", "mark_done", "store_path", "check_writer",
]

RUNNING = "running"
COMPLETE = "complete"
VERSION = 1
_CHUNK_BYTES = 64 * 2**20  # largest chunk file the stores write (columns are split beyond it)


def versions() -> dict[str, str]:
    """The library versions a store was written with (compared only to resume a run: :func:`check_writer`)."""
    def v(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
            return "unknown"

    import zarr

    return {"tangentlens": v("tangentlens"), "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__}


def check_writer(stored: Mapping[str, Any], *, what: str, fix: str) -> None:
    """Refuse to resume an unfinished run started by another tangentlens or torch release: their summation
    orders may differ, so the rows written now could differ in the last bits from those already there and the
    finished store would not be bit-identical to one uninterrupted run. (A finished store is read by any.)

    Raises:
        StoreMismatchError: the release that differs, with both versions and ``fix``.
    """
    have, now = stored.get("versions") or {}, versions()
    for lib in ("tangentlens", "torch"):
        if have.get(lib) not in (None, now[lib]):
            raise StoreMismatchError(
                f"{what} was started with {lib} {have[lib]} and this is {lib} {now[lib]}: rows computed now "
                f"may differ in the last bits from those already stored. Finish it with {lib} {have[lib]}, "
                f"or {fix}")


def store_path(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a local ``Path``.

    Raises:
        InputError: not a path (e.g. ``None`` or a number).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{what} must be a local directory path (str or pathlib.Path); got {path!r}.")
    return Path(path)


def open_group(path: Path, fmt: str, *, create: bool, writable: bool = False
               ) -> tuple[zarr.Group, dict[str, Any] | None]:
    """The store's group and its manifest (``None`` for a new, empty group made with ``create``); an
    existing group is opened read-only unless ``create`` or ``writable``.

    Raises:
        InputError: no store at ``path`` (without ``create``), or ``path`` holds something that is not a
            store of format ``fmt``.
    """
    import zarr

    exists = (path / "zarr.json").exists()
    if not exists:
        if not create:
            kind = "feature" if fmt.endswith("features") else "kernel"
            raise InputError(f"No {kind} store at {str(path)!r} (no zarr.json there); check the path.")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InputError(
                f"{str(path)!r} exists and is not an empty directory nor a tangentlens store; choose a new "
                "path for the store.")
        return zarr.open_group(str(path), mode="w-"), None
    group = zarr.open_group(str(path), mode="a" if create else ("r+" if writable else "r"))
    return group, read_manifest(group, path, fmt)


def read_manifest(group: zarr.Group, path: Path, fmt: str) -> dict[str, Any]:
    """The manifest of ``group`` after checking its format.

    Raises:
        InputError: the group is not a store of format ``fmt`` (or of a newer store version).
    """
    attrs = group.attrs.asdict()
    if attrs.get("format") != fmt:
        raise InputError(
            f"{str(path)!r} is a Zarr group but not a {fmt} store (its format is {attrs.get('format')!r}); "
            "check the path.")
    if attrs.get("version", 0) > VERSION:
        raise InputError(
            f"The store at {str(path)!r} has version {attrs.get('version')}, newer than this tangentlens "
            f"reads ({VERSION}); upgrade tangentlens.")
    return dict(attrs)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_identity(
    stored: Mapping[str, Any], given: Mapping[str, Any], keys: Iterable[str], *, what: str, fix: str
) -> None:
    """Compare the identifying fields ``keys`` of a stored manifest with the call's, in order.

    Raises:
        StoreMismatchError: the first field that differs, with both values (shortened) and ``fix``.
    """
    for key in keys:
        a = flatten({key: stored.get(key)})
        b = flatten({key: given.get(key)})
        for field in sorted(set(a) | set(b), key=lambda f: (f not in a or f not in b, f)):
            if _norm(a.get(field)) != _norm(b.get(field)):
                raise StoreMismatchError(
                    f"{what} was made with a different {field}: stored {shorten(a.get(field))}, this call "
                    f"{shorten(b.get(field))}. {fix}")


def _norm(v: Any) -> Any:
    """JSON-normal form (tuples as lists) so that a stored and a fresh value compare equal."""
    if isinstance(v, (tuple, list)):
        return [_norm(x) for x in v]
    return v


def chunk_columns(rows: int, row_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk shape of an (N, *row_shape) array written ``rows`` rows at a time: whole rows, the last axis
    split so that one chunk stays within 64 MiB."""
    inner = int(np.prod(row_shape[:-1], dtype=np.int64)) if len(row_shape) > 1 else 1
    cols = max(1, min(row_shape[-1], _CHUNK_BYTES // max(1, rows * inner * itemsize)))
    return (rows, *row_shape[:-1], cols)


def new_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
              dtype: str) -> zarr.Array:
    """An uncompressed array (gradient features and kernel values do not compress), zero-filled."""
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=None)


def new_flags(group: zarr.Group, name: str, shape: tuple[int, ...]) -> zarr.Array:
    """A zero "done" flag per chunk, each flag in its own chunk (one small file per finished chunk)."""
    return group.create_array(name, shape=shape, chunks=(1,) * len(shape), dtype="uint8", fill_value=0)


def read_flags(flags: zarr.Array) -> np.ndarray:
    """The done flags as booleans."""
    return np.asarray(flags[...]).astype(bool)


def mark_done(flags: zarr.Array, index: int | tuple[int, ...]) -> None:
    """Set one chunk's flag (after its data are written)."""
    idx = index if isinstance(index, tuple) else (index,)
    flags[tuple(slice(i, i + 1) for i in idx)] = np.ones((1,) * len(idx), dtype=np.uint8)
