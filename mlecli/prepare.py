"""MNIST's preparation of a digit image, as one exact algorithm (numpy; `web/prepare.js` is its twin).

The makers of MNIST size-normalised each digit to fit a 20×20 box (keeping its aspect
ratio, anti-aliased) and placed it in a 28×28 frame so that its centre of mass sits on
the frame's centre. A photo or a drawing must go through the same steps before a network
trained on MNIST can read it. Every step below is written so that the page's JavaScript
can do exactly the same arithmetic (float64, the same operations in the same order, sums
taken left to right), which keeps the two within a rounding of each other.

A gray image `g` (H, W) float64 in [0, 1] (0 black, 1 white) becomes a uint8 (28, 28) image,
light ink on black, in nine steps:

1. background: `m` = median of the border ring (the pixels of the first and last rows and
   columns); the ink is whichever side departs further from it: if `m − min(g)` exceeds
   `max(g) − m` the ink is dark, and `g ← 1 − g`, `m ← 1 − m`.
2. noise: with the deviations `d = |ring − m|` sorted, `σ` = max(1.4826 · median(d),
   d[⌊0.9 · (n − 1)⌋] / 1.6449): the ring's spread as a Gaussian's σ, from its 50th and 90th
   percentiles (the median alone misses the faint artifacts JPEG leaves on part of a clean
   page; neither counts ink touching under a tenth of the border). σ = 0 for a clean border.
3. blank: with `p = max(g)`, an image whose `p − m` is below max(0.1, 8σ) holds no ink.
4. levels: `lo = m + 3σ`, `hi = p − 3σ`; `v = clip((g − lo) / (hi − lo), 0, 1)`: the
   background and its noise become 0, the ink's core 1 (a clean image, σ = 0, keeps its
   levels: v = (g − m) / (p − m)).
5. box: row sums `r` and column sums `c` of `v`, each added first to last. The box's first
   row is the first whose running total `r_0 + … + r_a` exceeds δ·Σr, its last row the last
   whose total from the bottom `r_a + … + r_{H−1}` exceeds δ·Σr (with Σr the running total's
   end); columns likewise. δ = 0.5% when the background is noisy (σ > 0): up to 0.5% of the
   ink on each side, dust and specks, may fall outside; δ = 0 when it is perfectly clean:
   every pixel of ink is inside. Crop `v` to the box, h × w pixels.
6. scale: `s = 20 / max(h, w)`; crop pixel a spans [s·a, s·(a+1)) of a 20×20 box, and each
   box pixel is the area-weighted mean of the crop over it:
   `T[i, j] = Σ_a Σ_b Ly[i, a] · crop[a, b] · Lx[j, b]`, with the overlap lengths
   `Ly[i, a] = max(0, min(i + 1, s·(a+1)) − max(i, s·a))` (anti-aliasing by area).
7. quantise: `q = ⌊255 · (T / max(T)) + ½⌋` as integers 0-255 (the ink's peak becomes 255).
8. centre of mass of q (exact integer sums): `cy = Σ_i (i + ½) Σ_j q[i, j] / Σ q`; `cx` likewise.
9. place: q goes into the 28×28 frame shifted by whole pixels, `dy = ⌊14.5 − cy + ½⌋` rows
   and `dx` columns, so that its centre of mass lands within half a pixel of pixel 14's
   centre, as in MNIST. Pixels shifted out of the frame are lost, as in MNIST.

A prepared image comes through a second preparation unchanged (when nothing was shifted out).
`prepare` is the one-image oracle; `prepare_many` does the same for a stack of equal-sized
images at once (vectorised; equal to the oracle up to the rounding of its matrix products).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlecli import blas
from mlecli.errors import MlecliError

FRAME = 28  # side of the prepared image
BOX = 20  # longer side of the digit inside it
TARGET = 14.5  # where the centre of mass goes: pixel 14's centre (pixel i spans [i, i+1))
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> σ of a Gaussian
Q90_SIGMAS = 1.6449  # a Gaussian's 90th percentile of |x − μ|, in σ
NOISE_CUT = 3.0  # levels start 3σ above the background
MIN_CONTRAST = 0.1  # ink must differ from the background by a tenth of full scale…
BLANK_NOISE = 8.0  # …and by 8σ of the background's noise
TRIM = 0.005  # share of a noisy image's ink that may lie beyond each side of the box


class BlankImage(MlecliError):
    """An image with no ink to prepare."""


def blank_message(name: str) -> str:
    return f"{name}: no ink found: the image is blank (nothing in it stands out from its background)"


@dataclass(frozen=True)
class Steps:
    """What the preparation found in one image (for tests and for explaining a result)."""

    inverted: bool
    background: float  # m, after inversion
    noise: float  # σ
    peak: float  # p
    box: tuple[int, int, int, int]  # first row, last row, first column, last column (inclusive)
    scale: float  # s
    offset: tuple[int, int]  # dy, dx: where the 20×20 box's top left corner lands in the frame
    centre: tuple[float, float]  # cy, cx: the centre of mass of the quantised 20×20 box


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
    if x.ndim == 1 or (x.ndim == 2 and axis in (1, -1) and x.shape[1] <= 64):
        return np.cumsum(x, axis=-1)[..., -1] if x.shape[-1] else np.zeros(x.shape[:-1])
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
        return g.reshape(*g.shape[:-2], -1).copy()
    return np.concatenate([g[..., 0, :], g[..., -1, :], g[..., 1:-1, 0], g[..., 1:-1, -1]], axis=-1)


def area_weights(n_in: int, scale: float, n_out: int = BOX) -> np.ndarray:
    """L (n_out, n_in): overlap of box pixel i = [i, i+1) with input pixel a = [s·a, s·(a+1))."""
    a = np.arange(n_in, dtype=np.float64)
    lo = scale * a
    hi = scale * (a + 1.0)
    i = np.arange(n_out, dtype=np.float64)[:, None]
    return np.maximum(0.0, np.minimum(i + 1.0, hi) - np.maximum(i, lo))


def quantise(T: np.ndarray) -> np.ndarray:
    """Step 7: the box's values as integers 0-255 (float64), its peak 255."""
    return np.floor(255.0 * (T / T.max()) + 0.5)


