from __future__ import annotations

import socket

import pytest
from fakes import Mirror, tiny_dataset

from mlecli.download import HttpPolicy

FAST = HttpPolicy(connect_timeout=2.0, read_timeout=1.0, retries=3, backoff=0.01, max_wait=5.0)


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Tests never touch the internet: refuse any connection that is not to 127.0.0.1."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test tried to reach {address}: tests never touch the internet")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


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
