"""Figures of a binary classifier, as pure functions of labels and scores.

`y` (n,) holds 0/1 targets; `z` (n,) the logits and `p` = σ(z) (n,) the predicted
P(Y=1 | x). Rankings use z, which keeps its order where σ(z) rounds to 0 or 1.
A figure that is undefined (a precision with no predicted positives, an AUC with one
class only) is None.

The decision at a threshold t is made here and only here (`decide`), from the logit, exactly:
y = 1 where σ(z) ≥ t as real numbers, that is where z ≥ logit(t) = log(t / (1 − t)). A ŷ
rounded to a float cannot make it: in float32, σ(z) is 0.5 for every |z| < 3e-8 and a
threshold is itself rounded; in float64, for every |z| < 1e-16. Every command, the Python
API and the exported page decide with it (the page by the bound `logit_bound` gives).
"""

from __future__ import annotations

import decimal
import math

import numpy as np

from mlecli.nn.model import log_likelihood_terms


def total_log_likelihood(z: np.ndarray, y: np.ndarray) -> float:
    """Σ_i log P(y_i | x_i), summed in float64."""
    return float(np.sum(log_likelihood_terms(z, y.astype(z.dtype)), dtype=np.float64))


# Digits for logit(t): far more than any float64 z can come near logit(t) without equalling
# it (it equals a float only at t = ½, where it is 0: e^z is irrational for any other float z).
_DIGITS = 100


def logit_bound(threshold: float) -> float:
    """The smallest float64 z with σ(z) ≥ threshold in exact arithmetic: for any float z
    (float32 or float64), σ(z) ≥ threshold ⇔ z ≥ logit_bound(threshold). 0.0 at ½.

    logit(t) = ln(t / (1 − t)) is worked out to 100 digits in decimal (t converts exactly;
    `Decimal.ln` rounds correctly), then rounded up to a float64."""
    t = float(threshold)
    if not 0 < t < 1:
        raise ValueError(f"a threshold is strictly between 0 and 1, got {threshold!r}")
    with decimal.localcontext(decimal.Context(prec=_DIGITS)):
        exact = decimal.Decimal(t)
        logit = (exact / (1 - exact)).ln()
        bound = float(logit)  # the nearest float64: at most one step below the smallest one above
        if decimal.Decimal(bound) < logit:
            bound = math.nextafter(bound, math.inf)
    return bound


def decide(z: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(n,) bool: y = 1 where σ(z) ≥ threshold, exactly, from the logits z (n,) of any float type."""
    return np.asarray(z, dtype=np.float64) >= logit_bound(threshold)


def predictions(z: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(n,) uint8: 1 where σ(z) ≥ threshold (`decide`), else 0."""
    return decide(z, threshold).astype(np.uint8)


def accuracy(y: np.ndarray, pred: np.ndarray) -> float | None:
    return float(np.mean(y == pred)) if len(y) else None


def confusion(y: np.ndarray, pred: np.ndarray) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]: rows are the actual class 0, 1; columns the predicted."""
    y, pred = y.astype(bool), pred.astype(bool)
    return [
        [int(np.sum(~y & ~pred)), int(np.sum(~y & pred))],
        [int(np.sum(y & ~pred)), int(np.sum(y & pred))],
    ]


def precision_recall_f1(cm: list[list[int]]) -> tuple[float | None, float | None, float | None]:
    (_, fp), (fn, tp) = cm
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # starts of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """P(score of a random positive > that of a random negative), ties counting one half
    (the Mann-Whitney U statistic over P·N)."""
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def brier(y: np.ndarray, p: np.ndarray) -> float | None:
    """Mean squared error of the predicted probability."""
    return float(np.mean((p.astype(np.float64) - y) ** 2)) if len(y) else None


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict]:
    """Reliability table: for each bin of ŷ ([0, 0.1), …, [0.9, 1.0]), the images in it,
    their mean ŷ and the fraction that are positive."""
    p64 = p.astype(np.float64)
    which = np.minimum((p64 * bins).astype(np.int64), bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        table.append({
            "low": b / bins,
            "high": (b + 1) / bins,
            "images": n,
            "mean_p": float(p64[mask].mean()) if n else None,
            "positive_rate": float(y[mask].mean()) if n else None,
        })
    return table


def expected_calibration_error(table: list[dict], n: int) -> float | None:
    """Σ_bins (images / n) · |positive rate − mean ŷ|."""
    if n == 0:
        return None
    return float(sum(b["images"] / n * abs(b["positive_rate"] - b["mean_p"]) for b in table if b["images"]))


def most_confident_errors(y: np.ndarray, z: np.ndarray, pred: np.ndarray, k: int = 10) -> np.ndarray:
    """Positions of up to k wrong predictions, most confident first (largest |z|)."""
    wrong = np.flatnonzero(y != pred)
    order = np.argsort(-np.abs(z[wrong].astype(np.float64)), kind="mergesort")
    return wrong[order[:k]]


def shown(value: float | None, fmt: str = ".4f", missing: str = "n/a") -> str:
    """A figure as text: `fmt` is a format spec, or "%" for a share shown as a percentage
    with two decimals; an undefined figure (None) is `missing`."""
    if value is None:
        return missing
    return f"{100 * value:.2f}%" if fmt == "%" else format(value, fmt)
