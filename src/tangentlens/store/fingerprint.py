"""Fingerprints of what a store's contents depend on: the model's weights and the data (inputs and labels).

Both are SHA-256 digests streamed over raw bytes, never over pickles: the model's over every parameter and
buffer (name, dtype, shape, bytes), the data's over the inputs' bytes block by block (one digest per input
tensor, so the result does not depend on how the data are split into blocks) and, for the label kinds, the
labels'. Hashing runs at several hundred MB/s — cheap next to the gradients the store holds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..inputs import Source

__all__ = ["model_fingerprint", "data_fingerprint", "tensor_bytes", "shorten"]


def tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bfloat16 included), row-major, from the CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """``"sha256:<hex>"`` over every parameter and buffer of ``model``: name, dtype, shape and bytes.

    Every weight counts, differentiated or not (a frozen layer's weights change the others' gradients).
    Cost: one read of the model's state, O(parameters + buffers) bytes.
    """
    h = hashlib.sha256()
    items = [("p", n, t) for n, t in model.named_parameters()]
    items += [("b", n, t) for n, t in model.named_buffers()]
    for what, name, t in items:
        h.update(f"{what}:{name}:{str(t.dtype)}:{tuple(t.shape)}\n".encode())
        h.update(tensor_bytes(t))
    return "sha256:" + h.hexdigest()


class _Stream:
    """One input tensor's digest: its bytes in row order plus the runs of its per-example shape."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.dtype: str | None = None
        self.runs: list[list[Any]] = []  # [per-example shape, rows] runs

    def update(self, t: Tensor) -> None:
        dtype = str(t.dtype)
        if self.dtype is None:
            self.dtype = dtype
        elif self.dtype != dtype:
            self.dtype = f"{self.dtype}|{dtype}" if dtype not in self.dtype.split("|") else self.dtype
        shape = list(t.shape[1:])
        if self.runs and self.runs[-1][0] == shape:
            self.runs[-1][1] += int(t.shape[0])
        else:
            self.runs.append([shape, int(t.shape[0])])
        self.hash.update(tensor_bytes(t))

    def summary(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shapes": self.runs, "sha256": self.hash.hexdigest()}


def data_fingerprint(src: Source, with_labels: bool) -> str:
    """``"sha256:<hex>"`` of a data set read as blocks: the inputs' bytes (a dict's tensors by key) and,
    with ``with_labels``, the labels'. The same data split into other blocks give the same fingerprint.

    Args:
        src: the data (any :class:`~tangentlens.inputs.Source`).
        with_labels: include the labels (the label kinds: their features depend on them).

    Cost: one pass over the data, O(bytes).
    """
    streams: dict[str, _Stream] = {}
    labels = _Stream()
    n = 0
    for blk in src.blocks():
        x = blk.x
        parts: Mapping[str, Any] = x if isinstance(x, Mapping) else {"": x}
        for key in sorted(parts):
            v = parts[key]
            if isinstance(v, Tensor):
                streams.setdefault(key, _Stream()).update(v)
        if with_labels and blk.y is not None:
            labels.update(torch.as_tensor(blk.y))
        n += blk.size
    summary = {"n": n, "inputs": {k: s.summary() for k, s in sorted(streams.items())}}
    if with_labels:
        summary["labels"] = labels.summary() if labels.runs else None
    return "sha256:" + hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def shorten(value: Any, width: int = 60) -> str:
    """A value as at most ``width`` characters for an error message (long digests keep their start)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"
