"""Reader for the IDX format used by MNIST and Fashion-MNIST (raw or gzip-compressed).

Layout: two zero bytes, one type byte (``0x08`` = uint8, also ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
``0x0D`` float32, ``0x0E`` float64), one byte ``ndim``, then ``ndim`` big-endian uint32 dimensions, then the
data in C order (big-endian for multi-byte types). Gzip is detected from the content, not the file name.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import BinaryIO

import numpy as np

from featkd.errors import DataError

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(source: str | os.PathLike[str] | BinaryIO, *, name: str | None = None) -> np.ndarray:
    """Read one IDX array from a path or a binary file object; returns a writable array in native byte order.

    ``name`` is the file name used in error messages (defaults to the path or the file object's ``name``).
    Raises :class:`DataError` naming the file when it is missing, not IDX, or truncated.
    """
    if isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise DataError(f"{label}: file not found") from None
        except OSError as e:
            raise DataError(f"{label}: cannot read ({e.strerror or e})") from None
    else:
        label = name or str(getattr(source, "name", None) or "<IDX stream>")
        raw = source.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{label}: corrupt or truncated gzip data ({e})") from None
    return parse_idx(raw, label)


def parse_idx(raw: bytes, label: str = "<IDX bytes>") -> np.ndarray:
    """Parse the uncompressed bytes of an IDX file (see :func:`read_idx`)."""
    if len(raw) < 4:
        raise DataError(f"{label}: not an IDX file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{label}: not an IDX file (bad magic {raw[:4].hex()}; expected 0000 08 <ndim>)")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    if ndim == 0:
        raise DataError(f"{label}: bad IDX header (ndim is 0)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{label}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise DataError(
            f"{label}: truncated IDX file (shape {shape} needs {expected} data bytes, found {found})"
        )
    if found > expected:
        raise DataError(f"{label}: IDX file has {found - expected} unexpected bytes after shape {shape}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as IDX; gzip it when ``compress`` is true (default: when the name ends in ``.gz``)."""
    array = np.asarray(array)
    code = next(
        (k for k, v in _DTYPES.items() if (v.kind, v.itemsize) == (array.dtype.kind, array.dtype.itemsize)),
        None,
    )
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    if compress is None:
        compress = os.fspath(path).endswith(".gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(payload, compresslevel=1) if compress else payload)
