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
import stat
import threading
from pathlib import Path

from .errors import CasError, InvalidInput
from .hashing import sha256_file
from .models import LinkMode

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
# link() errors after which auto falls back (SPEC §3): another filesystem
# (EXDEV), too many links to this inode (EMLINK), refused (EPERM: no hardlinks
# on this filesystem, or protected_hardlinks for another user's object).
_CANNOT_HARDLINK = {
    errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP,
    errno.ENOSYS,
}  # fmt: skip
# Of those, the ones that hold for every object of the device pair: remembered,
# so auto stops trying.  EMLINK and EPERM can be about one inode: never remembered.
_DEVICE_WIDE = {errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
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
# (store device, destination device) -> methods that cannot work there.
_impossible: dict[tuple[int, int], set[str]] = {}
_probed_lock = threading.Lock()
# Destination devices auto has warned about copying to (one warning each).
_warned: set[int] = set()


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
    temp = dest.parent / f".{dest.name}.{os.urandom(8).hex()}.casstore-tmp"
    try:
        method = _make(src, temp, dest, mode)
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
    points_here = os.path.islink(dest) and Path(os.readlink(dest)) == src
    if mode == LinkMode.SYMLINK:
        if points_here:
            return "symlink"
    elif (st.st_dev, st.st_ino) == (src_st.st_dev, src_st.st_ino):
        return "hardlink"
    if force or points_here:
        return None  # replaced below; a symlink to the object has its content
    if os.path.islink(dest) or st.st_size != src_st.st_size or sha256_file(dest) != sha256:
        raise LinkError(
            f"destination {dest} exists with other content (use --force to replace it)",
            path=str(dest),
        )
    if mode == LinkMode.COPY:
        return "copy"  # already a copy of the object: nothing to do
    return None  # same content: replace it by a link


def _make(src: Path, temp: Path, dest: Path, mode: LinkMode) -> str:
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
                f"cannot hardlink {dest} to {src}: {exc.strerror} "
                "(--link auto falls back to a reflink or a copy)",
                path=str(dest),
            ) from exc
        return "hardlink"
    if mode == LinkMode.REFLINK:
        if not _reflink(src, temp):
            raise LinkError(
                f"cannot reflink {dest} to {src}: the filesystem does not support it",
                path=str(dest),
            )
        return "reflink"
    if mode == LinkMode.COPY:
        _copy(src, temp)
        return "copy"
    return _auto(src, temp, dest.parent)


def _auto(src: Path, temp: Path, dest_dir: Path) -> str:
    key = (src.stat().st_dev, dest_dir.stat().st_dev)
    ruled_out = _impossible.get(key, ())
    if "hardlink" not in ruled_out:
        try:
            os.link(src, temp)
            return "hardlink"
        except OSError as exc:
            if exc.errno not in _CANNOT_HARDLINK:
                raise
            if exc.errno in _DEVICE_WIDE:
                _rule_out(key, "hardlink")
    if "reflink" not in ruled_out:
        if _reflink(src, temp):
            return "reflink"
        _rule_out(key, "reflink")
    _copy(src, temp)
    return "copy"


def _rule_out(key: tuple[int, int], method: str) -> None:
    with _probed_lock:
        _impossible.setdefault(key, set()).add(method)


def first_copy_warning(dest_dir: Path) -> bool:
    """True the first time (per process) auto had to copy onto ``dest_dir``'s device."""
    dev = os.stat(dest_dir).st_dev
    with _probed_lock:
        if dev in _warned:
            return False
        _warned.add(dev)
        return True


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
    import shutil  # ~2 ms (its compression modules), for the copy fallback only

    shutil.copyfile(src, temp)
    os.chmod(temp, 0o644)


def is_live(link: dict, object_path: Path) -> bool:
    """A recorded link still stands: the path has the recorded device and inode
    (and, as inode numbers are reused, the object's size; a hardlink the
    object's very inode), or is a symlink to the object."""
    path = link["path"]
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if link["method"] == "symlink":
        if not stat.S_ISLNK(st.st_mode):
            return False
        try:
            return Path(os.readlink(path)) == object_path
        except OSError:
            return False
    if (st.st_dev, st.st_ino) != (link["device"], link["inode"]) or not stat.S_ISREG(st.st_mode):
        return False
    try:
        obj = object_path.stat()
    except FileNotFoundError:
        return True  # nothing to compare with; the recorded inode is still there
    if link["method"] == "hardlink":
        return (obj.st_dev, obj.st_ino) == (st.st_dev, st.st_ino)
    return obj.st_size == st.st_size