def centre_of_mass(q: np.ndarray) -> tuple[float, float]:
    """Step 8, on integers: every sum is exact, so any order of adding gives the same bits."""
    total = q.sum()
    rows, cols = q.sum(axis=1), q.sum(axis=0)
    centres = np.arange(len(rows)) + 0.5
    return float((centres * rows).sum() / total), float((centres * cols).sum() / total)


def place(q: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Step 9: q (20, 20) shifted into a zero (28, 28) frame by whole pixels; what falls outside is lost."""
    out = np.zeros((FRAME, FRAME), np.uint8)
    y0, x0 = max(dy, 0), max(dx, 0)
    y1, x1 = min(dy + BOX, FRAME), min(dx + BOX, FRAME)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = q[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    return out


def _box(profile: np.ndarray, trim: float) -> tuple[int, int]:
    """Step 5 along one axis: the first and last index inside the box."""
    ahead = np.cumsum(profile)  # running totals, added first to last
    behind = np.cumsum(profile[::-1])[::-1]  # totals from the end, added last to first
    limit = trim * ahead[-1]
    return int(np.argmax(ahead > limit)), len(profile) - 1 - int(np.argmax((behind > limit)[::-1]))


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
    dev = np.sort(np.abs(border - m))
    sigma = max(MAD_TO_SIGMA * float(np.median(dev)), float(dev[int(0.9 * (len(dev) - 1))]) / Q90_SIGMAS)
    p = float(g.max())
    if p - m < max(MIN_CONTRAST, BLANK_NOISE * sigma):
        raise BlankImage(blank_message(name))
    lo = m + NOISE_CUT * sigma
    hi = p - NOISE_CUT * sigma
    v = np.clip((g - lo) / (hi - lo), 0.0, 1.0)
    trim = TRIM if sigma > 0 else 0.0
    rows, cols = _seq_sum(v, axis=1), _seq_sum(v, axis=0)
    r0, r1 = _box(rows, trim)
    c0, c1 = _box(cols, trim)
    crop = v[r0 : r1 + 1, c0 : c1 + 1]
    h, w = crop.shape
    s = BOX / max(h, w)
    with blas.threads(1):  # products this small lose more to waking a second thread than they gain
        q = quantise(area_weights(h, s) @ crop @ area_weights(w, s).T)
    cy, cx = centre_of_mass(q)
    dy = int(np.floor(TARGET - cy + 0.5))
    dx = int(np.floor(TARGET - cx + 0.5))
    steps = Steps(inverted, m, sigma, p, (r0, r1, c0, c1), s, (dy, dx), (cy, cx))
    return place(q.astype(np.uint8), dy, dx), steps


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
    dev = np.sort(np.abs(border - m[:, None]), axis=1)
    sigma = np.maximum(MAD_TO_SIGMA * np.median(dev, axis=1), dev[:, int(0.9 * (dev.shape[1] - 1))] / Q90_SIGMAS)
    p = np.where(inverted, 1.0 - lowest, highest)  # max(1 − g) = 1 − min(g), exactly
    blank = p - m < np.maximum(MIN_CONTRAST, BLANK_NOISE * sigma)
    lo = m + NOISE_CUT * sigma
    span = np.where(blank, 1.0, (p - NOISE_CUT * sigma) - lo)
    v = g
    v -= lo[:, None, None]
    v /= span[:, None, None]
    np.clip(v, 0.0, 1.0, out=v)
    v[blank] = 0.0

    trim = np.where(sigma > 0, TRIM, 0.0)[:, None]
    rows, cols = _seq_sum(v, axis=2), _seq_sum(v, axis=1)
    r0, r1, in_rows = _boxes(rows, trim)
    c0, c1, in_cols = _boxes(cols, trim)
    s = BOX / np.maximum(r1 - r0 + 1, c1 - c0 + 1)
    # Crop coordinates a = row − r0; rows outside the box get zero weight.
    Ly = _batch_weights((np.arange(H) - r0[:, None]).astype(np.float64), in_rows, s)  # (n, 20, H)
    Lx = _batch_weights((np.arange(W) - c0[:, None]).astype(np.float64), in_cols, s)  # (n, 20, W)
    with blas.threads(1):  # hundreds of 20×28 products: a second thread per product costs more than it saves
        T = np.matmul(np.matmul(Ly, v), Lx.transpose(0, 2, 1))
    T[blank] = 1.0
    T /= T.max(axis=(1, 2), keepdims=True)
    T *= 255.0
    T += 0.5
    q = np.floor(T, out=T)
    total = q.sum(axis=(1, 2))
    centres = np.arange(BOX) + 0.5
    cy = (centres * q.sum(axis=2)).sum(axis=1) / total
    cx = (centres * q.sum(axis=1)).sum(axis=1) / total
    dy = np.floor(TARGET - cy + 0.5).astype(np.int64)
    dx = np.floor(TARGET - cx + 0.5).astype(np.int64)
    return _place_many(q.astype(np.uint8), dy, dx, blank), blank


def _place_many(q: np.ndarray, dy: np.ndarray, dx: np.ndarray, blank: np.ndarray) -> np.ndarray:
    n = len(q)
    out = np.zeros((n, FRAME, FRAME), np.uint8)
    i = np.arange(BOX)
    rows = dy[:, None] + i  # (n, 20) frame row of each box row
    cols = dx[:, None] + i
    ok = (rows[:, :, None] >= 0) & (rows[:, :, None] < FRAME) & (cols[:, None, :] >= 0) & (cols[:, None, :] < FRAME)
    ok &= ~blank[:, None, None]
    k, a, b = np.nonzero(ok)
    out[k, rows[k, a], cols[k, b]] = q[k, a, b]
    return out


def _boxes(profiles: np.ndarray, trim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ahead = np.cumsum(profiles, axis=1)
    behind = np.cumsum(profiles[:, ::-1], axis=1)  # reversed: behind[:, k] is the total of the last k+1
    limit = trim * ahead[:, -1:]
    first = np.argmax(ahead > limit, axis=1)
    last = profiles.shape[1] - 1 - np.argmax(behind > limit, axis=1)
    idx = np.arange(profiles.shape[1])
    return first, last, (idx >= first[:, None]) & (idx <= last[:, None])


def _batch_weights(coords: np.ndarray, inside: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """area_weights for each image of a chunk, zero outside its box: (n, 20, n_in)."""
    lo = scale[:, None] * coords  # (n, n_in)
    hi = scale[:, None] * (coords + 1.0)
    i = np.arange(BOX, dtype=np.float64)[None, :, None]
    L = np.minimum(i + 1.0, hi[:, None, :])
    L -= np.maximum(i, lo[:, None, :])
    np.maximum(L, 0.0, out=L)
    L *= inside[:, None, :]
    return L
