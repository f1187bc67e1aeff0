"""The dataset cache: keyed by where the data came from, fresh by content, readable read-only,
bounded in memory and disk, tidy after a crash."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST
from fakes import TinyDataset, tiny_dataset, trickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.cli import main
from mlecli.data.cache import dataset_dir, ensure_dataset, ensure_splits, load_split
from mlecli.data.datasets import FASHION_MNIST, FILE_RE, MNIST_FILES, ROLES, custom
from mlecli.data.idx import idx_bytes
from mlecli.run import config
from mlecli.safe import files as fsutil
from mlecli.safe.errors import ConfigError, DataError, DownloadError, MlecliError

TRAIN_IMAGES = MNIST_FILES["train-images"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(res) -> str:
    assert res.exit_code == 1, res.output
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    return res.stderr.removeprefix("Error: ").rstrip("\n")


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpinned_config(path: Path, url: str, extra: str = "") -> Path:
    path.write_text(f'[data]\ndataset = "mine"\nurl = "{url}"\n{extra}')
    return path


# ---------------------------------------------------------------------------
# Keyed by where the data came from


def test_a_custom_dataset_moved_to_another_url_is_fetched_from_there(tiny, mirrors, tmp_path):
    other = tiny_dataset(seed=11)
    a, b = mirrors(tiny.gz_files()), mirrors(other.gz_files())
    data = tmp_path / "data"
    assert cli("download", "--config", unpinned_config(tmp_path / "a.toml", a.url), "--data-dir", data).exit_code == 0
    res = cli("download", "--config", unpinned_config(tmp_path / "b.toml", b.url), "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert "already cached" not in res.stdout and b.hits() == 4
    ds_a = config.load(tmp_path / "a.toml").data.resolve()
    ds_b = config.load(tmp_path / "b.toml").data.resolve()
    assert dataset_dir(ds_a, data) != dataset_dir(ds_b, data)
    np.testing.assert_array_equal(load_split(ds_b, data, "train").images, other.arrays["train-images"])
    np.testing.assert_array_equal(load_split(ds_a, data, "train").images, tiny.arrays["train-images"])


def test_other_file_names_at_the_same_url_are_another_cache(tiny):
    plain = custom("mine", "https://example.org/d/")
    renamed = custom("mine", "https://example.org/d/", {"train-images": "imgs.gz"})
    assert dataset_dir(plain, Path("d")) != dataset_dir(renamed, Path("d"))
    assert dataset_dir(plain, Path("d")) == dataset_dir(custom("mine", "https://example.org/d"), Path("d"))


def test_a_pinned_custom_dataset_is_one_cache_whatever_its_url(tiny, mirrors, tmp_path):
    a, b = mirrors(tiny.gz_files()), mirrors(tiny.gz_files())
    data = tmp_path / "data"
    assert cli("download", "--config", tiny.write_config(tmp_path / "a.toml", a.url), "--data-dir", data).exit_code == 0
    res = cli("download", "--config", tiny.write_config(tmp_path / "b.toml", b.url), "--data-dir", data)
    assert res.exit_code == 0 and res.stdout.count("already cached") == 4 and b.hits() == 0


def test_a_built_in_dataset_is_its_own_folder_whatever_mirror_a_config_adds(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndataset = "fashion-mnist"\nurl = "http://127.0.0.1:9/x/"\n')
    assert dataset_dir(config.load(cfg).data.resolve(), tmp_path) == tmp_path / "fashion-mnist"


# ---------------------------------------------------------------------------
# Fresh by content, readable read-only


def test_a_complete_cache_copied_with_cp_onto_a_read_only_disk_is_used_as_it_is(
        tiny, tiny_folder, tiny_config, tmpfs, tmp_path):
    cfg = tiny.write_config(tmp_path / "c.toml", tiny_folder)
    assert cli("download", "--config", cfg, "--data-dir", tmp_path / "data", "-q").exit_code == 0
    disk = tmpfs("ro", "4m")
    time.sleep(0.01)  # the copy's files get other modification times
    subprocess.run(["cp", "-r", str(tmp_path / "data"), str(disk / "data")], check=True)
    tmpfs.readonly(disk)
    before = files_in(disk / "data")
    res = cli("download", "--config", cfg, "--data-dir", disk / "data")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("already cached") == 4
    res = cli("train", tiny_config(train={"epochs": 1}), "--run-dir", tmp_path / "run", "--data-dir", disk / "data", "-q")
    assert res.exit_code == 0, res.output
    assert cli("evaluate", tmp_path / "run", "--data-dir", disk / "data").exit_code == 0
    assert files_in(disk / "data") == before


def test_a_record_that_does_not_match_the_split_makes_it_stale_and_it_is_rebuilt(tiny, tiny_folder, tmp_path):
    spec = tiny.spec((str(tiny_folder),), verified=False)
    ensure_dataset(spec, tmp_path)
    folder = dataset_dir(spec, tmp_path)
    record = json.loads((folder / "record.json").read_text())
    record["files"][TRAIN_IMAGES]["sha256"] = "0" * 64
    (folder / "record.json").write_text(json.dumps(record))
    assert load_split(spec, tmp_path, "train") is None  # the split was built from other content
    assert load_split(spec, tmp_path, "test") is not None
    ensure_dataset(spec, tmp_path)  # the raw file no longer matches its record: fetched again
    assert json.loads((folder / "record.json").read_text())["files"][TRAIN_IMAGES]["sha256"] != "0" * 64
    np.testing.assert_array_equal(load_split(spec, tmp_path, "train").images, tiny.arrays["train-images"])


cached_names = st.lists(st.from_regex(FILE_RE, fullmatch=True), min_size=4, max_size=4,
                        unique_by=lambda n: n.removesuffix(".gz")).filter(
    lambda names: all(n.removesuffix(".gz") for n in names))


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.one_of(cached_names, st.just(["record.json", "train.npz", "test.npz", "partial"]),
                       st.just(["hashes.json", "raw", ".lock.gz", "x.part"])))
def test_file_names_never_collide_with_the_caches_own_files(tiny, tmp_path_factory, names):
    if any(not FILE_RE.fullmatch(n) for n in names):
        with pytest.raises(ConfigError, match=r"must be a plain file name"):
            custom("mine", "x", dict(zip(ROLES, names)))
        return
    mirror = tmp_path_factory.mktemp("named")
    files = dict(zip(ROLES, names))
    for role, name in files.items():
        (mirror / name).write_bytes(gzip.compress(tiny.contents[MNIST_FILES[role]], mtime=0))
    spec = custom("mine", str(mirror), files)
    data = tmp_path_factory.mktemp("data")
    ensure_dataset(spec, data)
    for split in ("train", "test"):
        np.testing.assert_array_equal(load_split(spec, data, split).labels, tiny.arrays[f"{split}-labels"])
    record = json.loads((dataset_dir(spec, data) / "record.json").read_text())
    assert sorted(record["files"]) == sorted(n.removesuffix(".gz") for n in names)
    assert [r.source for r in ensure_dataset(spec, data)] == ["cache"] * 4


@pytest.mark.parametrize("files, why", [
    ({"train-images": "../x"}, "must be a plain file name"),
    ({"train-images": ".hidden"}, "must be a plain file name"),
    ({"train-images": "a/b"}, "must be a plain file name"),
    ({"train-images": "a\0b"}, "must be a plain file name"),
    ({"train-images": ".gz"}, "must be a plain file name"),
    ({"train-images": "x" * 201}, "must be a plain file name"),
    ({"train-images": "same", "test-images": "same.gz"}, "train-images and test-images are both 'same'"),
])
def test_file_names_that_are_not_plain_and_distinct_are_refused(files, why):
    with pytest.raises(ConfigError, match=why):
        custom("mine", "https://example.org/", files)


# ---------------------------------------------------------------------------
# Memory and disk


def gz_members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(p, mtime=0) for p in parts)


BOMB_HEADER = idx_bytes(np.zeros((10, 28, 28), np.uint8))  # a file of 7,856 bytes
ZEROS = gzip.compress(b"\0" * (16 << 20), mtime=0)  # 16 MiB in 16 KiB


def test_a_gzip_bomb_is_refused_one_chunk_past_what_its_header_declares(tiny, mirrors, tmp_path):
    bomb = gzip.compress(BOMB_HEADER, mtime=0) + ZEROS * 3  # 48 MiB behind the header, in what a 7,856-byte file may take
    files = {**tiny.gz_files(), TRAIN_IMAGES + ".gz": bomb}
    m = mirrors(files)
    tracemalloc.start()
    try:
        with pytest.raises(DownloadError) as err:
            ensure_dataset(tiny.spec((m.url,), verified=False), tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{m.url}: decompresses to more than the 7,856 bytes its IDX header declares (10x28x28)" in str(err.value)
    assert peak < 8 << 20  # a few pieces of 64 KiB, never the file
    assert not (dataset_dir(tiny.spec((m.url,), verified=False), tmp_path) / "raw" / TRAIN_IMAGES).exists()


def test_a_bigger_gzip_bomb_is_refused_by_its_size_on_the_wire_before_its_body_is_read(tiny, mirrors, tmp_path):
    bomb = gzip.compress(BOMB_HEADER, mtime=0) + ZEROS * 256  # 4 GiB
    m = mirrors({**tiny.gz_files(), TRAIN_IMAGES + ".gz": bomb})
    with pytest.raises(DownloadError) as err:
        ensure_dataset(tiny.spec((m.url,), verified=False), tmp_path)
    assert f"{m.url}: the server offers {len(bomb):,} bytes, more than an IDX file of 7,856 bytes can take" in str(
        err.value)


def test_a_header_of_two_billion_tiny_images_is_refused_before_the_body_is_read(tiny, mirrors, tmp_path, monkeypatch):
    monkeypatch.setattr("mlecli.safe.resources.physical_memory", lambda: 8 << 30)
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 1, 1)
    m = mirrors({**tiny.gz_files(), TRAIN_IMAGES + ".gz": gzip.compress(header + b"\0" * 100_000, mtime=0)})
    with pytest.raises(MlecliError) as err:
        ensure_dataset(tiny.spec((m.url,), verified=False), tmp_path)
    assert str(err.value) == (
        f"{m.url}{TRAIN_IMAGES}.gz: 2,147,483,648 images of 1x1 (held in memory to train on) needs 100.0 GiB of "
        "memory, only 8.0 GiB is in this machine: it cannot be used on this machine"
    )
    assert not list(dataset_dir(tiny.spec((m.url,), verified=False), tmp_path).rglob(TRAIN_IMAGES + "*"))


def test_images_larger_than_4096_pixels_a_side_are_refused(tiny, tmp_path):
    folder = tmp_path / "mirror"
    tiny.write_folder(folder)
    (folder / f"{TRAIN_IMAGES}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 1, 1, 4097)))
    with pytest.raises(DownloadError, match=r"images must be uint8 N x H x W with 1 <= H, W <= 4096, got uint8 1x1x4097"):
        ensure_dataset(tiny.spec((str(folder),), verified=False), tmp_path / "data")


def test_loading_a_split_that_does_not_fit_in_the_available_memory_is_one_line(tiny, tiny_folder, tmp_path, monkeypatch):
    spec = tiny.spec((str(tiny_folder),))
    ensure_dataset(spec, tmp_path)
    monkeypatch.setattr("mlecli.safe.resources.available_memory", lambda: 100_000)
    with pytest.raises(MlecliError) as err:
        ensure_splits(spec, tmp_path)
    path = dataset_dir(spec, tmp_path) / "train.npz"
    assert str(err.value) == (
        f"loading the train split of tiny ({path}) needs 230.2 KiB of memory, only 97.7 KiB is available: "
        "close other programs and try again"
    )


def test_train_and_test_images_of_different_sizes_are_refused_when_caching(tiny, tmp_path):
    contents = dict(tiny.contents)
    contents[MNIST_FILES["test-images"]] = idx_bytes(np.zeros((100, 32, 32), np.uint8))
    folder = TinyDataset(contents, tiny.arrays).write_folder(tmp_path / "mirror")
    res = cli("download", "--config", unpinned_config(tmp_path / "c.toml", folder), "--data-dir", tmp_path / "d", "-q")
    # An unpinned set is checked before it is committed: the files are named by where they came from.
    assert one_line(res) == (
        f"mine: train images are 28x28 but test images are 32x32 ({folder / TRAIN_IMAGES}.gz, "
        f"{folder / MNIST_FILES['test-images']}.gz); the files do not belong together"
    )
    assert not (dataset_dir(config.load(tmp_path / "c.toml").data.resolve(), tmp_path / "d") / "raw").exists()


def test_train_and_test_images_of_different_sizes_in_a_cache_are_refused_when_loading(tiny, tmp_path, monkeypatch):
    # A cache written without the check (by an earlier version, say) is refused when it is read.
    from mlecli.data import cache

    contents = dict(tiny.contents)
    contents[MNIST_FILES["test-images"]] = idx_bytes(np.zeros((100, 32, 32), np.uint8))
    folder = TinyDataset(contents, tiny.arrays).write_folder(tmp_path / "mirror")
    spec = custom("mine", str(folder))
    with monkeypatch.context() as m:
        m.setattr(cache, "_check_together", lambda ds, paths, shown=None: {r: cache._read_header_of(paths[r]) for r in ROLES})
        m.setattr(cache, "_check_with_known", lambda *args: None)
        ensure_dataset(spec, tmp_path / "d")
    with pytest.raises(DataError) as err:
        ensure_splits(spec, tmp_path / "d")
    assert str(err.value) == (
        f"mine in {dataset_dir(spec, tmp_path / 'd')}: train images are 28x28 but test images are 32x32; "
        "the files do not belong together"
    )


def test_inodes_running_out_while_caching_is_one_line_and_leaves_only_verified_files(tiny, tiny_folder, tmpfs):
    disk = tmpfs("few-inodes", "8m,nr_inodes=7")
    res = cli("download", "--config", tiny.write_config(disk.parent / "c.toml", tiny_folder), "--data-dir", disk, "-q")
    error = one_line(res)
    assert error.startswith("no space left on the device while writing ") and error.endswith(
        ": free some space and try again")
    folder = dataset_dir(tiny.spec(()), disk)
    for p in folder.rglob("*"):
        assert not p.name.endswith(".tmp")
        if p.parent.name == "raw":
            assert p.read_bytes() == tiny.contents[p.name]


# ---------------------------------------------------------------------------
# Special files where data should be


@pytest.mark.parametrize("make", ["fifo", "dev-zero-link", "folder"])
def test_a_mirror_file_that_is_not_a_regular_file_is_refused_without_reading_it(tiny, tmp_path, make):
    folder = tiny.write_folder(tmp_path / "mirror")
    target = folder / f"{TRAIN_IMAGES}.gz"
    target.unlink()
    if make == "fifo":
        os.mkfifo(target)  # opening it to read would wait for a writer forever
    elif make == "dev-zero-link":
        target.symlink_to("/dev/zero")  # reading it would never end
    else:
        target.mkdir()
    with pytest.raises(DownloadError, match=rf"{folder}: {target} is not a regular file"):
        ensure_dataset(tiny.spec((str(folder),)), tmp_path / "data")


def test_dev_zero_as_a_mirror_is_refused_in_one_line(tmp_path):
    res = cli("download", "--dataset", "mnist", "--mirror", "/dev/zero", "--data-dir", tmp_path, "--retries", "0", "-q")
    assert one_line(res).startswith("could not download train-images-idx3-ubyte from any mirror: "
                                    "/dev/zero: /dev/zero is not a folder; ")


# ---------------------------------------------------------------------------
# Leftovers of a killed download


def test_a_killed_downloads_leftovers_are_resumed_or_removed_by_the_next_run(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and trickle(h, data, 4096, 0.02))
    cfg = tiny.write_config(tmp_path / "tiny.toml", m.url)
    data = tmp_path / "data"
    folder = dataset_dir(tiny.spec(()), data)
    part = folder / "partial" / f"{TRAIN_IMAGES}.gz.part"
    proc = subprocess.Popen([sys.executable, "-m", "mlecli", "download", "--config", str(cfg), "--data-dir", str(data),
                             "-q"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= 16384):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    # What else a killed writer can leave: temporaries anywhere, parts of other files.
    writer = f"{fsutil._NAMESPACE}-{proc.pid}"  # the killed process's temporaries name it
    for leftover in (folder / f".record.json.{writer}.x1abcdef.tmp",
                     folder / "raw" / f".{TRAIN_IMAGES}.{writer}.x2abcdef.tmp",
                     folder / "partial" / "not-ours.gz.part",
                     folder / "partial" / f".{TRAIN_IMAGES}.gz.part.json.{writer}.x3abcdef.tmp"):
        leftover.write_bytes(b"\0" * 1000)
    kept = part.stat().st_size
    reports = ensure_dataset(tiny.spec((m.url,)), data, policy=FAST)
    assert [r.verified for r in reports] == [True] * 4
    resumed = [r for r in m.requests if r.path.endswith(TRAIN_IMAGES + ".gz") and "Range" in r.headers]
    assert resumed and resumed[0].headers["Range"] == f"bytes={kept}-"
    assert sorted(files_in(folder)) == [
        ".lock", "raw/t10k-images-idx3-ubyte", "raw/t10k-labels-idx1-ubyte", "raw/train-images-idx3-ubyte",
        "raw/train-labels-idx1-ubyte", "record.json", "test.npz", "train.npz",
    ]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_reader_tidies_leftovers_only_when_no_writer_holds_the_lock(tiny, tiny_folder, tmp_path):
    spec = tiny.spec((str(tiny_folder),))
    ensure_dataset(spec, tmp_path)
    folder = dataset_dir(spec, tmp_path)
    clean = files_in(folder)
    leftovers = [folder / "raw" / f".x.{fsutil._NAMESPACE}-{_dead_pid()}.abcdefgh.tmp",
                 folder / "partial" / f"{TRAIN_IMAGES}.gz.part"]

    def plant():
        leftovers[1].parent.mkdir(exist_ok=True)
        for p in leftovers:
            p.write_bytes(b"left")

    plant()
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a writer at work: its files are not leftovers
        assert ensure_splits(spec, tmp_path)["train"].images.shape == (300, 28, 28)
        assert all(p.exists() for p in leftovers)
    ensure_splits(spec, tmp_path)
    assert files_in(folder) == clean


# ---------------------------------------------------------------------------
# Data named by a checkpoint is never downloaded from the URL it names


def test_evaluate_never_downloads_a_custom_dataset_named_by_a_checkpoint(tiny, mirrors, tiny_config, tmp_path):
    m = mirrors(tiny.gz_files())
    run, data = tmp_path / "run", tmp_path / "data"
    cfg = tiny_config(data={"url": m.url}, train={"epochs": 1})
    assert cli("train", cfg, "--run-dir", run, "--data-dir", data, "-q").exit_code == 0
    shutil.rmtree(data)
    hits = m.hits()
    res = cli("evaluate", run, "--data-dir", data)
    folder = dataset_dir(config.load(cfg).data.resolve(), data)
    assert one_line(res) == (
        f"tiny is not (completely) in the cache {folder}, and its URL {m.url} comes from a checkpoint or run folder, "
        "from which mlecli never downloads by itself; if you trust that URL, fetch it with: "
        f"mlecli download --config {run / 'config.toml'} --data-dir {data}"
    )
    assert m.hits() == hits
    assert cli("download", "--config", run / "config.toml", "--data-dir", data, "-q").exit_code == 0
    assert cli("evaluate", run, "--data-dir", data).exit_code == 0
    shutil.rmtree(data)
    res = cli("plot", run, "--data-dir", data)
    if "matplotlib" not in res.stderr:
        assert "never downloads by itself" in one_line(res)
    assert m.hits() == hits + 4


def test_a_built_in_dataset_named_by_a_checkpoint_comes_only_from_its_built_in_mirrors(mirrors, tmp_path):
    m = mirrors({})
    named = FASHION_MNIST.__class__(FASHION_MNIST.name, (m.url, *FASHION_MNIST.mirrors), FASHION_MNIST.files,
                                    FASHION_MNIST.sha256, FASHION_MNIST.sizes)
    with pytest.raises(DownloadError) as err:
        ensure_splits(named, tmp_path, download="builtin", policy=FAST)
    assert m.hits() == 0
    assert str(err.value).startswith(f"could not download {TRAIN_IMAGES} from any mirror: {FASHION_MNIST.mirrors[0]}: ")
    with pytest.raises(DataError, match="never downloads by itself"):
        ensure_splits(named, tmp_path, download="never")


def test_a_containers_memory_limit_counts_as_the_machines_memory(tmp_path, monkeypatch):
    from mlecli.safe import resources

    (tmp_path / "max").write_text("1073741824\n")
    (tmp_path / "current").write_text("268435456\n")
    monkeypatch.setattr(resources, "_CGROUP", ((str(tmp_path / "max"), str(tmp_path / "current")),))
    assert resources.physical_memory() == 1 << 30
    assert resources.available_memory() <= (1 << 30) - (1 << 28)
    (tmp_path / "max").write_text("max\n")  # no limit
    assert resources.physical_memory() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
