"""`mlecli download` against real HTTP servers on 127.0.0.1 that misbehave on purpose."""

import gzip
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST
from fakes import drop_midway, send, stall

from mlecli.cli import main
from mlecli.data.cache import dataset_dir, ensure_dataset, load_split
from mlecli.data.datasets import MNIST_FILES, ROLES
from mlecli.data.http import HttpPolicy
from mlecli.safe.errors import DownloadError, MlecliError

TRAIN_IMAGES = "train-images-idx3-ubyte"


def fetch(spec, data_dir, **kw):
    logs = []
    kw.setdefault("policy", FAST)
    reports = ensure_dataset(spec, data_dir, log=logs.append, **kw)
    return reports, logs


def cache_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_of(tiny, data_dir: Path) -> Path:
    return dataset_dir(tiny.spec(()), data_dir)


def assert_cached(tiny, data_dir):
    folder = folder_of(tiny, data_dir)
    raw = folder / "raw"
    assert {p.name for p in raw.iterdir()} == set(tiny.contents)
    for fname, content in tiny.contents.items():
        assert (raw / fname).read_bytes() == content
    assert not (folder / "partial").exists(), "no partial files stay behind"
    train = load_split(tiny.spec(()), data_dir, "train")
    np.testing.assert_array_equal(train.images, tiny.arrays["train-images"])
    np.testing.assert_array_equal(train.labels, tiny.arrays["train-labels"])


def test_healthy_mirror_fills_the_cache(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    reports, _ = fetch(tiny.spec((m.url,)), tmp_path)
    assert [r.role for r in reports] == list(ROLES)
    assert all(r.verified and r.source == m.url + MNIST_FILES[r.role] + ".gz" for r in reports)
    assert_cached(tiny, tmp_path)
    assert {r.headers.get("Accept-Encoding") for r in m.requests} == {"identity"}


def test_cached_files_cost_no_network_even_with_every_server_stopped(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    fetch(tiny.spec((m.url,)), tmp_path)
    m.stop()
    reports, _ = fetch(tiny.spec((m.url,)), tmp_path)
    assert [r.source for r in reports] == ["cache"] * 4
    assert m.hits() == 4


def test_503_twice_then_healthy_is_retried(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: n < 2 and send(h, 503, b"busy"))
    _, logs = fetch(tiny.spec((m.url,)), tmp_path)
    assert_cached(tiny, tmp_path)
    assert m.counts[TRAIN_IMAGES + ".gz"] == 3
    assert any("HTTP 503; retrying in" in line for line in logs)


def test_429_honours_retry_after(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: n == 0 and send(h, 429, b"", {"Retry-After": "1"}))
    t0 = time.monotonic()
    _, logs = fetch(tiny.spec((m.url,)), tmp_path)
    assert time.monotonic() - t0 >= 4 * 1.0  # each of the four files waited the full second
    assert any("HTTP 429; retrying in 1.0 s" in line for line in logs)
    assert_cached(tiny, tmp_path)


def test_retry_after_longer_than_we_wait_gives_up_on_that_mirror(tiny, mirrors, tmp_path):
    bad = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: send(h, 429, b"", {"Retry-After": "3600"}))
    good = mirrors(tiny.gz_files())
    fetch(tiny.spec((bad.url, good.url)), tmp_path)
    assert bad.counts[TRAIN_IMAGES + ".gz"] == 1
    assert_cached(tiny, tmp_path)


def test_403_falls_back_to_the_next_mirror_without_retrying(tiny, mirrors, tmp_path):
    bad = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: send(h, 403, b"Forbidden"))
    good = mirrors(tiny.gz_files())
    _, logs = fetch(tiny.spec((bad.url, good.url)), tmp_path)
    assert bad.counts[TRAIN_IMAGES + ".gz"] == 1
    assert f"{TRAIN_IMAGES}: {bad.url} failed (HTTP 403); trying the next mirror" in logs
    assert_cached(tiny, tmp_path)


def test_html_page_with_status_200_is_rejected(tiny, mirrors, tmp_path):
    page = b"<!DOCTYPE html><html><body>Moved</body></html>"
    bad = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: send(h, 200, page))
    good = mirrors(tiny.gz_files())
    _, logs = fetch(tiny.spec((bad.url, good.url)), tmp_path)
    assert any(line.startswith(f"{TRAIN_IMAGES}: {bad.url} failed (served an HTML/XML page") for line in logs)
    assert_cached(tiny, tmp_path)


