"""Plain HTTP/1.1 GETs on kept-alive sockets: the common case, cheaply.

httpx's client layers (cookies, the auth and redirect flows, its URL and
header models) cost ~0.35 ms of CPU per request here; a small file's whole
get costs ~1 ms, so in a batch of small files httpx was a third of the work.
``http.client`` cost ~0.12 ms a request on a kept-alive connection (a
request built header by header, a buffered reader made per answer) and
~7 ms of imports (``email``, ``ssl``); the request written in one piece and
the answer read as below cost ~0.05 ms (``bench/bench_concurrency.py
--only small`` and the README).

An answer is read as ``http.client.HTTPResponse`` reads one (its limits,
its framing: chunked, sized, or until the server closes), but refused
where h11 (httpx's parser) refuses it: a line that is no field, a control
character in a value, a header block cut short by the close, a transfer
coding other than chunked, Content-Lengths that disagree.  Interim 1xx
answers are all skipped, as httpx skips them (``http.client`` skips ``100
Continue`` only).  A refused answer is a ``ProtocolError``, which
``fetch.py`` retries as it retries httpx's.

Only requests where httpx would add nothing come here (``Pool.takes``): an
``http://`` or ``https://`` URL of plain characters, no credentials (none in
the URL, no ``~/.netrc`` entry for its host), and no proxy configured.
Everything else goes to httpx, which stays the reference (``fetch.download``
hands over).  Redirects are followed here by httpx's rules while their
targets qualify (``Pool.get``); one that leads elsewhere, or sets a cookie,
raises ``Handover`` for httpx to carry on.

What goes on the wire is what httpx sends: HTTP/1.1, ``Host``, ``Accept``,
``Accept-Encoding: identity`` (bytes as stored: nothing is decoded),
``Connection: keep-alive``, our ``User-Agent``; TLS through the same
verifying context.  Connections are pooled per origin (at most ``KEEP``
idle ones, for at most ``KEEP_IDLE`` seconds, as httpx keeps them), reused
only after a body was read to its end with nothing received past it, and
checked before reuse: one the server closed, or with bytes waiting, is
dropped.  A reused connection that fails before any byte of the answer (the
server closed it while idle) is retried once on a new one, as httpcore does.

This module knows nothing of sinks, retries or the store: it opens
responses; ``fetch.py`` decides what to do with them.
"""

from __future__ import annotations

import os
import re
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urljoin, urlsplit

REDIRECTS = frozenset({301, 302, 303, 307, 308})
KEEP = 20
KEEP_IDLE = 5.0  # seconds a connection stays kept unused, as httpx's keepalive_expiry
NETRC_FRESH = 1.0  # seconds a look at ~/.netrc holds
_NO_NETRC = object()
DRAIN_MAX = 64 << 10  # a redirect's body bigger than this costs its connection
# RFC 3986's characters: anything else httpx would percent-encode first, so it goes there.
# (ASCII only: with re.I alone, U+017F, the long s, matches "s", letting a
# non-ASCII host through.)
_PLAIN_URL = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", re.I | re.A)
# httpx sends "/a/../b" as "/b" and keeps an empty "?": left to it.
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")


