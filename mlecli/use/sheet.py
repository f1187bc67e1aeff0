"""The `mlecli predict --show` sheet: the 28×28 images the network saw, enlarged, each with its
name, the decision in the task's words and ŷ under it.

Drawn with Pillow's own font (no font file of the system is looked for), so the same images
give the same PNG bytes on any machine with the same Pillow. Captions are fitted by their
width in pixels: a file's own name (not its folders) on up to two lines, then shortened from
the right (a stack's `[i]` always kept); the decision wrapped onto two lines at its spaces
and shortened from the right only past them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from mlecli.safe.errors import printable
from mlecli.safe.files import atomic_write_bytes
from mlecli.use.predict import Batch
from mlecli.use.preparation import FRAME

LIMIT = 400  # images on one sheet
SCALE = 5  # each pixel a 5×5 block: 140 px a side, no smoothing
COLUMNS = 10
MARGIN = 8  # pixels around each image's cell
FONT_SIZE = 13
LINE = 16  # pixels from one caption line to the next
LINES = 5  # the name and the decision (up to two lines each), ŷ
TILE = FRAME * SCALE
CELL_W, CELL_H = TILE + 2 * MARGIN, TILE + 2 * MARGIN + LINES * LINE + 4


def shortened(text: str, fits: Callable[[str], bool], keep: str = "") -> str:
    """`text` + `keep` if it fits, else the longest start of `text` followed by "…" and `keep`."""
    if fits(text + keep):
        return text + keep
    cut = len(text)
    while cut > 0 and not fits(text[:cut].rstrip() + "…" + keep):
        cut -= 1
    return text[:cut].rstrip() + "…" + keep


def wrapped(text: str, fits: Callable[[str], bool], lines: int = 2) -> list[str]:
    """`text` on at most `lines` lines, broken at spaces; the last line shortened from the
    right (`shortened`) when the rest does not fit."""
    words, out = text.split(" "), []
    while words and len(out) < lines - 1:
        take = 1
        while take < len(words) and fits(" ".join(words[: take + 1])):
            take += 1
        if not fits(" ".join(words[:take])):
            break  # one word wider than the line: the last line shortens it
        out.append(" ".join(words[:take]))
        words = words[take:]
    if words:
        out.append(shortened(" ".join(words), fits))
    return out


def name_lines(label: str, fits: Callable[[str], bool]) -> list[str]:
    """A file's own name (what tells the images of a folder apart; its folders are in the
    table) on one line, or two: cut after its last `-`, `_`, `.` or space that leaves the first
    line at least half full, else where it is full; the second shortened from the right. A
    stack's `[i]` always shows at its end."""
    name, keep = label, ""
    if label.endswith("]") and "[" in label:  # a stack's image: its index always shows
        name, keep = label[: label.rindex("[")], label[label.rindex("[") :]
    name = name.rstrip("/").rsplit("/", 1)[-1] or name
    if fits(name + keep):
        return [name + keep]
    cut = len(name)
    while cut > 1 and not fits(name[:cut]):
        cut -= 1
    breaks = [k + 1 for k in range(cut // 2, cut) if name[k] in "-_. "]
    cut = breaks[-1] if breaks else cut
    return [name[:cut], shortened(name[cut:], fits, keep)]


def caption(label: str, p: float, word: str, fits: Callable[[str], bool]) -> list[str]:
    """The lines under one image: its name and the decision in words (one or two lines each), ŷ."""
    return [*name_lines(label, fits), *wrapped(word, fits), f"ŷ {p:.4f}"]


def show_grid(batches: Iterable[Batch], words: tuple[str, str], threshold: float, path: Path,
              limit: int = LIMIT) -> int:
    """Write the sheet of the first `limit` images of `batches` to `path` (a PNG, atomically),
    ten to a row; return how many it shows."""
    from PIL import Image, ImageDraw, ImageFont  # lazy: Pillow only for --show

    shown = [(label, p, d, image) for b in batches
             for label, p, d, image in zip(b.labels(), b.p.tolist(), b.decided(threshold).tolist(), b.images)]
    shown = shown[:limit]
    rows = max(1, math.ceil(len(shown) / COLUMNS))
    sheet = Image.new("L", (CELL_W * min(COLUMNS, max(len(shown), 1)), CELL_H * rows), 255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)

    def fits(text: str) -> bool:
        return draw.textlength(text.replace("ŷ", "y"), font=font) <= TILE + MARGIN

    for k, (label, p, d, image) in enumerate(shown):
        x, y = (k % COLUMNS) * CELL_W + MARGIN, (k // COLUMNS) * CELL_H + MARGIN
        pixels = image if image.dtype == np.uint8 else np.floor(255 * image + 0.5).astype(np.uint8)
        sheet.paste(Image.fromarray(pixels).resize((TILE, TILE), Image.NEAREST), (x, y))
        lines = caption(printable(label), p, words[d], fits)
        for i, text in enumerate(lines):
            top = y + TILE + 4 + i * LINE
            if text.startswith("ŷ"):
                _y_hat(draw, x, top, font)
                x_text = x + draw.textlength("y ", font=font)
                draw.text((x_text, top), text[2:], fill=0, font=font)
            else:
                draw.text((x, top), text, fill=0, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return len(shown)


def _y_hat(draw, x: float, top: float, font) -> None:
    """ŷ: a y with a hat drawn over it (Pillow's font has no ŷ, nor a combining circumflex)."""
    draw.text((x, top), "y", fill=0, font=font)
    left, x_top, right, _ = draw.textbbox((x, top), "x", font=font)
    mid = x + draw.textlength("y", font=font) / 2
    half = (right - left) / 3
    draw.line([(mid - half, x_top - 1), (mid, x_top - 4), (mid + half, x_top - 1)], fill=0, width=1)
