"""MNIST's preparation of a digit image, as one exact algorithm (numpy; `web/prepare.js` is its twin).

The makers of MNIST size-normalised each digit to fit a 20×20 box (keeping its aspect
ratio, anti-aliased) and placed it in a 28×28 frame so that its centre of mass sits on
the frame's centre. A photo or a drawing must go through the same steps before a network
trained on MNIST can read it. Every step below is written so that the page's JavaScript
can do exactly the same arithmetic (float64, the same operations in the same order, sums
taken left to right), which keeps the two within a rounding of each other.

A gray image `g` (H, W) float64 in [0, 1] (0 black, 1 white) becomes a uint8 (28, 28) image,
light ink on black, in eight steps:

1. background: `m` = median of the border ring (the pixels of the first and last rows and
   columns); the ink is whichever side departs further from it: if `m − min(g)` exceeds
   `max(g) − m` the ink is dark, and `g ← 1 − g`, `m ← 1 − m`.
2. noise: `σ` = 1.4826 · median(|ring − m|) (the ring's spread, as a Gaussian's σ).
3. blank: with `p = max(g)`, an image whose `p − m` is below max(0.1, 8σ) holds no ink.
4. levels: `lo = m + 3σ`, `hi = p − 3σ`; `v = clip((g − lo) / (hi − lo), 0, 1)`: the
   background and its noise become 0, the ink's core 1 (a clean image, σ = 0, keeps its
   levels: v = (g − m) / (p − m)).
5. box: row sums `r` and column sums `c` of `v`; rows (columns) whose sum exceeds 1% of
   the largest row (column) sum are ink, or, when the background is perfectly clean
   (σ = 0), every row (column) with any ink; crop `v` to the first..last ink row and
   column (a speck of noise far from the digit does not widen the box).
6. centre of mass: `cy = Σ (a + ½) r_{r0+a} / Σ r_{r0+a}` over the box's rows a = 0..h−1
   (box pixel a spans [a, a+1)); `cx` likewise from the column sums.
7. scale and place: `s = 20 / max(h, w)`; crop pixel a spans [oy + s·a, oy + s·(a+1)) in
   the 28-pixel frame, with `oy = ⌊14.5 − s·cy + ½⌋` (so the centre of mass lands within
   half a pixel of pixel 14's centre, as MNIST's digits do); `ox` likewise. Each frame
   pixel is the area-weighted mean of the crop over it:
   `out[i, j] = Σ_a Σ_b Ly[i, a] · crop[a, b] · Lx[j, b]` with
   `Ly[i, a] = max(0, min(i + 1, oy + s·(a+1)) − max(i, oy + s·a))` (the overlap length).
   Ink placed outside the frame is lost, as in MNIST.
8. quantise: `⌊255 · clip(out, 0, 1) + ½⌋` as uint8.

`prepare` is the one-image oracle; `prepare_many` does the same for a stack of equal-sized
images at once (vectorised; equal to the oracle up to the rounding of its matrix products).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlecli.errors import MlecliError

FRAME = 28  # side of the prepared image
BOX = 20  # longer side of the digit inside it
TARGET = 14.5  # where the centre of mass goes: pixel 14's centre (pixel i spans [i, i+1))
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> σ of a Gaussian
NOISE_CUT = 3.0  # levels start 3σ above the background
MIN_CONTRAST = 0.1  # ink must differ from the background by a tenth of full scale…
BLANK_NOISE = 8.0  # …and by 8σ of the background's noise
PROFILE_SHARE = 0.01  # rows / columns with more than 1% of the largest sum are ink


class BlankImage(MlecliError):
    """An image with no ink to prepare."""


@dataclass(frozen=True)
class Steps:
    """What the preparation found in one image (for tests and for explaining a result)."""

    inverted: bool
    background: float  # m, after inversion
    noise: float  # σ
    peak: float  # p
    box: tuple[int, int, int, int]  # first row, last row, first column, last column (inclusive)
    scale: float  # s
    offset: tuple[int, int]  # oy, ox
    centre: tuple[float, float]  # cy, cx in crop coordinates


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) uint8 RGB -> gray in [0, 1]: ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) / 255."""
    rgb = rgb.astype(np.float64)
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


