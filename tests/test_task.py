"""The binary task: which images, which targets, which split."""

import numpy as np
import pytest

from mlecli.data.cache import Split
from mlecli.nn.pixels import pixels
from mlecli.run.config import load
from mlecli.run.task import build_task, class_words, short_word, validation_counts
from mlecli.safe.errors import ConfigError


def splits(train_labels, test_labels):
    def split(labels):
        labels = np.asarray(labels, np.uint8)
        images = np.arange(len(labels) * 4, dtype=np.uint8).reshape(-1, 2, 2)
        return Split(images, labels, {})

    return {"train": split(train_labels), "test": split(test_labels)}


def task_for(*overrides, train_labels=None, test_labels=(0, 1, 2, 3, 4, 9)):
    labels = train_labels if train_labels is not None else [d for d in range(10) for _ in range(20)]
    cfg = load(None, ["data.validation=0.1", *overrides])
    return build_task(cfg, splits(labels, test_labels), np.random.default_rng(cfg.train.seed))


def test_targets_are_one_for_positive_digits_and_other_digits_are_left_out():
    task = task_for("task.positive=[4]", "task.negative=[9]")
    assert set(task.train.digits) == {4, 9}
    np.testing.assert_array_equal(task.train.y, task.train.digits == 4)
    np.testing.assert_array_equal(task.test.index, [4, 5])
    np.testing.assert_array_equal(task.test.y, [1, 0])


def test_validation_is_stratified_by_digit_and_disjoint_from_training():
    task = task_for()
    assert len(task.validation) == 20 and len(task.train) == 180
    assert np.bincount(task.validation.digits, minlength=10).tolist() == [2] * 10
    assert not set(task.train.index) & set(task.validation.index)
    np.testing.assert_array_equal(task.train.images, splits(
        [d for d in range(10) for _ in range(20)], [0])["train"].images[task.train.index])


def test_the_split_is_seeded():
    a, b, c = task_for(), task_for(), task_for("train.seed=1")
    np.testing.assert_array_equal(a.validation.index, b.validation.index)
    assert not np.array_equal(a.validation.index, c.validation.index)


def test_a_validation_count_is_spread_in_proportion():
    assert validation_counts({0: 50, 1: 30, 2: 20}, 10) == {0: 5, 1: 3, 2: 2}
    assert validation_counts({0: 1, 1: 1, 2: 1}, 2) == {0: 1, 1: 1, 2: 0}
    assert sum(validation_counts({0: 7, 1: 13, 2: 29}, 11).values()) == 11
    assert validation_counts({0: 50, 1: 30}, 0.1) == {0: 5, 1: 3}


def test_rest_takes_every_other_digit():
    task = task_for("task.positive=[0]", 'task.negative="rest"')
    assert task.negative == (1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert len(task.train) + len(task.validation) == 200


def test_validation_count_that_leaves_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"^data.validation = 40 leaves no training images: the task has 40; "):
        task_for("task.positive=[4]", "task.negative=[9]", "data.validation=40")


def test_digits_the_dataset_lacks_are_refused():
    with pytest.raises(ConfigError, match=r"^task.negative = \[9\]: the training images of mnist have none of these"):
        task_for("task.positive=[4]", "task.negative=[9]", train_labels=[4] * 10)


def test_pixels_are_scaled_exactly():
    images = np.array([[[0, 1], [128, 255]]], np.uint8)
    np.testing.assert_array_equal(pixels(images, np.float64), [[0, 1 / 255, 128 / 255, 1.0]])
    assert pixels(images, np.float32).dtype == np.float32
    # correctly rounded in float32 itself, not rounded twice through float64
    assert pixels(images, np.float32)[0, 1] == np.float32(1) / np.float32(255)
    assert pixels(images[:0], np.float32).shape == (0, 4)


@pytest.mark.parametrize("overrides, words", [
    ((), ("even (0,2,4,6,8)", "odd (1,3,5,7,9)")),
    (("task.positive=[4]", "task.negative=[9]"), ("9", "4")),
    (("task.positive=[4]", "task.negative='rest'"), ("not 4 (0,1,2,3,5,6,7,8,9)", "4")),
    (("data.dataset='fashion-mnist'",), ("T-shirt/top, Pullover, Coat, Shirt, Bag",
                                          "Trouser, Dress, Sandal, Sneaker, Ankle boot")),
    (("data.dataset='fashion-mnist'", "task.positive=[9]", "task.negative='rest'"),
     ("not Ankle boot (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag)", "Ankle boot")),
])
def test_class_words_name_the_classes_in_the_task_s_own_words(overrides, words):
    assert class_words(load(None, list(overrides))) == words


@pytest.mark.parametrize("word, width, short", [
    ("odd (1,3,5,7,9)", 24, "odd (1,3,5,7,9)"),  # fits: itself
    ("odd (1,3,5,7,9)", 10, "odd"),  # the name without its digits
    ("not 4 (0,1,2,3,5,6,7,8,9)", 24, "not 4"),
    ("Trouser, Dress, Sandal, Sneaker, Ankle boot", 24, "Trouser, Dress, …"),  # as many names as fit
    ("T-shirt/top, Pullover, Coat, Shirt, Bag", 24, "T-shirt/top, Pullover, …"),
    ("T-shirt/top, Pullover, Coat, Shirt, Bag", 20, "T-shirt/top, …"),
    ("not Ankle boot (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag)", 24,
     "not Ankle boot"),
    ("Pullover-and-a-very-long-class", 12, "Pullover-an…"),  # one long name: its start
])
def test_a_short_class_word_is_still_the_class_in_words(word, width, short):
    assert short_word(word, width) == short and len(short) <= width
