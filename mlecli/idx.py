"""The IDX file format: a pure parser, a reader for .gz or raw files, and a writer.

An IDX file is a 4-byte magic number (0, 0, type code, number of dimensions), one
big-endian uint32 per dimension, then the data in C order, big-endian.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from mlecli.errors import DataError
from mlecli.fsutil import atomic_write_bytes

# type code -> big-endian numpy dtype
TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND = {(dt.kind, dt.itemsize): code for code, dt in TYPE_CODES.items()}

GZIP_MAGIC = b"\x1f\x8b"
# Enough for any real IDX dataset; a bigger claim is a corrupt header or a gzip bomb.
MAX_DECOMPRESSED = 4 << 30


def is_gzip(data: bytes) -> bool:
    return data[:2] == GZIP_MAGIC


def gunzip(data: bytes, name: str, limit: int = MAX_DECOMPRESSED) -> bytes:
    """Decompress gzip `data` (several members allowed), refusing more than `limit` bytes."""
    out = bytearray()
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out += d.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise DataError(f"{name}: decompresses to more than {limit} bytes; the file is not a dataset file")
            if not d.eof:
                raise DataError(f"{name}: the gzip stream is truncated; download the file again")
            rest = d.unused_data
            # Trailing zero padding after the last member is allowed by gzip(1).
            if rest and not is_gzip(rest):
                if rest.strip(b"\x00"):
                    raise DataError(f"{name}: unexpected bytes after the gzip stream")
                break
    except zlib.error as exc:
        raise DataError(f"{name}: not a valid gzip file ({exc})") from None
    return bytes(out)


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of one uncompressed IDX file into an array of native byte order.

    Shape is the header's dimensions; dtype follows the type code. Raises DataError
    naming `name` for a bad magic number, an unknown type code, truncated data or
    trailing bytes.
    """
    if len(data) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(data)} bytes)")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(f"{name}: not an IDX file (magic number {data[:4].hex()} does not start with 0000)")
    if code not in TYPE_CODES:
        known = ", ".join(f"0x{c:02X}" for c in TYPE_CODES)
        raise DataError(f"{name}: unknown IDX type code 0x{code:02X} (known: {known})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header_len})")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = TYPE_CODES[code]
    count = 1
    for d in dims:
        count *= d
    expected = header_len + count * dtype.itemsize
    if len(data) < expected:
        raise DataError(
            f"{name}: truncated IDX data: the header says {'x'.join(map(str, dims))} "
            f"({expected} bytes in all), the file has {len(data)}"
        )
    if len(data) > expected:
        raise DataError(f"{name}: {len(data) - expected} trailing bytes after the IDX data (expected {expected} bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode `array` as an uncompressed IDX file."""
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _CODE_OF_KIND:
        raise DataError(f"IDX cannot store dtype {array.dtype} (allowed: uint8, int8, int16, int32, float32, float64)")
    code = _CODE_OF_KIND[key]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=TYPE_CODES[code]).tobytes()


def decode_file_bytes(data: bytes, name: str) -> bytes:
    """Return the IDX content of `data`, decompressing it if it is gzip."""
    return gunzip(data, name) if is_gzip(data) else data


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (detected from its first bytes)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_idx(decode_file_bytes(data, str(path)), str(path))


def write_idx(path: Path | str, array: np.ndarray, compress: bool | None = None) -> None:
    """Write `array` as an IDX file (gzip-compressed if `compress`, default: name ends in .gz)."""
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    data = idx_bytes(array)
    if compress:
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
