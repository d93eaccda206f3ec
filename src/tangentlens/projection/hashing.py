"""Counter-based hashing and the seeded random rows every projection kind is built from.

Every random entry is a pure function of a seed and of a *global* index (a column of the projected
vector, a class, a layer side), computed with plain integer tensor operations on uint32 values held
in int64 tensors (no product ever exceeds 2^63). There is no sequential random stream, so any slice
of a matrix can be generated alone, and the same seed gives the same entries on CPU and CUDA.
``GEN_VERSION`` is part of every seed: bump it when a generated matrix changes (it is stored in
``Projection.to_dict()``).
"""

from __future__ import annotations

import hashlib
import numbers
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError

__all__ = [
    "GEN_VERSION",
    "M32",
    "GAUSS_BLOCK",
    "check_int",
    "mix32",
    "seed_words",
    "column_keys",
    "word_hash",
    "rademacher_bytes",
    "expand_bytes",
    "rademacher_rows",
    "gaussian_rows",
    "hadamard",
    "parity_sign",
]

GEN_VERSION = 1  # bump when the generated matrices change; stored in Projection.to_dict()
M32 = 0xFFFFFFFF
GAUSS_BLOCK = 64  # columns per independently seeded Gaussian block


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an int, refusing bools, non-integers and values below ``minimum``.

    Raises:
        InputError: the message names ``name`` and the value received.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}.")
    return value


def mix32(x: Tensor) -> Tensor:
    """32-bit avalanche hash ("lowbias32" family, Wellons), elementwise on uint32s held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def seed_words(*parts: object, n: int = 4) -> list[int]:
    """``n`` deterministic 32-bit words derived from ``parts`` (blake2b of their repr, not Python's
    salted ``hash``), so a seed means the same matrix in every process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4 * n).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(n)]


def column_keys(start: int, stop: int, words: Sequence[int], device: torch.device) -> Tensor:
    """One uint32 key per global column index in ``[start, stop)`` (int64 tensor): ``mix(mix(lo ^
    w0) ^ (hi + w1))`` of the index's low and high 32 bits, so indices past 2^32 stay distinct."""
    j = torch.arange(start, stop, dtype=torch.int64, device=device)
    lo = j & M32
    hi = j >> 32
    return mix32(mix32(lo ^ words[0]) ^ ((hi + words[1]) & M32))


def word_hash(col_keys: Tensor, n_words: int, salt: int) -> Tensor:
    """``(len(col_keys), n_words)`` uint32 words: ``mix(mix(col_key ^ word_key) + salt)``."""
    w = torch.arange(n_words, dtype=torch.int64, device=col_keys.device)
    wk = mix32((w * 0x9E3779B9 + salt) & M32)
    return mix32((mix32(col_keys[:, None] ^ wk[None, :]) + 0x6A09E667) & M32)


_LUT_CACHE: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _sign_lut(device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(256, 8)`` table: row b holds (+1 if bit i of b else -1) for i = 0..7."""
    key = (device, dtype)
    if key not in _LUT_CACHE:
        b = torch.arange(256, dtype=torch.int64)
        bits = (b[:, None] >> torch.arange(8, dtype=torch.int64)[None, :]) & 1
        _LUT_CACHE[key] = (bits * 2 - 1).to(device=device, dtype=dtype).contiguous()
    return _LUT_CACHE[key]


def rademacher_bytes(col_keys: Tensor, width: int, salt: int) -> Tensor:
    """The packed +-1 matrix: ``(len(col_keys), 4 * ceil(width / 32))`` uint8, 8 signs per byte
    (bit i of byte q of j's word w is entry (j, 32 w + 8 q + i)); one hash per 32 entries."""
    n_words = (width + 31) // 32
    p = col_keys.shape[0]
    h = word_hash(col_keys, n_words, salt)
    h = (h - ((h >> 31) << 32)).to(torch.int32)  # same bits, signed range
    b = h.view(torch.uint8)  # (p, 4 W) bytes
    if sys.byteorder == "big":
        b = b.view(p, n_words, 4).flip(-1).reshape(p, 4 * n_words)
    return b


def expand_bytes(b: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """Unpack ``(p, B)`` sign bytes to a ``(p, 8 B)`` +-1 matrix (one 8-entry table row per byte),
    into ``out`` when given."""
    p, nb = b.shape
    lut = _sign_lut(b.device, dtype)
    if out is None:
        out = torch.empty((p, 8 * nb), dtype=dtype, device=b.device)
    torch.index_select(lut, 0, b.reshape(-1).to(torch.int32), out=out.view(p * nb, 8))
    return out


def rademacher_rows(
    col_keys: Tensor, width: int, salt: int, dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """``(len(col_keys), width)`` +-1 matrix: entry (j, k) is bit ``k % 32`` of j's word ``k//32``.

    Cost: one hash per 32 entries and one 8-entry table lookup per byte, written into ``out`` (a
    reused ``(p, 32 * ceil(width / 32))`` buffer) when given: ~1-2 ns per entry on one core; a fresh
    allocation costs more than the generation itself (page faults).
    """
    return expand_bytes(rademacher_bytes(col_keys, width, salt), dtype, out)[:, :width]


def gaussian_rows(
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
    for b in range(j0 // GAUSS_BLOCK, (j1 - 1) // GAUSS_BLOCK + 1):
        lo, hi = b * GAUSS_BLOCK, (b + 1) * GAUSS_BLOCK
        gen.manual_seed(
            int.from_bytes(hashlib.blake2b(repr((*words, b)).encode(), digest_size=7).digest(), "little")
        )
        a0, a1 = max(lo, j0), min(hi, j1)
        if a0 == lo and a1 == hi:
            torch.randn((GAUSS_BLOCK, width), generator=gen, out=buf[a0 - j0 : a1 - j0])
        else:
            block = torch.randn((GAUSS_BLOCK, width), generator=gen, dtype=work)
            buf[a0 - j0 : a1 - j0] = block[a0 - lo : a1 - lo]
    if direct:
        return buf
    if out is not None:
        return out.copy_(buf)
    return buf.to(device=device, dtype=dtype)


def parity_sign(x: Tensor) -> Tensor:
    """(-1)^popcount(x) for non-negative int64 ``x`` < 2^32, as int64."""
    x = x ^ (x >> 16)
    x = x ^ (x >> 8)
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return 1 - 2 * (x & 1)


def hadamard(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sylvester-Hadamard matrix of order ``size`` (a power of 2): H[r,c] = (-1)^popcount(r & c)."""
    r = torch.arange(size, dtype=torch.int64, device=device)
    return parity_sign(r[:, None] & r[None, :]).to(dtype)
