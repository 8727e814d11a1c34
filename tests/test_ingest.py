"""The write path: unique temps, one-pass hashing, link-publish, EEXIST as success."""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import pytest
from blake3 import blake3

from casstore.errors import HashMismatch, SizeMismatch
from casstore.ingest import Ingest, parse_temp_name, publish, temp_name
from casstore.layout import Layout

from .conftest import assert_store_consistent, blob, sha


def test_commit_publishes_readonly_object_with_both_digests(store_dir):
    layout = Layout(store_dir)
    data = blob(300_000)
    with Ingest(layout) as ing:
        for i in range(0, len(data), 65536):
            ing.write(data[i : i + 65536])
        pub = ing.commit(sha256=sha(data), size=len(data))
    assert pub.created
    assert pub.path == store_dir / "sha256" / sha(data)[:2] / sha(data)[2:4] / sha(data)
    assert pub.path.read_bytes() == data
    assert pub.blake3 == blake3(data).hexdigest()
    assert stat.S_IMODE(pub.path.stat().st_mode) == 0o444
    assert (store_dir / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172")
    assert_store_consistent(store_dir)


def test_md5_is_computed_in_the_same_pass(store_dir):
    data = b"conda package bytes"
    with Ingest(Layout(store_dir), md5=True) as ing:
        ing.write(data)
        pub = ing.commit(md5=hashlib.md5(data).hexdigest())
    assert pub.md5 == hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("kind", ["sha256", "size", "md5"])
def test_mismatch_leaves_no_object_and_no_temp(store_dir, kind):
    layout = Layout(store_dir)
    data = b"x" * 1000
    with pytest.raises(HashMismatch if kind != "size" else SizeMismatch) as err:  # noqa: SIM117
        with Ingest(layout, md5=True) as ing:
            ing.write(data)
            ing.commit(
                sha256="0" * 64 if kind == "sha256" else None,
                size=999 if kind == "size" else None,
                md5="0" * 32 if kind == "md5" else None,
                source="http://example.invalid/x",
            )
    assert "example.invalid/x" in str(err.value)
    assert not layout.object_path(sha(data)).exists()
    assert os.listdir(layout.tmp) == []
    assert_store_consistent(store_dir)


def test_temp_names_are_unique_and_name_their_writer():
    names = {temp_name() for _ in range(10_000)}
    assert len(names) == 10_000
    host, pid = parse_temp_name(next(iter(names)))
    assert pid == os.getpid() and host
    random_part = next(iter(names)).split(".")[-2]
    assert len(random_part) * 4 >= 128


def test_publish_finding_object_present_is_success(store_dir):
    layout = Layout(store_dir)
    data = b"same content"
    with Ingest(layout) as a, Ingest(layout) as b:
        a.write(data)
        b.write(data)
        first = a.commit()
        second = b.commit()
    assert first.created and not second.created
    assert first.path == second.path
    assert os.listdir(layout.tmp) == []
    assert_store_consistent(store_dir)


def test_publish_replaces_damaged_object_of_wrong_size(store_dir):
    layout = Layout(store_dir)
    data = b"the real content"
    obj = layout.object_path(sha(data))
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"truncated")
    with Ingest(layout) as ing:
        ing.write(data)
        pub = ing.commit(sha256=sha(data))
    assert pub.created and obj.read_bytes() == data
    assert len(os.listdir(layout.quarantine)) == 1


def test_many_threads_publish_one_object(store_dir):
    layout = Layout(store_dir)
    data = blob(100_000, seed=3)
    barrier = threading.Barrier(16)
    results = []

    def writer():
        with Ingest(layout) as ing:
            ing.write(data)
            barrier.wait()
            results.append(ing.commit(sha256=sha(data)))

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.created for r in results) == 1
    assert_store_consistent(store_dir)


def test_reset_starts_hashes_over(store_dir):
    with Ingest(Layout(store_dir)) as ing:
        ing.write(b"garbage from a server that ignored Range")
        ing.reset()
        ing.write(b"good")
        pub = ing.commit(sha256=sha(b"good"))
    assert pub.path.read_bytes() == b"good"


def test_publish_direct_links_then_unlinks_temp(store_dir):
    layout = Layout(store_dir)
    layout.ensure()
    temp = layout.tmp / temp_name()
    temp.write_bytes(b"abc")
    os.chmod(temp, 0o444)
    path, created = publish(layout, temp, sha(b"abc"), 3)
    assert created and not temp.exists() and path.read_bytes() == b"abc"


@pytest.mark.parametrize("missing", ["cd", "ab", "sha256", "none"])
def test_each_level_of_an_objects_directory_is_synced_into_its_parent(
    store_dir, monkeypatch, missing
):
    # Called after a link missed the directory; "none": another writer made it
    # meanwhile and may not have synced it yet, so it is synced here too.
    import shutil

    from casstore import ingest

    layout = Layout(store_dir)
    leaf = layout.object_path("abcd" + "0" * 60).parent
    leaf.mkdir(parents=True)
    top = {"cd": leaf, "ab": leaf.parent, "sha256": leaf.parent.parent, "none": None}[missing]
    if top is not None:
        shutil.rmtree(top)
    synced = []
    real = ingest.fsync_dir
    monkeypatch.setattr(ingest, "fsync_dir", lambda path: (synced.append(path), real(path)))
    ingest._make_object_dir(leaf)
    assert leaf.is_dir()
    # "none": the other writer may have made ab/ with it, unsynced too.
    made = {"cd": [leaf], "ab": [leaf, leaf.parent]}.get(
        missing, [leaf, leaf.parent, leaf.parent.parent]
    )
    assert sorted(synced) == sorted(level.parent for level in made)


def test_publish_makes_the_objects_directories_it_needs(store_dir):
    """Made on a publish's first miss, as deep as is missing (here sha256/ itself,
    removed by hand under a layout that had made it)."""
    import shutil

    layout = Layout(store_dir)
    for data in (b"first", b"second"):
        with Ingest(layout) as ing:
            ing.write(data)
            pub = ing.commit(sha256=sha(data))
        assert pub.created and pub.path.read_bytes() == data
        shutil.rmtree(store_dir / "sha256")
    with Ingest(layout) as ing:  # a temp that is gone is an error, not a new directory
        ing.write(b"third")
        ing.seal()
        os.unlink(ing.temp)
        with pytest.raises(FileNotFoundError):
            publish(layout, ing.temp, sha(b"third"), 5)
    assert not (store_dir / "sha256").exists()
