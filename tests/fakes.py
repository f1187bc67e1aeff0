"""Test helpers: small generated IDX datasets and real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import decimal
import gzip
import hashlib
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlecli.data.datasets import MNIST_FILES, ROLES, Dataset
from mlecli.data.idx import idx_bytes


def make_digits(n: int, seed: int, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """n images whose bright stripe position depends on the digit: learnable, and tiny."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, side, side)).astype(np.uint8)
    for i, d in enumerate(labels):
        row = 2 + int(d) * (side - 4) // 10
        images[i, row : row + 2, 4 : side - 4] = 200 + int(d) * 5
        if d % 2:
            images[i, 4 : side - 4, side // 2] = 230
    return images, labels


@dataclass
class TinyDataset:
    """Decompressed IDX content of four files, plus the Dataset that pins their hashes."""

    contents: dict[str, bytes]  # file name (no .gz) -> IDX bytes
    arrays: dict[str, np.ndarray]  # role -> array

    def spec(self, mirrors: tuple[str, ...], name: str = "tiny", verified: bool = True) -> Dataset:
        sha = {r: hashlib.sha256(self.contents[MNIST_FILES[r]]).hexdigest() for r in ROLES} if verified else {}
        sizes = {r: len(self.contents[MNIST_FILES[r]]) for r in ROLES} if verified else {}
        return Dataset(name=name, mirrors=mirrors, files=dict(MNIST_FILES), sha256=sha, sizes=sizes)

    def write_config(self, path: Path, url: str, extra: str = "") -> Path:
        """A config training on this dataset from `url`, its hashes pinned; `extra` is more TOML."""
        sha = ", ".join(f'{k} = "{v}"' for k, v in self.spec(()).sha256.items())
        head = f'[data]\ndataset = "tiny"\nurl = "{url}"\nsha256 = {{ {sha} }}\n'
        path.write_text(head + extra)
        return path

    def gz_files(self, **gzip_kw) -> dict[str, bytes]:
        return {f"{n}.gz": gzip.compress(c, mtime=0, **gzip_kw) for n, c in self.contents.items()}

    def raw_files(self) -> dict[str, bytes]:
        return {n: c for n, c in self.contents.items()}

    def write_folder(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.gz_files().items():
            (folder / name).write_bytes(data)
        return folder


def tiny_dataset(n_train: int = 300, n_test: int = 100, seed: int = 0) -> TinyDataset:
    tr_x, tr_y = make_digits(n_train, seed)
    te_x, te_y = make_digits(n_test, seed + 1)
    arrays = {"train-images": tr_x, "train-labels": tr_y, "test-images": te_x, "test-labels": te_y}
    contents = {MNIST_FILES[r]: idx_bytes(a) for r, a in arrays.items()}
    return TinyDataset(contents, arrays)


def exactly_positive(z: float, t: float) -> bool:
    """σ(z) ≥ t in exact arithmetic, worked out another way than mlecli does it (by exp, not
    ln): 1 / (1 + e^-z) ≥ t ⇔ t · e^-z ≤ 1 − t, in decimal to 120 digits beyond z's own (e^-z of a
    z as small as 5e-324 differs from 1 in its 324th digit)."""
    digits = 120 + (max(0, -math.floor(math.log10(abs(z)))) if z else 0)
    with decimal.localcontext(decimal.Context(prec=digits)):
        dt = decimal.Decimal(t)
        return dt * (-decimal.Decimal(z)).exp() <= 1 - dt


def rewrite_npz(src: Path, dst: Path | None = None, *, meta: dict | None = None, replace: dict | None = None,
                drop: tuple[str, ...] = ()) -> Path:
    """Copy a checkpoint's arrays to `dst` (default: over `src`), merging `meta` into its JSON
    meta record, replacing the arrays in `replace` and leaving out those in `drop`."""
    with np.load(src, allow_pickle=False) as z:
        content = {k: z[k] for k in z.files if k not in drop}
    if meta:
        content["meta"] = np.array(json.dumps({**json.loads(str(content["meta"][()])), **meta}))
    content.update(replace or {})
    dst = dst or src
    np.savez(dst, **content)
    return dst


def copy_run_without_evaluations(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    for p in dst.glob("eval-*.json"):
        p.unlink()
    return dst


# ---------------------------------------------------------------------------
# mlecli as a separate process (to kill it, signal it, race it)


def mlecli_process(*args, **popen) -> subprocess.Popen:
    """`python -m mlecli ARGS…` started, its output piped, unbuffered."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **popen.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "mlecli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **popen)


def wait_for(path: Path, proc, timeout: float = 60) -> None:
    """Until `path` exists; fails if `proc` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def kill_once(path: Path, proc) -> None:
    """kill -9 `proc` as soon as `path` appears."""
    wait_for(path, proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def array_bytes(path: Path) -> dict[str, bytes]:
    """The bytes of each array of a checkpoint but its meta record."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].tobytes() for k in z.files if k != "meta"}


# ---------------------------------------------------------------------------
# HTTP


@dataclass
class Request:
    path: str
    headers: dict[str, str]


@dataclass
class Mirror:
    """A real HTTP server on 127.0.0.1 serving `files` with a chosen misbehaviour.

    `behave(handler, name, data, n)` decides the answer to the n-th request (0-based)
    for a file; returning True means it answered, False falls through to a healthy,
    Range-capable answer.
    """

    files: dict[str, bytes]
    behave: Callable | None = None
    ranges: bool = True
    requests: list[Request] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)

    def start(self) -> Mirror:
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("/")[-1]
                mirror.requests.append(Request(self.path, dict(self.headers)))
                n = mirror.counts.get(name, 0)
                mirror.counts[name] = n + 1
                data = mirror.files.get(name)
                try:
                    if mirror.behave is not None and mirror.behave(self, name, data, n):
                        return
                    if data is None:
                        return send(self, 404, b"not found")
                    serve(self, data, ranges=mirror.ranges)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                # A client that hangs up mid-answer is part of these tests' weather; keep
                # the server quiet (the default prints to stderr, which the CLI tests read).
                mirror.errors.append(sys.exc_info()[1])

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/data/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def hits(self) -> int:
        return len(self.requests)


def send(h, status: int, body: bytes, headers: dict[str, str] | None = None) -> bool:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)
    return True


def serve(h, data: bytes, ranges: bool = True) -> bool:
    """A healthy answer, honouring `Range: bytes=N-` when `ranges`."""
    rng = h.headers.get("Range")
    if ranges and rng and rng.startswith("bytes="):
        start = int(rng[6:].split("-")[0])
        if start >= len(data):
            return send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
        return send(
            h, 206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "ETag": '"v1"'}
        )
    headers = {"ETag": '"v1"'}
    if ranges:
        headers["Accept-Ranges"] = "bytes"
    return send(h, 200, data, headers)


def drop_midway(h, data: bytes, fraction: float = 0.5, headers: dict[str, str] | None = None) -> bool:
    """Promise the whole body, send part of it, then close the connection (the headers:
    an ETag and Accept-Ranges, unless given)."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    for k, v in ({"ETag": '"v1"', "Accept-Ranges": "bytes"} if headers is None else headers).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data[: int(len(data) * fraction)])
    h.wfile.flush()
    h.close_connection = True
    h.connection.shutdown(2)
    return True


def stall(h, data: bytes, seconds: float) -> bool:
    """Send headers and a little of the body, then go silent for `seconds`."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data[:10])
    h.wfile.flush()
    time.sleep(seconds)
    h.close_connection = True
    return True


def trickle(h, data: bytes, chunk: int = 8192, pause: float = 0.02) -> bool:
    """A healthy but slow answer (Range honoured), `chunk` bytes every `pause` seconds."""
    start = 0
    rng = h.headers.get("Range")
    if rng and rng.startswith("bytes="):
        start = int(rng[6:].split("-")[0])
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
        h.send_response(200)
    h.send_header("Content-Length", str(len(data) - start))
    h.send_header("ETag", '"v1"')
    h.end_headers()
    for i in range(start, len(data), chunk):
        h.wfile.write(data[i : i + chunk])
        h.wfile.flush()
        time.sleep(pause)
    return True


def send_raw(h, head: bytes, body: bytes = b"") -> bool:
    """Write an answer byte for byte (any status line and headers, valid HTTP or not), then hang up."""
    h.wfile.write(head + body)
    h.wfile.flush()
    h.close_connection = True
    return True


def trickle_body(h, data: bytes, pause: float, step: int = 1, seconds: float = 30.0) -> bool:
    """Headers promising the whole file, then `step` bytes every `pause` seconds: each read
    is answered well within any read timeout, the file never (for `seconds`) arrives."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.flush()
    end = time.monotonic() + seconds
    for i in range(0, len(data), step):
        if time.monotonic() > end:
            break
        h.wfile.write(data[i : i + step])
        h.wfile.flush()
        time.sleep(pause)
    h.close_connection = True
    return True


def trickle_headers(h, pause: float, seconds: float = 30.0) -> bool:
    """A status line, then one made-up header line every `pause` seconds, never ending the headers."""
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    h.wfile.flush()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        h.wfile.write(b"X-Slow-%d: %d\r\n" % (n, n))
        h.wfile.flush()
        n += 1
        time.sleep(pause)
    h.close_connection = True
    return True


# ---------------------------------------------------------------------------
# A scripted peer: answers drawn by hypothesis, rendered byte for byte


PEER_STATUS = [200, 200, 200, 206, 301, 302, 307, 308, 100, 204, 403, 404, 416, 429, 500, 503]
PEER_BODIES = ["gz", "raw", "truncated", "extra", "wrong", "html", "empty", "bigger", "bomb", "recompressed"]
PEER_LENGTHS = ["right", "right", "absent", "short", "long", "unicode", "superscript", "negative", "huge", "garbage",
                "double"]
PEER_RANGES = [None, "right", "right", "wrong-start", "malformed", "unicode", "beyond", "star"]
PEER_RETRY_AFTER = [None, "0", "1", "\uff13", "\u00b2", "-1", "9" * 25, "Wed, 21 Oct 2015 07:28:00 GMT",
                    "Fri, 31 Dec 9999 23:59:59 GMT", "soon", "1e3", " 0 "]
PEER_ETAGS = [None, '"v1"', '"v2"', "W/\"x\"", "e" * 5000, "bad\x01tag", "\u00e9t\u00e9"]
PEER_ENCODINGS = [None, "gzip", "identity", "x-gzip", "br", "deflate", "gzip, gzip", "\u00fc"]
PEER_LOCATIONS = [None, "self", "next", "relative", "malformed", "ftp", "empty", "nonascii", "port", "spaces",
                  "far", "scheme-relative"]
PEER_EXTRA = [None, None, "huge-header", "many-headers", "bad-status-line", "hang-up", "http/1.0"]


def peer_body(kind: str, content: bytes, rng: int) -> bytes:
    """The bytes of a body of `kind` for a file whose decompressed content is `content`."""
    gz = gzip.compress(content, mtime=0)
    if kind == "gz":
        return gz
    if kind == "raw":
        return content
    if kind == "recompressed":
        return gzip.compress(content, compresslevel=1, mtime=7)
    if kind == "truncated":
        return gz[: rng % max(1, len(gz))]
    if kind == "extra":
        return gz + bytes([rng % 256 or 1]) * (1 + rng % 100)
    if kind == "wrong":
        flipped = bytearray(content)
        flipped[rng % len(flipped)] ^= 1 << (rng % 8)
        return gzip.compress(bytes(flipped), mtime=0)
    if kind == "html":
        return b"<!DOCTYPE html><html><body>Not here</body></html>"
    if kind == "empty":
        return b""
    if kind == "bigger":  # a valid header for more items than the real file, then the real data
        return gzip.compress(content[:4] + (int.from_bytes(content[4:8], "big") + 1 + rng).to_bytes(4, "big")
                             + content[8:], mtime=0)
    if kind == "bomb":  # the real content, then a megabyte of zeros per member, a few members
        zeros = gzip.compress(b"\0" * (1 << 20), mtime=0)
        return gz + zeros * (1 + rng % 4)
    raise AssertionError(kind)


def render_answer(answer: dict, name: str, content: bytes | None, request: dict[str, str]) -> bytes:
    """An HTTP answer, byte for byte, as `answer` (one draw of the peer's strategy) describes it."""
    extra = answer["extra"]
    if extra == "hang-up":
        return b""
    if extra == "bad-status-line":
        return b"HELLO THERE\r\n\r\n"
    status = answer["status"]
    if content is None:
        body = b"no such file"
        status = 404
    else:
        body = peer_body(answer["body"], content, answer["rng"])
    headers: list[tuple[str, str]] = []
    start = 0
    rng_header = request.get("Range", "")
    if rng_header.startswith("bytes=") and answer["range"] is not None:
        try:
            start = int(rng_header[6:].split("-")[0])
        except ValueError:
            start = 0
    if status == 206 and answer["range"] is not None:
        total = len(body)
        first = min(start, total)
        form = answer["range"]
        if form == "wrong-start":
            first = max(0, first - 1 - answer["rng"] % 5)
        value = {
            "right": f"bytes {first}-{max(first, total - 1)}/{total}",
            "wrong-start": f"bytes {first}-{max(first, total - 1)}/{total}",
            "malformed": f"bytes={first}-",
            "unicode": f"bytes \uff10-{total - 1}/{total}",
            "beyond": f"bytes {first}-{total + 5}/{total}",
            "star": f"bytes {first}-{max(first, total - 1)}/*",
        }[form]
        headers.append(("Content-Range", value))
        body = body[first:]
    location = answer["location"]
    if status in (301, 302, 307, 308) and location is not None:
        here = f"/data/{name}"
        headers.append(("Location", {
            "self": here, "next": f"/data/again/{name}", "relative": f"../data/x/{name}",
            "malformed": "http://[::1", "ftp": f"ftp://127.0.0.1/{name}", "empty": "", "nonascii": f"/d\u00e9/{name}",
            "port": f"http://127.0.0.1:99999/{name}", "spaces": f"/data/a b/{name}",
            "far": f"http://mirror.invalid/{name}", "scheme-relative": f"//127.0.0.1:1/{name}",
        }[location]))
    if answer["retry_after"] is not None:
        headers.append(("Retry-After", answer["retry_after"]))
    if answer["etag"] is not None:
        headers.append(("ETag", answer["etag"]))
    if answer["encoding"] is not None:
        headers.append(("Content-Encoding", answer["encoding"]))
    chunked = answer["chunked"]
    n = len(body)
    length = {
        "right": str(n), "absent": None, "short": str(max(0, n - 1 - answer["rng"] % 7)), "long": str(n + 10),
        "unicode": "".join(chr(0xFF10 + int(c)) for c in str(n)), "superscript": "\u00b2" * len(str(n)),
        "negative": f"-{n}", "huge": "9" * 40, "garbage": "lots", "double": f"{n}, {n}",
    }[answer["length"]]
    if length is not None:
        headers.append(("Content-Length", length))
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        size_line = b"zz" if answer["rng"] % 5 == 0 else b"%x" % n
        body = (size_line + b"\r\n" + body + b"\r\n0\r\n\r\n") if n else b"0\r\n\r\n"
    if extra == "huge-header":
        headers.append(("X-Huge", "h" * 70_000))
    if extra == "many-headers":
        headers += [(f"X-{i}", str(i)) for i in range(150)]
    version = "HTTP/1.0" if extra == "http/1.0" else "HTTP/1.1"
    head = f"{version} {status} Whatever\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "Connection: close\r\n\r\n"
    return head.encode("utf-8") + (b"" if status in (100, 204) else body)


@dataclass
class Peer:
    """A mirror whose first answers follow a script (one `render_answer` draw each), then are healthy."""

    files: dict[str, bytes]  # served name (with .gz or not) -> decompressed content
    script: list[dict] = field(default_factory=list)

    def behave(self, h, name: str, data: bytes | None, n: int) -> bool:
        served = sum(self.counts.values()) - 1
        if served >= len(self.script):
            return False
        answer = self.script[served]
        return send_raw(h, render_answer(answer, name, self.files.get(name), dict(h.headers)))

    def bind(self, mirror: Mirror) -> Peer:
        self.counts = mirror.counts
        return self
