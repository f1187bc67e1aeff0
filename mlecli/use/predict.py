"""Using a trained network on new images: the `Model` behind `mlecli.load`, and `mlecli predict`.

Every image is prepared as MNIST's were (`prepare.py`) unless `raw`, then the network
gives ŷ = P(y = 1 | image). Inputs are read by `inputs.py`; a failed input is reported
in its place and the others still go through: each input is read, prepared and predicted
inside `inputs.guard`, and a stack goes through a chunk of images at a time (memory bounded
by the chunk, not by the file). A network is checked when it is loaded: trained on 28×28
images, and with weights whose sums cannot overflow its float type, so every ŷ is finite.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlecli.nn.metrics import decide
from mlecli.nn.model import forward, sigmoid
from mlecli.nn.pixels import image_scores
from mlecli.run import checkpoint as ckpt
from mlecli.run.task import class_words
from mlecli.safe.errors import CheckpointError, InputError, MlecliError, quoted
from mlecli.use import inputs
from mlecli.use.preparation import FRAME, BlankImage, Style, blank_message, prepare_many, prepare_steps, style_for

SHAPE = (FRAME, FRAME)
MAX_REFUSALS = 10  # images of one file refused one line each; the rest of them in one line
CHUNK_PIXELS = 1 << 21  # pixels of a stack prepared and predicted at a time (2,674 images of 28×28)
CHECKPOINT_NAMES = re.compile(r"best|last|epoch-\d+")


@dataclass(frozen=True)
class Batch:
    """The network's answer for the usable images of one source: `source` as the user named it,
    `index` (n,) their positions in a stack (None for a single image), `images` (n, 28, 28) what
    the network saw (uint8, or float64 0-1 for raw float arrays) and `z` (n,) float64 their
    logits, in the network's own precision (converted exactly)."""

    source: str
    index: np.ndarray | None
    images: np.ndarray
    z: np.ndarray

    @property
    def p(self) -> np.ndarray:
        """(n,) float64: ŷ = σ(z)."""
        return sigmoid(self.z)

    def decided(self, threshold: float) -> np.ndarray:
        """(n,) bool: y = 1 where σ(z) ≥ threshold, by the one rule (metrics.decide)."""
        return decide(self.z, threshold)

    def labels(self, name: str | None = None) -> list[str]:
        """`source` (or `name` in its place) for each image, with `[i]` inside a stack."""
        name = self.source if name is None else name
        if self.index is None:
            return [name] * len(self.z)
        return [f"{name}[{i}]" for i in self.index.tolist()]


@dataclass(frozen=True)
class Usable:
    """What `network_inputs` found in a source: the images the network can take, and the errors."""

    index: np.ndarray | None
    images: np.ndarray
    errors: list[InputError]


def blank_error(name: str) -> InputError:
    return InputError(blank_message(name))


def check_image_shape(cp: ckpt.Checkpoint) -> None:
    """Refuse a network trained on images that are not 28×28 (predict prepares 28×28 images),
    and one whose meta does not say what it was trained on (no image_shape: only a network
    of 784 inputs trained on MNIST or Fashion-MNIST, both 28×28, is taken without it)."""
    n_inputs = cp.meta.get("n_inputs")
    shape = cp.meta.get("image_shape")
    advice = "predict and export work with 28×28 images (MNIST's form): use a network trained on a 28×28 dataset"
    if shape is None:
        if n_inputs == FRAME * FRAME and cp.config.data.dataset in ("mnist", "fashion-mnist"):
            return
        raise CheckpointError(f"{cp.path} does not say what size of image it was trained on (no image_shape in its "
                              f"meta record; {n_inputs} inputs, dataset {cp.config.data.dataset}); {advice}")
    seen = "×".join(map(str, shape))  # its product is n_inputs: checkpoint.load refuses meta records at odds
    if list(shape) != list(SHAPE):
        raise CheckpointError(f"{cp.path} was trained on {seen} images ({n_inputs} inputs); {advice}")