def composite(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA -> gray in [0, 1], transparency filled with the colour opposite the ink.

    The background behind transparent pixels is white when what is drawn (weighted by
    alpha) is dark on average, black when it is light: dark ink on a transparent sheet
    and light ink on one both come out as ink on a plain background.
    """
    lum = luminance(rgba[..., :3])
    alpha = rgba[..., 3].astype(np.float64) / 255.0
    if np.all(rgba[..., 3] == 255):
        return lum
    weight = float(np.sum(alpha))
    mean = float(np.sum(alpha * lum)) / weight if weight > 0 else 0.0
    back = 1.0 if mean < 0.5 else 0.0
    return alpha * lum + (1.0 - alpha) * back


def _seq_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum along `axis` strictly first to last (as a JavaScript loop does; np.sum adds pairwise)."""
    x = np.moveaxis(x, axis, 0)
    if len(x) == 0:
        return np.zeros(x.shape[1:])
    acc = x[0].astype(np.float64, copy=True)
    for row in x[1:]:
        acc += row
    return acc


def ring(g: np.ndarray) -> np.ndarray:
    """The border pixels of (…, H, W) images: first and last rows, then the other pixels of
    the first and last columns; shape (…, 2W + 2(H−2)), or every pixel of a 1- or 2-row image."""
    h = g.shape[-2]
    if h <= 2:
        return g.reshape(*g.shape[:-2], -1)
    return np.concatenate([g[..., 0, :], g[..., -1, :], g[..., 1:-1, 0], g[..., 1:-1, -1]], axis=-1)


def area_weights(n_in: int, offset: float, scale: float, n_out: int = FRAME) -> np.ndarray:
    """L (n_out, n_in): overlap of frame pixel i = [i, i+1) with input pixel a = [offset + s·a, offset + s·(a+1))."""
    a = np.arange(n_in, dtype=np.float64)
    lo = offset + scale * a
    hi = offset + scale * (a + 1.0)
    i = np.arange(n_out, dtype=np.float64)[:, None]
    return np.maximum(0.0, np.minimum(i + 1.0, hi) - np.maximum(i, lo))


def quantise(out: np.ndarray) -> np.ndarray:
    return np.floor(255.0 * np.clip(out, 0.0, 1.0) + 0.5).astype(np.uint8)


def _box(profile: np.ndarray, share: float) -> tuple[int, int]:
    keep = profile > share * profile.max()
    first = int(np.argmax(keep))
    last = len(keep) - 1 - int(np.argmax(keep[::-1]))
    return first, last


def _centre(profile: np.ndarray) -> float:
    return float(_seq_sum((np.arange(len(profile)) + 0.5) * profile) / _seq_sum(profile))


def prepare_steps(g: np.ndarray, name: str = "image") -> tuple[np.ndarray, Steps]:
    """Prepare one gray image (H, W) float64 in [0, 1]; return the uint8 (28, 28) image and its Steps.

    Raises BlankImage (naming `name`) when the image holds no ink.
    """
    g = np.asarray(g, dtype=np.float64)
    border = ring(g)
    m = float(np.median(border))
    inverted = bool(m - g.min() > g.max() - m)
    if inverted:
        g = 1.0 - g
        border = 1.0 - border
        m = 1.0 - m
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(border - m)))
    p = float(g.max())
    if p - m < max(MIN_CONTRAST, BLANK_NOISE * sigma):
        raise BlankImage(
            f"{name}: no ink found (the image is blank: nothing departs from its background by "
            f"{max(MIN_CONTRAST, BLANK_NOISE * sigma):.2f} of full scale)"
        )
    lo = m + NOISE_CUT * sigma
    hi = p - NOISE_CUT * sigma
    v = np.minimum(np.maximum((g - lo) / (hi - lo), 0.0), 1.0)
    share = PROFILE_SHARE if sigma > 0 else 0.0
    rows, cols = _seq_sum(v, axis=1), _seq_sum(v, axis=0)
    r0, r1 = _box(rows, share)
    c0, c1 = _box(cols, share)
    crop = v[r0 : r1 + 1, c0 : c1 + 1]
    h, w = crop.shape
    cy = _centre(rows[r0 : r1 + 1])
    cx = _centre(cols[c0 : c1 + 1])
    s = BOX / max(h, w)
    oy = int(np.floor(TARGET - s * cy + 0.5))
    ox = int(np.floor(TARGET - s * cx + 0.5))
    out = area_weights(h, oy, s) @ crop @ area_weights(w, ox, s).T
    steps = Steps(inverted, m, sigma, p, (r0, r1, c0, c1), s, (oy, ox), (cy, cx))
    return quantise(out), steps


def prepare(g: np.ndarray, name: str = "image") -> np.ndarray:
    """One gray image (H, W) float64 in [0, 1] -> uint8 (28, 28), MNIST's form. See the module docstring."""
    return prepare_steps(g, name)[0]


