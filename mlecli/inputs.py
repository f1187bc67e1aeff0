"""Reading what `predict` is given: image files, folders of them, .npy arrays, IDX files, stdin.

Each input becomes a `Loaded`: one gray image (H, W) float64 in [0, 1] (0 black, 1
white), or a stack of images (N, H, W) (uint8 0-255 or float64 0-1, light ink on dark as
in MNIST's files). What a file is, is told by its content, not its name: a .npy header,
a gzip stream (an IDX file inside), an IDX header, else an image for Pillow (PNG, JPEG,
BMP, GIF, TIFF, WebP, …). Anything unusable raises InputError with one line naming it.
"""

from __future__ import annotations

import io
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli.errors import DataError, InputError
from mlecli.idx import TYPE_CODES, gunzip, is_gzip, parse_idx
from mlecli.prepare import composite, luminance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")
MAX_FILE_BYTES = 1 << 30  # no image or array worth predicting on is bigger
MAX_PIXELS = 50_000_000  # one image: about 12 bytes a pixel while it is prepared
NPY_MAGIC = b"\x93NUMPY"
STDIN = "-"


@dataclass(frozen=True)
class Source:
    """One thing to read: a file (`path`), or standard input (`path` is None). `name` is what the user sees."""

    name: str
    path: Path | None


@dataclass(frozen=True)
class Loaded:
    """What one source held. A picture: `images` (H, W) float64 gray, `picture` True. An array
    file: `images` (N, H, W) uint8 or float64, `indexed` when it held a stack (not one 2-D image)."""

    source: Source
    images: np.ndarray
    picture: bool
    indexed: bool = False


def sources(inputs: list[str]) -> list[Source | InputError]:
    """Expand the command line's inputs in order: a folder becomes its image files sorted by
    name (numbers in names compared as numbers: 2.png before 10.png); `-` is standard input.
    A missing input or a folder without images is an InputError in its place."""
    out: list[Source | InputError] = []
    for item in inputs:
        if item == STDIN:
            out.append(Source("<stdin>", None))
            continue
        path = Path(item)
        if path.is_dir():
            try:
                found = [p for p in path.iterdir() if _is_image_name(p)]
            except OSError as exc:
                out.append(InputError(f"{item}: cannot list this folder ({exc.strerror or exc})"))
                continue
            if not found:
                out.append(InputError(
                    f"{item}: no images in this folder (files ending in {', '.join(IMAGE_SUFFIXES[:6])}, …)"
                ))
            out += [Source(str(p), p) for p in sorted(found, key=_natural_key)]
        elif path.is_file() or path.is_fifo():  # a FIFO: e.g. <(curl …) from the shell
            out.append(Source(item, path))
        elif path.exists():
            out.append(InputError(f"{item} is not a file or a folder (a device or a socket): give an image file"))
        else:
            out.append(InputError(f"{item} does not exist"))
    return out


