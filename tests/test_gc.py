"""gc (SPEC §6): roots, eviction by age and size, dead temps, stale locks, rows,
and gc running beside real processes that get and link."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from casstore import InvalidInput, Store
from casstore.gc import collect
from casstore.ingest import HOST

from .conftest import assert_store_consistent, blob, sha

pytestmark = pytest.mark.timeout(120)


def _snapshot(root: Path) -> tuple:
    files = sorted(
        (str(p.relative_to(root)), p.stat().st_ino)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("index.db")
    )
    conn = sqlite3.connect(root / "index.db")
    try:
        rows = tuple(
            tuple(conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall())
            for t in ("objects", "names", "sources", "links")
        )
    finally:
        conn.close()
    return files, rows


def age_index(store_dir: Path, seconds: float = 3600) -> None:
    """Move every recorded use ``seconds`` into the past, order kept.

    gc never evicts what was used in the last second (a hit that recent may
    be unrecorded, SPEC §8); tests age their objects instead of sleeping.
    """
    conn = sqlite3.connect(store_dir / "index.db")
    try:
        with conn:
            conn.execute("UPDATE objects SET last_used = last_used - ?", (seconds,))
    finally:
        conn.close()


def _objects(store) -> set[str]:
    return {s for s, _ in store.layout.iter_objects()}


def test_older_than_evicts_unrooted_and_keeps_roots(store, store_dir, tmp_path):
    loose = store.put(b"loose", name="loose")
    pinned = store.put(b"pinned")
    store.pin(pinned)
    copied = store.put(b"copied")  # a live recorded link roots it, though nlink is 1
    store.link(copied, tmp_path / "copy", link="copy")
    symlinked = store.put(b"symlinked")
    store.link(symlinked, tmp_path / "sym", link="symlink")
    foreign = store.put(b"hardlinked by another tool")
    os.link(store.layout.object_path(foreign), tmp_path / "foreign")  # not recorded: nlink 2
    age_index(store_dir)
    report = store.gc(older_than="0s")
    assert report.evicted == [loose]
    assert (report.objects_evicted, report.bytes_freed) == (1, 5)
    assert report.roots == 4 and report.objects_kept == 4
    assert _objects(store) == {pinned, copied, symlinked, foreign}
    assert store.index.lookup_name("loose") is None  # its rows went with it
    assert (tmp_path / "sym").read_bytes() == b"symlinked"
    assert_store_consistent(store_dir)


def test_older_than_keeps_recent_objects(store, store_dir):
    d = store.put(b"recent")
    assert store.gc(older_than=0).objects_evicted == 0  # used this very second
    age_index(store_dir, 3600)
    assert store.gc(older_than="2h").objects_evicted == 0
    assert _objects(store) == {d}
    age_index(store_dir, 2 * 3600)
    assert store.gc(older_than="2h").evicted == [d]
    assert_store_consistent(store_dir)


def test_dead_links_no_longer_root(store, store_dir, tmp_path):
    d = store.put(b"was linked")
    store.link(d, tmp_path / "h")
    (tmp_path / "h").unlink()
    e = store.put(b"replaced dest")
    store.link(e, tmp_path / "r", link="copy")
    (tmp_path / "r").unlink()
    # Same path, a new file (ext4 may even hand it the freed inode number): not our link.
    (tmp_path / "r").write_bytes(b"someone else's file")
    age_index(store_dir)
    report = store.gc(older_than=0)
    assert report.links_dropped == 2
    assert sorted(report.evicted) == sorted([d, e])
    assert store.stats().links == 0
    assert_store_consistent(store_dir)


def test_dry_run_changes_nothing(store, store_dir, tmp_path):
    for i in range(5):
        store.put(blob(1000, seed=i), name=f"n{i}")
    gone = store.put(b"object removed by hand")
    store.link(store.put(b"dead link"), tmp_path / "x", link="copy")
    (tmp_path / "x").unlink()
    os.unlink(store.layout.object_path(gone))
    (store.layout.locks / "stale.lock").write_text("")
    dead_temp = store.layout.tmp / f"{HOST}.{_dead_pid()}.0.{'ab' * 16}.tmp"
    dead_temp.write_bytes(b"partial")
    age_index(store_dir)
    before = _snapshot(store_dir)
    report = store.gc(older_than=0, max_size=0, dry_run=True)
    assert _snapshot(store_dir) == before
    assert report.dry_run and report.objects_evicted == 6 and report.bytes_freed == 5009
    assert (report.temps_removed, report.temp_bytes) == (1, 7)
    assert (report.locks_removed, report.rows_dropped, report.links_dropped) == (1, 1, 1)
    real = store.gc(older_than=0)
    assert real.as_dict() | {"dry_run": True} == report.as_dict()
    assert not _objects(store) and not dead_temp.exists()
    assert_store_consistent(store_dir)


def test_max_size_keeps_the_most_recently_used(store, store_dir):
    a = store.put(blob(1000, seed=1))
    b = store.put(blob(1000, seed=2))
    c = store.put(blob(1000, seed=3))
    store.put(blob(1000, seed=1))  # a is now the most recently used
    age_index(store_dir)
    report = store.gc(max_size="2KiB")
    assert report.evicted == [b]
    assert _objects(store) == {a, c} and report.bytes_kept == 2000
    assert store.gc(max_size="1000B").evicted == [c]
    assert store.gc(max_size="1K").objects_evicted == 0
    assert_store_consistent(store_dir)


def test_max_size_counts_roots_but_never_evicts_them(store, store_dir):
    big = store.put(blob(5000))
    store.pin(big)
    small = store.put(b"small")
    age_index(store_dir)
    report = store.gc(max_size=1000)
    assert report.evicted == [small] and _objects(store) == {big}
    assert_store_consistent(store_dir)


def test_rows_of_missing_objects_are_dropped(store, store_dir):
    d = store.put(b"deleted by hand", name="gone")
    os.unlink(store.layout.object_path(d))
    report = store.gc()
    assert report.rows_dropped == 1 and report.objects_evicted == 0
    assert store.index.get_object(d) is None and store.index.lookup_name("gone") is None
    assert_store_consistent(store_dir)


def test_bad_size_or_age_is_bad_input_before_any_work(store, store_dir, run_cli):
    d = store.put(b"stays")
    for kw in ({"max_size": "10XB"}, {"older_than": "3 fortnights"}, {"max_size": "-1"}):
        with pytest.raises(InvalidInput):
            store.gc(**kw)
    for args in (["--max-size", "lots"], ["--older-than", "1y"], ["--older-than", ""]):
        out = run_cli("gc", "--older-than", "0s", *args) if args[0] == "--max-size" else None
        out = out or run_cli("gc", "--max-size", "0", *args)
        assert out.returncode == 2, out.stderr
        assert out.stderr.decode().count("\n") == 1 and "invalid" in out.stderr.decode()
    assert _objects(store) == {d}
    assert_store_consistent(store_dir)


def test_cli_report_human_and_json(store, store_dir, run_cli):
    store.put(blob(3000))
    age_index(store_dir)
    human = run_cli("gc", "--older-than", "0s", "--dry-run")
    assert human.returncode == 0 and "would evict 1 objects (2.9 KiB)" in human.stdout.decode()
    out = run_cli("--json", "gc", "--older-than", "0s")
    doc = json.loads(out.stdout)
    assert doc["objects_evicted"] == 1 and doc["bytes_freed"] == 3000 and not doc["dry_run"]
    assert_store_consistent(store_dir)


# -- temps and locks -----------------------------------------------------------

_WRITER = """
import sys
from casstore.ingest import Ingest
from casstore.layout import Layout
with Ingest(Layout(sys.argv[1])) as ingest:
    ingest.write(b"x" * 1000)
    print(ingest.temp, flush=True)
    sys.stdin.read()  # stalls until the test closes stdin
