"""The resumable store of :class:`tangentlens.lds.SubsetRetrainer`: finished subsets on disk.

Every finished subset's outputs are written at once, atomically (a temporary file in the same folder,
then ``os.replace``), so an interrupted run continues where it stopped without retraining the finished
subsets. The layout of the folder::

    manifest.json          {"format", "version", "n_train", "alpha", "n_subsets", "seed", "subsets_sha256"}
    subset_000000.npz      arrays "indices" (int64, the subset) and "outputs" (float64, (n_targets,))
    subset_000001.npz      ...

Files are read with ``np.load(allow_pickle=False)`` and ``json``: nothing is unpickled. A folder made
with other settings (or other subsets: the manifest keeps a SHA-256 of the (M, N) masks) is refused
with :class:`StoreMismatchError` naming the fields that differ; a damaged subset file is named, never
retrained silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, StoreMismatchError

__all__ = ["SubsetStore", "masks_sha256"]

_STORE_FORMAT = "tangentlens.lds.subsets"
_STORE_VERSION = 1
_MANIFEST = "manifest.json"
_SETTINGS = ("format", "version", "n_train", "alpha", "n_subsets", "seed")


def masks_sha256(masks: np.ndarray) -> str:
    """SHA-256 (hex) of an (M, N) boolean subset mask: its shape and its bit-packed rows. Cost O(M·N)."""
    h = hashlib.sha256()
    h.update(f"{masks.shape[0]}x{masks.shape[1]}:".encode())
    h.update(np.packbits(masks, axis=1).tobytes())
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class SubsetStore:
    """One folder of finished subsets for the M seeded subsets ``masks`` drawn with ``alpha`` and ``seed``.

    Opening creates the folder and writes its manifest if it is new, and otherwise checks that the
    stored manifest matches these settings.

    Args:
        folder: The store's folder (created if missing).
        masks: (M, N) bool, row m the training points of subset m.
        alpha: Fraction of the training set in each subset (recorded in the manifest).
        seed: The seed the subsets were drawn from (recorded in the manifest).

    Raises:
        InputError: ``folder`` is a file, or holds subset files without a manifest.
        StoreMismatchError: the manifest is unreadable or records other settings (or other subsets).
    """

    def __init__(self, folder: Path, masks: np.ndarray, *, alpha: float, seed: int) -> None:
        self.folder = folder
        self.masks = masks
        self.manifest: dict[str, Any] = {
            "format": _STORE_FORMAT,
            "version": _STORE_VERSION,
            "n_train": int(masks.shape[1]),
            "alpha": alpha,
            "n_subsets": int(masks.shape[0]),
            "seed": seed,
            "subsets_sha256": masks_sha256(masks),
        }
        if folder.exists() and not folder.is_dir():
            raise InputError(f"cache_dir {str(folder)!r} is a file; pass a folder path.")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / _MANIFEST
        if path.exists():
            self._check_manifest(path)
            return
        if any(folder.glob("subset_*.npz")):
            raise InputError(
                f"cache_dir {str(folder)!r} holds subset files but no {_MANIFEST}; it was not made by "
                f"this harness (or the manifest was deleted). Use an empty or new folder."
            )
        text = json.dumps(self.manifest, indent=2, sort_keys=True) + "\n"
        _write_atomic(path, lambda f: f.write(text.encode()))

    def _check_manifest(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StoreMismatchError(
                f"{path} is not a readable JSON manifest ({e}); use a new cache_dir."
            ) from e
        if not isinstance(stored, dict):
            raise StoreMismatchError(f"{path} is not a manifest of this harness; use a new cache_dir.")
        mine = self.manifest
        diffs = [
            f"{key}: the store has {stored.get(key)!r}, this call has {mine[key]!r}"
            for key in _SETTINGS
            if stored.get(key) != mine[key]
        ]
        if not diffs and stored.get("subsets_sha256") != mine["subsets_sha256"]:
            diffs.append(
                "subsets_sha256: the same settings draw different subsets here than when the store was "
                "made (a different numpy random stream?)"
            )
        if diffs:
            raise StoreMismatchError(
                f"cache_dir {str(self.folder)!r} was made with other settings; " + "; ".join(diffs)
                + ". Pass the store's settings to continue it, or use a new cache_dir for these."
            )

    def _path(self, m: int) -> Path:
        return self.folder / f"subset_{m:06d}.npz"

    def load(self) -> dict[int, np.ndarray]:
        """The outputs of every finished subset, ``{m: (n_targets,) float64}``. Cost: one file read each.

        Raises:
            StoreMismatchError: a subset file cannot be read, holds another subset, outputs that are
                not (n_targets,) float64, or a different number of targets than the other files.
        """
        done: dict[int, np.ndarray] = {}
        for m in range(self.masks.shape[0]):
            if self._path(m).exists():
                done[m] = self._read(m, next(iter(done.values())).shape[0] if done else None)
        return done

    def _read(self, m: int, expected: int | None) -> np.ndarray:
        path = self._path(m)
        try:
            with np.load(path, allow_pickle=False) as z:
                indices = np.asarray(z["indices"])
                outputs = np.asarray(z["outputs"])
        except Exception as e:  # a damaged file: say which, never retrain silently
            raise StoreMismatchError(f"{path} cannot be read ({e}); delete it to retrain subset {m}.") from e
        if not np.array_equal(indices, np.flatnonzero(self.masks[m])):
            raise StoreMismatchError(
                f"{path} holds a different subset than subset {m} of these settings; delete it to retrain."
            )
        if outputs.dtype != np.float64 or outputs.ndim != 1:
            raise StoreMismatchError(f"{path} holds outputs of dtype {outputs.dtype} and shape "
                                     f"{outputs.shape}, not (n_targets,) float64; delete it to retrain.")
        if expected is not None and outputs.shape[0] != expected:
            raise StoreMismatchError(
                f"{path} holds {outputs.shape[0]} outputs but other subsets hold {expected}; the store "
                f"mixes different output_fns. Use a new cache_dir."
            )
        return outputs

    def save(self, m: int, outputs: np.ndarray) -> None:
        """Write subset m's (n_targets,) float64 ``outputs`` (and its indices) atomically."""
        indices = np.flatnonzero(self.masks[m]).astype(np.int64)
        _write_atomic(self._path(m), lambda f: np.savez(f, indices=indices, outputs=outputs))
