"""Reading what `predict` is given: image files, folders of them, .npy arrays, IDX files, stdin.

Each input becomes a `Loaded`: one gray image (H, W) float64 in [0, 1] (0 black, 1
white), or a stack of images (N, H, W) (uint8 0-255, or float 0-1 in the file's own float
type, light ink on dark as in MNIST's files), or of colour pictures (N, H, W, 3|4) uint8.
What a file is, is told by its first bytes, not its name: a .npy header, a gzip stream
(an IDX file inside), an IDX header, or the signature of a picture format mlecli reads
through Pillow (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM). Anything unusable raises InputError
with one line naming it.

Four mechanisms keep one input from hurting the others or the machine:

- `guard`: whatever goes wrong while one input is read or prepared (an OSError, a
  MemoryError, a library's exception, a bug) becomes that input's one InputError.
- Budgets checked before anything is decompressed or allocated, on sizes computed with
  Python's integers (exact, never wrapping): the bytes of a file (MAX_FILE_BYTES), the
  pixels and the longer side of one image (MAX_PIXELS, MAX_SIDE), the images of one file
  (MAX_IMAGES), all from what the file's header declares.
- Only regular files and standard input are read, in pieces, up to what the file's kind
  allows: a named pipe or a device is refused unread, and a stream that starts like nothing
  mlecli reads is refused after its first 64 KB.
- `display`: every name the user sees (in the table, in JSON, in errors) is made once, when
  the input is found, valid Unicode (bytes that are not UTF-8 become `\\xNN`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlecli.data.idx import GZIP_MAGIC, TYPE_CODES, IdxDecoder, IdxHeader, read_header
from mlecli.safe.errors import DataError, InputError, MlecliError, display
from mlecli.safe.files import check_readable
from mlecli.use.preparation import MAX_SIDE, background_behind, composite, luminance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")
PICTURE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # Pillow's names (JPEG: also phones' MPO)
PICTURES = "PNG, JPEG, BMP, GIF, TIFF, WebP, PNM"
MAX_FILE_BYTES = 512 << 20  # one input's bytes, and an IDX file's decompressed bytes
MAX_PIXELS = 50_000_000  # one image
MAX_IMAGES = 300_000  # images in one array or IDX file (MNIST's training set has 60,000)
MAX_NPY_HEADER = 10_000  # numpy's own limit; an array of images has a header of about 100 bytes
HEAD = 1 << 16  # bytes read before a file's kind is known
READ_PIECE = 1 << 20
NPY_MAGIC = b"\x93NUMPY"
STDIN = "-"


@dataclass(frozen=True)
class Source:
    """One thing to read: a file (`path`), or standard input (`path` is None). `name` is what
    the user sees (`display` of what they gave)."""

    name: str
    path: Path | None


@dataclass(frozen=True)
class Loaded:
    """What one source held. A picture (a picture file, or an array of one colour picture):
    `images` (H, W) float64 gray, `picture` True. An array file: `images` (N, H, W) uint8, or
    float 0-1 of any float type, or (N, H, W, 3|4) uint8 colour pictures (converted a chunk
    at a time where they are used), `indexed` when it held a stack (not one image)."""

    source: Source
    images: np.ndarray
    picture: bool
    indexed: bool = False



def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def guard(name: str) -> Iterator[None]:
    """Turn anything that goes wrong inside into an InputError naming `name` (an MlecliError
    passes as it is): one input's failure is that input's line, never the command's end."""
    try:
        yield
    except MlecliError:
        raise
    except MemoryError:
        raise InputError(f"{name}: not enough memory to read it") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read it ({exc.strerror or _why(exc)})") from None
    except RecursionError:
        raise InputError(f"{name}: cannot read it (nested too deeply)") from None
    except Exception as exc:  # any type, on purpose: whatever fails on one input is its line, named by type
        raise InputError(f"{name}: cannot read it ({type(exc).__name__}: {_why(exc)})") from None


# ---------------------------------------------------------------------------
# Finding the inputs