class Handover(Exception):
    """The request left what this module takes (a redirect to a proxied host,
    another scheme, credentials, a cookie): httpx carries on from ``url`` with
    ``headers``."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(url)
        self.url = url
        self.headers = headers


class TooManyRedirects(Exception):
    pass


class ProtocolError(Exception):
    """An answer that breaks HTTP/1.1: its status line, header block or body
    framing (httpx: RemoteProtocolError, retried)."""


class BadStatusLine(ProtocolError):
    """No status line where one was due: on a kept-alive connection, asked again."""


class BadRedirect(ProtocolError):
    """A Location header that is no URL."""


class _Conn:
    """A kept-alive connection: its socket and the bytes received past what was read."""

    __slots__ = ("_buf", "_pos", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._pos = 0  # where the unread part of _buf starts

    def readline(self, limit: int) -> bytes:
        """Up to and including the next ``\\n``, at most ``limit`` bytes; what is left at EOF."""
        buf = self._buf
        while True:
            pos = self._pos
            end = buf.find(b"\n", pos, pos + limit)
            if end >= 0:
                end += 1
            elif len(buf) - pos < limit and self._fill():
                continue
            else:
                pos = self._pos  # (a fill moves what was left to the front)
                end = min(len(buf), pos + limit)
            self._pos = end
            return bytes(buf[pos:end])

    def readinto(self, view: memoryview) -> int:
        pos = self._pos
        have = len(self._buf) - pos
        if not have:
            return self.sock.recv_into(view)
        n = min(have, len(view))
        view[:n] = self._buf[pos : pos + n]
        self._pos = pos + n
        return n

    def read1(self, n: int) -> bytes:
        pos = self._pos
        have = len(self._buf) - pos
        if not have:
            return self.sock.recv(n)
        n = min(have, n)
        self._pos = pos + n
        return bytes(self._buf[pos : pos + n])

    def clean(self) -> bool:
        """Nothing received past the answers read: it may carry another."""
        return self._pos == len(self._buf)

    def close(self) -> None:
        sock, self.sock = self.sock, None  # type: ignore[assignment]
        if sock is not None:
            sock.close()

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if self._pos:  # (only a part line is kept: cheap to move)
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        return bool(data)


class _Answer:
    """One answer read from ``conn``: ``status``, ``reason``, ``headers``, and its
    body through ``read1`` / ``readinto``, framed as ``http.client`` frames it
    (chunked, ``length`` bytes, or until the server closes).  ``complete``
    once the body was read to its end; ``will_close`` when the connection
    cannot carry another answer."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        while True:
            old, status, reason = _read_status(conn)
            if not 100 <= status < 200 or status == 101:
                break
            _read_fields(conn)  # an interim answer's headers: dropped
        self.status = status
        self.reason = reason.strip()
        self.headers = headers = _read_fields(conn)
        # As h11 frames a body: chunked alone or nothing (a body we could not
        # unwrap, say "gzip, chunked", is refused, never stored as it came), and
        # one Content-Length (repeats of one value allowed), else refused.
        codings = [
            c.strip().lower()
            for f in headers.get_all("transfer-encoding", [])
            for c in f.split(",")
        ]
        if codings not in ([], ["chunked"]):
            raise ProtocolError("a transfer coding other than chunked")
        self.chunked = bool(codings)
        self.will_close = _closes(old, headers)
        self.length: int | None = None  # bytes of the body still to come, when sized
        lengths = {v.strip() for f in headers.get_all("content-length", []) for v in f.split(",")}
        if lengths and not self.chunked:
            if len(lengths) > 1 or not _DIGITS.fullmatch(next(iter(lengths))):
                raise ProtocolError("a bad or conflicting Content-Length")
            self.length = int(lengths.pop())
        if status in (204, 304) or status < 200:
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True
        self.complete = self.length == 0
        self._chunk_left: int | None = None  # of the current chunk; None: a size line is due

    def readinto(self, b: memoryview) -> int:
        """Read into ``b``; 0 at the body's end, or at a close that cuts a sized
        body short (``fetch.py`` then resumes); a close inside a chunk raises."""
        if self.complete or not len(b):
            return 0
        if self.chunked:
            left = self._chunk()
            if not left:
                return 0
            n = self._conn.readinto(b[:left] if len(b) > left else b)
            if not n:
                raise ProtocolError("the connection closed inside a chunk")
            self._chunk_left = left - n
            return n
        if self.length is not None and len(b) > self.length:
            b = b[: self.length]
        return self._took(self._conn.readinto(b))

    def read1(self, n: int) -> bytes:
        """At most ``n`` bytes, from one read at most; b"" at the body's end."""
        if self.complete or n <= 0:
            return b""
        if self.chunked:
            left = self._chunk()
            if not left:
                return b""
            data = self._conn.read1(min(n, left))
            if not data:
                raise ProtocolError("the connection closed inside a chunk")
            self._chunk_left = left - len(data)
            return data
        if self.length is not None:
            n = min(n, self.length)
        data = self._conn.read1(n)
        self._took(len(data))
        return data

    def _took(self, n: int) -> int:
        if not n:  # EOF: the end of a body sized by the close, or a short one
            self.complete = self.length is None
            self.will_close = True
        elif self.length is not None:
            self.length -= n
            self.complete = not self.length
        return n

    def _chunk(self) -> int:
        """The bytes left in the current chunk, reading its size line first if
        one is due; 0 once the last chunk and the trailer are read."""
        left = self._chunk_left
        if left:
            return left
        conn = self._conn
        if left == 0 and conn.readline(3) != b"\r\n":
            raise ProtocolError("a chunk not ended by CRLF where its size says")
        line = conn.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise ProtocolError("chunk size line too long")
        m = _CHUNK_SIZE.fullmatch(line)  # (int() alone takes "-0", "+5", "0x5", "1_0")
        if m is None:
            raise ProtocolError("a bad chunk size" if line else "the connection closed in the body")
        left = int(m[1], 16)
        if not left:
            _read_fields(conn)  # the trailer: checked as a header block, dropped
            self.complete = True
        self._chunk_left = left
        return left