def test_connection_dropped_mid_body_resumes_with_range(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: n == 0 and data and drop_midway(h, data))
    fetch(tiny.spec((m.url,)), tmp_path)
    assert_cached(tiny, tmp_path)
    second = [r for r in m.requests if r.path.endswith(TRAIN_IMAGES + ".gz")][1]
    half = len(tiny.gz_files()[TRAIN_IMAGES + ".gz"]) // 2
    start = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= half  # what arrived whole before the drop is kept, not fetched again
    assert second.headers["If-Range"] == '"v1"'


def test_without_range_support_the_download_restarts(tiny, mirrors, tmp_path):
    m = mirrors(
        tiny.gz_files(), ranges=False, behave=lambda h, name, data, n: n == 0 and data and drop_midway(h, data)
    )
    fetch(tiny.spec((m.url,)), tmp_path)
    assert_cached(tiny, tmp_path)
    assert m.counts[TRAIN_IMAGES + ".gz"] == 2


def test_wrong_bytes_are_rejected_and_the_next_mirror_is_used(tiny, mirrors, tmp_path):
    lying = {n: gzip.compress(d[:-1] + bytes([d[-1] ^ 1])) for n, d in tiny.contents.items()}
    bad = mirrors({f"{n}.gz": d for n, d in lying.items()})
    good = mirrors(tiny.gz_files())
    _, logs = fetch(tiny.spec((bad.url, good.url)), tmp_path)
    assert any("failed (sha256 mismatch: got" in line for line in logs)
    assert_cached(tiny, tmp_path)


def test_a_server_that_stalls_past_the_read_timeout_is_abandoned(tiny, mirrors, tmp_path):
    slow = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and stall(h, data, 3.0))
    good = mirrors(tiny.gz_files())
    policy = HttpPolicy(connect_timeout=1, read_timeout=0.3, retries=1, backoff=0.01)
    _, logs = fetch(tiny.spec((slow.url, good.url)), tmp_path, policy=policy)
    assert any("the server stalled (read timeout) (gave up after 2 attempts)" in line for line in logs)
    assert_cached(tiny, tmp_path)


def test_uncompressed_files_are_accepted(tiny, mirrors, tmp_path):
    m = mirrors(tiny.raw_files())  # only <name>, so <name>.gz is a 404
    reports, _ = fetch(tiny.spec((m.url,)), tmp_path)
    assert_cached(tiny, tmp_path)
    assert reports[0].source == m.url + TRAIN_IMAGES


def test_uncompressed_bytes_under_the_gz_name_are_accepted(tiny, mirrors, tmp_path):
    m = mirrors({f"{n}.gz": c for n, c in tiny.contents.items()})
    fetch(tiny.spec((m.url,)), tmp_path)
    assert_cached(tiny, tmp_path)


def test_recompressed_gzip_is_accepted(tiny, mirrors, tmp_path):
    recompressed = tiny.gz_files(compresslevel=1)
    recompressed = {n: d[:4] + b"\x01\x02\x03\x04" + d[8:] for n, d in recompressed.items()}  # another mtime too
    assert recompressed != tiny.gz_files()
    m = mirrors(recompressed)
    fetch(tiny.spec((m.url,)), tmp_path)
    assert_cached(tiny, tmp_path)


def test_a_body_far_larger_than_expected_is_refused(tiny, mirrors, tmp_path):
    huge = b"\0" * (3 << 20)
    bad = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: send(h, 200, huge))
    with pytest.raises(DownloadError, match="far more than the expected"):
        fetch(tiny.spec((bad.url,)), tmp_path)
    assert not (folder_of(tiny, tmp_path) / "raw" / TRAIN_IMAGES).exists()


def test_when_every_mirror_fails_one_message_lists_each(tiny, mirrors, tmp_path):
    a = mirrors({}, behave=lambda h, name, data, n: send(h, 403, b"no"))
    b = mirrors({})
    with pytest.raises(DownloadError) as err:
        fetch(tiny.spec((a.url, b.url, "http://127.0.0.1:9/nothing/")), tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"could not download {TRAIN_IMAGES} from any mirror: {a.url}: HTTP 403; ")
    assert f"{b.url}: HTTP 404 for {TRAIN_IMAGES}.gz and HTTP 404 for {TRAIN_IMAGES}; " in msg
    assert "http://127.0.0.1:9/nothing/: connection refused (gave up after 4 attempts)" in msg
    assert msg.endswith("Check the network, and the url of the tiny dataset in its config's [data] table")
    assert "\n" not in msg


