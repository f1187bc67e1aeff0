"""The IDX file format: a pure parser, a streaming decoder bounded by the header, and a writer.

An IDX file is a 4-byte magic number (0, 0, type code, number of dimensions), one
big-endian uint32 per dimension, then the data in C order, big-endian.

Files arrive gzip-compressed (any compressor, any number of members) or raw. The header
in the first decoded bytes says exactly how long the whole content is, so `IdxDecoder`
refuses every byte beyond that at once: a gzip bomb costs at most one chunk more than
the file it claims to be, whatever its ratio. The header itself must arrive within the
first HEADER_WITHIN bytes: a stream of empty gzip members never gets that far.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli.safe.errors import DataError
from mlecli.safe.files import atomic_write_bytes

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
# The longest header there is: 255 dimensions.
MAX_HEADER = 4 + 4 * 255
# Decoded bytes are handed on in pieces of at most this many bytes.
CHUNK = 1 << 16
# The header (at most MAX_HEADER decoded bytes) must be complete within this many bytes of the
# file as stored: room for gzip's own header with a file name, a comment or an extra field
# (gzip(1) writes a name of a few dozen bytes) before the first deflated bytes. A stream that
# decodes to no header in that much (empty gzip members, an endless name) is not an IDX file.
HEADER_WITHIN = 1 << 16


def is_gzip(data: bytes) -> bool:
    return data[:2] == GZIP_MAGIC


@dataclass(frozen=True)
class IdxHeader:
    """What an IDX header declares: the type code and the dimensions."""

    code: int
    dims: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return TYPE_CODES[self.code]

    @property
    def header_len(self) -> int:
        return 4 + 4 * len(self.dims)

    @property
    def count(self) -> int:
        return math.prod(self.dims)

    @property
    def data_len(self) -> int:
        return self.count * self.dtype.itemsize

    @property
    def total_len(self) -> int:
        """Bytes of the whole file, header included."""
        return self.header_len + self.data_len

    def describe(self) -> str:
        return "x".join(map(str, self.dims)) or "a scalar"


def read_header(data: bytes, name: str, *, final: bool = False) -> IdxHeader | None:
    """The header at the start of `data`; None while more bytes are needed (unless `final`).

    Raises DataError naming `name` as soon as the bytes cannot start an IDX file.
    """
    if len(data) < 4:
        if final:
            raise DataError(f"{name}: too short to be an IDX file ({len(data)} bytes)")
        return None
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(f"{name}: not an IDX file (magic number {data[:4].hex()} does not start with 0000)")
    if code not in TYPE_CODES:
        known = ", ".join(f"0x{c:02X}" for c in TYPE_CODES)
        raise DataError(f"{name}: unknown IDX type code 0x{code:02X} (known: {known})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        if final:
            raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header_len})")
        return None
    return IdxHeader(code, struct.unpack(f">{ndim}I", data[4:header_len]))


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


class IdxDecoder:
    """Decode one file's bytes, fed in pieces, into IDX content bounded by its own header.

    The first two bytes decide: gzip (any number of members, then optional zero padding)
    or raw IDX. `feed(data)` and, at the end, `finish()` yield the decoded content in
    pieces of at most CHUNK bytes; consume each whole before feeding more. Once the
    header has arrived (`header`), any byte beyond the length it declares, or a header
    declaring more than `limit` bytes, raises DataError naming `name`; so do a header
    still incomplete after HEADER_WITHIN bytes of input, and a truncated or malformed
    stream. Memory use is O(CHUNK) whatever the input.
    """

    def __init__(self, name: str, limit: int = MAX_DECOMPRESSED):
        self.name = name
        self.limit = limit
        self.header: IdxHeader | None = None
        self.produced = 0  # decoded bytes handed out so far
        self.fed = 0  # bytes of the file fed so far
        self.kind: str | None = None  # "gzip" or "raw", once two bytes have arrived
        self._start = b""  # the first byte, while the kind is unknown
        self._head = b""  # decoded bytes while the header is incomplete
        self._inflater = None  # the current gzip member's decompressor
        self._between = b""  # a lone 0x1f that may start the next member
        self._padding = False  # zeros after the last member: only zeros may follow

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self.header is None and self.fed + len(data) > HEADER_WITHIN:
            cut = max(0, HEADER_WITHIN - self.fed)
            yield from self._feed(data[:cut])
            if self.header is None:
                # (only gzip gets here: raw bytes show a header, or that they are none, in 1 KiB)
                raise DataError(
                    f"{self.name}: its first {HEADER_WITHIN:,} bytes decompress to no IDX header "
                    f"({self.produced:,} bytes); it is not an IDX file"
                )
            data = data[cut:]
        yield from self._feed(data)

    def _feed(self, data: bytes) -> Iterator[bytes]:
        self.fed += len(data)
        if self.kind is None:
            data = self._start + data
            if len(data) < 2:
                self._start = data
                return
            self._start = b""
            self.kind = "gzip" if data[:2] == GZIP_MAGIC else "raw"
        if self.kind == "raw":
            for i in range(0, len(data), CHUNK):
                yield from self._emit(data[i : i + CHUNK])
        else:
            yield from self._inflate(data)

    def finish(self) -> Iterator[bytes]:
        """The last pieces; raises DataError if the file ended early."""
        if self.kind is None:  # fewer than two bytes in all: raw
            self.kind = "raw"
            yield from self._emit(self._start)
        if self.kind == "gzip" and (self._inflater is not None or self._between):
            what = "truncated" if self._inflater is not None else "followed by a stray byte"
            raise DataError(f"{self.name}: the gzip stream is {what}; download the file again")
        if self.header is None:
            read_header(self._head, self.name, final=True)
            raise AssertionError("unreachable: a complete header would have been read")
        if self.produced < self.header.total_len:
            raise DataError(
                f"{self.name}: truncated IDX data: the header says {self.header.describe()} "
                f"({self.header.total_len} bytes in all), the file has {self.produced}"
            )

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        try:
            while data:
                if self._padding:
                    if data.strip(b"\x00"):
                        raise DataError(f"{self.name}: unexpected bytes after the gzip stream")
                    return
                if self._inflater is None:  # between members
                    data = self._between + data
                    self._between = b""
                    if data == GZIP_MAGIC[:1]:
                        self._between = data
                        return
                    if data[:2] != GZIP_MAGIC:
                        self._padding = True  # gzip(1) allows zero padding after the last member
                        continue
                    self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                d = self._inflater
                out = d.decompress(data, CHUNK)
                yield from self._emit(out)
                # A full piece may leave output inside zlib even with no input left.
                while not d.eof and (d.unconsumed_tail or len(out) == CHUNK):
                    out = d.decompress(d.unconsumed_tail, CHUNK)
                    yield from self._emit(out)
                if not d.eof:
                    return
                data = d.unused_data
                self._inflater = None
        except zlib.error as exc:
            raise DataError(f"{self.name}: not a valid gzip file ({exc})") from None

    def _emit(self, out: bytes) -> Iterator[bytes]:
        if not out:
            return
        if self.header is None:
            self._head += out[: MAX_HEADER]
            header = read_header(self._head, self.name)
            if header is not None:
                if header.total_len > self.limit:
                    raise DataError(
                        f"{self.name}: its IDX header declares {header.describe()} of {header.dtype.name} "
                        f"({header.total_len:,} bytes), more than the {self.limit:,} allowed"
                    )
                self.header = header
                self._head = b""
        self.produced += len(out)
        if self.header is not None and self.produced > self.header.total_len:
            more = "decompresses to" if self.kind == "gzip" else "holds"
            raise DataError(
                f"{self.name}: {more} more than the {self.header.total_len:,} bytes its IDX header declares "
                f"({self.header.describe()})"
            )
        yield out


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of one uncompressed IDX file into an array of native byte order.

    Shape is the header's dimensions; dtype follows the type code. Raises DataError
    naming `name` for a bad magic number, an unknown type code, truncated data or
    trailing bytes.
    """
    header = read_header(data, name, final=True)
    assert header is not None
    expected = header.total_len
    if len(data) < expected:
        raise DataError(
            f"{name}: truncated IDX data: the header says {header.describe()} "
            f"({expected} bytes in all), the file has {len(data)}"
        )
    if len(data) > expected:
        raise DataError(f"{name}: {len(data) - expected} trailing bytes after the IDX data (expected {expected} bytes)")
    if math.prod(d for d in header.dims if d) * header.dtype.itemsize >= 1 << 62:
        # an empty array (a dimension of 0) whose other dimensions no array can have
        raise DataError(f"{name}: the IDX dimensions {header.describe()} are too large for any array")
    arr = np.frombuffer(data, dtype=header.dtype, count=header.count, offset=header.header_len).reshape(header.dims)
    return arr.astype(header.dtype.newbyteorder("="), copy=True)


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
    """Return the IDX content of `data` (gzip or raw), bounded by the header it declares."""
    decoder = IdxDecoder(name)
    return b"".join([*decoder.feed(data), *decoder.finish()])


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