def _read_status(conn: _Conn) -> tuple[bool, int, str]:
    """(whether HTTP/1.0 or older, status, reason) from a status line, as h11
    takes one: one space between its parts, three digits, the whole line."""
    line = str(conn.readline(_MAX_LINE + 1), "iso-8859-1")
    if len(line) > _MAX_LINE:
        raise ProtocolError("status line too long")
    if not line:
        raise ConnectionResetError("the server closed the connection without an answer")
    m = _STATUS_LINE.fullmatch(line)
    if m is None or int(m[3]) < 100:
        raise BadStatusLine(line)
    version = (int(m[1]), int(m[2]))
    if version[0] != 1 and version != (0, 9):
        raise ProtocolError(f"unknown protocol HTTP/{m[1]}.{m[2]}")
    return version <= (1, 0), int(m[3]), m[4] or ""


def _closes(old: bool, headers: Fields) -> bool:
    """Whether the server closes the connection after this answer, as ``http.client`` decides."""
    conn = (headers.get("connection") or "").lower()
    if not old:
        return "close" in conn
    # HTTP/1.0 keeps a connection only when it says so.
    return not (
        headers.get("keep-alive")
        or "keep-alive" in conn
        or "keep-alive" in (headers.get("proxy-connection") or "").lower()
    )


class Fields:
    """An answer's header fields, in order; ``get`` (the first value) and
    ``__contains__`` without regard to case, ``get_all`` and ``items`` as
    ``http.client.HTTPMessage`` has them."""

    __slots__ = ("_fields", "_first")

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields
        first: dict[str, str] = {}
        for name, value in fields:
            first.setdefault(name.lower(), value)
        self._first = first

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    def get_all(self, name: str, failobj: Any = None) -> list[str] | Any:
        key = name.lower()
        return [v for n, v in self._fields if n.lower() == key] or failobj

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first


_MAX_LINE = 65536  # http.client's limits
_MAX_FIELDS = 100
_OWS = " \t\r\n"
# What h11 takes: a field name is a token; a value has no control character
# but tab (a bare CR kept in an ETag would go back out in an If-Range).
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+")
_STATUS_LINE = re.compile(r"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([^\r\n]*))?\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})[ \t]*(?:;[^\r\n]*)?\r?\n")


