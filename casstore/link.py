"""Materialize an object at a destination: hardlink, reflink, copy or symlink.

A destination is created under a temp name in its own directory and renamed
into place, so a reader never sees half a file.  ``auto`` never fails because
hardlinks are impossible (EXDEV, EMLINK, EPERM): it falls back to a reflink,
then a copy, and remembers per (store device, destination device) what worked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import threading
from pathlib import Path

from .errors import CasError, InvalidInput
from .hashing import sha256_file
from .models import LinkMode

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_CANNOT_HARDLINK = {errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES, errno.ENOTSUP}
_CANNOT_REFLINK = {
    errno.EXDEV,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EINVAL,
    errno.ENOTTY,
    errno.EPERM,
    errno.EBADF,
    errno.ENOSYS,
}
# (store device, destination device) -> first method that worked for auto.
_probed: dict[tuple[int, int], str] = {}
_probed_lock = threading.Lock()


class LinkError(CasError):
    """A destination could not be materialized the way that was asked."""


def parse_mode(value: str | LinkMode) -> LinkMode:
    try:
        return LinkMode(value)
    except ValueError:
        choices = ", ".join(m.value for m in LinkMode)
        raise InvalidInput(f"unknown link mode {value!r}: choose one of {choices}") from None


def materialize(src: Path, dest: Path, mode: LinkMode, *, sha256: str, force: bool = False) -> str:
    """Make ``dest`` hold the object at ``src``; return the method used.

    An existing ``dest`` that is already this object is left alone; one with the
    same content is replaced by a link; one with other content is an error
    unless ``force``.

    Raises:
        LinkError: strict ``hardlink``/``reflink`` impossible, or ``dest`` differs.
        FileNotFoundError: ``src`` vanished (gc); the caller fetches it again.
    """
    dest = Path(os.path.abspath(dest))
    existing = _existing(src, dest, mode, sha256=sha256, force=force)
    if existing:
        return existing
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.parent / f".{dest.name}.{secrets.token_hex(8)}.casstore-tmp"
    try:
        method = _make(src, temp, dest.parent, mode)
        os.replace(temp, dest)
    finally:
        # rename() between two links to one inode does nothing and leaves temp.
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    return method


def _existing(src: Path, dest: Path, mode: LinkMode, *, sha256: str, force: bool) -> str | None:
    try:
        st = dest.lstat()
    except FileNotFoundError:
        return None
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise LinkError(f"destination {dest} is a directory", path=str(dest))
    src_st = src.stat()
    if mode == LinkMode.SYMLINK:
        if os.path.islink(dest) and Path(os.readlink(dest)) == src:
            return "symlink"
    elif (st.st_dev, st.st_ino) == (src_st.st_dev, src_st.st_ino):
        return "hardlink"
    if force:
        return None
    if os.path.islink(dest) or st.st_size != src_st.st_size or sha256_file(dest) != sha256:
        raise LinkError(
            f"destination {dest} exists with other content (use --force to replace it)",
            path=str(dest),
        )
    return None  # same content: replace it by a link


def _make(src: Path, temp: Path, dest_dir: Path, mode: LinkMode) -> str:
    if mode == LinkMode.SYMLINK:
        os.symlink(src, temp)
        return "symlink"
    if mode == LinkMode.HARDLINK:
        try:
            os.link(src, temp)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise
            raise LinkError(
                f"cannot hardlink {temp.parent} to the store: {exc.strerror}", path=str(temp.parent)
            ) from exc
        return "hardlink"
    if mode == LinkMode.REFLINK:
        if not _reflink(src, temp):
            raise LinkError(
                f"cannot reflink into {dest_dir}: the filesystem does not support it",
                path=str(dest_dir),
            )
        return "reflink"
    if mode == LinkMode.COPY:
        _copy(src, temp)
        return "copy"
    return _auto(src, temp, dest_dir)


def _auto(src: Path, temp: Path, dest_dir: Path) -> str:
    key = (src.stat().st_dev, dest_dir.stat().st_dev)
    known = _probed.get(key)
    if known in (None, "hardlink"):
        try:
            os.link(src, temp)
            _remember(key, "hardlink")
            return "hardlink"
        except OSError as exc:
            if exc.errno not in _CANNOT_HARDLINK:
                raise
    if known in (None, "hardlink", "reflink") and _reflink(src, temp):
        _remember(key, "reflink")
        return "reflink"
    _copy(src, temp)
    _remember(key, "copy")
    return "copy"


def _remember(key: tuple[int, int], method: str) -> None:
    with _probed_lock:
        _probed[key] = method


def _reflink(src: Path, temp: Path) -> bool:
    with open(src, "rb") as s:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.ioctl(fd, FICLONE, s.fileno())
            return True
        except OSError as exc:
            if exc.errno not in _CANNOT_REFLINK:
                raise
        finally:
            os.close(fd)
    os.unlink(temp)
    return False


def _copy(src: Path, temp: Path) -> None:
    shutil.copyfile(src, temp)
    os.chmod(temp, 0o644)
