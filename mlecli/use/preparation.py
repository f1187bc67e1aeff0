"""MNIST's preparation of an image, as one exact algorithm (numpy; `web/prepare.js` is its twin).

The makers of MNIST size-normalised each digit to fit a 20×20 box (keeping its aspect
ratio, anti-aliased) and placed it in a 28×28 frame so that its centre of mass sits on
the frame's centre; Fashion-MNIST's makers scaled each picture's longer side to 28 and
centred its box. A photo or a drawing must go through the same steps before a network
trained on those images can read it: the `Style` of the network's dataset says which.
Every step below is written so that the page's JavaScript computes the same bits: each
step is either elementwise (the same IEEE operations in the same order), a sum taken
first to last on both sides, or a sum of integers small enough to be exact in float64,
which any order of adding (a BLAS product, a JavaScript loop) gives exactly.

A gray image `g` (H, W) float64 in [0, 1] (0 black, 1 white) becomes a uint8 (28, 28) image,
light ink on black, in nine steps:

1. background: `m` = median of the border ring (the pixels of the first and last rows and
   columns); the ink is whichever side departs further from it: if `m − min(g)` exceeds
   `max(g) − m` the ink is dark, and `g ← 1 − g`, `m ← 1 − m`.
2. noise: `σ` = max(1.4826 · median(d), f[⌊0.9 · (k − 1)⌋] / 1.6449), with `d` the ring's
   deviations |ring − m| and `f` the k of them that are faint (below a sixteenth of the
   image's contrast, `(max(g) − m) / 16`), sorted: the background's spread as a Gaussian's
   σ, from the median deviation, or from the 90th percentile of the faint ones when more
   than half of the ring is exactly `m` (a white page saved as JPEG keeps faint artifacts
   there). Ink touching the border is not noise: it is rarely half the ring, and seldom
   faint; the faint part alone can never make σ more than a 26th of the contrast.
   σ = 0 for a clean border.
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
6. scale: `s = B / n` with `n = max(h, w)` and B = 20 (MNIST) or 28 (Fashion-MNIST); crop
   pixel a spans [s·a, s·(a+1)) of a B×B box, and each box pixel is the area-weighted sum
   of the crop over it (anti-aliasing by area), computed in integers: the crop's levels as
   `V = ⌊65535 · crop + ½⌋`, and the overlaps in units of 1/n of a box pixel,
   `Ay[i, a] = max(0, min((i + 1)·n, (a + 1)·B) − max(i·n, a·B))` (Ax likewise), so that
   `T[i, j] = Σ_a Σ_b Ay[i, a] · V[a, b] · Ax[j, b]` is an integer below n² · 65535 < 2⁵³
   (n ≤ MAX_SIDE = 65,536): exact in float64 whatever the order of its sums.
7. quantise: `q = ⌊255 · (T / max(T)) + ½⌋` as integers 0-255 (the ink's peak becomes 255).
8. centre: MNIST, the centre of mass of q (exact integer sums):
   `cy = Σ_i (i + ½) Σ_j q[i, j] / Σ q`, `cx` likewise, and the target t = 14.5 (pixel 14's
   centre, where MNIST's digits have theirs); Fashion-MNIST, the middle of the scaled
   crop, `cy = s·h / 2`, `cx = s·w / 2`, and t = 14 (the frame's middle).
9. place: q goes into the 28×28 frame shifted by whole pixels, `dy = ⌊t − cy + ½⌋` rows and
   `dx = ⌊t − cx + ½⌋` columns: the centre lands within half a pixel of the target. Pixels
   shifted out of the frame are lost, as in MNIST.

A prepared image comes through a second preparation unchanged (when nothing was shifted out).
`prepare` is the one-image oracle; `prepare_many` does the same for a stack of equal-sized
images at once (vectorised, with BLAS products): the same bits, since every sum that the two
take in a different order is a sum of integers. Memory: the oracle works in place on one
float64 copy of the image; the resampling never builds a weight matrix larger than B × 4096.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlecli.nn import blas
from mlecli.safe.errors import MlecliError

FRAME = 28  # side of the prepared image
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> σ of a Gaussian
Q90_SIGMAS = 1.6449  # a Gaussian's 90th percentile of |x − μ|, in σ
FAINT = 16.0  # a deviation below 1/16 of the contrast is faint: JPEG's artifacts, not ink
NOISE_CUT = 3.0  # levels start 3σ above the background
MIN_CONTRAST = 0.1  # ink must differ from the background by a tenth of full scale…
BLANK_NOISE = 8.0  # …and by 8σ of the background's noise
TRIM = 0.005  # share of a noisy image's ink that may lie beyond each side of the box
LEVELS = 65535  # step 6: the crop's levels as integers 0-65535 (finer than any 16-bit picture)
# The longest side the resampling takes: its sums stay below n² · LEVELS ≤ 2⁴⁸, exact in float64.
MAX_SIDE = 1 << 16
WEIGHT_BLOCK = 4096  # input pixels per block of resampling weights (B × 4096 float64: 0.9 MB at most)


@dataclass(frozen=True)
class Style:
    """How a dataset's images were made: the longer side of the ink in the 28×28 frame (`box`),
    what is centred (`centre`: "mass", its centre of mass, or "box", the middle of its box) and
    where (`target`, in frame coordinates: pixel i spans [i, i+1))."""

    name: str
    box: int
    centre: str
    target: float


MNIST = Style("mnist", 20, "mass", 14.5)
FASHION_MNIST = Style("fashion-mnist", 28, "box", 14.0)


def style_for(dataset: str) -> Style:
    """Fashion-MNIST's style for networks trained on it; MNIST's for any other (digit) dataset."""
    return FASHION_MNIST if dataset == FASHION_MNIST.name else MNIST


class BlankImage(MlecliError):
    """An image with no ink to prepare."""


def blank_message(name: str) -> str:
    return (f"{name}: no ink found: nothing stands out from the background (judged from the image's border: "
            "leave a margin around the ink)")


@dataclass(frozen=True)
class Steps:
    """What the preparation found in one image (for tests and for explaining a result)."""

    inverted: bool
    background: float  # m, after inversion
    noise: float  # σ
    peak: float  # p
    box: tuple[int, int, int, int]  # first row, last row, first column, last column (inclusive)
    scale: float  # s
    offset: tuple[int, int]  # dy, dx: where the box's top left corner lands in the frame
    centre: tuple[float, float]  # cy, cx: in box coordinates, the centre that is placed


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) uint8 RGB -> gray in [0, 1]: ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) / 255."""
    rgb = rgb.astype(np.float64)
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


