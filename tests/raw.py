"""A scripted raw HTTP/1.1 server on 127.0.0.1, for answers ``Origin`` cannot give
(interim 1xx answers, framing that contradicts itself).

``Raw(answer)`` calls ``answer(request_head)`` for each request on a kept-alive
connection and sends the bytes it returns (with ``Raw.CLOSE`` after them: then
closes the connection; with ``Raw.DRIP``: sends them a byte at a time, then
closes); ``seen`` lists (client port, head).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class Raw:
    CLOSE = object()
    DRIP = object()

    def __init__(self, answer: Callable[[str], bytes | tuple[bytes, object]]) -> None:
        self.answer = answer
        self.seen: list[tuple[int, str]] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer[1]), daemon=True).start()

    def _serve(self, conn: socket.socket, port: int) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:  # the client hung up on a body it refused
                        return
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.seen.append((port, head.decode("latin-1")))
                out = self.answer(head.decode("latin-1"))
                data, then = out if isinstance(out, tuple) else (out, None)
                try:
                    if then is self.DRIP:  # each byte a segment of its own
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        for i in range(len(data)):
                            conn.sendall(data[i : i + 1])
                    else:
                        conn.sendall(data)
                except OSError:
                    return
                if then in (self.CLOSE, self.DRIP):
                    return