def check_weights(cp: ckpt.Checkpoint) -> None:
    """Refuse weights whose sums can overflow the network's float type. Every layer's inputs
    lie in [0, 1] (pixels / 255, sigmoids), so |z_j| ≤ Σ_i |W_ij| + |b_j|: below half the
    type's largest number, no partial sum in any order can overflow, and ŷ is always finite."""
    limit = float(np.finfo(cp.params[-1][0].dtype).max) / 2
    for k, (W, b) in enumerate(cp.params, start=1):
        with np.errstate(over="ignore"):
            reach = float(np.max(np.abs(W).astype(np.float64).sum(axis=0) + np.abs(b).astype(np.float64)))
        if not reach < limit:
            raise CheckpointError(
                f"{cp.path}: its weights are too large to compute with (layer {k}'s sums reach {reach:.3g}, beyond "
                f"{W.dtype}'s range); the checkpoint is damaged"
            )


def check_threshold(threshold) -> float:
    """A decision threshold: a number strictly between 0 and 1."""
    value = float(threshold) if isinstance(threshold, numbers.Real) and not isinstance(threshold, bool) else math.nan
    if not 0 < value < 1:
        raise MlecliError(f"threshold must be a number between 0 and 1 (both excluded), got {threshold!r}")
    return value


def checkpoint_name(which: str) -> str:
    """`best`, `last` or `epoch-N`, the only checkpoints of a run one may name."""
    if not isinstance(which, str) or not CHECKPOINT_NAMES.fullmatch(which):
        raise CheckpointError(f"checkpoint {quoted(which)} is not best, last or epoch-N")
    return which


class Model:
    """A trained network, ready for new images (what `mlecli.load` returns).

    `classes_` names the two classes (y = 0, y = 1) in the task's own words;
    `predict_proba(images)` gives (N, 2) probabilities of them, `predict(images)` the
    class (0 or 1) at a threshold, `prepare(image)` the 28×28 image the network sees.
    Images: a path (image file, folder, .npy, IDX), a PIL image, a gray array (H, W) or
    (N, H, W) (uint8 0-255 or float 0-1), a colour array (H, W, 3|4) or (N, H, W, 3|4) (RGB or
    RGBA, as `np.array(PIL image)` gives), or a list of these.
    """

    def __init__(self, cp: ckpt.Checkpoint):
        check_image_shape(cp)
        check_weights(cp)
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
    def logits(self, images: np.ndarray) -> np.ndarray:
        """z (N,) of 28×28 network inputs (N, 28, 28), uint8 0-255 or float 0-1: computed in the
        network's own precision (as `evaluate` does), given as float64 (an exact conversion)."""
        with np.errstate(all="ignore"):  # check_weights bounds every sum; nothing is left to warn about
            if images.dtype == np.uint8:
                z = image_scores(self.params, images)
            else:
                dtype = self.params[-1][0].dtype
                z = forward(self.params, images.reshape(len(images), -1).astype(dtype))[1]
        if not np.all(np.isfinite(z)):  # unreachable after check_weights: the last guard before any output
            raise CheckpointError(f"{self.checkpoint.path}: the network gives a ŷ that is not a number")
        return z.astype(np.float64)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """ŷ = σ(z) (N,) float64 of 28×28 network inputs (N, 28, 28): uint8 0-255 or float 0-1."""
        return sigmoid(self.logits(images))

    # -- the Python API ---------------------------------------------------
    def prepare(self, image) -> np.ndarray:
        """The uint8 (28, 28) image the network sees for one image, or (N, 28, 28) for several."""
        images = self._network_inputs(image, raw=False)
        return images[0] if len(images) == 1 and not _is_many(image) else images

    def predict_proba(self, images, raw: bool = False) -> np.ndarray:
        """(N, 2) float64: P(y = 0) and P(y = 1) for each image (as scikit-learn's classifiers give)."""
        p = self.probabilities(self._network_inputs(images, raw))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, images, threshold: float = 0.5, raw: bool = False) -> np.ndarray:
        """(N,) int: 1 where ŷ ≥ threshold (exactly: σ(z) ≥ threshold, as every command decides,
        metrics.decide), else 0; `classes_[k]` names class k."""
        threshold = check_threshold(threshold)
        return decide(self.logits(self._network_inputs(images, raw)), threshold).astype(np.int64)

    def _network_inputs(self, images, raw: bool) -> np.ndarray:
        """(N, 28, 28) network inputs of the API's images; the first unusable one raises its InputError."""
        parts = []
        for loaded_or_error in _loaded(images):
            if isinstance(loaded_or_error, InputError):
                raise loaded_or_error
            with inputs.guard(loaded_or_error.source.name):
                for usable in network_inputs(loaded_or_error, raw, self.style):
                    if usable.errors:
                        raise usable.errors[0]
                    parts.append(usable.images)
        if not parts:
            return np.zeros((0, FRAME, FRAME), np.uint8)
        if any(p.dtype != parts[0].dtype for p in parts):
            parts = [p / 255.0 if p.dtype == np.uint8 else p for p in parts]
        return np.concatenate(parts)

    # -- the command ------------------------------------------------------
    def predict_sources(self, sources: list[inputs.Source | InputError], raw: bool) -> Iterator[Batch | InputError]:
        """For each source (`inputs.sources`) in order: the error that stopped it, or its Batches
        (a stack comes a chunk at a time), each followed by an error for each image inside it
        that could not be used (a blank one; past MAX_REFUSALS of one file, one line for the rest)."""
        for src in sources:
            if isinstance(src, InputError):
                yield src
            else:
                yield from self._predict_source(src, raw)

    def _predict_source(self, src: inputs.Source, raw: bool) -> Iterator[Batch | InputError]:
        refused = 0
        try:
            with inputs.guard(src.name):
                loaded = inputs.load(src)
                for usable in network_inputs(loaded, raw, self.style):
                    if len(usable.images):
                        yield Batch(src.name, usable.index, usable.images, self.logits(usable.images))
                    for error in usable.errors:
                        refused += 1
                        if refused <= MAX_REFUSALS:
                            yield error
        except InputError as exc:
            yield exc
        if refused > MAX_REFUSALS:
            yield InputError(f"{src.name}: {refused - MAX_REFUSALS:,} more images with no ink found "
                             f"({refused:,} in all; the first {MAX_REFUSALS} are named above)")


