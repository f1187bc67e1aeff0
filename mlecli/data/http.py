"""The network peer, at arm's length: HTTP sessions under a watchdog, budgets, and readers
of the headers a mirror sends.

Budgets, so that no mirror can hold a download for long (docs/data.md explains them):
- every read waits at most `read_timeout` for the server (the socket's timeout: a
  silent server is retried);
- an attempt gets `connect_timeout` to connect, then `2 x read_timeout` of grace; from
  then on, the body bytes received must keep up with `min_rate` on average (t seconds
  after connecting, at least min_rate x (t - 2 x read_timeout) bytes), headers trickling
  in included: a mirror that falls behind is given up, not retried;
- one file from one mirror, every attempt and wait included, must be complete within
  `(retries + 1) x grace + body / min_rate` seconds, `grace = connect_timeout + 2 x
  read_timeout`, where `body` is the most the file may take on the wire (from its known
  size, or the size its IDX header declares).
A watchdog thread enforces the last two by shutting the attempt's sockets down, which
also ends a read that is blocked while the headers or the body trickle in (requests'
timeouts are per read and cannot).

Every header value is read strictly (ASCII digits only, bounded lengths), every
redirect is followed by hand (http(s) only, a bounded number of hops), and every value
from the peer that reaches a message goes through `shown`: quoted, escaped, cut short.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from mlecli.version import __version__


@dataclass(frozen=True)
class HttpPolicy:
    """How patient to be with a server. Times in seconds, rates in bytes per second."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3  # further attempts per URL after the first
    backoff: float = 1.0  # first wait; doubles each retry
    max_wait: float = 60.0  # a longer Retry-After gives up on the mirror
    min_rate: float = 50_000.0  # average rate an attempt must keep up after its grace period
    max_redirects: int = 5

    @property
    def rate_grace(self) -> float:
        """Seconds after connecting before the minimum rate counts (a silent server times out before)."""
        return 2 * self.read_timeout

    @property
    def grace(self) -> float:
        """Seconds an attempt has to connect and start answering before the rate counts."""
        return self.connect_timeout + self.rate_grace

    def budget(self, body: int) -> float:
        """Seconds one file of at most `body` bytes on the wire may take from one mirror, all attempts included."""
        return (self.retries + 1) * self.grace + body / self.min_rate


DEFAULT_POLICY = HttpPolicy()


class MirrorFailed(Exception):
    """One mirror could not deliver one file; `reason` says why, for the final message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnreadableAnswer(Exception):
    """requests failed on a peer's answer (or the environment's proxy) with a type not its own (see get)."""


class Retryable(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


def shown(value: object, limit: int = 60) -> str:
    """A value from a server or a file, safe to print in one line: quoted, escaped, cut short."""
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[0]


def shown_header(value: str | None) -> str:
    """A header value as the server most likely meant it: http.client decodes header bytes as
    Latin-1, so UTF-8 (a '３' in a Content-Length) is decoded again before it is shown."""
    if value is None:
        return shown(value)
    return shown(value.encode("latin-1", "replace").decode("utf-8", "replace"))


# ---------------------------------------------------------------------------
# Sessions whose sockets a watchdog can shut down


_WATCH = threading.local()


def _register(sock, *, ready: bool = False) -> None:
    """Put `sock` under the attempt's watchdog; `ready`: connected (the TLS handshake done)."""
    dog = getattr(_WATCH, "dog", None)
    if dog is not None and sock is not None:
        dog.add(sock)
        if ready:
            dog.ready = True


def _watched_session_classes():
    import requests  # lazy: requests (120 ms) only when something is downloaded
    from urllib3.connection import (  # lazy: requests (120 ms) only when something is downloaded
        HTTPConnection,
        HTTPSConnection,
    )
    from urllib3.connectionpool import (  # lazy: requests (120 ms) only when something is downloaded
        HTTPConnectionPool,
        HTTPSConnectionPool,
    )

    class Watched:
        def _new_conn(self):
            sock = super()._new_conn()
            _register(sock)  # covers the TLS handshake too
            return sock

        def connect(self):
            super().connect()
            _register(self.sock, ready=True)

        def request(self, *args, **kwargs):
            _register(self.sock, ready=True)  # a kept-alive connection starts a new attempt
            return super().request(*args, **kwargs)

    class WatchedHTTP(Watched, HTTPConnection):
        pass

    class WatchedHTTPS(Watched, HTTPSConnection):
        pass

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTP

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPS

    pools = {"http": HTTPPool, "https": HTTPSPool}

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy, **kwargs):
            manager = super().proxy_manager_for(proxy, **kwargs)
            if hasattr(manager, "pool_classes_by_scheme"):
                manager.pool_classes_by_scheme = pools
            return manager

    return Adapter


def new_session():
    """A requests session whose connections the download watchdog can end."""
    import requests  # lazy: requests (120 ms) only when something is downloaded


    adapter = _watched_session_classes()
    s = requests.Session()
    s.mount("http://", adapter())
    s.mount("https://", adapter())
    s.headers["User-Agent"] = f"mlecli/{__version__} (+https://pypi.org/project/requests/)"
    return s


