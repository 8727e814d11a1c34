"""gc: reclaim space without ever breaking a running get, link or fetch (SPEC §6).

Roots, never evicted: pinned objects, objects with a live recorded link (the
path still has the recorded device and inode, or is a symlink to the object),
and any object whose inode has more than one link (a hardlink made by us or
another tool).  Every run also removes what is provably dead:

- temps in ``tmp/`` whose writer is gone (same host, pid gone) or that were
  untouched for longer than a grace period; a temp is only removed while gc
  holds its flock, which a live writer holds for as long as it writes;
- lock files in ``locks/`` nobody holds, unlinked while gc holds them (never
  one someone holds or awaits: filelock#574; locks.py re-checks after locking
  that the path still names its inode, so a waiter on an unlinked file retries);
- index rows of objects no longer on disk, link rows no longer live.

Eviction (``older_than``, ``max_size``) re-checks each object right before
deleting it: still unrooted, not used since the plan was made, and its inode
unchanged since gc looked at it (a new hardlink, even one already removed
again, moves its ctime).  An object whose artifact lock is held is skipped: a
get downloads, publishes and materializes under that lock.  A reader that
loses the race anyway (a hit evicted between its look and its use) finds the
object gone and fetches it again (Store.ensure, Store.link).  Object
directories are never removed: a concurrent publish may have just created one.

Uses index and layout only, never the Store.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .index import Index
from .ingest import HOST, parse_temp_name, temp_name
from .layout import Layout
from .link import is_live
from .locks import try_hold
from .reports import GcReport

DEFAULT_TEMP_GRACE = 86400.0  # a temp untouched for a day is abandoned, whoever wrote it
# An object without an index row may be one whose writer has published it and
# is about to commit its row (SPEC §1.5: object first, index second).
UNINDEXED_GRACE = 60.0
# Last use is coarsened to one second (SPEC §8: a hit within a second of the
# recorded use writes nothing), so an object whose recorded use is under two
# seconds old may have been hit a moment ago by a get about to link it: it is
# not evicted.  (`get` then `link` as two commands relies on this.)
IN_USE_WINDOW = 2.0


@dataclass
class _Candidate:
    sha256: str
    path: Path
    size: int
    last_used: float
    # (inode, ctime_ns, nlink) when planned; any change since means someone used it.
    seen: tuple[int, int, int]


def collect(
    layout: Layout,
    index: Index,
    *,
    older_than: float | None = None,
    max_size: int | None = None,
    dry_run: bool = False,
    temp_grace: float = DEFAULT_TEMP_GRACE,
    in_use_window: float = IN_USE_WINDOW,
) -> GcReport:
    """Run gc over one store; see the module docstring for what is removed.

    ``older_than`` (seconds) evicts unrooted objects not used since then;
    ``max_size`` (bytes) evicts unrooted objects, least recently used first,
    until the objects fit.  Objects without an index row count as used at
    their mtime.  Objects used in the last ``in_use_window`` seconds are
    treated as in use.  Safe beside any number of readers and writers.
    """
    start = time.time()
    report = GcReport(dry_run=dry_run)
    if not layout.root.is_dir():
        return report
    _sweep_temps(layout, report, now=start, grace=temp_grace)
    _sweep_locks(layout, report)

    rows = index.object_rows()
    on_disk: dict[str, tuple[Path, os.stat_result]] = {}
    for sha, path in layout.iter_objects():
        try:
            on_disk[sha] = (path, path.stat())
        except FileNotFoundError:
            continue

    dangling = [s for s in rows if s not in on_disk and not layout.object_path(s).exists()]
    report.rows_dropped = (
        len(dangling) if dry_run else index.forget_objects(dangling, present=_present(layout))
    )

    roots = {s for s, r in rows.items() if r["pinned"]}
    dead_links = []
    for lk in index.all_links():
        if is_live(lk, layout.object_path(lk["sha256"])):
            roots.add(lk["sha256"])
        else:
            dead_links.append(lk["path"])
    report.links_dropped = len(dead_links) if dry_run else index.forget_links(dead_links)
    roots.update(s for s, (_p, st) in on_disk.items() if st.st_nlink > 1)
    report.roots = len(roots & on_disk.keys())

    candidates = []
    total = 0
    for sha, (path, st) in on_disk.items():
        total += st.st_size
        if sha in roots:
            continue
        row = rows.get(sha)
        if row is None and start - st.st_ctime < UNINDEXED_GRACE:
            continue  # its row may be on its way
        used = row["last_used"] if row is not None else st.st_mtime
        if used > start - in_use_window:
            continue
        seen = (st.st_ino, st.st_ctime_ns, st.st_nlink)
        candidates.append(_Candidate(sha, path, st.st_size, used, seen))
    candidates.sort(key=lambda c: (c.last_used, c.sha256))  # least recently used first

    victims: list[_Candidate] = []
    cutoff = None if older_than is None else start - older_than
    chosen = set()
    if cutoff is not None:
        for c in candidates:
            if c.last_used <= cutoff:
                victims.append(c)
                chosen.add(c.sha256)
    if max_size is not None:
        remaining = total - sum(c.size for c in victims)
        for c in candidates:
            if remaining <= max_size:
                break
            if c.sha256 not in chosen:
                victims.append(c)
                remaining -= c.size

    gone: list[str] = []
    for c in victims:
        if dry_run:
            if not _still_evictable(c, index, in_use=in_use_window):
                continue
        else:
            # A get holds the artifact's lock from download to materialized
            # destination: never evict under it.
            with try_hold(layout, c.sha256) as free:
                if not free or not _still_evictable(c, index, in_use=in_use_window):
                    continue
                if not _evict(c.path, layout):
                    continue
            gone.append(c.sha256)
        report.objects_evicted += 1
        report.bytes_freed += c.size
        report.evicted.append(c.sha256)
    # Rows go after the files, and only for objects still absent, looked at inside
    # the transaction: a writer may have published the same content again.
    index.forget_objects(gone, present=_present(layout))
    report.objects_kept = len(on_disk) - report.objects_evicted
    report.bytes_kept = total - report.bytes_freed
    return report


def _present(layout: Layout) -> Callable[[str], bool]:
    return lambda sha256: layout.object_path(sha256).exists()


def _still_evictable(c: _Candidate, index: Index, *, in_use: float) -> bool:
    """Re-check one object right before deleting it (others kept working meanwhile)."""
    try:
        st = c.path.stat()
    except FileNotFoundError:
        return False
    # Compared with gc's own earlier stat, not with a clock: file times come
    # from a coarse clock that userspace cannot match exactly (ext4 on newer
    # kernels even stamps some changes finer than it), so "changed since gc
    # began" by timestamps misjudged objects touched just before gc ran.
    if st.st_nlink > 1 or (st.st_ino, st.st_ctime_ns, st.st_nlink) != c.seen:
        return False
    row = index.get_object(c.sha256)
    # Pinned, or used since the plan was made (a row that appeared counts too),
    # or maybe in use now (the last second is all a hit may leave unrecorded).
    if row is not None and (
        row["pinned"] or row["last_used"] > c.last_used or row["last_used"] > time.time() - in_use
    ):
        return False
    return not any(is_live(lk, c.path) for lk in index.links_of(c.sha256))


def _evict(path: Path, layout: Layout) -> bool:
    """Delete one object, unless someone hardlinked it at the last moment.

    The object is renamed aside into ``tmp/`` first (under a writer's temp
    name, so a killed gc's leftover is swept like any dead writer's): from then
    on no new hardlink can be made to it, and one made before shows in its
    link count, in which case it is put back.
    """
    aside = layout.tmp / temp_name()
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if os.lstat(aside).st_nlink == 1:
        os.unlink(aside)
        return True
    try:
        os.link(aside, path)
    except FileExistsError:
        pass  # published again meanwhile: the same content
    finally:
        os.unlink(aside)
    return False


# -- temps and locks -----------------------------------------------------------


def _sweep_temps(layout: Layout, report: GcReport, *, now: float, grace: float) -> None:
    try:
        entries = list(os.scandir(layout.tmp))
    except FileNotFoundError:
        return
    for entry in entries:
        size = _sweep_temp(Path(entry.path), entry.name, now=now, grace=grace, dry=report.dry_run)
        if size is not None:
            report.temps_removed += 1
            report.temp_bytes += size


def _sweep_temp(path: Path, name: str, *, now: float, grace: float, dry: bool) -> int | None:
    """Remove one temp if its writer is dead or it is abandoned; its size if removed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    writer = parse_temp_name(name)
    dead = writer is not None and writer[0] == HOST and not _pid_alive(writer[1])
    abandoned = now - max(st.st_mtime, st.st_ctime) > grace
    # A live writer's fresh temp is not even opened: between its O_EXCL create
    # and its flock, our flock would make its own non-blocking flock fail.
    if not (dead or abandoned):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _try_flock(fd):
            return None  # a writer holds it: alive, whatever its name says
        if not _same_file(path, os.fstat(fd)):
            return None
        if not dry:
            os.unlink(path)
        return st.st_size
    finally:
        os.close(fd)


def _sweep_locks(layout: Layout, report: GcReport) -> None:
    try:
        entries = list(os.scandir(layout.locks))
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.endswith(".lock"):
            continue
        try:
            fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            # Only while we hold it, and only if the name still means this inode.
            if _try_flock(fd) and _same_file(Path(entry.path), os.fstat(fd)):
                if not report.dry_run:
                    os.unlink(entry.path)
                report.locks_removed += 1
        finally:
            os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(path: Path, held: os.stat_result) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