def network_inputs(loaded: inputs.Loaded, raw: bool, style: Style) -> Iterator[Usable]:
    """The 28×28 network inputs of a source, prepared in `style` unless `raw`, and the errors of
    the images that cannot be used: one Usable for a picture, one per chunk of a stack (at most
    CHUNK_PIXELS pixels of it converted and prepared at a time)."""
    name = loaded.source.name
    if loaded.picture:
        g = loaded.images
        if raw:
            if g.shape != SHAPE:
                yield Usable(None, np.zeros((0, *SHAPE)), [_raw_shape_error(name, g.shape)])
            else:
                yield Usable(None, g[None], [])
            return
        try:
            yield Usable(None, prepare_steps(g, name, style, overwrite=True)[0][None], [])
        except BlankImage:
            yield Usable(None, np.zeros((0, *SHAPE), np.uint8), [blank_error(name)])
        return
    stack = loaded.images
    if raw and stack.shape[1:3] != SHAPE:
        yield Usable(None, np.zeros((0, *SHAPE)), [_raw_shape_error(name, stack.shape[1:3])])
        return
    step = max(1, CHUNK_PIXELS // (stack.shape[1] * stack.shape[2]))
    for start in range(0, len(stack), step):
        part = stack[start : start + step]
        if part.ndim == 4:  # colour pictures, made gray as picture files are
            part = np.stack([inputs.colour_gray(picture) for picture in part])
        index = np.arange(start, start + len(part)) if loaded.indexed else None
        if raw:
            yield Usable(index, part if part.dtype == np.uint8 else part.astype(np.float64), [])
            continue
        images, blank = prepare_many(part, style=style)
        if not blank.any():
            yield Usable(index, images, [])
            continue
        refused = (np.flatnonzero(blank) + start).tolist()
        errors = [blank_error(name if index is None else f"{name}[{i}]") for i in refused]
        yield Usable(None if index is None else index[~blank], images[~blank], errors)


def _raw_shape_error(name: str, shape: tuple[int, ...]) -> InputError:
    return InputError(
        f"{name}: --raw needs 28×28 images (light ink on black, as MNIST's), this is {shape[0]}×{shape[1]}; "
        "leave out --raw to prepare it"
    )


def _plain(images):
    """An ndarray subclass (np.matrix, a masked array, a memmap, …) as the plain array of its
    values (np.asarray: a masked array's mask is not used); anything else as it is. A matrix
    stays 2-D whatever it is reshaped to, and a masked array's minimum can be `masked`: what
    is read is the values, not the subclass's arithmetic."""
    return np.asarray(images) if isinstance(images, np.ndarray) and type(images) is not np.ndarray else images


def _is_many(images) -> bool:
    images = _plain(images)
    if isinstance(images, (list, tuple)):
        return True
    if isinstance(images, np.ndarray):
        if inputs.colour_channels(images.shape):
            return images.ndim == 4
        return images.ndim == 3 or (images.ndim == 2 and images.shape[1] == 784)
    if isinstance(images, (str, Path)):
        return Path(images).is_dir()
    return False


def _loaded(images) -> Iterator[inputs.Loaded | InputError]:
    """The API's inputs as Loaded sources, or the InputError of one that cannot be used."""
    if isinstance(images, (list, tuple)):
        for item in images:
            yield from _loaded(item)
        return
    if isinstance(images, (str, Path)):
        for src in inputs.sources([str(images)]):
            if isinstance(src, InputError):
                yield src
                return
            try:
                yield inputs.load(src)
            except InputError as exc:
                yield exc
                return
        return
    if isinstance(images, np.ndarray):
        try:
            with inputs.guard("array"):
                images = _plain(images)
                loaded = inputs.array_loaded(inputs.Source("array", None), images, "array")
        except InputError as exc:
            yield exc
            return
        yield loaded
        return
    if type(images).__module__.startswith("PIL."):  # the same conversion as a picture file's
        try:
            with inputs.guard("image"):
                gray = inputs.picture_gray(images, "image")
        except InputError as exc:
            yield exc
            return
        yield inputs.Loaded(inputs.Source("image", None), gray, picture=True)
        return
    yield InputError(
        f"cannot predict on a {type(images).__name__}: give a path, a PIL image, or a gray array (H, W) or (N, H, W) "
        "or a colour one (H, W, 3|4) or (N, H, W, 3|4)"
    )


def load_model(path: str | Path, checkpoint: str = "best") -> Model:
    """A run folder (its `checkpoint`: best, last or epoch-N) or a checkpoint file, as a Model."""
    return Model(ckpt.load(ckpt.resolve(Path(path), checkpoint_name(checkpoint))))


# ---------------------------------------------------------------------------
# Output


def text_lines(batch: Batch, words: tuple[str, str], threshold: float, width: int = 0,
               name: str | None = None) -> list[str]:
    """One aligned line per image: its name (`name` for the source's, if given; padded to at
    least `width`), ŷ and the decision."""
    labels = batch.labels(name)
    width = max(width, *map(len, labels))
    decided = batch.decided(threshold).tolist()
    return [f"{label:<{width}}  ŷ {p:.4f}  {words[d]}" for label, p, d in zip(labels, batch.p.tolist(), decided)]


# What str.splitlines (and other Unicode-aware readers) end a line at, that JSON leaves raw:
# the rest (\n, \r, \v, \f, \x1c-\x1e) are control characters JSON escapes anyway.
LINE_BREAKS = "\x85\u2028\u2029"
_ESCAPED_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in LINE_BREAKS})


def json_string(text: str) -> str:
    """`text` as a JSON string in valid Unicode (`inputs.display`), non-ASCII kept as it is
    except the line breaks of LINE_BREAKS, escaped: the string never ends a line for any reader."""
    return json.dumps(inputs.display(text), ensure_ascii=False).translate(_ESCAPED_BREAKS)


def json_lines(batch: Batch, words: tuple[str, str], threshold: float) -> list[str]:
    """One JSON object per image, as json.dumps writes it (built by hand: ten times faster).

    Valid JSON in valid UTF-8 whatever the names, one object a line whatever splits the lines:
    each string goes through `json_string`, and every ŷ is finite (Model.probabilities makes
    sure of it)."""
    assert np.all(np.isfinite(batch.p)), "Model.probabilities gives finite ŷ only"
    source = json_string(batch.source)
    label = [json_string(w) for w in words]
    index = ["null"] * len(batch.p) if batch.index is None else batch.index.tolist()
    decided = batch.decided(threshold).tolist()
    return [
        f'{{"input": {source}, "index": {i}, "p": {p!r}, "prediction": {int(d)}, "label": {label[d]}}}'
        for i, p, d in zip(index, batch.p.tolist(), decided)
    ]
