"""What every projection kind shares: its options, its tile cache, row-stable GEMMs, and the backend base.

A :class:`Projection <tangentlens.projection.Projection>` holds one backend object for its kind. A flat
backend (:class:`FlatBackend`) maps a column slice ``g`` (``n x p``, columns ``[offset, offset + p)`` of a
``P``-vector) to ``g @ R[:, offset:offset + p].T``; the Kronecker backend adds the per-layer route from
captured factors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..errors import InputError
from ..memory import check_memory
from .hashing import GEN_VERSION, check_int, seed_words

__all__ = [
    "Spec", "TileCache", "Backend", "FlatBackend", "LayerFactors", "matmul_rows", "addmm_rows_", "row_step",
    "cache_rows", "column_panels", "layer_shapes",
]

MIN_GEMM_ROWS = 16  # BLAS uses other kernels (other summation orders) below this many rows
STEP_ELEMS = 2**24  # entries (64 MiB in float32) of the intermediates of one step of a layer projection
CACHE_ELEMS = 2**19  # entries (2 MiB in float32) of a cache-resident chunk of per-probe products
PANEL_COLS = 2048  # output columns of one such chunk (wider GEMMs run ~40% slower here)


class LayerFactors(NamedTuple):
    """One Linear/Conv layer's captured factors, for :meth:`Projection.project_layers
    <tangentlens.projection.Projection.project_layers>`: the fields ``a``, ``delta``, ``key``,
    ``weight_offset``, ``bias_offset`` are the arguments of the same names of :meth:`Projection.project_layer
    <tangentlens.projection.Projection.project_layer>` (their shapes and meaning are documented there).
    """

    a: Tensor
    delta: Tensor
    key: str
    weight_offset: int | None
    bias_offset: int | None = None


@dataclass(frozen=True)
class Spec:
    """The validated options of a projection (see :class:`Projection` for their meaning)."""

    kind: str
    dim: int
    seed: int
    scale: str
    s: int
    memory_budget_bytes: int
    dtype: torch.dtype | None
    tile: int | None  # as given (None: the kind's default)
    kron_dim: int
    fold: bool
    fallback: str


class TileCache:
    """Generated tiles and structures kept while their total size stays within ``budget`` bytes.

    ``work`` holds reused workspaces (one per device and dtype) for what is not cached. Pickling drops
    every entry: a cache never changes results, only the time and memory they take.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: dict[tuple[Any, ...], Any] = {}
        self.nbytes = 0
        self.work: dict[tuple[Any, ...], Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": self.budget, "entries": {}, "nbytes": 0, "work": {}}

    @property
    def free(self) -> int:
        """Bytes of the budget not yet used."""
        return self.budget - self.nbytes

    def get(self, key: tuple[Any, ...]) -> Any:
        """The cached value for ``key``, or None."""
        return self.entries.get(key)

    def cached(self, key: tuple[Any, ...], make: Callable[[], Any], nbytes: int) -> Any:
        """The value for ``key``: cached, or made by ``make()`` and kept if its ``nbytes`` fit the budget."""
        hit = self.entries.get(key)
        if hit is not None:
            return hit
        value = make()
        if self.nbytes + nbytes <= self.budget:
            self.entries[key] = value
            self.nbytes += nbytes
        return value

    def buffer(
        self, key: tuple[Any, ...], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """A reused contiguous buffer of ``shape`` (the first entries of :meth:`workspace`)."""
        numel = 1
        for s in shape:
            numel *= s
        return self.workspace(key, numel, device, dtype)[:numel].view(shape)

    def workspace(self, key: tuple[Any, ...], numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """A reused flat buffer of at least ``numel`` entries for ``key`` (allocated on first use, grown
        when a call needs more)."""
        buf = self.work.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self.work[key] = buf
        return buf

    def clear(self) -> None:
        """Drop every entry and workspace."""
        self.entries.clear()
        self.nbytes = 0
        self.work.clear()


def matmul_rows(x: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """``x @ w`` with ``x`` zero-padded to at least 16 rows, so that each row's result (and
    summation order) does not depend on how many rows are multiplied together; written into ``out``
    (a reused buffer: fresh large results cost page faults comparable to the product) when given."""
    n = x.shape[0]
    if 0 < n < MIN_GEMM_ROWS:
        pad = x.new_zeros((MIN_GEMM_ROWS, x.shape[1]))
        pad[:n] = x
        res = (pad @ w)[:n]
        return res if out is None else out.copy_(res)
    return x @ w if out is None else torch.matmul(x, w, out=out)


def addmm_rows_(out: Tensor, x: Tensor, w: Tensor) -> None:
    """``out += x @ w`` in place (no temporary), padded to 16 rows like :func:`matmul_rows`."""
    n = x.shape[0]
    if 0 < n < MIN_GEMM_ROWS:
        xp = x.new_zeros((MIN_GEMM_ROWS, x.shape[1]))
        xp[:n] = x
        op = out.new_zeros((MIN_GEMM_ROWS, out.shape[1]))
        op[:n] = out
        op.addmm_(xp, w)
        out.copy_(op[:n])
    elif n:
        out.addmm_(x, w)


def row_step(n: int, per_row: int) -> int:
    """Rows per step so that a step's intermediates (``per_row`` entries per row) stay near
    ``STEP_ELEMS``. Rows never depend on the step (see :func:`matmul_rows`), so this is a memory knob."""
    return max(1, min(n, STEP_ELEMS // max(per_row, 1)))


def cache_rows(n: int, per_row: int) -> int:
    """Rows per cache-resident chunk (``per_row`` entries per row, about ``CACHE_ELEMS`` in all): products
    of a few rows stay in the CPU caches between the layers that add to them instead of streaming through
    memory once per layer. A speed knob only: rows never depend on the chunk (see :func:`matmul_rows`)."""
    return max(1, min(n, CACHE_ELEMS // max(per_row, 1)))


def column_panels(k: int) -> list[tuple[int, int]]:
    """``[j0, j1)`` column ranges of at most ``PANEL_COLS`` covering ``[0, k)``: GEMMs with more output
    columns run ~40% slower here (K = 10,240 against 2,048). A speed knob only (each entry of a product is
    the same dot product whatever the panel)."""
    return [(j0, min(k, j0 + PANEL_COLS)) for j0 in range(0, k, PANEL_COLS)]


def layer_shapes(
    a: Tensor, delta: Tensor, d_in: int, d_out: int, what: str = "a layer's factors"
) -> tuple[Tensor, Tensor]:
    """``a`` as ``(n, T, d_in)`` and ``delta`` as ``(n, M, T, d_out)`` (2-D / 3-D inputs get ``T = 1``);
    views, no copy. ``what`` names the factors in the error messages.

    Raises:
        InputError: shapes that do not match each other or ``d_in`` / ``d_out``.
    """
    if a.dim() == 2:
        a = a[:, None, :]
    if delta.dim() == 3:
        delta = delta[:, :, None, :]
    if a.dim() != 3 or delta.dim() != 4:
        raise InputError(
            f"{what} must be a (n, T, d_in) and delta (n, M, T, d_out), got {tuple(a.shape)} "
            f"and {tuple(delta.shape)}."
        )
    n, big_t, di = a.shape
    if delta.shape[0] != n or delta.shape[2] != big_t or di != d_in or delta.shape[3] != d_out:
        raise InputError(
            f"shape mismatch: a {tuple(a.shape)}, delta {tuple(delta.shape)}, d_in={d_in}, d_out={d_out}; "
            f"a must be (n, T, d_in) and delta (n, M, T, d_out)."
        )
    return a, delta


class Backend(ABC):
    """One projection kind: how its random matrix is generated, applied and cached.

    Args:
        spec: The projection's validated options.
        label: How memory-error messages name the projection.
    """

    uses_factors: ClassVar[bool] = False  # projects Linear/Conv layers from their captured factors

    def __init__(self, spec: Spec, label: str) -> None:
        self.spec = spec
        self.dim = spec.dim
        self.kpad = 32 * ((spec.dim + 31) // 32)
        self.label = label
        self.cache = TileCache(spec.memory_budget_bytes)
        self.tile = self.resolve_tile(spec.tile)
        # the first part of the seed is historical ("sketch"): changing it would change every matrix
        self.words = seed_words("tangentlens.sketch", GEN_VERSION, spec.kind, spec.seed, spec.dim)

    def resolve_tile(self, tile: int | None) -> int:
        """The column tile width: a performance knob (the matrix does not depend on it) whose default
        keeps a ``tile x Kpad`` float tile near 32 MiB (between 64 and 8192 columns)."""
        default = max(64, min(8192, 1 << max(0, (2**23 // self.kpad).bit_length() - 1)))
        return default if tile is None else check_int("tile", tile, minimum=1)

    def describe(self) -> dict[str, Any]:
        """The kind's own entries of ``Projection.to_dict()`` (none by default)."""
        return {}

    def repr_extra(self) -> str:
        """The kind's own part of ``repr(Projection)`` (none by default)."""
        return ""

    def reference_factor(self, total_dim: int) -> float:
        """``sqrt(K / P)`` for ``scale="reference"``, else 1."""
        return math.sqrt(self.dim / total_dim) if self.spec.scale == "reference" else 1.0

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the cache."""
        return self.cache.nbytes

    def clear_cache(self) -> None:
        """Drop every cached tile (frees memory; results do not change)."""
        self.cache.clear()

    def cache_form(self, total_dim: int, device: torch.device, dtype: torch.dtype) -> str | None:
        """How dense tiles of ``R`` are cached for ``total_dim`` columns; None for kinds without them."""
        return None

    @abstractmethod
    def project(self, g: Tensor, offset: int, total: int) -> Tensor:
        """``(n, K)`` projection of the validated column slice ``g`` (already in the compute dtype)."""

    def takes_factors(self, d_in: int, d_out: int, positions: int, probes: int) -> bool:
        """Whether :meth:`project_factors` should project such a layer from its factors (else the caller
        materializes its gradient and uses :meth:`project`). None by default."""
        return False

    def project_factors(
        self, a: Tensor, delta: Tensor, key: str, weight_offset: int | None, bias_offset: int | None,
        total: int, out: Tensor | None,
    ) -> Tensor:
        """Add to ``out`` ``(n, M, K)`` (zeros when None, allocated after the memory check) the projection of
        a layer's gradients ``sum_t delta_t a_t^T`` (weight, at ``weight_offset``) and ``sum_t delta_t``
        (bias, at ``bias_offset``) from the validated factors; return it."""
        raise InputError(f"projection kind {self.spec.kind!r} does not project layers from their factors.")

    def project_factor_layers(
        self, layers: list[LayerFactors], total: int, out: Tensor | None, add: bool = True
    ) -> Tensor:
        """:meth:`project_factors` of several validated layers (same rows and probes) summed into ``out``
        (added to it; written over it when ``add`` is False), layer by layer here; a kind may fuse them."""
        if out is not None and not add:
            out.zero_()
        for lay in layers:
            out = self.project_factors(*lay, total, out)
        assert out is not None
        return out


class FlatBackend(Backend):
    """A kind that projects flattened column slices directly: checks, output and scale shared here.

    Subclasses implement :meth:`apply` (accumulate ``g @ R^T`` into ``out``) and :meth:`working_set`.
    """

    out_width_padded: ClassVar[bool] = False  # the output buffer has Kpad (not K) columns

    def check_total(self, total: int) -> None:
        """Refuse a ``P`` the kind cannot project (nothing by default)."""

    def project(self, g: Tensor, offset: int, total: int) -> Tensor:
        """``g @ R[:, offset:offset + p].T`` times the scale's factor, shape ``(n, K)``.

        Raises:
            InputError: the kind cannot map ``total`` coordinates to ``K``.
            MemoryBudgetError: the working set does not fit in the memory available.
        """
        self.check_total(total)
        n, p = g.shape
        empty = p == 0 or n == 0
        if not empty:
            self.check_working_set(n, p, g.device, g.dtype)
        out = g.new_zeros((n, self.kpad if self.out_width_padded else self.dim))
        if empty:
            return out[:, : self.dim]
        out = self.apply(g, offset, out, total)
        factor = self.reference_factor(total)
        return out * factor if factor != 1.0 else out

    @abstractmethod
    def apply(self, g: Tensor, offset: int, out: Tensor, total: int) -> Tensor:
        """Accumulate the unbiased projection of ``g`` into the zeroed ``out`` and return it ``(n, K)``."""

    @abstractmethod
    def working_set(self, n: int, p: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, str]:
        """``(bytes per output coordinate, fixed bytes, advice)`` of one :meth:`project` call."""

    def check_working_set(self, n: int, p: int, device: torch.device, dtype: torch.dtype) -> None:
        """Refuse, before allocating anything, a call on ``n`` rows of ``p`` columns whose working set
        (output rows, dense tile workspace, sparse structure, Hadamard buffers) exceeds the memory
        available on ``device``.

        Raises:
            MemoryBudgetError: the message says what to change (smaller ``dim``, fewer rows per call, or a
                kind that never materializes dense tiles of ``R``).
        """
        per_k, fixed, streams = self.working_set(n, p, device, dtype)
        what = f"{self.label} on {n:,} rows x {p:,} columns ({dtype})"
        self.check_need(per_k, fixed, streams, device, what)

    def check_need(self, per_k: int, fixed: int, streams: str, device: torch.device, what: str) -> None:
        """Refuse a working set of ``per_k`` bytes per output coordinate plus ``fixed`` bytes that exceeds the
        memory available on ``device``; the message estimates the largest ``dim`` that fits.

        Raises:
            MemoryBudgetError: nothing was allocated.
        """
        need = per_k * self.dim + fixed

        def fix(avail: int) -> str:
            kmax = max((avail - fixed) // per_k, 0)
            return (
                f"use a smaller projection dim (about dim <= {kmax:,} fits here), or fewer rows per call "
                f"(a smaller batch_size){streams}"
            )

        check_memory(need, device, what, fix)


class FactoredBackend(Backend):
    """A kind that projects Linear/Conv layers from their captured factors and every flattened parameter
    through the ``fallback`` kind's backend (its own cache and budget).

    Args:
        spec: The projection's options.
        label: How memory-error messages name the projection.
        flat: The fallback kind's backend, used by :meth:`project`.
    """

    uses_factors = True

    def __init__(self, spec: Spec, label: str, flat: FlatBackend) -> None:
        super().__init__(spec, label)
        self.flat = flat

    def describe(self) -> dict[str, Any]:
        d = self.flat.describe()
        d.pop("tile", None)  # the fallback always uses its kind's default tile
        d["fallback"] = self.spec.fallback
        return d

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes + self.flat.cache_bytes

    def clear_cache(self) -> None:
        self.cache.clear()
        self.flat.clear_cache()

    def cache_form(self, total_dim: int, device: torch.device, dtype: torch.dtype) -> str | None:
        return self.flat.cache_form(total_dim, device, dtype)

    def project(self, g: Tensor, offset: int, total: int) -> Tensor:
        """Flattened parameters (no factors) go through the fallback kind."""
        return self.flat.project(g, offset, total)
