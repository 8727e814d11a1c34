"""A small threaded HTTP origin on 127.0.0.1 with faults on request.

Tests (and bench/) add routes with a body and the faults to inject, then
assert on what the origin saw: requests per path, Range headers, bytes sent.
Interleavings are forced from outside through ``Route.gate`` (the origin
stops after ``gate_after`` bytes until the test sets the event) and
``Route.sent_event`` (set once ``gate_after`` bytes have gone out).
``Origin(tls=(certfile, keyfile))`` serves https instead of http.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    # Statuses answered (with an empty body) before the real one, in order.
    fail_first: list[int] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = True
    etag: str | None = None
    # Cut the connection after this many body bytes, for the first N requests;
    # with reset, by a TCP reset (RST) instead of a clean close (FIN).
    truncate_at: int | None = None
    truncate_times: int = 1
    reset: bool = False
    # Announce a wrong Content-Length.
    content_length: int | None = None
    redirect_to: str | None = None
    auth: tuple[str, str] | None = None
    # Stall after gate_after bytes until gate is set; sent_event marks reaching it.
    gate_after: int | None = None
    gate_once: bool = False  # stall only the first request that reaches the gate
    gate: threading.Event = field(default_factory=threading.Event)
    sent_event: threading.Event = field(default_factory=threading.Event)
    # Answer a Range request with a 206 starting here, whatever was asked.
    range_start: int | None = None
    # No Content-Length: a chunked body, its end known only when it ends.
    chunked: bool = False
    # Headers the request must carry (else 403), e.g. a token.
    require_headers: dict[str, str] = field(default_factory=dict)
    # Sleep this long between chunks (a slow origin), chunk size.
    drip: float = 0.0
    chunk: int = 64 * 1024
    # Close the connection without an answer, for the first N requests.
    hangup_first: int = 0

    def __post_init__(self) -> None:
        if self.etag is None:
            self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    port: int = 0  # the client's port: one per connection
    status: int = 0
    sent: int = 0
    target: str = ""  # the request line's target, as sent (path, query)


class Origin:
    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in separate writes: without this,
                # Nagle and delayed ACKs stall every small response by ~40 ms.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_HEAD(self) -> None:
                origin._serve(self, head=True)

            def do_GET(self) -> None:
                origin._serve(self, head=False)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                # A client hanging up mid-request is what many tests do on purpose.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        for route in self.routes.values():
            route.gate.set()
        self.server.shutdown()
        self.server.server_close()

    # -- set-up and inspection ----------------------------------------------

    def add(self, path: str, body: bytes = b"", **kw: object) -> str:
        if not path.startswith("/"):
            path = "/" + path
        self.routes[path] = Route(body=body, **kw)  # type: ignore[arg-type]
        return self.base + path

    def url(self, path: str) -> str:
        return self.base + (path if path.startswith("/") else "/" + path)

    def requests(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if path is None or s.path == path]

    def count(self, path: str) -> int:
        return len([s for s in self.requests(path) if s.method == "GET"])

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(s.sent for s in self.requests(path))

    # -- serving ------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = h.path.split("?", 1)[0]
        asked = {k.lower(): v for k, v in h.headers.items()}
        seen = Seen(h.command, path, asked, port=h.client_address[1], target=h.path)
        with self._lock:
            self.seen.append(seen)
            nth = len([s for s in self.seen if s.path == path and s.method == h.command])
        route = self.routes.get(path)
        if route is None:
            return self._empty(h, seen, 404)
        if nth <= route.hangup_first:
            h.close_connection = True
            return None
        if route.auth is not None:
            expected = "Basic " + base64.b64encode(":".join(route.auth).encode()).decode()
            if h.headers.get("Authorization") != expected:
                return self._empty(h, seen, 401, {"WWW-Authenticate": 'Basic realm="t"'})
        if any(h.headers.get(k) != v for k, v in route.require_headers.items()):
            return self._empty(h, seen, 403)
        if nth <= len(route.fail_first):
            status = route.fail_first[nth - 1]
            extra = {"Retry-After": "0"} if status in (429, 503) else {}
            return self._empty(h, seen, status, extra)
        if route.redirect_to is not None:
            return self._empty(h, seen, 302, {"Location": route.redirect_to, **route.headers})
        if route.status != 200:
            return self._empty(h, seen, route.status)

        body, status, start = route.body, 200, 0
        headers = {"ETag": route.etag or "", **route.headers}
        if route.ranges:
            headers["Accept-Ranges"] = "bytes"
        rng = h.headers.get("Range")
        if route.ranges and rng and rng.startswith("bytes="):
            if_range = h.headers.get("If-Range")
            if if_range is None or if_range == route.etag:
                start = int(rng[6:].split("-", 1)[0])
                if route.range_start is not None:
                    start = route.range_start
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        payload = body[start:]
        length = route.content_length if route.content_length is not None else len(payload)
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if route.chunked:
            h.send_header("Transfer-Encoding", "chunked")
            h.close_connection = True
        else:
            h.send_header("Content-Length", str(length))
        h.end_headers()
        seen.status = status
        if head:
            return
        limit = len(payload)
        if route.truncate_at is not None and nth - len(route.fail_first) <= route.truncate_times:
            limit = min(limit, max(0, route.truncate_at - start))
        self._write_body(h, seen, route, payload[:limit], start)
        if route.chunked and limit == len(payload):
            try:
                h.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        if limit < len(payload):
            h.close_connection = True
            try:
                h.wfile.flush()
                if route.reset:
                    # A zero linger time makes close() send RST rather than FIN.
                    linger = struct.pack("ii", 1, 0)
                    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    h.connection.close()
                else:
                    h.connection.shutdown(2)
            except OSError:
                pass

    def _write_body(self, h, seen: Seen, route: Route, payload: bytes, offset: int) -> None:
        view = memoryview(payload)
        pos = 0
        gated = False
        try:
            while True:
                # gate_after=0 stalls right after the headers; len(body) after the last byte.
                # A resumed request that starts at the gate has already been stalled once.
                at_gate = route.gate_after is not None and offset + pos == route.gate_after
                stalled = route.gate_once and route.sent_event.is_set()
                if not gated and at_gate and (pos > 0 or offset == 0) and not stalled:
                    gated = True
                    h.wfile.flush()
                    route.sent_event.set()
                    route.gate.wait(60)
                if pos >= len(view):
                    break
                end = min(len(view), pos + route.chunk)
                if route.gate_after is not None and offset + pos < route.gate_after:
                    end = min(end, route.gate_after - offset)
                if route.chunked:
                    h.wfile.write(b"%x\r\n%s\r\n" % (end - pos, view[pos:end]))
                else:
                    h.wfile.write(view[pos:end])
                seen.sent += end - pos
                pos = end
                if route.drip:
                    h.wfile.flush()
                    time.sleep(route.drip)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    @staticmethod
    def _empty(h, seen: Seen, status: int, headers: dict[str, str] | None = None) -> None:
        seen.status = status
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()
