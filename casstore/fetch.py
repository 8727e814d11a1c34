"""Bytes from a URL into a sink: the only module that imports httpx.

Plain GETs go over kept-alive sockets (``direct.py``: a ``Session``'s pool),
the rest through httpx; both paths share every decision here, and errors
from either become the same ``_Retry`` or ``DownloadError`` (``_failure``).

A sink is anything with ``write(bytes)``, ``reset()`` and ``size`` (an
``ingest.Ingest``; ``ensure_space(n)``, ``update`` and ``append`` are used
when present, see ``Sink``); this module knows nothing of the store or SQL.

One download is a series of attempts under a retry policy (SPEC §5):

- transient failures (connect errors, resets, timeouts, 408, 429, 5xx) are
  retried with exponential backoff and jitter, ``Retry-After`` honoured up to
  60 s; any other 4xx, a redirect loop or a bad URL fails at once;
- a transfer broken mid-way asks for the rest with ``Range`` + ``If-Range``
  (ETag, else Last-Modified) and accepts only a ``206`` whose Content-Range
  starts where the sink stopped; a ``200`` (or a 206 starting elsewhere)
  resets the sink and starts over.  The hashers live in the sink and carry
  on across a resume: the temp file is never re-read (containerd does the same);
- a body longer than Content-Length or the expected size is never accepted,
  a short one is resumed, then reported as a ``DownloadError``.

Speed, measured, not assumed (``bench/bench_download.py``: a cold 1 GiB get
from a local nginx to tmpfs on 2 cores, against ``curl -o``):

- bytes are hashed on a worker thread in 1 MiB buffers (``_Pipeline``) while
  the receiving thread writes them: hashing (sha256 ~0.6 + blake3 ~0.25
  CPU-s per GiB) costs about as much as receiving and writing (~0.3 + 0.5),
  so one thread doing hash and write was the bottleneck;
- the body of a large plain HTTP/1.1 response (``SOCKET_MIN``) is read with
  ``recv_into`` straight from the connection's socket into those buffers,
  after httpx has parsed the headers (``_body_socket``).  httpx's own reads
  cost ~1 CPU-s per GiB (64 KiB chunks through httpcore and h11, a bytes
  object each, joined again); the socket, 0.3.  Everything else (chunked,
  content-coded, HTTP/2, TLS inside a proxy's TLS, small) goes through
  ``iter_raw()``, as does every body of ``adownload``;
- httpx is imported without its command line and the CA bundle is loaded on
  the first TLS handshake: ~60 ms less before the first request.

Together, side by side in one run (7 rounds): 3.0 -> 2.0 CPU-s per GiB and
1.80x -> 1.27x the time of ``curl -o`` by median, 1.50x -> 1.20x by best
round; peak RSS 48 -> 38 MiB.  curl needs ~1.05 CPU-s (receive and write,
nothing else), so the floor on 2 cores is about 1.1x: ~2.0 CPU-s of work
plus nginx's 0.15 shared by two cores, after ~0.13 s of start-up on one.

The sync and async paths share every decision (the pure helpers below and
one ``_Transfer`` state object); only the byte loop is written twice, as in
httpx's own ``BaseClient``.  The retry loop is that loop's ``while`` and
``_pause``: tenacity did the same, but its import (~11 ms) and its
``Retrying`` per download (~9 us, ~2% of a 4 KiB download from a fast origin)
were paid on every download, retried or not.

httpx and OS errors become ``DownloadError`` here, chained, with the URL
redacted in every message (httpx's own texts may contain the URL).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .errors import CasError, DownloadError, InvalidInput, SizeMismatch
from .urls import local_path, redact

if TYPE_CHECKING:
    import ssl

    import httpx

    from .direct import Pool

log = logging.getLogger("casstore")

DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 30.0
DEFAULT_BACKOFF_MAX = 10.0
BACKOFF_INITIAL = 0.5
RETRY_AFTER_MAX = 60.0
MAX_REDIRECTS = 10
CONNECT_TIMEOUT = 10.0
READ_CHUNK = 1 << 20
# A body above this is read straight from the socket (see _body_socket).  That
# saves ~0.7 ms of CPU per MiB but costs the connection: the next request to the
# host connects again (one or two round trips with TLS).  Only a link faster
# than httpx can read (~1 GB/s: loopback, a fast LAN, where round trips are
# cheap) gains; on a WAN it is the reconnect alone, so it is kept for bodies
# big enough for one reconnect to be small beside them.
SOCKET_MIN = 16 << 20
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))

# Called with (bytes so far, total or None) after every chunk.
ProgressHook = Callable[[int, "int | None"], None]

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)


class Sink(Protocol):
    """``write`` may be handed a view of a buffer that is reused once it returns:
    keep a copy, never the view.  A sink that also has ``update(data)`` (hash
    only) and ``append(data)`` (write only), as ``Ingest`` has, gets the two
    halves of ``write`` on two threads, each in order."""

    size: int

    def write(self, data: bytes | memoryview) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class Fetched:
    """What the origin said about the body just written to the sink."""

    url: str  # final URL after redirects (not redacted; redact before storing)
    etag: str | None = None
    last_modified: str | None = None
    attempts: int = 1


@dataclass(frozen=True)
class Policy:
    """How hard to try: retries after the first attempt, per-read timeout,
    backoff cap, and extra request headers (never stored or printed)."""

    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    backoff_max: float = DEFAULT_BACKOFF_MAX
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @classmethod
    def from_env(
        cls,
        *,
        retries: int | None = None,
        timeout: float | None = None,
        backoff_max: float | None = None,
        headers: Any = (),
    ) -> Policy:
        """Arguments win over ``CASSTORE_RETRIES`` / ``CASSTORE_BACKOFF_MAX``, which win
        over the defaults.

        Raises:
            InvalidInput: a negative or malformed value, or a malformed header.
        """
        if retries is None:
            retries = int(_env_number("CASSTORE_RETRIES", DEFAULT_RETRIES))
        if backoff_max is None:
            backoff_max = _env_number("CASSTORE_BACKOFF_MAX", DEFAULT_BACKOFF_MAX)
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        for what, value in (("retries", retries), ("timeout", timeout), ("backoff", backoff_max)):
            if value < 0 or (what == "timeout" and value == 0):
                raise InvalidInput(f"invalid {what} {value!r}: must be positive")
        items = headers.items() if hasattr(headers, "items") else headers
        return cls(int(retries), float(timeout), float(backoff_max), _check_headers(items))


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` as a pair (for ``get --header``).

    Raises:
        InvalidInput: no colon or a bad header name (the value is never echoed).
    """
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not _HEADER_NAME.match(name):
        raise InvalidInput(f"invalid header {name[:40]!r}: expected 'Name: value'")
    return name, value.strip()


