"""Kernels out of core: K = Φ_a Φ_bᵀ from two feature stores, block by block into a Zarr array.

Layout of a kernel store (``path/``)::

    zarr.json   the manifest: format, version, the row and column stores (path, config / model / data
                fingerprints, n), symmetric, normalized, block_rows, block_cols, shape, dtype, versions,
                status
    kernel      (N, M) values ((N, M, C, C) for "entk"), one chunk per (block_rows, block_cols) block
    done        (⌈N/block_rows⌉, ⌈M/block_cols⌉) uint8, 1 once a block is written

Each block is Φ_a[I] Φ_b[J]ᵀ (a matrix product of two row blocks read from the feature stores), cosine-
normalized on request from the stored diagonals, K[i, j] / sqrt(d_a[i] d_b[j]) (:func:`cosine_normalize`),
written, then marked done; a stopped run resumes at the first block not done and gives the same bytes.
A symmetric kernel (one store) computes the blocks on and above the diagonal and writes each also
transposed, so it is exactly symmetric, and its normalized diagonal is exactly 1. Memory: two row blocks
of features plus a few (block_rows, block_cols) result blocks — never the whole kernel, nor whole features.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..blocks import cosine_normalize
from ..errors import InputError, StoreMismatchError
from ..features import feature_gram
from .features import FeatureStore
from .manifest import (
    COMPLETE,
    RUNNING,
    VERSION,
    check_identity,
    check_writer,
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

__all__ = ["KernelStore", "kernel_from_store", "FORMAT"]

FORMAT = "tangentlens.kernel"
IDENTITY = ("format", "rows", "cols", "symmetric", "normalized", "block_rows", "block_cols", "dtype")
_RESUME = ("Resume with the same feature stores and options, or write to a new path (or delete the kernel "
           "store to start over).")


def _side(fs: FeatureStore) -> dict[str, Any]:
    return {"path": str(fs.path.resolve()), **fs.identity}


def _feature_store(s: FeatureStore | str | os.PathLike[str], what: str) -> FeatureStore:
    if isinstance(s, FeatureStore):
        if not s.complete:
            FeatureStore.open(s.path)  # raises the incomplete-store error
        return s
    if isinstance(s, (str, os.PathLike)):
        return FeatureStore.open(s)
    raise InputError(f"{what} must be a FeatureStore or the path of one; got {type(s).__name__}.")


class KernelStore:
    """A kernel on disk, written by :func:`tangentlens.kernel_from_store`; ``store[i0:i1, j0:j1]`` reads
    entries, :meth:`iter_blocks` streams row blocks, :attr:`kernel` is the Zarr array."""

    def __init__(self, group: zarr.Group, path: Path, manifest: dict[str, Any]) -> None:
        self._group = group
        self.path = path
        self._manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_incomplete: bool = False,
             writable: bool = False) -> KernelStore:
        """Open a kernel store (read-only unless ``writable``: a distributed worker writing blocks; implies
        ``allow_incomplete``).

        Raises:
            InputError: no kernel store at ``path``, or its run did not finish (unless ``allow_incomplete``).
        """
        p = store_path(path, "path")
        group, manifest = open_group(p, FORMAT, create=False, writable=writable)
        assert manifest is not None
        ks = cls(group, p, manifest)
        if not (allow_incomplete or writable) and not ks.complete:
            done = ks.done()
            raise InputError(
                f"The kernel store at {str(p)!r} is incomplete: {int(done.sum())} of {done.size} blocks are "
                f"written. Resume it by calling tl.kernel_from_store(..., out={str(p)!r}) again with the "
                "same feature stores and options, or open it with allow_incomplete=True to inspect it.")
        return ks

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest (plain JSON values)."""
        return dict(self._manifest)

    @property
    def kernel(self) -> zarr.Array:
        """The (N, M) Zarr array ((N, M, C, C) for ``"entk"``)."""
        return self._group["kernel"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._manifest["shape"])

    @property
    def symmetric(self) -> bool:
        return bool(self._manifest["symmetric"])

    @property
    def normalized(self) -> bool:
        return bool(self._manifest["normalized"])

    def done(self) -> np.ndarray:
        """(row blocks, column blocks) booleans: which blocks are written."""
        return read_flags(self._group["done"])

    @property
    def complete(self) -> bool:
        """The run finished: status ``"complete"`` and every block's flag set."""
        return self._manifest.get("status") == COMPLETE and bool(self.done().all())

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.kernel[key])

    def entries(self, rows: np.ndarray | list[int], cols: np.ndarray | list[int]) -> np.ndarray:
        """K[rows[k], cols[k]] for each k ((len, C, C) for entk), read one stored block at a time (a
        random sample touches many blocks; reading them all at once would hold them all)."""
        r, c = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        if r.shape != c.shape or r.ndim != 1:
            raise InputError(f"rows and cols must be 1-D and of one length; got {r.shape} and {c.shape}.")
        n, m = self.shape[:2]
        if r.size and (r.min() < 0 or r.max() >= n or c.min() < 0 or c.max() >= m):
            raise InputError(f"entries out of range for a kernel of shape {(n, m)}.")
        br, bc = int(self._manifest["block_rows"]), int(self._manifest["block_cols"])
        out = np.empty((r.size, *self.shape[2:]), dtype=self.kernel.dtype)
        key = (r // br) * (-(-m // bc)) + c // bc
        for b in np.unique(key):
            sel = np.flatnonzero(key == b)
            i0, j0 = int(r[sel[0]] // br) * br, int(c[sel[0]] // bc) * bc
            block = np.asarray(self.kernel[i0 : i0 + br, j0 : j0 + bc])
            out[sel] = block[r[sel] - i0, c[sel] - j0]
        return out

    def iter_blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, K[start:start + rows])`` row blocks in order (default: ``block_rows`` rows)."""
        step = int(self._manifest["block_rows"]) if rows is None else rows
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise InputError(f"rows must be a positive integer; got {rows!r}.")
        for s in range(0, self.shape[0], step):
            yield s, np.asarray(self.kernel[s : s + step])

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (f"KernelStore({str(self.path)!r}, shape={self.shape}, normalized={self.normalized}, "
                f"symmetric={self.symmetric}, {state})")


def kernel_from_store(
    a: FeatureStore | str | os.PathLike[str],
    b: FeatureStore | str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    normalize: bool | None = None,
    block_rows: int = 2048,
    block_cols: int | None = None,
    resume: bool = True,
    progress: Callable[[int, int], None] | None = None,
    scheduler: Any = None,
) -> KernelStore:
    """The kernel K(a, b) = Φ_a Φ_bᵀ of two feature stores (Φ_a Φ_aᵀ without ``b``), written out of core.

    Entry (i, j) is ⟨φ(a_i), φ(b_j)⟩ (for ``"entk"`` stores, the (C, C) block ⟨φ_c(a_i), φ_c'(b_j)⟩),
    cosine-normalized on request from the stored diagonals: K[i, j] / sqrt(‖φ(a_i)‖² ‖φ(b_j)‖²) — equal
    (to floating-point rounding) to ``tl.kernel(model, a_data, b_data, ...)`` with the stores' options.
    The product runs in the features' dtype (float16 features in float32); the kernel is stored in that
    dtype. Symmetric kernels compute the upper block triangle and mirror it (exactly symmetric, exact unit
    diagonal when normalized).

    Args:
        a: the row store (a complete :class:`FeatureStore` or its path).
        b: the column store; ``None`` (or ``a`` itself) for the symmetric K(a, a).
        out: the kernel store's directory (new, or a kernel store of this computation to resume).
        normalize: cosine-normalize; ``None``: the stores' configuration decides (its ``normalize`` or its
            kind's default).
        block_rows, block_cols: rows and columns per block (a chunk of the result); ``block_cols``
            defaults to ``block_rows``. Memory: two blocks of feature rows, (block_rows + block_cols)·D
            values, and about six result blocks of block_rows·block_cols values (the product, its
            transposed copy and Zarr's write buffers): ≈ 100 MiB at the default 2048 in float32.
        resume: continue (or return) an existing kernel store at ``out``; ``False`` refuses one.
        progress: called as ``progress(done_blocks, total_blocks)`` at the start and after each block.
        scheduler: a ``dask.distributed`` scheduler address, ``Client`` or cluster: each block (tile) is a
            task that reads its two row blocks from the feature stores, writes the tile (and its mirror)
            into the kernel store and sets its flag — the same bytes as in one process. The stores' paths
            must be the same on every worker (a shared file system). ``None``: this process.

    Returns:
        The complete :class:`KernelStore`.

    Cost: 2·N·M·D flops (about half for a symmetric kernel), one read of Φ_a and ⌈N/block_rows⌉ reads of
    Φ_b, one write of N·M values.

    Raises:
        StoreMismatchError: the two stores come from different configurations or models, or the store at
            ``out`` was made from other stores or options (the message names the field).
        InputError: a feature store is incomplete, bad block sizes, ``resume=False`` with an existing store,
            ``scheduler`` without dask installed or an unreachable scheduler.
    """
    if scheduler is not None:
        from .distributed import connect

        with connect(scheduler) as client:
            return _kernel(a, b, out, normalize, block_rows, block_cols, resume, progress, client)
    return _kernel(a, b, out, normalize, block_rows, block_cols, resume, progress, None)


def _kernel(a: FeatureStore | str | os.PathLike[str], b: FeatureStore | str | os.PathLike[str] | None,
            out: str | os.PathLike[str], normalize: bool | None, block_rows: int, block_cols: int | None,
            resume: bool, progress: Callable[[int, int], None] | None, client: Any) -> KernelStore:
    fa = _feature_store(a, "a")
    fb = fa if b is None else _feature_store(b, "b")
    symmetric = fb is fa or _side(fb) == _side(fa)
    if not symmetric:
        check_identity(
            {**fa.manifest, "row_shape": list(fa.row_shape or ())},
            {**fb.manifest, "row_shape": list(fb.row_shape or ())},
            ("config_fingerprint", "model_fingerprint", "row_shape"),
            what=f"The column store {str(fb.path)!r} (compared with the row store {str(fa.path)!r})",
            fix="A kernel pairs feature stores made by the same model and configuration.")
        if {fa.manifest["labels"], fb.manifest["labels"]} == {"true", "predicted"}:
            raise StoreMismatchError("One store uses true labels and the other predicted labels; use the "
                                     "same label mode for both.")
    for name, v in (("block_rows", block_rows), ("block_cols", block_cols)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name} must be a positive integer; got {v!r}.")
    br = min(block_rows, fa.n)
    bc = min(block_cols if block_cols is not None else block_rows, fb.n)
    if symmetric:
        bc = br
    norm = fa.config.normalized if normalize is None else bool(normalize)
    dtype = "float64" if fa.dtype == np.float64 else "float32"
    full = fa.full
    C = fa.row_shape[0] if full and fa.row_shape else 0  # type: ignore[index]
    shape = (fa.n, fb.n, C, C) if full else (fa.n, fb.n)
    nbi, nbj = math.ceil(fa.n / br), math.ceil(fb.n / bc)
    given = {
        "format": FORMAT, "rows": _side(fa), "cols": _side(fb), "symmetric": symmetric, "normalized": norm,
        "block_rows": br, "block_cols": bc, "dtype": dtype,
    }
    p = store_path(out, "out")
    group, stored = open_group(p, FORMAT, create=True)
    if stored is not None:
        if not resume:
            raise InputError(f"A kernel store already exists at {str(p)!r}; pass resume=True to continue (or "
                             "reuse) it, or delete it / choose a new path.")
        def unplaced(m: dict[str, Any]) -> dict[str, Any]:  # the feature stores may have moved
            return {**m, **{s: {k: v for k, v in m[s].items() if k != "path"} for s in ("rows", "cols")}}

        check_identity(unplaced(stored), unplaced(given), IDENTITY, what=f"The kernel store at {str(p)!r}",
                       fix=_RESUME)
        ks = KernelStore(group, p, stored)
        if ks.complete:
            return ks
        check_writer(stored, what=f"The unfinished kernel store at {str(p)!r}",
                     fix="delete it to start over (or write to a new path).")
    else:
        manifest = {**given, "version": VERSION, "shape": list(shape), "versions": versions(),
                    "status": RUNNING, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        group.attrs.update(manifest)
        new_array(group, "kernel", shape, (br, bc, *shape[2:]), dtype)
        new_flags(group, "done", (nbi, nbj))
        ks = KernelStore(group, p, manifest)
    if client is None:
        _fill(ks, fa, fb, br, norm, symmetric, progress)
    else:
        from .distributed import kernel_on_cluster

        kernel_on_cluster(client, ks, fa, fb, norm, symmetric, progress)
    update = {"status": COMPLETE, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    group.attrs.update(update)
    ks._manifest.update(update)
    return ks


def _fill(ks: KernelStore, fa: FeatureStore, fb: FeatureStore, br: int, norm: bool, symmetric: bool,
          progress: Callable[[int, int], None] | None) -> None:
    """Compute and write every block not done yet, row block by row block."""
    done = ks.done()
    total = done.size
    count = int(done.sum())
    if progress is not None:
        progress(count, total)
    nbi, nbj = done.shape
    for i in range(nbi):
        cols = [j for j in range(i if symmetric else 0, nbj) if not done[i, j]]
        if not cols:
            continue
        A, da = row_block(fa, i, br)
        for j in cols:
            count += write_tile(ks, fa, fb, i, j, norm, symmetric, A, da)
            if progress is not None:
                progress(count, total)


def pending_tiles(ks: KernelStore) -> list[tuple[int, int]]:
    """The (row block, column block) tiles not written yet (on and above the diagonal when symmetric)."""
    done = ks.done()
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(~done)) if not (ks.symmetric and j < i)]


def row_block(fs: FeatureStore, i: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row block ``i`` of ``fs`` (``rows`` rows per block) and its squared norms, as tensors."""
    ri = slice(i * rows, min((i + 1) * rows, fs.n))
    A = _tensor(fs.features[ri])
    return A, torch.from_numpy(np.asarray(fs.sqnorms[ri])).to(A.dtype)


def write_tile(ks: KernelStore, fa: FeatureStore, fb: FeatureStore, i: int, j: int, norm: bool,
               symmetric: bool, A: torch.Tensor | None = None, da: torch.Tensor | None = None) -> int:
    """Compute tile (i, j) = Φ_a[I] Φ_b[J]ᵀ (normalized with ``norm``), write it (and its transpose at (j, i)
    when ``symmetric``), then mark it done; return the number of blocks marked (1 or 2). ``A``, ``da``: row
    block ``i`` of ``fa`` if already read. The one computation of a tile, here or on a Dask worker."""
    br, bc = int(ks.manifest["block_rows"]), int(ks.manifest["block_cols"])
    if A is None or da is None:
        A, da = row_block(fa, i, br)
    ri, rj = slice(i * br, min((i + 1) * br, fa.n)), slice(j * bc, min((j + 1) * bc, fb.n))
    same = symmetric and i == j
    B, db = (A, da) if same else row_block(fb, j, bc)
    block = feature_gram(A, None if same else B, fa.full)
    if norm:
        cosine_normalize(block, da, db, unit_diagonal=same)
    if same:  # exactly symmetric: the upper triangle mirrored
        block = _mirror(block)
    values = block.numpy()
    K, flags = ks.kernel, ks._group["done"]
    K[ri, rj] = values
    if symmetric and not same:
        K[rj, ri] = values.swapaxes(0, 1).swapaxes(2, 3) if values.ndim == 4 else values.T
        mark_done(flags, (j, i))
    mark_done(flags, (i, j))
    return 1 + (symmetric and not same)


def _tensor(x: Any) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float() if t.dtype == torch.float16 else t


def _mirror(block: torch.Tensor, strip: int = 256) -> torch.Tensor:
    """A diagonal block made exactly symmetric from its upper triangle, in place, a strip of rows at a time
    (per class pair for entk: K[j, i, c', c] = K[i, j, c, c'])."""
    n = block.shape[0]
    full = block.dim() == 4

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.permute(1, 0, 3, 2) if full else x.T

    for s in range(0, n, strip):
        e = min(s + strip, n)
        if s:
            block[s:e, :s] = t(block[:s, s:e])
        sq = block[s:e, s:e]
        iu = torch.triu_indices(e - s, e - s, 1)
        sq[iu[1], iu[0]] = sq[iu[0], iu[1]].transpose(-1, -2) if full else sq[iu[0], iu[1]]
        if full:
            idx = torch.arange(e - s)
            d = sq[idx, idx]
            sq[idx, idx] = torch.triu(d) + torch.triu(d, 1).transpose(-1, -2)
    return block
