from __future__ import annotations

import socket
from pathlib import Path

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
        from mlecli.config import _toml_value

        lines = []
        for section, values in body.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return make
