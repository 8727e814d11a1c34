"""The write path: one unique temp, hashed while it is written, then published.

Order of a write (SPEC §1, invariants 4 and 5):

1. ``tmp/<host>.<pid>.<counter>.<128 random bits>.tmp`` opened with O_EXCL and
   flocked for as long as its writer lives, so gc can tell a dead writer from
   a slow one;
2. every buffer goes to the hashers and the file in the same pass;
3. ``commit()`` checks size and digests (``verify``), sets 0444 and fsyncs
   (``seal``), then ``link(temp, object)``: EEXIST means another writer
   published the same content first and is success (``Published.created`` is
   False);
4. the temp is unlinked and the object's directory fsynced.

``verify``, ``seal`` and ``publish`` are separate so that a batch
(batch.py) can do steps 3 and 4 for many temps at once, in the same order
for each.

The index is written by the caller after this, never before: a visible
object is never rolled back for an index failure.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
from pathlib import Path

from .errors import CasError, HashMismatch, SizeMismatch
from .hashing import Hasher
from .layout import OBJECT_MODE, Layout
from .models import Published

HOST = socket.gethostname().replace(".", "_") or "localhost"
_counter = itertools.count()
# Filesystems without hardlinks answer link() with one of these; there we
# fall back to rename, checking first that no object is there.
_NO_HARDLINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def temp_name() -> str:
    return f"{HOST}.{os.getpid()}.{next(_counter)}.{os.urandom(16).hex()}.tmp"


def parse_temp_name(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temp's writer, or None for a name we did not make."""
    parts = name.split(".")
    if len(parts) < 5 or parts[-1] != "tmp" or not parts[-4].isdigit():
        return None
    return ".".join(parts[:-4]), int(parts[-4])


