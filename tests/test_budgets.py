"""Time budgets of a download: no mirror holds a file longer than its budget, however it trickles.

Each test serves from a real HTTP server on 127.0.0.1 that answers every read well
within the read timeout, yet never delivers the file; the download must end within
the bound docs/data.md promises, with one line saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from fakes import send, trickle_body, trickle_headers

from mlecli.data.cache import ensure_dataset
from mlecli.data.datasets import MNIST_FILES
from mlecli.data.download import wire_bound
from mlecli.data.http import HttpPolicy, Watchdog
from mlecli.safe.errors import DownloadError

TRAIN_IMAGES = MNIST_FILES["train-images"]
# `--timeout 0.5`; the minimum rate at its default.
POLICY = HttpPolicy(connect_timeout=0.5, read_timeout=0.5, retries=3, backoff=0.01)
TICK = Watchdog.TICK


def fetch_failing(spec, tmp_path, policy=POLICY) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        ensure_dataset(spec, tmp_path, policy=policy)
    return str(err.value), time.monotonic() - t0


@pytest.mark.parametrize("pause", [0.05, 0.45])
def test_a_body_trickling_byte_by_byte_is_given_up_two_read_timeouts_after_connecting(tiny, mirrors, tmp_path, pause):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and trickle_body(h, data, pause))
    msg, seconds = fetch_failing(tiny.spec((m.url,)), tmp_path)
    # The rate counts after two read timeouts; the watchdog looks every TICK.
    assert seconds < POLICY.rate_grace + 2 * TICK + 0.5
    assert m.counts[TRAIN_IMAGES + ".gz"] == 1  # a mirror too slow is not retried
    assert f"{m.url}: the server sent " in msg and "slower than the minimum of 50 kB/s" in msg


@pytest.mark.parametrize("pause", [0.05, 0.45])
def test_headers_trickling_line_by_line_are_given_up_two_read_timeouts_after_connecting(tiny, mirrors, tmp_path, pause):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: trickle_headers(h, pause))
    msg, seconds = fetch_failing(tiny.spec((m.url,)), tmp_path)
    assert seconds < POLICY.rate_grace + 2 * TICK + 0.5
    assert f"{m.url}: no complete answer within 1 s of connecting (its headers trickled in)" in msg


def test_a_mirror_just_above_the_minimum_rate_is_not_cut_short(tiny, mirrors, tmp_path):
    # 8 KiB every 0.05 s is about 160 kB/s: slow, honest, and well above 50 kB/s.
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and trickle_body(h, data, 0.05, step=8192))
    reports = ensure_dataset(tiny.spec((m.url,)), tmp_path, policy=POLICY)
    assert [r.verified for r in reports] == [True] * 4


def test_retries_end_when_the_next_wait_would_pass_the_files_budget(tiny, mirrors, tmp_path):
    policy = HttpPolicy(connect_timeout=0.05, read_timeout=0.05, retries=13, backoff=0.01, max_wait=60.0, min_rate=1e9)
    budget = policy.budget(wire_bound(len(tiny.contents[TRAIN_IMAGES])))
    assert 2.1 < budget < 2.11  # 14 attempts of 0.15 s, and 0.3 MB at 1 GB/s
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: send(h, 503, b"busy", {"Retry-After": "1"}))
    msg, seconds = fetch_failing(tiny.spec((m.url,)), tmp_path, policy)
    assert seconds < budget
    assert m.counts[TRAIN_IMAGES + ".gz"] == 3  # at 0, 1 and 2 s; a third wait would end past the budget
    assert "HTTP 503; waiting 1.0 s more would pass the file's budget of 2 s at this mirror" in msg


def test_the_budget_of_a_file_grows_with_its_size_and_the_timeout():
    p = HttpPolicy(connect_timeout=10, read_timeout=30, retries=3, min_rate=50_000)
    assert p.budget(0) == 4 * (10 + 2 * 30)
    assert p.budget(10_000_000) == 4 * 70 + 200  # 10 MB at 50 kB/s


def test_what_the_user_sees_when_a_mirror_trickles(tiny, mirrors, tmp_path):
    m = mirrors(tiny.gz_files(), behave=lambda h, name, data, n: data and trickle_body(h, data, 0.3))
    cfg = tiny.write_config(tmp_path / "c.toml", m.url)
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "mlecli", "download", "--config", str(cfg), "--data-dir", str(tmp_path / "d"),
         "--timeout", "1", "-q"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seconds = time.monotonic() - t0
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(
        f"Error: could not download {TRAIN_IMAGES} from any mirror: {m.url}: the server sent "
    )
    assert "slower than the minimum of 50 kB/s (--min-rate). Check the network" in res.stderr
    assert seconds < 2 * 1 + 2 * TICK + 3  # two read timeouts, the watchdog, Python's start-up