def _check_headers(items: Any) -> tuple[tuple[str, str], ...]:
    out = []
    for name, value in items:
        # ASCII only: httpx refuses other values, the direct lane would send latin-1.
        if not _HEADER_NAME.match(name) or "\n" in value or "\r" in value or not value.isascii():
            raise InvalidInput(f"invalid header {name[:40]!r}")
        out.append((name, value))
    return tuple(out)


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise InvalidInput(f"invalid {name}={value!r}: expected a number") from None
    if number < 0:
        raise InvalidInput(f"invalid {name}={value!r}: must not be negative")
    return number


# -- clients -----------------------------------------------------------------


def _httpx() -> Any:
    """httpx, imported without loading its command line.

    ``httpx/__init__`` imports ``httpx._main``, which imports click, rich and
    pygments whenever they are installed: ~35 ms of a cold ``get``'s start,
    for a CLI we never run.  Hiding the module during the import makes httpx
    take its own fallback; ``httpx.main`` is then put back as a function that
    imports the real one on call, so nothing else changes.
    """
    import sys

    if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
        sys.modules["httpx._main"] = None  # type: ignore[assignment]
        try:
            import httpx
        finally:
            del sys.modules["httpx._main"]

        def main(*args: Any, **kwargs: Any) -> Any:
            from httpx._main import main as real

            return real(*args, **kwargs)

        httpx.main = main
    import httpx

    return httpx


HEADERS = {
    "User-Agent": f"casstore/{__version__}",
    # Bytes as stored on the origin: a .tar.gz served with
    # Content-Encoding: gzip must not be decompressed (pip does the same).
    "Accept-Encoding": "identity",
}