class Ingest:
    """One in-flight write into the store; use as a context manager.

    Not thread-safe: one writer owns it.  Leaving the ``with`` block without
    a successful ``commit()`` removes the temp file.
    """

    def __init__(self, layout: Layout, *, md5: bool = False, size_hint: int | None = None):
        layout.ensure()
        self.layout = layout
        if size_hint:
            _check_space(layout.tmp, size_hint)
        self.temp = layout.tmp / temp_name()
        self._fd: int | None = os.open(
            self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._md5 = md5
        self.hasher = Hasher(md5=md5)
        self.published: Published | None = None

    @property
    def size(self) -> int:
        return self.hasher.size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.update(data)
        self.append(data)

    # ``write`` in two halves, so a caller can run them on two threads (fetch.py
    # hashes on one while it receives and writes on the other): each half must
    # see every buffer, in order.

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash ``data`` without writing it."""
        self.hasher.update(data)

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to the temp without hashing it."""
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def ensure_space(self, needed: int) -> None:
        """Raise ``CasError`` now if the store cannot take ``needed`` more bytes
        (fetch.py calls it once the origin announces a size)."""
        if needed > 0:
            _check_space(self.layout.tmp, needed)

    def reset(self) -> None:
        """Start over (a server ignored our Range): empty file, fresh hashers."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.hasher = Hasher(md5=self._md5)

    def commit(
        self,
        *,
        sha256: str | None = None,
        size: int | None = None,
        md5: str | None = None,
        source: str = "input",
    ) -> Published:
        """Check the bytes against what was promised and publish them.

        Raises:
            SizeMismatch, HashMismatch: the temp is removed, nothing published.
        """
        actual = self.verify(sha256=sha256, size=size, md5=md5, source=source)
        self.seal()
        path, created = publish(self.layout, self.temp, actual, self.hasher.size)
        return self.published_at(path, created)

    def verify(
        self,
        *,
        sha256: str | None = None,
        size: int | None = None,
        md5: str | None = None,
        source: str = "input",
    ) -> str:
        """The sha256 of the bytes written, once they match what was promised.

        Raises:
            SizeMismatch, HashMismatch: the bytes are not what was promised.
        """
        h = self.hasher
        if size is not None and h.size != size:
            raise SizeMismatch(
                f"size mismatch for {source}: expected {size} bytes, got {h.size}",
                url=source,
                expected=size,
                actual=h.size,
            )
        actual = h.sha256
        if sha256 is not None and actual != sha256:
            raise HashMismatch(
                f"sha256 mismatch for {source}: expected {sha256}, got {actual}",
                url=source,
                algorithm="sha256",
                expected=sha256,
                actual=actual,
            )
        if md5 is not None and h.md5 != md5:
            raise HashMismatch(
                f"md5 mismatch for {source}: expected {md5}, got {h.md5}",
                url=source,
                algorithm="md5",
                expected=md5,
                actual=h.md5,
            )
        return actual

    def seal(self) -> None:
        """Make the temp read-only and its bytes durable (fchmod 0444, fsync).

        The descriptor, and with it the flock that tells gc this writer is
        alive, stays open until ``published_at`` or ``abort``.
        """
        assert self._fd is not None, "sealed after publish or abort"
        os.fchmod(self._fd, OBJECT_MODE)
        os.fsync(self._fd)

    def published_at(self, path: Path, created: bool) -> Published:
        """Record that ``publish`` made the sealed temp the object at ``path``; close the temp."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        h = self.hasher
        self.published = Published(
            sha256=h.sha256, size=h.size, blake3=h.blake3, md5=h.md5, path=path, created=created
        )
        return self.published

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.published is None:
            self.abort()


def publish(
    layout: Layout, temp: Path, sha256: str, size: int, *, sync_dir: bool = True
) -> tuple[Path, bool]:
    """Make ``temp`` (already 0444 and fsynced) the object ``sha256``.

    Returns the object path and whether this call created it.  Finding the
    object already there is success; one of the wrong size (damaged by hand)
    is quarantined and replaced.  With ``sync_dir=False`` the caller must
    fsync the object's directory (``fsync_dir``) before indexing the object.
    """
    obj = layout.object_path(sha256)
    created = False
    try:
        for _ in range(3):
            try:
                os.link(temp, obj)
                created = True
                break
            except FileNotFoundError:
                if not os.path.exists(temp):
                    raise  # the temp is gone: not ours to hide
                # The first object of its ab/cd/ (made here rather than before
                # every link: that was a syscall per object), or another
                # writer's, made since: link again.
                _make_object_dir(obj.parent)
            except FileExistsError:
                existing = _size_or_none(obj)
                if existing == size:
                    break
                if existing is not None:
                    quarantine(layout, obj)
                # else gc removed it between our link() and stat(): link again
            except OSError as exc:
                if exc.errno not in _NO_HARDLINKS:
                    raise
                if not obj.exists():
                    os.rename(temp, obj)
                    created = True
                break
        else:
            raise CasError(f"could not publish {obj}: it kept changing", path=str(obj))
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    if created and sync_dir:
        fsync_dir(obj.parent)
    return obj, created


def quarantine(layout: Layout, obj: Path) -> Path | None:
    """Move a bad object out of ``sha256/`` so it is never served again."""
    layout.quarantine.mkdir(parents=True, exist_ok=True)
    target = layout.quarantine / f"{obj.name}.{os.urandom(4).hex()}"
    try:
        os.rename(obj, target)
    except FileNotFoundError:
        return None
    fsync_dir(obj.parent)
    return target


def _make_object_dir(directory: Path) -> None:
    """Create ``sha256/ab/cd/`` (and ``sha256/ab/`` and ``sha256/``, should they
    be missing), each level fsynced into its parent: an object is durable only
    once every directory on its path is.  The deepest level is tried first:
    its parents are there for all but a store's first objects, and each
    refused mkdir of one already there cost a syscall per object."""
    levels = [directory]  # ab/cd, then ab and sha256 should they be missing
    found = False
    while True:
        try:
            os.mkdir(levels[-1])
        except FileExistsError:
            found = True
        except FileNotFoundError:
            if len(levels) == 3:
                raise  # no sha256/ can be made: the store itself is gone
            levels.append(levels[-1].parent)
            continue
        break
    for level in reversed(levels[:-1]):  # then down again
        try:
            os.mkdir(level)
        except FileExistsError:
            pass
    # Synced whoever made them: a level found made was missing a moment ago
    # (the link that brought us here said so), so its maker, another writer,
    # may not have synced it yet (nor the levels above it, made with it), and
    # our object must not be indexed first.
    if found:
        while len(levels) < 3:
            levels.append(levels[-1].parent)
    for level in levels:
        fsync_dir(level.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _check_space(directory: Path, needed: int) -> None:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise CasError(
            f"not enough free space in {directory}: need {needed} bytes, {free} available",
            path=str(directory),
            expected=needed,
            actual=free,
        )
