"""Bytes from a URL into a sink: the only module that imports httpx.

A sink is anything with ``write(bytes)``, ``reset()`` and ``size`` (an
``ingest.Ingest``); this module knows nothing of the store or SQL.  httpx and
OS errors are turned into ``DownloadError`` here, chained, with the URL
redacted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import __version__
from .errors import DownloadError
from .urls import local_path, redact

if TYPE_CHECKING:
    import httpx

READ_CHUNK = 1 << 20


class Sink(Protocol):
    size: int

    def write(self, data: bytes | memoryview) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class Fetched:
    """What the origin said about the body just written to the sink."""

    url: str  # final URL after redirects (not redacted; redact before storing)
    etag: str | None = None
    last_modified: str | None = None


def new_client(*, timeout: float = 30.0) -> httpx.Client:
    import httpx

    return httpx.Client(
        follow_redirects=True,
        max_redirects=10,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        trust_env=True,
        # Bytes as stored on the origin: a .tar.gz served with
        # Content-Encoding: gzip must not be decompressed (pip does the same).
        headers={"User-Agent": f"casstore/{__version__}", "Accept-Encoding": "identity"},
    )


def download(url: str, sink: Sink, *, client: httpx.Client) -> Fetched:
    """Stream ``url`` into ``sink``.

    Raises:
        DownloadError: the source failed or sent a body of the wrong length.
    """
    if url.lower().startswith("file:"):
        return _download_file(url, sink)
    import httpx

    shown = redact(url)
    try:
        with client.stream("GET", url) as response:
            if response.status_code >= 400:
                raise DownloadError(
                    f"HTTP {response.status_code} {response.reason_phrase} for {shown}",
                    url=shown,
                    status=response.status_code,
                )
            for chunk in response.iter_raw():
                sink.write(chunk)
            expected = _content_length(response)
            if expected is not None and sink.size != expected:
                raise DownloadError(
                    f"body of {shown} has {sink.size} bytes, Content-Length said {expected}",
                    url=shown,
                    status=response.status_code,
                )
            return Fetched(
                url=str(response.url),
                etag=response.headers.get("etag"),
                last_modified=response.headers.get("last-modified"),
            )
    except httpx.HTTPError as exc:
        raise DownloadError(
            f"download of {shown} failed: {_describe(exc, url)}", url=shown
        ) from exc
    except httpx.InvalidURL as exc:
        raise DownloadError(f"invalid URL {shown}: {exc}", url=shown) from exc


def _download_file(url: str, sink: Sink) -> Fetched:
    path = local_path(url)
    shown = redact(url)
    try:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(READ_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                sink.write(view[:n])
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise DownloadError(
            f"cannot read {shown}: {exc.strerror or exc}", url=shown, path=path
        ) from exc
    st = os.stat(path)
    return Fetched(url=url, last_modified=str(int(st.st_mtime)))


def _content_length(response: httpx.Response) -> int | None:
    # A negative or garbled Content-Length means unknown (pip download.py does the same).
    try:
        value = int(response.headers.get("content-length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _describe(exc: Exception, url: str) -> str:
    text = (str(exc) or type(exc).__name__).splitlines()[0]
    return text.replace(url, redact(url))
