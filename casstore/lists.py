"""Lists of artifacts for ``casstore fetch``: the line grammar, checks and reports.

A list holds one artifact per line, in any of these forms::

    https://host/pkg-1.0.tar.gz#<sha256>          also #sha256:<hex>, or #<md5> (32 hex)
    https://host/pkg-1.0.tar.gz <sha256> [NAME]
    @EXPLICIT                                      a conda explicit file: from here on,
    https://conda.anaconda.org/.../x.conda#<md5>   URL#<md5>, URL#<sha256>, URL#sha256:<hex>

``#`` at the start of a line or after a blank starts a comment; blank lines are
ignored.  The whole list is parsed and checked before anything is downloaded:
a malformed line is ``InvalidInput`` (exit 2) naming the file and line number.
An md5 alone (conda) is verified in the same pass as the download and the
sha256 recorded beside it.

The conda commands reuse ``parse_explicit_lines`` and ``ListEntry``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from .errors import CasError, InvalidInput
from .hashing import is_hex
from .models import Artifact, Request
from .urls import check_url, file_name, redact

EXPLICIT_MARKER = "@EXPLICIT"


@dataclass(frozen=True)
class ListEntry:
    """One artifact named by a list line; ``sha256`` or ``md5`` (or both) is set."""

    url: str
    sha256: str | None
    md5: str | None
    name: str | None
    line: int
    source: str  # the list's path, for messages

    @property
    def file_name(self) -> str:
        """The last segment of the URL's path: the name under ``--dest``."""
        return file_name(self.url)

    @property
    def key(self) -> str:
        """What identifies the content: the sha256, else the md5."""
        return self.sha256 or f"md5:{self.md5}"

    def request(self, dest_dir: str | os.PathLike[str] | None = None) -> Request:
        dest = None if dest_dir is None else os.path.join(dest_dir, self.file_name)
        return Request(self.url, sha256=self.sha256, md5=self.md5, name=self.name, dest=dest)


def read_list(path: str | os.PathLike[str]) -> list[ListEntry]:
    """Parse the list file at ``path`` (``-`` reads stdin).

    Raises:
        InvalidInput: the file cannot be read or a line is malformed.
    """
    shown = os.fspath(path)
    try:
        if shown == "-":
            import sys

            text, shown = sys.stdin.read(), "<stdin>"
        else:
            text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise InvalidInput(f"cannot read list {shown}: {reason}", path=shown) from exc
    return parse_lines(text.splitlines(), source=shown)


def parse_lines(lines: Iterable[str], *, source: str = "<list>") -> list[ListEntry]:
    """Entries of a ``fetch`` list in any of the forms above, in order.

    Raises:
        InvalidInput: naming ``source`` and the line number of the first bad line.
    """
    entries = []
    explicit = False
    for number, raw in enumerate(lines, 1):
        words = _words(raw)
        if not words:
            continue
        if words == [EXPLICIT_MARKER]:
            explicit = True
            continue
        if explicit:
            entries.append(_explicit_entry(words, number, source))
        else:
            entries.append(_entry(words, number, source))
    return entries


def parse_explicit_lines(lines: Iterable[str], *, source: str = "<explicit>") -> list[ListEntry]:
    """Entries of a conda explicit file: ``URL#<md5>``, ``URL#<sha256>``, ``URL#sha256:<hex>``.

    Comments, blank lines and the ``@EXPLICIT`` marker are skipped; lines
    before the marker must be comments too.

    Raises:
        InvalidInput: naming ``source`` and the line number of the first bad line.
    """
    entries = []
    for number, raw in enumerate(lines, 1):
        words = _words(raw)
        if words and words != [EXPLICIT_MARKER]:
            entries.append(_explicit_entry(words, number, source))
    return entries


