"""Fetching one dataset file from an ordered list of mirrors.

Each mirror is an http(s) base URL, a file:// URL or a local folder. A remote file is
streamed to `<name>.part` (resumed with a Range request where the server answers 206),
retried with exponential backoff on connection errors, 429 and 5xx (Retry-After is
honoured), then checked: its decompressed content must have the expected size and
SHA-256 and parse as IDX. Any failure moves on to the next mirror; the reasons are
collected so that the final error can list every mirror tried.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mlecli.errors import DataError, DownloadError, MlecliError
from mlecli.fsutil import atomic_write_text, describe_os_error
from mlecli.idx import gunzip, is_gzip

CHUNK = 1 << 16
# A body may exceed the expected decompressed size by this much before it is refused
# (gzip of random data can grow a little; headers of uncompressed files are exact).
SLACK = 1 << 20
# Ceiling for files of custom datasets whose size is not known in advance.
UNKNOWN_SIZE_LIMIT = 1 << 31


@dataclass(frozen=True)
class HttpPolicy:
    """How patient to be with a server. Times in seconds."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3  # further attempts per URL after the first
    backoff: float = 1.0  # first wait; doubles each retry
    max_wait: float = 60.0  # a longer Retry-After gives up on the mirror


DEFAULT_POLICY = HttpPolicy()


@dataclass(frozen=True)
class Expected:
    """What a file's decompressed content must be: size and sha256, each optional."""

    name: str
    sha256: str | None
    size: int | None
    check: Callable[[bytes, str], None]  # raises DataError if the content is unusable


