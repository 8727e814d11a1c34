"""verify (SPEC §7) and index loss (SPEC §1 invariant 3): corruption, modes, orphans,
dangling rows, --repair, exit codes; a lost or garbage index loses no object."""

from __future__ import annotations

import json
import os
import stat

import pytest

from casstore import Store
from casstore.hashing import blake3_file
from casstore.ingest import Ingest

from .conftest import assert_store_consistent, blob, sha

pytestmark = pytest.mark.timeout(60)


def _corrupt(path) -> None:
    """Flip bytes of an object in place, as a stray write through a hardlink would."""
    os.chmod(path, 0o644)  # tests run as root, but keep the dance honest
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"XXXX")
    os.chmod(path, 0o444)


@pytest.mark.parametrize("fast", [False, True])
def test_corrupt_object_found_and_quarantined(store, store_dir, tmp_path, fast):
    good = store.put(blob(100_000, seed=1), name="good")
    bad = store.put(blob(100_000, seed=2), name="bad")
    store.link(bad, tmp_path / "hard")  # shares the inode that goes bad
    store.link(bad, tmp_path / "copy", link="copy")  # its own bytes: not exposed
    _corrupt(store.layout.object_path(bad))
    report = store.verify(fast=fast)
    assert report.corrupt == [bad] and report.unrepaired == [bad]
    assert report.objects == 2 and report.bytes == 200_000
    assert store.layout.object_path(bad).exists()  # reporting changes nothing
    fixed = store.verify(fast=fast, repair=True)
    assert fixed.corrupt == [bad] and fixed.unrepaired == []
    assert fixed.exposed == [{"sha256": bad, "path": str(tmp_path / "hard")}]
    [moved] = fixed.quarantined
    assert moved["sha256"] == bad and os.path.dirname(moved["path"]) == str(store.layout.quarantine)
    assert not store.layout.object_path(bad).exists()
    assert store.index.get_object(bad) is None and store.index.lookup_name("bad") is None
    assert store.path("good").exists() and store.verify(fast=fast).corrupt == []
    assert good != bad
    assert_store_consistent(store_dir)


