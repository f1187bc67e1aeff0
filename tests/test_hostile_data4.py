"""Hostile round 4, data side: what a hostile tester did to `mlecli download`, the cache and
custom datasets, each held by a test that searches around the case it found."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import string
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST
from fakes import drop_midway, send, tiny_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.cli import main
from mlecli.data.cache import dataset_dir, ensure_dataset, ensure_splits
from mlecli.data.datasets import MNIST_FILES
from mlecli.data.download import mirror_location, url_problem
from mlecli.data.http import HttpPolicy
from mlecli.safe import files as fsutil
from mlecli.safe.errors import DataError, MlecliError

TRAIN_IMAGES = MNIST_FILES["train-images"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


def stale_temporary(name: str) -> str:
    """The name atomic_write gives a temporary of `name`, its writer gone."""
    return f".{name}.{fsutil._NAMESPACE}-{dead_pid()}.abcdefgh.tmp"


# ---------------------------------------------------------------------------
# 1. Cleanup never deletes through a symbolic link, and only names mlecli gives its own files

# What a user's folder may hold: names of every kind the cache's cleanup knows, and others.
VICTIM_NAMES = ["thesis.tex", ".notes", ".hidden.tmp", ".x.tmp", ".my.abc.tmp", "x.part", "x.gz.part.json",
                TRAIN_IMAGES, TRAIN_IMAGES + ".gz.part", TRAIN_IMAGES + ".gz.part.json", "empty.part"]


def plant_victim(folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    for name in [*VICTIM_NAMES, stale_temporary(TRAIN_IMAGES)]:
        (folder / name).write_bytes(b"" if name == "empty.part" else b"precious " + name.encode())
    return files_in(folder)


def _failing(spec):
    return type(spec)(**{**spec.__dict__, "mirrors": ("/nonexistent/",)})


# name -> (whether raw/train-images is missing first, what runs)
OPERATIONS = {
    "download": (False, lambda spec, data: ensure_dataset(spec, data)),
    "download of a missing file": (True, lambda spec, data: ensure_dataset(spec, data)),
    "download --force": (False, lambda spec, data: ensure_dataset(spec, data, force=True)),
    "a reader (train)": (False, lambda spec, data: ensure_splits(spec, data)),
    "a failing download": (True, lambda spec, data: ensure_dataset(_failing(spec), data)),
}


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
@pytest.mark.parametrize("sub", ["partial", "staged", "raw"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_linked_cache_subfolder_never_loses_a_file_of_the_folder_it_points_to(tiny, tiny_folder, tmp_path,
                                                                                 sub, operation, pinned):
    spec = tiny.spec((str(tiny_folder),), verified=pinned)
    data = tmp_path / "data"
    ensure_dataset(spec, data)
    folder = dataset_dir(spec, data)
    missing, run = OPERATIONS[operation]
    if missing:
        (folder / "raw" / TRAIN_IMAGES).unlink()
    victim = tmp_path / "victim"
    before = plant_victim(victim)
    if sub == "raw":  # the user moved the raw files to their folder and linked it
        for p in (folder / "raw").iterdir():
            os.replace(p, victim / p.name)
        before = files_in(victim)
        (folder / "raw").rmdir()
    (folder / sub).symlink_to(victim)
    try:
        run(spec, data)
    except MlecliError as exc:
        message = str(exc)
        if "is a symbolic link" in message:
            assert message == (
                f"{folder / sub} is a symbolic link: mlecli keeps only its own files in its cache and never writes or "
                f"deletes through a link; remove the link (rm {folder / sub}: the folder it points to is not touched) "
                "and run again")
        else:
            assert operation == "a failing download", message
    assert files_in(victim) == before
    assert (folder / sub).is_symlink()


def test_a_linked_subfolder_is_refused_by_download_in_one_line(tiny, tiny_folder, tmp_path):
    cfg = tiny.write_config(tmp_path / "tiny.toml", str(tiny_folder))
    data = tmp_path / "data"
    assert cli("download", "--config", cfg, "--data-dir", data, "-q").exit_code == 0
    folder = dataset_dir(tiny.spec(()), data)
    victim = tmp_path / "victim"
    before = plant_victim(victim)
    (folder / "partial").symlink_to(victim)
    res = cli("download", "--config", cfg, "--data-dir", data, "-q", "--force")
    assert res.exit_code == 1
    link = folder / "partial"
    assert res.stderr == (f"Error: {link} is a symbolic link: mlecli keeps only its own files in its cache and "
                          f"never writes or deletes through a link; remove the link (rm {link}: the folder it points "
                          "to is not touched) and run again\n")
    assert files_in(victim) == before


NAME_CHARS = string.ascii_letters + string.digits + "._-~ "


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.one_of(
    st.text(NAME_CHARS, min_size=1, max_size=40),
    st.builds(lambda a, b: f".{a}.{b}.tmp", st.text(NAME_CHARS, min_size=0, max_size=12),
              st.text(NAME_CHARS, min_size=0, max_size=12)),
    st.builds(lambda a, ns, pid, r: f".{a}.{ns}-{pid}.{r}.tmp", st.text(NAME_CHARS, min_size=1, max_size=12),
              st.sampled_from([fsutil._NAMESPACE, "0", "x", ""]), st.sampled_from([str(dead_pid()), str(os.getpid()),
                                                                                   "1", "", "a1"]),
              st.text("abcdefghijklmnopqrstuvwxyz0123456789_.", min_size=0, max_size=10)),
), min_size=1, max_size=8, unique=True).filter(lambda ns: all(n not in (".", "..") and "/" not in n for n in ns)))
def test_remove_stale_temporaries_removes_only_names_of_its_own_pattern_whose_writer_is_gone(names):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for n in names:
            (folder / n).write_bytes(b"x")
        fsutil.remove_stale_temporaries(folder)
        left = set(os.listdir(folder))
        for n in names:
            parts = n.rsplit(".", 3)
            ours = (len(parts) == 4 and parts[0].startswith(".") and len(parts[0]) > 1 and parts[3] == "tmp"
                    and len(parts[2]) == 8 and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in parts[2])
                    and parts[1].partition("-")[0].isdigit() and parts[1].partition("-")[2].isdigit())
            if not ours:
                assert n in left, n
        # and through a link to the folder, nothing at all
        link = Path(d + "-link")
        for n in names:
            (folder / n).write_bytes(b"x")
        link.symlink_to(folder)
        try:
            assert fsutil.remove_stale_temporaries(link) == 0
            assert set(os.listdir(folder)) == set(names)
        finally:
            link.unlink()


def test_remove_stale_temporaries_removes_a_dead_writers_temporary_and_keeps_a_live_ones(tmp_path):
    dead = tmp_path / stale_temporary("record.json")
    live = tmp_path / f".record.json.{fsutil._NAMESPACE}-1.abcdefgh.tmp"  # pid 1 lives
    for p in (dead, live):
        p.write_bytes(b"x")
    assert fsutil.remove_stale_temporaries(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == [live.name]


# ---------------------------------------------------------------------------
# 2. An unpinned file's part is resumed only when the server says it is the same version


VALIDATORS = {"none": lambda v: {}, "etag": lambda v: {"ETag": f'"{v}"'},
              "last-modified": lambda v: {"Last-Modified": f"Fri, 0{v} Jan 2026 00:00:00 GMT"}}


def changing_server(v1: bytes, v2: bytes, kind: str, honours_if_range: bool, fraction: float):
    """The first request for train-images gets `fraction` of v1 then a closed connection; later
    ones get v2 (its own validators), the rest of it for a Range request unless If-Range names
    another version and the server `honours_if_range`."""

    def behave(h, name, data, n):
        if name != TRAIN_IMAGES:
            return False
        if n == 0:
            return drop_midway(h, v1, fraction, headers=VALIDATORS[kind](1))
        version = 1 if v2 == v1 else 2
        mine = VALIDATORS[kind](version)
        rng, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        stale = if_range is not None and if_range not in mine.values()
        if rng and not (stale and honours_if_range):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            return send(h, 206, v2[start:], {"Content-Range": f"bytes {start}-{len(v2) - 1}/{len(v2)}", **mine})
        return send(h, 200, v2, mine)

    return behave


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("honours_if_range", [True, False], ids=["honours-If-Range", "ignores-If-Range"])
@pytest.mark.parametrize("kind", list(VALIDATORS))
@pytest.mark.parametrize("changes", [True, False], ids=["file-changes", "file-stays"])
def test_an_unpinned_files_part_never_mixes_two_versions(tiny, tmp_path, mirrors, kind, honours_if_range, fraction,
                                                         changes):
    v1 = tiny.contents[TRAIN_IMAGES]
    header = 16
    v2 = v1[:header] + bytes(255 - b for b in v1[header:]) if changes else v1
    m = mirrors(tiny.raw_files(), behave=changing_server(v1, v2, kind, honours_if_range, fraction))
    spec = tiny.spec((m.url,), verified=False)
    ensure_dataset(spec, tmp_path / "data", policy=FAST)
    cached = (dataset_dir(spec, tmp_path / "data") / "raw" / TRAIN_IMAGES).read_bytes()
    assert cached == v2
    asked = [r.headers for r in m.requests if r.path.endswith("/" + TRAIN_IMAGES)]
    if kind == "none":  # nothing tells the versions apart: never resumed
        assert [("Range" in h) for h in asked] == [False, False]
    else:
        assert asked[1]["Range"] == f"bytes={int(len(v1) * fraction)}-"
        assert asked[1]["If-Range"] == next(iter(VALIDATORS[kind](1).values()))
        whole_again = changes and not honours_if_range  # a 206 of another version: asked whole once more
        assert len(asked) == (3 if whole_again else 2)
        if whole_again:
            assert "Range" not in asked[2]


# ---------------------------------------------------------------------------
# 3. A URL that could not be sent is refused where it is given, never blamed on a server

URL_CHARS = "aZ09.-_:@[]/%é☃*! ~?#\t"
URLS = st.one_of(
    st.builds(lambda scheme, netloc, path: f"{scheme}://{netloc}{path}",
              st.sampled_from(["http", "https", "HTTP", "file", "ftp"]),
              st.one_of(st.text(URL_CHARS, max_size=16),
                        st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(["127.0.0.1", "localhost", "a..b", "[::1]",
                                                                          "x" * 64 + ".org", "é.org", ""]),
                                  st.one_of(st.integers(-5, 200_000).map(str), st.text(URL_CHARS, max_size=6)))),
              st.sampled_from(["", "/", "/data/", "/a b/", "/%zz/"])),
    st.text(URL_CHARS, max_size=30),
)
BLAMING = ("not valid HTTP", "LocationParseError", "UnicodeError", "InvalidURL", "Failed to parse", "Traceback")


@functools.cache
def tiny_hashes() -> str:
    return ", ".join(f'{k} = "{v}"' for k, v in tiny_dataset().spec(()).sha256.items())


def pinned_config(path: Path, url: str) -> Path:
    sha = tiny_hashes()
    path.write_text(f'[data]\ndataset = "tiny"\nurl = {json.dumps(url)}\nsha256 = {{ {sha} }}\n')
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=URLS)
def test_a_mirror_url_that_could_not_be_sent_is_a_usage_error_and_never_blamed_on_a_server(tmp_path, url):
    from urllib.parse import urlsplit

    import requests
    import urllib3

    problem = url_problem(url)
    if problem is None and mirror_location(url)[0] == "http":  # the request can be made, to the host it names
        base = mirror_location(url)[1]
        requests.Request("GET", base + TRAIN_IMAGES).prepare()
        urllib3.util.parse_url(base + TRAIN_IMAGES)
        urlsplit(base).hostname.encode("idna")
    if problem is None and urlsplit(url).scheme.lower() == "file":
        assert urlsplit(url).netloc.lower() in ("", "localhost") and urlsplit(url).path
    cfg = pinned_config(tmp_path / "tiny.toml", "/nonexistent/")
    res = cli("download", "--config", cfg, "--mirror", url, "--data-dir", tmp_path / "d", "--retries", "0", "-q")
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and not any(b in res.stderr for b in BLAMING), res.stderr
    assert res.exit_code == (2 if problem is not None else 1), res.stderr
    # the same URL in a config's [data] url: one line naming the key
    res = cli("download", "--config", pinned_config(tmp_path / "url.toml", url), "--data-dir", tmp_path / "d",
              "--retries", "0", "-q")
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert res.exit_code == 1 and len(errors) == 1 and not any(b in res.stderr for b in BLAMING), res.stderr
    if problem is not None:
        assert errors[0] == f"Error: config {tmp_path / 'url.toml'}: data.url = {url!r}: {problem}"


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:99999/", "its port must be a number from 1 to 65535; give a URL like http://host:8080/path/"),
    ("http://a..b/", "'a..b' is not a host name (a name's parts, between dots, are 1 to 63 letters, digits or "
                     "'-'); give a URL like https://host/path/"),
    ("file://otherhost/srv/mnist/", "a file:// URL of the host 'otherhost': only this machine's files can be read; "
                                    "give file:///path/to/folder/ or the folder's path"),
    ("file://", "a file:// URL names no folder; give file:///path/to/folder/ or the folder's path"),
])
def test_the_hostile_testers_urls_are_usage_errors(tmp_path, url, problem):
    cfg = pinned_config(tmp_path / "tiny.toml", "/nonexistent/")
    res = cli("download", "--config", cfg, "--mirror", url, "--data-dir", tmp_path / "d")
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == f"Error: Invalid value for '--mirror {url}': {problem}"
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------
# 4. --data-dir: an empty name is refused; a folder that cannot be made says what to do


@pytest.mark.parametrize("command", [["download", "--dataset", "fashion-mnist"], ["train"], ["evaluate", "run"],
                                     ["plot", "run"], ["sweep", "--grid", "train.lr=[0.1]"]])
def test_an_empty_data_dir_is_a_usage_error(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    res = cli(*command, "--data-dir", "")
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == ("Error: Invalid value for '--data-dir': an empty name is no folder; give "
                                           "one, such as --data-dir data")
    assert os.listdir(tmp_path) == []


DATA_DIRS = {
    "a symbolic link loop": ("loop", "Too many levels of symbolic links (a symbolic link on the way points, through "
                                     "others, back to itself); remove the loop or choose another folder"),
    "a link to nowhere": ("nowhere", "File exists (a folder or file of that name is in the way); move it aside or "
                                     "choose another place"),
    "a folder under /proc": ("/proc/self", "No such file or directory (its folder cannot be made there: a folder of "
                                           "the system, such as /proc?); choose another folder"),
}


@pytest.mark.parametrize("kind", list(DATA_DIRS))
def test_a_data_dir_that_cannot_be_made_says_what_to_do(tiny_folder, tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    os.symlink("/nonexistent/folder", "nowhere")
    data, why = DATA_DIRS[kind]
    cfg = pinned_config(tmp_path / "tiny.toml", str(tiny_folder))
    res = cli("download", "--config", cfg, "--data-dir", data, "-q")
    assert res.exit_code == 1
    folder = dataset_dir(tiny_dataset().spec(()), Path(data))
    assert res.stderr == f"Error: cannot write {folder / '.lock'}: {why}\n"


# ---------------------------------------------------------------------------
# 5. A header at odds with the set's headers already known is refused before its body is written


def big_gz(dims: tuple[int, ...]) -> bytes:
    """A gzip'd IDX file of uint8 zeros of `dims`: small on the wire, big decoded."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims))]
    size, block = int(np.prod(dims)), bytes(1 << 20)
    for start in range(0, size, len(block)):
        out.append(c.compress(block[: min(len(block), size - start)]))
    out.append(c.flush())
    return b"".join(out)