def requests_for(
    entries: Sequence[ListEntry], dest_dir: str | os.PathLike[str] | None = None
) -> list[Request]:
    """One Request per entry; with ``dest_dir`` each materialized as DIR/<file name>.

    Raises:
        InvalidInput: two entries would land on one file name with other content.
    """
    if dest_dir is not None:
        seen: dict[str, ListEntry] = {}
        for e in entries:
            other = seen.setdefault(e.file_name, e)
            # An md5 and a sha256 cannot be compared before downloading: a
            # conflict too, reported before anything is fetched.
            if other.key != e.key:
                raise InvalidInput(
                    f"{e.source}:{e.line}: {e.file_name} is also line {other.line} "
                    "with another digest; both cannot be written to the destination",
                    path=e.source,
                    line=e.line,
                )
    return [e.request(dest_dir) for e in entries]


def report(entries: Sequence[ListEntry], outcomes: Sequence[Artifact | CasError]) -> dict:
    """The ``fetch --json`` document: counts, bytes and one record per entry."""
    items = []
    for e, out in zip(entries, outcomes, strict=True):
        item: dict = {
            "line": e.line,
            "url": redact(e.url),
            "sha256": e.sha256,
            "size": None,
            "path": None,
            "dest": None,
            "method": None,
            "status": "ok",
            "error": None,
            "exit_code": 0,
        }
        if isinstance(out, CasError):
            item.update(status="failed", error=str(out), exit_code=out.exit_code)
        else:
            item.update(out.as_dict())
        items.append(item)
    failed = [i for i in items if i["status"] != "ok"]
    return {
        "count": len(items),
        "ok": len(items) - len(failed),
        "failed": len(failed),
        "bytes": sum(i["size"] or 0 for i in items),
        "exit_code": max((i["exit_code"] for i in failed), default=0),
        "items": items,
    }


# -- the grammar ---------------------------------------------------------------


def _words(raw: str) -> list[str]:
    """The line's words before a comment (``#`` at the start or after a blank)."""
    words = []
    for word in raw.split():
        if word.startswith("#"):
            break
        words.append(word)
    return words


def _entry(words: list[str], number: int, source: str) -> ListEntry:
    if len(words) == 1:
        return _explicit_entry(words, number, source)
    if len(words) > 3:
        _fail(source, number, f"expected URL SHA256 [NAME], got {len(words)} fields")
    url = _url(words[0], number, source)
    if "#" in url:
        _fail(source, number, f"{redact(url)} has a digest after '#' and another field")
    sha256, md5 = _digest(words[1], number, source)
    return ListEntry(url, sha256, md5, words[2] if len(words) == 3 else None, number, source)


def _explicit_entry(words: list[str], number: int, source: str) -> ListEntry:
    if len(words) != 1:
        _fail(source, number, "expected URL#<sha256 or md5> alone on the line")
    url, sep, fragment = words[0].rpartition("#")
    if not sep:
        _fail(source, number, f"{redact(words[0])} has no digest: expected URL#<sha256 or md5>")
    url = _url(url, number, source)
    sha256, md5 = _digest(fragment, number, source)
    return ListEntry(url, sha256, md5, None, number, source)


def _url(text: str, number: int, source: str) -> str:
    try:
        return check_url(text)
    except InvalidInput as exc:
        _fail(source, number, str(exc))


def _digest(text: str, number: int, source: str) -> tuple[str | None, str | None]:
    """(sha256, md5) from ``<64 hex>``, ``sha256:<64 hex>`` or ``<32 hex>`` (md5)."""
    prefixed = text.lower().startswith("sha256:")
    value = text[7:] if prefixed else text
    if is_hex(value) and len(value) == 64:
        return value.lower(), None
    if is_hex(value) and len(value) == 32 and not prefixed:
        return None, value.lower()
    _fail(source, number, f"invalid digest {text!r}: expected 64 hex (sha256) or 32 hex (md5)")


def _fail(source: str, number: int, problem: str) -> NoReturn:
    raise InvalidInput(f"{source}:{number}: {problem}", path=source, line=number)