def test_an_unknown_host_fails_that_mirror_at_once(tiny, mirrors, tmp_path):
    good = mirrors(tiny.gz_files())
    _, logs = fetch(tiny.spec(("http://no-such-host.invalid/mnist/", good.url)), tmp_path)
    assert f"{TRAIN_IMAGES}: http://no-such-host.invalid/mnist/ failed (host name not found); trying the next mirror" in logs
    assert not any("retrying" in line for line in logs)
    assert_cached(tiny, tmp_path)


# What a download catches: what a peer or the network can raise (http.peer_errors) is that
# mirror's failure, one line, and the next mirror is tried; anything else is a bug and propagates.

BUGS = {
    "the request": ("urllib3.connectionpool.HTTPConnectionPool.urlopen",
                    ModuleNotFoundError("No module named 'zstandard'", name="zstandard")),
    "the body": ("urllib3.response.HTTPResponse.read1", AttributeError("'NoneType' object has no attribute 'recv'")),
}


@pytest.mark.parametrize("where", BUGS)
def test_a_bug_inside_a_download_propagates_as_itself_and_no_other_mirror_is_tried(tiny, mirrors, tmp_path,
                                                                                    monkeypatch, where):
    m = mirrors(tiny.gz_files())
    offline = tiny.write_folder(tmp_path / "offline")  # would deliver every file, if it were tried
    target, bug = BUGS[where]

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(target, broken)
    logs = []
    with pytest.raises(type(bug)) as err:
        ensure_dataset(tiny.spec((m.url, str(offline))), tmp_path / "d", policy=FAST, log=logs.append)
    assert err.value is bug
    assert logs == []  # no "failed (…); trying the next mirror", no "retrying"
    assert not (folder_of(tiny, tmp_path / "d") / "raw" / TRAIN_IMAGES).exists()


def _peer_errors():
    from mlecli.data.http import peer_errors

    return peer_errors()


# The line each type in peer_errors() becomes (network_reason), after the retries it earns.
PEER_FAILURES = {
    "RequestException": "the connection dropped mid-file (gave up after 4 attempts)",
    "HTTPError": "the answer could not be read (HTTPError)",
    "HTTPException": "the answer could not be read (HTTPException)",
    "OSError": "the connection dropped mid-file (gave up after 4 attempts)",
    "UnicodeError": "the server's answer is not valid HTTP (UnicodeError)",
    "UnreadableAnswer": "the answer could not be read (UnreadableAnswer)",
}


@pytest.mark.parametrize("error", _peer_errors(), ids=lambda t: t.__name__)
def test_each_error_a_peer_or_the_network_can_raise_is_one_mirror_failure_and_the_next_mirror_is_tried(
        tiny, mirrors, tmp_path, monkeypatch, error):
    m = mirrors(tiny.gz_files())
    offline = tiny.write_folder(tmp_path / "offline")

    def broken(*args, **kwargs):
        raise error("raised reading the body")

    monkeypatch.setattr("urllib3.response.HTTPResponse.read1", broken)
    _, logs = fetch(tiny.spec((m.url, str(offline))), tmp_path)
    assert f"{TRAIN_IMAGES}: {m.url} failed ({PEER_FAILURES[error.__name__]}); trying the next mirror" in logs
    assert_cached(tiny, tmp_path)


def test_a_redirect_requests_cannot_read_ahead_is_that_mirrors_failure(tiny, mirrors, tmp_path):
    """requests reads a redirect's answer ahead even when it does not follow it: the
    ValueError urlsplit raises for this Location is the peer's, not a bug."""
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: send(h, 301, b"", {"Location": "http://[::1"}))
    offline = tiny.write_folder(tmp_path / "offline")
    _, logs = fetch(tiny.spec((m.url, str(offline))), tmp_path)
    assert f"{TRAIN_IMAGES}: {m.url} failed (the answer could not be read (ValueError)); trying the next mirror" in logs
    assert_cached(tiny, tmp_path)


def test_failed_forced_redownload_leaves_the_cache_intact(tiny, mirrors, tmp_path):
    good = mirrors(tiny.gz_files())
    fetch(tiny.spec((good.url,)), tmp_path)
    before = cache_snapshot(folder_of(tiny, tmp_path))
    bad = mirrors({n: b"garbage" for n in tiny.gz_files()})
    with pytest.raises(DownloadError):
        fetch(tiny.spec((bad.url,)), tmp_path, force=True)
    assert {k: v for k, v in cache_snapshot(folder_of(tiny, tmp_path)).items() if not k.startswith("partial/")} == before