def composite(rgba: np.ndarray, back: float | None = None) -> np.ndarray:
    """(H, W, 4) uint8 RGBA -> gray in [0, 1], transparency filled with the colour opposite the ink.

    The background behind transparent pixels (`back`, else `background_behind(rgba)`) is white
    when what is drawn (weighted by alpha) is dark on average, black when it is light: dark
    ink on a transparent sheet and light ink on one both come out as ink on a plain background.
    """
    lum = luminance(rgba[..., :3])
    if back is None and np.all(rgba[..., 3] == 255):
        return lum
    alpha = rgba[..., 3].astype(np.float64) / 255.0
    back = background_behind(rgba) if back is None else back
    return alpha * lum + (1.0 - alpha) * back


def background_behind(rgba: np.ndarray, block: int = 1 << 18) -> float:
    """1.0 (white) when the alpha-weighted mean luma of (H, W, 4) uint8 pixels is below ½, else
    0.0, decided in integers (exact in any order of adding, as the page's JavaScript does):
    Σ a·(299 R + 587 G + 114 B) < ½ · 255,000 · Σ a. A fully transparent image gets white."""
    flat = rgba.reshape(-1, 4)
    weighted = total = 0
    for k in range(0, len(flat), block):
        part = flat[k : k + block].astype(np.int64)
        a = part[:, 3]
        weighted += int(a @ (299 * part[:, 0] + 587 * part[:, 1] + 114 * part[:, 2]))
        total += int(a.sum())
    return 1.0 if 2 * weighted < 255_000 * total or total == 0 else 0.0


