"""Seeded random projections (sketches) of per-example gradients, output probes and fidelity tools.

A projection maps a parameter-space vector ``x in R^P`` to ``phi(x) = R x in R^K``. Every kind here
is a random linear map with ``E[R^T R] = I`` in the default ``scale="unbiased"``, so ``E<phi(a),
phi(b)> = <a, b>`` and an unnormalized projected kernel is an unbiased estimate of the exact one.
``scale="reference"`` is the convention of the method's code and of TRAK (+-1 entries, features
divided by ``sqrt(P)``, no ``1/sqrt(K)``): ``E<phi(a), phi(b)> = (K / P) <a, b>``. For every kind
the reference features are the unbiased features times ``sqrt(K / P)``; cosine normalization cancels
the constant either way.

Partition independence. The engine captures gradients layer by layer and batch by batch, so
:meth:`Projection.project` receives a slice ``g`` of rows (examples, or (example, class) pairs) and
a range of columns ``[offset, offset + p)`` of the full ``P``-vector. The random matrix ``R`` is a
pure function of ``(kind, seed, K)`` and of the *global* column index, generated on the fly from a
counter-based hash (no sequential random stream), so

- summing :meth:`Projection.project` over any partition of the ``P`` columns gives the projection of
  the whole vector (up to floating-point summation order, ~1e-7 relative in float32), and
- splitting the rows into batches of any size gives bit-identical rows (tested with ``torch.equal``;
  matrix products on fewer than 16 rows are zero-padded to 16 rows because the BLAS uses a different
  kernel, with a different summation order, for very small row counts).

The hash is computed with plain integer tensor operations, so the same seed gives the same matrix on
CPU and CUDA (``"gaussian"`` draws its blocks from seeded CPU generators, also device independent).
``R`` is never held whole unless it fits in ``memory_budget_bytes``: the first call for a given ``P``
picks the densest cache form that fits the budget left -- float tiles, or for Rademacher int8 tiles
(1 byte per entry, expanded by a cast) or packed bits (1 bit per entry, expanded by a table lookup)
-- and otherwise regenerates every tile on every call into one reused workspace of at most
``tile x K`` floats. All forms give bit-identical results.

Kinds (``K = dim``):

- ``"rademacher"``: dense i.i.d. +-1/sqrt(K). ``phi = g @ R^T`` is one matrix product, ``2 n P K``
  flops.
- ``"gaussian"``: dense i.i.d. N(0, 1/K) (``torch.randn`` per seeded block of 64 columns, always
  on the CPU generator), same product cost, slower to generate.
- ``"sjlt"``: sparse JL / CountSketch. ``K`` is split into ``s`` blocks; every column has one
  nonzero ``+-1/sqrt(s)`` at a hashed row of every block (so the ``s`` nonzeros are distinct).
  Applied as a row-blocked scatter-add, ``O(n p s)`` and memory-bound.
- ``"srht"``: subsampled randomized Hadamard transform per fixed column tile of width ``T = 2^t >=
  K``: ``phi = (1/sqrt(K)) sum_t S_t H_T D_t x_t`` with ``D_t`` random signs (from the global column
  index), ``H_T`` the +-1 Sylvester-Hadamard matrix, and ``S_t`` a seeded choice of ``K`` of its
  ``T`` rows, drawn independently per tile. Each tile term is unbiased, cross-tile terms have mean
  zero (independent ``D_t``), so the sum is a valid JL map whose definition does not depend on how
  the columns are split among calls. ``H_T`` is applied as ``H_a (x) H_b`` (``T = a b``): ``2 T (a +
  b)`` flops per row and tile instead of the dense ``2 T K``. A tile touched by only a few columns
  uses the explicit ``K x p`` submatrix instead.
- ``"kronecker"``: per layer, ``(P_out delta)(P_in a)^T`` summed over positions (see
  :meth:`Projection.project_kronecker`); flattened parameters without that structure go through
  :meth:`Projection.project` with the ``fallback`` kind.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import InputError, UnknownKindError
from .memory import check_memory

__all__ = [
    "KINDS",
    "SCALES",
    "Projection",
    "output_probes",
    "probe_variance",
    "cosine_gram",
    "FidelityReport",
    "fidelity",
    "fidelity_curve",
    "loglog_slope",
    "plot_fidelity",
]

KINDS: tuple[str, ...] = ("rademacher", "gaussian", "sjlt", "srht", "kronecker")
SCALES: tuple[str, ...] = ("unbiased", "reference")
FLAT_KINDS: tuple[str, ...] = ("rademacher", "gaussian", "sjlt", "srht")

_M32 = 0xFFFFFFFF
_MIN_GEMM_ROWS = 16  # BLAS uses other kernels (other summation orders) below this many rows
_GEN_VERSION = 1  # bump when the generated matrices change; stored in to_dict()


# --------------------------------------------------------------------------------------------------
# counter-based hashing (uint32 values held in int64 tensors; no product ever exceeds 2^63)
# --------------------------------------------------------------------------------------------------


def _mix32(x: Tensor) -> Tensor:
    """32-bit avalanche hash ("lowbias32" family, Wellons), elementwise on uint32s held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _seed_words(*parts: object, n: int = 4) -> list[int]:
    """Deterministic 32-bit words derived from ``parts`` (blake2b, not Python's salted hash)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4 * n).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(n)]


def _column_keys(start: int, stop: int, words: Sequence[int], device: torch.device) -> Tensor:
    """One uint32 key per global column index in ``[start, stop)`` (int64 tensor)."""
    j = torch.arange(start, stop, dtype=torch.int64, device=device)
    lo = j & _M32
    hi = j >> 32
    return _mix32(_mix32(lo ^ words[0]) ^ ((hi + words[1]) & _M32))


def _word_hash(col_keys: Tensor, n_words: int, salt: int) -> Tensor:
    """``(len(col_keys), n_words)`` uint32 words: ``mix(mix(col_key ^ word_key) + salt)``."""
    w = torch.arange(n_words, dtype=torch.int64, device=col_keys.device)
    wk = _mix32((w * 0x9E3779B9 + salt) & _M32)
    return _mix32((_mix32(col_keys[:, None] ^ wk[None, :]) + 0x6A09E667) & _M32)


_LUT_CACHE: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _sign_lut(device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(256, 8)`` table: row b holds (+1 if bit i of b else -1) for i = 0..7."""
    key = (device, dtype)
    if key not in _LUT_CACHE:
        b = torch.arange(256, dtype=torch.int64)
        bits = (b[:, None] >> torch.arange(8, dtype=torch.int64)[None, :]) & 1
        _LUT_CACHE[key] = (bits * 2 - 1).to(device=device, dtype=dtype).contiguous()
    return _LUT_CACHE[key]


