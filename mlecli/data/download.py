"""Fetching one dataset file from an ordered list of mirrors, within a time budget.

Each mirror is an http(s) base URL, a file:// URL or a local folder. A remote file is
streamed to `<partial>/<name>.part` (resumed with a Range request where the server
answers 206), retried with exponential backoff on connection errors, 429 and 5xx
(Retry-After is honoured), then decoded (gzip or raw) into a temporary file beside its
final name, hashed and checked on the way, and renamed into place only if its content
has the expected size and SHA-256 and parses as IDX. Any failure moves on to the next
mirror; the reasons are collected so that the final error can list every mirror tried.

Budgets (a deadline per file and mirror, a minimum rate) and the watchdog that enforces
them live in mlecli.data.http.

The first decoded bytes are the IDX header, which says exactly how big the file is: the
body is refused beyond that (plus gzip's overhead), and `Expected.on_header` can refuse
a file that would not fit in memory or on disk before it is downloaded.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mlecli.data.datasets import BUILTIN
from mlecli.data.http import (
    Clock,
    HttpPolicy,
    MirrorFailed,
    Retryable,
    Watchdog,
    content_range,
    get,
    header_int,
    network_reason,
    peer_errors,
    retry_after,
    shown,
    shown_header,
    validator,
)
from mlecli.data.idx import MAX_DECOMPRESSED, IdxDecoder, IdxHeader
from mlecli.safe import files as fsutil
from mlecli.safe.errors import DataError, DownloadError, MlecliError
from mlecli.safe.files import atomic_write, atomic_write_text, cannot_write

CHUNK = 1 << 16
# A part's meta file holds a URL and two validators of at most 255 bytes each.
META_LIMIT = 1 << 14


def wire_bound(size: int) -> int:
    """The most bytes an honest mirror sends for a file of `size` decoded bytes (gzip of random data grows a little)."""
    return size + size // 1000 + (1 << 16)


def _no_header_check(header: IdxHeader, source: str, body_left: int) -> None:
    pass


def _no_data_check(header: IdxHeader, offset: int, data: bytes, source: str) -> None:
    pass


def _nothing_to_record(sha256: str, size: int, source: str) -> None:
    pass


@dataclass(frozen=True)
class Expected:
    """What a file's decoded content must be, and the checks to run on it as it streams.

    `on_header(header, source, body_left)` runs once the IDX header is known (before the
    rest of a remote file is downloaded; `body_left` is how many more bytes may arrive):
    DataError there means this mirror's file is unusable; any other MlecliError (no
    room) stops the download. `on_data(header, offset, data, source)` sees the data part
    in order (`offset` counts from the first byte after the header). `on_verified(sha256,
    size, source)` runs once the content is verified, right before it is renamed into
    place (a record written there is never missing for a file that is in place).
    `plausible` is the most decoded bytes a file that passes `on_header` can have (what
    fits in this machine): until a header says how big the file is, its deadline is
    that of a file this big, not of the largest IDX file there may be.
    """

    name: str
    sha256: str | None
    size: int | None
    plausible: int | None = None
    on_header: Callable[[IdxHeader, str, int], None] = _no_header_check
    on_data: Callable[[IdxHeader, int, bytes, str], None] = _no_data_check
    on_verified: Callable[[str, int, str], None] = _nothing_to_record

    @property
    def limit(self) -> int:
        """Most decoded bytes the file may have."""
        return self.size if self.size is not None else MAX_DECOMPRESSED

    @property
    def wire_limit(self) -> int:
        return wire_bound(self.limit)

    @property
    def wire_plausible(self) -> int:
        """Most bytes on the wire of a file that can be used here: the deadline before its header arrives."""
        return wire_bound(min(self.limit, self.plausible or self.limit))


class _NotFound(MirrorFailed):
    pass


def mirror_location(mirror: str) -> tuple[str, str]:
    """Classify a mirror as ("http", base URL ending in '/') or ("local", folder path);
    MlecliError for one that could not be used (url_problem)."""
    kind, where, problem = _classify(mirror)
    if problem is not None:
        raise MlecliError(f"mirror {shown(mirror)}: {problem}")
    return kind, where


def url_problem(mirror: str) -> str | None:
    """What makes `mirror` unusable as a URL or folder (the request could never be sent, or it
    names a file elsewhere as a local one), or None if it will do."""
    return _classify(mirror)[2]


def _classify(mirror: str) -> tuple[str, str, str | None]:
    try:
        parts = urlsplit(mirror)
    except ValueError:
        return "", "", "not a valid URL (a '[' without its ']'?); give a URL like https://host/path/"
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return "http", mirror if mirror.endswith("/") else mirror + "/", _http_problem(mirror, parts)
    if scheme == "file":
        host = parts.netloc.lower()
        if host not in ("", "localhost"):
            return "local", "", (f"a file:// URL of the host {shown(parts.netloc)}: only this machine's files can "
                                 "be read; give file:///path/to/folder/ or the folder's path")
        if not parts.path:
            return "local", "", "a file:// URL names no folder; give file:///path/to/folder/ or the folder's path"
        return "local", unquote(parts.path), None
    if scheme == "" or (len(scheme) == 1 and mirror[1:3] in (":\\", ":/")):
        return "local", mirror, None
    return "", "", (f"unsupported URL scheme {scheme!r}; use http://, https://, file:// or a local folder")


# A host as RFC 3986 spells a registered name (with any non-ASCII letters IDNA makes ASCII).
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()+,;=]|%[0-9A-Fa-f]{2}|[^\x00-\x7f])+")
_NOT_A_HOST = "give a URL like https://host/path/"


def _http_problem(url: str, parts) -> str | None:
    if any(c <= " " or c == "\x7f" for c in url):
        return "a URL cannot contain spaces or control characters; write a space as %20"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return ("a ?query or #fragment: the file names are added to the URL's path, so it must end in its folder; "
                "give a URL like https://host/path/")
    where = parts.netloc.rpartition("@")[2]
    if not where:
        return f"it has no host; {_NOT_A_HOST}"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "its port must be a number from 1 to 65535; give a URL like http://host:8080/path/"
    if where.startswith("["):
        literal, _, rest = where[1:].partition("]")
        try:
            ipaddress.IPv6Address(literal.partition("%")[0])
        except ValueError:
            return f"{shown(literal)} is not an IPv6 address; give one like http://[::1]:8080/path/"
        if rest not in ("", ":") and not rest[1:].isdigit():
            return f"{shown(where)} is not a host and port; {_NOT_A_HOST}"
        return None
    host = where.rpartition(":")[0] if ":" in where else where
    if not host:
        return f"it has no host; {_NOT_A_HOST}"
    if not _REG_NAME.fullmatch(host):
        return f"{shown(host)} is not a host name (letters, digits, '-' and '.'); {_NOT_A_HOST}"
    try:
        name = unquote(host, errors="strict")
        if name.isascii():
            name.encode("idna")
        else:
            import idna  # lazy: only for a host name that is not ASCII; what requests encodes it with

            idna.encode(name, uts46=True)
    except (UnicodeError, ValueError):
        return (f"{shown(host)} is not a host name (a name's parts, between dots, are 1 to 63 letters, digits or "
                f"'-'); {_NOT_A_HOST}")
    return None


def fetch_file(
    mirrors: list[str],
    expected: Expected,
    dest: Path,
    part_dir: Path,
    *,
    session_factory: Callable[[], object],
    policy: HttpPolicy,
    progress: bool,
    log: Callable[[str], None],
    advice: str = "Check the network, or point `mlecli download --mirror` at a URL or local folder that has the file",
) -> tuple[str, str]:
    """Try each mirror in order until one delivers a verified copy, renamed to `dest`.

    Returns (sha256, the URL or path it came from). Raises DownloadError listing every
    mirror and why it failed; `dest` then is as it was.
    """
    failures = []
    session = None
    for i, mirror in enumerate(mirrors):
        kind, where = mirror_location(mirror)
        try:
            if kind == "local":
                return _fetch_local(Path(where), expected, dest)
            if session is None:
                session = session_factory()
            return _fetch_http(session, where, expected, dest, part_dir, policy, progress, log)
        except MirrorFailed as exc:
            failures.append(f"{mirror}: {exc.reason}")
            if i < len(mirrors) - 1:
                log(f"{expected.name}: {mirror} failed ({exc.reason}); trying the next mirror")
    tried = "; ".join(failures) if failures else "no mirrors given"
    raise DownloadError(f"could not download {expected.name} from any mirror: {tried}. {advice}")


def _candidates(name: str) -> list[str]:
    return [name + ".gz", name]


# ---------------------------------------------------------------------------
# Decoding and installing one file


def install(dest: Path, pieces: Iterator[bytes], expected: Expected, source: str) -> str:
    """Decode `pieces` (the file's bytes, gzip or raw) into a temporary beside `dest`, checking
    and hashing on the way; rename it to `dest` only if it verifies. Returns its sha256.

    Raises MirrorFailed if the content is not the expected file.
    """
    digest = hashlib.sha256()
    decoder = IdxDecoder(source, expected.limit)
    first = bytearray()

    def take(decoded: Iterator[bytes], state: dict) -> None:
        for piece in decoded:
            header = decoder.header
            if header is not None and not state["announced"]:
                state["announced"] = True
                expected.on_header(header, source, 0)
            pos = decoder.produced - len(piece)
            if header is not None and pos + len(piece) > header.header_len:
                cut = max(0, header.header_len - pos)
                expected.on_data(header, pos + cut - header.header_len, piece[cut:], source)
            digest.update(piece)
            f = state["file"]
            f.write(piece)

    def write(f) -> None:
        state = {"announced": False, "file": f}
        for data in pieces:
            if len(first) < 64:
                first.extend(data[: 64 - len(first)])
            take(decoder.feed(data), state)
        take(decoder.finish(), state)
        _verify(decoder.produced, digest.hexdigest(), expected)
        expected.on_verified(digest.hexdigest(), decoder.produced, source)

    try:
        atomic_write(dest, write)
    except DataError as exc:
        raise MirrorFailed(_looks_like(bytes(first)) + str(exc).removeprefix(f"{source}: ")) from None
    return digest.hexdigest()


def _verify(size: int, digest: str, expected: Expected) -> None:
    if expected.size is not None and size != expected.size:
        raise DataError(f"{size} bytes after decompression, expected {expected.size}")
    if expected.sha256 is not None and digest != expected.sha256:
        raise DataError(f"sha256 mismatch: got {digest}, expected {expected.sha256}{_whose(digest)}")


def _whose(digest: str) -> str:
    """When a file that is not the expected one is another built-in dataset's, say so."""

    for ds in BUILTIN.values():
        for role, known in ds.sha256.items():
            if known == digest:
                return (f" (that is {ds.name}'s {ds.files[role]}: to fetch {ds.name}, use mlecli download "
                        f"--dataset {ds.name}, or data.dataset = \"{ds.name}\" in a config)")
    return ""


def _looks_like(head: bytes) -> str:
    head = head.lstrip().lower()
    # A tag: '<' and a letter, '!' or '?' ("<6>[0.1] …", the kernel's log, is not a page).
    if head[:1] == b"<" and (head[1:2].isalpha() or head[1:2] in (b"!", b"?")):
        return "served an HTML/XML page, not the file: "
    return ""


def _mirror_pieces(path: Path, limit: int | None) -> Iterator[bytes]:
    """A mirror's file in pieces (files.read_pieces, none of size 0): MirrorFailed for one it refuses or cannot read."""
    try:
        yield from fsutil.read_pieces(path, limit, refuse_empty=True, chunk=CHUNK)
    except OSError as exc:
        raise MirrorFailed(_unreadable(path, exc, limit)) from None


def _unreadable(path: Path, exc: OSError, limit: int | None) -> str:
    """Why a file could not be read, in one line that starts with its name where it was refused unread."""
    if isinstance(exc, fsutil.Refused):
        if exc.errno == errno.EFBIG:
            return f"{path} has {exc.size:,} bytes, far more than the file can be ({limit:,} at most)"
        return f"{path} {'has' if exc.errno == errno.ENODATA else 'is'} {exc.strerror}"
    return f"cannot read {path}: {exc.strerror or exc}"


def _fetch_local(folder: Path, expected: Expected, dest: Path) -> tuple[str, str]:
    if not folder.is_dir():
        raise MirrorFailed(f"{folder} is not a folder")
    for candidate in _candidates(expected.name):
        path = folder / candidate
        if not (path.exists() or path.is_symlink()):
            continue
        pieces = _mirror_pieces(path, expected.wire_limit)
        return install(dest, pieces, expected, str(path)), str(path)
    raise MirrorFailed(f"neither {expected.name}.gz nor {expected.name} is in {folder}")


# ---------------------------------------------------------------------------
# HTTP: one file from one mirror


def _fetch_http(session, base: str, expected: Expected, dest: Path, part_dir: Path, policy, progress, log):
    not_found = []
    clock = Clock(policy, expected.wire_plausible)
    for candidate in _candidates(expected.name):
        url = base + candidate
        try:
            return _fetch_url(session, url, candidate, expected, dest, part_dir, clock, progress, log), url
        except _NotFound as exc:
            not_found.append(exc.reason)
    raise MirrorFailed(" and ".join(not_found))


def _fetch_url(session, url, candidate, expected, dest, part_dir, clock, progress, log) -> str:
    part = part_dir / f"{candidate}.part"
    for fresh_start in (False, True):
        if fresh_start:
            discard(part)
        resumed = _download(session, url, part, expected, clock, progress, log)
        try:
            digest = install(dest, _read_part(part), expected, url)
        except MirrorFailed:
            discard(part)
            if resumed and not fresh_start:
                # The kept part may have come from another copy of the file; try once whole.
                log(f"{candidate}: resumed download did not verify; downloading it whole again")
                continue
            raise
        discard(part)
        return digest
    raise AssertionError("unreachable")


def _read_part(part: Path) -> Iterator[bytes]:
    try:
        yield from fsutil.read_pieces(part, None, chunk=CHUNK)
    except OSError as exc:  # our own file: the disk, not the mirror
        raise MlecliError(_unreadable(part, exc, None)) from None


def _own_part_size(part: Path) -> int:
    """The bytes of a partial download to resume (0 if none). A part or meta file that is
    not a plain file of mlecli's own (a symbolic link, a pipe, a file with other names) is
    not continued or written through: its name is removed, whatever it points to is left."""
    size = 0
    for p in (part, meta_path(part)):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            size = st.st_size if p == part else size
        else:
            p.unlink()  # a folder raises: the caller says so in one line
            if p == part:
                meta_path(part).unlink(missing_ok=True)
                return 0
    return size


def discard(part: Path) -> None:
    """Remove a partial download and its meta file (a disk error is the user's, not the mirror's)."""
    for p in (part, meta_path(part)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MlecliError(f"cannot remove {p}: {exc.strerror or exc}") from None


def meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict:
    """A part's URL and validators; {} if its meta file is missing, damaged or too large to be one."""
    try:
        meta = json.loads(fsutil.read_regular(meta_path(part), META_LIMIT))
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}


def _download(session, url: str, part: Path, expected: Expected, clock: Clock, progress: bool, log) -> bool:
    """Stream `url` into `part`, resuming and retrying; return whether any bytes were resumed."""
    policy = clock.policy
    resumed_any = False
    reason, reason_wait = "", None
    for attempt in range(policy.retries + 1):
        if attempt:
            wait = policy.backoff * 2 ** (attempt - 1) if reason_wait is None else reason_wait
            log(f"{url}: {reason}; retrying in {wait:.1f} s ({attempt}/{policy.retries})")
            clock.sleep(wait, reason)
            reason_wait = None
        with Watchdog(clock) as dog:
            try:
                resumed = _attempt(session, url, part, expected, clock, dog, progress)
                if dog.reason is not None:  # the watchdog ended the body early, as if at its end
                    raise MirrorFailed(dog.reason)
                return resumed_any or resumed
            except Retryable as exc:
                reason, reason_wait = exc.reason, exc.wait
                if reason_wait is not None and reason_wait > policy.max_wait:
                    raise MirrorFailed(
                        f"{reason}; the server asks to wait {reason_wait:.0f} s, more than {policy.max_wait:.0f}"
                    ) from None
            except peer_errors() as exc:  # a misbehaving peer or network; anything else is a bug, and propagates
                if dog.reason is not None:
                    raise MirrorFailed(dog.reason) from None
                reason, retry = network_reason(exc, policy)
                if not retry:
                    raise MirrorFailed(reason) from None
        if part.exists() and part.stat().st_size:
            resumed_any = True
    raise MirrorFailed(f"{reason} (gave up after {policy.retries + 1} attempts)")


def _attempt(session, url: str, part: Path, expected: Expected, clock: Clock, dog: Watchdog, progress: bool) -> bool:
    """One GET of `url` into `part`; return whether it continued an earlier part."""
    policy = clock.policy
    meta = _read_meta(part)
    try:  # the disk, not the network: never mistaken for a dropped connection
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = _own_part_size(part)
    except OSError as exc:
        raise MlecliError(cannot_write(exc, part)) from None
    unchanged_since = validator(meta.get("etag")) or validator(meta.get("last_modified"))
    # An unpinned file's part continues only the same version of the file: without a validator
    # to send in If-Range, nothing would tell if the rest is of another (a pinned file's hash does).
    if offset and (meta.get("url") != url or offset > expected.wire_limit
                   or (expected.sha256 is None and not unchanged_since)):
        discard(part)
        offset = 0
    headers = {"Accept-Encoding": "identity", "Connection": "close"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if unchanged_since:
            headers["If-Range"] = unchanged_since
    changed = False
    with get(session, url, headers, policy) as resp:
        dog.answered = True
        status = resp.status_code
        if status == 429 or 500 <= status < 600:
            raise Retryable(f"HTTP {status}", retry_after(resp.headers.get("Retry-After")))
        if status == 416 and offset:
            discard(part)
            raise Retryable("HTTP 416 for the rest of a partial file", 0.0)
        if status == 404:
            raise _NotFound(f"HTTP 404 for {url.rsplit('/', 1)[-1]}")
        if status not in (200, 206):
            raise MirrorFailed(f"HTTP {status}")
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", ""):
            raise MirrorFailed(f"the server sent Content-Encoding {shown_header(encoding)}, which mlecli did not "
                               "ask for")
        chunked = "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
        length_header = None if chunked else resp.headers.get("Content-Length")
        length = header_int(length_header)
        if length_header is not None and length is None:
            raise MirrorFailed(f"the server sent an invalid Content-Length {shown_header(length_header)}")
        resuming = False
        if status == 206:
            rng = content_range(resp.headers.get("Content-Range"))
            if (rng is None or rng[0] != offset or (rng[2] is not None and rng[1] != rng[2] - 1)
                    or (length is not None and length != rng[1] - rng[0] + 1)):
                discard(part)
                raise Retryable("the server answered a range that does not continue the partial file", 0.0)
            resuming = offset > 0
            if resuming and expected.sha256 is None and not _same_version(meta, resp.headers):
                # The server ignored If-Range, and the rest it sends is of another version: start again whole.
                discard(part)
                changed = True
        if not changed:
            if not resuming:
                offset = 0
            total = offset + length if length is not None else None
            if total is not None and total > expected.wire_limit:
                raise MirrorFailed(f"the server offers {total:,} bytes, far more than the expected {expected.limit:,}")
            atomic_write_text(
                meta_path(part),
                json.dumps({"url": url, "etag": validator(resp.headers.get("ETag")),
                            "last_modified": validator(resp.headers.get("Last-Modified"))}),
            )
            _stream(resp, part, offset, total, expected, clock, dog, progress, url)
    if changed:  # the part is gone: the same attempt asks for the whole file
        return _attempt(session, url, part, expected, clock, dog, progress)
    return resuming


def _same_version(meta: dict, headers) -> bool:
    """Whether an answer carries the validator saved with a part (its ETag, else its Last-Modified)."""
    if validator(meta.get("etag")):
        return headers.get("ETag") == meta["etag"]
    return validator(meta.get("last_modified")) is not None and headers.get("Last-Modified") == meta["last_modified"]


class _HeaderPeek:
    """Learns a file's IDX header from its first bytes on the wire, to bound the rest."""

    def __init__(self, expected: Expected, source: str):
        self.expected = expected
        self.source = source
        self.decoder = IdxDecoder(source, expected.limit)
        self.first = bytearray()
        self.header: IdxHeader | None = None

    def feed(self, data: bytes) -> IdxHeader | None:
        if self.header is not None:
            return None
        if len(self.first) < 64:
            self.first.extend(data[: 64 - len(self.first)])
        try:
            for _ in self.decoder.feed(data):
                if self.decoder.header is not None:
                    self.header = self.decoder.header
                    return self.header
        except DataError as exc:
            raise MirrorFailed(_looks_like(bytes(self.first)) + str(exc).removeprefix(f"{self.source}: ")) from None
        return None


def _stream(resp, part: Path, offset: int, total: int | None, expected: Expected, clock: Clock, dog: Watchdog,
            progress: bool, url: str) -> None:
    try:
        _write_part(resp, part, offset, total, expected, clock, dog, progress, url)
    except (MirrorFailed, MlecliError):
        discard(part)  # what is there is not the file, or has no room: never resume it
        raise


def _write_part(resp, part: Path, offset: int, total: int | None, expected: Expected, clock: Clock,
                dog: Watchdog, progress: bool, url: str) -> None:
    from tqdm import tqdm  # lazy: tqdm (50 ms) only where a bar is shown

    peek = _HeaderPeek(expected, url)
    limit = expected.wire_limit
    if offset:
        for data in _read_part(part):
            if peek.feed(data) is not None:
                limit = _bound(peek.header, expected, clock, url, total, offset)
                break
    try:
        f = fsutil.open_own(part, append=bool(offset))
    except OSError as exc:
        discard(part)
        raise MlecliError(cannot_write(exc, part)) from None
    read = getattr(resp.raw, "read1", None) or resp.raw.read
    written = offset
    with f, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part.name.removesuffix(".part"), disable=not progress, leave=False, file=sys.stderr) as bar:
        while True:
            data = read(CHUNK, decode_content=False)  # the network: errors go to the caller, which retries
            if not data:
                break
            dog.received += len(data)
            written += len(data)
            if peek.feed(data) is not None:
                limit = _bound(peek.header, expected, clock, url, total, written - len(data))
            if written > limit:
                raise MirrorFailed(f"the body exceeds {limit:,} bytes, more than the file can be; refused")
            try:
                f.write(data)
            except OSError as exc:
                f.close()
                discard(part)
                raise MlecliError(cannot_write(exc, part)) from None
            bar.update(len(data))
        # No fsync: a part is only ever read back to be verified, and one damaged by a
        # power cut fails that and is downloaded again whole.
        try:
            f.flush()
        except OSError as exc:
            discard(part)
            raise MlecliError(cannot_write(exc, part)) from None


def _bound(header: IdxHeader, expected: Expected, clock: Clock, url: str, total: int | None, before: int) -> int:
    """Once the header is known: check it, and return the most bytes the body may have."""
    if expected.size is not None and header.total_len != expected.size:
        raise MirrorFailed(
            f"its IDX header declares {header.describe()} ({header.total_len:,} bytes), "
            f"expected {expected.size:,} bytes"
        )
    limit = wire_bound(header.total_len)
    if total is not None and total > limit:
        raise MirrorFailed(
            f"the server offers {total:,} bytes, more than an IDX file of {header.total_len:,} bytes can take"
        )
    body_left = (total if total is not None else limit) - before
    try:
        expected.on_header(header, url, max(0, body_left))
    except DataError as exc:
        raise MirrorFailed(str(exc).removeprefix(f"{url}: ")) from None
    clock.tighten(limit)
    return limit
