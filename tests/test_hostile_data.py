"""Hostile round 2, data side: what a hostile tester did to `mlecli download`, the cache and
custom datasets, each held by a test that searches around the case it found."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require
from fakes import send, tiny_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.cli import main
from mlecli.data.cache import DOWNLOAD_NEVER, dataset_dir, ensure_dataset, ensure_splits, load_split
from mlecli.data.datasets import MNIST_FILES, ROLES, custom
from mlecli.data.idx import HEADER_WITHIN, IdxDecoder
from mlecli.safe import locks as lockwait
from mlecli.safe import npz
from mlecli.safe.errors import DataError, MlecliError

TRAIN_IMAGES = MNIST_FILES["train-images"]
EMPTY_MEMBER = gzip.compress(b"", mtime=0)  # 20 bytes that decompress to nothing


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(res) -> str:
    assert res.exit_code == 1, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0].removeprefix("Error: ")


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpinned_config(path: Path, url: str) -> Path:
    path.write_text(f'[data]\ndataset = "mine"\nurl = "{url}"\n')
    return path


# ---------------------------------------------------------------------------
# A damaged split .npz is rebuilt from the verified raw files, never used


@pytest.fixture(scope="module")
def cached_tiny(tmp_path_factory):
    """A complete cache of the tiny dataset (pinned), and the arrays it must give."""
    tiny = tiny_dataset(n_train=60, n_test=40, seed=3)
    root = tmp_path_factory.mktemp("cached")
    spec = tiny.spec((str(tiny.write_folder(root / "mirror")),))
    ensure_dataset(spec, root / "data")
    return tiny, spec, root / "data"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_changed_in_a_cached_split_never_reaches_training(cached_tiny, data):
    tiny, spec, root = cached_tiny
    split = data.draw(st.sampled_from(["train", "test"]))
    path = dataset_dir(spec, root) / f"{split}.npz"
    good = path.read_bytes()
    at = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(1, 255))
    path.write_bytes(good[:at] + bytes([good[at] ^ flip]) + good[at + 1:])
    try:
        splits = ensure_splits(spec, root, download=DOWNLOAD_NEVER)  # the raw files are there: no network
    except DataError:
        pytest.fail(f"a flip at byte {at} of {split}.npz was not repaired")
    np.testing.assert_array_equal(splits[split].images, tiny.arrays[f"{split}-images"])
    np.testing.assert_array_equal(splits[split].labels, tiny.arrays[f"{split}-labels"])
    path.write_bytes(good)


def test_a_flipped_pixel_in_a_cached_split_is_found_by_its_crc_and_the_split_rebuilt(cached_tiny):
    tiny, spec, root = cached_tiny
    path = dataset_dir(spec, root) / "test.npz"
    good = path.read_bytes()
    images = npz.read(path, check_crc=True, names=("images",))["images"]
    at = good.index(images.tobytes()) + 1000
    path.write_bytes(good[:at] + bytes([good[at] ^ 0x80]) + good[at + 1:])
    logs = []
    splits = ensure_splits(spec, root, download=DOWNLOAD_NEVER, log=logs.append)
    assert logs == [f"{path}: member images.npy fails its CRC-32 check (the file is damaged); "
                    "rebuilding it from the verified raw files"]
    np.testing.assert_array_equal(splits["test"].images, tiny.arrays["test-images"])
    assert path.read_bytes() == good


def test_labels_that_are_not_digits_in_a_split_with_good_crcs_are_rebuilt(cached_tiny):
    tiny, spec, root = cached_tiny
    path = dataset_dir(spec, root) / "train.npz"
    good = path.read_bytes()
    z = npz.read(path, check_crc=True)
    labels = z["labels"].copy()
    labels[7] = 12
    with open(path, "wb") as f:  # a split rewritten whole, CRCs right: only its labels are wrong
        npz.write(f, {"images": z["images"], "labels": labels, "meta": z["meta"]})
    logs = []
    splits = ensure_splits(spec, root, download=DOWNLOAD_NEVER, log=logs.append)
    assert logs == [f"{path}: label 12 at index 7 is not a digit 0-9; rebuilding it from the verified raw files"]
    np.testing.assert_array_equal(splits["train"].labels, tiny.arrays["train-labels"])
    assert path.read_bytes() == good


def test_download_of_a_cache_with_a_damaged_split_rebuilds_it_without_the_network(cached_tiny):
    tiny, spec, root = cached_tiny
    path = dataset_dir(spec, root) / "test.npz"
    good = path.read_bytes()
    path.write_bytes(good[:-200] + bytes(200))  # the zip directory zeroed
    reports = ensure_dataset(spec, root)  # its only mirror is a folder; no network either way
    assert [r.source for r in reports] == ["cache"] * 4
    assert path.read_bytes() == good


# ---------------------------------------------------------------------------
# A stream that never shows an IDX header is given up within its first 64 KiB


@settings(max_examples=40, deadline=None)
@given(members=st.one_of(st.integers(0, 3000), st.integers(3277, 6000)), piece=st.integers(1, 70_000))
def test_a_header_must_decode_within_the_first_64_kib(members, piece):
    # Empty gzip members before a real one: fine while they leave room for the header in the
    # first 64 KiB (3000 of them: 60,000 bytes), refused once they fill it (3277: 65,540 bytes).
    idx = b"\0\0\x08\x01" + (50).to_bytes(4, "big") + np.arange(50, dtype=np.uint8).tobytes()
    data = EMPTY_MEMBER * members + gzip.compress(idx, mtime=0)
    decoder = IdxDecoder("f")
    out = []
    try:
        for i in range(0, len(data), piece):
            out += decoder.feed(data[i:i + piece])
        out += decoder.finish()
    except DataError as exc:
        assert members >= 3277
        assert str(exc) == (f"f: its first {HEADER_WITHIN:,} bytes decompress to no IDX header (0 bytes); "
                            "it is not an IDX file")
        assert decoder.fed <= HEADER_WITHIN
    else:
        assert members <= 3000
        assert b"".join(out) == idx


NOTHING_FOR_EVER = {
    "empty gzip members": EMPTY_MEMBER * 5000,
    "empty stored deflate blocks": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + b"\x00\x00\x00\xff\xff" * 20_000,
    "an endless file name": b"\x1f\x8b\x08\x08\x00\x00\x00\x00\x02\x03" + b"n" * 100_000,
    "an endless extra field": b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x02\x03\xff\xff" + b"x" * 100_000,
}


@pytest.mark.parametrize("kind", sorted(NOTHING_FOR_EVER))
@settings(max_examples=10, deadline=None)
@given(piece=st.integers(1, 70_000))
def test_a_stream_that_decodes_to_nothing_is_refused_within_64_kib(kind, piece):
    data = NOTHING_FOR_EVER[kind]
    decoder = IdxDecoder("f")
    with pytest.raises(DataError) as err:
        for i in range(0, len(data), piece):
            assert list(decoder.feed(data[i:i + piece])) == []
    assert str(err.value) == (f"f: its first {HEADER_WITHIN:,} bytes decompress to no IDX header (0 bytes); "
                              "it is not an IDX file")
    assert decoder.fed <= HEADER_WITHIN


def test_a_mirror_sending_empty_gzip_members_for_ever_is_given_up_within_64_kib(tiny, mirrors, tmp_path):
    def endless(h, name, data, n):
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            h.wfile.write(EMPTY_MEMBER * 300)
            time.sleep(0.01)
        return True

    m = mirrors({}, behave=endless)
    start = time.monotonic()
    res = cli("download", "--config", unpinned_config(tmp_path / "c.toml", m.url), "--data-dir", tmp_path / "d",
              "--retries", "0", "-q")
    assert time.monotonic() - start < 10
    assert error_line(res) == (
        f"could not download {TRAIN_IMAGES} from any mirror: {m.url}: its first 65,536 "
        "bytes decompress to no IDX header (0 bytes); it is not an IDX file. Check the network, and the url of "
        "the mine dataset in its config's [data] table"
    )
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------
# An unpinned dataset: one set of four files, from its own URL only


def test_a_mirror_for_an_unpinned_dataset_is_refused_in_one_line(tiny, tmp_path):
    own, other = tiny.write_folder(tmp_path / "own"), tiny_dataset(seed=5).write_folder(tmp_path / "other")
    cfg = unpinned_config(tmp_path / "c.toml", str(own))
    res = cli("download", "--config", cfg, "--mirror", other, "--data-dir", tmp_path / "d")
    assert error_line(res) == (
        f"--mirror {other}: the files of mine are not pinned by a sha256 in its config, so nothing would tell the "
        f"mirror's files from those at its url {own}; to fetch them from the mirror, set url = \"{other}\" in the "
        "config's [data] table (or pin the files' sha256 there: then any mirror will do)"
    )
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("failing", ROLES)
def test_a_forced_download_failing_at_any_file_keeps_the_whole_earlier_set(tiny, mirrors, tmp_path, failing):
    v2 = tiny_dataset(seed=9)
    state = {"v2": False}

    def behave(h, name, data, n):
        if not state["v2"]:
            return False
        if name.startswith(MNIST_FILES[failing]):
            return send(h, 503, b"busy")
        content = v2.gz_files().get(name)
        return send(h, 200, content) if content is not None else send(h, 404, b"")

    m = mirrors(tiny.gz_files(), behave=behave)
    cfg = unpinned_config(tmp_path / "c.toml", m.url)
    assert cli("download", "--config", cfg, "--data-dir", tmp_path / "d", "-q").exit_code == 0
    folder = dataset_dir(custom("mine", m.url), tmp_path / "d")
    before = files_in(folder)
    state["v2"] = True
    # --retries 1: once in a full suite under load, a kept-alive connection dropped before the 503
    # came (cause not found); one more attempt makes the test about the 503, as it means to be.
    res = cli("download", "--config", cfg, "--data-dir", tmp_path / "d", "--force", "--retries", "1", "-q")
    assert error_line(res).startswith(f"could not download {MNIST_FILES[failing]} from any mirror: {m.url}: HTTP 503")
    assert files_in(folder) == before
    for split in ("train", "test"):
        loaded = load_split(custom("mine", m.url), tmp_path / "d", split)
        np.testing.assert_array_equal(loaded.labels, tiny.arrays[f"{split}-labels"])
    state["v2"] = False
    assert cli("download", "--config", cfg, "--data-dir", tmp_path / "d", "-q").exit_code == 0
    assert files_in(folder) == before


# ---------------------------------------------------------------------------
# record.json is read with a size limit


def test_an_outsized_record_counts_as_none_and_costs_no_memory(tiny, tmp_path):
    spec = custom("mine", str(tiny.write_folder(tmp_path / "mirror")))
    ensure_dataset(spec, tmp_path / "d")
    record = dataset_dir(spec, tmp_path / "d") / "record.json"
    good = record.read_bytes()
    with open(record, "r+b") as f:
        f.truncate(3 << 30)  # sparse: 3 GB that cost no disk
    tracemalloc.start()
    try:
        assert load_split(spec, tmp_path / "d", "train") is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    ensure_dataset(spec, tmp_path / "d")  # the set is fetched again and recorded anew
    assert record.read_bytes() == good


def _containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8), _containers, max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_whatever_record_json_says_the_cache_loads_or_is_fetched_again(tiny, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("rec")
    spec = custom("mine", str(tiny.write_folder(root / "mirror")))
    ensure_dataset(spec, root / "d")
    path = dataset_dir(spec, root / "d") / "record.json"
    record = json.loads(path.read_text())
    # Change one value anywhere in the record (a hand, another version, a hostile copy).
    entry = data.draw(st.sampled_from([None, *record["files"]]))
    target = record if entry is None else record["files"][entry]
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = data.draw(JSON)
    path.write_text(json.dumps(record))
    load_split(spec, root / "d", "train")  # a Split or None, never an exception
    ensure_dataset(spec, root / "d")
    loaded = load_split(spec, root / "d", "train")
    np.testing.assert_array_equal(loaded.labels, tiny.arrays["train-labels"])


# ---------------------------------------------------------------------------
# A lock held by another process: who holds it, and what to do


@pytest.fixture
def holder(tmp_path):
    """Start a process holding `folder`'s lock: holder(folder) -> Popen (killed after the test)."""
    procs = []

    def start(folder: Path, seconds: float = 60) -> subprocess.Popen:
        code = ("import sys, time; from pathlib import Path; from mlecli.safe.locks import folder_lock\n"
                "with folder_lock(Path(sys.argv[1]), wait=False, what='x'):\n"
                "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")
        p = subprocess.Popen([sys.executable, "-c", code, str(folder), str(seconds)], stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout.readline() == b"held\n"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait()


def test_a_lock_held_by_a_stopped_process_names_it_and_says_how_to_resume_it(tmp_path, holder):
    folder = tmp_path / "d"
    folder.mkdir()
    p = holder(folder)
    os.kill(p.pid, signal.SIGSTOP)
    logs = []
    with pytest.raises(MlecliError) as err:
        with lockwait.waiting_lock(folder, what="the data folder d", log=logs.append, patience=0.3):
            pass
    advice = f"it is stopped (Ctrl-Z?): resume it with fg in its terminal, or kill -CONT {p.pid}"
    assert logs == [f"the data folder d is in use by process {p.pid} (lock {folder / '.lock'}); {advice}; "
                    "waiting for it at most 0.3 s (Ctrl-C stops waiting)"]
    assert str(err.value) == (f"the data folder d is still in use by process {p.pid} after 0.3 s of waiting "
                              f"(lock {folder / '.lock'}); {advice}; try again once it has finished")


def test_a_lock_is_taken_as_soon_as_its_running_holder_lets_go(tmp_path, holder):
    folder = tmp_path / "d"
    folder.mkdir()
    p = holder(folder, seconds=0.5)
    logs = []
    with lockwait.waiting_lock(folder, what="the data folder d", log=logs.append, patience=30):
        assert p.wait(timeout=5) == 0
    assert logs == [f"the data folder d is in use by process {p.pid} (lock {folder / '.lock'}); "
                    "waiting for it at most 30 s (Ctrl-C stops waiting)"]


def test_train_behind_a_stopped_download_says_who_holds_the_data_folder(tiny, tiny_config, tmp_path, holder,
                                                                         monkeypatch):
    monkeypatch.setattr(lockwait, "PATIENCE", 0.3)
    cfg = tiny_config()
    folder = dataset_dir(tiny.spec(()), tmp_path / "data")
    folder.mkdir(parents=True)
    p = holder(folder)
    os.kill(p.pid, signal.SIGSTOP)
    res = cli("train", cfg, "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "run")
    assert f"is in use by process {p.pid} (lock {folder / '.lock'}); it is stopped (Ctrl-Z?)" in res.stderr
    assert error_line(res) == (
        f"the data folder {folder} is still in use by process {p.pid} after 0.3 s of waiting (lock {folder / '.lock'})"
        f"; it is stopped (Ctrl-Z?): resume it with fg in its terminal, or kill -CONT {p.pid}; try again once it has "
        "finished"
    )


# ---------------------------------------------------------------------------
# A failed download leaves no folder it made, and no empty part


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_failed_download_into_new_nested_folders_leaves_none_of_them(tmp_path, depth):
    data = tmp_path.joinpath(*[f"new{i}" for i in range(depth)])
    res = cli("download", "--dataset", "fashion-mnist", "--mirror", tmp_path / "nonexistent", "--data-dir", data,
              "--retries", "0")
    assert error_line(res).startswith("could not download train-images-idx3-ubyte from any mirror")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("sent", [0, 1, 100])
def test_a_download_cut_before_any_byte_leaves_nothing_and_one_cut_later_leaves_its_part(tiny, mirrors, tmp_path,
                                                                                       sent):
    body = tiny.gz_files()[TRAIN_IMAGES + ".gz"]

    def cut(h, name, data, n):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:sent])
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)
        return True

    m = mirrors({}, behave=cut)
    res = cli("download", "--config", unpinned_config(tmp_path / "c.toml", m.url), "--data-dir", tmp_path / "d",
              "--retries", "0", "-q")
    assert "the connection dropped mid-file" in error_line(res)
    left = {str(p.relative_to(tmp_path / "d")): p.stat().st_size for p in (tmp_path / "d").rglob("*")
            if p.is_file()} if (tmp_path / "d").exists() else {}
    if sent == 0:
        assert left == {}
    else:
        part = f"{dataset_dir(custom('mine', m.url), Path('.'))}/partial/{TRAIN_IMAGES}.gz.part"
        assert {k: v for k, v in left.items() if k.endswith(".part")} == {part: sent}


