"""Plain HTTP/1.1 GETs over the standard library's ``http.client``: the common case, cheaply.

httpx's client layers (cookies, the auth and redirect flows, its URL and
header models) cost ~0.35 ms of CPU per request here; a small file's whole
get costs ~1 ms, so in a batch of small files httpx was a third of the work.
A GET through ``http.client`` on a kept-alive connection costs ~0.14 ms
(``bench/bench_concurrency.py --only small`` and the README).

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
verifying context; interim 1xx answers skipped.  Connections are pooled per
origin (at most ``KEEP`` idle ones, for at most ``KEEP_IDLE`` seconds, as
httpx keeps them), reused only after a body was read to its end, and checked
before reuse: one the server closed, or that holds unread bytes, is dropped.
A reused connection that fails before any byte of the answer (the server
closed it while idle) is retried once on a new one, as httpcore does.

This module knows nothing of sinks, retries or the store: it opens
responses; ``fetch.py`` decides what to do with them.
"""

from __future__ import annotations

import http.client
import os
import re
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urljoin, urlsplit

REDIRECTS = frozenset({301, 302, 303, 307, 308})
KEEP = 20
KEEP_IDLE = 5.0  # seconds a connection stays kept unused, as httpx's keepalive_expiry
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


class BadRedirect(http.client.HTTPException):
    """A Location header that is no URL (httpx: RemoteProtocolError, retried)."""


class _Answer(http.client.HTTPResponse):
    """``http.client``'s response, with its header block read here rather than
    through the ``email`` package (half of its CPU cost for a small file), and
    past every interim 1xx answer (``http.client`` skips ``100 Continue`` only;
    httpx skips them all).  ``begin`` is ``HTTPResponse.begin`` with those two
    changes; the body's framing (chunked, length, close) is decided as there."""

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if not 100 <= status < 200 or status == 101:
                break
            _read_fields(self.fp)  # the interim answer's headers: dropped
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = _read_fields(self.fp)  # type: ignore[assignment]
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding) and encoding.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                pass
            else:
                if self.length < 0:
                    self.length = None
        if status in (204, 304) or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


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


