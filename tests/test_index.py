"""The SQLite index: migrations, concurrency of a new store, refusal of newer schemas."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from casstore import CasError, Store
from casstore.index import Index, known_migrations, migrations_dir
from casstore.layout import Layout

from .conftest import refuse_rows

# Released migrations are never edited: add a new numbered file instead.
RELEASED = {
    1: "aefda7bab53bf36f8bf3fe9769569ed6a47775afa2096ee3de27f0359e13319f",
}


def test_released_migrations_are_unchanged():
    found = {
        m.id: hashlib.sha256(Path(m.path).read_bytes()).hexdigest() for m in known_migrations()
    }
    for number, digest in RELEASED.items():
        assert found[number] == digest, f"migration {number:04d} was edited after release"
    assert sorted(found) == list(range(1, len(found) + 1)), "migrations must be numbered 1..N"


def test_migrations_found_in_checkout():
    assert (Path(migrations_dir()) / "0001_initial.sql").is_file()


def test_fresh_index_has_schema_and_wal(store_dir):
    index = Index(Layout(store_dir))
    conn = index.conn
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"objects", "sources", "names", "links", "casstore_migrations"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
    applied = conn.execute("SELECT id FROM casstore_migrations").fetchall()
    assert [r[0] for r in applied] == [m.id for m in known_migrations()]


def _open_and_count(root, barrier):
    barrier.wait()
    index = Index(Layout(root))
    return index.conn.execute("SELECT count(*) FROM casstore_migrations").fetchone()[0]


@pytest.mark.timeout(60)
def test_processes_opening_a_new_store_apply_each_migration_once(tmp_path):
    for attempt in range(5):
        root = tmp_path / f"s{attempt}"
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager:
            barrier = manager.Barrier(6)
            with ctx.Pool(6) as pool:
                counts = pool.starmap(_open_and_count, [(root, barrier)] * 6)
        assert counts == [len(known_migrations())] * 6


def test_newer_schema_is_refused_clearly(store_dir):
    assert Index(Layout(store_dir)).conn  # creates the store at the current schema
    conn = sqlite3.connect(store_dir / "index.db")
    conn.execute("INSERT INTO casstore_migrations VALUES (999, 'from_the_future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(CasError, match="newer than this casstore knows"):
        _ = Index(Layout(store_dir)).conn


def test_garbage_index_is_set_aside_and_objects_still_served(store_dir):
    store = Store(store_dir)
    digest = store.put(b"precious")
    store.close()
    (store_dir / "index.db").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (store_dir / f"index.db{suffix}").unlink(missing_ok=True)
    store = Store(store_dir)
    assert store.path(digest).read_bytes() == b"precious"
    assert store.put(b"more") and store.info(digest).size == 8
    assert list(store_dir.glob("index.db.broken-*"))


def test_record_use_is_coarsened_to_one_second(store_dir):
    store = Store(store_dir)
    digest = store.put(b"x")
    index = store.index
    before = index.conn.total_changes
    for _ in range(50):
        index.record_use(digest, 1)
    assert index.conn.total_changes - before <= 1


def test_a_refused_write_is_undone_whole_and_names_the_index(store_dir):
    store = Store(store_dir)
    refused = "cd" * 32
    refuse_rows(store, refused)
    index = store.index
    rows = [("ab" * 32, 1, None, 0.0), (refused, 1, None, 0.0)]
    with pytest.raises(CasError, match=r"^cannot write the index .*index\.db: refused$"):
        index.index_objects(rows)
    assert index.get_object("ab" * 32) is None  # written first, rolled back with the rest
    assert not index.conn.in_transaction
    index.record_object("ab" * 32, 1)  # the connection writes on
    assert index.get_object("ab" * 32) is not None
    # Anything else the block raises is rolled back and left as it is.
    with pytest.raises(KeyboardInterrupt), index._write() as conn:
        conn.execute("DELETE FROM objects")
        raise KeyboardInterrupt
    assert index.get_object("ab" * 32) is not None and not index.conn.in_transaction
    store.close()


def test_a_link_to_an_object_gone_records_nothing(tmp_path):
    """record_link looks at the object inside its transaction: gc unlinks first."""
    layout = Layout(tmp_path / "s")
    layout.ensure()
    index = Index(layout)
    digest = "ab" * 32
    with pytest.raises(FileNotFoundError):
        index.record_link(str(tmp_path / "dest"), 1, 2, digest, "copy", str(tmp_path / "gone"))
    assert index.get_object(digest) is None
    obj = tmp_path / "obj"
    obj.write_bytes(b"x" * 5)
    index.record_link(str(tmp_path / "dest"), 1, 2, digest, "copy", str(obj))
    assert index.get_object(digest)["size"] == 5
    assert [link["path"] for link in index.links_of(digest)] == [str(tmp_path / "dest")]


def test_rows_are_dropped_or_added_only_as_the_disk_says_inside_the_transaction(tmp_path):
    """gc, verify --repair and a healing resolve look at each object inside the write
    transaction: a writer may have published it, or gc evicted it, since they looked."""
    layout = Layout(tmp_path / "s")
    layout.ensure()
    index = Index(layout)
    back, gone = "ab" * 32, "cd" * 32
    for digest in (back, gone):
        index.record_object(digest, 1)
    on_disk = {back}
    assert index.forget_objects([back, gone], present=on_disk.__contains__) == 1
    assert index.get_object(back) is not None and index.get_object(gone) is None
    rows = [(gone, 1, None, 0.0), ("ef" * 32, 1, None, 0.0)]
    assert index.index_objects(rows, present={"ef" * 32}.__contains__) == 1
    assert index.get_object(gone) is None