# ---------------------------------------------------------------------------
# Paths longer than the system allows


def test_data_folders_near_the_path_limit_work_or_are_one_line_with_advice(tiny, tiny_folder, tmp_path):
    base = tmp_path / "x"
    outcomes = set()
    for extra in range(3900, 4100, 25):
        data = base / f"{extra}"
        while len(str(data)) < extra:
            data = data / ("d" * min(200, extra - len(str(data)) - 1 or 1))
        if len(str(data)) < 4000:
            os.makedirs(data, exist_ok=True)
        res = cli("download", "--config", tiny.write_config(tmp_path / "c.toml", tiny_folder), "--data-dir", data,
                  "-q")
        if res.exit_code == 0:
            outcomes.add("ok")
            assert load_split(tiny.spec(()), data, "test") is not None
            continue
        folder = str(dataset_dir(tiny.spec(()), data))
        shown = folder if len(folder) <= 100 else f"{folder[:60]}…{folder[-30:]}"
        assert error_line(res) == (
            f"the data folder {shown} ({len(folder):,} characters) makes paths longer than this system allows "
            "(File name too long): choose a shorter data folder (--data-dir or $MLECLI_DATA_DIR)"
        )
        outcomes.add("refused")
    assert outcomes == {"ok", "refused"}


# ---------------------------------------------------------------------------
# TLS: a handshake that trickles in is given up, and says so