class Peak:
    """The most bytes the files under `folder` held at once, sampled every millisecond."""

    def __init__(self, folder: Path):
        self.folder, self.most, self.done = folder, 0, threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self):
        while not self.done.is_set():
            total = 0
            for root, _, names in os.walk(self.folder):
                for n in names:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(root, n)).st_size
            self.most = max(self.most, total)
            time.sleep(0.001)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


# file -> (its header's dims, the error: `{known}` names the file of the set it is at odds with, `{source}` itself)
AT_ODDS = {
    "train-labels": ((20_000_000,), "tiny train: 300 images but 20000000 labels ({known}, {source}); the files do not "
                                    "belong together"),
    "test-labels": ((20_000_000,), "tiny test: 100 images but 20000000 labels ({known}, {source}); the files do not "
                                   "belong together"),
    "test-images": ((30_000, 29, 28), "tiny: train images are 28x28 but test images are 29x28 ({known}, {source}); "
                                      "the files do not belong together"),
}
KNOWN = {"train-labels": "train-images", "test-labels": "test-images", "test-images": "train-images"}


@pytest.mark.parametrize("over", ["http", "folder"])
@pytest.mark.parametrize("pinned", [False, True], ids=["unpinned", "pinned-others"])
@pytest.mark.parametrize("role", list(AT_ODDS))
def test_a_header_at_odds_with_the_sets_known_headers_is_refused_before_its_body_is_written(
        tiny, tmp_path, mirrors, role, over, pinned):
    dims, why = AT_ODDS[role]
    files = tiny.gz_files()
    files[MNIST_FILES[role] + ".gz"] = big_gz(dims)
    if over == "http":
        where = mirrors(files).url
    else:
        where = str(tmp_path / "files")
        os.mkdir(where)
        for name, data in files.items():
            Path(where, name).write_bytes(data)
    spec = tiny.spec((where,), verified=pinned)
    if pinned:  # every file but this one pinned
        spec = type(spec)(**{**spec.__dict__, "sha256": {r: h for r, h in spec.sha256.items() if r != role},
                             "sizes": {r: n for r, n in spec.sizes.items() if r != role}})
    data = tmp_path / "data"
    with Peak(tmp_path / "data") as peak, pytest.raises(DataError) as caught:
        ensure_dataset(spec, data, policy=FAST)
    name = (lambda role: f"{where}{MNIST_FILES[role]}.gz") if over == "http" else \
        (lambda role: f"{Path(where, MNIST_FILES[role])}.gz")
    assert str(caught.value) == why.format(known=name(KNOWN[role]), source=name(role))
    assert not (dataset_dir(spec, data) / "staged").exists()
    assert peak.most < 2 * sum(len(c) for c in tiny.contents.values()), peak.most  # the four small files, twice


