"""verify: prove every object is what its name says (SPEC §7, §1 invariant 3).

Full mode re-hashes each object with sha256.  ``fast`` compares the blake3
recorded at ingest and the size instead, hashing on every core (blake3's own
threads for large objects, a thread pool across small ones); an object with
no recorded blake3 (indexed by a hit after the index was lost) falls back to
sha256.  Both modes report wrong modes (not 0444), orphans (on disk, no index
row) and dangling rows (row, no object).

``repair`` moves corrupt objects to ``quarantine/`` (never served again) and
lists the recorded destinations that still hold the bad inode, restores
modes, indexes orphans (blake3 computed, last use = mtime) and drops dangling
rows.  This is how a lost index is rebuilt: the objects are the truth; their
names, sources, links and pins were only in the index and are reported lost.

Uses index and layout only, never the Store.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .hashing import blake3_file, sha256_file
from .index import Index
from .ingest import quarantine
from .layout import OBJECT_MODE, Layout
from .link import is_live
from .reports import VerifyReport

# Objects at least this big are hashed by blake3's own threads (mmap); smaller
# ones go one per pool worker, where thread start-up would cost more than it saves.
_BIG = 8 << 20


@dataclass
class _Checked:
    sha256: str
    path: Path
    size: int
    mode: int
    mtime: float
    ok: bool
    blake3: str | None = None  # computed here, for rows that lack it


def run(
    layout: Layout,
    index: Index,
    *,
    fast: bool = False,
    repair: bool = False,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every object; with ``repair`` fix what can be fixed.

    ``progress`` is called with the bytes of each object checked.  Objects
    that vanish meanwhile (gc) are skipped.  Blocks; safe beside other
    processes using the store.
    """
    report = VerifyReport(fast=fast, repair=repair)
    if not layout.root.is_dir():
        return report
    rows = index.object_rows()
    found = list(layout.iter_objects())

    def check(item: tuple[str, Path]) -> _Checked | None:
        sha, path = item
        try:
            st = path.stat()
            row = rows.get(sha)
            need_b3 = repair and (row is None or row["blake3"] is None)
            if fast and row is not None and row["blake3"] is not None:
                workers = 0 if st.st_size >= _BIG else 1  # 0: all of blake3's threads
                ok = (
                    st.st_size == row["size"]
                    and blake3_file(path, threads=workers) == row["blake3"]
                )
                done = _Checked(sha, path, st.st_size, st.st_mode, st.st_mtime, ok)
            else:
                ok, b3 = _sha256_and_blake3(path, sha, want_blake3=need_b3)
                done = _Checked(sha, path, st.st_size, st.st_mode, st.st_mtime, ok, b3)
        except FileNotFoundError:
            return None
        if progress is not None:
            progress(st.st_size)
        return done

    if fast:
        workers = threads or os.cpu_count() or 2
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, found))
    else:
        # One core, as sha256sum would: the measure fast mode is compared against.
        results = [check(item) for item in found]

    on_disk = set()
    reindex: list[tuple[str, int, str | None, float]] = []
    for c in results:
        if c is None:
            continue
        on_disk.add(c.sha256)
        report.objects += 1
        report.bytes += c.size
        row = rows.get(c.sha256)
        if fast and (row is None or row["blake3"] is None):
            report.rehashed += 1
        if not c.ok:
            report.corrupt.append(c.sha256)
            if repair:
                _quarantine(layout, index, c, report)
            continue
        if stat.S_IMODE(c.mode) != OBJECT_MODE:
            report.bad_modes.append(c.sha256)
            if repair:
                os.chmod(c.path, OBJECT_MODE)
        if row is None:
            report.orphans.append(c.sha256)
            reindex.append((c.sha256, c.size, c.blake3, c.mtime))
        elif repair and row["blake3"] is None and c.blake3 is not None:
            index.set_blake3(c.sha256, c.blake3)

    report.dangling = sorted(
        s for s in rows if s not in on_disk and not layout.object_path(s).exists()
    )
    if repair:
        # Each looked at again inside the transaction: gc may have evicted an
        # orphan during the scan, a writer may have published a missing one.
        def present(sha256: str) -> bool:
            return layout.object_path(sha256).exists()

        report.reindexed = index.index_objects(reindex, present=present)
        index.forget_objects(report.dangling, present=present)
        report.broken_index = [str(p) for p in index.broken_copies()] if report.reindexed else []
    return report


def _sha256_and_blake3(path: Path, sha: str, *, want_blake3: bool) -> tuple[bool, str | None]:
    """sha256 == name?  And blake3 when the index needs it: both from one read."""
    if not want_blake3:
        return sha256_file(path) == sha, None
    from blake3 import blake3

    h256, hb3 = hashlib.sha256(), blake3(max_threads=1)
    with open(path, "rb") as f:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h256.update(view[:n])
            hb3.update(view[:n])
    return h256.hexdigest() == sha, hb3.hexdigest()


def _quarantine(layout: Layout, index: Index, c: _Checked, report: VerifyReport) -> None:
    """Move a corrupt object aside; name the destinations that share its inode."""
    try:
        st = c.path.stat()
    except FileNotFoundError:
        return
    for lk in index.links_of(c.sha256):
        same_inode = (lk["device"], lk["inode"]) == (st.st_dev, st.st_ino)
        if lk["method"] != "symlink" and same_inode and is_live(lk, c.path):
            report.exposed.append({"sha256": c.sha256, "path": lk["path"]})
    target = quarantine(layout, c.path)
    if target is not None:
        report.quarantined.append({"sha256": c.sha256, "path": str(target)})
    index.forget_object(c.sha256)
