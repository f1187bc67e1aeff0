from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from fakes import Mirror, tiny_dataset

from mlecli.data.http import HttpPolicy

FAST = HttpPolicy(connect_timeout=2.0, read_timeout=1.0, retries=3, backoff=0.01, max_wait=5.0)
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def require(condition: bool, why: str) -> None:
    """Skip a test whose machine lacks something, unless MLECLI_STRICT=1 (as in CI): then fail."""
    if not condition:
        if os.environ.get("MLECLI_STRICT"):
            pytest.fail(f"{why} (MLECLI_STRICT=1 turns this skip into a failure)")
        pytest.skip(why)


@pytest.fixture
def debian_fashion():
    """Debian's re-compressed Fashion-MNIST .gz files, by name."""
    require(DEBIAN_FASHION.is_dir(), f"{DEBIAN_FASHION} is missing: apt-get install dataset-fashion-mnist")
    return {p.name: p.read_bytes() for p in DEBIAN_FASHION.glob("*.gz")}


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (real ENOSPC when full, real EROFS once remounted read-only).

    `tmpfs(name, size)` returns the mount point; `tmpfs.readonly(path)` remounts it.
    Needs root (as CI has); unmounted after the test.
    """
    mounted = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        require(res.returncode == 0, f"cannot mount a tmpfs here ({res.stderr.decode().strip()}): run as root")
        mounted.append(point)
        return point

    def readonly(point: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)

    mount.readonly = readonly
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Tests never touch the internet: refuse any connection that is not to 127.0.0.1,
    and resolve no host name but localhost (no DNS query leaves the machine)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test tried to reach {address}: tests never touch the internet")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    real_getaddrinfo = socket.getaddrinfo

    def local_names_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (tests resolve no names)")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_names_only)


_SIGNALS_AT_START = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


@pytest.fixture(autouse=True)
def signals_as_they_were():
    """Each test starts and ends with SIGINT/SIGTERM handled as when the session began. An
    in-process `mlecli train` (CliRunner, here or in a module fixture) ignores both once its
    run is saved, for the rest of the process: a worker forked after that (test_download's
    pool) would ignore the pool's SIGTERM and never end."""
    for sig, handler in _SIGNALS_AT_START.items():
        signal.signal(sig, handler)
    yield
    for sig, handler in _SIGNALS_AT_START.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def isolated_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MLECLI_DATA_DIR", str(tmp_path / "default-data"))


@pytest.fixture(scope="session")
def tiny():
    return tiny_dataset()


@pytest.fixture
def mirrors():
    """Start Mirror servers with `mirrors(files, behave=..., ranges=...)`; all stopped after the test."""
    started = []

    def start(files, **kw) -> Mirror:
        m = Mirror(files, **kw).start()
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny):
    """The tiny dataset as a local folder of .gz files (an offline mirror)."""
    return tiny.write_folder(tmp_path_factory.mktemp("tiny-mirror"))


@pytest.fixture
def tiny_config(tmp_path, tiny, tiny_folder):
    """Write a config training on the tiny dataset; keyword args override [section] keys."""

    def make(name="tiny-run", **sections) -> Path:
        body = {
            "data": {"dataset": "tiny", "url": str(tiny_folder), "validation": 0.2,
                     "sha256": tiny.spec(()).sha256},
            "task": {"positive": [1, 3, 5, 7, 9], "negative": [0, 2, 4, 6, 8]},
            "model": {"hidden": [16], "dtype": "float32", "seed": 1},
            "train": {"epochs": 4, "batch_size": 16, "learning_rate": 0.05, "seed": 2},
        }
        for section, values in sections.items():
            body[section] = {**body[section], **values}
        from mlecli.run.config import toml_value

        lines = []
        for section, values in body.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return make
