"""Link modes (SPEC §3): hardlink, reflink, copy, symlink, auto's fallbacks, existing
destinations, the recorded links; rm, pin and unpin."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

import pytest

from casstore import CasError, InvalidInput, NotFound

from .conftest import assert_store_consistent, blob, sha
from .test_gc import age_index

pytestmark = pytest.mark.timeout(60)


def _other_device_dir(store_dir: Path) -> Path:
    """A directory on another filesystem than the store (/dev/shm is tmpfs), or skip."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("/dev/shm is absent or not writable: no second filesystem to link across")
    store_dir.mkdir(parents=True, exist_ok=True)
    if shm.stat().st_dev == store_dir.stat().st_dev:
        pytest.skip("/dev/shm is on the same device as the store")
    return Path(tempfile.mkdtemp(prefix="casstore-test-", dir=shm))


@pytest.fixture
def elsewhere(store_dir):
    d = _other_device_dir(store_dir)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _links(store, d):
    return {lk["path"]: lk for lk in store.info(d).links}


def _leftovers(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".casstore-tmp")]


def test_hardlink_shares_the_inode_and_is_recorded(store, store_dir, tmp_path):
    d = store.put(b"hard", name="h")
    dest = tmp_path / "out" / "h.bin"
    result = store.link("h", dest, link="hardlink")
    obj = store.path(d)
    assert result.method == "hardlink" and result.dest == dest
    assert dest.stat().st_ino == obj.stat().st_ino and obj.stat().st_nlink == 2
    row = _links(store, d)[str(dest)]
    assert (row["device"], row["inode"], row["method"]) == (
        dest.stat().st_dev,
        dest.stat().st_ino,
        "hardlink",
    )
    assert store.stats().saved_bytes == 4
    assert not _leftovers(dest.parent)
    assert_store_consistent(store_dir)


def test_auto_hardlinks_on_the_same_filesystem(store, store_dir, tmp_path, caplog):
    d = store.put(b"auto")
    with caplog.at_level(logging.WARNING, logger="casstore"):
        assert store.link(d, tmp_path / "a", link="auto").method == "hardlink"
    assert not caplog.records
    assert_store_consistent(store_dir)


def test_copy_is_an_independent_file(store, store_dir, tmp_path):
    d = store.put(b"copy me")
    dest = tmp_path / "c"
    assert store.link(d, dest, link="copy").method == "copy"
    assert dest.read_bytes() == b"copy me"
    assert dest.stat().st_ino != store.path(d).stat().st_ino
    assert store.path(d).stat().st_nlink == 1
    dest.write_bytes(b"changed")  # a copy may be written without touching the object
    assert store.path(d).read_bytes() == b"copy me"
    assert _links(store, d)[str(dest)]["method"] == "copy"
    assert_store_consistent(store_dir)


def test_symlink_points_at_the_object(store, store_dir, tmp_path):
    d = store.put(b"sym")
    dest = tmp_path / "s"
    assert store.link(d, dest, link="symlink").method == "symlink"
    assert dest.is_symlink() and Path(os.readlink(dest)) == store.path(d)
    assert dest.read_bytes() == b"sym"
    # Linking again is a no-op, whatever the mode asks, when it already points here.
    assert store.link(d, dest, link="symlink").method == "symlink"
    assert_store_consistent(store_dir)


def test_reflink_works_or_fails_clearly(store, store_dir, tmp_path):
    d = store.put(blob(10_000))
    dest = tmp_path / "r"
    try:
        result = store.link(d, dest, link="reflink")
    except CasError as exc:  # ext4, tmpfs: no FICLONE
        assert "cannot reflink" in str(exc) and str(dest) in str(exc)
        assert exc.exit_code == 1
        assert not dest.exists() and not _leftovers(tmp_path)
        assert not _links(store, d)
    else:  # btrfs, xfs
        assert result.method == "reflink" and dest.read_bytes() == blob(10_000)
    assert_store_consistent(store_dir)


