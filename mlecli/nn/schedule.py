"""Learning-rate schedules and the epoch-end watches (plateau, early stopping,
divergence), as pure functions: the trainer calls `learning_rate` once per step and
the others once per epoch, and keeps what they return in its checkpoints.

With η the configured rate, S steps per epoch, T = epochs·S steps in all, w = warm-up
steps (warmup_epochs·S, rounded) and s = 0, 1, … the steps done before this one:

    warm-up    η (s + 1) / w                                  for s < w
    constant   η
    step       η · decay_factor ^ ⌊(s / S) / decay_every⌋      (whole epochs done)
    cosine     η_min + (η − η_min) · ½ (1 + cos(π (s − w) / (T − w)))

each times the plateau scale: 1, multiplied by plateau_factor whenever plateau_patience
epochs in a row bring no better validation log-likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class TrainConfig(Protocol):
    """The numbers a schedule reads: the `[train]` keys of the config (run/config.py's
    TrainConfig has them; nn/ imports nothing of the layers above it)."""

    epochs: int
    learning_rate: float
    schedule: str
    warmup_epochs: float
    decay_every: int
    decay_factor: float
    min_learning_rate: float
    plateau_patience: int
    plateau_factor: float
    patience: int


def learning_rate(t: TrainConfig, step: int, steps_per_epoch: int, plateau_scale: float = 1.0) -> float:
    """η in force for the step after `step` steps (0-based)."""
    warm = round(t.warmup_epochs * steps_per_epoch)
    if step < warm:
        return t.learning_rate * plateau_scale * (step + 1) / warm
    if t.schedule == "constant":
        lr = t.learning_rate
    elif t.schedule == "step":
        lr = t.learning_rate * t.decay_factor ** ((step // steps_per_epoch) // t.decay_every)
    elif t.schedule == "cosine":
        total = t.epochs * steps_per_epoch
        progress = min(1.0, (step - warm) / max(1, total - warm))
        lr = t.min_learning_rate + (t.learning_rate - t.min_learning_rate) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {t.schedule!r}")
    return lr * plateau_scale


@dataclass(frozen=True)
class Watch:
    """What the epoch ends watch, carried from epoch to epoch (and in checkpoints).

    plateau_scale: the plateau's factor on η so far; plateau_best / plateau_bad: the best
    validation LL the plateau has seen and the epochs since it improved on it (reset at
    each reduction); worse_than_base: epochs in a row no better than predicting the
    training base rate for every image (`after_epoch` says what counts).
    """

    plateau_scale: float = 1.0
    plateau_best: float | None = None
    plateau_bad: int = 0
    worse_than_base: int = 0

    def to_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best,
                "plateau_bad": self.plateau_bad, "worse_than_base": self.worse_than_base}

    @classmethod
    def from_dict(cls, d: dict | None) -> Watch:
        return cls(**d) if d else cls()


@dataclass(frozen=True)
class BaseRate:
    """What predicting the training share of positives p for every validation image
    scores: its mean LL per image, and the accuracy of always predicting the majority
    class of the training images."""

    ll: float
    acc: float
    start: float | None = None  # the untrained network's validation LL: diverging is getting worse than it


def after_epoch(t: TrainConfig, watch: Watch, val_ll: float | None, val_acc: float | None,
                base: BaseRate | None) -> Watch:
    """The watch after an epoch whose mean validation LL per image is val_ll and whose
    validation accuracy is val_acc (None: no validation)."""
    scale, best, bad = watch.plateau_scale, watch.plateau_best, watch.plateau_bad
    if t.plateau_patience and val_ll is not None:
        if best is None or val_ll > best:
            best, bad = val_ll, 0
        else:
            bad += 1
            if bad >= t.plateau_patience:
                scale, bad = scale * t.plateau_factor, 0
    no_better = (val_ll is not None and base is not None and val_ll < DIVERGED_MARGIN * base.ll
                 and val_acc < base.acc + DIVERGED_ACCURACY and (base.start is None or val_ll < base.start))
    return Watch(scale, best, bad, watch.worse_than_base + 1 if no_better else 0)


DIVERGED_AFTER = 2  # epochs in a row no better than the base rate
# "No better" means: an LL worse by more than this factor (a network that has not learned
# yet sits just below the base rate: its logits are small but uneven, and must not count)
DIVERGED_MARGIN = 1.1
# and an accuracy less than this above the majority class's (a network that learned but
# overfits can have a validation LL below the base rate's while it classifies well; one
# whose steps overshoot is near a coin toss). And worse than the network was untrained: a
# learning rate so small the network has barely moved is not diverging, it is slow.
DIVERGED_ACCURACY = 0.05


def diverged(watch: Watch) -> bool:
    return watch.worse_than_base >= DIVERGED_AFTER


def stop_early(t: TrainConfig, epoch: int, best_epoch: int | None) -> bool:
    """True when `patience` epochs have passed without a better validation LL."""
    return bool(t.patience) and best_epoch is not None and epoch - best_epoch >= t.patience


def base_rate(y_train, y_val) -> BaseRate | None:
    """What a network that learned nothing but the training base rate scores on the
    validation images (None without validation, or with one class only)."""
    if len(y_val) == 0:
        return None
    p = float(np.mean(y_train))
    if p in (0.0, 1.0):
        return None
    y = np.asarray(y_val, dtype=np.float64)
    ll = float(np.mean(y * math.log(p) + (1 - y) * math.log(1 - p)))
    return BaseRate(ll, float(np.mean(y == (1.0 if p >= 0.5 else 0.0))))
