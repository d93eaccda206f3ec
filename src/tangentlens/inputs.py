"""Input adapters: every accepted form of data becomes an iterator over blocks of examples.

Accepted forms (``inputs`` / ``other`` of :func:`tangentlens.kernel`):

* a tensor ``X`` of shape (N, ...);
* a mapping of tensors with a shared first dimension (Hugging Face-style batches: ``input_ids``,
  ``attention_mask``, ...); the model is called as ``model(**batch)``;
* a pair ``(X, y)`` whose first element is one of the above and whose second element holds labels;
* a :class:`torch.utils.data.Dataset` whose items are ``x`` or ``(x, y, ...)`` (collated with PyTorch's
  default collate function);
* a :class:`torch.utils.data.DataLoader` that does not shuffle (its batches are used as blocks).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from .errors import InputError

Batch = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class Block:
    """A contiguous block of examples: rows ``start : start + size`` of the data."""

    start: int
    x: Batch
    y: torch.Tensor | None

    @property
    def size(self) -> int:
        return batch_size_of(self.x)

    def split(self, size: int) -> Iterator[Block]:
        """Consecutive sub-blocks of at most ``size`` examples (this block itself if it fits)."""
        n = self.size
        if n <= size:
            yield self
            return
        for s in range(0, n, size):
            e = min(s + size, n)
            yield Block(self.start + s, slice_batch(self.x, s, e), None if self.y is None else self.y[s:e])


def batch_size_of(x: Batch) -> int:
    """Number of examples in a batch (first dimension)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise InputError("Inputs must have a leading batch dimension; got a 0-d tensor.")
        return int(x.shape[0])
    if isinstance(x, Mapping):
        sizes = {int(v.shape[0]) for v in x.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if len(sizes) != 1:
            raise InputError(
                "All tensors of a dict batch must share their first (batch) dimension; got sizes "
                f"{sorted(sizes)}."
            )
        return sizes.pop()
    raise InputError(f"Unsupported batch type {type(x).__name__}; pass a tensor or a dict of tensors.")


def slice_batch(x: Batch, start: int, stop: int) -> Batch:
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    return {k: (v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in x.items()}


def move_batch(x: Batch, device: torch.device | None, dtype: torch.dtype | None) -> Batch:
    """Move a batch to ``device``; cast floating tensors (not integer token ids or masks) to ``dtype``."""

    def mv(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    if isinstance(x, torch.Tensor):
        return mv(x)
    return {k: mv(v) for k, v in x.items()}


def _as_label_tensor(y: Any, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(y)
    if t.dim() == 0 or int(t.shape[0]) != n:
        raise InputError(
            f"{what} has {0 if t.dim() == 0 else int(t.shape[0])} entries but the data has {n} examples; "
            "pass one label per example."
        )
    return t


class Source:
    """A re-iterable view of a data set as blocks of at most ``batch_size`` examples.

    Args:
        data: any accepted input form (see module docstring).
        batch_size: block size for tensors, mappings and datasets (a DataLoader keeps its own).
        labels: optional labels overriding those carried by ``data``.
        name: how error messages refer to this data ("inputs" or "other").
    """

    def __init__(self, data: Any, batch_size: int, labels: Any = None, name: str = "inputs") -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer; got {batch_size!r}.")
        self.name = name
        self.batch_size = batch_size
        self._loader: DataLoader | None = None
        self._dataset: Dataset | None = None
        self._x: Batch | None = None
        self._y: torch.Tensor | None = None
        self._has_labels: bool | None = None
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler) and data.batch_sampler is not None:
                if not isinstance(data.batch_sampler.sampler, SequentialSampler):
                    raise InputError(
                        f"The DataLoader passed as {name} shuffles or samples; kernel rows would come out "
                        "in a random order. Pass a DataLoader with shuffle=False (or the Dataset itself)."
                    )
            self._loader = data
            try:
                self.n = len(data.dataset)  # type: ignore[arg-type]
            except TypeError:
                self.n = sum(batch_size_of(self._split(b)[0]) for b in data)
        elif isinstance(data, Dataset) and not isinstance(data, torch.Tensor):
            self._loader = DataLoader(data, batch_size=batch_size, shuffle=False)
            self._dataset = data
            self.n = len(data)  # type: ignore[arg-type]
        elif isinstance(data, (tuple, list)):
            if len(data) != 2:
                raise InputError(
                    f"A tuple/list passed as {name} must be (inputs, labels); got {len(data)} elements."
                )
            self._x = self._check_batch(data[0])
            self.n = batch_size_of(self._x)
            self._y = _as_label_tensor(data[1], self.n, f"The labels paired with {name}")
        else:
            self._x = self._check_batch(data)
            self.n = batch_size_of(self._x)
        if labels is not None:
            self._y = _as_label_tensor(labels, self.n, f"labels for {name}")
            self._labels_override = True
        else:
            self._labels_override = False
        if self.n == 0:
            raise InputError(f"{name} is empty; pass at least one example.")

    def _check_batch(self, x: Any) -> Batch:
        if isinstance(x, torch.Tensor):
            self._check_not_meta(x)
            return x
        if isinstance(x, Mapping):
            if not x:
                raise InputError(f"{self.name} is an empty dict; pass a dict of tensors.")
            for v in x.values():
                if isinstance(v, torch.Tensor):
                    self._check_not_meta(v)
            return dict(x)
        try:
            import numpy as np

            if isinstance(x, np.ndarray):
                return torch.from_numpy(x)
        except ImportError:  # pragma: no cover
            pass
        raise InputError(
            f"Unsupported {self.name} of type {type(x).__name__}: pass a tensor, a dict of tensors, an "
            "(inputs, labels) pair, a Dataset or a non-shuffling DataLoader."
        )

    def _check_not_meta(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            raise InputError(
                f"{self.name} is a tensor on the 'meta' device (a shape without values); pass a tensor with "
                "data, e.g. created on 'cpu'."
            )

    @property
    def yields_labels(self) -> bool:
        """Whether the blocks carry labels: ``labels=`` given, an ``(inputs, labels)`` pair, or a Dataset /
        DataLoader whose items are ``(x, y, ...)`` or dicts with a ``"labels"`` key (found by reading its
        first item or batch, once)."""
        if self._y is not None:
            return True
        if self._loader is None:
            return False
        if self._has_labels is None:
            first: Any = None
            if self._dataset is not None:
                try:
                    first = self._dataset[0]
                except Exception:  # noqa: BLE001 - e.g. an IterableDataset: read a batch instead
                    first = None
            if first is None:
                first = next(iter(self._loader), None)
            self._has_labels = first is not None and self._split(first)[1] is not None
        return self._has_labels

    @staticmethod
    def _split(batch: Any) -> tuple[Batch, torch.Tensor | None]:
        if isinstance(batch, (tuple, list)):
            if len(batch) == 0:
                raise InputError("A data item is an empty tuple.")
            y = batch[1] if len(batch) > 1 else None
            return batch[0], (torch.as_tensor(y) if y is not None else None)
        if isinstance(batch, Mapping) and "labels" in batch:
            rest = {k: v for k, v in batch.items() if k != "labels"}
            return rest, torch.as_tensor(batch["labels"])
        return batch, None

    def __len__(self) -> int:
        return self.n

    def blocks(self) -> Iterator[Block]:
        """Yield the data as consecutive blocks (same blocks every call)."""
        if self._loader is None:
            assert self._x is not None
            for s in range(0, self.n, self.batch_size):
                e = min(s + self.batch_size, self.n)
                yield Block(s, slice_batch(self._x, s, e), None if self._y is None else self._y[s:e])
            return
        start = 0
        for batch in self._loader:
            x, y = self._split(batch)
            if not isinstance(x, (torch.Tensor, Mapping)):
                x = default_collate(x)
            b = batch_size_of(x)
            if self._labels_override:
                assert self._y is not None
                y = self._y[start : start + b]
            yield Block(start, x, y)
            start += b
        if start != self.n:
            raise InputError(f"{self.name} yielded {start} examples but reports a length of {self.n}.")