def sources(inputs: list[str]) -> list[Source | InputError]:
    """Expand the command line's inputs in order: a folder becomes its image files sorted by
    name (numbers in names compared as numbers: 2.png before 10.png); `-` is standard input.
    An input that cannot be used (missing, unreadable, a pipe or a device, a folder without
    images) is an InputError in its place; nothing here raises."""
    out: list[Source | InputError] = []
    for item in inputs:
        name = display(item)
        if item == STDIN:
            out.append(Source("<stdin>", None))
            continue
        try:
            out += _expand(item, name)
        except InputError as exc:
            out.append(exc)
    return out


def _expand(item: str, name: str) -> list[Source | InputError]:
    with guard(name):
        if not item:
            raise InputError("'': an empty name is not a file: give an image file or a folder")
        try:
            mode = os.stat(item).st_mode
        except FileNotFoundError:
            raise InputError(f"{name} does not exist") from None
        if stat.S_ISDIR(mode):
            return _folder(item, name)
        if stat.S_ISREG(mode):
            return [Source(name, Path(item))]
        raise InputError(_not_a_file(name, mode))


def _not_a_file(name: str, mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return (f"{name} is a named pipe: mlecli reads files, and pipes only as standard input "
                f"(mlecli predict RUN - < {name})")
    return f"{name} is not a file or a folder (a device or a socket): give an image file"


def _folder(item: str, name: str) -> list[Source | InputError]:
    """A folder's pictures by name: not hidden files, not subfolders. An entry that cannot be
    looked at (a link into a folder this process may not search) is kept: reading it gives
    its own line, and the folder's other pictures are still read."""
    try:
        with os.scandir(item) as entries:
            found = [e for e in entries if not e.name.startswith(".")
                     and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES]
    except OSError as exc:
        raise InputError(f"{name}: cannot list this folder ({exc.strerror or _why(exc)})") from None
    pictures = []
    for entry in found:
        try:
            if entry.is_dir():
                continue
        except OSError:
            pass
        pictures.append(entry)
    if not pictures:
        return [InputError(f"{name}: no images in this folder (files ending in {', '.join(IMAGE_SUFFIXES[:6])}, …)")]
    pictures.sort(key=lambda e: natural_key(e.name))
    return [Source(display(os.path.join(item, e.name)), Path(item) / e.name) for e in pictures]


def natural_key(name: str) -> list:
    """Sort key: runs of ASCII digits compared as numbers, the rest as text (a total order on
    any name: str, int, str, … alternate in every key, so no two are compared across kinds)."""
    parts = re.split(r"([0-9]+)", name)
    return [int(part) if k % 2 else part for k, part in enumerate(parts)]


# ---------------------------------------------------------------------------
# Reading one input


def load(source: Source) -> Loaded:
    """Read one source into gray image(s); raise InputError naming it if it cannot be used."""
    name = source.name
    with guard(name), _opened(source) as (f, size):
        if size is not None and size > MAX_FILE_BYTES + HEAD:  # no kind of input is this big: refused unread
            raise _too_big(name, MAX_FILE_BYTES)
        head = _read_upto(f, HEAD)
        if not head:
            raise InputError(f"{name}: nothing came on standard input" if source.path is None
                             else f"{name}: the file is empty")
        if head.startswith(NPY_MAGIC):
            return _array(source, read_npy_stream(f, head, size, name), idx=False)
        if head.startswith(GZIP_MAGIC):
            data = head + _rest(f, size, len(head), MAX_FILE_BYTES, name)
            return _array(source, read_gzip_idx(data, name), idx=True)
        if looks_like_idx(head):
            return _array(source, read_idx_stream(f, head, size, name), idx=True)
        if not is_picture(head):
            raise InputError(f"{name}: not an image mlecli can read ({PICTURES}), nor a .npy or IDX file")
        data = head + _rest(f, size, len(head), MAX_FILE_BYTES, name)
        return Loaded(source, read_image(bytes(data), name), picture=True)


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[tuple[BinaryIO, int | None]]:
    """The source open for reading, and its size when it is a regular file (None for a pipe).
    A path is opened without waiting for a pipe's writer, and read only if it is a regular file."""
    if source.path is None:
        if sys.stdin is None:
            raise InputError("<stdin>: standard input is closed: pipe an image in, e.g. < digit.png")
        if sys.stdin.isatty():
            raise InputError("<stdin>: no image on standard input (it is a terminal): pipe one in, e.g. < digit.png")
        f = sys.stdin.buffer
        try:
            st = os.fstat(f.fileno())
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (OSError, ValueError, io.UnsupportedOperation):  # a stream without a descriptor (tests)
            size = None
        try:
            yield f, size
        except OSError as exc:
            raise InputError(f"<stdin>: cannot read standard input ({exc.strerror or _why(exc)})") from None
        return
    fd = os.open(source.path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced since it was found
            raise InputError(_not_a_file(source.name, st.st_mode))
        try:
            check_readable(fd, source.path)
        except OSError as exc:
            raise InputError(f"{source.name}: {exc.strerror}: mlecli reads pictures, arrays and IDX files") from None
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def _read_upto(f: BinaryIO, n: int) -> bytearray:
    """At most `n` bytes (fewer at the end), READ_PIECE at a time: nothing is allocated for
    bytes that never come."""
    data = bytearray()
    while len(data) < n:
        piece = f.read(min(READ_PIECE, n - len(data)))
        if not piece:
            break
        data += piece
    return data


def _too_big(name: str, limit: int) -> InputError:
    return InputError(f"{name}: larger than {limit >> 20} MB; no image or array here is that big")


def _declares_too_much(name: str, what: str, size: int) -> InputError:
    return InputError(f"{name}: the {what}'s header declares {size:,} bytes of images, more than the "
                      f"{MAX_FILE_BYTES >> 20} MB mlecli reads from one file: split it")


def _rest(f: BinaryIO, size: int | None, have: int, limit: int, name: str) -> bytearray:
    """The rest of a source whose first `have` bytes were read, refusing more than `limit` in
    all (a regular file by its size, before reading a byte more)."""
    if size is not None and size > limit:
        raise _too_big(name, limit)
    rest = _read_upto(f, limit + 1 - have)
    if have + len(rest) > limit:
        raise _too_big(name, limit)
    return rest


def is_picture(head: bytes) -> bool:
    """Whether `head` starts like a picture in one of PICTURE_FORMATS (their signatures)."""
    return (head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
                             b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"))
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456fF"))


def _array(source: Source, arr: np.ndarray, idx: bool) -> Loaded:
    return array_loaded(source, arr, "IDX file" if idx else ".npy file")


def array_loaded(source: Source, arr: np.ndarray, what: str) -> Loaded:
    """An array file's (or the API's) array as a Loaded: gray images as they are (`check_array`);
    one colour picture H×W×3|4 as a picture, gray by `colour_gray` as a picture file's pixels
    are; N colour pictures as a stack N×H×W×C, made gray a chunk at a time where it is used."""
    images, indexed = check_array(arr, source.name, what)
    if images.ndim == 4 and not indexed:
        return Loaded(source, colour_gray(images[0]), picture=True)
    return Loaded(source, images, picture=False, indexed=indexed)


# ---------------------------------------------------------------------------
# Arrays: what a header declares, checked before a byte of data is used


def image_layout(shape: tuple[int, ...], name: str, what: str) -> tuple[int, int, int, bool]:
    """(N, H, W, indexed) of an array of `shape`, in Python integers, or InputError; and every
    budget checked: no array is built from a shape that fails here.

    (H, W) is one image; (N, H, W) a stack; (784,) one and (N, 784) N flattened 28×28 images;
    a single colour channel (N×H×W×1, N×1×H×W, H×W×1) is dropped; H×W×3|4 is one colour
    picture (RGB, RGBA: as `np.array(PIL image)` gives) and N×H×W×3|4 N of them
    (`colour_channels` tells them apart)."""
    s = tuple(int(d) for d in shape)
    if any(d < 0 for d in s):
        raise InputError(f"{name}: the {what}'s header is damaged (shape {_shape(s)})")
    if colour_channels(s):
        s, indexed = (s[:3] if len(s) == 4 else (1, *s[:2])), len(s) == 4
    elif len(s) == 4 and s[3] == 1:  # N×H×W×1, channels last (Keras)
        s, indexed = s[:3], True
    elif len(s) == 4 and s[1] == 1:  # N×1×H×W, channels first (PyTorch)
        s, indexed = (s[0], s[2], s[3]), True
    elif len(s) == 3 and s[2] == 1 and s[0] > 1 and s[1] > 1:  # H×W×1
        s, indexed = (1, s[0], s[1]), False
    elif len(s) == 1 and s[0] == 784:
        s, indexed = (1, 28, 28), False
    elif len(s) == 2 and s[1] == 784:
        s, indexed = (s[0], 28, 28), True
    elif len(s) == 2:
        s, indexed = (1, *s), False
    elif len(s) == 3:
        indexed = True
    else:
        raise InputError(f"{name}: the {what} holds an array of shape {_shape(tuple(shape))}; images are H×W or "
                         "N×H×W (e.g. 28×28 or N×28×28), or colour pictures H×W×3|4 or N×H×W×3|4")
    n, h, w = s
    if n == 0:
        raise InputError(f"{name}: the {what} holds no images (shape {_shape(tuple(shape))})")
    if h == 0 or w == 0:
        raise InputError(f"{name}: the {what}'s images are empty (shape {_shape(tuple(shape))})")
    if max(h, w) > MAX_SIDE or h * w > MAX_PIXELS:
        raise InputError(f"{name}: the {what}'s images are {h}×{w} pixels: {too_large(h, w)}")
    if n > MAX_IMAGES:
        raise InputError(f"{name}: the {what} holds {n:,} images, more than the {MAX_IMAGES:,} mlecli reads from "
                         "one file: split it")
    return n, h, w, indexed


def colour_channels(shape: tuple[int, ...]) -> int:
    """3 (RGB) or 4 (RGBA) for an array of colour pictures, H×W×C or N×H×W×C; else 0."""
    return shape[-1] if len(shape) in (3, 4) and shape[-1] in (3, 4) else 0


def too_large(h: int, w: int) -> str:
    """What is wrong with an image of h × w pixels that is over a budget."""
    if max(h, w) > MAX_SIDE:
        return f"a side longer than the {MAX_SIDE:,} pixels mlecli reads"
    return f"more than the {MAX_PIXELS // 1_000_000} megapixels mlecli reads"


def _check_dtype(dtype: np.dtype, name: str, what: str) -> None:
    if dtype.hasobject:
        raise InputError(f"{name}: the {what} holds Python objects (loading it would need pickle); refused")
    if dtype.kind not in "buif" or dtype.names is not None or dtype.subdtype is not None:
        raise InputError(f"{name}: the {what} holds {dtype} values; images are uint8 0-255 or float 0-1")


def read_npy_stream(f: BinaryIO, head: bytearray, size: int | None, name: str) -> np.ndarray:
    """A .npy file whose first bytes are `head` and whose rest `f` gives: its header is read,
    its shape and type checked, and only then the bytes it declares are read."""
    offset, shape, fortran, dtype = _npy_header(bytes(head), name)
    n, h, w, _ = image_layout(shape, name, ".npy file")
    count = n * h * w * (colour_channels(shape) or 1)
    need = count * dtype.itemsize  # Python integers: exact however large the header's numbers
    if need > MAX_FILE_BYTES:
        raise _declares_too_much(name, ".npy file", need)
    if size is not None and size - offset < need:
        raise InputError(f"{name}: the .npy file is truncated (its header promises {need} bytes of data, "
                         f"it has {size - offset})")
    data = head + _read_upto(f, offset + need - len(head)) if len(head) < offset + need else head
    if len(data) < offset + need:
        raise InputError(f"{name}: the .npy file is truncated (its header promises {need} bytes of data, "
                         f"it has {len(data) - offset})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def _npy_header(head: bytes, name: str) -> tuple[int, tuple[int, ...], bool, np.dtype]:
    """(data offset, shape, Fortran order, dtype) of a .npy header; a sub-array dtype (('u1', (28, 28))
    with shape (N,)) is folded into the shape, as numpy does when it loads the file."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(io.BytesIO(head))
    except ValueError:  # what read_magic raises for a wrong magic string or too few bytes
        raise InputError(f"{name}: not a readable .npy file (its version is {head[6:8].hex()})") from None
    width = 2 if version == (1, 0) else 4
    if len(head) < 8 + width:
        raise InputError(f"{name}: the .npy file is truncated (in its header)")
    length = int.from_bytes(head[8 : 8 + width], "little")
    if length > MAX_NPY_HEADER:
        raise InputError(f"{name}: the .npy file's header is {length:,} bytes long, more than the "
                         f"{MAX_NPY_HEADER:,} of any array of images: the file is damaged")
    if len(head) < 8 + width + length:
        raise InputError(f"{name}: the .npy file is truncated (in its header)")
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    try:
        f = io.BytesIO(head)
        fmt.read_magic(f)
        shape, fortran, dtype = reader(f)
    except Exception as exc:  # any type: numpy reads it with ast.literal_eval and np.dtype (ValueError,
        # SyntaxError, TypeError, KeyError, OverflowError… for a damaged header)
        why = _why(exc) if "pickle" not in str(exc) else type(exc).__name__
        raise InputError(f"{name}: not a readable .npy file (damaged header: {why})") from None
    if dtype.subdtype is not None and not dtype.hasobject:
        dtype, inner = dtype.subdtype
        shape = (*shape, *inner)
    _check_dtype(dtype, name, ".npy file")
    return 8 + width + length, tuple(shape), bool(fortran), dtype


def looks_like_idx(data: bytes) -> bool:
    return len(data) >= 4 and data[0] == 0 and data[1] == 0 and data[2] in TYPE_CODES and 1 <= data[3] <= 4


def check_idx_header(header: IdxHeader, name: str) -> None:
    """Refuse an IDX file by its header alone: labels, or images over the budgets."""
    if len(header.dims) == 1:
        raise InputError(
            f"{name}: an IDX file of {header.dims[0]} labels (one number each), not of images: "
            "give the images file (…-images-idx3-ubyte)"
        )
    image_layout(header.dims, name, "IDX file")
    if header.total_len > MAX_FILE_BYTES:
        raise _declares_too_much(name, "IDX file", header.total_len)


def read_idx_stream(f: BinaryIO, head: bytearray, size: int | None, name: str) -> np.ndarray:
    """An uncompressed IDX file: its header checked, then exactly the bytes it declares read
    (a file's size is compared with them before any is read)."""
    try:
        header = read_header(bytes(head), name, final=True)
    except DataError as exc:
        raise InputError(str(exc)) from None
    check_idx_header(header, name)
    total = header.total_len
    data = head + _read_upto(f, total + 1 - len(head)) if size is None and len(head) <= total else head
    have = len(data) if size is None else size
    if have < total:
        raise InputError(f"{name}: truncated IDX data: the header says {header.describe()} "
                         f"({total} bytes in all), the file has {have}")
    if have > total:
        extra = f"{have - total} trailing bytes" if size is not None else "trailing bytes"
        raise InputError(f"{name}: {extra} after the IDX data (expected {total} bytes)")
    if size is not None and len(head) < total:
        data = head + _read_upto(f, total - len(head))
    return _idx_array(data, header)


def _idx_array(data: bytes | bytearray, header: IdxHeader) -> np.ndarray:
    """The IDX data as an array view in the file's own (big-endian) type: no copy."""
    return np.frombuffer(data, dtype=header.dtype, count=header.count, offset=header.header_len).reshape(header.dims)


def read_gzip_idx(data: bytes | bytearray, name: str) -> np.ndarray:
    """A gzip-compressed IDX file, decompressed by idx.IdxDecoder: bounded by what its header
    declares, and refused by that header (labels, budgets) before the rest is decompressed."""
    try:  # a peek at the first decompressed bytes: is there an IDX file inside at all?
        first = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(bytes(data[:HEAD]), 4)
    except zlib.error as exc:
        raise InputError(f"{name}: not a valid gzip file ({exc})") from None
    if len(first) == 4 and not looks_like_idx(first):
        raise InputError(f"{name}: a gzip file that does not hold an IDX file (images like MNIST's)")
    decoder = IdxDecoder(name)  # its own bound: the header's; ours: check_idx_header's, on the first piece
    content = bytearray()
    try:
        for piece in (*_pieces(decoder.feed(bytes(data)), decoder, name), *decoder.finish()):
            content += piece
    except DataError as exc:
        raise InputError(str(exc)) from None
    return _idx_array(content, decoder.header)


def _pieces(pieces: Iterator[bytes], decoder: IdxDecoder, name: str) -> Iterator[bytes]:
    checked = False
    for piece in pieces:
        if not checked and decoder.header is not None:
            check_idx_header(decoder.header, name)  # before a byte more is decompressed
            checked = True
        yield piece


def check_array(arr: np.ndarray, name: str, what: str = "array") -> tuple[np.ndarray, bool]:
    """An array of images as (N, H, W), or of colour pictures as (N, H, W, C) uint8, and whether
    it was a stack (N, …) rather than one image.

    Layout and budgets as `image_layout`. bool becomes 0/255 uint8, integers 0-255 uint8,
    floats 0-1 stay in their own float type (checked here a block at a time, converted
    where they are used, a chunk at a time); colour floats 0-1 become uint8 ⌊255·x + ½⌋,
    the pixels of the picture file the array would be saved as."""
    _check_dtype(arr.dtype, name, what)
    n, h, w, indexed = image_layout(arr.shape, name, what)
    channels = colour_channels(arr.shape)
    if not channels:
        return _pixels(arr.reshape(n, h, w), name, what), indexed
    pixels = _pixels(arr.reshape(n, h, w, channels), name, what)
    if pixels.dtype != np.uint8:
        pixels = np.concatenate([np.floor(255 * b.astype(np.float64) + 0.5).astype(np.uint8) for b in _blocks(pixels)])
    return pixels, indexed


BLOCK_PIXELS = 1 << 22  # pixels checked at a time (32 MB of float64 temporaries at most)


def _blocks(arr: np.ndarray) -> Iterator[np.ndarray]:
    step = max(1, BLOCK_PIXELS // (arr.shape[1] * arr.shape[2]))
    for k in range(0, len(arr), step):
        yield arr[k : k + step]


def _pixels(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    kind = arr.dtype.kind
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if kind in "ui":
        lo = min(int(b.min()) for b in _blocks(arr))
        hi = max(int(b.max()) for b in _blocks(arr))
        if lo < 0 or hi > 255:
            raise InputError(
                f"{name}: the {what} holds {arr.dtype} values from {lo} to {hi}; integer images must be 0-255"
            )
        return arr.astype(np.uint8, copy=False)
    bad = sum(int(np.count_nonzero(~np.isfinite(b))) for b in _blocks(arr))
    if bad:
        raise InputError(f"{name}: the {what} holds {bad} NaN or infinite values; images must be finite")
    lo = min(float(b.min()) for b in _blocks(arr))
    hi = max(float(b.max()) for b in _blocks(arr))
    if lo < 0 or hi > 1:
        if 0 <= lo and 2 <= hi <= 255:
            hint = ": divide it by 255"
        elif -1 < lo and hi < 2:
            hint = ": clip it to 0-1"
        else:
            hint = ""
        raise InputError(f"{name}: the {what} holds {arr.dtype} values from {_number(lo)} to {_number(hi)}; "
                         f"float images must be 0-1{hint}")
    return arr


def _number(x: float) -> str:
    """`x` short (%g) when that is exact, else every digit: 1+1e-12 is not shown as 1."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "() (a single number)"


# ---------------------------------------------------------------------------
# Pictures, through Pillow: one path for a file's picture and a PIL image alike


def read_image(data: bytes, name: str) -> np.ndarray:
    """A picture file's first frame as gray (H, W) float64 in [0, 1] (see `picture_gray`)."""
    from PIL import Image, UnidentifiedImageError  # lazy: Pillow only for pictures, not arrays

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # we bound the size ourselves, in picture_gray
        try:
            img = Image.open(io.BytesIO(data), formats=PICTURE_FORMATS)
        except Image.DecompressionBombError:  # over 179 megapixels, by its header
            raise InputError(
                f"{name}: more than the {MAX_PIXELS // 1_000_000} megapixels mlecli reads; "
                "scale it down or crop it to the digit"
            ) from None
        except UnidentifiedImageError:
            raise InputError(f"{name}: not an image mlecli can read ({PICTURES}), nor a .npy or IDX file") from None
        except Exception as exc:  # any type: Pillow's format plugins raise many (SyntaxError, struct.error,
            # ValueError, OSError…) on a damaged header
            raise InputError(f"{name}: not a readable image ({_why(exc)})") from None
        return picture_gray(img, name)


def picture_gray(img, name: str) -> np.ndarray:
    """A PIL image (its first frame) as gray (H, W) float64 in [0, 1], turned upright by its EXIF
    orientation: the one conversion for every picture, read from a file or handed to the API.

    Its size is checked first (MAX_PIXELS, MAX_SIDE, not empty). 16-bit images keep their
    depth; 32-bit integer images, and float images beyond 0-1, are scaled from their own
    darkest to lightest value; transparency (an alpha band, premultiplied or not, or a tRNS
    colour key) is filled with the colour opposite the ink; any other mode becomes RGB."""
    from PIL import ImageOps  # lazy: Pillow only for pictures, not arrays

    width, height = img.size
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise InputError(f"{name}: {width}×{height} pixels: {too_large(height, width)}; scale it down or crop it "
                         "to the digit")
    if width == 0 or height == 0:
        raise InputError(f"{name}: the image is empty ({width}×{height} pixels)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # any type: a damaged EXIF block (KeyError, TypeError, struct.error…): keep the
                # picture as stored
                pass
            return _gray(img)
        except MlecliError:
            raise
        except Exception as exc:  # any type: Pillow's decoders raise many (OSError, ValueError, SyntaxError,
            # struct.error, EOFError…) on a damaged body
            raise InputError(f"{name}: not a readable image ({_why(exc)})") from None


def _gray(img) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float64)
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float64) / 65535.0
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("it holds NaN or infinite pixel values")
        lo, hi = arr.min(), arr.max()
        if mode == "F" and lo >= 0 and hi <= 1:
            return arr
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode in ("La", "RGBa", "PA"):  # premultiplied alpha, or a palette with alpha: plain RGBA
        img = img.convert("LA" if mode == "La" else "RGBA")
    if "A" in img.getbands() or "transparency" in img.info:
        return colour_gray(np.asarray(img if img.mode == "RGBA" else img.convert("RGBA")))
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8) / 255.0
    return colour_gray(np.asarray(img.convert("RGB")))


def colour_gray(pixels: np.ndarray) -> np.ndarray:
    """Colour pixels (H, W, 3) RGB or (H, W, 4) RGBA uint8 as gray (H, W) float64 in [0, 1]: the
    conversion of every colour picture, a file's, a PIL image's or an array's. Luma; behind
    transparent pixels the colour opposite the ink, decided on the whole picture."""
    if pixels.shape[-1] == 3:
        return _by_rows(pixels, luminance)
    if np.all(pixels[..., 3] == 255):
        return _by_rows(pixels, lambda p: luminance(p[..., :3]))
    back = background_behind(pixels)  # decided on the whole picture, then applied by rows
    return _by_rows(pixels, lambda p: composite(p, back))


def _by_rows(pixels: np.ndarray, fn, block: int = 1 << 18) -> np.ndarray:
    """fn on (H, W, C) uint8 pixels a block of rows at a time (the float64 temporaries of a
    whole 50-megapixel photo would take gigabytes); the same numbers as fn on the whole."""
    h, w = pixels.shape[:2]
    rows = max(1, block // max(w, 1))
    out = np.empty((h, w), np.float64)
    for r in range(0, h, rows):
        out[r : r + rows] = fn(pixels[r : r + rows])
    return out