def _client_options(timeout: float, tls: ssl.SSLContext | None = None) -> dict[str, Any]:
    httpx = _httpx()

    return {
        "follow_redirects": True,
        "max_redirects": MAX_REDIRECTS,
        "timeout": httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
        # Proxies (HTTP(S)_PROXY, NO_PROXY) and SSL_CERT_FILE from the environment;
        # TLS is always verified, as with httpx's default verify=True.
        "trust_env": True,
        "verify": tls or _tls_context(),
        "headers": HEADERS,
    }


def new_client(
    *, timeout: float = DEFAULT_TIMEOUT, tls: ssl.SSLContext | None = None
) -> httpx.Client:
    httpx = _httpx()

    return httpx.Client(**_client_options(timeout, tls))


def new_async_client(*, timeout: float = DEFAULT_TIMEOUT) -> httpx.AsyncClient:
    httpx = _httpx()

    return httpx.AsyncClient(**_client_options(timeout))


class Session:
    """What one store's downloads share: a pool of plain HTTP/1.1
    connections (``direct.py``) for the requests it takes, and an httpx client,
    made on first need, for the rest.  Safe to share between threads.

    ``direct=False`` (or ``CASSTORE_DIRECT=0`` in the environment) sends
    everything through httpx.
    """

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, direct: bool | None = None) -> None:
        import threading

        from .direct import Pool

        self.timeout = timeout
        self._tls = _LazyTLS()
        self._lock = threading.Lock()
        if direct is None:
            off = ("0", "false", "no", "off")
            direct = os.environ.get("CASSTORE_DIRECT", "1").strip().lower() not in off
        self.pool = (
            Pool(
                headers={"Accept": "*/*", "Connection": "keep-alive", **HEADERS},
                tls=self._tls,
                connect_timeout=CONNECT_TIMEOUT,
                max_redirects=MAX_REDIRECTS,
            )
            if direct
            else None
        )
        self._client: Any = None

    @property
    def tls(self) -> ssl.SSLContext:
        return self._tls()

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = new_client(timeout=self.timeout, tls=self.tls)
            return self._client

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LazyTLS:
    """The verifying context for https, made on first need: the ``ssl`` module
    alone costs a process ~5 ms, which a batch of http:// URLs never needs.
    One context however many threads ask at once (each would load the CA
    bundle, ~30 ms).  Its own object, not a closure over the Session: the pool
    keeps it, and a cycle would keep an unclosed Session's sockets open until
    the GC runs.  (A helper is forked only while its batch runs one thread:
    the lock cannot be held then.)"""

    __slots__ = ("_context", "_lock")

    def __init__(self) -> None:
        import threading

        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def __call__(self) -> ssl.SSLContext:
        context = self._context
        if context is None:
            with self._lock:
                if self._context is None:
                    self._context = _tls_context()
                context = self._context
        return context


