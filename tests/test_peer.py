"""A mirror driven by hypothesis: whatever it answers, a download ends in one of two ways.

Each example scripts the mirror's first answers (status, Content-Length right, wrong,
absent or in non-ASCII digits, Content-Range, Retry-After, ETag, Content-Encoding,
redirects including loops and malformed Locations, chunked bodies, oversized or
malformed headers; bodies right, truncated, extended, wrong, HTML, re-compressed, a
small gzip bomb), after which it answers healthily. `ensure_dataset` must then end
either with the four verified files cached, or with one MlecliError line and the cache
as it was before (plus, at most, whole verified files); never a traceback, never an
unverified file under a final name, never later than the budgets allow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from fakes import (
    PEER_BODIES,
    PEER_ENCODINGS,
    PEER_ETAGS,
    PEER_EXTRA,
    PEER_LENGTHS,
    PEER_LOCATIONS,
    PEER_RANGES,
    PEER_RETRY_AFTER,
    PEER_STATUS,
    Mirror,
    Peer,
    send_raw,
    tiny_dataset,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlecli.data.cache import dataset_dir, ensure_dataset, load_split
from mlecli.data.download import wire_bound
from mlecli.data.http import HttpPolicy, content_range, header_int, retry_after
from mlecli.safe.errors import MlecliError

TINY = tiny_dataset(n_train=60, n_test=20, seed=7)
POLICY = HttpPolicy(connect_timeout=0.5, read_timeout=0.3, retries=3, backoff=0.01, max_wait=0.05)
# Four files, each within its budget at each of (at most) two mirrors.
BOUND = 2 * sum(POLICY.budget(wire_bound(len(c))) for c in TINY.contents.values())

answers = st.fixed_dictionaries({
    "status": st.sampled_from(PEER_STATUS),
    "body": st.sampled_from(PEER_BODIES),
    "length": st.sampled_from(PEER_LENGTHS),
    "range": st.sampled_from(PEER_RANGES),
    "retry_after": st.sampled_from(PEER_RETRY_AFTER),
    "etag": st.sampled_from(PEER_ETAGS),
    "encoding": st.sampled_from(PEER_ENCODINGS),
    "location": st.sampled_from(PEER_LOCATIONS),
    "chunked": st.booleans(),
    "extra": st.sampled_from(PEER_EXTRA),
    "rng": st.integers(0, 1 << 20),
})
PEER = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def peer_server():
    """The scripted peer, and a healthy mirror to fall back on."""
    files = {**{f"{n}.gz": c for n, c in TINY.contents.items()}, **TINY.contents}
    peer = Peer(files)
    mirror = Mirror(TINY.gz_files(), behave=lambda h, name, data, n: peer.behave(h, name, data, n)).start()
    peer.bind(mirror)
    healthy = Mirror(TINY.gz_files()).start()
    yield peer, mirror, healthy
    mirror.stop()
    healthy.stop()


@pytest.fixture(scope="module")
def complete_cache(peer_server, tmp_path_factory):
    peer, mirror, _ = peer_server
    peer.script = []
    data_dir = tmp_path_factory.mktemp("complete")
    ensure_dataset(TINY.spec((mirror.url,)), data_dir, policy=POLICY)
    return data_dir


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@PEER
@given(script=st.lists(answers, min_size=1, max_size=6), start=st.sampled_from(["empty", "complete"]),
       fallback=st.booleans())
def test_any_peer_ends_in_a_verified_cache_or_one_error_line_with_the_cache_as_before(
        peer_server, complete_cache, script, start, fallback):
    peer, mirror, healthy = peer_server
    spec = TINY.spec((mirror.url, healthy.url) if fallback else (mirror.url,))
    root = Path(tempfile.mkdtemp(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    try:
        data_dir = root / "data"
        if start == "complete":
            shutil.copytree(complete_cache, data_dir)
        folder = dataset_dir(spec, data_dir)
        before = files_in(folder) if folder.exists() else {}
        peer.script, mirror.counts = script, {}
        peer.bind(mirror)
        t0 = time.monotonic()
        try:
            reports = ensure_dataset(spec, data_dir, policy=POLICY, force=start == "complete")
        except MlecliError as exc:
            msg = str(exc)
            event(f"refused: {type(exc).__name__}")
            assert msg.isprintable() and "\n" not in msg, msg
            after = files_in(folder) if folder.exists() else {}
            for name, data in before.items():
                assert after.get(name) == data, f"{name} changed although the download failed: {msg}"
            for name, data in after.items():
                top = name.split("/")[0]
                assert not name.endswith(".tmp"), name
                if top == "raw":
                    assert data == TINY.contents[name[4:]], f"{name} is not verified"
                elif top == "partial":
                    assert len(data) <= wire_bound(max(map(len, TINY.contents.values()))), name
        else:
            event("cached")
            assert [r.verified for r in reports] == [True] * 4
            for r in reports:
                assert r.path.read_bytes() == TINY.contents[r.path.name]
            assert load_split(spec, data_dir, "train") is not None
            assert not (folder / "partial").exists()
        assert time.monotonic() - t0 < BOUND
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------
# The header readers alone: any text, never an exception, only ASCII digits are numbers

@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.none(), st.text(max_size=40), st.from_regex(r"\s*[0-9\uff10-\uff19\u00b2\u0660-\u0669]{1,30}\s*")))
def test_numeric_headers_are_ascii_digits_or_nothing(value):
    n = header_int(value)
    assert n is None or (value.strip(" \t").isascii() and n == int(value.strip(" \t")) and n < 10**18)
    wait = retry_after(value)
    assert wait is None or wait >= 0
    rng = content_range(value)
    assert rng is None or (0 <= rng[0] <= rng[1] and (rng[2] is None or rng[1] < rng[2]))


@pytest.mark.parametrize("value, expected", [
    ("123", 123), (" 7 ", 7), ("\uff13", None), ("\u00b2", None), ("-1", None), ("1e3", None), ("9" * 19, None),
    ("", None), (None, None), ("1 2", None), ("0x10", None),
])
def test_header_int_examples(value, expected):
    assert header_int(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("bytes 10-19/20", (10, 19, 20)), ("bytes 0-0/*", (0, 0, None)), ("bytes 10-9/20", None),
    ("bytes 10-20/20", None), ("bytes \uff11-2/3", None), ("bytes=0-", None), ("items 0-1/2", None), (None, None),
])
def test_content_range_examples(value, expected):
    assert content_range(value) == expected


# ---------------------------------------------------------------------------
# Two probes that broke before, as examples


def test_a_content_length_in_non_ascii_digits_is_refused_not_misread(mirrors, tmp_path):
    # int("３") is 3: http.client would read three bytes and call the file complete.
    bad = mirrors(TINY.gz_files(), behave=lambda h, name, data, n: send_raw(
        h, "HTTP/1.1 200 OK\r\nContent-Length: \uff13\r\n\r\n".encode(), data))
    good = mirrors(TINY.gz_files())
    logs = []
    ensure_dataset(TINY.spec((bad.url, good.url)), tmp_path, policy=POLICY, log=logs.append)
    name = "train-images-idx3-ubyte"
    assert f"{name}: {bad.url} failed (the server sent an invalid Content-Length '\uff13'); trying the next mirror" in logs


def test_a_retry_after_in_non_ascii_digits_is_ignored_for_the_backoff(mirrors, tmp_path):
    m = mirrors(TINY.gz_files(), behave=lambda h, name, data, n: n == 0 and send_raw(
        h, "HTTP/1.1 503 Busy\r\nRetry-After: \u00b2\r\nContent-Length: 0\r\n\r\n".encode()))
    logs = []
    reports = ensure_dataset(TINY.spec((m.url,)), tmp_path, policy=POLICY, log=logs.append)
    assert [r.verified for r in reports] == [True] * 4
    assert f"{m.url}train-images-idx3-ubyte.gz: HTTP 503; retrying in 0.0 s (1/3)" in logs
