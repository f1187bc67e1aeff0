"""Learning-rate schedules and the epoch-end watches, as pure functions."""

import math

import numpy as np
import pytest

from mlecli.nn.schedule import BaseRate, Watch, after_epoch, base_rate, diverged, learning_rate, stop_early
from mlecli.run.config import from_dict


def train(**keys):
    return from_dict({"train": keys}, name="t").train


def test_constant_is_the_learning_rate_at_every_step():
    t = train(learning_rate=0.1)
    assert {learning_rate(t, s, 10) for s in range(200)} == {0.1}


def test_step_decay_multiplies_every_decay_every_epochs():
    t = train(learning_rate=0.1, schedule="step", decay_every=3, decay_factor=0.5, epochs=10)
    # 4 steps per epoch: epochs 1-3 are steps 0-11, epochs 4-6 are steps 12-23, …
    assert [learning_rate(t, s, 4) for s in (0, 11, 12, 23, 24, 39)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.0125]


def test_cosine_runs_from_the_rate_to_the_floor_over_the_run():
    t = train(learning_rate=0.1, schedule="cosine", min_learning_rate=0.01, epochs=5)
    steps = 5 * 8
    assert learning_rate(t, 0, 8) == 0.1
    assert learning_rate(t, steps // 2, 8) == pytest.approx(0.055)  # halfway: the mean of the two
    assert learning_rate(t, steps // 4, 8) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(t, steps - 1, 8) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    lrs = [learning_rate(t, s, 8) for s in range(steps)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_warm_up_rises_linearly_then_the_schedule_starts():
    t = train(learning_rate=0.2, schedule="cosine", warmup_epochs=0.5, epochs=3)
    # 10 steps per epoch: 5 warm-up steps at 0.04, 0.08, …, 0.2; then the cosine over 25 steps
    assert [learning_rate(t, s, 10) for s in range(5)] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2])
    assert learning_rate(t, 5, 10) == 0.2
    assert learning_rate(t, 5 + 25 // 2, 10) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 12 / 25)))


def test_the_plateau_scale_multiplies_every_schedule():
    for schedule in ("constant", "step", "cosine"):
        t = train(learning_rate=0.1, schedule=schedule, warmup_epochs=1.0)
        assert [learning_rate(t, s, 7, 0.25) for s in (3, 30)] == pytest.approx(
            [0.25 * learning_rate(t, s, 7) for s in (3, 30)])


def test_reduce_on_plateau_after_patience_epochs_without_a_better_validation_ll():
    t = train(plateau_patience=2, plateau_factor=0.5)
    w = Watch()
    scales = []
    for val in (-0.5, -0.4, -0.45, -0.41, -0.42, -0.43, -0.3, -0.31, -0.32):
        w = after_epoch(t, w, val, 0.9, None)
        scales.append(w.plateau_scale)
    # better, better, worse, worse → halve; worse, worse → halve; better; worse, worse → halve
    assert scales == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
    assert after_epoch(train(), Watch(), -0.5, 0.9, None).plateau_scale == 1  # plateau_patience = 0: never


def test_divergence_is_two_epochs_in_a_row_no_better_than_the_base_rate():
    t = train()
    base = BaseRate(ll=-0.69, acc=0.5)  # no better: LL below -0.759 (10% worse) and accuracy below 55%
    w = Watch()
    seen = []
    for val, acc in ((-0.8, 0.5), (-0.5, 0.5), (-0.8, 0.52), (-0.75, 0.5), (-0.9, 0.5), (-0.8, 0.54),
                     (-1.2, 0.86), (-1.3, 0.85)):  # the last two: overfitting, not divergence
        w = after_epoch(t, w, val, acc, base)
        seen.append((w.worse_than_base, diverged(w)))
    assert seen == [(1, False), (0, False), (1, False), (0, False), (1, False), (2, True), (0, False), (0, False)]


def test_the_base_rate_is_what_predicting_the_training_share_scores_on_validation():
    # 3 of 4 training images positive: p = 0.75; validation y = (1, 0, 0)
    base = base_rate(np.array([1, 1, 1, 0]), np.array([1, 0, 0]))
    assert base.ll == pytest.approx((math.log(0.75) + 2 * math.log(0.25)) / 3)
    assert base.acc == pytest.approx(1 / 3)  # always "positive", the training majority
    assert base_rate(np.array([1, 0]), np.array([], np.uint8)) is None
    assert base_rate(np.array([1, 1]), np.array([1, 0])) is None


def test_early_stopping_after_patience_epochs_without_a_better_validation_ll():
    t = train(patience=3)
    assert [stop_early(t, e, 2) for e in (3, 4, 5, 6)] == [False, False, True, True]
    assert not stop_early(train(), 50, 1)  # patience = 0: never


def test_the_watch_round_trips_through_json_values():
    w = Watch(0.25, -0.3, 1, 1)
    assert Watch.from_dict(w.to_dict()) == w and Watch.from_dict(None) == Watch()