"""


def _start_writer(store_dir: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(store_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    line = proc.stdout.readline().decode().strip()
    proc.stdout.close()
    assert line, "writer died before writing"
    return proc, Path(line)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_writers_temp_is_removed(store, store_dir):
    store.put(b"an object")
    proc, temp = _start_writer(store_dir)
    assert temp.exists()
    proc.kill()
    proc.wait()
    proc.stdin.close()
    report = store.gc()
    assert report.temps_removed == 1 and report.temp_bytes == 1000
    assert not temp.exists()
    assert_store_consistent(store_dir)


def test_dead_pid_temp_without_lock_is_removed(store, store_dir):
    store.layout.ensure()
    temp = store.layout.tmp / f"{HOST}.{_dead_pid()}.7.{'cd' * 16}.tmp"
    temp.write_bytes(b"left by a crash")
    other_host = store.layout.tmp / f"elsewhere.{_dead_pid()}.7.{'ef' * 16}.tmp"
    other_host.write_bytes(b"another machine's writer")
    report = store.gc()
    assert not temp.exists()
    assert other_host.exists()  # pid says nothing about another host: only the grace period
    assert report.temps_removed == 1
    assert store.gc(temp_grace=0).temps_removed == 1 and not other_host.exists()
    assert_store_consistent(store_dir)


def test_stalled_live_writers_temp_is_kept(store, store_dir):
    proc, temp = _start_writer(store_dir)
    try:
        # Even with no grace period at all, the writer's flock protects its temp.
        report = store.gc(temp_grace=0, older_than=0)
        assert report.temps_removed == 0 and temp.exists()
        assert temp.stat().st_size == 1000
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    assert not temp.exists()  # the writer cleaned up after itself
    assert_store_consistent(store_dir)


def test_stale_locks_go_held_locks_stay(store, store_dir):
    store.layout.ensure()
    stale = store.layout.locks / "stale.lock"
    stale.write_text("")
    held = store.layout.locks / "held.lock"
    fd = os.open(held, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        report = store.gc()
        assert report.locks_removed == 1
        assert not stale.exists() and held.exists()
    finally:
        os.close(fd)
    assert store.gc().locks_removed == 1 and not held.exists()


def test_locks_still_work_after_gc_removed_them(store, store_dir, origin):
    data = blob(2000, seed=9)
    url = origin.add("/locked", data)
    store.get(url, sha256=sha(data))
    assert os.listdir(store.layout.locks)
    store.gc()
    assert not os.listdir(store.layout.locks)
    age_index(store_dir)
    assert store.gc(older_than=0).objects_evicted == 1
    assert store.get(url, sha256=sha(data)).read_bytes() == data
    assert origin.count("/locked") == 2
    assert_store_consistent(store_dir)


# -- gc beside running processes -------------------------------------------------

_WORKER = """
import hashlib, json, os, sys
from casstore import Store
store_dir, dest_dir = sys.argv[1], sys.argv[2]
items, rounds = json.loads(sys.argv[3]), int(sys.argv[4])
store = Store(store_dir)
failures = 0
for r in range(rounds):
    for i, (url, digest) in enumerate(items):
        dest = os.path.join(dest_dir, f"{r}-{i}")
        try:
            store.get(url, sha256=digest, dest=dest + "-get")
            store.link(digest, dest, link="hardlink" if r % 2 else "copy")
            for p in (dest, dest + "-get"):
                with open(p, "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() == digest, "wrong bytes"
                os.unlink(p)  # release it, so gc may evict the object again
        except Exception as exc:
            failures += 1
            print(f"FAIL {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
print(json.dumps({"failures": failures}), flush=True)
"""


def test_gc_beside_get_and_link_never_fails_them(store_dir, tmp_path, origin):
    items = []
    for i in range(3):
        data = blob(20_000 + i, seed=100 + i)
        items.append([origin.add(f"/race{i}", data), sha(data)])
    store = Store(store_dir)
    store.get(*items[0])  # lay out the store before the workers start
    workers = []
    for w in range(4):
        dest = tmp_path / f"dest{w}"
        dest.mkdir()
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(store_dir), str(dest), json.dumps(items), "25"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    evicted = runs = 0
    try:
        while any(p.poll() is None for p in workers):
            # gc at its most aggressive: no in-use window, so an object goes the
            # moment it is idle and the workers' refetch paths are what saves them.
            report = collect(store.layout, store.index, older_than=0, in_use_window=0)
            evicted += report.objects_evicted
            runs += 1
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
    outputs = [p.communicate(timeout=60) for p in workers]
    for p, (out, err) in zip(workers, outputs, strict=True):
        assert p.returncode == 0, err.decode()
        assert json.loads(out) == {"failures": 0}, err.decode()
    # gc really raced the workers: it evicted objects they then had to fetch again.
    assert runs > 1 and evicted > 0
    assert sum(origin.count(f"/race{i}") for i in range(3)) > 3
    store.gc()  # heal rows a lost race may leave pointing at an evicted object
    store.close()
    assert_store_consistent(store_dir)


def test_eviction_puts_back_an_object_linked_at_the_last_moment(store, store_dir, tmp_path):
    from casstore.gc import _evict

    kept = store.put(b"linked just before the rename")
    os.link(store.layout.object_path(kept), tmp_path / "late")
    assert _evict(store.layout.object_path(kept), store.layout) is False
    assert store.layout.object_path(kept).stat().st_ino == (tmp_path / "late").stat().st_ino
    gone = store.put(b"nobody links this")
    assert _evict(store.layout.object_path(gone), store.layout) is True
    assert not store.layout.object_path(gone).exists() and not os.listdir(store.layout.tmp)
    store.gc()  # drops the evicted object's row
    assert_store_consistent(store_dir)