def _read_fields(fp: Any) -> Fields:
    """The header block up to its empty line, decoded as ISO-8859-1 as
    ``http.client`` does.  A folded line continues the field before it, joined
    by a space (as h11, httpx's parser); a line that is no field is refused,
    as h11 refuses it, where the ``email`` package would end the block there."""
    fields: list[tuple[str, str]] = []
    lines = 0
    while True:
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return Fields(fields)
        lines += 1
        if lines > _MAX_FIELDS:
            raise http.client.HTTPException(f"got more than {_MAX_FIELDS} headers")
        text = line.decode("iso-8859-1")
        if text[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {text.strip(_OWS)}".strip(_OWS))
            continue
        name, colon, value = text.partition(":")
        if not colon or not name or " " in name or "\t" in name:
            raise http.client.HTTPException("a malformed header line")
        fields.append((name, value.strip(_OWS)))


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


class _Connection(http.client.HTTPConnection):
    response_class = _Answer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect


class _TLSConnection(http.client.HTTPSConnection):
    response_class = _Answer


def _proxied() -> bool:
    """Whether a proxy is configured for http, https or all, as httpx reads it."""
    if sys.platform not in ("darwin", "win32") and not any(
        name[-6:].lower() == "_proxy" for name in os.environ
    ):
        # Elsewhere urllib.request.getproxies reads only the environment's
        # *_proxy variables: none, no proxy, without importing it (~2.5 ms).
        return False
    from urllib.request import getproxies

    return any(getproxies().get(k) for k in ("http", "https", "all"))


class Pool:
    """Kept-alive ``http.client`` connections per origin; safe to share between threads.

    ``headers`` go with every request (ours; the caller's come per request).
    ``tls`` is the ``ssl.SSLContext`` for https.  The proxies are read once,
    here, as httpx reads them once per client: ``urllib.request.getproxies``,
    the environment's, or on macOS and Windows the system's.
    """

    def __init__(
        self,
        *,
        headers: dict[str, str],
        tls: Any,
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
        self._idle: dict[tuple[str, str, int | None], list[tuple[Any, float]]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._netrc: tuple[Any, Any] | None = None  # (stat key, parsed or None)
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
        if host not in netrc:  # (asked each time: the file may change meanwhile)
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
            OSError, http.client.HTTPException: the connection or the answer failed
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
        parts = urlsplit(url)
        key = _origin(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        asked = {name.lower() for name in headers}
        while True:
            conn, reused = self._take(key, timeout)
            try:
                conn.putrequest("GET", target, skip_host="host" in asked, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in asked:
                        conn.putheader(name, value)
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
                answer = conn.getresponse()
            except (ConnectionError, http.client.BadStatusLine):
                conn.close()
                # RemoteDisconnected, reset, broken pipe on a kept-alive connection:
                # the server closed it while idle; nothing was answered, ask again.
                if reused:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, key, conn, answer, url)

    def _take(self, key: tuple[str, str, int | None], timeout: float) -> tuple[Any, bool]:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn, since = idle.pop() if idle else (None, 0.0)
            if conn is None:
                break
            # Unused too long: a NAT or firewall may have dropped it without a word.
            if time.monotonic() - since < self.keep_idle and _is_quiet(conn.sock):
                conn.sock.settimeout(timeout)
                return conn, True
            conn.close()  # expired, closed by the server, or unread bytes: never reused
        scheme, host, port = key
        connect = min(timeout, self.connect_timeout)
        if scheme == "https":
            conn = _TLSConnection(host, port, timeout=connect, context=self.tls)
        else:
            conn = _Connection(host, port, timeout=connect)
        try:
            conn.connect()
            conn.sock.settimeout(timeout)
        except BaseException:
            conn.close()
            raise
        return conn, False

    def _give_back(self, key: tuple[str, str, int | None], conn: Any) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < KEEP:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def _has_netrc_entry(self, host: str) -> bool:
        """Whether ``~/.netrc`` (or ``$NETRC``) has credentials httpx would send to ``host``.

        The file is parsed again only when it changes; one that cannot be
        parsed counts as having an entry (httpx then warns and goes on).
        """
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        try:
            st = os.stat(path)
        except OSError:
            return False
        stamp = (path, st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._netrc
        if cached is None or cached[0] != stamp:
            import netrc

            try:
                parsed: Any = netrc.netrc(path)
            except (netrc.NetrcParseError, OSError, UnicodeError):
                parsed = None
            self._netrc = cached = (stamp, parsed)
        return cached[1] is None or cached[1].authenticators(host) is not None


class Response:
    """One answer: ``status``, ``reason``, ``headers`` (case-insensitive ``get``),
    ``url`` (after redirects), and its body through ``read1`` / ``readinto`` /
    ``length`` (the bytes still to come, None when unknown or chunked).

    ``readinto`` returns what arrived before a clean EOF; a timeout or reset
    loses what that call had received (the buffered reader raises rather than
    returns), so a resume then starts a little earlier.
    """

    def __init__(self, pool: Pool, key: Any, conn: Any, answer: Any, url: str) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
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
        try:
            if self._answer.length is None or self._answer.length > DRAIN_MAX:
                self._conn.close()
            else:
                self._answer.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
        self.done()

    def done(self) -> None:
        """The connection goes back to the pool if the body was read to its end
        and the server keeps it open; otherwise it is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        answer = self._answer
        if answer.length == 0 and not answer.isclosed():
            answer.read()  # read1 leaves a body read to its end open
        if answer.status >= 200 and answer.isclosed() and not answer.will_close and conn.sock:
            self._pool._give_back(self._key, conn)
        else:
            conn.close()


_PORTS = {"http": 80, "https": 443}
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _after_fork() -> None:
    for pool in list(_pools):
        pool._forget()


os.register_at_fork(after_in_child=_after_fork)


def _close_all(idle: dict[Any, list[tuple[Any, float]]]) -> None:
    for conns in idle.values():
        for conn, _ in conns:
            conn.close()


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port): what a connection is kept for, and what a redirect
    must keep for ``Authorization`` to go along.  Raises ValueError on a URL
    ``urlsplit`` cannot take apart."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _PORTS.get(scheme)
    except ValueError:  # a malformed port: not ours to take, httpx says what is wrong
        port = None
    return scheme, parts.hostname or "", port


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
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:  # a bad port or IPv6 literal: httpx says what is wrong
        return None
    if _DOT_SEGMENT.search(parts.path) or (not parts.query and "?" in url):
        return None
    if not host or parts.username is not None:
        return None
    return host