def _seq_sum(x: np.ndarray, axis: int = -1, block: int = 1 << 20) -> np.ndarray:
    """Sum along `axis` strictly first to last (as a JavaScript loop does; np.sum adds pairwise):
    np.cumsum (which adds in order) over blocks of the axis, each block started from the total
    so far, so that no more than about `block` elements are copied at a time."""
    axis %= x.ndim
    n = x.shape[axis]
    rest = x.shape[:axis] + x.shape[axis + 1 :]
    if n == 0:
        return np.zeros(rest)
    step = max(1, block // max(1, int(np.prod(rest))))
    total = None
    for start in range(0, n, step):
        part = x[(slice(None),) * axis + (slice(start, start + step),)]
        if total is not None:
            part = np.concatenate([np.expand_dims(total, axis), part], axis=axis)
        total = np.cumsum(part, axis=axis, dtype=np.float64).take(-1, axis=axis)
    return total


def ring(g: np.ndarray) -> np.ndarray:
    """The border pixels of (…, H, W) images: first and last rows, then the other pixels of
    the first and last columns; shape (…, 2W + 2(H−2)), or every pixel of a 1- or 2-row image."""
    h = g.shape[-2]
    if h <= 2:
        return g.reshape(*g.shape[:-2], -1).copy()
    return np.concatenate([g[..., 0, :], g[..., -1, :], g[..., 1:-1, 0], g[..., 1:-1, -1]], axis=-1)


def overlaps(start: int, stop: int, n: int, box: int) -> np.ndarray:
    """Step 6's weights for crop pixels a in [start, stop): (box, stop − start) float64 integers,
    A[i, a] = |[i·n, (i+1)·n) ∩ [a·box, (a+1)·box)|, the overlap of box pixel i with crop pixel a
    in units of 1/n of a box pixel (n = the crop's longer side)."""
    a = np.arange(start, stop, dtype=np.float64)
    i = np.arange(box, dtype=np.float64)[:, None]
    return np.maximum(0.0, np.minimum((i + 1.0) * n, (a + 1.0) * box) - np.maximum(i * n, a * box))


def resample(V: np.ndarray, box: int) -> np.ndarray:
    """Step 6: T = Ay · V · Axᵀ (box, box) for a crop of integer levels V (h, w), exactly.

    The longer axis is reduced first, a block of WEIGHT_BLOCK input pixels at a time, so that
    no array larger than the crop itself is built (a 3 × 16,000,000 picture needs 20 × 4096
    weights, not 20 × 16,000,000). Every product and partial sum is an integer below 2⁵³."""
    h, w = V.shape
    n = max(h, w)
    assert n <= MAX_SIDE, n
    with blas.threads(1):  # products this small lose more to waking a second thread than they gain
        if h >= w:
            X = np.zeros((box, w))
            for r in range(0, h, WEIGHT_BLOCK):
                X += overlaps(r, min(r + WEIGHT_BLOCK, h), n, box) @ V[r : r + WEIGHT_BLOCK]
            return X @ overlaps(0, w, n, box).T
        X = np.zeros((h, box))
        for c in range(0, w, WEIGHT_BLOCK):
            X += V[:, c : c + WEIGHT_BLOCK] @ overlaps(c, min(c + WEIGHT_BLOCK, w), n, box).T
        return overlaps(0, h, n, box) @ X


def to_levels(v: np.ndarray) -> np.ndarray:
    """Step 6: levels v in [0, 1] as the integers ⌊65535 · v + ½⌋ (float64), in place."""
    v *= LEVELS
    v += 0.5
    return np.floor(v, out=v)


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
    """Step 9: q (B, B) shifted into a zero (28, 28) frame by whole pixels; what falls outside is lost."""
    out = np.zeros((FRAME, FRAME), np.uint8)
    y0, x0 = max(dy, 0), max(dx, 0)
    y1, x1 = min(dy + len(q), FRAME), min(dx + len(q), FRAME)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = q[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    return out


def _box(profile: np.ndarray, trim: float) -> tuple[int, int]:
    """Step 5 along one axis: the first and last index inside the box."""
    ahead = np.cumsum(profile)  # running totals, added first to last
    behind = np.cumsum(profile[::-1])[::-1]  # totals from the end, added last to first
    limit = trim * ahead[-1]
    return int(np.argmax(ahead > limit)), len(profile) - 1 - int(np.argmax((behind > limit)[::-1]))


class TooLarge(MlecliError):
    """An image with a side longer than the preparation takes."""


def too_large_message(name: str, h: int, w: int) -> str:
    return (f"{name}: {w}×{h} pixels: a side longer than {MAX_SIDE:,} pixels is more than mlecli prepares; "
            "scale it down or crop it to the digit")


def prepare_steps(g: np.ndarray, name: str = "image", style: Style = MNIST, *,
                  overwrite: bool = False) -> tuple[np.ndarray, Steps]:
    """Prepare one gray image (H, W) float64 in [0, 1]; return the uint8 (28, 28) image and its Steps.

    Works in place on one float64 copy of `g` (on `g` itself if `overwrite` and it is float64).
    Raises BlankImage (naming `name`) when the image holds no ink, TooLarge when a side is
    longer than MAX_SIDE.
    """
    if max(np.shape(g)) > MAX_SIDE:
        raise TooLarge(too_large_message(name, *np.shape(g)))
    g = np.require(g, np.float64, "C") if overwrite else np.array(g, dtype=np.float64, order="C")
    border = ring(g)
    m = float(np.median(border))
    inverted = bool(m - g.min() > g.max() - m)
    if inverted:
        np.subtract(1.0, g, out=g)
        border = 1.0 - border
        m = 1.0 - m
    p = float(g.max())
    dev = np.sort(np.abs(border - m))
    faint = dev[dev < (p - m) / FAINT]
    sigma = MAD_TO_SIGMA * float(np.median(dev))
    if len(faint):
        sigma = max(sigma, float(faint[int(0.9 * (len(faint) - 1))]) / Q90_SIGMAS)
    if p - m < max(MIN_CONTRAST, BLANK_NOISE * sigma):
        raise BlankImage(blank_message(name))
    lo = m + NOISE_CUT * sigma
    hi = p - NOISE_CUT * sigma
    v = g  # step 4 in place: (g − lo) / (hi − lo), clipped
    v -= lo
    v /= hi - lo
    np.clip(v, 0.0, 1.0, out=v)
    trim = TRIM if sigma > 0 else 0.0
    rows, cols = _seq_sum(v, axis=1), _seq_sum(v, axis=0)
    r0, r1 = _box(rows, trim)
    c0, c1 = _box(cols, trim)
    crop = to_levels(v[r0 : r1 + 1, c0 : c1 + 1].copy())
    h, w = crop.shape
    s = style.box / max(h, w)
    q = quantise(resample(crop, style.box))
    cy, cx = centre_of_mass(q) if style.centre == "mass" else (s * h / 2, s * w / 2)
    dy = int(np.floor(style.target - cy + 0.5))
    dx = int(np.floor(style.target - cx + 0.5))
    steps = Steps(inverted, m, sigma, p, (r0, r1, c0, c1), s, (dy, dx), (cy, cx))
    return place(q.astype(np.uint8), dy, dx), steps


def prepare(g: np.ndarray, name: str = "image", style: Style = MNIST) -> np.ndarray:
    """One gray image (H, W) float64 in [0, 1] -> uint8 (28, 28) in `style`. See the module docstring."""
    return prepare_steps(g, name, style)[0]


def prepare_many(g: np.ndarray, chunk: int = 256, style: Style = MNIST) -> tuple[np.ndarray, np.ndarray]:
    """A stack of gray images (N, H, W) in [0, 1] (or uint8 0-255) -> (uint8 (N, 28, 28), blank (N,) bool).

    The same steps as `prepare`, vectorised over `chunk` images at a time (fewer when the
    images are large: at most about 2²⁰ pixels, to stay in the CPU's cache); a blank image
    comes out all zeros and is flagged. Equal to `prepare` image by image, bit for bit.
    Any float dtype (or byte order) is taken; each chunk is converted to float64 on its own.
    """
    g = np.asarray(g)
    n = len(g)
    if n and max(g.shape[1:]) > MAX_SIDE:
        raise TooLarge(too_large_message("image", *g.shape[1:]))
    chunk = max(1, min(chunk, (1 << 20) // max(1, g.shape[1] * g.shape[2]))) if n else chunk
    images = np.zeros((n, FRAME, FRAME), np.uint8)
    blank = np.zeros(n, bool)
    for start in range(0, n, chunk):
        part = g[start : start + chunk]
        part = part / 255.0 if part.dtype == np.uint8 else part.astype(np.float64)
        images[start : start + chunk], blank[start : start + chunk] = _prepare_chunk(part, style)
    return images, blank


def _prepare_chunk(g: np.ndarray, style: Style) -> tuple[np.ndarray, np.ndarray]:
    """prepare_many on (n, H, W) float64 images, which it overwrites."""
    H, W = g.shape[1:]
    border = ring(g)
    m = np.median(border, axis=1)
    lowest, highest = g.min(axis=(1, 2)), g.max(axis=(1, 2))
    inverted = m - lowest > highest - m
    if inverted.any():
        g[inverted] = 1.0 - g[inverted]
        border[inverted] = 1.0 - border[inverted]
        m[inverted] = 1.0 - m[inverted]
    p = np.where(inverted, 1.0 - lowest, highest)  # max(1 − g) = 1 − min(g), exactly
    dev = np.sort(np.abs(border - m[:, None]), axis=1)
    sigma = MAD_TO_SIGMA * np.median(dev, axis=1)
    n_faint = np.count_nonzero(dev < ((p - m) / FAINT)[:, None], axis=1)  # sorted: the faint ones come first
    q90 = dev[np.arange(len(dev)), (0.9 * np.maximum(n_faint - 1, 0)).astype(np.int64)] / Q90_SIGMAS
    sigma = np.where(n_faint > 0, np.maximum(sigma, q90), sigma)
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
    h, w = r1 - r0 + 1, c1 - c0 + 1
    n = np.maximum(h, w)
    s = style.box / n
    B = style.box
    to_levels(v)  # step 6's integer levels, for every pixel (those outside a crop get no weight)
    T = np.empty((len(v), B, B))
    # A crop whose longer side is already B (s = 1: MNIST's own digits, Fashion-MNIST's pictures):
    # its overlaps are n on the diagonal, so T = n² · V, and step 7 divides n² out again. Copy V.
    copy = (n == B) & ~blank
    if copy.any():
        T[copy] = _windows(v[copy], r0[copy], c0[copy], h[copy], w[copy], B)
    scale = ~copy & ~blank
    if scale.any():
        k = np.flatnonzero(scale)
        # Crop coordinates a = row − r0; rows outside the crop get zero weight.
        Ly = _batch_weights((np.arange(H) - r0[k, None]).astype(np.float64), in_rows[k], n[k], B)  # (k, B, H)
        Lx = _batch_weights((np.arange(W) - c0[k, None]).astype(np.float64), in_cols[k], n[k], B)  # (k, B, W)
        with blas.threads(1):  # hundreds of B×28 products: a second thread per product costs more than it saves
            T[k] = np.matmul(np.matmul(Ly, v[k]), Lx.transpose(0, 2, 1))  # integers below 2⁵³: exact
    T[blank] = 1.0
    T /= T.max(axis=(1, 2), keepdims=True)
    T *= 255.0
    T += 0.5
    q = np.floor(T, out=T)
    if style.centre == "mass":
        total = q.sum(axis=(1, 2))
        centres = np.arange(style.box) + 0.5
        cy = (centres * q.sum(axis=2)).sum(axis=1) / total
        cx = (centres * q.sum(axis=1)).sum(axis=1) / total
    else:
        cy, cx = s * h / 2, s * w / 2
    dy = np.floor(style.target - cy + 0.5).astype(np.int64)
    dx = np.floor(style.target - cx + 0.5).astype(np.int64)
    return _place_many(q.astype(np.uint8), dy, dx, blank), blank


def _place_many(q: np.ndarray, dy: np.ndarray, dx: np.ndarray, blank: np.ndarray) -> np.ndarray:
    """`place` for a chunk, as one scatter into frames padded by B on every side (no shift can
    reach past that: |t − c| < B), then the 28×28 middles."""
    n, box = q.shape[:2]
    side = FRAME + 2 * box
    padded = np.zeros((n, side, side), np.uint8)
    i = np.arange(box)
    where = (np.arange(n)[:, None, None] * (side * side)
             + (dy[:, None, None] + box + i[None, :, None]) * side
             + (dx[:, None, None] + box + i[None, None, :]))
    q[blank] = 0
    padded.ravel()[where.ravel()] = q.ravel()
    return padded[:, box : box + FRAME, box : box + FRAME]


def _windows(v: np.ndarray, r0: np.ndarray, c0: np.ndarray, h: np.ndarray, w: np.ndarray, box: int) -> np.ndarray:
    """The crops (h, w) of a chunk at the top left of zero B×B boxes (every h, w ≤ B)."""
    n, H, W = v.shape
    padded = np.zeros((n, H + box, W + box))
    padded[:, :H, :W] = v
    windows = np.lib.stride_tricks.sliding_window_view(padded, (box, box), axis=(1, 2))  # a view, no copy
    T = windows[np.arange(n), r0, c0]  # (n, B, B): each image's window at its crop's corner
    i = np.arange(box)
    T *= (i[None, :, None] < h[:, None, None]) & (i[None, None, :] < w[:, None, None])
    return T


def _boxes(profiles: np.ndarray, trim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ahead = np.cumsum(profiles, axis=1)
    behind = np.cumsum(profiles[:, ::-1], axis=1)  # reversed: behind[:, k] is the total of the last k+1
    limit = trim * ahead[:, -1:]
    first = np.argmax(ahead > limit, axis=1)
    last = profiles.shape[1] - 1 - np.argmax(behind > limit, axis=1)
    idx = np.arange(profiles.shape[1])
    return first, last, (idx >= first[:, None]) & (idx <= last[:, None])


def _batch_weights(coords: np.ndarray, inside: np.ndarray, n: np.ndarray, box: int) -> np.ndarray:
    """`overlaps` for each image of a chunk, zero outside its crop: (k, B, n_in) float64 integers.

    The overlap of [i·n, (i+1)·n) with [lo, hi) is C(i+1) − C(i) with C(t) = min(max(t·n, lo), hi):
    the same integers as overlaps' max(0, min((i+1)·n, hi) − max(i·n, lo)), in two passes; a
    row outside the crop gets lo = hi = 0, so all its overlaps are 0."""
    lo = np.where(inside, coords * box, 0.0)[:, None, :]  # (k, 1, n_in)
    hi = np.where(inside, (coords + 1.0) * box, 0.0)[:, None, :]
    edges = np.arange(box + 1, dtype=np.float64)[None, :, None] * n.astype(np.float64)[:, None, None]
    C = np.maximum(edges, lo)
    np.minimum(C, hi, out=C)
    return C[:, 1:] - C[:, :-1]