def test_force_fetches_again(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    fetch(tiny.spec((m.url,)), tmp_path)
    reports, _ = fetch(tiny.spec((m.url,)), tmp_path, force=True)
    assert all(r.source != "cache" for r in reports)
    assert m.hits() == 8


def test_a_corrupted_cached_file_is_fetched_again(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    fetch(tiny.spec((m.url,)), tmp_path)
    raw = folder_of(tiny, tmp_path) / "raw" / TRAIN_IMAGES
    raw.write_bytes(raw.read_bytes()[:-1] + b"\x01")
    reports, _ = fetch(tiny.spec((m.url,)), tmp_path)
    assert reports[0].source != "cache" and [r.source for r in reports[1:]] == ["cache"] * 3
    assert_cached(tiny, tmp_path)


def test_local_folder_and_file_url_mirrors(tiny, tmp_path):
    folder = tiny.write_folder(tmp_path / "offline")
    fetch(tiny.spec((str(folder),)), tmp_path / "a")
    assert_cached(tiny, tmp_path / "a")
    fetch(tiny.spec((folder.as_uri(),)), tmp_path / "b")
    assert_cached(tiny, tmp_path / "b")


def test_unsupported_url_schemes_are_refused(tiny, tmp_path):
    for url in ("ftp://example.com/mnist/", "gopher://x/", "javascript:alert(1)"):
        with pytest.raises(MlecliError, match=r"unsupported URL scheme .*; use http://, https://, file:// or a local folder"):
            fetch(tiny.spec((url,)), tmp_path)


def test_a_touched_raw_file_is_still_fresh_and_costs_no_network(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    spec = tiny.spec((m.url,))
    fetch(spec, tmp_path)
    raw = folder_of(tiny, tmp_path) / "raw" / TRAIN_IMAGES
    os.utime(raw, ns=(1, 1))  # freshness is decided by content records, not modification times
    assert load_split(spec, tmp_path, "train") is not None
    reports, _ = fetch(spec, tmp_path)
    assert all(r.source == "cache" for r in reports) and m.hits() == 4


def test_mismatched_counts_of_images_and_labels_are_refused(tiny, mirrors, tmp_path):
    from fakes import TinyDataset

    from mlecli.data.idx import idx_bytes

    contents = dict(tiny.contents)
    contents["train-labels-idx1-ubyte"] = idx_bytes(tiny.arrays["train-labels"][:-1])
    broken = TinyDataset(contents, tiny.arrays)
    m = mirrors(broken.gz_files())
    with pytest.raises(MlecliError, match=r"tiny train: 300 images but 299 labels"):
        fetch(broken.spec((m.url,)), tmp_path)


def test_labels_outside_0_to_9_are_refused(tiny, mirrors, tmp_path):
    from fakes import TinyDataset

    from mlecli.data.idx import idx_bytes

    contents = dict(tiny.contents)
    labels = tiny.arrays["test-labels"].copy()
    labels[5] = 11
    contents["t10k-labels-idx1-ubyte"] = idx_bytes(labels)
    broken = TinyDataset(contents, tiny.arrays)
    m = mirrors(broken.gz_files())
    with pytest.raises(DownloadError, match=r"label 11 at index 5 is not a digit 0-9"):
        fetch(broken.spec((m.url,)), tmp_path)


def _download_in_process(args):
    data_dir, spec = args
    ensure_dataset(spec, Path(data_dir), policy=FAST)
    return True


def test_two_downloads_into_one_data_dir_both_succeed(tiny, mirrors, tmp_path):
    slow = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: (time.sleep(0.2), False)[1])
    spec = tiny.spec((slow.url,))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        assert pool.map(_download_in_process, [(str(tmp_path), spec)] * 2) == [True, True]
    assert_cached(tiny, tmp_path)
    assert slow.counts[TRAIN_IMAGES + ".gz"] == 1  # the second waited for the lock, then found it cached


# ---------------------------------------------------------------------------
# Through the command line


def write_config(path: Path, url: str, sha: dict | None) -> Path:
    lines = ["[data]", 'dataset = "tiny"', f'url = "{url}"']
    if sha:
        lines.append("sha256 = { " + ", ".join(f'{k} = "{v}"' for k, v in sha.items()) + " }")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_summary_for_a_custom_dataset(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    cfg = write_config(tmp_path / "tiny.toml", m.url, tiny.spec(()).sha256)
    res = CliRunner().invoke(main, ["download", "--config", str(cfg), "--data-dir", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    raw = folder_of(tiny, tmp_path / "d") / "raw"
    lines = res.stdout.splitlines()
    assert lines[0] == f"tiny: 4 files in {raw}"
    assert lines[1] == f"  train-images-idx3-ubyte       235,216 bytes  verified    from {m.url}train-images-idx3-ubyte.gz"
    assert lines[4] == f"  t10k-labels-idx1-ubyte            108 bytes  verified    from {m.url}t10k-labels-idx1-ubyte.gz"
    res = CliRunner().invoke(main, ["download", "--config", str(cfg), "--data-dir", str(tmp_path / "d")])
    assert res.stdout.splitlines()[1].endswith("verified    already cached")


def test_cli_custom_dataset_without_hashes_is_marked_unverified(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    cfg = write_config(tmp_path / "tiny.toml", m.url, None)
    res = CliRunner().invoke(main, ["download", "--config", str(cfg), "--data-dir", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    digest = hashlib.sha256(tiny.contents[TRAIN_IMAGES]).hexdigest()
    assert "warning: train-images, train-labels, test-images, test-labels of tiny are not pinned" in res.stderr
    assert f'train-images = "{digest}"' in res.stderr.splitlines()[-1]
    assert "UNVERIFIED" in res.stdout.splitlines()[1]
    record = json.loads((dataset_dir(tiny.spec((m.url,), verified=False), tmp_path / "d") / "record.json").read_text())
    assert record["files"][TRAIN_IMAGES] == {
        "sha256": digest, "size": 235216, "source": m.url + TRAIN_IMAGES + ".gz", "mirror": m.url}


def test_cli_failure_is_one_line_and_exit_1(tiny, mirrors, tmp_path):
    m = mirrors({})
    cfg = write_config(tmp_path / "tiny.toml", m.url, tiny.spec(()).sha256)
    res = CliRunner().invoke(main, ["download", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), "-q"])
    assert res.exit_code == 1
    assert res.stderr.startswith(f"Error: could not download {TRAIN_IMAGES} from any mirror: {m.url}: HTTP 404")
    assert res.stderr.count("\n") == 1
    assert res.stdout == ""


def test_cli_refuses_unsupported_mirror_scheme(tmp_path):
    res = CliRunner().invoke(main, ["download", "--mirror", "ftp://x/y/", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--mirror ftp://x/y/': unsupported URL scheme 'ftp'; "
        "use http://, https://, file:// or a local folder"
    )
    assert not (tmp_path / "mnist").exists()


def test_cli_dataset_and_config_together_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["download", "--dataset", "mnist", "--config", str(tmp_path / "x.toml")])
    assert res.exit_code == 2
    assert "give --dataset or --config, not both" in res.stderr


# ---------------------------------------------------------------------------
# Real files made by others: Debian's re-compressed Fashion-MNIST, served on 127.0.0.1

def test_real_fashion_mnist_from_debian_verifies_against_built_in_hashes(debian_fashion, mirrors, tmp_path):
    m = mirrors(debian_fashion)
    res = CliRunner().invoke(
        main, ["download", "--dataset", "fashion-mnist", "--mirror", m.url, "--data-dir", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.count("verified    from " + m.url) == 4
    train = load_split(__import__("mlecli.data.datasets").data.datasets.FASHION_MNIST, tmp_path, "train")
    assert train.images.shape == (60000, 28, 28) and train.labels.shape == (60000,)
    assert np.bincount(train.labels).tolist() == [6000] * 10


def test_a_corrupt_npz_is_rebuilt_from_the_raw_files(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files())
    spec = tiny.spec((m.url,))
    fetch(spec, tmp_path)
    npz = folder_of(tiny, tmp_path) / "train.npz"
    with np.load(npz, allow_pickle=False) as z:
        expected = {k: z[k] for k in z.files}
    from mlecli.safe import npz as npz_reader

    got = npz_reader.read(npz, check_crc=True)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    assert load_split(spec, tmp_path, "train") is None
    m.stop()
    fetch(spec, tmp_path)  # rebuilt from raw/, no network
    assert_cached(tiny, tmp_path)