def _handle(sock) -> socket.socket | None:
    """A socket of our own on `sock`'s connection, to shut it down from the watchdog's thread.
    (The socket itself will not do: TLS wraps it in a new object during the handshake and
    detaches the old one, which then refers to nothing; a duplicate keeps referring to the
    connection whatever wraps it.)"""
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _shutdown(handle: socket.socket) -> None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        handle.shutdown(socket.SHUT_RDWR)


@dataclass
class Clock:
    """One file's deadline at one mirror, shared by its attempts and waits."""

    policy: HttpPolicy
    body: int  # most bytes the file may take on the wire
    start: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return self.policy.budget(self.body)

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def tighten(self, body: int) -> None:
        self.body = min(self.body, body)

    def over(self) -> str:
        return f"the file did not arrive within its budget of {self.seconds:.0f} s at this mirror"

    def sleep(self, seconds: float, reason: str) -> None:
        if time.monotonic() + seconds > self.deadline:
            raise MirrorFailed(
                f"{reason}; waiting {seconds:.1f} s more would pass the file's budget of {self.seconds:.0f} s "
                "at this mirror"
            )
        time.sleep(seconds)


class Watchdog:
    """Ends one attempt that falls behind its budget by shutting down its sockets."""

    TICK = 0.05

    def __init__(self, clock: Clock):
        self.clock = clock
        self.policy = clock.policy
        self.start = time.monotonic()
        self.connected: float | None = None  # when the first socket was connected
        self.received = 0  # bytes of body so far (written by the downloading thread)
        self.ready = False  # connected, with the TLS handshake done (for https)
        self.answered = False  # the headers have arrived
        self.reason: str | None = None
        self._socks: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlecli-download-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        _WATCH.dog = self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _WATCH.dog = None
        self._stop.set()
        self._thread.join()
        for handle in self._socks:
            handle.close()

    def add(self, sock) -> None:
        handle = _handle(sock)
        with self._lock:
            if self.connected is None:
                self.connected = time.monotonic()
            if handle is None:
                return
            self._socks.append(handle)
            if self.reason is not None:
                _shutdown(handle)

    def overdue(self, now: float) -> str | None:
        """Why the attempt must end at `now`, or None."""
        if now > self.clock.deadline:
            return self.clock.over()
        policy = self.policy
        if self.connected is None:
            if now - self.start > policy.grace:
                return f"no connection within {policy.connect_timeout:g} s"
            return None
        elapsed = now - self.connected
        if policy.min_rate * (elapsed - policy.rate_grace) <= self.received:
            return None
        if not self.ready:
            return f"no TLS handshake within {policy.rate_grace:g} s of connecting (it trickled in)"
        if not self.answered:
            return f"no complete answer within {policy.rate_grace:g} s of connecting (its headers trickled in)"
        return (
            f"the server sent {self.received:,} bytes in {elapsed:.1f} s, slower than the minimum of "
            f"{policy.min_rate / 1000:g} kB/s (--min-rate)"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.TICK):
            reason = self.overdue(time.monotonic())
            if reason is not None:
                with self._lock:
                    self.reason = reason
                    for sock in self._socks:
                        _shutdown(sock)
                return


# ---------------------------------------------------------------------------
# What a peer says


HOST_NOT_FOUND = "host name not found"


