"""Read IDX files (the MNIST / Fashion-MNIST container format), optionally gzipped.

An IDX file is: two zero bytes, a type code byte, a byte ``d`` with the number of dimensions,
then ``d`` big-endian uint32 sizes, then the data in row-major (C) order, big-endian.
Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.

Cost: one pass over the file; memory = the decoded array (MNIST train images: 47 MB as uint8).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from tangentlens.errors import InputError

__all__ = ["IDX_DTYPES", "read_idx", "write_idx", "load_idx_pair", "find_idx"]

#: IDX type code -> numpy dtype (big-endian as stored).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(
            f"IDX file not found: {path}. Run scripts/install_data.sh or pass the right path."
        )
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as fh:  # type: ignore[operator]
            return fh.read()
    except (OSError, EOFError) as exc:  # truncated / corrupt gzip
        raise InputError(f"cannot read {path}: {exc}. Re-install the file.") from exc


def read_idx(
    path: str | os.PathLike[str],
    *,
    expect_ndim: int | None = None,
    expect_shape: tuple[int | None, ...] | None = None,
) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed, detected from its first bytes).

    Args:
        path: File path.
        expect_ndim: If given, the number of dimensions the header must declare (3 for images,
            1 for labels).
        expect_shape: If given, the sizes the header must declare; ``None`` entries match any size.

    Returns:
        A C-contiguous numpy array in native byte order with the dtype named by the header
        (uint8 for MNIST) and the declared shape.

    Raises:
        InputError: missing file, bad magic number (the first two bytes must be zero, the type
            code one of :data:`IDX_DTYPES`), a payload shorter or longer than the header declares,
            or dimensions that do not match ``expect_ndim`` / ``expect_shape``.
    """
    p = Path(path)
    raw = _read_bytes(p)
    if len(raw) < 4:
        raise InputError(f"{p} is too short to be an IDX file ({len(raw)} bytes).")
    if raw[0] != 0 or raw[1] != 0:
        raise InputError(
            f"{p}: bad IDX magic number 0x{raw[:4].hex()} (must start with two zero bytes); "
            "is this really an IDX file?"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise InputError(
            f"{p}: unknown IDX type code 0x{code:02x}; expected one of "
            + ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        )
    if ndim == 0:
        raise InputError(f"{p}: IDX header declares 0 dimensions.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{p}: truncated IDX header ({len(raw)} bytes, need {header}).")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        raise InputError(
            f"{p}: payload has {got} bytes but the header shape {shape} of {dtype.name} "
            f"needs {expected}; "
            "the file is truncated or corrupt - re-install it."
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise InputError(
            f"{p}: expected {expect_ndim} dimensions, the header declares {ndim} {shape}."
        )
    if expect_shape is not None:
        if len(expect_shape) != ndim or any(
            e is not None and e != s for e, s in zip(expect_shape, shape, strict=True)
        ):
            raise InputError(f"{p}: expected shape {expect_shape}, the header declares {shape}.")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(
    path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None
) -> None:
    """Write ``array`` as an IDX file (gzipped when ``compress`` or the name ends in ``.gz``).

    Args:
        path: Destination.
        array: Array with a dtype of :data:`IDX_DTYPES` (any byte order) and at least one dimension.
        compress: Force gzip on/off; default decides from the suffix.

    Raises:
        InputError: unsupported dtype or a 0-d array.
    """
    a = np.asarray(array)
    if a.ndim == 0 or a.ndim > 255:
        raise InputError(f"IDX needs 1..255 dimensions, got {a.ndim}.")
    native = a.dtype.newbyteorder("=")
    if native not in _CODE_OF:
        raise InputError(
            f"dtype {a.dtype} has no IDX type code; use uint8/int8/int16/int32/float32/float64."
        )
    code = _CODE_OF[native]
    body = (
        bytes([0, 0, code, a.ndim])
        + np.asarray(a.shape, dtype=">u4").tobytes()
        + np.ascontiguousarray(a, dtype=IDX_DTYPES[code]).tobytes()
    )
    p = Path(path)
    gz = p.suffix == ".gz" if compress is None else compress
    if gz:
        with gzip.open(p, "wb") as fh:
            fh.write(body)
    else:
        p.write_bytes(body)


def find_idx(directory: str | os.PathLike[str], stem: str) -> Path:
    """Return ``directory/stem`` or ``directory/stem.gz``, whichever exists.

    Raises:
        InputError: neither exists.
    """
    d = Path(directory)
    for cand in (d / stem, d / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise InputError(
        f"neither {d / stem} nor {d / stem}.gz exists; "
        "run scripts/install_data.sh or pass the data folder."
    )


def load_idx_pair(
    directory: str | os.PathLike[str], split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Load the images and labels of an MNIST-layout folder.

    Args:
        directory: Folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: ``"train"`` or ``"test"`` (``"t10k"`` accepted).

    Returns:
        ``(images, labels)``: uint8 arrays of shape (N, H, W) and (N,).

    Raises:
        InputError: unknown split, missing files, or image and label counts that differ.
    """
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise InputError(f"split must be 'train' or 'test', got {split!r}.")
    images = read_idx(find_idx(directory, f"{prefix}-images-idx3-ubyte"), expect_ndim=3)
    labels = read_idx(find_idx(directory, f"{prefix}-labels-idx1-ubyte"), expect_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise InputError(
            f"{directory}: {images.shape[0]} {split} images but {labels.shape[0]} labels; "
            "re-install the data."
        )
    return images, labels
