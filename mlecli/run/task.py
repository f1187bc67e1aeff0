"""The binary digit task: which images take part, their 0/1 targets, and the splits.

Training images of the chosen digits are split, seeded and stratified by digit, into
train and validation; the dataset's official test images of those digits are the test
split. y = 1 for a positive digit, 0 for a negative one; other digits are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlecli.data.cache import Split
from mlecli.data.datasets import CLASS_NAMES
from mlecli.run.config import Config
from mlecli.safe.errors import ConfigError


@dataclass(frozen=True)
class Subset:
    """Images of one split of the task.

    `index` (n,) are positions in the dataset's official split, `digits` (n,) their
    labels, `y` (n,) uint8 targets; `images` (n, H, W) uint8.
    """

    index: np.ndarray
    digits: np.ndarray
    y: np.ndarray
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class BinaryTask:
    positive: tuple[int, ...]
    negative: tuple[int, ...]
    train: Subset
    validation: Subset
    test: Subset

    @property
    def n_inputs(self) -> int:
        return int(np.prod(self.train.images.shape[1:]))

    def split(self, name: str) -> Subset:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def _subset(split: Split, index: np.ndarray, positive: tuple[int, ...]) -> Subset:
    digits = split.labels[index]
    return Subset(index, digits, np.isin(digits, positive).astype(np.uint8), split.images[index])


def validation_counts(per_digit: dict[int, int], share: float | int) -> dict[int, int]:
    """How many images of each digit to hold out: a fraction of each, or a count spread
    over the digits in proportion to their sizes (largest remainders get the extra ones)."""
    total = sum(per_digit.values())
    if isinstance(share, float):
        return {d: int(round(share * n)) for d, n in per_digit.items()}
    exact = {d: share * n / total for d, n in per_digit.items()}
    counts = {d: int(np.floor(v)) for d, v in exact.items()}
    left = share - sum(counts.values())
    for d in sorted(exact, key=lambda d: (counts[d] - exact[d], d))[:left]:
        counts[d] += 1
    return counts


def build_task(cfg: Config, splits: dict[str, Split], rng: np.random.Generator) -> BinaryTask:
    """Select the task's images and hold out validation images with `rng` (its first use)."""
    positive = cfg.task.positive
    negative = cfg.task.negative_digits
    digits = (*positive, *negative)
    train_split = splits["train"]
    chosen = np.flatnonzero(np.isin(train_split.labels, digits))
    per_digit = {d: int(np.count_nonzero(train_split.labels[chosen] == d)) for d in sorted(digits)}
    for side, side_digits in (("positive", positive), ("negative", negative)):
        if not any(per_digit[d] for d in side_digits):
            raise ConfigError(
                f"task.{side} = {list(side_digits)}: the training images of {cfg.data.dataset} have none "
                "of these digits; choose digits the dataset has"
            )
    share = cfg.data.validation
    if isinstance(share, int) and share >= len(chosen):
        raise ConfigError(
            f"data.validation = {share} leaves no training images: the task has {len(chosen)}; "
            "use a smaller count or a fraction such as 0.1"
        )
    counts = validation_counts(per_digit, share)
    held = [rng.permutation(np.flatnonzero(train_split.labels == d))[: counts[d]] for d in per_digit]
    val_index = np.sort(np.concatenate(held)) if held else np.empty(0, np.int64)
    train_index = np.setdiff1d(chosen, val_index, assume_unique=True)
    if len(train_index) == 0:
        raise ConfigError(f"data.validation = {share} leaves no training images; use a smaller share")
    test_split = splits["test"]
    test_index = np.flatnonzero(np.isin(test_split.labels, digits))
    return BinaryTask(
        positive,
        negative,
        _subset(train_split, train_index, positive),
        _subset(train_split, val_index.astype(np.int64), positive),
        _subset(test_split, test_index, positive),
    )


ODD, EVEN = (1, 3, 5, 7, 9), (0, 2, 4, 6, 8)


def class_words(cfg: Config) -> tuple[str, str]:
    """The task's two classes in words, (y = 0, y = 1), for people reading a prediction.

    Digits by name (`odd (1,3,5,7,9)`, `even (0,2,4,6,8)`, `4`, `0,1,2,3,4`); a negative
    side of "rest" is `not 4 (0,1,2,3,5,6,7,8,9)`; a dataset with class names
    (Fashion-MNIST) uses them instead of the label numbers.
    """
    names = CLASS_NAMES.get(cfg.data.dataset)
    positive = cfg.task.positive
    negative = cfg.task.negative_digits
    if names is not None:
        pos_word = ", ".join(names[d] for d in positive)
        neg_word = ", ".join(names[d] for d in negative)
        if cfg.task.negative == "rest":
            neg_word = f"not {pos_word} ({neg_word})"
        return neg_word, pos_word
    pos_word = _digits_word(positive)
    neg_word = _digits_word(negative)
    if cfg.task.negative == "rest" and tuple(sorted(negative)) not in (ODD, EVEN):
        neg_word = f"not {pos_word} ({neg_word})"
    return neg_word, pos_word


def label_name(dataset: str, label: int) -> str:
    """What a label is called: `digit 7`, or a class name (Fashion-MNIST's `Sneaker`)."""
    names = CLASS_NAMES.get(dataset)
    return names[label] if names is not None and 0 <= label < len(names) else f"digit {label}"


def short_word(word: str, width: int = 24) -> str:
    """A class word (`class_words`) in at most `width` characters, still in words: itself when
    it fits; else its name without the list in brackets (`odd`, `not 4`); else as many of its
    names as fit, then `…` (`Trouser, Dress, …`); else its start, then `…`."""
    if len(word) <= width:
        return word
    head = word.split(" (", 1)[0]
    if head != word and len(head) <= width:
        return head
    names = word.split(", ")
    for n in range(len(names) - 1, 0, -1):
        short = ", ".join(names[:n]) + ", …"
        if len(short) <= width:
            return short
    return word[: width - 1].rstrip() + "…"


def _digits_word(digits: tuple[int, ...]) -> str:
    listed = ",".join(map(str, sorted(digits)))
    key = tuple(sorted(digits))
    if key == ODD:
        return f"odd ({listed})"
    if key == EVEN:
        return f"even ({listed})"
    return listed