def _read_fields(conn: _Conn) -> Fields:
    """The header block up to its empty line, decoded as ISO-8859-1 as
    ``http.client`` does.  A folded line continues the field before it, joined
    by a space (as h11, httpx's parser); a line that is no field, or a block
    cut short by the close, is refused, as h11 refuses it (the ``email``
    package would end the block there, and an answer cut after its status
    line would pass for one with no body)."""
    fields: list[tuple[str, str]] = []
    lines = 0
    while True:
        line = conn.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise ProtocolError("header line too long")
        if line in (b"\r\n", b"\n"):
            return Fields(fields)
        if not line.endswith(b"\n"):
            raise ProtocolError("the connection closed inside the header block")
        lines += 1
        if lines > _MAX_FIELDS:
            raise ProtocolError(f"got more than {_MAX_FIELDS} headers")
        text = line.decode("iso-8859-1")
        if text[0] in " \t" and fields:
            name, value = fields[-1]
            more = text.strip(_OWS)
            if _CTL.search(more):
                raise ProtocolError("a malformed header line")
            fields[-1] = (name, f"{value} {more}".strip(_OWS))
            continue
        name, colon, value = text.partition(":")
        value = value.strip(_OWS)
        if not colon or not _TOKEN.fullmatch(name) or _CTL.search(value):
            raise ProtocolError("a malformed header line")
        fields.append((name, value))