# ---------------------------------------------------------------------------
# 6. What the help and the log say is what the code does


def test_download_help_states_the_min_rate_grace_the_watchdog_uses():
    res = cli("download", "--help")
    assert "counted once 2 x --timeout seconds have passed since it was connected to" in " ".join(res.output.split())
    for timeout in (0.5, 3.0, 30.0):
        assert HttpPolicy(read_timeout=timeout).rate_grace == 2 * timeout


@pytest.mark.parametrize("gone", [("train.npz",), ("test.npz",), ("train.npz", "test.npz"),
                                  ("raw/" + TRAIN_IMAGES,), ("raw/" + TRAIN_IMAGES, "train.npz")])
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_a_reader_says_whether_it_rebuilds_a_split_or_downloads(tiny, tiny_folder, tmp_path, gone, pinned):
    spec = tiny.spec((str(tiny_folder),), verified=pinned)
    ensure_dataset(spec, tmp_path)
    folder = dataset_dir(spec, tmp_path)
    for name in gone:
        (folder / name).unlink()
    said = []
    ensure_splits(spec, tmp_path, log=said.append)
    splits = [n for n in gone if n.endswith(".npz")]
    if not splits:  # the splits alone are read: the raw files are not needed
        assert said == []
    elif any(n.startswith("raw/") for n in gone):
        assert said[0] == f"tiny is not cached in {folder}; downloading it"
    else:
        assert said[0] == (f"tiny: {' and '.join(splits)} not in {folder}; building "
                           f"{'it' if len(splits) == 1 else 'them'} from the raw files cached there")
        assert not [line for line in said if "download" in line]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/#frag", "http://127.0.0.1:8000/?q=1", "http://host/data?",
                                 "https://host/data/#"])
def test_a_mirror_with_a_query_or_fragment_is_a_usage_error(tmp_path, url):
    res = CliRunner().invoke(main, ["download", "--dataset", "fashion-mnist", "--mirror", url, "--data-dir",
                                    str(tmp_path / "d")])
    assert res.exit_code == 2 and "a ?query or #fragment" in res.output
    assert not (tmp_path / "d").exists()


def test_a_host_that_cannot_be_reached_is_said_so_not_a_dropped_connection():
    import requests
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    from mlecli.data.http import DEFAULT_POLICY, network_reason

    inner = NewConnectionError(None, "Failed to establish a new connection: [Errno 113] No route to host")
    exc = requests.exceptions.ConnectionError(MaxRetryError(None, "http://[fd00::1]:81/x", inner))
    assert network_reason(exc, DEFAULT_POLICY) == ("no connection could be made (No route to host)", True)
