"""The cache-hit check, and the command line's fast path for ``get`` hits.

``lookup`` is the one place that decides whether an object is a hit: present
on disk and, if indexed, of the recorded size (anything else is a miss that
the caller heals, never served).  ``Store`` uses it for every hit.

``serve`` answers ``casstore [--store DIR] [-q] get URL --sha256 HEX`` when
the object is already present, with the lightest of the standard library:
no click, httpx, blake3 or sqlite-utils, and not even pathlib, re, typing or
threading (~10 ms of CPU together), so a hit costs a process start, a stat
and one indexed read (~15 ms, less than `python -c 'import sqlite3'` takes:
the index loads the C module alone, see index.py; bench/bench_hit.py).  It
serves only plain URLs (urls.redact would leave them as they are), so it
needs no ``urllib.parse`` either.  On a miss it waits,
still that light, while another process fetches the same digest, so a crowd
of processes behind one download does not each pay for the downloader's
imports.  Nor, mostly, for the index's: the holder leaves a note in the lock
file (``holder_note``) saying which object it published for which URL and
when, and a waiter whose URL and object it names, within the second that
SPEC §8 lets a last use be coarsened to, is served by it without loading
sqlite3 (~5 ms of CPU of such a process's ~16.5).  Anything it does not
recognise, or a miss it must fetch itself, returns None and the full
command line runs instead and does the work (and reports errors) itself.
"""

from __future__ import annotations

import os
import sys
import time

from .errors import CasError
from .hashing import parse_sha256
from .layout import INDEX, default_root, lock_name, make_dirs, object_name

TYPE_CHECKING = False  # not `typing`: the CLI hit path (hit.py) does not import it
if TYPE_CHECKING:
    from pathlib import Path

    from .index import Index

HIT, MISSING, BAD = "hit", "missing", "bad"


def lookup(
    path: str | Path,
    index: Index,
    sha256: str,
    *,
    name: str | None = None,
    source: str | None = None,
) -> tuple[str, int]:
    """(HIT | MISSING | BAD, size on disk) of the object at ``path``; a HIT is recorded as a use."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return MISSING, 0
    row = index.get_object(sha256)
    if row is not None and row["size"] != size:
        return BAD, size
    index.record_use(sha256, size, name=name, source=source)
    return HIT, size


def holder_note(obj: str | Path, indexed: float, source: str) -> str:
    """The note (locks.leave_note) of a holder that has published the object at
    ``obj``, and indexed it, with ``source``, at ``indexed`` or later."""
    return f"published {_identity(obj)} {indexed!r} {source}\n"


def _identity(obj: str | Path) -> str:
    # The file, not the name: an object removed and published again since (rm,
    # quarantine) is another file, with another write time even if its inode
    # number is the old one's.
    st = os.stat(obj)
    return f"{st.st_ino}:{st.st_mtime_ns}"


def _served_by_note(note: str, obj: str, url: str) -> bool:
    """Whether ``note`` (holder_note) says the very file now at ``obj`` was
    indexed for ``url`` in the last second: then a hit would find its row and
    its source, and would not move its last use (coarsened to 1 s), so
    serving it records all a hit would.  A note from ahead of this clock
    (another host's, or before the clock stepped back) does not count."""
    kind, _, rest = note.partition(" ")
    identity, _, rest = rest.partition(" ")
    indexed, _, source = rest.partition(" ")
    if kind != "published" or source != f"{url}\n":
        return False
    try:
        return _identity(obj) == identity and 0.0 <= time.time() - float(indexed) < 1.0
    except (OSError, ValueError):
        return False


def serve(argv: list[str]) -> int | None:
    """Serve a ``get`` hit from ``argv``; None when the full command line must run.

    On a miss it first waits for any other process already fetching the same
    digest (locks.hold_for_process), then looks again: waiters behind one
    download never import the downloading machinery.  If it is this process
    that must download, the lock stays held for the full command line.
    """
    args = _parse(argv)
    if args is None:
        return None
    index = _Index(args[0])
    code = _serve(index, *args)
    if code is None:
        # The full command line takes over with connections of its own, and
        # closes them before it leaves: this one too, or the WAL would stay.
        index.close()
    return code


class _Index:
    """The store's Index, opened on first use: sqlite3 is not even imported for
    a waiter that the holder's note serves."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.index: Index | None = None

    def __call__(self) -> Index:
        if self.index is None:
            from .index import Index

            self.index = Index(self.root)
        return self.index

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


def _serve(index: _Index, root: str, url: str, sha256: str, quiet: bool) -> int | None:
    obj = os.path.join(root, object_name(sha256))
    try:
        status = MISSING
        # A present object of a store with an index: a hit, if lookup agrees.
        if os.path.exists(obj) and os.path.exists(os.path.join(root, INDEX)):
            status, _ = lookup(obj, index(), sha256, source=url)
        if status == MISSING:
            if _wait_for_holder(root, url, sha256, quiet):
                status = HIT  # by the holder's note, which stands for what a hit records
            else:
                status, _ = lookup(obj, index(), sha256, source=url)
    except (CasError, OSError):
        return None
    if status != HIT:
        return None
    try:
        sys.stdout.write(f"{obj}\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `casstore get ... | head -c0`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, AttributeError, ValueError):
        return None  # no usable stdout: the full command line reports it in one line
    return 0


def _wait_for_holder(root: str, url: str, sha256: str, quiet: bool) -> bool:
    """Wait while another process holds ``sha256``'s lock (locks.hold_for_process,
    which keeps the lock if this process must download after all); True if the
    holder's note serves the object."""
    from .locks import hold_for_process, read_note

    make_dirs(root)
    obj = os.path.join(root, object_name(sha256))
    lock = os.path.join(root, lock_name(sha256))
    noted = False
    unnoted_since: float | None = None

    def note_serves() -> bool:
        nonlocal noted
        noted = (  # as of this, the last look: the object may have gone since
            os.path.exists(os.path.join(root, INDEX))  # (else one is made)
            and _served_by_note(read_note(lock), obj, url)  # (a stat of the object)
        )
        return noted

    def published() -> bool:
        # Once granted, an object there is the holder's, noted or not: let go
        # at once, and look it up (loading sqlite3) only then, so that a crowd
        # behind a holder that leaves no note is not served one at a time.
        return note_serves() or os.path.exists(obj)

    def poll() -> bool:
        # While the holder holds the lock, its note is worth waiting for: it
        # notes right after indexing, and lets go right after that.  Only an
        # object it has kept unnoted for a second (a batch's holder, which
        # leaves no note, copying to a slow --dest, say) is not.
        nonlocal unnoted_since
        if not os.path.exists(obj):
            return False
        if note_serves():
            return True
        now = time.monotonic()
        if unnoted_since is None:
            unnoted_since = now
        return now - unnoted_since >= 1.0

    hold_for_process(lock, label=url, on_wait=None if quiet else _warn, done=published, poll=poll)
    return noted