def _connect(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
    """``socket.create_connection``, with the host as bytes: getaddrinfo passes
    a str host through the idna codec, whose import (stringprep, unicodedata)
    costs a get ~1 ms of CPU.  The pool takes plain ASCII hosts only, which
    the codec would only check as here: the same error for a bad name."""
    host, port = address
    name = host.encode("ascii")
    *labels, last = name.split(b".")
    if not all(0 < len(label) < 64 for label in labels) or len(last) >= 64:
        raise UnicodeError("label empty or too long")
    return socket.create_connection((name, port), *args, **kwargs)


def _proxied() -> bool:
    """Whether a proxy is configured for http, https or all, as httpx reads it."""
    if sys.platform not in ("darwin", "win32") and not any(
        name.lower() in ("http_proxy", "https_proxy", "all_proxy") for name in os.environ
    ):
        # Elsewhere urllib.request.getproxies reads only the environment's
        # *_proxy variables, and of those only these three could name a proxy
        # for us: none of them, no proxy, without importing it (~7 ms with the
        # http.client, email and ssl it imports).  NO_PROXY, set on many CI
        # machines, does not count.
        return False
    from urllib.request import getproxies

    return any(getproxies().get(k) for k in ("http", "https", "all"))


class Pool:
    """Kept-alive connections per origin; safe to share between threads.

    ``headers`` go with every request (ours; the caller's come per request).
    ``tls()`` gives the ``ssl.SSLContext`` for https (asked at the first one).
    The proxies are read once, here, as httpx reads them once per client:
    ``urllib.request.getproxies``, the environment's, or on macOS and Windows
    the system's.
    """

    def __init__(
        self,
        *,
        headers: dict[str, str],
        tls: Callable[[], Any],
        connect_timeout: float,
        max_redirects: int,
        keep_idle: float = KEEP_IDLE,
    ) -> None:
        self.headers = headers
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.max_redirects = max_redirects
        self.keep_idle = keep_idle
        self.proxied = _proxied()
        # Per origin, the kept connections and when each was given back.
        self._idle: dict[tuple[str, str, int | None], list[tuple[_Conn, float]]] = {}
        self._lock = threading.Lock()
        self._closed = False
        # (stat key or None, parsed, None if unparsable or _NO_NETRC, when looked at)
        self._netrc: tuple[Any, Any, float] | None = None
        # By URL, its host if its shape suits this pool, else None: a batch asks
        # for each of its URLs twice (its helper's share, then the download).
        self._hosts: dict[str, str | None] = {}
        _pools.add(self)

    def takes(self, url: str) -> bool:
        """True if a GET of ``url`` can go here rather than through httpx."""
        return self._takes(url, {})

    def takes_all(self, urls: Iterable[str]) -> list[bool]:
        """``takes`` for each of ``urls``, looking at ``~/.netrc`` once per host."""
        netrc: dict[str, bool] = {}
        return [self._takes(url, netrc) for url in urls]

    def _takes(self, url: str, netrc: dict[str, bool]) -> bool:
        if self.proxied:
            return False
        try:
            host = self._hosts[url]
        except KeyError:
            if len(self._hosts) >= 1 << 16:
                self._hosts.clear()
            host = self._hosts[url] = _plain_host(url)
        if host is None:
            return False
        if host not in netrc:  # (looked at again each NETRC_FRESH: it may change)
            netrc[host] = self._has_netrc_entry(host)
        return not netrc[host]

    @contextmanager
    def get(self, url: str, headers: dict[str, str], timeout: float) -> Iterator[Response]:
        """The response to ``GET url``, redirects followed, its body not yet read.

        Redirects as httpx follows them: ``Cookie`` is not sent on, ``Host``
        and ``Authorization`` not to another origin (``Authorization`` stays
        on an upgrade from http://host to https://host).  A chain in which a
        cookie set by one hop would go with a later one is handed over whole:
        httpx asks for ``url`` again and carries its cookies hop to hop (a
        URL good for one request only would fail there).

        Raises:
            Handover: a redirect left what ``takes``; httpx goes on from there.
            TooManyRedirects: more than ``max_redirects``.
            OSError, ProtocolError: the connection or the answer failed
                (``BadRedirect``: a Location that is no URL).
        """
        first, asked = url, headers
        cookies: list[tuple[str, str]] = []  # (Set-Cookie, the host that set it)
        for hop in range(self.max_redirects + 1):
            response = self._exchange(url, headers, timeout)
            location = response.headers.get("location")
            if response.status not in REDIRECTS or not location:
                break
            setter = urlsplit(url).hostname or ""
            cookies += [(c, setter) for c in response.headers.get_all("set-cookie") or []]
            response.drain()
            if hop == self.max_redirects:
                break
            try:
                target = urljoin(url, location.strip())
                here, there = _origin(url), _origin(target)
            except ValueError as exc:
                # The Location itself may hold credentials: never echoed.
                raise BadRedirect("a redirect to an invalid URL") from exc
            if any(_applies(cookie, setter, there[1]) for cookie, setter in cookies):
                # httpx carries cookies from hop to hop; it asks for ``first`` again.
                raise Handover(first, asked)
            drop = {"cookie"}
            if here != there:
                drop.add("host")
                if not _is_https_upgrade(here, there):
                    drop.add("authorization")
            headers = {k: v for k, v in headers.items() if k.lower() not in drop}
            if not self.takes(target):
                # With cookies gathered, httpx takes the whole chain: they may be
                # needed further on (a login host, then back to the data's).
                raise Handover(first, asked) if cookies else Handover(target, headers)
            url = target
        if response.status in REDIRECTS and location:
            raise TooManyRedirects(url)
        try:
            yield response
        finally:
            response.done()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        _close_all(idle)

    def _forget(self) -> None:
        """In a forked child: the kept connections are the parent's (two processes
        reading one socket would take each other's answers); drop our copies."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        idle, self._idle = self._idle, {}
        _close_all(idle)  # closes the child's descriptors only: no shutdown

    def _exchange(self, url: str, headers: dict[str, str], timeout: float) -> Response:
        key, path, query, _ = _split(url)
        asked = {name.lower() for name in headers}
        # As http.client writes it: the request line, Host, ours, the caller's.
        lines = [f"GET {path or '/'}{'?' if query else ''}{query} HTTP/1.1"]
        if "host" not in asked:
            lines.append(f"Host: {_host_field(key)}")
        lines += [f"{n}: {v}" for n, v in self.headers.items() if n.lower() not in asked]
        lines += [f"{n}: {v}" for n, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        while True:
            conn, reused = self._take(key, timeout)
            try:
                conn.sock.sendall(request)
                answer = _Answer(conn)
            except (ConnectionError, BadStatusLine):
                conn.close()
                # Reset, broken pipe or no answer at all on a kept-alive connection:
                # the server closed it while idle; nothing was answered, ask again.
                if reused:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, key, conn, answer, url)

    def _take(self, key: tuple[str, str, int | None], timeout: float) -> tuple[_Conn, bool]:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn, since = idle.pop() if idle else (None, 0.0)
            if conn is None:
                break
            # Unused too long: a NAT or firewall may have dropped it without a word.
            if time.monotonic() - since < self.keep_idle and _is_quiet(conn.sock):
                if conn.sock.gettimeout() != timeout:  # (a syscall each time: only if changed)
                    conn.sock.settimeout(timeout)
                return conn, True
            conn.close()  # expired, closed by the server, or unread bytes: never reused
        scheme, host, port = key
        sock = _connect((host, port or _PORTS[scheme]), min(timeout, self.connect_timeout))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as http.client
            if scheme == "https":
                sock = self.tls().wrap_socket(sock, server_hostname=host)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock), False

    def _give_back(self, key: tuple[str, str, int | None], conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < KEEP:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def _has_netrc_entry(self, host: str) -> bool:
        """Whether ``~/.netrc`` (or ``$NETRC``) has credentials httpx would send to ``host``.

        The file is looked at again once ``NETRC_FRESH`` seconds have passed
        (an environment read, a path expanded and a stat cost each small file
        of a batch ~4 us), and parsed again only when it changed; one that
        cannot be parsed counts as having an entry (httpx then warns and goes on).
        """
        now = time.monotonic()
        cached = self._netrc
        if cached is None or now - cached[2] >= NETRC_FRESH:
            path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
            try:
                st = os.stat(path)
            except OSError:
                stamp = None
            else:
                stamp = (path, st.st_mtime_ns, st.st_size, st.st_ino)
            parsed: Any = cached[1] if cached is not None and cached[0] == stamp else _NO_NETRC
            if stamp is not None and parsed is _NO_NETRC:
                import netrc

                try:
                    parsed = netrc.netrc(path)
                except (netrc.NetrcParseError, OSError, UnicodeError):
                    parsed = None
            self._netrc = cached = (stamp, parsed, now)
        parsed = cached[1]
        if parsed is _NO_NETRC:
            return False
        return parsed is None or parsed.authenticators(host) is not None


class Response:
    """One answer: ``status``, ``reason``, ``headers`` (case-insensitive ``get``),
    ``url`` (after redirects), and its body through ``read1`` / ``readinto`` /
    ``length`` (the bytes still to come, None when unknown or chunked).

    Each read returns what one receive brought, so nothing received is lost
    to a timeout or reset that ends a later one: a resume starts right there.
    """

    def __init__(self, pool: Pool, key: Any, conn: _Conn, answer: _Answer, url: str) -> None:
        self._pool = pool
        self._key = key
        self._conn: _Conn | None = conn
        self._answer = answer
        self.status: int = answer.status
        self.reason: str = answer.reason
        self.headers = answer.headers
        self.url = url
        self.read1 = answer.read1
        self.readinto = answer.readinto

    @property
    def length(self) -> int | None:
        return self._answer.length

    def drain(self) -> None:
        """Read a (redirect's) body to its end to keep the connection, then let it go."""
        answer = self._answer
        try:
            if answer.length is not None and answer.length <= DRAIN_MAX:
                while answer.read1(DRAIN_MAX):
                    pass
        except (OSError, ProtocolError):
            answer.will_close = True
        self.done()

    def done(self) -> None:
        """The connection goes back to the pool if the body was read to its end,
        nothing came after it and the server keeps it open; otherwise it is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        answer = self._answer
        if answer.status >= 200 and answer.complete and not answer.will_close and conn.clean():
            self._pool._give_back(self._key, conn)
        else:
            conn.close()


_PORTS = {"http": 80, "https": 443}
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _after_fork() -> None:
    for pool in list(_pools):
        pool._forget()


os.register_at_fork(after_in_child=_after_fork)


def _close_all(idle: dict[Any, list[tuple[_Conn, float]]]) -> None:
    for conns in idle.values():
        for conn, _ in conns:
            conn.close()


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port): what a connection is kept for, and what a redirect
    must keep for ``Authorization`` to go along.  Raises ValueError on a URL
    ``urlsplit`` cannot take apart."""
    parts = urlsplit(url)
    try:
        return _key(parts)
    except ValueError:  # a malformed port: not ours to take, httpx says what is wrong
        return parts.scheme.lower(), parts.hostname or "", None


def _key(parts: Any) -> tuple[str, str, int | None]:
    """``_origin`` of split ``parts``; ValueError on a malformed port."""
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", parts.port or _PORTS.get(scheme)


# The common shape of a URL: a scheme, a host name, a port maybe, then the rest.
_SIMPLE_URL = re.compile(
    r"(https?)://([A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?([/?#][^\x00-\x20\x7f]*)?", re.A | re.I
)


def _split(url: str) -> tuple[tuple[str, str, int | None], str, str, bool]:
    """(``_origin(url)``, path, query, whether it holds credentials), as
    ``urlsplit`` takes ``url`` apart.  A URL of the common shape is taken apart
    by one regex (~1 us; ``urlsplit`` and its attributes cost ~5, and a batch
    asks for each of its URLs before it starts); any other by ``urlsplit``.
    Raises ValueError where ``urlsplit`` does (a bad port)."""
    m = _SIMPLE_URL.fullmatch(url)
    if m is not None and (m[3] is None or int(m[3]) < 65536):
        scheme, host, port, rest = m.groups()
        path, _, query = (rest or "").partition("#")[0].partition("?")
        scheme = scheme.lower()
        return (scheme, host.lower(), int(port or 0) or _PORTS[scheme]), path, query, False
    parts = urlsplit(url)
    return _key(parts), parts.path, parts.query, parts.username is not None


def _host_field(key: tuple[str, str, int | None]) -> str:
    """The Host field http.client writes for an origin: the port only when not the default."""
    scheme, host, port = key
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return name if port in (None, _PORTS[scheme]) else f"{name}:{port}"


_COOKIE_DOMAIN = re.compile(r";\s*domain\s*=\s*\.?([^;\s]+)", re.I)


def _applies(cookie: str, host: str, target: str) -> bool:
    """Whether a cookie ``host`` set could go with a request to ``target``, as
    ``http.cookiejar`` (httpx's) would send it: to the setter's host, its
    ``Domain`` and their subdomains.  Paths are left aside: a cookie that
    would not go only costs a needless hand-over."""
    m = _COOKIE_DOMAIN.search(cookie)
    domain = m.group(1).lower() if m else host
    return target == domain or target.endswith("." + domain)


def _is_https_upgrade(
    here: tuple[str, str, int | None], there: tuple[str, str, int | None]
) -> bool:
    """http://host to https://host on the default ports: httpx keeps ``Authorization``."""
    return here == ("http", there[1], 80) and there == ("https", here[1], 443)


def _is_quiet(sock: Any) -> bool:
    """True if an idle connection's socket has nothing to read: not closed by the
    server, no stray bytes (TLS: none buffered either).  ``poll``, not
    ``select``: a batch may hold descriptors past 1024, which ``select`` refuses."""
    if sock is None:
        return False
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():
        return False
    try:
        fileno = sock.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fileno, select.POLLIN)
            return not poller.poll(0)
        readable, _, _ = select.select([fileno], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _plain_host(url: str) -> str | None:
    """The host of ``url`` if the pool can GET it (plain http or https, no
    credentials, dot segments or empty query), else None."""
    if not _PLAIN_URL.fullmatch(url):
        return None
    try:
        (_, host, _), path, query, credentials = _split(url)
    except ValueError:  # a bad port or IPv6 literal: httpx says what is wrong
        return None
    if _DOT_SEGMENT.search(path) or (not query and "?" in url):
        return None
    if not host or credentials:
        return None
    return host
