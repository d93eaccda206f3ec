"""Memory: what a device has available now, byte figures for messages, and one call's memory budget."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import InputError, MemoryBudgetError

_CHECK_FLOOR = 64 * 2**20  # allocations below this are never checked against the free memory


def available_bytes(device: torch.device | str) -> int | None:
    """Memory an allocation on ``device`` can use now, in bytes; ``None`` when it cannot be told.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (free plus reclaimable cache), capped by a cgroup v2 limit
    (``memory.max - memory.current``); else the free physical pages. CUDA: the device's free memory plus
    what PyTorch's caching allocator holds unused.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
        except (RuntimeError, AssertionError):  # pragma: no cover - no CUDA runtime
            return None
    if dev.type != "cpu":
        return None
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                used = int(f.read().strip())
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return avail


def format_bytes(n: float) -> str:
    """Bytes as a short human figure: '512 bytes', '3.2 MiB', '1.50 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_memory(
    nbytes: int, device: torch.device | str, what: str, fix: str | Callable[[int], str]
) -> None:
    """Raise before allocating ``nbytes`` on ``device`` if they exceed the memory available there.

    Args:
        nbytes: the size of the allocation (or working set) about to be made.
        device: where it would live.
        what: what would be allocated, for the message.
        fix: what to change, for the message (a callable gets the available bytes).

    Raises:
        MemoryBudgetError: ``nbytes`` exceeds :func:`available_bytes` (allocations under 64 MiB, and
            devices whose free memory cannot be told, are never refused).
    """
    if nbytes <= _CHECK_FLOOR:
        return
    avail = available_bytes(device)
    if avail is not None and nbytes > avail:
        text = fix(avail) if callable(fix) else fix
        raise MemoryBudgetError(
            f"{what} would need {format_bytes(nbytes)} but only {format_bytes(avail)} are available on "
            f"{torch.device(device)}; nothing was allocated. {text[0].upper() + text[1:]}."
        )


@dataclass(frozen=True)
class Budget:
    """One call's memory budget, split between the column-capture cache and one block's working set."""

    total: int
    cache: int
    work: int


def resolve_budget(memory_budget: int | None, cache_bytes: int | None, device: torch.device) -> Budget:
    """Resolve the memory budget: ``memory_budget`` bytes, or a quarter of the memory available now on
    ``device`` (at least 512 MiB; 4 GiB where it cannot be told). Half of it bounds the working set of a
    block, the other half (or ``cache_bytes``) the cache of captures."""
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
            raise InputError(f"memory_budget must be a positive number of bytes; got {memory_budget!r}.")
        total = memory_budget
    else:
        avail = available_bytes(device)
        total = max(avail // 4, 2**29) if avail is not None else 4 * 2**30
    if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                    or cache_bytes < 0):
        raise InputError(f"cache_bytes must be a non-negative number of bytes; got {cache_bytes!r}.")
    cache = total // 2 if cache_bytes is None else cache_bytes
    return Budget(total, cache, max(total - total // 2, 1))