def _tls_context() -> ssl.SSLContext:
    """The verifying TLS context httpx would make, loading its CA certificates
    on first use instead of when the client is made.

    ``httpx.Client()`` loads the CA bundle at once (20-50 ms here), even for a
    process that only fetches http:// URLs.  This context is a plain
    ``ssl.SSLContext(PROTOCOL_TLS_CLIENT)``: hostname checked, certificate
    required, and until loaded it trusts nothing, so it fails closed.  It
    loads what httpx's ``verify=True`` loads: ``SSL_CERT_FILE``, else
    ``SSL_CERT_DIR``, else certifi's bundle.  Every TLS handshake goes
    through ``wrap_socket`` (httpcore, sync) or ``wrap_bio`` (anyio, and TLS
    inside a proxy's TLS).
    """
    import ssl
    import sys
    import threading

    lock = threading.Lock()

    class LazyTrust(ssl.SSLContext):
        loaded = False

        def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
            self._load()
            return super().wrap_socket(*args, **kwargs)

        def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
            self._load()
            return super().wrap_bio(*args, **kwargs)

        def _load(self) -> None:
            with lock:
                if self.loaded:
                    return
                if os.environ.get("SSL_CERT_FILE"):
                    self.load_verify_locations(cafile=os.environ["SSL_CERT_FILE"])
                elif os.environ.get("SSL_CERT_DIR"):
                    self.load_verify_locations(capath=os.environ["SSL_CERT_DIR"])
                else:
                    import certifi

                    self.load_verify_locations(cafile=certifi.where())
                self.loaded = True

    context = LazyTrust(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED  # PROTOCOL_TLS_CLIENT's defaults, said out loud
    context.check_hostname = True
    keylog = os.environ.get("SSLKEYLOGFILE")  # as ssl.create_default_context does
    if keylog and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    return context


# -- the state of one download, and the decisions shared by sync and async ----


class _Retry(Exception):
    """One attempt failed in a way worth another (never leaves this module)."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.cause = cause


@dataclass
class _Transfer:
    url: str
    size: int | None  # the expected whole size, if the caller knows it
    policy: Policy
    progress: ProgressHook | None = None
    shown: str = ""
    attempts: int = 0
    total: int | None = None  # the whole body's size as the origin announced it
    etag: str | None = None
    last_modified: str | None = None
    final_url: str = ""
    resumable: bool = True
    verified: bool = False  # a digest checks the bytes: httpx's path may use the socket

    def __post_init__(self) -> None:
        self.shown = redact(self.url)
        self.final_url = self.url

    @property
    def validator(self) -> str | None:
        # If-Range needs a strong ETag (RFC 9110 §13.1.5); a weak one falls back.
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


class _Pipeline:
    """A sink that hands the received bytes, in ~1 MiB buffers, to one worker
    thread: sha256, blake3 and ``os.write`` release the GIL on large buffers,
    so the work overlaps with receiving.

    Two ways in.  ``write(bytes)`` gathers httpx's reads into a buffer that
    the worker hashes and writes.  ``buffer()`` / ``submit()`` lend one of
    ``DEPTH`` reusable buffers to a caller receiving into it
    (``socket.recv_into``): no allocation or copy per read.  When the sink
    can hash and write separately (``update`` / ``append``, as ``Ingest``
    can), a submitted buffer is written on the receiving thread and hashed on
    the worker, which then returns it to the pool: hashing 1 GiB costs about
    as much CPU as receiving and writing it, so one thread doing both hash
    and write was the bottleneck.

    Memory is bounded: ``DEPTH`` buffers of each kind.  Bodies under one
    buffer never start the thread.  A write error (either thread) surfaces on
    the next call as a CasError naming the URL (never retried: it is our
    disk, not the network).
    """

    BATCH = 1 << 20
    DEPTH = 8

    def __init__(self, sink: Sink, shown: str) -> None:
        self.sink = sink
        self.shown = shown
        self.size = sink.size  # bytes received: written or on their way
        self._parts: list[bytes] = []
        self._pending = 0
        self._gathered = False  # gathered bytes are queued, not yet written
        self._queue: Any = None
        self._thread: Any = None
        self._free: Any = None  # lent buffers back from the worker
        self._lent = 0
        self._split = hasattr(sink, "update") and hasattr(sink, "append")
        self._error: BaseException | None = None
        self.ensure_space = getattr(sink, "ensure_space", None)

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._pending += len(data)
        self.size += len(data)
        if self._pending >= self.BATCH:
            self._hand_over()

    def buffer(self) -> memoryview:
        """A ``BATCH``-byte buffer to receive into; blocks while all are in the worker."""
        if self._parts or self._gathered:
            # Gathered bytes reach the file before a submitted buffer is appended.
            self.flush()
        if self._free is None:
            import queue

            self._free = queue.SimpleQueue()
        if self._lent < self.DEPTH and self._free.empty():
            self._lent += 1
            return memoryview(bytearray(self.BATCH))
        return self._free.get()

    def submit(self, buf: memoryview, n: int) -> None:
        """Hand ``buf[:n]`` (from ``buffer()``) on; the worker gives ``buf`` back."""
        if n == 0:
            self._free.put(buf)
            return
        self.size += n
        self._start()
        self._queue.put((buf, n))
        if self._split:
            self._disk(self.sink.append, buf[:n])  # type: ignore[attr-defined]

    def reset(self) -> None:
        self.flush()
        self.sink.reset()
        self.size = self.sink.size

    def flush(self) -> None:
        """Wait until every byte received is in the sink."""
        if self._thread is None:
            if self._parts:
                self._disk(self.sink.write, b"".join(self._parts))
                self._parts, self._pending = [], 0
        else:
            import threading

            self._hand_over()
            done = threading.Event()
            self._queue.put(done)
            done.wait()
            self._gathered = False
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the worker; bytes not yet written are dropped (call flush first to keep them)."""
        if self._thread is not None:
            self._parts, self._pending = [], 0
            self._error = self._error or CasError("download abandoned", url=self.shown)
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _hand_over(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._parts:
            return
        buf = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._pending = [], 0
        self._start()
        self._queue.put(buf)
        self._gathered = True

    def _start(self) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            import queue
            import threading

            self._queue = queue.Queue(maxsize=self.DEPTH)
            self._thread = threading.Thread(
                target=self._work, name="casstore-hash-write", daemon=True
            )
            self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, bytes):
                self._work_on(self.sink.write, item)
            elif isinstance(item, tuple):
                buf, n = item
                sink = self.sink
                self._work_on(sink.update if self._split else sink.write, buf[:n])  # type: ignore[attr-defined]
                self._free.put(buf)
            else:
                item.set()

    def _work_on(self, fn: Callable[[Any], None], buf: bytes | memoryview) -> None:
        if self._error is None:
            try:
                self._disk(fn, buf)
            except BaseException as exc:  # handed to the receiving thread
                self._error = exc

    def _disk(self, fn: Callable[[Any], None], buf: bytes | memoryview) -> None:
        try:
            fn(buf)
        except OSError as exc:
            # Our disk, not the network: never retried.  The caller's Ingest removes the temp.
            what = "no space left" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            error = CasError(
                f"cannot write the download of {self.shown} into the store: {what}",
                url=self.shown,
                errno=exc.errno,
            )
            self._error = self._error or error
            raise error from exc


def _request_headers(t: _Transfer, sink: Sink) -> dict[str, str]:
    """Headers for the next attempt; resets the sink when it cannot be resumed."""
    headers = dict(t.policy.headers)
    if sink.size:
        if t.resumable and t.validator:
            headers["Range"] = f"bytes={sink.size}-"
            headers["If-Range"] = t.validator
        else:
            sink.reset()
    t.attempts += 1
    return headers


def _accept(t: _Transfer, sink: Sink, status: int, headers: Any, reason: str, url: str) -> None:
    """Decide on a response before its body is read; raises to retry or to fail."""
    t.final_url = url
    if status in RETRY_STATUSES:
        raise _Retry(
            f"HTTP {status} {reason}",
            status=status,
            retry_after=_retry_after(headers.get("retry-after")),
        )
    if status == 416 and sink.size:
        t.resumable = False  # the origin refused our range: start over
        raise _Retry(f"HTTP 416 for a range from byte {sink.size}", status=416, retry_after=0)
    if status >= 300 or status < 200:
        raise DownloadError(
            f"HTTP {status} {reason} for {t.shown}", url=t.shown, status=status, attempts=t.attempts
        )
    t.etag = headers.get("etag") or t.etag
    t.last_modified = headers.get("last-modified") or t.last_modified
    if status == 206:
        start, total = _content_range(headers.get("content-range"))
        if start != sink.size:
            # pip's download.py refuses these too: restart from byte 0 without Range.
            t.resumable = False
            sink.reset()
            raise _Retry(
                f"range answer starts at byte {start}, asked for {sink.size}", retry_after=0
            )
        if total is None:
            length = _content_length(headers)
            total = None if length is None else start + length
    else:
        if sink.size:
            sink.reset()  # a whole body after all (the origin ignored Range): start over
        total = _content_length(headers)
    t.total = total
    if total is not None and t.size is not None and total != t.size:
        raise SizeMismatch(
            f"size mismatch for {t.shown}: expected {t.size} bytes, the server announced {total}",
            url=t.shown,
            expected=t.size,
            actual=total,
        )
    ensure_space = getattr(sink, "ensure_space", None)
    if ensure_space is not None and total is not None:
        ensure_space(total - sink.size)


def _limit(t: _Transfer) -> int | None:
    """The most bytes the sink may hold before the body is known to be too long."""
    return t.total if t.total is not None else t.size


def _too_long(t: _Transfer, sink: Sink) -> CasError:
    expected = _limit(t)
    return SizeMismatch(
        f"size mismatch for {t.shown}: the body runs past {expected} bytes",
        url=t.shown,
        expected=expected,
        actual=sink.size,
    )


def _finish(t: _Transfer, sink: _Pipeline) -> Fetched:
    """The body ended cleanly: complete, or short and worth resuming."""
    expected = _limit(t)
    if expected is not None and sink.size < expected:
        raise _Retry(f"transfer ended after {sink.size} of {expected} bytes")
    sink.flush()
    return Fetched(url=t.final_url, etag=t.etag, last_modified=t.last_modified, attempts=t.attempts)


def _write(t: _Transfer, sink: _Pipeline, chunk: bytes) -> None:
    sink.write(chunk)
    limit = _limit(t)
    if limit is not None and sink.size > limit:
        raise _too_long(t, sink)
    if t.progress is not None:
        t.progress(sink.size, t.total)


def _delay(exc: BaseException | None, attempt: int, policy: Policy) -> float:
    """Seconds before the next attempt: Retry-After when given (capped), else
    exponential backoff with jitter, capped by ``policy.backoff_max``."""
    if isinstance(exc, _Retry) and exc.retry_after is not None:
        return min(exc.retry_after, RETRY_AFTER_MAX)
    ceiling = min(policy.backoff_max, BACKOFF_INITIAL * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter"


def _pause(t: _Transfer, exc: _Retry) -> float:
    """After the failed attempt ``t.attempts``: the seconds to wait before the
    next (said as a warning), or the DownloadError that ends the download
    once the retries are spent."""
    if t.attempts > t.policy.retries:
        raise _gave_up(exc, t) from exc.cause
    delay = _delay(exc, t.attempts, t.policy)
    log.warning(
        "%s: %s; retry %d of %d in %.1fs", t.shown, exc.reason, t.attempts, t.policy.retries, delay
    )
    return delay


def _gave_up(exc: _Retry, t: _Transfer) -> DownloadError:
    return DownloadError(
        f"download of {t.shown} failed after {t.attempts} attempt(s): {exc.reason}",
        url=t.shown,
        status=exc.status,
        attempts=t.attempts,
    )


def _auth(url: str) -> Any:
    """Credentials for ``url``: its own userinfo (httpx applies it), else ~/.netrc."""
    from urllib.parse import urlsplit

    import httpx

    if urlsplit(url).username is not None:
        return httpx.USE_CLIENT_DEFAULT
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return httpx.USE_CLIENT_DEFAULT
    import netrc

    try:
        return httpx.NetRCAuth(path)
    except (netrc.NetrcParseError, OSError, UnicodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return httpx.USE_CLIENT_DEFAULT


# -- the byte loops -----------------------------------------------------------


def download(
    url: str,
    sink: Sink,
    *,
    session: Session,
    policy: Policy | None = None,
    size: int | None = None,
    progress: ProgressHook | None = None,
    verified: bool = False,
) -> Fetched:
    """Stream ``url`` into ``sink``, retrying and resuming under ``policy``.

    Blocks.  ``size`` is the expected whole size, when known.  A request the
    session's direct pool takes goes over its own connections (``direct.py``),
    the rest through httpx.  ``verified`` says the caller checks the bytes
    against a known digest afterwards; only then does httpx's path read a
    large body straight from the socket (``_body_socket``), which trusts
    httpx to hand over all it buffered in its first chunk: were that ever
    not so, the digest check, not a silent trust-on-first-use, would catch it.

    Raises:
        DownloadError: the source failed (after retries where that helps).
        SizeMismatch: the body is longer, or announced of another size, than ``size``.
        CasError: the sink could not be written (e.g. no space left).
    """
    if url.lower().startswith("file:"):
        return _download_file(url, sink, progress)
    import time

    t = _Transfer(url, size, policy or Policy.from_env(), progress, verified=verified)
    pool = session.pool if session.pool is not None and session.pool.takes(url) else None
    sink = _Pipeline(sink, t.shown)
    try:
        while True:
            headers = _request_headers(t, sink)
            try:
                if pool is None:
                    return _through_httpx(t, sink, session.client, url, headers)
                from .direct import Handover

                try:
                    return _through_pool(t, sink, pool, url, headers)
                except Handover as h:
                    return _through_httpx(t, sink, session.client, h.url, h.headers)
            except _Retry as exc:
                time.sleep(_pause(t, exc))
            except CasError:
                raise
            except Exception as exc:
                failure = _failure(exc, t)
                if failure is exc:
                    raise
                if not isinstance(failure, _Retry):
                    raise failure from exc
                time.sleep(_pause(t, failure))
    finally:
        sink.close()


def _through_pool(
    t: _Transfer, sink: _Pipeline, pool: Pool, url: str, headers: dict[str, str]
) -> Fetched:
    with pool.get(url, headers, t.policy.timeout) as r:
        _accept(t, sink, r.status, r.headers, r.reason, r.url)
        limit = _limit(t)
        if r.length is not None and r.length >= sink.BATCH and limit == sink.size + r.length:
            # The direct lane receives a sized body into our buffers with no copy per
            # read (as fast as _body_socket, bench_download.py) and keeps the connection.
            _recv_body(t, sink, r.readinto, r.length)
        else:
            while chunk := r.read1(min(r.length or 1 << 16, READ_CHUNK)):
                _write(t, sink, chunk)
        return _finish(t, sink)


def _through_httpx(
    t: _Transfer, sink: _Pipeline, client: httpx.Client, url: str, headers: dict[str, str]
) -> Fetched:
    with client.stream("GET", url, headers=headers, auth=_auth(url), timeout=t.policy.timeout) as r:
        _accept(t, sink, r.status_code, r.headers, r.reason_phrase, str(r.url))
        _receive(t, sink, r)
        return _finish(t, sink)


def _failure(exc: Exception, t: _Transfer) -> Exception:
    """A transport's error as a retry (transient) or a final DownloadError; ``exc``
    itself when it is neither (a bug, not the network's)."""
    import sys

    from .direct import ProtocolError, TooManyRedirects

    httpx = sys.modules.get("httpx")
    text = _describe(exc, t.url)
    if isinstance(exc, ProtocolError):
        # Its text may be the server's raw status line: named and quoted, never echoed.
        what = f"{type(exc).__name__}: {str(exc)[:80]!r}" if str(exc) else type(exc).__name__
        return _Retry(f"bad answer from the server ({what})", cause=exc)
    if isinstance(exc, OSError):
        return _Retry(text, cause=exc)
    # IDNA's error for a host it cannot encode (a..b, a 64-char label): a plain
    # UnicodeError before Python 3.13, a UnicodeEncodeError naming idna since.
    if type(exc) is UnicodeError or getattr(exc, "encoding", None) == "idna":
        return DownloadError(f"invalid URL {t.shown}: {text}", url=t.shown, attempts=t.attempts)
    if httpx is not None and isinstance(
        exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError
    ):
        return _Retry(text, cause=exc)
    if isinstance(exc, TooManyRedirects) or (
        httpx is not None and isinstance(exc, httpx.TooManyRedirects)
    ):
        text = f"more than {MAX_REDIRECTS} redirects (a loop?)"
    elif httpx is not None and isinstance(exc, httpx.InvalidURL):
        return DownloadError(f"invalid URL {t.shown}: {text}", url=t.shown, attempts=t.attempts)
    elif httpx is None or not isinstance(exc, httpx.HTTPError):
        return exc
    return DownloadError(f"download of {t.shown} failed: {text}", url=t.shown, attempts=t.attempts)


def _receive(t: _Transfer, sink: _Pipeline, r: httpx.Response) -> None:
    """Read ``r``'s body into ``sink``: the bulk of a large plain body straight
    from the socket (``_body_socket``), anything else through httpx."""
    chunks = r.iter_raw()
    sock = _body_socket(r, t, sink)
    if sock is not None:
        # httpx yields all that h11 holds (what came with the headers) as one
        # chunk, else reads once: after one chunk, the rest is in the socket.
        for chunk in chunks:
            _write(t, sink, chunk)
            break
        end = _limit(t)
        if end is not None and sink.size < end:
            # h11 never sees the body end, so closing the response closes the
            # connection instead of returning it to the pool.
            sock.settimeout(t.policy.timeout)
            _recv_body(t, sink, sock.recv_into, end - sink.size)
            return
    for chunk in chunks:
        _write(t, sink, chunk)


def _body_socket(r: httpx.Response, t: _Transfer, sink: _Pipeline) -> Any:
    """The socket to read the rest of ``r``'s body from, or None to read it through httpx.

    Only for an HTTP/1.1 body of a known length above ``SOCKET_MIN`` sent as is
    (no chunking, no content coding) on a socket of its own: plain TCP, or
    TLS that the socket itself decrypts.  Not for TLS inside a proxy's TLS,
    where httpcore decrypts through a memory BIO and the socket carries the
    outer layer.
    """
    if not t.verified or r.http_version != "HTTP/1.1" or "transfer-encoding" in r.headers:
        return None
    if r.headers.get("content-encoding", "identity").strip().lower() != "identity":
        return None
    length = _content_length(r.headers)
    if length is None or length < SOCKET_MIN or _limit(t) != sink.size + length:
        return None
    stream = r.extensions.get("network_stream")
    if stream is None:
        return None
    import socket
    import ssl

    sock = stream.get_extra_info("socket")
    if not isinstance(sock, socket.socket):
        return None
    if isinstance(stream.get_extra_info("ssl_object"), ssl.SSLObject):
        return None
    return sock


def _recv_body(
    t: _Transfer, sink: _Pipeline, read_into: Callable[[memoryview], int], remaining: int
) -> None:
    """``remaining`` bytes through ``read_into`` (a socket's ``recv_into``, a
    response's ``readinto``) into ``sink``'s buffers; returns early at EOF
    (``_finish`` then resumes).  What earlier calls returned is kept through an
    error (``recv_into`` returns each read; ``readinto`` may lose its last)."""
    progress = t.progress
    while remaining > 0:
        buf = sink.buffer()
        want = min(len(buf), remaining)
        got = 0
        try:
            while got < want:
                n = read_into(buf[got:want])
                if not n:
                    break
                got += n
                if progress is not None:
                    progress(sink.size + got, t.total)
        finally:
            sink.submit(buf, got)  # what arrived before a failure is kept for a resume
        if got < want:
            return
        remaining -= got


async def adownload(
    url: str,
    sink: Sink,
    *,
    client: httpx.AsyncClient,
    policy: Policy | None = None,
    size: int | None = None,
    progress: ProgressHook | None = None,
) -> Fetched:
    """``download`` on an ``httpx.AsyncClient``; same decisions, same errors.

    Writes to the sink run on the event loop (buffers are small).
    """
    if url.lower().startswith("file:"):
        import asyncio

        return await asyncio.to_thread(_download_file, url, sink, progress)
    import asyncio

    httpx = _httpx()
    t = _Transfer(url, size, policy or Policy.from_env(), progress)
    auth = _auth(url)
    sink = _Pipeline(sink, t.shown)
    try:
        while True:
            headers = _request_headers(t, sink)
            try:
                async with client.stream(
                    "GET", url, headers=headers, auth=auth, timeout=t.policy.timeout
                ) as r:
                    _accept(t, sink, r.status_code, r.headers, r.reason_phrase, str(r.url))
                    async for chunk in r.aiter_raw():
                        _write(t, sink, chunk)
                    return _finish(t, sink)
            except _Retry as exc:
                await asyncio.sleep(_pause(t, exc))
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
                failure = _failure(exc, t)
                if not isinstance(failure, _Retry):
                    raise failure from exc
                await asyncio.sleep(_pause(t, failure))
    finally:
        sink.close()


def _download_file(url: str, sink: Sink, progress: ProgressHook | None = None) -> Fetched:
    path = local_path(url)
    shown = redact(url)
    try:
        total = os.stat(path).st_size
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(READ_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                sink.write(view[:n])
                if progress is not None:
                    progress(sink.size, total)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise DownloadError(
            f"cannot read {shown}: {exc.strerror or exc}", url=shown, path=path
        ) from exc
    st = os.stat(path)
    return Fetched(url=url, last_modified=str(int(st.st_mtime)))


# -- parsing -------------------------------------------------------------------


def _content_length(headers: Any) -> int | None:
    # Repeats of one value ("5, 5", which h11 takes) are that value; a negative,
    # garbled or conflicting one means unknown (pip download.py does the same).
    values = {v.strip() for v in headers.get("content-length", "").split(",")}
    value = values.pop() if len(values) == 1 else ""
    return int(value) if value.isdigit() and value.isascii() else None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, whole size or None) of ``bytes A-B/N``; (None, None) if garbled."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils
    import time

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: BaseException, url: str) -> str:
    """One line for an exception, with ``url`` and any other userinfo redacted."""
    text = (str(exc) or type(exc).__name__).splitlines()[0]
    return _USERINFO.sub(r"\1***@", text.replace(url, redact(url)))