def test_a_tls_handshake_trickling_in_is_given_up_and_named(tiny, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def handle(c):
        with c:
            c.recv(4096)  # the ClientHello
            for b in b"\x16\x03\x03\x10\x00\x02" + bytes(200):  # a ServerHello, one byte at a time
                if stop.wait(0.3):
                    return
                c.sendall(bytes([b]))

    def accept():
        while not stop.is_set():
            try:
                c, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    url = f"https://127.0.0.1:{server.getsockname()[1]}/"
    try:
        start = time.monotonic()
        res = cli("download", "--config", tiny.write_config(tmp_path / "c.toml", url), "--data-dir", tmp_path / "d",
                  "--timeout", "1", "--retries", "0", "-q")
        took = time.monotonic() - start
    finally:
        stop.set()
        server.close()
    assert error_line(res).startswith(
        f"could not download {TRAIN_IMAGES} from any mirror: {url}: no TLS handshake within 2 s of connecting "
        "(it trickled in)")
    assert took < 6


def test_an_https_url_to_a_plain_http_server_says_so(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    url = m.url.replace("http://", "https://")
    res = cli("download", "--config", tiny.write_config(tmp_path / "c.toml", url), "--data-dir", tmp_path / "d", "-q")
    assert error_line(res) == (
        f"could not download {TRAIN_IMAGES} from any mirror: {url}: the server does not answer in TLS "
        "(WRONG_VERSION_NUMBER); if it serves plain HTTP, use an http:// URL. Check the network, and the url of "
        "the tiny dataset in its config's [data] table"
    )
    assert m.hits() == 0  # no request ever reached it: it is not retried


@pytest.fixture
def tls_mirror(tmp_path, tiny_folder):
    """An https server on 127.0.0.1 serving the tiny dataset with a self-signed certificate: (url, cert)."""
    require(shutil.which("openssl") is not None, "openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tiny_folder), **kwargs)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass

    server = Server(("127.0.0.1", 0), Quiet)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}/", cert
    server.shutdown()
    server.server_close()


def test_a_certificate_that_cannot_be_verified_says_why_and_how_to_trust_it(tiny, tls_mirror, tmp_path,
                                                                            monkeypatch):
    url, cert = tls_mirror
    cfg = tiny.write_config(tmp_path / "c.toml", url)
    res = cli("download", "--config", cfg, "--data-dir", tmp_path / "d", "-q")
    assert error_line(res) == (
        f"could not download {TRAIN_IMAGES} from any mirror: {url}: its TLS certificate could not be verified "
        "(self-signed certificate); if you trust this server, point REQUESTS_CA_BUNDLE at its CA certificate "
        "(a .pem file). Check the network, and the url of the tiny dataset in its config's [data] table"
    )
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # the advice, followed
    assert cli("download", "--config", cfg, "--data-dir", tmp_path / "d", "-q").exit_code == 0


# ---------------------------------------------------------------------------
# Files the kernel makes up are never read as mirror files


@pytest.mark.parametrize("target", ["/proc/kmsg", "/proc/version", "/proc/self/status", "/sys/kernel/mm"])
def test_a_mirror_file_of_size_0_such_as_proc_kmsg_is_never_read(tiny, tmp_path, target):
    if not os.path.exists(target):
        pytest.skip(f"{target} is not on this system")
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / (TRAIN_IMAGES + ".gz")).symlink_to(target)
    res = cli("download", "--config", tiny.write_config(tmp_path / "c.toml", folder), "--data-dir", tmp_path / "d",
              "-q")
    error = error_line(res)
    path = folder / (TRAIN_IMAGES + ".gz")
    assert error.startswith(f"could not download {TRAIN_IMAGES} from any mirror: {folder}: "), error
    assert (f"{path} has a size of 0 (an empty file, or one the kernel makes up, as in /proc); not read" in error
            or f"{path} is not a regular file" in error or f"cannot open {path}" in error), error


def test_a_file_starting_like_the_kernels_log_is_not_called_an_html_page(tiny, tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / (TRAIN_IMAGES + ".gz")).write_bytes(b"<6>[    0.000000] Linux version 6.1\n" * 10)
    res = cli("download", "--config", tiny.write_config(tmp_path / "c.toml", folder), "--data-dir", tmp_path / "d",
              "-q")
    assert error_line(res) == (
        f"could not download {TRAIN_IMAGES} from any mirror: {folder}: not an IDX file (magic number 3c363e5b does "
        "not start with 0000). Check the network, and the url of the tiny dataset in its config's [data] table"
    )
