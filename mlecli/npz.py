"""Reading .npz files that mlecli wrote (uncompressed, arrays only), defensively.

np.load trusts a file's headers: a flipped bit in a shape can make it allocate
terabytes, and a damaged header can raise tokenizer errors. This reader checks every
member before it allocates anything: a stored (uncompressed) .npy, a header numpy can
parse, no Python objects, C order, and exactly as many bytes as the header promises.
With `check_crc` the zip's CRC-32 of each member is verified too (checkpoints, where
a flipped bit in a weight must not go unnoticed). Any problem is a ValueError.
"""

from __future__ import annotations

import io
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_HEADER_ERRORS = (ValueError, SyntaxError, TypeError, tokenize.TokenError, RecursionError, OverflowError, KeyError)


# Every member gets this timestamp, so that the same arrays always give the same bytes
# (np.savez stamps the current time: two saves of one state would differ).
_EPOCH = (1980, 1, 1, 0, 0, 0)


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of an uncompressed .npz holding `arrays` (which np.load reads), a pure
    function of the arrays' names, dtypes, shapes and values."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr, order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


class ObjectArrayError(ValueError):
    """A member holds Python objects: loading it would need pickle."""


def read(path: Path | str, *, check_crc: bool, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays in the .npz at `path` by name (without .npy): all of them, or just `names`."""
    arrays = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename
            if names is not None and name.removesuffix(".npy") not in names:
                continue
            if info.compress_type != zipfile.ZIP_STORED or not name.endswith(".npy"):
                raise ValueError(f"member {name} is not a stored .npy")
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"bad local header for member {name}")
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
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
            if header_len + count * dtype.itemsize != info.file_size:
                raise ValueError(f"member {name}: its header promises {count} items of {dtype}, not what it holds")
            if check_crc:
                f.seek(start)
                if zlib.crc32(f.read(info.file_size)) != info.CRC:
                    raise ValueError(f"member {name} fails its CRC-32 check (the file is damaged)")
                f.seek(start + header_len)
            arr = np.fromfile(f, dtype=dtype, count=count)
            if arr.size != count:
                raise ValueError(f"member {name} is truncated")
            arrays[name[:-4]] = arr.reshape(shape)
    return arrays