def test_cross_filesystem_auto_copies_with_one_warning(store, store_dir, elsewhere, caplog):
    a, b = store.put(b"across one"), store.put(b"across two")
    with caplog.at_level(logging.WARNING, logger="casstore"):
        ra = store.link(a, elsewhere / "a", link="auto")
        rb = store.link(b, elsewhere / "b", link="auto")
    # tmpfs has no FICLONE either, so auto ends at a copy.
    assert ra.method == rb.method == "copy"
    assert (elsewhere / "a").read_bytes() == b"across one"
    warnings = [r for r in caplog.records if "copied instead" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert _links(store, a)[str(elsewhere / "a")]["device"] == elsewhere.stat().st_dev
    assert_store_consistent(store_dir)


def test_cross_filesystem_strict_hardlink_fails(store, store_dir, elsewhere):
    d = store.put(b"strict")
    with pytest.raises(CasError, match="cannot hardlink") as info:
        store.link(d, elsewhere / "h", link="hardlink")
    assert info.value.exit_code == 1 and "cross-device" in str(info.value)
    assert not (elsewhere / "h").exists() and not _leftovers(elsewhere)
    assert not _links(store, d)
    assert_store_consistent(store_dir)


def test_cross_filesystem_from_the_command_line(run_cli, store_dir, tmp_path, elsewhere):
    src = tmp_path / "f"
    src.write_bytes(b"cli across")
    d = run_cli("put", str(src)).stdout.decode().strip()
    strict = run_cli("link", d, str(elsewhere / "x"), "--link", "hardlink")
    assert strict.returncode == 1
    assert strict.stderr.decode().count("\n") == 1 and "cannot hardlink" in strict.stderr.decode()
    auto = run_cli("--json", "link", d, str(elsewhere / "x"))
    assert auto.returncode == 0, auto.stderr
    out = json.loads(auto.stdout)
    assert out["method"] == "copy" and out["sha256"] == d and out["dest"] == str(elsewhere / "x")
    assert "copied instead" in auto.stderr.decode()
    assert_store_consistent(store_dir)


def test_existing_destination(store, store_dir, tmp_path):
    d = store.put(b"content")
    dest = tmp_path / "dest"
    store.link(d, dest)
    inode = dest.stat().st_ino
    assert store.link(d, dest).method == "hardlink" and dest.stat().st_ino == inode  # no-op
    # Same content, another file: replaced by a link.
    same = tmp_path / "same"
    same.write_bytes(b"content")
    store.link(d, same)
    assert same.stat().st_ino == store.path(d).stat().st_ino
    # Other content: refused, untouched; --force replaces it.
    other = tmp_path / "other"
    other.write_bytes(b"mine")
    with pytest.raises(CasError, match="other content") as info:
        store.link(d, other)
    assert info.value.path == str(other) and other.read_bytes() == b"mine"
    store.link(d, other, force=True)
    assert other.read_bytes() == b"content"
    with pytest.raises(CasError, match="is a directory"):
        store.link(d, tmp_path)
    assert not _leftovers(tmp_path)
    assert_store_consistent(store_dir)


def test_existing_destination_from_the_command_line(run_cli, store_dir, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"cli content")
    d = run_cli("put", str(src)).stdout.decode().strip()
    other = tmp_path / "other"
    other.write_bytes(b"not it")
    refused = run_cli("link", d, str(other))
    assert refused.returncode == 1 and "--force" in refused.stderr.decode()
    assert other.read_bytes() == b"not it"
    forced = run_cli("link", d, str(other), "--force")
    assert forced.returncode == 0 and other.read_bytes() == b"cli content"
    assert_store_consistent(store_dir)


def test_bad_link_mode_is_bad_input(store, tmp_path, run_cli):
    d = store.put(b"x")
    with pytest.raises(InvalidInput, match="unknown link mode"):
        store.link(d, tmp_path / "x", link="teleport")
    assert not (tmp_path / "x").exists()
    assert run_cli("link", d, str(tmp_path / "x"), "--link", "teleport").returncode == 2


def test_link_refetches_an_object_evicted_under_it(store, store_dir, origin, tmp_path):
    data = blob(50_000, seed=3)
    url = origin.add("/evicted", data)
    d = sha(data)
    store.get(url, sha256=d)
    # Evicted between lookup and link (as gc would): the recorded source serves it again.
    os.unlink(store.layout.object_path(d))
    result = store.link(d, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data and result.method == "hardlink"
    assert origin.count("/evicted") == 2
    assert_store_consistent(store_dir)


def test_link_without_source_after_eviction_is_not_found(store, store_dir, tmp_path):
    d = store.put(b"no source")
    os.unlink(store.layout.object_path(d))
    with pytest.raises(NotFound):
        store.link(d, tmp_path / "gone")
    assert not (tmp_path / "gone").exists()
    assert_store_consistent(store_dir)


def test_rm_name_then_object(store, store_dir, tmp_path, run_cli):
    d = store.put(b"to remove", name="n")
    assert store.rm("n") == "name"
    assert store.path(d).exists()  # removing a name keeps the object
    with pytest.raises(NotFound):
        store.rm("n")
    assert store.rm(d[:12]) == "object"
    assert not store.layout.object_path(d).exists()
    assert run_cli("rm", d).returncode == 5
    assert_store_consistent(store_dir)


def test_rm_refuses_live_links_unless_forced(store, store_dir, tmp_path, run_cli):
    d = store.put(b"linked")
    store.link(d, tmp_path / "copy", link="copy")
    refused = run_cli("rm", d)
    assert refused.returncode == 2 and "live link" in refused.stderr.decode()
    assert store.layout.object_path(d).exists()
    # A link that no longer stands does not hold the object.
    (tmp_path / "copy").unlink()
    assert run_cli("--json", "rm", d).returncode == 0
    assert not store.layout.object_path(d).exists()
    e = store.put(b"forced")
    store.link(e, tmp_path / "h")
    out = run_cli("--json", "rm", e, "--force")
    assert out.returncode == 0 and json.loads(out.stdout)["removed"] == "object"
    assert (tmp_path / "h").read_bytes() == b"forced"  # the destination keeps its bytes
    assert_store_consistent(store_dir)


def test_pin_and_unpin(store, store_dir, run_cli):
    d = store.put(b"keep me", name="k")
    pinned = run_cli("--json", "pin", "k")
    assert pinned.returncode == 0
    assert json.loads(pinned.stdout) == {
        "sha256": d,
        "size": 7,
        "path": str(store.layout.object_path(d)),
        "pinned": True,
    }
    assert store.info(d).pinned
    assert store.gc(older_than=0).objects_evicted == 0
    assert run_cli("unpin", d).returncode == 0
    assert not store.info(d).pinned
    age_index(store_dir)
    assert store.gc(older_than=0).evicted == [d]
    assert run_cli("pin", "nope").returncode == 5
    assert_store_consistent(store_dir)


def test_objects_stay_read_only(store, tmp_path):
    d = store.put(b"ro")
    store.link(d, tmp_path / "h")
    assert stat.S_IMODE((tmp_path / "h").stat().st_mode) == 0o444


def test_too_many_links_falls_back_for_that_object_only(store, store_dir, tmp_path):
    """EMLINK is about one inode: auto copies that object, and still hardlinks others."""
    full = store.put(b"linked to the limit")
    other = store.put(b"an ordinary object")
    obj = store.layout.object_path(full)
    many = tmp_path / "many"
    many.mkdir()
    made = 0
    try:
        while made < 70_000:
            os.link(obj, many / str(made))
            made += 1
    except OSError as exc:
        if exc.errno != errno.EMLINK:
            raise
    if made == 70_000:
        pytest.skip("this filesystem has no small per-inode link limit")
    assert store.link(full, tmp_path / "a", link="auto").method == "copy"
    with pytest.raises(CasError, match="cannot hardlink"):
        store.link(full, tmp_path / "b", link="hardlink")
    assert store.link(other, tmp_path / "c", link="auto").method == "hardlink"
    assert (tmp_path / "a").read_bytes() == b"linked to the limit"
    for i in range(made):
        os.unlink(many / str(i))
    assert_store_consistent(store_dir)
