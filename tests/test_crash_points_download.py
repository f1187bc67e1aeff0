"""A download's commit, crashed at every write boundary, as ALICE and CrashMonkey enumerate crash points.

A forked child runs `ensure_dataset` with every call that changes the file system
(a file write, a file created, fsync, rename, unlink, mkdir, rmdir, truncate) counted,
and dies with os._exit right before the N-th: for N = 1, 2, … until a run finishes
without reaching N. After each crash the cache may hold less, but never an unverified
or half-written file under a final name, and a complete earlier cache still loads;
then an uninterrupted run must leave the cache byte-identical to one never
interrupted. (os._exit loses Python's unflushed buffers, not the kernel's: this is a
process crash, not a power cut.)

The mirror is an HTTP server in a separate process, so that the test process has no
threads when it forks.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from fakes import tiny_dataset

from mlecli.data.cache import dataset_dir, ensure_dataset, load_split
from mlecli.data.datasets import custom
from mlecli.safe import npz

CRASHED = 99
FAILED = 98
CHANGES = ("replace", "rename", "fsync", "unlink", "mkdir", "rmdir", "ftruncate", "truncate", "link")
TINY = tiny_dataset(n_train=40, n_test=20, seed=3)


@pytest.fixture
def tmp_path(tmp_path):
    """A folder on /dev/shm where there is one: a tmpfs, where fsync costs nothing and the
    hundreds of runs below take seconds, not minutes (the disk's behaviour is not what is tested)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="mlecli-crash-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def http_mirror(tmp_path_factory):
    """The tiny dataset's .gz files served by `python -m http.server` in its own process."""
    folder = tmp_path_factory.mktemp("served")
    for name, data in TINY.gz_files().items():
        (folder / name).write_bytes(data)
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
    port = int(line.split(" port ")[1].split()[0])
    yield f"http://127.0.0.1:{port}/"
    proc.kill()
    proc.wait()


def _count_changes(n: int, log: list[str]) -> None:
    """Make the n-th file-system change of this process its last: os._exit right before it."""
    count = 0

    def boundary(what: str) -> None:
        nonlocal count
        count += 1
        log.append(what)
        if count == n:
            os._exit(CRASHED)

    def counted(name, real):
        def call(*args, **kwargs):
            boundary(name)
            return real(*args, **kwargs)

        return call

    for name in CHANGES:
        setattr(os, name, counted(name, getattr(os, name)))
    real_os_open = os.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_TRUNC):
            boundary("create")
        return real_os_open(path, flags, *args, **kwargs)

    os.open = os_open
    real_open = io.open

    class Counted:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            boundary("write")
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def open_counted(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        if writing and not isinstance(file, int):
            boundary("create")
        f = real_open(file, mode, *args, **kwargs)
        return Counted(f) if writing else f

    io.open = builtins.open = open_counted


def run_crashing_at(n: int, run) -> tuple[int, int]:
    """Run `run()` in a forked child that dies right before its n-th change; (exit code, changes made)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        log: list[str] = []
        code = 0
        try:
            _count_changes(n, log)
            run()
        except BaseException:  # noqa: BLE001 - reported to the parent as an exit code
            code = FAILED
        finally:
            os.write(write_fd, str(len(log)).encode())
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as r:
        changes = int(r.read() or 0)
    return os.waitstatus_to_exitcode(status), changes


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_only_verified(folder: Path, spec) -> None:
    """What a crash may leave: fewer files, never a wrong one under a final name."""
    raw = folder / "raw"
    for p in raw.iterdir() if raw.is_dir() else ():
        if not p.name.startswith("."):
            assert p.read_bytes() == TINY.contents[p.name], f"{p} is not the verified content"
    if (folder / "record.json").exists():
        record = json.loads((folder / "record.json").read_text())
        for name, entry in record["files"].items():
            assert entry["sha256"] == hashlib.sha256(TINY.contents[name]).hexdigest()
    for split in ("train", "test"):
        path = folder / f"{split}.npz"
        if path.exists():
            arrays = npz.read(path, check_crc=True)
            np.testing.assert_array_equal(arrays["images"], TINY.arrays[f"{split}-images"])
            np.testing.assert_array_equal(arrays["labels"], TINY.arrays[f"{split}-labels"])
    allowed = {"record.json", "train.npz", "test.npz", ".lock", "raw", "partial"}
    for p in folder.iterdir():
        assert p.name in allowed or (p.name.startswith(".") and p.name.endswith(".tmp")), p


def enumerate_crashes(run, data_dir: Path, check_after_crash, start_from: Path | None = None) -> int:
    """Crash `run` at boundary 1, 2, … until it completes; return the number of boundaries.
    Each run gets a fresh data folder: a copy of `start_from` (made before the crash points count), or none."""
    n = 1
    while True:
        if start_from is not None:
            shutil.copytree(start_from, data_dir / f"n{n}")
        code, changes = run_crashing_at(n, lambda folder=data_dir / f"n{n}": run(folder))
        if code == 0:
            assert changes < n  # how many pieces the body arrives in varies a little from run to run
            return changes
        assert code == CRASHED, f"the run failed (exit {code}) instead of crashing at boundary {n}"
        check_after_crash(data_dir / f"n{n}", n)
        n += 1


def test_a_first_download_crashed_at_every_write_boundary_recovers_byte_identical(http_mirror, tmp_path):
    spec = TINY.spec((http_mirror,))
    whole = tmp_path / "whole"
    ensure_dataset(spec, whole, policy=FAST)
    expected = snapshot(dataset_dir(spec, whole))
    assert "partial" not in " ".join(expected) and not any(k.endswith(".tmp") for k in expected)

    def after_crash(data_dir: Path, n: int) -> None:
        folder = dataset_dir(spec, data_dir)
        if folder.exists():
            assert_only_verified(folder, spec)
        ensure_dataset(spec, data_dir, policy=FAST)  # the next, uninterrupted run
        assert snapshot(folder) == expected, f"crash at boundary {n}: the cache differs after recovery"

    t0 = time.monotonic()
    boundaries = enumerate_crashes(lambda d: ensure_dataset(spec, d, policy=FAST), tmp_path, after_crash)
    assert boundaries >= 40, boundaries  # parts, their meta, four files, a record each, two splits
    print(f"\n{boundaries} crash points enumerated in {time.monotonic() - t0:.1f} s")


def test_a_forced_download_crashed_at_every_write_boundary_keeps_the_cache_usable(http_mirror, tmp_path):
    spec = TINY.spec((http_mirror,))
    whole = tmp_path / "whole"
    ensure_dataset(spec, whole, policy=FAST)
    expected = snapshot(dataset_dir(spec, whole))

    def run(data_dir: Path) -> None:
        ensure_dataset(spec, data_dir, policy=FAST, force=True)

    def after_crash(data_dir: Path, n: int) -> None:
        folder = dataset_dir(spec, data_dir)
        assert_only_verified(folder, spec)
        for split in ("train", "test"):  # nothing already cached is lost, at any moment
            assert load_split(spec, data_dir, split) is not None, f"crash at boundary {n} lost the {split} split"
        ensure_dataset(spec, data_dir, policy=FAST)
        assert snapshot(folder) == expected, f"crash at boundary {n}: the cache differs after recovery"

    boundaries = enumerate_crashes(run, tmp_path, after_crash, start_from=whole)
    assert boundaries >= 30, boundaries
    print(f"\n{boundaries} crash points enumerated over a complete cache")



def test_an_unpinned_sets_forced_replacement_crashed_at_every_boundary_is_one_version_or_the_other(tmp_path):
    # An unpinned dataset's four files are one set: whatever the crash point, the splits
    # that load are all of the old set or all of the new one, and the next run ends with
    # one whole set, byte for byte, never a mix.
    v2 = tiny_dataset(n_train=40, n_test=20, seed=8)
    mirror = tmp_path / "mirror"
    TINY.write_folder(mirror)
    spec = custom("tiny", str(mirror))
    old = tmp_path / "old"
    ensure_dataset(spec, old)
    v2.write_folder(mirror)  # the URL now serves the new set
    new = tmp_path / "new"
    ensure_dataset(spec, new)
    whole = {"old": snapshot(dataset_dir(spec, old)), "new": snapshot(dataset_dir(spec, new))}
    versions = {"old": TINY, "new": v2}
    assert whole["old"] != whole["new"]

    def after_crash(data_dir: Path, n: int) -> None:
        seen = set()
        for split in ("train", "test"):
            loaded = load_split(spec, data_dir, split)
            if loaded is None:  # stale: the record names the new set, raw/ is still being renamed in
                continue
            for name, ds in versions.items():
                if np.array_equal(loaded.images, ds.arrays[f"{split}-images"]):
                    np.testing.assert_array_equal(loaded.labels, ds.arrays[f"{split}-labels"])
                    seen.add(name)
        assert len(seen) <= 1, f"crash at boundary {n}: the splits mix the old set and the new one"
        ensure_dataset(spec, data_dir)  # the next, uninterrupted run
        assert snapshot(dataset_dir(spec, data_dir)) in whole.values(), f"crash at boundary {n}: a mixed cache"

    boundaries = enumerate_crashes(lambda d: ensure_dataset(spec, d, force=True), tmp_path / "runs", after_crash,
                                   start_from=old)
    assert boundaries >= 20, boundaries
    print(f"\n{boundaries} crash points enumerated over an unpinned set's replacement")
