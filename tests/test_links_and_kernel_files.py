"""Two classes a hostile tester found holes in, closed at the two places every file is
opened: nothing is ever written through a symbolic link (or into a pipe, or into a file
that has other names), and nothing is ever read from a kernel file (/proc/kmsg is a
"regular" file of size 0 whose read blocks for ever). Each test tries every place of its
kind rather than the one that was reported."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlecli.cli import main
from mlecli.data.cache import dataset_dir, ensure_dataset
from mlecli.data.datasets import MNIST_FILES
from mlecli.safe.files import Refused, hash_file, read_pieces, read_regular

KMSG = Path("/proc/kmsg")
TRAIN_LABELS = MNIST_FILES["train-labels"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def mlecli(*args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlecli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)  # a read blocked on a kernel file would end the test here


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.splitlines() if x.startswith("Error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def cached(tiny, mirror_url: str, data: Path) -> Path:
    ensure_dataset(tiny.spec((mirror_url,)), data)
    return dataset_dir(tiny.spec((mirror_url,)), data)


# ---------------------------------------------------------------------------
# Never written through a link


@pytest.mark.parametrize("place", ["part", "part meta", "both", "part as a hard link", "part as a pipe"])
def test_a_partial_download_that_is_not_a_plain_file_of_ours_is_never_written_through(tiny, mirrors, tmp_path, place):
    """A part found as a link (to a user's file), a pipe or a hard link is dropped by name and
    the file fetched afresh: the user's file keeps its bytes, and no download blocks."""
    m = mirrors(tiny.gz_files())
    folder = cached(tiny, m.url, tmp_path / "d")
    (folder / "raw" / TRAIN_LABELS).unlink()
    partial = folder / "partial"
    partial.mkdir(exist_ok=True)
    victim = tmp_path / "thesis.txt"
    victim.write_bytes(b"my thesis, do not touch\n")
    part = partial / f"{TRAIN_LABELS}.gz.part"
    if place in ("part", "both"):
        part.symlink_to(victim)
    if place in ("part meta", "both"):
        (partial / f"{TRAIN_LABELS}.gz.part.json").symlink_to(victim)
    if place == "part as a hard link":
        os.link(victim, part)
    if place == "part as a pipe":
        os.mkfifo(part)
    ensure_dataset(tiny.spec((m.url,)), tmp_path / "d")
    assert victim.read_bytes() == b"my thesis, do not touch\n"
    assert (folder / "raw" / TRAIN_LABELS).read_bytes() == tiny.contents[TRAIN_LABELS]


@pytest.mark.parametrize("target", ["missing", "a file", "a pipe"])
@pytest.mark.parametrize("folder", ["data", "run"])
def test_a_lock_file_that_is_a_link_or_a_pipe_is_refused_in_one_line(tiny_config, tmp_path, target, folder):
    """A dangling link as .lock would create its target outside the folder; any link would
    take a lock on another file; a pipe is not a lock."""
    data, run = tmp_path / "d", tmp_path / "run"
    cfg = tiny_config(train={"epochs": 1}, model={"hidden": [4]})
    assert cli("train", cfg, "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    where = next(data.iterdir()) if folder == "data" else run
    outside = tmp_path / "outside"
    if target == "a file":
        outside.write_text("mine")
    lock = where / ".lock"
    lock.unlink(missing_ok=True)
    if target == "a pipe":
        os.mkfifo(lock)
    else:
        lock.symlink_to(outside)
    args = (["download", "--config", cfg, "--data-dir", data, "--force"] if folder == "data"
            else ["train", "--resume", run, "--set", "train.epochs=2", "--data-dir", data])
    res = mlecli(*args)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert str(lock) in line and ("symbolic link" in line or "not a regular file" in line), line
    assert outside.exists() == (target == "a file") and (target != "a file" or outside.read_text() == "mine")


# ---------------------------------------------------------------------------
# Never read from a kernel file


needs_kmsg = pytest.mark.skipif(not os.access(KMSG, os.R_OK), reason="/proc/kmsg is not readable here (root only)")


@needs_kmsg
@pytest.mark.parametrize("name", ["checkpoints/best.npz", "eval-test-best.json", "metrics.jsonl", "manifest.json",
                                  "config.toml"])
def test_a_run_file_linked_to_a_kernel_file_never_blocks_a_command(tiny_config, tmp_path, name):
    data, run = tmp_path / "d", tmp_path / "run"
    cfg = tiny_config(train={"epochs": 1}, model={"hidden": [4]})
    assert cli("train", cfg, "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    assert cli("evaluate", run, "--data-dir", data).exit_code == 0
    (run / name).unlink()
    (run / name).symlink_to(KMSG)
    for args in (["evaluate", run, "--data-dir", data], ["export", run, "--format", "html", "--out",
                                                           tmp_path / "p.html"],
                 ["runs", tmp_path], ["plot", run, "--data-dir", data, "--out", tmp_path / "plots"],
                 ["train", "--resume", run, "--set", "train.epochs=2", "--data-dir", data]):
        res = mlecli(*args)  # blocked on the kernel file, this would time out
        assert "Traceback" not in res.stderr, (args, res.stderr)
        assert res.returncode in (0, 1), (args, res.returncode, res.stderr)


@needs_kmsg
@pytest.mark.parametrize("name", [TRAIN_LABELS, "train.npz", "record.json"])
def test_a_cache_file_linked_to_a_kernel_file_never_blocks(tiny, tiny_folder, tmp_path, name):
    data = tmp_path / "d"
    folder = cached(tiny, str(tiny_folder), data)
    path = folder / ("raw" if name == TRAIN_LABELS else "") / name
    path.unlink()
    path.symlink_to(KMSG)
    cfg = tiny.write_config(tmp_path / "c.toml", str(tiny_folder), "[model]\nhidden = [4]\n[train]\nepochs = 1\n")
    res = mlecli("train", cfg, "--run-dir", tmp_path / "run", "--data-dir", data, "-q")
    assert "Traceback" not in res.stderr and res.returncode in (0, 1), res.stderr


@needs_kmsg
def test_a_kernel_file_among_predicts_inputs_is_one_line_and_the_others_are_predicted(tiny_config, tmp_path):
    data, run = tmp_path / "d", tmp_path / "run"
    cfg = tiny_config(train={"epochs": 1}, model={"hidden": [4]})
    assert cli("train", cfg, "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    scans = tmp_path / "scans"
    scans.mkdir()
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    for name in ("1.png", "3.png"):
        Image.fromarray(digit).save(scans / name)
    (scans / "2.png").symlink_to(KMSG)
    res = mlecli("predict", run, scans, KMSG)
    assert res.returncode == 1
    assert [x.split()[0] for x in res.stdout.splitlines()] == [f"{scans}/1.png", f"{scans}/3.png"]
    errors = [x for x in res.stderr.splitlines() if x.startswith("Error: ")]
    assert len(errors) == 2 and all("a kernel file (/proc/kmsg)" in e for e in errors), res.stderr


# ---------------------------------------------------------------------------
# The one reader every file read back whole goes through (safe/files.py)


@pytest.mark.parametrize("make, what", [
    ("fifo", "not a regular file"),  # opening it to read would wait for a writer forever
    ("dev-zero-link", "not a regular file"),  # reading it would never end
    ("folder", "not a regular file"),
    ("proc-version-link", "a kernel file (/proc/version), not a file of data"),  # its size says nothing
])
def test_the_reader_refuses_what_is_not_a_regular_file_of_data_before_reading_a_byte(tmp_path, make, what):
    path = tmp_path / "file"
    if make == "fifo":
        os.mkfifo(path)
    elif make == "dev-zero-link":
        path.symlink_to("/dev/zero")
    elif make == "folder":
        path.mkdir()
    else:
        path.symlink_to("/proc/version")
    with pytest.raises(Refused) as err:
        next(read_pieces(path, None))
    assert (err.value.errno, err.value.strerror, err.value.filename) == (errno.EINVAL, what, str(path))
    assert hash_file(path) is None


def test_the_reader_refuses_a_file_over_its_limit_by_its_size_and_reads_one_at_the_limit(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(Refused) as err:
        read_regular(path, 1000)
    assert (err.value.errno, err.value.strerror, err.value.size) == (errno.EFBIG, "larger than 1,000 bytes", 1001)
    assert read_regular(path, 1001) == b"x" * 1001


def test_the_reader_refuses_an_empty_file_only_where_asked(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert read_regular(path, 10) == b""
    with pytest.raises(Refused) as err:
        read_regular(path, 10, refuse_empty=True)
    assert (err.value.errno, err.value.strerror) == (
        errno.ENODATA, "a size of 0 (an empty file, or one the kernel makes up, as in /proc); not read")


def test_the_reader_gives_the_bytes_in_pieces_of_the_size_asked(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(bytes(range(250)))
    assert [len(p) for p in read_pieces(path, None, chunk=100)] == [100, 100, 50]
    assert b"".join(read_pieces(path, None, chunk=100)) == bytes(range(250))


def test_a_file_is_hashed_as_its_sha256_and_size(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"abc")
    assert hash_file(path) == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 3)
    assert hash_file(tmp_path / "missing") is None
