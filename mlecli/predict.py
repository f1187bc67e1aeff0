"""Using a trained network on new images: the `Model` behind `mlecli.load`, and `mlecli predict`.

Every image is prepared as MNIST's were (`prepare.py`) unless `raw`, then the network
gives ŷ = P(y = 1 | image). Inputs are read by `inputs.py`; a failed input is reported
in its place and the others still go through.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli import checkpoint as ckpt
from mlecli import inputs
from mlecli.errors import CheckpointError, InputError
from mlecli.fsutil import atomic_write_bytes
from mlecli.model import forward, sigmoid
from mlecli.prepare import FRAME, BlankImage, Style, blank_message, prepare, prepare_many, style_for
from mlecli.task import class_words, image_scores

SHAPE = (FRAME, FRAME)
SHOW_LIMIT = 400  # images in a --show grid


@dataclass(frozen=True)
class Prediction:
    """ŷ for one image: `source` as the user named it, `index` inside a stack (else None), the
    prepared (or raw) `image` (28, 28) the network saw (uint8, or float64 0-1 for raw floats)."""

    source: str
    index: int | None
    p: float
    image: np.ndarray

    @property
    def label(self) -> str:
        return self.source if self.index is None else f"{self.source}[{self.index}]"


def blank_error(name: str) -> InputError:
    return InputError(blank_message(name))


def check_image_shape(cp: ckpt.Checkpoint) -> None:
    """Refuse a network trained on images that are not 28×28 (predict prepares 28×28 images)."""
    n_inputs = cp.meta.get("n_inputs")
    shape = cp.meta.get("image_shape")
    if n_inputs != FRAME * FRAME or (shape is not None and list(shape) != list(SHAPE)):
        seen = "×".join(map(str, shape)) if isinstance(shape, list) else "?"
        raise CheckpointError(
            f"{cp.path} was trained on {seen} images ({n_inputs} inputs); predict and export work with "
            "28×28 images (MNIST's form): use a network trained on a 28×28 dataset"
        )


class Model:
    """A trained network, ready for new images (what `mlecli.load` returns).

    `classes_` names the two classes (y = 0, y = 1) in the task's own words;
    `predict_proba(images)` gives (N, 2) probabilities of them, `predict(images)` the
    class (0 or 1) at a threshold, `prepare(image)` the 28×28 image the network sees.
    Images: a path (image file, folder, .npy, IDX), a PIL image, a gray array (H, W) or
    (N, H, W) (uint8 0-255 or float 0-1), or a list of these.
    """

    def __init__(self, cp: ckpt.Checkpoint):
        check_image_shape(cp)
        self.checkpoint = cp
        self.config = cp.config
        self.params = cp.params
        self.classes_ = class_words(cp.config)
        self.style = style_for(cp.config.data.dataset)  # how the network's training images were made

    def __repr__(self) -> str:
        neg, pos = self.classes_
        return (
            f"<mlecli Model {self.checkpoint.path} (epoch {self.checkpoint.epoch}): {pos} vs {neg}, "
            f"hidden {list(self.config.model.hidden)}>"
        )

    # -- the math ---------------------------------------------------------
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """ŷ (N,) float64 of 28×28 network inputs (N, 28, 28): uint8 0-255 or float 0-1."""
        if images.dtype == np.uint8:
            z = image_scores(self.params, images)
        else:
            dtype = self.params[-1][0].dtype
            z = forward(self.params, images.reshape(len(images), -1).astype(dtype))[1]
        return sigmoid(z.astype(np.float64))

    # -- the Python API ---------------------------------------------------
    def prepare(self, image) -> np.ndarray:
        """The uint8 (28, 28) image the network sees for one image, or (N, 28, 28) for several."""
        preds = list(self._network_inputs(image, raw=False))
        images = np.stack([p for _, p in preds])
        return images[0] if len(images) == 1 and not _is_many(image) else images

    def predict_proba(self, images, raw: bool = False) -> np.ndarray:
        """(N, 2) float64: P(y = 0) and P(y = 1) for each image (as scikit-learn's classifiers give)."""
        p = self._p(images, raw)
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, images, threshold: float = 0.5, raw: bool = False) -> np.ndarray:
        """(N,) int: 1 where ŷ ≥ threshold, else 0; `classes_[k]` names class k."""
        return (self._p(images, raw) >= threshold).astype(np.int64)

    def _p(self, images, raw: bool) -> np.ndarray:
        prepared = [p for _, p in self._network_inputs(images, raw)]
        if not prepared:
            return np.zeros(0)
        same = all(p.dtype == prepared[0].dtype for p in prepared)
        stack = np.stack(prepared) if same else np.stack([p / 255.0 if p.dtype == np.uint8 else p for p in prepared])
        return self.probabilities(stack)

    def _network_inputs(self, images, raw: bool) -> Iterator[tuple[str, np.ndarray]]:
        for loaded in _loaded(images):
            for item in network_inputs(loaded, raw, self.style):
                if isinstance(item, InputError):
                    raise item
                yield item

    # -- the command ------------------------------------------------------
    def predict_sources(
        self, sources: list[inputs.Source | InputError], raw: bool
    ) -> Iterator[list[Prediction] | InputError]:
        """For each source (`inputs.sources`) in order: its predictions, or the error that stopped it.
        A stack (an IDX or .npy file) gives one list; a blank image inside it gives an error of its own."""
        for src in sources:
            if isinstance(src, InputError):
                yield src
                continue
            try:
                loaded = inputs.load(src)
            except InputError as exc:
                yield exc
                continue
            good: list[tuple[int | None, np.ndarray]] = []
            for item in network_inputs(loaded, raw, self.style):
                if isinstance(item, InputError):
                    if good:
                        yield self._predictions(src.name, good)
                        good = []
                    yield item
                else:
                    good.append(item)
            if good:
                yield self._predictions(src.name, good)

    def _predictions(self, name: str, items: list[tuple[int | None, np.ndarray]]) -> list[Prediction]:
        images = np.stack([im for _, im in items])
        p = self.probabilities(images)
        return [Prediction(name, index, float(pi), im) for (index, im), pi in zip(items, p)]