def test_cli_exit_codes(run_cli, store_dir, tmp_path):
    f = tmp_path / "f"
    f.write_bytes(blob(5000))
    d = run_cli("put", str(f)).stdout.decode().strip()
    ok = run_cli("verify")
    assert ok.returncode == 0 and "checked 1 objects" in ok.stdout.decode()
    _corrupt(store_dir / "sha256" / d[:2] / d[2:4] / d)
    for args in (["verify"], ["verify", "--fast"]):
        out = run_cli("--json", *args)
        assert out.returncode == 3, out.stderr
        assert json.loads(out.stdout)["unrepaired"] == [d]
        err = out.stderr.decode()
        assert err.count("\n") == 1 and d in err and "--repair" in err
    repaired = run_cli("verify", "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert f"corrupt   {d}" in repaired.stdout.decode()
    assert run_cli("verify").returncode == 0
    assert run_cli("path", d).returncode == 5  # never served again
    assert_store_consistent(store_dir)


def test_wrong_mode_reported_and_restored(store, store_dir, run_cli):
    d = store.put(b"mode")
    path = store.layout.object_path(d)
    os.chmod(path, 0o664)
    out = run_cli("--json", "verify")
    assert out.returncode == 0  # modes alone are not corruption
    assert json.loads(out.stdout)["bad_modes"] == [d]
    assert store.verify(repair=True).bad_modes == [d]
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.verify().bad_modes == []
    assert_store_consistent(store_dir)


def test_orphan_is_indexed_with_its_blake3(store, store_dir):
    data = blob(3000, seed=4)
    with Ingest(store.layout) as ingest:  # published, its row never written (killed)
        ingest.write(data)
        published = ingest.commit()
    d = published.sha256
    assert store.index.get_object(d) is None
    report = store.verify(fast=True)
    assert report.orphans == [d] and report.rehashed == 1 and report.corrupt == []
    assert store.index.get_object(d) is None
    fixed = store.verify(fast=True, repair=True)
    assert fixed.orphans == [d] and fixed.reindexed == 1
    row = store.index.get_object(d)
    assert row["size"] == 3000 and row["blake3"] == blake3_file(store.layout.object_path(d))
    assert row["last_used"] == pytest.approx(store.layout.object_path(d).stat().st_mtime)
    again = store.verify(fast=True)
    assert again.orphans == [] and again.rehashed == 0
    assert_store_consistent(store_dir)


def test_dangling_row_reported_and_dropped(store, store_dir):
    kept = store.put(b"kept")
    d = sha(b"never stored")
    store.index.record_object(d, 12, name="ghost")
    report = store.verify()
    assert report.dangling == [d] and report.corrupt == []
    assert store.verify(repair=True).dangling == [d]
    assert store.index.get_object(d) is None and store.index.lookup_name("ghost") is None
    assert store.verify().dangling == [] and store.path(kept).exists()
    assert_store_consistent(store_dir)


def test_fast_checks_size_and_blake3(store, store_dir):
    d = store.put(blob(20_000, seed=5))
    assert store.index.get_object(d)["blake3"]
    assert store.verify(fast=True).corrupt == []
    # A truncated object is caught by its size before any hashing.
    path = store.layout.object_path(d)
    os.chmod(path, 0o644)
    os.truncate(path, 100)
    os.chmod(path, 0o444)
    assert store.verify(fast=True).corrupt == [d]
    assert store.verify(fast=True, repair=True).unrepaired == []
    assert_store_consistent(store_dir)


def _lose_index(store_dir, how: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        p = store_dir / f"index.db{suffix}"
        if p.exists():
            p.unlink()
    if how == "garbage":
        (store_dir / "index.db").write_bytes(b"this is not a database\n" * 100)


@pytest.mark.parametrize("how", ["deleted", "garbage"])
def test_lost_index_loses_no_object(store_dir, tmp_path, run_cli, how):
    store = Store(store_dir)
    digests = [store.put(blob(2000 + i, seed=i), name=f"n{i}") for i in range(4)]
    store.link(digests[0], tmp_path / "l")
    store.close()
    _lose_index(store_dir, how)
    store = Store(store_dir)
    # Every object is still served by digest; writes go on.
    for d in digests[:2]:
        assert sha(store.path(d).read_bytes()) == d
    new = store.put(b"written after the loss", name="new")
    assert store.path("new").exists()
    if how == "garbage":
        assert [p.name.startswith("index.db.broken-") for p in store.index.broken_copies()] == [
            True
        ]
    store.close()
    # path() indexed the objects it served (no blake3); verify --repair rebuilds the rest.
    out = run_cli("--json", "verify", "--repair")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["corrupt"] == [] and doc["objects"] == 5
    assert sorted(doc["orphans"]) == sorted(digests[2:]) and doc["reindexed"] == 2
    assert "names, sources, links and pins" in out.stderr.decode()
    store = Store(store_dir)
    rows = store.index.object_rows()
    assert set(rows) == {*digests, new}
    assert all(r["blake3"] for r in rows.values())  # filled in by the repair
    assert store.index.lookup_name("n1") is None  # names were only in the index
    store.close()
    assert_store_consistent(store_dir)


def test_reindex_says_what_was_lost(store_dir, run_cli, tmp_path):
    store = Store(store_dir)
    d = store.put(b"orphaned by the loss", name="gone")
    store.close()
    _lose_index(store_dir, "garbage")
    out = run_cli("verify", "--repair")
    assert out.returncode == 0, out.stderr
    err = out.stderr.decode()
    assert "1 object(s) re-indexed" in err and "names, sources, links and pins" in err
    assert "index.db.broken-" in err
    assert f"orphan    {d} (indexed)" in out.stdout.decode()
    assert run_cli("path", d).returncode == 0
    assert_store_consistent(store_dir)


def test_verify_on_an_empty_store(store, run_cli):
    report = store.verify(fast=True)
    assert report.objects == 0 and report.unrepaired == []
    assert run_cli("verify").returncode == 0