class MirrorFailed(Exception):
    """One mirror could not deliver one file; `reason` says why, for the final message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


def mirror_location(mirror: str) -> tuple[str, str]:
    """Classify a mirror as ("http", base URL ending in '/') or ("local", folder path)."""
    parts = urlsplit(mirror)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.netloc:
            raise MlecliError(f"mirror {mirror!r} has no host; give a URL like https://host/path/")
        return "http", mirror if mirror.endswith("/") else mirror + "/"
    if scheme == "file":
        return "local", unquote(parts.path)
    if scheme == "" or (len(scheme) == 1 and mirror[1:3] in (":\\", ":/")):
        return "local", mirror
    raise MlecliError(
        f"mirror {mirror!r}: unsupported URL scheme {scheme!r}; use http://, https://, file:// or a local folder"
    )


def verify_content(content: bytes, expected: Expected, source: str) -> str:
    """Check decompressed `content` against `expected`; return its sha256 or raise MirrorFailed."""
    if expected.size is not None and len(content) != expected.size:
        raise MirrorFailed(f"{_looks_like(content)}{len(content)} bytes after decompression, expected {expected.size}")
    digest = hashlib.sha256(content).hexdigest()
    if expected.sha256 is not None and digest != expected.sha256:
        raise MirrorFailed(f"sha256 mismatch: got {digest}, expected {expected.sha256}")
    try:
        expected.check(content, source)
    except DataError as exc:
        raise MirrorFailed(f"{_looks_like(content)}{exc}") from None
    return digest


def _looks_like(content: bytes) -> str:
    head = content[:64].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        return "served an HTML/XML page, not the file: "
    return ""


def decode(data: bytes, expected: Expected, source: str) -> bytes:
    """The IDX content of a fetched file, which may be gzip (any compressor) or raw."""
    limit = expected.size if expected.size is not None else UNKNOWN_SIZE_LIMIT
    try:
        return gunzip(data, source, limit) if is_gzip(data) else data
    except DataError as exc:
        raise MirrorFailed(str(exc).removeprefix(f"{source}: ")) from None


def fetch_from_mirrors(
    mirrors: list[str],
    expected: Expected,
    part_dir: Path,
    *,
    session_factory: Callable[[], object],
    policy: HttpPolicy,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[bytes, str]:
    """Try each mirror in order; return (verified IDX content, URL it came from).

    Raises DownloadError listing every mirror and why it failed.
    """
    failures = []
    session = None
    for mirror in mirrors:
        kind, where = mirror_location(mirror)
        try:
            if kind == "local":
                content, url = _fetch_local(Path(where), expected)
            else:
                if session is None:
                    session = session_factory()
                content, url = _fetch_http(session, where, expected, part_dir, policy, progress, log)
            return content, url
        except MirrorFailed as exc:
            failures.append(f"{mirror}: {exc.reason}")
            if mirror is not mirrors[-1]:
                log(f"{expected.name}: {mirror} failed ({exc.reason}); trying the next mirror")
    tried = "; ".join(failures) if failures else "no mirrors given"
    raise DownloadError(
        f"could not download {expected.name} from any mirror: {tried}. "
        "Check the network, or point `mlecli download --mirror` at a URL or local folder that has the file"
    )


def _candidates(name: str) -> list[str]:
    return [name + ".gz", name]


def _fetch_local(folder: Path, expected: Expected) -> tuple[bytes, str]:
    if not folder.is_dir():
        raise MirrorFailed(f"{folder} is not a folder")
    for candidate in _candidates(expected.name):
        path = folder / candidate
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise MirrorFailed(f"cannot read {path}: {exc.strerror}") from None
            content = decode(data, expected, str(path))
            verify_content(content, expected, str(path))
            return content, str(path)
    raise MirrorFailed(f"neither {expected.name}.gz nor {expected.name} is in {folder}")


def _fetch_http(session, base: str, expected: Expected, part_dir: Path, policy, progress, log) -> tuple[bytes, str]:
    not_found = []
    for candidate in _candidates(expected.name):
        url = base + candidate
        try:
            return _fetch_url(session, url, candidate, expected, part_dir, policy, progress, log), url
        except _NotFound as exc:
            not_found.append(exc.reason)
    raise MirrorFailed(" and ".join(not_found))


class _NotFound(MirrorFailed):
    pass


def _fetch_url(session, url, candidate, expected, part_dir, policy, progress, log) -> bytes:
    part = part_dir / f"{candidate}.part"
    limit = (expected.size + SLACK) if expected.size is not None else UNKNOWN_SIZE_LIMIT
    for fresh_start in (False, True):
        if fresh_start:
            _discard(part)
        resumed = _download(session, url, part, limit, policy, progress, log)
        try:
            data = part.read_bytes()
        except OSError as exc:
            raise MirrorFailed(f"cannot read {part}: {exc.strerror}") from None
        try:
            content = decode(data, expected, url)
            verify_content(content, expected, url)
        except MirrorFailed:
            _discard(part)
            if resumed and not fresh_start:
                # The kept part may have come from another copy of the file; try once whole.
                log(f"{candidate}: resumed download did not verify; downloading it whole again")
                continue
            raise
        _discard(part)
        return content
    raise AssertionError("unreachable")


def _discard(part: Path) -> None:
    for p in (part, _meta_path(part)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict:
    try:
        meta = json.loads(_meta_path(part).read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _download(session, url: str, part: Path, limit: int, policy: HttpPolicy, progress: bool, log) -> bool:
    """Stream `url` into `part`, resuming and retrying; return whether any bytes were resumed."""
    import requests

    resumed_any = False
    reason, reason_wait = "", None
    for attempt in range(policy.retries + 1):
        if attempt:
            wait = policy.backoff * 2 ** (attempt - 1) if reason_wait is None else reason_wait
            log(f"{url}: {reason}; retrying in {wait:.1f} s ({attempt}/{policy.retries})")
            time.sleep(wait)
            reason_wait = None
        try:
            resumed = _attempt(session, url, part, limit, policy, progress)
            return resumed_any or resumed
        except _Retryable as exc:
            reason, reason_wait = exc.reason, exc.wait
            if reason_wait is not None and reason_wait > policy.max_wait:
                raise MirrorFailed(f"{reason}; the server asks to wait {reason_wait:.0f} s, more than {policy.max_wait:.0f}") from None
        except requests.exceptions.Timeout:
            reason = f"no answer within {policy.read_timeout:g} s"
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            reason = _connection_reason(exc)
            if reason == HOST_NOT_FOUND:
                raise MirrorFailed(reason) from None  # offline or a wrong name: waiting will not help
        except requests.exceptions.RequestException as exc:
            raise MirrorFailed(f"request failed: {exc}") from None
        if part.exists() and part.stat().st_size:
            resumed_any = True
    raise MirrorFailed(f"{reason} (gave up after {policy.retries + 1} attempts)")


HOST_NOT_FOUND = "host name not found"


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    if "Read timed out" in text or "timed out" in text:
        return "the server stalled (read timeout)"
    if "IncompleteRead" in text or "Connection broken" in text or "ProtocolError" in text:
        return "the connection dropped mid-file"
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "NameResolution" in text or "nodename" in text:
        return HOST_NOT_FOUND
    return f"connection failed ({type(exc).__name__})"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _attempt(session, url: str, part: Path, limit: int, policy: HttpPolicy, progress: bool) -> bool:
    """One GET of `url` into `part`; return whether it continued an earlier part."""
    meta = _read_meta(part)
    offset = part.stat().st_size if part.exists() else 0
    if offset and meta.get("url") != url:
        _discard(part)
        offset = 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("etag"):
            headers["If-Range"] = meta["etag"]
        elif meta.get("last_modified"):
            headers["If-Range"] = meta["last_modified"]
    with session.get(url, headers=headers, stream=True, timeout=(policy.connect_timeout, policy.read_timeout)) as resp:
        status = resp.status_code
        if status == 429 or 500 <= status < 600:
            raise _Retryable(f"HTTP {status}", _retry_after(resp.headers.get("Retry-After")))
        if status == 416 and offset:
            _discard(part)
            raise _Retryable("HTTP 416 for the rest of a partial file", 0.0)
        if status == 404:
            raise _NotFound(f"HTTP 404 for {url.rsplit('/', 1)[-1]}")
        if status not in (200, 206):
            raise MirrorFailed(f"HTTP {status}")
        resuming = status == 206 and offset > 0 and _content_range_start(resp) == offset
        if status == 206 and not resuming:
            if offset == 0 and _content_range_start(resp) == 0:
                resuming = False
            else:
                _discard(part)
                raise _Retryable("the server answered a range that does not continue the partial file", 0.0)
        if not resuming:
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        if total is not None and total > limit:
            raise MirrorFailed(f"the server offers {total} bytes, far more than the expected {limit - SLACK}")
        atomic_write_text(
            _meta_path(part),
            json.dumps({"url": url, "etag": resp.headers.get("ETag"), "last_modified": resp.headers.get("Last-Modified")}),
        )
        _stream(resp, part, offset, total, limit, progress)
    return resuming


def _content_range_start(resp) -> int | None:
    value = resp.headers.get("Content-Range", "")
    try:
        unit, rest = value.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _stream(resp, part: Path, offset: int, total: int | None, limit: int, progress: bool) -> None:
    import requests
    from tqdm import tqdm

    try:
        _write_part(resp, part, offset, total, limit, progress, tqdm)
    except requests.exceptions.RequestException:
        raise  # the network (requests' errors are OSErrors too): the caller retries
    except OSError as exc:
        # The disk, not the mirror: stop here rather than try the next mirror.
        _discard(part)
        raise MlecliError(describe_os_error(exc, part)) from None


def _write_part(resp, part: Path, offset: int, total: int | None, limit: int, progress: bool, tqdm) -> None:
    written = offset
    with open(part, "ab" if offset else "wb") as f, tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name.removesuffix(".part"),
        disable=not progress,
        leave=False,
        file=sys.stderr,
    ) as bar:
        for chunk in resp.iter_content(CHUNK):
            written += len(chunk)
            if written > limit:
                f.close()
                _discard(part)
                raise MirrorFailed(f"the body exceeds {limit} bytes, far more than expected; refused")
            f.write(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