@functools.cache
def peer_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP stack raises about a peer, or the network on the way to it: a mirror's
    failure, said in one line by network_reason. Anything else raised while downloading (a
    NameError, a TypeError, a module that is missing) is a bug and must propagate."""
    import http.client  # lazy: only when something is downloaded (requests loads it too, and ssl with it)

    import requests  # lazy: requests (120 ms) only when something is downloaded
    import urllib3  # lazy: requests (120 ms) only when something is downloaded

    return (
        requests.RequestException,  # what requests wraps: ConnectionError, Timeout, ChunkedEncodingError…
        urllib3.exceptions.HTTPError,  # what reading the body raises: ProtocolError, ReadTimeoutError, IncompleteRead…
        http.client.HTTPException,  # an answer http.client cannot parse: LineTooLong, BadStatusLine, IncompleteRead…
        OSError,  # the socket: refused, reset, timed out, shut down by the watchdog; ssl.SSLError is one
        UnicodeError,  # a host name the IDNA codec refuses (a label of more than 63 letters)
        UnreadableAnswer,  # ValueError, RuntimeError, OverflowError of requests' own, as get() says
    )


def network_reason(exc: BaseException, policy: HttpPolicy) -> tuple[str, bool]:
    """Why an attempt failed with one of peer_errors(), for the user, and whether another attempt may help."""
    import requests  # lazy: requests (120 ms) only when something is downloaded

    names = set()
    e: BaseException | None = exc
    text = ""
    for _ in range(8):  # the exception and what it wraps
        if e is None:
            break
        names.add(type(e).__name__)
        text += f" {e}"
        e = e.__cause__ or e.__context__
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSLCertVerificationError" in names:
        why = re.search(r"certificate verify failed: (.+?)\.? \(_ssl", text)
        return (f"its TLS certificate could not be verified ({why.group(1) if why else 'CERTIFICATE_VERIFY_FAILED'})"
                "; if you trust this server, point REQUESTS_CA_BUNDLE at its CA certificate (a .pem file)"), False
    not_tls = re.search(r"\[SSL: (WRONG_VERSION_NUMBER|RECORD_LAYER_FAILURE|PACKET_LENGTH_TOO_LONG|HTTP_REQUEST"
                        r"|UNKNOWN_PROTOCOL)\]", text)
    if not_tls:
        return (f"the server does not answer in TLS ({not_tls.group(1)}); if it serves plain HTTP, use an http:// "
                "URL"), False
    if names & {"ConnectTimeout", "ConnectTimeoutError"}:
        return f"no connection within {policy.connect_timeout:g} s", True
    if names & {"ReadTimeout", "ReadTimeoutError", "TimeoutError", "timeout"} or "timed out" in text:
        return "the server stalled (read timeout)", True
    if "Name or service not known" in text or "NameResolution" in text or "nodename" in text:
        return HOST_NOT_FOUND, False
    if names & {"LineTooLong", "BadStatusLine", "InvalidHeader", "HeaderParsingError", "InvalidURL",
                "InvalidSchema", "MissingSchema", "LocationParseError", "UnicodeError", "UnicodeDecodeError",
                "UnicodeEncodeError"} or "got more than" in text:
        return f"the server's answer is not valid HTTP ({_exc_name(exc, names)})", False
    if "Connection refused" in text:
        return "connection refused", True
    if "NewConnectionError" in names or "Failed to establish a new connection" in text:
        why = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
        return f"no connection could be made ({why.group(1).strip() if why else 'the host cannot be reached'})", True
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError, OSError)) or (
        names & {"ProtocolError", "IncompleteRead", "RemoteDisconnected", "ConnectionResetError", "SSLError"}
    ):
        return "the connection dropped mid-file", True
    if isinstance(exc, requests.exceptions.RequestException):
        return f"request failed ({_exc_name(exc, names)})", False
    return f"the answer could not be read ({_exc_name(exc, names)})", False


def _exc_name(exc: BaseException, names: set[str]) -> str:
    """The name of the innermost exception: the cause, rather than the wrappers around it."""
    for _ in range(8):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return type(exc).__name__


_DIGITS = re.compile(r"[0-9]{1,18}")


def header_int(value: str | None) -> int | None:
    """A non-negative integer header (ASCII digits only: '３' and '²' are not numbers here), else None."""
    if value is None:
        return None
    value = value.strip(" \t")
    return int(value) if _DIGITS.fullmatch(value) else None


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks to wait (delay-seconds or an HTTP date), None if absent or unreadable."""
    if not value or len(value) > 64:
        return None
    seconds = header_int(value)
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


_RANGE = re.compile(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)")


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of a `Content-Range: bytes first-last/total` header, or None."""
    m = _RANGE.fullmatch((value or "").strip(" \t"))
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


_TOKEN = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")


def validator(value: str | None) -> str | None:
    """An ETag or Last-Modified worth sending back in If-Range: printable ASCII, bounded."""
    return value if value is not None and _TOKEN.fullmatch(value) else None


def _redirect(url: str, location: str | None, hops: int, policy: HttpPolicy) -> str:
    if hops >= policy.max_redirects:
        raise MirrorFailed(f"more than {policy.max_redirects} redirects (a loop?)")
    if location is None:
        raise MirrorFailed("a redirect without a Location")
    if not location or not location.isascii() or not location.isprintable() or len(location) > 2048:
        raise MirrorFailed(f"a malformed redirect (Location: {shown_header(location)})")
    try:
        target = urljoin(url, location.strip())
        parts = urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise MirrorFailed(f"a malformed redirect (Location: {shown_header(location)})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MirrorFailed(f"a redirect to something other than an http(s) URL (Location: {shown_header(location)})")
    return target


def get(session, url: str, headers: dict, policy: HttpPolicy):
    """GET `url`, following at most `policy.max_redirects` redirects to http(s) URLs."""
    for hops in range(policy.max_redirects + 1):
        try:
            resp = session.get(
                url, headers=headers, stream=True, allow_redirects=False,
                timeout=(policy.connect_timeout, policy.read_timeout),
            )
        except (ValueError, RuntimeError, OverflowError) as exc:
            # Even when it is not to follow a redirect, requests reads the answer to one ahead (to
            # prepare the next request): a Location that urlsplit refuses raises ValueError, a body cut
            # short RuntimeError (urllib3 refuses the raw read requests retries with), a Content-Length
            # of 40 digits OverflowError (http.client). And a proxy the environment names that urllib3
            # cannot use is ProxySchemeUnsupported, a ValueError. The peer's or the network's, not ours.
            raise UnreadableAnswer("requests could not use the answer") from exc
        if resp.status_code not in (301, 302, 303, 307, 308):
            return resp
        location = resp.headers.get("Location")
        resp.close()
        url = _redirect(url, location, hops, policy)
    raise AssertionError("unreachable")
