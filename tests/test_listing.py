"""ls, info and stats, from the API and the command line (--json)."""

from __future__ import annotations

import json
import os

import pytest

from casstore import InvalidInput

from .conftest import assert_store_consistent, blob

pytestmark = pytest.mark.timeout(60)


def test_ls_filters_by_glob_and_sorts(store, store_dir):
    small = store.put(b"s", name="tools/small.whl")
    big = store.put(blob(5000), name="data/big.tar")
    mid = store.put(blob(500), name="tools/mid.whl")
    assert {o.sha256 for o in store.ls()} == {small, big, mid}
    assert [o.sha256 for o in store.ls(order="size")] == [big, mid, small]
    assert [o.sha256 for o in store.ls(order="used")] == [mid, big, small]
    assert {o.sha256 for o in store.ls("*.whl")} == {small, mid}
    assert [o.sha256 for o in store.ls(big[:10] + "*")] == [big]  # digests match too
    assert store.ls("nothing*") == []
    with pytest.raises(InvalidInput):
        store.ls(order="colour")
    assert_store_consistent(store_dir)


def test_ls_info_stats_from_the_command_line(run_cli, store_dir, tmp_path):
    f = tmp_path / "f.whl"
    f.write_bytes(blob(3000))
    d = run_cli("put", str(f), "--name", "f.whl").stdout.decode().strip()
    g = tmp_path / "g.bin"
    g.write_bytes(b"g")
    run_cli("put", str(g))
    assert run_cli("link", d, str(tmp_path / "out" / "f.whl")).returncode == 0

    listed = json.loads(run_cli("--json", "ls", "*.whl", "--sort", "size").stdout)
    assert [o["sha256"] for o in listed] == [d]
    assert listed[0]["size"] == 3000 and listed[0]["path"].endswith(d)
    assert listed[0]["names"] == ["f.whl"] and listed[0]["last_used"] > 0
    assert "sources" not in listed[0] and "links" not in listed[0]  # not looked up: info's
    text = run_cli("ls", "--sort", "used").stdout.decode().splitlines()
    # g.bin was put last: the most recent use (link within the same second records none).
    assert len(text) == 2 and text[1].startswith(d) and text[1].endswith("f.whl")

    info = json.loads(run_cli("--json", "info", "f.whl").stdout)
    assert (info["sha256"], info["size"], info["names"]) == (d, 3000, ["f.whl"])
    [link] = info["links"]
    assert link["path"] == str(tmp_path / "out" / "f.whl") and link["method"] == "hardlink"
    assert link["live"] is True
    assert "used     " in run_cli("info", d).stdout.decode()

    stats = json.loads(run_cli("--json", "stats").stdout)
    assert (stats["objects"], stats["bytes"], stats["saved_bytes"]) == (2, 3001, 3000)
    assert (stats["names"], stats["links"], stats["temp_files"]) == (1, 1, 0)
    assert "saved       3000" in run_cli("stats").stdout.decode()
    (tmp_path / "out" / "f.whl").unlink()
    assert f"{tmp_path / 'out' / 'f.whl'} (hardlink, gone)" in run_cli("info", d).stdout.decode()
    assert_store_consistent(store_dir)


def test_stats_counts_objects_on_disk_and_temps(store, store_dir):
    d = store.put(b"counted")
    os.unlink(store_dir / "index.db")  # objects are counted on disk, not in the index
    for suffix in ("-wal", "-shm"):
        if (store_dir / f"index.db{suffix}").exists():
            os.unlink(store_dir / f"index.db{suffix}")
    store.close()
    (store.layout.tmp / "stray.tmp").write_bytes(b"x")
    s = store.stats()
    assert (s.objects, s.bytes, s.temp_files) == (1, 7, 1)
    assert store.path(d).exists()
    (store.layout.tmp / "stray.tmp").unlink()
    assert_store_consistent(store_dir)
