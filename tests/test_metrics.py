"""Every figure of `mlecli evaluate` against values worked out by hand."""

import itertools
import math

import numpy as np
import pytest
from fakes import exactly_positive

from mlecli.nn import metrics as M


def brute_force_auc(y, s):
    pos = [v for v, t in zip(s, y) if t == 1]
    neg = [v for v, t in zip(s, y) if t == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_confusion_precision_recall_f1_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    pred = np.array([1, 0, 1, 1, 0, 0, 0, 1])
    cm = M.confusion(y, pred)
    assert cm == [[3, 1], [1, 3]]  # TN=3 FP=1 / FN=1 TP=3
    p, r, f1 = M.precision_recall_f1(cm)
    assert (p, r, f1) == (0.75, 0.75, 0.75)
    assert M.accuracy(y, pred) == 0.75


def test_threshold_is_inclusive():
    # σ(z) ≥ ½ ⇔ z ≥ 0: a logit of exactly 0 (either sign) is positive, the tiniest negative one is not
    z = np.array([-5e-324, -0.0, 0.0, 5e-324, -1e-30, 1e-30])
    assert M.predictions(z, 0.5).tolist() == [0, 1, 1, 1, 0, 1]
    assert M.predictions(np.array([2.19, 2.1972245773362196, 2.1972245773362200, 2.2]), 0.9).tolist() == [0, 0, 1, 1]


def test_the_logit_bound_is_the_smallest_float_whose_sigmoid_reaches_the_threshold():
    rng = np.random.default_rng(7)
    thresholds = [0.5, 0.3, 0.9, 0.99, 1e-3, 1e-300, 5e-324, 1 - 2**-53, 0.5 + 2**-53, 0.5 - 2**-54,
                  0.5 + 3e-9, 0.8807970779778823, *rng.random(200).tolist()]
    for t in thresholds:
        bound = M.logit_bound(t)
        assert exactly_positive(bound, t) and not exactly_positive(math.nextafter(bound, -math.inf), t), t
    assert M.logit_bound(0.5) == 0.0


def test_float32_logits_are_decided_exactly_near_every_threshold():
    # the float32 logits on either side of logit(t): σ rounded to float32 (or float64) says
    # "≥ t" for some of those below; the rule never does
    for t in (0.5, 0.3, 0.9, 0.999, 0.5 + 3e-9, 1e-6):
        centre = np.float32(math.log(t / (1 - t)))
        z = [centre]
        for _ in range(6):
            z = [np.nextafter(z[0], np.float32(-np.inf)), *z, np.nextafter(z[-1], np.float32(np.inf))]
        z = np.array(z, np.float32)
        assert M.decide(z, t).tolist() == [exactly_positive(float(v), t) for v in z], t


def test_a_threshold_outside_0_and_1_has_no_bound():
    for t in (0.0, 1.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            M.logit_bound(t)


def test_auc_with_ties_by_hand():
    # positives score 0.8, 0.4; negatives 0.4, 0.1. Pairs: (0.8>0.4) 1, (0.8>0.1) 1,
    # (0.4=0.4) ½, (0.4>0.1) 1 → 3.5 / 4.
    assert M.roc_auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1])) == 0.875


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_brute_force_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 8, 60).astype(float)  # many ties
    assert M.roc_auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)


def test_auc_of_perfect_worst_and_constant_classifiers():
    y = np.array([0, 0, 1, 1])
    assert M.roc_auc(y, np.array([1.0, 2, 3, 4])) == 1.0
    assert M.roc_auc(y, np.array([4.0, 3, 2, 1])) == 0.0
    assert M.roc_auc(y, np.zeros(4)) == 0.5


def test_undefined_figures_are_none_for_one_class():
    y = np.ones(4, np.uint8)
    assert M.roc_auc(y, np.arange(4.0)) is None
    cm = M.confusion(y, np.zeros(4, np.uint8))
    assert cm == [[0, 0], [4, 0]]
    assert M.precision_recall_f1(cm) == (None, 0.0, None)
    assert M.precision_recall_f1(M.confusion(np.zeros(3), np.zeros(3))) == (None, None, None)


def test_perfect_and_worst_classifiers():
    y = np.array([0, 1, 0, 1])
    assert M.precision_recall_f1(M.confusion(y, y)) == (1.0, 1.0, 1.0)
    assert M.precision_recall_f1(M.confusion(y, 1 - y)) == (0.0, 0.0, 0.0)
    assert M.brier(y, y.astype(float)) == 0.0
    assert M.brier(y, 1.0 - y) == 1.0


def test_brier_by_hand():
    assert M.brier(np.array([1, 0]), np.array([0.9, 0.2])) == pytest.approx((0.01 + 0.04) / 2)


def test_calibration_bins_and_ece_by_hand():
    y = np.array([0, 1, 1, 1, 0])
    p = np.array([0.05, 0.05, 0.95, 1.0, 0.55])
    bins = M.calibration_bins(y, p)
    assert [b["images"] for b in bins] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert bins[0]["mean_p"] == pytest.approx(0.05) and bins[0]["positive_rate"] == 0.5
    assert bins[9]["mean_p"] == pytest.approx(0.975) and bins[9]["positive_rate"] == 1.0
    assert bins[1]["mean_p"] is None
    # (2/5)|0.5 − 0.05| + (1/5)|0 − 0.55| + (2/5)|1 − 0.975|
    assert M.expected_calibration_error(bins, 5) == pytest.approx(0.4 * 0.45 + 0.2 * 0.55 + 0.4 * 0.025)


def test_a_calibrated_predictor_has_near_zero_ece():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(np.uint8)
    assert M.expected_calibration_error(M.calibration_bins(y, p), p.size) < 0.005


def test_most_confident_errors_come_first():
    y = np.array([1, 0, 1, 0, 1])
    z = np.array([-5.0, 9.0, 3.0, -1.0, -0.5])
    pred = (z >= 0).astype(np.uint8)
    assert M.most_confident_errors(y, z, pred).tolist() == [1, 0, 4]
    assert M.most_confident_errors(y, z, pred, k=1).tolist() == [1]


def test_total_log_likelihood_sums_in_float64():
    z = np.array([0.0, 0.0], np.float32)
    assert M.total_log_likelihood(z, np.array([1, 0])) == pytest.approx(2 * np.log(0.5))


def test_average_ranks():
    assert M.average_ranks(np.array([10.0, 20, 10, 30])).tolist() == [1.5, 3.0, 1.5, 4.0]
