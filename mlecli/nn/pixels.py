"""Images as the network's inputs: x = pixel / 255, the logits of many images in chunks,
and shifted copies of images (data augmentation), as pure functions on arrays."""

from __future__ import annotations

import numpy as np

from mlecli.nn.model import Params, forward


def pixels(images: np.ndarray, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Images (n, H, W) uint8 as inputs x (n, H*W): pixel / 255, correctly rounded in `dtype`.

    For measuring (`image_scores`); the hot loop in step.py never forms x: its first
    GEMMs take the uint8 pixels with α = 1/255.
    """
    dtype = np.dtype(dtype)
    flat = images.reshape(len(images), int(np.prod(images.shape[1:])))
    if out is None:
        out = np.empty(flat.shape, dtype)
    return np.divide(flat, dtype.type(255), out=out)


def image_scores(params: Params, images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Logits z (n,) of uint8 images (n, H, W), converted `chunk` at a time to bound memory."""
    dtype = params[-1][0].dtype
    out = np.empty(len(images), dtype=dtype)
    for start in range(0, len(images), chunk):
        out[start : start + chunk] = forward(params, pixels(images[start : start + chunk], dtype))[1]
    return out


# ---------------------------------------------------------------------------
# Shifted digits (data augmentation): each epoch, each training image moved by a random
# whole number of pixels, up to k each way, zeros coming in at the edges.


def shift_images(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Images (n, H, W), image i moved down by dy[i] and right by dx[i] pixels (negative:
    up, left); what moves out is lost, zeros come in. The reference for `shifted_view`."""
    n, H, W = images.shape
    out = np.zeros_like(images)
    for i in range(n):
        sy, sx = int(dy[i]), int(dx[i])
        if abs(sy) >= H or abs(sx) >= W:
            continue
        out[i, max(sy, 0) : H + min(sy, 0), max(sx, 0) : W + min(sx, 0)] = images[
            i, max(-sy, 0) : H + min(-sy, 0), max(-sx, 0) : W + min(-sx, 0)
        ]
    return out


def pad_images(images: np.ndarray, k: int) -> np.ndarray:
    """Images (n, H, W) with k zero pixels added on every side: (n, H + 2k, W + 2k)."""
    n, H, W = images.shape
    padded = np.zeros((n, H + 2 * k, W + 2 * k), images.dtype)
    padded[:, k : k + H, k : k + W] = images
    return padded


def windows(padded: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A view (n, 2k+1, 2k+1, H, W) of padded images (n, H + 2k, W + 2k):
    view[i, oy, ox] is the H×W window at (oy, ox), i.e. image i moved by (k − oy, k − ox)."""
    return np.lib.stride_tricks.sliding_window_view(padded, shape, axis=(1, 2))


def shifted_view(images: np.ndarray, k: int) -> np.ndarray:
    """`windows` of `pad_images`: view[idx, oy, ox] gathers a batch at its offsets."""
    return windows(pad_images(images, k), images.shape[1:])


def draw_offsets(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """An epoch's offsets into `shifted_view` for n images: (oy, ox), each uniform on
    0..2k, i.e. moves uniform on −k..k in each direction."""
    oy, ox = rng.integers(0, 2 * k + 1, size=(2, n))
    return oy, ox
