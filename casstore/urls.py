"""URL checks and redaction, with no network code (fetch.py owns httpx).

Credentials never reach the index, logs or output: every URL is passed
through ``redact`` before it is stored, printed or put in an error.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import parse_qsl, unquote, unquote_to_bytes, urlencode, urlsplit, urlunsplit

from .errors import InvalidInput

SCHEMES = ("http", "https", "file")
_SECRET_PARAM = re.compile(
    r"(token|key|secret|password|passwd|pwd|sig|signature|auth|credential|session)", re.I
)


# anaconda.org-style channel tokens: https://host/t/<token>/channel/...
_TOKEN_SEGMENT = re.compile(r"/t/[^/]+(?=/)")
# An http(s) URL of printable ASCII with no userinfo, query, fragment,
# brackets or backslash: valid, and with nothing to redact (with no "/t/").
# Most URLs are such; this match costs ~0.3 us against ~4 for urlsplit's.
_SAFE = "".join(re.escape(chr(c)) for c in range(ord("!"), ord("~") + 1) if chr(c) not in "@?#[]\\")
_PLAIN = re.compile(f"https?://[{_SAFE.replace('/', '').replace(':', '')}][{_SAFE}]*")


def _plain(url: str) -> bool:
    return _PLAIN.fullmatch(url) is not None and "/t/" not in url


@functools.lru_cache(maxsize=1024)  # a batch redacts each URL several times
def redact(url: str) -> str:
    """``url`` with userinfo, ``/t/<token>/`` segments and secret-looking query
    values replaced by ``***``."""
    if _plain(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    path = _TOKEN_SEGMENT.sub("/t/***", parts.path, count=1)
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode(
                [(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*"
            )
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


def plain_url(url: str) -> str:
    """``url`` with no secrets at all (userinfo, ``/t/<token>/``, query, fragment
    dropped): what conda writes to ``urls.txt``."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    path = _TOKEN_SEGMENT.sub("", parts.path, count=1)
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def check_url(url: str) -> str:
    """Return ``url`` if casstore can fetch it.

    Raises:
        InvalidInput: unsupported scheme or no host, or bytes that are not text
            (the URL is redacted in the message).
    """
    if _plain(url):
        return url
    if not url.isascii():
        try:
            url.encode("utf-8")
        except UnicodeEncodeError:
            # A byte of the command line that is not UTF-8 (Python keeps it as a
            # lone surrogate): no index, log or request could hold it.
            shown = (
                redact(url).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            )
            raise InvalidInput(
                f"invalid URL {shown}: it holds bytes that are not UTF-8 (percent-encode them)",
                url=shown,
            ) from None
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidInput(f"invalid URL {redact(url)!r}: {exc}", url=redact(url)) from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        shown = redact(url)
        raise InvalidInput(
            f"unsupported URL scheme {scheme or '(none)'!r} in {shown}: use http, https or file",
            url=shown,
        )
    if scheme != "file" and not parts.hostname:
        raise InvalidInput(f"invalid URL {redact(url)!r}: no host", url=redact(url))
    return url


def file_name(url: str) -> str:
    """The last segment of the URL's path (``fetch --dest`` names files by it).

    Raises:
        InvalidInput: the segment decodes to something that is not one plain
            file name (``..%2F..%2Fx`` would escape the destination directory).
    """
    name = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    if not name:
        return "download"
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise InvalidInput(f"unsafe file name {name!r} in {redact(url)}", url=redact(url))
    return name


def local_path(url: str) -> str:
    """The filesystem path of a ``file://`` URL, its escapes taken as bytes
    (``%FF`` names the byte 0xFF, as in a file name that is not UTF-8)."""
    import os

    return os.fsdecode(unquote_to_bytes(urlsplit(url).path))