def network_inputs(
    loaded: inputs.Loaded, raw: bool, style: Style
) -> Iterator[tuple[int | None, np.ndarray] | InputError]:
    """(index, 28×28 network input) for each image of a source, prepared in `style` unless `raw`,
    or an InputError for one that cannot be used."""
    name = loaded.source.name
    if loaded.picture:
        g = loaded.images
        if raw:
            if g.shape != SHAPE:
                yield _raw_shape_error(name, g.shape)
                return
            yield None, g
            return
        try:
            yield None, prepare(g, name, style)
        except BlankImage:
            yield blank_error(name)
        return
    stack = loaded.images
    if raw:
        if stack.shape[1:] != SHAPE:
            yield _raw_shape_error(name, stack.shape[1:])
            return
        for i in range(len(stack)):
            yield (i if loaded.indexed else None), stack[i]
        return
    images, blank = prepare_many(stack, style=style)
    for i in range(len(stack)):
        index = i if loaded.indexed else None
        if blank[i]:
            yield blank_error(name if index is None else f"{name}[{i}]")
        else:
            yield index, images[i]


def _raw_shape_error(name: str, shape: tuple[int, ...]) -> InputError:
    return InputError(
        f"{name}: --raw needs 28×28 images (light ink on black, as MNIST's), this is {shape[0]}×{shape[1]}; "
        "leave out --raw to prepare it"
    )


def _is_many(images) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 3 or (images.ndim == 2 and images.shape[1] == 784 and images.shape[0] != 28)
    if isinstance(images, (str, Path)):
        return Path(images).is_dir()
    return False


def _loaded(images) -> Iterator[inputs.Loaded]:
    """The API's inputs as Loaded sources (raising InputError for the first unusable one)."""
    if isinstance(images, (list, tuple)):
        for item in images:
            yield from _loaded(item)
        return
    if isinstance(images, (str, Path)):
        for src in inputs.sources([str(images)]):
            if isinstance(src, InputError):
                raise src
            yield inputs.load(src)
        return
    if isinstance(images, np.ndarray):
        arr, indexed = inputs.check_array(images, "array")
        yield inputs.Loaded(inputs.Source("array", None), arr, picture=False, indexed=indexed)
        return
    if type(images).__module__.startswith("PIL."):
        buf = io.BytesIO()
        images.save(buf, format="PNG" if images.mode not in ("CMYK", "F", "I") else "TIFF")
        yield inputs.Loaded(inputs.Source("image", None), inputs.read_image(buf.getvalue(), "image"), picture=True)
        return
    raise InputError(
        f"cannot predict on a {type(images).__name__}: give a path, a PIL image, or a gray array (H, W) or (N, H, W)"
    )


def load_model(path: str | Path, checkpoint: str = "best") -> Model:
    """A run folder (its `checkpoint`: best, last or epoch-N) or a checkpoint file, as a Model."""
    return Model(ckpt.load(ckpt.resolve(Path(path), checkpoint)))


# ---------------------------------------------------------------------------
# Output


def text_lines(preds: list[Prediction], words: tuple[str, str], threshold: float, width: int = 0) -> list[str]:
    """One aligned line per image: its name (padded to at least `width`), ŷ and the decision."""
    width = max(width, *(len(p.label) for p in preds))
    return [f"{p.label:<{width}}  ŷ {p.p:.4f}  {words[p.p >= threshold]}" for p in preds]


def json_lines(preds: list[Prediction], words: tuple[str, str], threshold: float) -> list[str]:
    return [
        json.dumps({"input": p.source, "index": p.index, "p": p.p, "prediction": int(p.p >= threshold),
                    "label": words[p.p >= threshold]}, ensure_ascii=False)
        for p in preds
    ]


def show_grid(preds: Iterable[Prediction], words: tuple[str, str], threshold: float, path: Path) -> None:
    """A PNG of the network's inputs, 3× enlarged (each pixel a 3×3 block, no smoothing), with
    each image's name, ŷ and decision under it; ten to a row."""
    from PIL import Image, ImageDraw, ImageFont

    preds = list(preds)
    scale, cols = 3, 10
    cell_w, cell_h = FRAME * scale + 16, FRAME * scale + 44
    rows = max(1, math.ceil(len(preds) / cols))
    sheet = Image.new("L", (cell_w * min(cols, max(len(preds), 1)), cell_h * rows), 255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, p in enumerate(preds):
        x, y = (k % cols) * cell_w + 8, (k // cols) * cell_h + 4
        pixels = p.image if p.image.dtype == np.uint8 else np.floor(255 * p.image + 0.5).astype(np.uint8)
        sheet.paste(Image.fromarray(pixels).resize((FRAME * scale, FRAME * scale), Image.NEAREST), (x, y))
        word = words[p.p >= threshold]
        draw.text((x, y + FRAME * scale + 2), _fit(p.label, 14), fill=0, font=font)
        draw.text((x, y + FRAME * scale + 15), _fit(f"{p.p:.3f} {word}", 14), fill=0, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _fit(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]
