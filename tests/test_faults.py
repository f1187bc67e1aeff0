"""Faults injected for real: SIGKILL, a full disk, a read-only disk, two processes at once.

Each test checks that nothing is lost or half-written and that the user is told what
happened in one line.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

from click.testing import CliRunner
from fakes import array_bytes as weights
from fakes import mlecli_process as mlecli
from fakes import trickle, wait_for

from mlecli.cli import main
from mlecli.data.cache import dataset_dir, ensure_dataset, load_split
from mlecli.data.datasets import MNIST_FILES, ROLES
from mlecli.run import checkpoint as ckpt
from mlecli.safe.files import TMP_SUFFIX

TRAIN_IMAGES = MNIST_FILES["train-images"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    *_, last = stderr.splitlines()
    assert last.startswith("Error: ") and "Traceback" not in stderr
    return last


# ---------------------------------------------------------------------------
# SIGKILL


def test_training_killed_at_random_moments_resumes_bit_identical(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 30, "batch_size": 1, "checkpoint_every": 4}, model={"hidden": [8]})
    data = tmp_path / "data"
    assert cli("train", cfg, "--run-dir", tmp_path / "whole", "--data-dir", data, "-q").exit_code == 0
    run = tmp_path / "killed"
    moments = random.Random(20261126)
    kills = 0
    proc = mlecli("train", cfg, "--run-dir", run, "--data-dir", data, "-q")
    wait_for(run / "checkpoints" / "last.npz", proc)
    for _ in range(6):
        time.sleep(moments.uniform(0.0, 0.25))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        # Whenever it died, the newest checkpoint loads, and temporaries never count.
        last = ckpt.load(run / "checkpoints" / "last.npz")
        assert all(p.name.endswith(".npz") and not p.name.startswith(".") for p in ckpt.checkpoints_in(run))
        if last.epoch == 30:
            break
        proc = mlecli("train", "--resume", run, "--data-dir", data, "-q")
    else:
        proc.wait()
    if ckpt.load(run / "checkpoints" / "last.npz").epoch < 30:
        res = cli("train", "--resume", run, "--data-dir", data, "-q")
        assert res.exit_code == 0, res.output
    assert kills >= 3
    assert weights(run / "checkpoints" / "last.npz") == weights(tmp_path / "whole" / "checkpoints" / "last.npz")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(TMP_SUFFIX)]
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 31))


def test_a_download_killed_mid_file_is_finished_by_the_next_one(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and trickle(h, data, 4096, 0.02))
    cfg = tiny.write_config(tmp_path / "tiny.toml", m.url)
    data = tmp_path / "data"
    folder = dataset_dir(tiny.spec(()), data)
    part = folder / "partial" / f"{TRAIN_IMAGES}.gz.part"
    proc = mlecli("download", "--config", cfg, "--data-dir", data, "-q")
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= 16384):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    kept = part.stat().st_size
    raw = folder / "raw"
    assert not (raw / TRAIN_IMAGES).exists()  # nothing unverified in the cache
    reports = ensure_dataset(tiny.spec((m.url,)), data)
    assert [r.verified for r in reports] == [True] * 4
    resumed = [r for r in m.requests if r.path.endswith(TRAIN_IMAGES + ".gz") and "Range" in r.headers]
    assert resumed and resumed[0].headers["Range"] == f"bytes={kept}-"
    assert (raw / TRAIN_IMAGES).read_bytes() == tiny.contents[TRAIN_IMAGES]
    assert not part.exists()


# ---------------------------------------------------------------------------
# A full disk (a small tmpfs) and a read-only one


def test_disk_full_while_checkpointing_keeps_the_earlier_checkpoints(tiny_config, tmpfs, tmp_path, monkeypatch):
    # The disk fills while the run goes on (others' files, say): the check of its room
    # before it starts, which would refuse this run on this disk, is not asked.
    monkeypatch.setattr("mlecli.run.train.free_space", lambda folder: None)
    disk = tmpfs("runs", "600k")
    cfg = tiny_config(train={"epochs": 40, "checkpoint_every": 1}, model={"hidden": [16]})
    run = disk / "run"
    res = cli("train", cfg, "--run-dir", run, "--data-dir", tmp_path / "data", "-q")
    assert res.exit_code == 1
    error = one_error_line(res.stderr)
    assert error.startswith(f"Error: no space left on the device while writing {run}/")
    assert error.endswith(": free some space and try again")
    # Every checkpoint that is there loads; the metrics are whole lines; no temporaries.
    saved = [ckpt.load(p) for p in ckpt.checkpoints_in(run)]
    assert len(saved) >= 3
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    assert not [p for p in run.rglob("*") if p.name.endswith(TMP_SUFFIX)]
    # Nothing is lost: moved to a disk with room, the run resumes and finishes exactly.
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-a", str(run), str(moved)], check=True)
    res = cli("train", "--resume", moved, "--data-dir", tmp_path / "data", "-q")
    assert res.exit_code == 0, res.output
    assert cli("train", cfg, "--run-dir", tmp_path / "whole", "--data-dir", tmp_path / "data", "-q").exit_code == 0
    assert weights(moved / "checkpoints" / "last.npz") == weights(tmp_path / "whole" / "checkpoints" / "last.npz")


def test_a_dataset_that_cannot_fit_on_the_disk_is_refused_before_writing_it(tiny, tiny_folder, tmpfs):
    disk = tmpfs("data", "400k")
    res = cli("download", "--config", tiny.write_config(disk.parent / "c.toml", tiny_folder), "--data-dir", disk, "-q")
    assert res.exit_code == 1
    folder = dataset_dir(tiny.spec(()), disk)
    assert one_error_line(res.stderr) == (
        f"Error: caching {TRAIN_IMAGES} of tiny (300x28x28) needs 459.4 KiB of free space in {folder}, only "
        "400.0 KiB is available: free some space or choose another --data-dir"
    )
    assert not (folder / "raw" / TRAIN_IMAGES).exists()
    assert not [p for p in folder.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def test_disk_full_while_caching_leaves_only_verified_files(tiny, tiny_folder, tmpfs, monkeypatch):
    # The free space was there when checked, then something else took it: the writes themselves fail.
    monkeypatch.setattr("mlecli.data.cache.need_space", lambda *a: None)
    monkeypatch.setattr("mlecli.data.splits.need_space", lambda *a: None)
    disk = tmpfs("data", "400k")
    res = cli("download", "--config", tiny.write_config(disk.parent / "c.toml", tiny_folder), "--data-dir", disk, "-q")
    assert res.exit_code == 1
    error = one_error_line(res.stderr)
    folder = dataset_dir(tiny.spec(()), disk)
    assert error.startswith(f"Error: no space left on the device while writing {folder}/")
    for p in (folder / "raw").iterdir():
        assert not p.name.endswith((".part", TMP_SUFFIX)), p
        assert p.read_bytes() == tiny.contents[p.name]  # what is there is whole and verified


def test_disk_full_during_a_forced_download_keeps_the_earlier_cache(tiny, tiny_folder, tmpfs):
    disk = tmpfs("data", "1200k")
    cfg = tiny.write_config(disk.parent / "c.toml", tiny_folder)
    assert cli("download", "--config", cfg, "--data-dir", disk, "-q").exit_code == 0
    before = snapshot(dataset_dir(tiny.spec(()), disk))
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    res = cli("download", "--config", cfg, "--data-dir", disk, "--force", "-q")
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == (
        f"Error: caching {TRAIN_IMAGES} of tiny (300x28x28) needs 459.4 KiB of free space in "
        f"{dataset_dir(tiny.spec(()), disk)}, only 0 B is available: free some space or choose another --data-dir"
    )
    assert snapshot(dataset_dir(tiny.spec(()), disk)) == before
    filler.unlink()
    assert load_split(tiny.spec(()), disk, "train") is not None


def test_a_read_only_run_folder_is_refused_and_left_as_it_was(tiny_config, tmpfs, tmp_path):
    disk = tmpfs("runs", "4m")
    run = disk / "run"
    assert cli("train", tiny_config(), "--run-dir", run, "--data-dir", tmp_path / "data", "-q").exit_code == 0
    before = snapshot(run)
    tmpfs.readonly(disk)
    res = cli("train", "--resume", run, "--set", "train.epochs=6", "--data-dir", tmp_path / "data", "-q")
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == (
        f"Error: cannot write {run / '.lock'}: Read-only file system; make the folder writable or choose another one"
    )
    assert snapshot(run) == before


def test_a_read_only_data_folder_is_refused_for_downloads(tiny, tiny_folder, tmpfs):
    disk = tmpfs("data", "1m")
    tmpfs.readonly(disk)
    res = cli("download", "--config", tiny.write_config(disk.parent / "c.toml", tiny_folder), "--data-dir", disk, "-q")
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == (
        f"Error: cannot write {dataset_dir(tiny.spec(()), disk) / '.lock'}: Read-only file system; make the folder writable or choose "
        "another one"
    )


def test_training_reads_a_complete_cache_on_a_read_only_disk(tiny, tiny_folder, tiny_config, tmpfs, tmp_path):
    disk = tmpfs("data", "2m")
    assert cli("download", "--config", tiny.write_config(disk.parent / "c.toml", tiny_folder), "--data-dir", disk,
               "-q").exit_code == 0
    tmpfs.readonly(disk)
    res = cli("train", tiny_config(train={"epochs": 1}), "--run-dir", tmp_path / "run", "--data-dir", disk, "-q")
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------------
# Two processes at once


def test_a_second_training_on_the_same_run_folder_is_refused_and_the_lock_never_sticks(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 200, "batch_size": 1}, model={"hidden": [8]})
    data, run = tmp_path / "data", tmp_path / "run"
    first = mlecli("train", cfg, "--run-dir", run, "--data-dir", data, "-q")
    wait_for(run / "checkpoints" / "epoch-0001.npz", first)
    res = cli("train", "--resume", run, "--data-dir", data, "-q")
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == (
        f"Error: run folder {run} is in use by another mlecli process (lock {run / '.lock'}); "
        "wait for it to finish or use another folder"
    )
    first.kill()  # a crash: the kernel releases the lock with the process
    first.wait()
    res = cli("train", "--resume", run, "--set", "train.epochs=3", "--data-dir", data, "-q")
    assert res.exit_code == 0, res.output


def test_two_download_processes_on_one_data_folder_both_succeed(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and trickle(h, data, 16384, 0.005))
    cfg = tiny.write_config(tmp_path / "tiny.toml", m.url)
    procs = [mlecli("download", "--config", cfg, "--data-dir", tmp_path / "data", "-q") for _ in range(2)]
    for p in procs:
        p.wait(timeout=60)
        assert p.returncode == 0, p.stderr.read().decode()
    raw = dataset_dir(tiny.spec(()), tmp_path / "data") / "raw"
    assert {p.name for p in raw.iterdir()} == set(tiny.contents)
    for role in ROLES:
        assert (raw / MNIST_FILES[role]).read_bytes() == tiny.contents[MNIST_FILES[role]]
    assert m.counts[TRAIN_IMAGES + ".gz"] == 1
