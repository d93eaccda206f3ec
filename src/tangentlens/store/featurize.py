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

__all__ = ["featurize"]

Progress = Callable[[int, int], None]


def featurize(
    model: nn.Module,
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

    Args:
        model: the network, as in :func:`tangentlens.kernel`.
        data: tensor, dict of tensors, (inputs, labels) pair, Dataset or non-shuffling DataLoader.
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
        **options: the config's fields as keywords (see :func:`tangentlens.kernel`).

    Returns:
        The complete :class:`FeatureStore`.

    Cost: one pass over the data for its fingerprint (O(bytes)), then the capture cost of
    :func:`tangentlens.features` for the chunks not done; memory: one chunk of rows plus one capture block.

    Raises:
        StoreMismatchError: the store at ``store`` was made by another configuration, model, data, label
            mode, ``chunk_rows`` or ``block_size`` (the message names the field and both values).
        InputError: ``resume=False`` with an existing store, a path that is not a store, bad arguments;
            and what :func:`tangentlens.features` raises.
    """
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
    pending = set(fs.pending())
    total = fs.n_chunks
    if progress is not None:
        progress(total - len(pending), total)
    forced = fs.block_size if fs.block_size is not None else block_size
    # the featurizer reads each chunk as one block (batch_size = chunk rows) and captures it in blocks of
    # the planned / forced size; rows are raw (the kernel normalizes from the stored diagonals)
    fcfg = cfg.replace(normalize=False, batch_size=rows)
    with Featurizer(model, fcfg, predicted=pred, block_size=forced) as f:
        for k, chunk in enumerate(chunks_of(src, rows)):
            if k not in pending:
                continue
            parts = [r for _, r in f.blocks(chunk.x, chunk.y)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            fs.allocate(tuple(out.shape[1:]), out.dtype, block_size=f.planned_block_size)
            fs.write_chunk(k, out)
            pending.discard(k)
            if progress is not None:
                progress(total - len(pending), total)
    fs.finish()
    return fs


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