def _warn(message: str) -> None:
    # The full command line's log format (cli.py), for the same messages.
    sys.stderr.write(f"casstore: {message}\n")


def _parse(argv: list[str]) -> tuple[str, str, str, bool] | None:
    """(store root, url, sha256, quiet) for exactly the plain ``get`` form, else None."""
    store = None
    quiet = False
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        if arg == "--store" and i + 1 < len(argv):
            store, i = argv[i + 1], i + 2
        elif arg.startswith("--store="):
            store, i = arg.split("=", 1)[1], i + 1
        elif arg in ("-q", "--quiet"):
            quiet, i = True, i + 1
        else:
            return None
    rest = argv[i:]
    if len(rest) == 4 and rest[0] == "get" and rest[2] == "--sha256":
        url, digest = rest[1], rest[3]
    elif len(rest) == 4 and rest[0] == "get" and rest[1] == "--sha256":
        url, digest = rest[3], rest[2]
    elif len(rest) == 3 and rest[0] == "get" and rest[2].startswith("--sha256="):
        url, digest = rest[1], rest[2].split("=", 1)[1]
    else:
        return None
    root = _root(store)
    if root is None or not _plain_url(url):
        return None
    try:
        return root, url, parse_sha256(digest), quiet
    except CasError:
        return None


def _root(store: str | None) -> str | None:
    """The store's root as Layout spells it (absolute, no ``.`` or empty parts)."""
    path = os.path.expanduser(store) if store else default_root()
    if not path.startswith("/"):
        try:
            path = os.path.join(os.getcwd(), path)
        except OSError:
            return None  # the working directory is gone: the full command line says so
    if path.startswith("//"):
        return None  # pathlib keeps a leading "//"; leave such roots to it
    return "/" + "/".join(part for part in path.split("/") if part not in ("", "."))


def _plain_url(url: str) -> bool:
    """True for a URL that urls.check_url accepts and urls.redact leaves as it is:
    lower-case http, https or file scheme, a host (or a file path), and no
    credentials, tokens, query, fragment, spaces or control characters.
    Anything else goes to the full command line, which imports ``urllib.parse``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https", "file") or not rest:
        return False
    if scheme != "file" and rest[0] in "/:[":
        return False
    return "/t/" not in rest and all("!" <= c <= "~" and c not in "@?#\\" for c in rest)