def _is_image_name(p: Path) -> bool:
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def _natural_key(p: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", p.name)]


def read_bytes(source: Source) -> bytes:
    if source.path is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("<stdin>: no image on standard input (it is a terminal): pipe one in, e.g. < digit.png")
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    else:
        try:
            with open(source.path, "rb") as f:
                if source.path.is_file() and source.path.stat().st_size > MAX_FILE_BYTES:
                    data = b"x" * (MAX_FILE_BYTES + 1)  # refused below without reading a byte
                else:
                    data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise InputError(f"{source.name}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{source.name}: larger than {MAX_FILE_BYTES >> 20} MB; no image or array here is that big")
    if not data:
        raise InputError(f"{source.name}: nothing came on standard input" if source.path is None
                         else f"{source.name}: the file is empty")
    return data


def load(source: Source) -> Loaded:
    """Read one source into gray image(s); raise InputError naming it if it cannot be used."""
    data = read_bytes(source)
    name = source.name
    if data.startswith(NPY_MAGIC):
        return _array(source, read_npy(data, name), idx=False)
    if is_gzip(data):
        try:
            content = gunzip(data, name, limit=MAX_FILE_BYTES)
        except DataError as exc:
            raise InputError(str(exc)) from None
        if not looks_like_idx(content):
            raise InputError(f"{name}: a gzip file that does not hold an IDX file (images like MNIST's)")
        return _array(source, read_idx(content, name), idx=True)
    if looks_like_idx(data):
        return _array(source, read_idx(data, name), idx=True)
    return Loaded(source, read_image(data, name), picture=True)


def _array(source: Source, arr: np.ndarray, idx: bool) -> Loaded:
    images, indexed = check_array(arr, source.name, idx)
    return Loaded(source, images, picture=False, indexed=indexed)


def looks_like_idx(data: bytes) -> bool:
    return len(data) >= 4 and data[0] == 0 and data[1] == 0 and data[2] in TYPE_CODES and 1 <= data[3] <= 4


def read_idx(data: bytes, name: str) -> np.ndarray:
    try:
        arr = parse_idx(data, name)
    except DataError as exc:
        raise InputError(str(exc)) from None
    if arr.ndim == 1:
        raise InputError(
            f"{name}: an IDX file of {len(arr)} labels (one number each), not of images: "
            "give the images file (…-images-idx3-ubyte)"
        )
    return arr


def read_npy(data: bytes, name: str) -> np.ndarray:
    """A .npy file's array, checked before anything is allocated (arrays only: never pickle)."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except Exception as exc:  # numpy raises many types for a damaged header
        raise InputError(f"{name}: not a readable .npy file (damaged header: {exc})") from None
    if dtype.hasobject:
        raise InputError(f"{name}: the .npy file holds Python objects (loading it would need pickle); refused")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    need = count * dtype.itemsize
    body = len(data) - f.tell()
    if body < need:
        raise InputError(f"{name}: the .npy file is truncated (its header promises {need} bytes of data, it has {body})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def check_array(arr: np.ndarray, name: str, idx: bool = False) -> tuple[np.ndarray, bool]:
    """An array of images as (N, H, W) and whether it was a stack (N, …) rather than one image.

    uint8 stays as it is, other integers 0-255 become uint8, bool 0/255, floats 0-1 float64.
    (H, W) is one image; (N, H, W) a stack; (784,) and (N, 784) are flattened 28×28 images;
    a single colour channel (N×H×W×1, N×1×H×W, H×W×1) is dropped.
    """
    what = "IDX file" if idx else ".npy file"
    if arr.ndim == 4 and arr.shape[3] == 1:  # N×H×W×1, channels last (Keras)
        arr = arr[..., 0]
    elif arr.ndim == 4 and arr.shape[1] == 1:  # N×1×H×W, channels first (PyTorch)
        arr = arr[:, 0]
    elif arr.ndim == 3 and arr.shape[2] == 1 and arr.shape[0] > 1 and arr.shape[1] > 1:  # H×W×1
        arr = arr[..., 0]
    indexed = arr.ndim == 3
    if arr.ndim == 1 and arr.shape[0] == 784:
        arr = arr.reshape(1, 28, 28)
    elif arr.ndim == 2 and arr.shape[1] == 784 and arr.shape[0] != 28:
        arr = arr.reshape(-1, 28, 28)
        indexed = True
    elif arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(
            f"{name}: the {what} holds an array of shape {_shape(arr.shape)}; images are H×W or N×H×W "
            "(e.g. 28×28 or N×28×28)"
        )
    if arr.shape[0] == 0:
        raise InputError(f"{name}: the {what} holds no images (shape {_shape(arr.shape)})")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InputError(f"{name}: the {what}'s images are empty (shape {_shape(arr.shape)})")
    return _pixels(arr, name, what), indexed


def _pixels(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    kind = arr.dtype.kind
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise InputError(
                f"{name}: the {what} holds {arr.dtype} values from {lo} to {hi}; integer images must be 0-255"
            )
        return arr.astype(np.uint8, copy=False)
    if kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"{name}: the {what} holds {bad} NaN or infinite values; images must be finite")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            hint = ": divide it by 255" if hi <= 255 and lo >= 0 else ""
            raise InputError(
                f"{name}: the {what} holds {arr.dtype} values from {lo:g} to {hi:g}; float images must be 0-1{hint}"
            )
        return arr.astype(np.float64)
    raise InputError(f"{name}: the {what} holds {arr.dtype} values; images are uint8 0-255 or float 0-1")


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "() (a single number)"


# ---------------------------------------------------------------------------
# Pictures, through Pillow


def read_image(data: bytes, name: str) -> np.ndarray:
    """A picture's first frame as gray (H, W) float64 in [0, 1], turned upright by its EXIF
    orientation. 16-bit images keep their depth; 32-bit and float images are scaled from
    their own darkest to lightest value."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # we bound the size ourselves, below
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # over 179 megapixels, by its header
            raise InputError(
                f"{name}: more than the {MAX_PIXELS // 1_000_000} megapixels mlecli reads; "
                "scale it down or crop it to the digit"
            ) from None
        except UnidentifiedImageError:
            raise InputError(
                f"{name}: not an image mlecli can read (PNG, JPEG, BMP, GIF, TIFF, WebP), "
                "nor a .npy or IDX file"
            ) from None
        except Exception as exc:  # Pillow's decoders raise many types on damaged files
            raise InputError(f"{name}: not a readable image ({_why(exc)})") from None
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise InputError(
                f"{name}: {width}×{height} pixels is more than the {MAX_PIXELS // 1_000_000} megapixels mlecli reads; "
                "scale it down or crop it to the digit"
            )
        if width == 0 or height == 0:
            raise InputError(f"{name}: the image is empty ({width}×{height} pixels)")
        try:
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a damaged EXIF block: keep the picture as stored
                pass
            return _gray(img)
        except Exception as exc:  # Pillow's decoders raise many types on damaged files
            raise InputError(f"{name}: not a readable image ({_why(exc)})") from None


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _gray(img) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float64)
    if mode == "L":
        return np.asarray(img, dtype=np.uint8) / 255.0
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float64) / 65535.0
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("it holds NaN or infinite pixel values")
        if mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
            return arr / 65535.0
        if mode == "F" and arr.min() >= 0 and arr.max() <= 1:
            return arr
        lo, hi = arr.min(), arr.max()
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        return _by_rows(np.asarray(img.convert("RGBA")), composite)
    return _by_rows(np.asarray(img.convert("RGB")), luminance)


def _by_rows(pixels: np.ndarray, fn, block: int = 1 << 20) -> np.ndarray:
    """fn on (H, W, C) uint8 pixels a block of rows at a time (the float64 temporaries of a
    whole 50-megapixel photo would take gigabytes); the same numbers as fn on the whole."""
    if fn is composite and not np.all(pixels[..., 3] == 255):
        return fn(pixels)  # its background colour depends on the whole image
    h, w = pixels.shape[:2]
    rows = max(1, block // max(w, 1))
    out = np.empty((h, w), np.float64)
    for r in range(0, h, rows):
        out[r : r + rows] = fn(pixels[r : r + rows])
    return out
