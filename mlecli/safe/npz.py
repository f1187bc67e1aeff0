"""Reading and writing .npz files (uncompressed, arrays only), defensively.

np.load trusts a file's headers: a flipped bit in a shape can make it allocate
terabytes, a damaged header can raise tokenizer errors, and a zip directory may list
one stored member many times (or members that overlap), so that a small file expands
into gigabytes of arrays. This reader checks the whole structure before it allocates
anything: a directory of bounded size; every member a stored (uncompressed) .npy with a
unique name, lying inside the file, before the directory and overlapping no other
member; a header numpy can parse, no Python objects, C order, and exactly as many
bytes as the header promises. The arrays it returns therefore never add up to more
bytes than the file has. With `check_crc` the zip's CRC-32 of each member is verified
too (checkpoints, where a flipped bit in a weight must not go unnoticed). Any problem
is a ValueError.

`write` makes the same kind of file, byte-identical for the same arrays (no
timestamps), streaming each array (a memory map will do) without copying it whole.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlecli.safe.files import open_regular

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_HEADER_ERRORS = (ValueError, SyntaxError, TypeError, tokenize.TokenError, RecursionError, OverflowError, KeyError)
# zipfile's own complaints about a damaged directory.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, struct.error, EOFError, KeyError,
               OverflowError, ValueError)
MAX_MEMBERS = 256  # mlecli's files hold a few dozen arrays at most
MAX_DIRECTORY = 1 << 20  # bytes of central directory
_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_LOCAL = b"PK\x03\x04"
# Every member gets this timestamp, so that the same arrays always give the same bytes
# (np.savez stamps the current time: two saves of one state would differ).
_EPOCH = (1980, 1, 1, 0, 0, 0)
# Bytes read (and checked) at a time: small enough to stay in the CPU's cache.
_PIECE = 1 << 20


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of an uncompressed .npz holding `arrays` (which np.load reads), a pure
    function of the arrays' names, dtypes, shapes and values."""
    buf = io.BytesIO()
    write(buf, arrays)
    return buf.getvalue()


class ObjectArrayError(ValueError):
    """A member holds Python objects: loading it would need pickle."""


def read(path: Path | str, *, check_crc: bool, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays in the .npz at `path` by name (without .npy): all of them, or just `names`."""
    arrays = {}
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        for name, start, length, crc in _members(f, size):
            key = name.removesuffix(".npy")
            if names is not None and key not in names:
                continue
            arrays[key] = _read_member(f, name, start, length, crc if check_crc else None)
    return arrays


def member_sizes(path: Path | str) -> dict[str, int]:
    """Bytes of each member's data (its .npy, header included) by name without .npy."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        return {name.removesuffix(".npy"): length for name, _, length, _ in _members(f, size)}


def _members(f: BinaryIO, size: int) -> list[tuple[str, int, int, int]]:
    """(name, data offset, data length, CRC-32) of every member, after checking the zip's structure."""
    cd_start, cd_size, entries = _directory(f, size)
    if entries > MAX_MEMBERS or cd_size > MAX_DIRECTORY:
        raise ValueError(f"the zip directory lists {entries} members in {cd_size} bytes; too many for an mlecli file")
    try:
        infos = zipfile.ZipFile(f).infolist()
    except _ZIP_ERRORS as exc:
        raise ValueError(f"not a readable zip file ({type(exc).__name__}: {exc})") from None
    seen = set()
    spans = []
    for info in infos:
        name = info.filename
        if name in seen:
            raise ValueError(f"member {name} is listed twice")
        seen.add(name)
        if info.compress_type != zipfile.ZIP_STORED or not name.endswith(".npy"):
            raise ValueError(f"member {name} is not a stored .npy")
        if info.flag_bits & 0x08:
            raise ValueError(f"member {name} uses a data descriptor (not written by mlecli)")
        if info.compress_size != info.file_size:
            raise ValueError(f"member {name} is stored with {info.compress_size} bytes but claims {info.file_size}")
        if not 0 <= info.header_offset <= size - 30:
            raise ValueError(f"member {name} starts outside the file")
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != _LOCAL:
            raise ValueError(f"bad local header for member {name}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        if f.read(name_len) != name.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise ValueError(f"member {name} has another name in its local header")
        start = info.header_offset + 30 + name_len + extra_len
        end = start + info.file_size
        if end > cd_start:
            raise ValueError(f"member {name} runs past the start of the zip directory (its sizes are wrong)")
        spans.append((info.header_offset, end, name, start, info.CRC))
    spans.sort()
    for (_, end, name, *_), (nxt, _, other, *_) in itertools.pairwise(spans):
        if nxt < end:
            raise ValueError(f"members {name} and {other} overlap")
    return [(name, start, end - start, crc) for _, end, name, start, crc in spans]


def _directory(f: BinaryIO, size: int) -> tuple[int, int, int]:
    """(offset, size, number of entries) of the central directory, from the end records."""
    tail_len = min(size, 22 + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        raise ValueError("not a zip file (no end of central directory)")
    entries, cd_size, cd_start = struct.unpack("<HII", tail[at + 10 : at + 20])
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_start == 0xFFFFFFFF:
        loc = at - 20
        if loc < 0 or tail[loc : loc + 4] != _EOCD64_LOCATOR:
            raise ValueError("a zip64 directory without its locator")
        (eocd64,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
        if eocd64 > size - 56:
            raise ValueError("the zip64 end record lies outside the file")
        f.seek(eocd64)
        rec = f.read(56)
        if rec[:4] != _EOCD64:
            raise ValueError("bad zip64 end record")
        entries, cd_size, cd_start = struct.unpack("<QQQ", rec[32:56])
    if cd_start + cd_size > size:
        raise ValueError("the zip directory lies outside the file")
    return cd_start, cd_size, entries


def _read_member(f: BinaryIO, name: str, start: int, length: int, crc_expected: int | None) -> np.ndarray:
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = _HEADER_READERS[version](f)
    except _HEADER_ERRORS as exc:
        raise ValueError(f"member {name} has a damaged .npy header ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise ObjectArrayError(f"member {name} holds Python objects")
    if fortran:
        raise ValueError(f"member {name} is not in C order")
    count = 1
    for d in shape:
        count *= d
    header_len = f.tell() - start
    if header_len + count * dtype.itemsize != length:
        raise ValueError(f"member {name}: its header promises {count} items of {dtype}, not what it holds")
    arr = np.empty(count, dtype=dtype)
    data = memoryview(arr.view(np.uint8))
    crc = None
    if crc_expected is not None:
        f.seek(start)
        crc = zlib.crc32(f.read(header_len))
    # One pass: each piece is checked while it is still in the CPU's cache, right after it
    # is read into the array (reading it twice, once for the CRC, took twice as long).
    done = 0
    while done < len(data):
        got = f.readinto(data[done : done + _PIECE])
        if not got:
            raise ValueError(f"member {name} is truncated")
        if crc is not None:
            crc = zlib.crc32(data[done : done + got], crc)
        done += got
    if crc is not None and crc != crc_expected:
        raise ValueError(f"member {name} fails its CRC-32 check (the file is damaged)")
    return arr.reshape(shape)


def write(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as a stored .npz into the seekable file `f`; same arrays, same bytes."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=arr.nbytes > (1 << 30)) as out:
                np.lib.format.write_array(out, np.asarray(arr, order="C"), allow_pickle=False)