def prepare_many(g: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A stack of gray images (N, H, W) in [0, 1] (or uint8 0-255) -> (uint8 (N, 28, 28), blank (N,) bool).

    The same steps as `prepare`, vectorised over `chunk` images at a time (small enough
    to stay in the CPU's cache); a blank image comes out all zeros and is flagged. Equal
    to `prepare` image by image up to the rounding of the matrix products.
    """
    g = np.asarray(g)
    n = len(g)
    images = np.zeros((n, FRAME, FRAME), np.uint8)
    blank = np.zeros(n, bool)
    for start in range(0, n, chunk):
        part = g[start : start + chunk]
        part = part / 255.0 if part.dtype == np.uint8 else part.astype(np.float64)
        images[start : start + chunk], blank[start : start + chunk] = _prepare_chunk(part)
    return images, blank


def _prepare_chunk(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prepare_many on (n, H, W) float64 images, which it overwrites."""
    n, H, W = g.shape
    border = ring(g)
    m = np.median(border, axis=1)
    lowest, highest = g.min(axis=(1, 2)), g.max(axis=(1, 2))
    inverted = m - lowest > highest - m
    if inverted.any():
        g[inverted] = 1.0 - g[inverted]
        border[inverted] = 1.0 - border[inverted]
        m[inverted] = 1.0 - m[inverted]
    sigma = MAD_TO_SIGMA * np.median(np.abs(border - m[:, None]), axis=1)
    p = np.where(inverted, 1.0 - lowest, highest)  # max(1 − g) = 1 − min(g), exactly
    blank = p - m < np.maximum(MIN_CONTRAST, BLANK_NOISE * sigma)
    lo = m + NOISE_CUT * sigma
    span = np.where(blank, 1.0, (p - NOISE_CUT * sigma) - lo)
    v = g
    v -= lo[:, None, None]
    v /= span[:, None, None]
    np.clip(v, 0.0, 1.0, out=v)
    v[blank] = 0.0

    share = np.where(sigma > 0, PROFILE_SHARE, 0.0)[:, None]
    rows, cols = _seq_sum(v, axis=2), _seq_sum(v, axis=1)
    r0, r1, in_rows = _boxes(rows, share)
    c0, c1, in_cols = _boxes(cols, share)
    # Box coordinates a = row − r0; rows outside the box get zero weight in the sums and the resampling.
    a = (np.arange(H) - r0[:, None]).astype(np.float64)
    b = (np.arange(W) - c0[:, None]).astype(np.float64)
    cy = _centres(rows * in_rows, a)
    cx = _centres(cols * in_cols, b)
    s = BOX / np.maximum(r1 - r0 + 1, c1 - c0 + 1)
    oy = np.floor(TARGET - s * cy + 0.5)
    ox = np.floor(TARGET - s * cx + 0.5)
    Ly = _batch_weights(a, in_rows, oy, s)  # (n, 28, H)
    Lx = _batch_weights(b, in_cols, ox, s)  # (n, 28, W)
    out = np.matmul(np.matmul(Ly, v), Lx.transpose(0, 2, 1))
    out[blank] = 0.0
    np.clip(out, 0.0, 1.0, out=out)
    out *= 255.0
    out += 0.5
    return np.floor(out, out=out).astype(np.uint8), blank


def _boxes(profiles: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = profiles > share * profiles.max(axis=1, keepdims=True)
    first = np.argmax(keep, axis=1)
    last = keep.shape[1] - 1 - np.argmax(keep[:, ::-1], axis=1)
    idx = np.arange(keep.shape[1])
    return first, last, (idx >= first[:, None]) & (idx <= last[:, None])


def _centres(profiles: np.ndarray, coords: np.ndarray) -> np.ndarray:
    total = _seq_sum(profiles, axis=1)
    moment = _seq_sum((coords + 0.5) * profiles, axis=1)
    return moment / np.where(total > 0, total, 1.0)


def _batch_weights(coords: np.ndarray, inside: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """area_weights for each image of a chunk, zero outside its box: (n, 28, n_in)."""
    lo = offset[:, None] + scale[:, None] * coords  # (n, n_in)
    hi = offset[:, None] + scale[:, None] * (coords + 1.0)
    i = np.arange(FRAME, dtype=np.float64)[None, :, None]
    L = np.minimum(i + 1.0, hi[:, None, :])
    L -= np.maximum(i, lo[:, None, :])
    np.maximum(L, 0.0, out=L)
    L *= inside[:, None, :]
    return L
