"""``featurize``: stream a model's feature rows into a :class:`~tangentlens.store.FeatureStore`, resumably."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Unpack

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..api import KernelOptions
from ..api import _config as resolve_config
from ..config import KernelConfig
from ..errors import InputError
from ..features import Featurizer
from ..inputs import Batch, Block, Source, slice_batch
from ..kinds import check_options
from ..network import check_materialized
from ..probes import LabelSpec, labels_mode
from .features import FeatureStore
from .fingerprint import data_fingerprint, model_fingerprint
from .recipe import DataRecipe, ModelRecipe

__all__ = ["featurize", "chunk_features", "chunks_of"]

Progress = Callable[[int, int], None]


def featurize(
    model: nn.Module | ModelRecipe,
    data: Any,
    store: str | os.PathLike[str],
    *,
    labels: LabelSpec = None,
    config: KernelConfig | None = None,
    resume: bool = True,
    model_id: str | None = None,
    chunk_rows: int | None = None,
    block_size: int | None = None,
    progress: Progress | None = None,
    scheduler: Any = None,
    **options: Unpack[KernelOptions],
) -> FeatureStore:
    """Compute the feature rows of ``data`` (what :func:`tangentlens.features` returns, unnormalized) into
    a Zarr store at ``store``, chunk by chunk, and return the finished :class:`FeatureStore`.

    One :class:`~tangentlens.Featurizer` serves the whole run. Each chunk of ``chunk_rows`` examples is
    captured in blocks of the planned (or given) capture size, written with its squared norms (the raw
    kernel's diagonal), then marked done. A run that stops (an error, a kill, a lost machine) is resumed by
    calling ``featurize`` again with the same arguments: finished chunks are kept, at most the chunks that
    were in flight are recomputed, and because the capture size of the first run is recorded and reused the
    finished store is bit-identical to an uninterrupted run. Reopening checks that the configuration
    (every field that defines the result), the model (a SHA-256 of its parameters and buffers, or
    ``model_id``), the data (a SHA-256 of the inputs, and of the labels for the label kinds), the label
    mode and ``chunk_rows`` are those the store was made with.

    Rows are raw: for a normalizing config (e.g. ``kind="trntk"`` or ``normalize=True``) the kernel of the
    store (:func:`tangentlens.kernel_from_store`) normalizes from the stored diagonals.

    With ``scheduler`` the chunks run as tasks on a ``dask.distributed`` cluster (extra
    ``tangentlens[distributed]``), one task per chunk: the first chunk alone plans the capture size and
    records it with the row shape, then the other chunks fan out, each worker capturing in blocks of the
    recorded size and writing its chunk straight into the store (the path must be the same on every
    worker: a shared file system), flag after data. The result is bit-identical to the single-process run
    with the same block size and resumes the same way (a lost worker costs time: its chunks are sent again;
    a lost client costs at most the chunks in flight). The client reads the data and sends each chunk to a
    worker, at most two per worker thread in flight (with a :class:`~tangentlens.DataRecipe` it sends only
    the chunk's index range, and the worker reads the examples itself). See
    :mod:`tangentlens.store.distributed`.

    Args:
        model: the network, as in :func:`tangentlens.kernel`, or a :class:`~tangentlens.ModelRecipe`
            (factory + checkpoint) that the client and every worker build it from. With ``scheduler`` an
            ``nn.Module`` is pickled to the workers; a recipe sends only the factory's name and the
            checkpoint's path.
        data: tensor, dict of tensors, (inputs, labels) pair, Dataset or non-shuffling DataLoader; or a
            :class:`~tangentlens.DataRecipe` that the client and (with ``scheduler``) every worker build the
            data from, so that workers read their own chunks instead of receiving them.
        store: the store's directory (new, empty, or a store of this run to resume).
        labels: labels for ``"gradcos"`` / ``"margin"`` (a tensor, or ``"predicted"``).
        config: a :class:`~tangentlens.KernelConfig`; the keyword options override its fields.
        resume: continue (or return) an existing store at ``store``; ``False`` refuses an existing one.
        model_id: a name for the model's weights used instead of hashing them (e.g. a checkpoint's hash);
            the caller vouches that the same id means the same weights.
        chunk_rows: examples per chunk (the unit of resume); default ``config.batch_size`` (a DataLoader's
            own batch size for a DataLoader), or the stored value on resume.
        block_size: examples per capture; default: the memory plan's choice, recorded on the first chunk
            and reused on resume.
        progress: called as ``progress(done_chunks, n_chunks)`` once at the start and after each chunk.
        scheduler: a ``dask.distributed`` scheduler address (``"tcp://host:8786"``), ``Client`` or cluster
            (e.g. a ``LocalCluster``) to run the chunks on; ``None``: this process.
        **options: the config's fields as keywords (see :func:`tangentlens.kernel`).

    Returns:
        The complete :class:`FeatureStore`.

    Cost: one pass over the data for its fingerprint (O(bytes)), then the capture cost of
    :func:`tangentlens.features` for the chunks not done; memory: one chunk of rows plus one capture block.

    Raises:
        StoreMismatchError: the store at ``store`` was made by another configuration, model, data, label
            mode, ``chunk_rows`` or ``block_size`` (the message names the field and both values).
        InputError: ``resume=False`` with an existing store, a path that is not a store, bad arguments,
            ``scheduler`` without dask installed or an unreachable scheduler; and what
            :func:`tangentlens.features` raises.
    """
    recipe = model if isinstance(model, ModelRecipe) else None
    if recipe is not None:
        model = recipe.build()
    data_recipe = data if isinstance(data, DataRecipe) else None
    if data_recipe is not None:
        data = data_recipe.build()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module or a tangentlens.ModelRecipe; got "
                         f"{type(model).__name__}.")
    cfg = resolve_config(model, config, options)
    check_options(cfg.spec, labels=labels)
    lab, pred = labels_mode(labels)
    if model_id is not None and (not isinstance(model_id, str) or not model_id):
        raise InputError(f"model_id must be a non-empty string; got {model_id!r}.")
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a callable taking (done, total); got {progress!r}.")
    check_materialized(model)
    if chunk_rows is None and isinstance(data, DataLoader) and data.batch_size:
        chunk_rows = int(data.batch_size)
    rows = cfg.batch_size if chunk_rows is None else chunk_rows
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise InputError(f"chunk_rows must be a positive integer; got {chunk_rows!r}.")
    src = Source(data, rows, lab, "data")
    if scheduler is None:
        return _run(model, None, None, src, data, None, store, cfg, lab, pred, chunk_rows, model_id,
                    block_size, resume, progress)
    from .distributed import connect

    with connect(scheduler) as client:  # before the data are hashed: a bad address fails fast
        return _run(model, recipe, client, src, data, data_recipe, store, cfg, lab, pred, chunk_rows,
                    model_id, block_size, resume, progress)


def _run(model: nn.Module, recipe: ModelRecipe | None, client: Any, src: Source, data: Any,
         data_recipe: DataRecipe | None, store: str | os.PathLike[str], cfg: KernelConfig, lab: Any,
         pred: bool, chunk_rows: int | None, model_id: str | None, block_size: int | None, resume: bool,
         progress: Progress | None) -> FeatureStore:
    """Open (or create) the store and compute its missing chunks, here or on ``client``'s cluster."""
    with_labels = cfg.spec.needs_labels and not pred
    mode = "predicted" if pred else ("true" if cfg.spec.needs_labels else "none")
    fs = FeatureStore.create(
        store, config=cfg, n=len(src), chunk_rows=chunk_rows,
        model_fingerprint=model_fingerprint(model) if model_id is None else "id:" + model_id,
        data_fingerprint=data_fingerprint(src, with_labels), labels=mode, block_size=block_size,
        resume=resume,
    )
    if fs.complete:
        return fs
    rows = fs.chunk_rows
    if rows != src.batch_size:
        src = Source(data, rows, lab, "data")
    forced = fs.block_size if fs.block_size is not None else block_size
    # the featurizer reads each chunk as one block (batch_size = chunk rows) and captures it in blocks of
    # the planned / forced size; rows are raw (the kernel normalizes from the stored diagonals)
    fcfg = cfg.replace(normalize=False, batch_size=rows)
    if client is not None:
        from .distributed import featurize_on_cluster, recipe_chunks

        chunks = (chunks_of(src, rows) if data_recipe is None
                  else recipe_chunks(data_recipe, len(src), rows, lab))
        fs = featurize_on_cluster(client, recipe if recipe is not None else model, model, fs, fcfg, pred,
                                  forced, chunks, progress)
        fs.finish()
        return fs
    pending = set(fs.pending())
    total = fs.n_chunks
    if progress is not None:
        progress(total - len(pending), total)
    with Featurizer(model, fcfg, predicted=pred, block_size=forced) as f:
        for k, chunk in enumerate(chunks_of(src, rows)):
            if k not in pending:
                continue
            out = chunk_features(f, chunk)
            fs.allocate(tuple(out.shape[1:]), out.dtype, block_size=f.planned_block_size)
            fs.write_chunk(k, out)
            pending.discard(k)
            if progress is not None:
                progress(total - len(pending), total)
    fs.finish()
    return fs


def chunk_features(f: Featurizer, chunk: Block) -> torch.Tensor:
    """The raw feature rows of one chunk: its examples captured in blocks of ``f``'s planned (or forced)
    size and joined — the one computation of a chunk, in this process or on a Dask worker."""
    parts = [r for _, r in f.blocks(chunk.x, chunk.y)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def chunks_of(src: Source, rows: int) -> Iterator[Block]:
    """``src``'s examples as consecutive blocks of exactly ``rows`` examples (the last one shorter), joining
    or splitting the source's own blocks (a DataLoader's batches) as needed."""
    buf: list[Block] = []
    have = start = 0
    for blk in src.blocks():
        pos, size = 0, blk.size
        while pos < size:
            take = min(rows - have, size - pos)
            if pos == 0 and take == size:
                buf.append(blk)
            else:
                y = None if blk.y is None else blk.y[pos : pos + take]
                buf.append(Block(blk.start + pos, slice_batch(blk.x, pos, pos + take), y))
            have += take
            pos += take
            if have == rows:
                yield _join(buf, start)
                start += rows
                buf, have = [], 0
    if buf:
        yield _join(buf, start)


def _join(parts: list[Block], start: int) -> Block:
    if len(parts) == 1:
        p = parts[0]
        return p if p.start == start else Block(start, p.x, p.y)
    try:
        x: Batch
        if isinstance(parts[0].x, Mapping):
            first = parts[0].x
            x = {k: torch.cat([p.x[k] for p in parts]) if isinstance(v, torch.Tensor) and v.dim() > 0  # type: ignore[index]
                 else v for k, v in first.items()}
        else:
            x = torch.cat([p.x for p in parts])  # type: ignore[misc]
    except RuntimeError as e:
        raise InputError(
            f"The data's blocks cannot be joined into chunks ({e}); pass chunk_rows= equal to the "
            "DataLoader's batch size (or a divisor of it)."
        ) from None
    ys = [p.y for p in parts]
    y = None if any(v is None for v in ys) else torch.cat([torch.as_tensor(v) for v in ys])  # type: ignore[misc]
    return Block(start, x, y)