def _rademacher_bytes(col_keys: Tensor, width: int, salt: int) -> Tensor:
    """The packed +-1 matrix: ``(len(col_keys), 4 * ceil(width / 32))`` uint8, 8 signs per byte
    (bit i of byte q of j's word w is entry (j, 32 w + 8 q + i)); one hash per 32 entries."""
    n_words = (width + 31) // 32
    p = col_keys.shape[0]
    h = _word_hash(col_keys, n_words, salt)
    h = (h - ((h >> 31) << 32)).to(torch.int32)  # same bits, signed range
    b = h.view(torch.uint8)  # (p, 4 W) bytes
    if sys.byteorder == "big":
        b = b.view(p, n_words, 4).flip(-1).reshape(p, 4 * n_words)
    return b


def _expand_bytes(b: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """Unpack ``(p, B)`` sign bytes to a ``(p, 8 B)`` +-1 matrix (one 8-entry table row per byte)."""
    p, nb = b.shape
    lut = _sign_lut(b.device, dtype)
    if out is None:
        out = torch.empty((p, 8 * nb), dtype=dtype, device=b.device)
    torch.index_select(lut, 0, b.reshape(-1).to(torch.int32), out=out.view(p * nb, 8))
    return out


def _rademacher_rows(
    col_keys: Tensor, width: int, salt: int, dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """``(len(col_keys), width)`` +-1 matrix: entry (j, k) is bit ``k % 32`` of j's word ``k//32``.

    Cost: one hash per 32 entries and one 8-entry table lookup per byte, written into ``out`` (a
    reused ``(p, 32 * ceil(width / 32))`` buffer) when given: ~1-2 ns per entry on one core; a fresh
    allocation costs more than the generation itself (page faults).
    """
    return _expand_bytes(_rademacher_bytes(col_keys, width, salt), dtype, out)[:, :width]


_GAUSS_BLOCK = 64  # columns per independently seeded Gaussian block


def _gaussian_rows(
    j0: int,
    j1: int,
    width: int,
    words: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """``R^T[j0:j1]`` of i.i.d. N(0, 1) entries, shape ``(j1 - j0, width)``.

    Columns come in fixed blocks of 64; block ``b`` is drawn by ``torch.randn`` from a CPU generator
    seeded with a hash of ``(seed, b)``, so any column range is reproducible (and identical on every
    device: CUDA tiles are generated on the CPU and copied). Cost ~5-10 ns per entry, one core.
    """
    gen = torch.Generator()
    work = torch.float32  # drawn in float32 for every dtype, so the matrix does not depend on it
    direct = out is not None and out.dtype == work and out.device.type == "cpu"
    buf = out if direct else torch.empty((j1 - j0, width), dtype=work)
    assert buf is not None
    for b in range(j0 // _GAUSS_BLOCK, (j1 - 1) // _GAUSS_BLOCK + 1):
        lo, hi = b * _GAUSS_BLOCK, (b + 1) * _GAUSS_BLOCK
        gen.manual_seed(
            int.from_bytes(hashlib.blake2b(repr((*words, b)).encode(), digest_size=7).digest(), "little")
        )
        a0, a1 = max(lo, j0), min(hi, j1)
        if a0 == lo and a1 == hi:
            torch.randn((_GAUSS_BLOCK, width), generator=gen, out=buf[a0 - j0 : a1 - j0])
        else:
            block = torch.randn((_GAUSS_BLOCK, width), generator=gen, dtype=work)
            buf[a0 - j0 : a1 - j0] = block[a0 - lo : a1 - lo]
    if direct:
        return buf
    if out is not None:
        return out.copy_(buf)
    return buf.to(device=device, dtype=dtype)


def _hadamard(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sylvester-Hadamard matrix of order ``size`` (a power of 2): H[r,c] = (-1)^popcount(r & c)."""
    r = torch.arange(size, dtype=torch.int64, device=device)
    return _parity_sign(r[:, None] & r[None, :]).to(dtype)


def _parity_sign(x: Tensor) -> Tensor:
    """(-1)^popcount(x) for non-negative int64 ``x`` < 2^32, as int64."""
    x = x ^ (x >> 16)
    x = x ^ (x >> 8)
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return 1 - 2 * (x & 1)


def _matmul(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` with ``x`` zero-padded to at least 16 rows, so that each row's result (and
    summation order) does not depend on how many rows are multiplied together."""
    n = x.shape[0]
    if 0 < n < _MIN_GEMM_ROWS:
        pad = x.new_zeros((_MIN_GEMM_ROWS, x.shape[1]))
        pad[:n] = x
        return (pad @ w)[:n]
    return x @ w


def _addmm_(out: Tensor, x: Tensor, w: Tensor) -> None:
    """``out += x @ w`` in place (no temporary), padded to 16 rows like :func:`_matmul`."""
    n = x.shape[0]
    if 0 < n < _MIN_GEMM_ROWS:
        xp = x.new_zeros((_MIN_GEMM_ROWS, x.shape[1]))
        xp[:n] = x
        op = out.new_zeros((_MIN_GEMM_ROWS, out.shape[1]))
        op[:n] = out
        op.addmm_(xp, w)
        out.copy_(op[:n])
    elif n:
        out.addmm_(x, w)


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}.")
    return value


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# the projection object
# --------------------------------------------------------------------------------------------------


class Projection:
    """A seeded random projection ``R in R^{K x P}`` of parameter-space vectors, ``K = dim``.

    Args:
        dim: Projection dimension ``K`` (> 0).
        kind: ``"rademacher"``, ``"gaussian"``, ``"sjlt"``, ``"srht"`` or ``"kronecker"``.
        seed: Integer seed; the matrix is a pure function of ``(kind, seed, dim, s)`` and global
            column indices, identical across batch sizes, layer splits, processes and devices.
        scale: ``"unbiased"`` (``E<phi(a), phi(b)> = <a, b>``) or ``"reference"`` (the method's /
            TRAK's convention: +-1 entries, divided by ``sqrt(P)``, so
            ``E<phi(a), phi(b)> = (K/P) <a, b>``).
        s: Nonzeros per column of ``"sjlt"`` (1 <= s <= dim; default 2), also the fold width of
            ``"kronecker"`` when ``fold=True`` uses CountSketch (always ``s=1`` there).
        memory_budget_bytes: Generated dense tiles / sparse structures are cached while their total
            size stays within this budget; beyond it they are regenerated on every call.
        dtype: Compute dtype; ``None`` uses the dtype of the input.
        tile: Column tile width. Dense kinds: a performance knob only (the matrix does not depend
            on it). ``"srht"``: the Hadamard order ``T`` (a power of two >= dim; part of the
            definition).
        kron_dim: ``"kronecker"``: target ``k_in * k_out`` per layer (default ``dim``).
        fold: ``"kronecker"``: if True, :meth:`project_kronecker` CountSketches the per-layer
            Kronecker features into ``dim`` coordinates (layer-keyed), so that features of all
            layers and of :meth:`project` can be summed into one ``K``-vector (the two-stage route).
        fallback: ``"kronecker"``: the flat kind used by :meth:`project` for parameters without
            Kronecker structure (biases, norm affines, ...).

    Raises:
        InputError: ``dim`` or ``seed`` not a (non-bool) integer, ``dim <= 0``, bad ``s``/``tile``.
        UnknownKindError: unknown ``kind``, ``scale`` or ``fallback``.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "rademacher",
        seed: int = 0,
        scale: str = "unbiased",
        *,
        s: int = 2,
        memory_budget_bytes: int = 256 * 2**20,
        dtype: torch.dtype | None = None,
        tile: int | None = None,
        kron_dim: int | None = None,
        fold: bool = False,
        fallback: str = "sjlt",
    ) -> None:
        self.dim = _check_int("dim (the projection dimension K)", dim, minimum=1)
        if not isinstance(kind, str) or kind not in KINDS:
            raise UnknownKindError(f"Unknown projection kind {kind!r}; choose one of {list(KINDS)}.")
        self.kind = kind
        self.seed = _check_int("seed", seed)
        if not isinstance(scale, str) or scale not in SCALES:
            raise UnknownKindError(f"Unknown projection scale {scale!r}; choose one of {list(SCALES)}.")
        self.scale = scale
        self.s = _check_int("s (nonzeros per column)", s, minimum=1)
        if kind == "sjlt" and self.s > self.dim:
            raise InputError(f"sjlt needs s <= dim, got s={self.s} > dim={self.dim}; lower s.")
        self.memory_budget_bytes = _check_int("memory_budget_bytes", memory_budget_bytes, minimum=0)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"dtype must be a floating torch.dtype or None, got {dtype!r}.")
        self.dtype = dtype
        self.kron_dim = self.dim if kron_dim is None else _check_int("kron_dim", kron_dim, minimum=1)
        self.fold = bool(fold)
        if fallback not in FLAT_KINDS:
            raise UnknownKindError(f"Unknown fallback kind {fallback!r}; choose one of {list(FLAT_KINDS)}.")
        self.fallback = fallback
        self._kpad = 32 * ((self.dim + 31) // 32)
        if kind == "srht":
            t = _next_pow2(max(self.dim, 4096)) if tile is None else _check_int("tile", tile)
            if t & (t - 1) or t < 2:
                raise InputError(f"srht tile must be a power of two >= 2, got {t}.")
            if self.dim > t:
                raise InputError(
                    f"srht subsamples dim={self.dim} rows of a Hadamard tile of order {t}; use "
                    f"tile >= {_next_pow2(self.dim)} (or leave tile=None)."
                )
            self.tile = t
        else:
            default = max(64, min(8192, 1 << max(0, (2**23 // self._kpad).bit_length() - 1)))
            self.tile = default if tile is None else _check_int("tile", tile, minimum=1)
        self._words = _seed_words("tangentlens.sketch", _GEN_VERSION, kind, self.seed, self.dim)
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._cache_bytes = 0
        self._work: dict[tuple[Any, ...], Tensor] = {}
        self._flat: Projection | None = None
        self._label = f"Projection(dim={self.dim:,}, kind={kind!r})"  # how error messages name it
        if kind == "kronecker":
            self._flat = Projection(
                self.dim,
                fallback,
                seed=self.seed,
                scale=scale,
                s=self.s,
                memory_budget_bytes=memory_budget_bytes,
                dtype=dtype,
            )
            self._flat._label = f"{self._label}'s {fallback!r} part (parameters without Kronecker factors)"

    # ---------------------------------------------------------------- bookkeeping

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description; stored with every result so the convention is never lost."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "scale": self.scale,
            "expectation": "<phi(a),phi(b)> ~ <a,b>"
            if self.scale == "unbiased"
            else "<phi(a),phi(b)> ~ (K/P) <a,b>",
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "generator": f"tangentlens-mix32-v{_GEN_VERSION}",
        }
        if self.kind == "sjlt" or (self.kind == "kronecker" and self.fallback == "sjlt"):
            d["s"] = self.s
        if self.kind == "srht":
            d["tile"] = self.tile
        if self.kind == "kronecker":
            d.update(kron_dim=self.kron_dim, fold=self.fold, fallback=self.fallback)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Projection:
        """Rebuild a projection from :meth:`to_dict` output (same matrix)."""
        dtype = getattr(torch, d["dtype"]) if d.get("dtype") else None
        extra: dict[str, Any] = {}
        if d["kind"] == "kronecker":
            extra = dict(kron_dim=d["kron_dim"], fold=d["fold"], fallback=d["fallback"])
        tile = d.get("tile") if d["kind"] == "srht" else None
        return cls(
            d["dim"],
            d["kind"],
            seed=d["seed"],
            scale=d["scale"],
            s=d.get("s", 2),
            dtype=dtype,
            tile=tile,
            **extra,
        )

    def __repr__(self) -> str:
        extra = f", s={self.s}" if self.kind == "sjlt" else ""
        return (
            f"Projection(dim={self.dim}, kind={self.kind!r}, seed={self.seed}, scale={self.scale!r}{extra})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Projection) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_dict().items())))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        state["_cache_bytes"] = 0
        state["_work"] = {}
        return state

    def clear_cache(self) -> None:
        """Drop every cached tile (frees memory; results do not change)."""
        self._cache.clear()
        self._cache_bytes = 0
        self._work.clear()
        if self._flat is not None:
            self._flat.clear_cache()

    def _cached(self, key: tuple[Any, ...], make: Callable[[], Any], nbytes: int) -> Any:
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        value = make()
        if self._cache_bytes + nbytes <= self.memory_budget_bytes:
            self._cache[key] = value
            self._cache_bytes += nbytes
        return value

    def _reference_factor(self, total_dim: int) -> float:
        return math.sqrt(self.dim / total_dim) if self.scale == "reference" else 1.0

    # ---------------------------------------------------------------- flattened projection

    def project(self, g: Tensor, offset: int = 0, total_dim: int | None = None) -> Tensor:
        """Project rows of a column slice: returns ``g @ R[:, offset:offset + p].T``, shape ``(n,
        K)``.

        Args:
            g: ``(n, p)`` rows (examples or (example, class) pairs) of flattened gradient entries
                that occupy columns ``[offset, offset + p)`` of a ``P = total_dim`` vector.
            offset: First global column of ``g``.
            total_dim: ``P``, the length of the full vector (default ``offset + p``). Only the
                ``"reference"`` scale (``1/sqrt(P)``) and error checks depend on it.

        Returns:
            ``(n, K)`` in the compute dtype. Summing the results over a partition of ``[0, P)``
            equals projecting the full vector; rows never depend on which other rows are in the
            batch.

        Cost: dense kinds ``2 n p K`` flops plus generating ``p K`` entries unless cached;
        ``"sjlt"`` ``O(n p s)``; ``"srht"`` ``2 n T (a + b)`` flops per touched tile (``T = a b``),
        ``K n`` memory.

        Raises:
            InputError: ``g`` not a 2-D floating tensor, or the column range is outside ``[0, P)``,
                or ``"srht"`` with ``K > P``.
        """
        if not isinstance(g, Tensor) or g.dim() != 2:
            raise InputError(
                f"project() expects a 2-D tensor (rows x columns), got "
                f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}; flatten per row."
            )
        if not g.dtype.is_floating_point:
            raise InputError(f"project() expects a floating tensor, got {g.dtype}.")
        n, p = g.shape
        offset = _check_int("offset", offset, minimum=0)
        total = offset + p if total_dim is None else _check_int("total_dim", total_dim, minimum=1)
        if offset + p > total:
            raise InputError(
                f"columns [{offset}, {offset + p}) exceed total_dim={total}; pass the full length P."
            )
        dtype = self.dtype or g.dtype
        g = g.to(dtype)
        if self.kind == "kronecker":
            assert self._flat is not None
            return self._flat.project(g, offset, total)
        if self.kind == "srht" and self.dim > total:
            raise InputError(
                f"srht cannot map P={total} coordinates to more (dim={self.dim}) rows; use a "
                f"smaller dim, or kind='rademacher'/'gaussian' if you need K > P."
            )
        empty = p == 0 or n == 0
        if not empty:
            self._check_working_set(n, p, g.device, dtype)
        out = g.new_zeros((n, self._kpad if self.kind in ("rademacher", "gaussian") else self.dim))
        if empty:
            return out[:, : self.dim]
        if self.kind in ("rademacher", "gaussian"):
            self._project_dense(g, offset, out, total)
            out = out[:, : self.dim] * (1.0 / math.sqrt(self.dim))
        elif self.kind == "sjlt":
            self._project_sjlt(g, offset, out)
        else:
            self._project_srht(g, offset, out)
        factor = self._reference_factor(total)
        return out * factor if factor != 1.0 else out

    __call__ = project

    def _check_working_set(self, n: int, p: int, device: torch.device, dtype: torch.dtype) -> None:
        """Refuse, before allocating anything, a :meth:`project` call on ``n`` rows of ``p`` columns whose
        working set (output rows, dense tile workspace, sparse structure, Hadamard buffers) exceeds the
        memory available on ``device``.

        Raises:
            MemoryBudgetError: the message says what to change (smaller ``dim``, fewer rows per call, or a
                kind that never materializes dense tiles of ``R``).
        """
        isz = dtype.itemsize
        if self.kind in ("rademacher", "gaussian"):
            per_k = 3 * n * isz  # padded output, its scaled slice, the reference-scaled copy
            if (device, dtype) not in self._work:
                per_k += self.tile * isz * (2 if self.kind == "gaussian" else 1)  # tile workspace (+ draw)
            fixed = 0
            streams = "; or a kind that never materializes dense tiles of R: kind='sjlt' or 'kronecker'"
        elif self.kind == "sjlt":
            per_k, fixed, streams = 2 * n * isz, 16 * p * self.s + 2 * 16 * p * isz, ""
        else:  # srht: output, plus the padded tile and two transform buffers of T >= K columns per row
            per_k = n * isz * (2 + 3 * self.tile // self.dim)
            fixed, streams = n * p * isz, ""
        need = per_k * self.dim + fixed

        def fix(avail: int) -> str:
            kmax = max((avail - fixed) // per_k, 0)
            return (
                f"use a smaller projection dim (about dim <= {kmax:,} fits here), or fewer rows per call "
                f"(a smaller batch_size){streams}"
            )

        label = getattr(self, "_label", f"Projection(dim={self.dim:,}, kind={self.kind!r})")  # old pickles
        check_memory(need, device, f"{label} on {n:,} rows x {p:,} columns ({dtype})", fix)

    def matrix(self, total_dim: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
        """The explicit ``(K, P)`` matrix (for tests and small ``P`` only: ``K P`` floats).

        Raises:
            MemoryBudgetError: the ``P x P`` identity it projects and the result do not fit in memory.
        """
        total_dim = _check_int("total_dim", total_dim, minimum=1)
        check_memory(
            (total_dim * total_dim + 2 * total_dim * self._kpad) * dtype.itemsize, "cpu",
            f"Projection.matrix({total_dim:,})",
            "matrix() is for small P only; project the vectors with project() instead",
        )
        eye = torch.eye(total_dim, dtype=dtype)
        return self.project(eye, 0, total_dim).T.contiguous()

    # dense -------------------------------------------------------------------------------------

    def _dense_rows(
        self, j0: int, j1: int, device: torch.device, dtype: torch.dtype, out: Tensor | None = None
    ) -> Tensor:
        """``R^T[j0:j1]`` with +-1 (or N(0,1)) entries, shape ``(j1 - j0, Kpad)``."""
        if self.kind == "rademacher":
            keys = _column_keys(j0, j1, self._words, device)
            return _rademacher_rows(keys, self._kpad, self._words[2], dtype, out=out)
        return _gaussian_rows(j0, j1, self._kpad, self._words, device, dtype, out=out)

    def _workspace(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """A reused ``(rows, Kpad)`` buffer (at most ``tile x Kpad``) for uncached tiles."""
        key = (device, dtype)
        buf = self._work.get(key)
        if buf is None:
            buf = torch.empty(self.tile * self._kpad, dtype=dtype, device=device)
            self._work[key] = buf
        return buf[: rows * self._kpad].view(rows, self._kpad)

    def _dense_tier(self, total: int, device: torch.device, dtype: torch.dtype) -> str:
        """How this matrix is cached, decided once per ``(P, device, dtype)`` from the budget left:
        ``"full"`` (compute dtype), then for Rademacher ``"int8"`` (1 byte per entry, expanded by a
        cast) and ``"bits"`` (1 bit per entry, expanded by a table lookup), else ``"none"``
        (regenerated on every call into a reused workspace)."""
        key = ("tier", total, device, dtype)
        tier = self._cache.get(key)
        if tier is None:
            free = self.memory_budget_bytes - self._cache_bytes
            entries = total * self._kpad
            itemsize = torch.empty((), dtype=dtype).element_size()
            if entries * itemsize <= free:
                tier = "full"
            elif self.kind == "rademacher" and entries <= free:
                tier = "int8"
            elif self.kind == "rademacher" and entries // 8 <= free:
                tier = "bits"
            else:
                tier = "none"
            self._cache[key] = tier
        return tier

    def _stored_rows(self, tier: str, j0: int, j1: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``R^T[j0:j1]`` in the cache tier's form (compute dtype, int8 +-1, or packed bytes)."""
        if tier == "full":
            return self._dense_rows(j0, j1, device, dtype)
        if tier == "int8":
            return self._dense_rows(j0, j1, device, torch.int8)
        keys = _column_keys(j0, j1, self._words, device)
        return _rademacher_bytes(keys, self._kpad, self._words[2])

    def _project_dense(self, g: Tensor, offset: int, out: Tensor, total: int) -> None:
        p = g.shape[1]
        dev, dt = g.device, g.dtype
        tier = self._dense_tier(total, dev, dt)
        for t in range(offset // self.tile, (offset + p - 1) // self.tile + 1):
            j0 = max(offset, t * self.tile)
            j1 = min(offset + p, (t + 1) * self.tile)
            key = ("dense", tier, j0, j1, dev, dt if tier == "full" else None)
            stored = self._cache.get(key)
            if stored is None and tier != "none":
                per_entry = {"full": g.element_size(), "int8": 1.0, "bits": 0.125}[tier]
                nbytes = int((j1 - j0) * self._kpad * per_entry)
                stored = self._cached(
                    key, lambda j0=j0, j1=j1: self._stored_rows(tier, j0, j1, dev, dt), nbytes
                )
            if tier == "full":
                rt = stored
            else:
                ws = self._workspace(j1 - j0, dev, dt)
                if stored is None:
                    rt = self._dense_rows(j0, j1, dev, dt, out=ws)
                elif tier == "int8":
                    rt = ws.copy_(stored)
                else:
                    rt = _expand_bytes(stored, dt, out=ws)
            _addmm_(out, g[:, j0 - offset : j1 - offset], rt)

    # sjlt --------------------------------------------------------------------------------------

    def _sjlt_structure(
        self, j0: int, j1: int, words: Sequence[int], k: int, s: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Row index (s, p) and sign (s, p) of every nonzero of columns [j0, j1)."""
        keys = _column_keys(j0, j1, words, device)
        h = _word_hash(keys, s, words[3])  # (p, s)
        b = torch.arange(s, dtype=torch.int64, device=device)
        lo = (b * k) // s
        size = ((b + 1) * k) // s - lo
        rows = lo[None, :] + (h >> 1) % size[None, :]
        signs = (h & 1) * 2 - 1
        return rows.T.contiguous(), signs.T.contiguous()

    def _countsketch(
        self, g: Tensor, offset: int, out: Tensor, words: Sequence[int], s: int, cache_tag: str
    ) -> None:
        """``out += g @ S[:, offset:offset+p].T`` for the CountSketch ``S`` defined by ``words``.

        A row-blocked ``scatter_add_`` along the columns: each block of 16 rows is read once per
        nonzero level, contiguously, and scattered into its ``K``-wide output rows (cache-resident),
        ``O(n p s)``. Every output row is accumulated in column order whatever the batch, so rows are
        bit-identical across batch sizes on CPU (CUDA's scatter uses atomics: not bit-identical).
        """
        n, p = g.shape
        k = out.shape[1]
        key = (cache_tag, offset, p, k, s, g.device)
        rows, signs = self._cached(
            key,
            lambda: self._sjlt_structure(offset, offset + p, words, k, s, g.device),
            p * s * 16,
        )
        scaled = [signs[b].to(g.dtype) * (1.0 / math.sqrt(s)) for b in range(s)]
        block = 16
        for i0 in range(0, n, block):
            i1 = min(n, i0 + block)
            for b in range(s):
                out[i0:i1].scatter_add_(1, rows[b].expand(i1 - i0, p), g[i0:i1] * scaled[b])

    def _project_sjlt(self, g: Tensor, offset: int, out: Tensor) -> None:
        self._countsketch(g, offset, out, self._words, self.s, "sjlt")

    # srht --------------------------------------------------------------------------------------

    def _srht_selection(self, t: int, device: torch.device) -> Tensor:
        """Sorted indices of the K Hadamard rows kept for tile ``t``."""

        def make() -> Tensor:
            tk = _mix32(torch.tensor([(t & _M32) ^ self._words[3]], dtype=torch.int64))
            tk = _mix32((tk + (t >> 32) + self._words[1]) & _M32)
            r = torch.arange(self.tile, dtype=torch.int64)
            keys = _mix32(_mix32(r ^ tk) ^ self._words[2])
            order = torch.argsort(keys * self.tile + r)  # ties broken by index: deterministic
            return torch.sort(order[: self.dim]).values.to(device)

        return self._cached(("srht-sel", t, device), make, 8 * self.dim)

    def _srht_factors(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        tbits = self.tile.bit_length() - 1
        a = 1 << ((tbits + 1) // 2)
        b = 1 << (tbits // 2)
        key = ("srht-h", device, dtype)
        return self._cached(
            key,
            lambda: (_hadamard(a, device, dtype), _hadamard(b, device, dtype)),
            (a * a + b * b) * torch.empty((), dtype=dtype).element_size(),
        )

    def _project_srht(self, g: Tensor, offset: int, out: Tensor) -> None:
        n, p = g.shape
        big_t = self.tile
        ha, hb = self._srht_factors(g.device, g.dtype)
        a, b = ha.shape[0], hb.shape[0]
        for t in range(offset // big_t, (offset + p - 1) // big_t + 1):
            j0 = max(offset, t * big_t)
            j1 = min(offset + p, (t + 1) * big_t)
            keys = _column_keys(j0, j1, self._words, g.device)
            signs = (((_mix32(keys ^ self._words[3]) & 1) * 2) - 1).to(g.dtype)
            x = g[:, j0 - offset : j1 - offset] * signs
            sel = self._srht_selection(t, g.device)
            width = j1 - j0
            if width * self.dim <= big_t * (a + b):
                # explicit K x width block of S H: entries (-1)^popcount(sel & local column)
                local = torch.arange(j0 - t * big_t, j1 - t * big_t, device=g.device)
                block = self._cached(
                    ("srht-block", t, j0, j1, g.device, g.dtype),
                    lambda sel=sel, local=local: _parity_sign(sel[None, :] & local[:, None]).to(g.dtype),
                    width * self.dim * g.element_size(),
                )
                out += _matmul(x, block)
            else:
                if width == big_t:
                    full = x
                else:
                    full = x.new_zeros((n, big_t))
                    full[:, j0 - t * big_t : j1 - t * big_t] = x
                y = torch.matmul(ha, full.view(n, a, b))  # H_a X per row (one GEMM per row)
                y = _matmul(y.view(n * a, b), hb).view(n, big_t)  # (H_a X) H_b, H symmetric
                out += y[:, sel]
        out *= 1.0 / math.sqrt(self.dim)

    # ---------------------------------------------------------------- Kronecker projection

    def kronecker_dims(self, d_in: int, d_out: int) -> tuple[int, int]:
        """The ``(k_in, k_out)`` used for a layer with ``d_in`` inputs and ``d_out`` outputs.

        Allocation: the relative variance of a Kronecker sketch is about ``1/k_in + 1/k_out``,
        minimized at ``k_in = k_out = sqrt(kron_dim)`` under ``k_in k_out <= kron_dim``. Each side
        is capped at its dimension (a side with ``k = d`` uses the identity: exact, no variance),
        and the budget freed by a cap goes to the other side. So ``k_in k_out <= kron_dim`` and
        equals it when the layer allows.
        """
        d_in = _check_int("d_in", d_in, minimum=1)
        d_out = _check_int("d_out", d_out, minimum=1)
        budget = self.kron_dim
        if d_in * d_out <= budget:
            return d_in, d_out
        k_in = min(d_in, max(1, math.isqrt(budget)))
        k_out = min(d_out, max(1, budget // k_in))
        k_in = min(d_in, max(1, budget // k_out))
        return k_in, k_out

    def _kron_factor(
        self, key: str | int, side: str, d: int, k: int, device: torch.device, dtype: torch.dtype
    ) -> Tensor | None:
        """``P^T`` of shape ``(d, k)`` with +-1/sqrt(k) entries, or None for the identity (k ==
        d)."""
        if k == d:
            return None
        words = _seed_words("tangentlens.kron", _GEN_VERSION, self.seed, str(key), side)

        def make() -> Tensor:
            keys = _column_keys(0, d, words, device)
            return _rademacher_rows(keys, k, words[2], dtype) * (1.0 / math.sqrt(k))

        return self._cached(
            ("kron", str(key), side, d, k, device, dtype),
            make,
            d * k * torch.empty((), dtype=dtype).element_size(),
        )

    def project_kronecker(
        self,
        a: Tensor,
        delta: Tensor,
        key: str | int,
        *,
        d_in: int,
        d_out: int,
        total_dim: int | None = None,
        k_in: int | None = None,
        k_out: int | None = None,
    ) -> Tensor:
        """Kronecker sketch of a layer whose per-example gradient is ``G = sum_t delta_t a_t^T``.

        Returns ``vec(sum_t (P_out delta_t)(P_in a_t)^T) = (P_out (x) P_in) vec(G)`` (row-major vec,
        index ``o * k_in + i``) without forming ``G``: ``P_in`` (``k_in x d_in``) and ``P_out``
        (``k_out x d_out``) have i.i.d. +-1/sqrt(k) entries seeded by ``(seed, key)``, so
        ``E[(P_out (x) P_in)^T (P_out (x) P_in)] = I`` (unbiased). With ``fold=True`` the result is
        then CountSketched (s = 1, keyed by the layer) into ``dim`` coordinates, still unbiased, so
        the features of all layers and of :meth:`project` can be summed.

        Args:
            a: ``(n, T, d_in)`` input activations (``T`` positions; unfold patches for
                convolutions), or ``(n, d_in)`` for ``T = 1``.
            delta: ``(n, M, T, d_out)`` output gradients per probe ``m``, or ``(n, M, d_out)``.
            key: Layer identifier (e.g. the module's qualified name); seeds ``P_in`` and ``P_out``.
            d_in, d_out: Layer sizes (checked against the tensors).
            total_dim: ``P`` of the whole parameter vector; required for ``scale="reference"``,
                which multiplies the unbiased features by ``sqrt(dim / P)`` (the convention
                ``E<phi(a), phi(b)> = (K/P) <a, b>`` with ``K = dim``, as for :meth:`project`).
            k_in, k_out: Override :meth:`kronecker_dims`.

        Returns:
            ``(n, M, k_out * k_in)``, or ``(n, M, dim)`` when ``fold=True``.

        Cost: ``2 n T (d_in k_in + M d_out k_out + M k_out k_in)`` flops; memory ``n M k_out k_in``.
        """
        if a.dim() == 2:
            a = a[:, None, :]
        if delta.dim() == 3:
            delta = delta[:, :, None, :]
        if a.dim() != 3 or delta.dim() != 4:
            raise InputError(
                f"project_kronecker expects a (n, T, d_in) and delta (n, M, T, d_out), got "
                f"{tuple(a.shape)} and {tuple(delta.shape)}."
            )
        n, big_t, di = a.shape
        if delta.shape[0] != n or delta.shape[2] != big_t or di != d_in or delta.shape[3] != d_out:
            raise InputError(
                f"shape mismatch: a {tuple(a.shape)}, delta {tuple(delta.shape)}, d_in={d_in}, "
                f"d_out={d_out}; a must be (n, T, d_in) and delta (n, M, T, d_out)."
            )
        if self.scale == "reference" and total_dim is None:
            raise InputError("scale='reference' divides by sqrt(P): pass total_dim=P.")
        ki, ko = self.kronecker_dims(d_in, d_out)
        if k_in is not None:
            ki = _check_int("k_in", k_in, minimum=1)
        if k_out is not None:
            ko = _check_int("k_out", k_out, minimum=1)
        if ki > d_in or ko > d_out:
            raise InputError(
                f"k_in={ki} > d_in={d_in} or k_out={ko} > d_out={d_out}: a side cannot be "
                f"projected to more coordinates than it has; use k <= d (k = d: no projection)."
            )
        dtype = self.dtype or a.dtype
        m = delta.shape[1]
        isz = dtype.itemsize
        folded = 2 * n * m * self.dim if self.fold else 0
        need = isz * (n * big_t * ki + n * m * big_t * ko + 2 * n * m * ko * ki + folded)
        check_memory(
            need, a.device,
            f"project_kronecker of layer {key!r} (dim={self.dim:,}, kron_dim={self.kron_dim:,}, k_in={ki:,}, "
            f"k_out={ko:,}) on {n:,} rows",
            "use a smaller kron_dim (and dim), or fewer rows per call (a smaller batch_size)",
        )
        a = a.to(dtype)
        delta = delta.to(dtype)
        pin = self._kron_factor(key, "in", d_in, ki, a.device, dtype)
        pout = self._kron_factor(key, "out", d_out, ko, a.device, dtype)
        pa = a if pin is None else _matmul(a.reshape(n * big_t, d_in), pin).view(n, big_t, ki)
        if pout is None:
            pd = delta
        else:
            pd = _matmul(delta.reshape(n * m * big_t, d_out), pout).view(n, m, big_t, ko)
        # sum_t pd[n, m, t, o] pa[n, t, i]  -> (n, M, ko, ki)
        feats = torch.matmul(pd.transpose(2, 3), pa[:, None]).reshape(n, m, ko * ki)
        if self.fold:
            words = _seed_words("tangentlens.kron.fold", _GEN_VERSION, self.seed, str(key))
            out = feats.new_zeros((n * m, self.dim))
            self._countsketch(feats.reshape(n * m, ko * ki), 0, out, words, 1, f"fold:{key}")
            feats = out.view(n, m, self.dim)
        if self.scale == "reference":
            assert total_dim is not None
            feats = feats * self._reference_factor(_check_int("total_dim", total_dim, minimum=1))
        return feats


# --------------------------------------------------------------------------------------------------
# output probes (sketched trace over classes)
# --------------------------------------------------------------------------------------------------


def output_probes(
    num_classes: int, m: int | str, seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Probe vectors ``v_1..v_m`` over the ``C`` outputs; the engine backpropagates ``v . f(x)``.

    With ``V`` the ``(m, C)`` result and ``Theta = J(x) J(x')^T``:
    ``sum_m <v_m J(x), v_m J(x')> = Tr(V Theta V^T)``.

    - ``m == C`` (or ``"trace"``): the identity (one-hot probes) -- the exact trNTK^0 = Tr(Theta).
    - ``1 <= m < C``: i.i.d. Rademacher entries scaled by ``1/sqrt(m)``, so ``E[V^T V] = I`` and the
      estimate is unbiased for Tr(Theta). Its variance is
      ``Var = (1/m) sum_{i != j} Theta_ij (Theta_ij + Theta_ji)``: zero when Theta is diagonal, and
      shrinking like ``1/m``. (Cost: ``m`` backward passes instead of ``C``.)
    - ``"pseudo"``: one all-ones probe scaled by ``1/sqrt(C)``: gives the pNTK
      ``(1/C) <sum_c g_c(x), sum_c g_c(x')>`` (a different kernel, not an estimate of the trace).

    Raises:
        InputError: ``num_classes < 1``, ``m`` not an integer in ``[1, C]`` nor a known string, or a
            non-integer seed.
    """
    c = _check_int("num_classes", num_classes, minimum=1)
    seed = _check_int("seed", seed)
    if isinstance(m, str):
        if m == "trace":
            return torch.eye(c, dtype=dtype)
        if m == "pseudo":
            return torch.full((1, c), 1.0 / math.sqrt(c), dtype=dtype)
        raise UnknownKindError(f"Unknown probe spec {m!r}; use an integer 1..C, 'trace' or 'pseudo'.")
    m = _check_int("m (number of output probes)", m, minimum=1)
    if m > c:
        raise InputError(
            f"m={m} probes exceed C={c} classes: m = C already gives the exact trace; use m <= C."
        )
    if m == c:
        return torch.eye(c, dtype=dtype)
    words = _seed_words("tangentlens.probes", _GEN_VERSION, seed, c, m)
    keys = _column_keys(0, m, words, torch.device("cpu"))
    return _rademacher_rows(keys, c, words[2], dtype) * (1.0 / math.sqrt(m))


def probe_variance(theta: Tensor, m: int) -> Tensor:
    """Exact variance of the ``m``-probe Rademacher trace estimate of ``Tr(theta)`` for ``(.., C,
    C)``
    blocks: ``(1/m) sum_{i != j} theta_ij (theta_ij + theta_ji)`` (0 for ``m = C``, the exact
        trace)."""
    m = _check_int("m", m, minimum=1)
    c = theta.shape[-1]
    if m >= c:
        return torch.zeros(theta.shape[:-2], dtype=theta.dtype)
    off = theta - torch.diag_embed(torch.diagonal(theta, dim1=-2, dim2=-1))
    return (off * (off + off.transpose(-1, -2))).sum((-1, -2)) / m


# --------------------------------------------------------------------------------------------------
# fidelity
# --------------------------------------------------------------------------------------------------


def cosine_gram(features: Tensor, other: Tensor | None = None, *, eps: float = 0.0) -> Tensor:
    """Cosine kernel of feature rows: ``(n, ...)`` features are flattened per row (so ``(n, C, K)``
    proj-trNTK features are normalized after summing over classes). Cost ``2 n1 n2 F`` flops."""
    x = features.reshape(features.shape[0], -1)
    y = x if other is None else other.reshape(other.shape[0], -1)
    nx = x.norm(dim=1).clamp_min(eps)
    ny = y.norm(dim=1).clamp_min(eps)
    return (x @ y.T) / nx[:, None] / ny[None, :]


@dataclass(frozen=True)
class FidelityReport:
    """Residual statistics ``r = K_proj - K_exact`` over the off-diagonal entries of a square block.

    ``exp_cdf_a`` is the constant of method.md's fit ``CDF(|r|) = 1 - exp(-|r| K / a)``; its maximum
    likelihood estimate is ``a = K mean|r|`` (so mean|r| ~ a / K). ``quantiles`` are the 0, 1, ...,
    100 percentiles of ``|r|`` (for plotting the empirical CDF).
    """

    K: int | None
    n_entries: int
    mean_abs: float
    median_abs: float
    max_abs: float
    rel_frobenius: float
    exp_cdf_a: float
    quantiles: tuple[float, ...] = field(repr=False, default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (quantiles included)."""
        d = asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d


def fidelity(
    k_proj: Tensor, k_exact: Tensor, dim: int | None = None, *, offdiagonal: bool | None = None
) -> FidelityReport:
    """Compare a projected kernel block with the exact one.

    Args:
        k_proj, k_exact: Same-shape kernel blocks (normally cosine-normalized train x train).
        dim: The projection dimension ``K`` (for ``exp_cdf_a``; NaN when omitted).
        offdiagonal: Use only off-diagonal entries (default: True for square blocks).

    Returns:
        A :class:`FidelityReport`. ``rel_frobenius = ||r||_F / ||K_exact||_F`` over the same
        entries.

    Raises:
        InputError: shapes differ, or no entries remain.
    """
    if k_proj.shape != k_exact.shape or k_proj.dim() != 2:
        raise InputError(
            f"fidelity needs two 2-D kernel blocks of the same shape, got "
            f"{tuple(k_proj.shape)} and {tuple(k_exact.shape)}."
        )
    square = k_proj.shape[0] == k_proj.shape[1]
    off = square if offdiagonal is None else offdiagonal
    if off and not square:
        raise InputError("offdiagonal=True needs a square block.")
    kp = k_proj.detach().to(torch.float64).cpu()
    ke = k_exact.detach().to(torch.float64).cpu()
    if off:
        mask = ~torch.eye(kp.shape[0], dtype=torch.bool)
        kp, ke = kp[mask], ke[mask]
    else:
        kp, ke = kp.reshape(-1), ke.reshape(-1)
    if kp.numel() == 0:
        raise InputError("no kernel entries to compare (need at least 2 x 2 for off-diagonal stats).")
    r = (kp - ke).abs()
    mean = float(r.mean())
    sample = r
    if r.numel() > 2**24:  # torch.quantile's size limit: a seeded subsample
        gen = torch.Generator().manual_seed(0)
        sample = r[torch.randperm(r.numel(), generator=gen)[: 2**24]]
    qs = torch.quantile(sample, torch.linspace(0, 1, 101, dtype=torch.float64))
    denom = float(ke.norm())
    return FidelityReport(
        K=dim,
        n_entries=int(r.numel()),
        mean_abs=mean,
        median_abs=float(qs[50]),
        max_abs=float(r.max()),
        rel_frobenius=float(r.norm()) / denom if denom > 0 else float("inf"),
        exp_cdf_a=dim * mean if dim is not None else float("nan"),
        quantiles=tuple(float(q) for q in qs),
    )


def fidelity_curve(
    make_kernel: Callable[[int], Tensor], k_exact: Tensor, dims: Sequence[int]
) -> list[FidelityReport]:
    """``fidelity(make_kernel(K), k_exact, K)`` for every ``K`` in ``dims`` (ascending).

    ``make_kernel(K)`` returns the projected kernel block at dimension ``K`` (e.g. the cosine Gram
    of ``Projection(K, ...)`` features). Cost: that of ``len(dims)`` projected kernels.
    """
    reports = []
    for k in sorted(_check_int("dim", k, minimum=1) for k in dims):
        reports.append(fidelity(make_kernel(k), k_exact, k))
    return reports


def loglog_slope(reports: Sequence[FidelityReport], stat: str = "mean_abs") -> float:
    """Least-squares slope of ``log(stat)`` against ``log(K)``; about -0.5 for a JL projection."""
    ks = [r.K for r in reports]
    if len(reports) < 2 or any(k is None for k in ks):
        raise InputError("loglog_slope needs at least two reports with K set.")
    x = torch.log(torch.tensor(ks, dtype=torch.float64))
    y = torch.log(torch.tensor([getattr(r, stat) for r in reports], dtype=torch.float64))
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def plot_fidelity(
    reports: Sequence[FidelityReport] | dict[str, Sequence[FidelityReport]],
    path: str,
    *,
    title: str | None = None,
) -> str:
    """Write a two-panel PNG: mean and max ``|r|`` against ``K`` (log-log, with a ``K^-1/2`` guide),
    and the empirical CDF of ``|r| K`` against the fitted ``1 - exp(-x / a)``. ``reports`` may be a
    dict ``label -> reports`` to overlay several projection kinds. Returns ``path``."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    series = dict(reports) if isinstance(reports, dict) else {"projection": list(reports)}
    fig = Figure(figsize=(9, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    for label, reps in series.items():
        reps = [r for r in reps if r.K is not None]
        if not reps:
            continue
        ks = [r.K for r in reps]
        line = ax1.loglog(ks, [r.mean_abs for r in reps], "o-", label=f"{label} mean|r|")[0]
        ax1.loglog(ks, [r.max_abs for r in reps], "^:", color=line.get_color(), alpha=0.6)
        last = reps[-1]
        if last.quantiles:
            q = torch.tensor(last.quantiles) * last.K
            p = torch.linspace(0, 1, len(last.quantiles))
            ax2.plot(q, p, color=line.get_color(), label=f"{label} K={last.K}")
            xs = torch.linspace(0, float(q[-1]), 200)
            ax2.plot(
                xs,
                1 - torch.exp(-xs / last.exp_cdf_a),
                "--",
                color=line.get_color(),
                alpha=0.6,
                label=f"1-exp(-x/a), a={last.exp_cdf_a:.3g}",
            )
    all_reps = [r for reps in series.values() for r in reps if r.K is not None]
    if all_reps:
        k0 = min(r.K for r in all_reps)
        k1 = max(r.K for r in all_reps)
        m0 = max(r.mean_abs for r in all_reps if r.K == k0)
        ax1.loglog([k0, k1], [m0, m0 * math.sqrt(k0 / k1)], "k--", lw=0.8, label="K^-1/2")
    if all_reps:
        ticks = sorted({int(r.K) for r in all_reps if r.K is not None})
        ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax1.set_xticks(ticks, [str(k) for k in ticks])
    ax1.set_xlabel("projection dim K")
    ax1.set_ylabel("|projected - exact| (o mean, ^ max)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("|r| K")
    ax2.set_ylabel("empirical CDF")
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
