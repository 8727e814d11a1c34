"""Batches (``get_many``, ``fetch``) published in group-commit rounds (batch.py).

Real processes, a real origin counting requests, real SIGKILLs; interleavings
are forced with the origin's gates and the store's own locks, never sleeps.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest

from casstore import BatchError, CasError, DownloadError, HashMismatch, Request, Store
from casstore.ingest import parse_temp_name

from .conftest import HeldLock, assert_store_consistent, blob, refuse_rows, sha
from .test_races import ROOT, _start_together

pytestmark = pytest.mark.timeout(120)


def _small(origin, n: int, *, size: int = 4096, prefix: str = "s") -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        data = blob(size + i, seed=1000 + i)
        out.append((origin.add(f"/{prefix}-{i}.bin", data), sha(data)))
    return out


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def test_batches_in_processes_over_overlapping_lists_fetch_each_url_once(
    tmp_path, store_dir, origin
):
    arts = _small(origin, 60)
    rng = random.Random(7)
    specs = []
    for i in range(4):  # each process: 40 of the 60, in its own order, overlapping the others
        subset = rng.sample(arts, 40)
        specs.append({"job": "get_many", "store": str(store_dir), "seed": i, "requests": subset})
    # Two more processes take the command line's path: `casstore fetch -j 8`.
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{u}#{d}\n" for u, d in arts))
    fetchers = [
        subprocess.Popen(
            [sys.executable, "-m", "casstore", "-q", "fetch", str(listing), "-j", "8"],
            cwd=ROOT,
            env={**os.environ, "CASSTORE_DIR": str(store_dir)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        results = _start_together(tmp_path, specs)
        outs = [p.communicate(timeout=90) for p in fetchers]
    finally:
        for p in fetchers:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(fetchers, outs, strict=True):
        assert p.returncode == 0, err.decode()
    layout = Store(store_dir).layout
    for url, digest in arts:
        assert origin.count(_path(url)) == 1, url
        obj = layout.object_path(digest)
        assert sha(obj.read_bytes()) == digest
    for spec, result in zip(specs, results, strict=True):
        assert sorted(result["paths"]) == sorted(
            str(layout.object_path(d)) for _, d in spec["requests"]
        )
    for _, out_err in zip(fetchers, outs, strict=True):
        printed = out_err[0].decode().split()
        assert printed == [str(layout.object_path(d)) for _, d in arts]
    assert os.listdir(store_dir / "tmp") == []
    assert_store_consistent(store_dir)


def test_an_item_failing_inside_a_batch_does_not_stop_the_others(tmp_path, store_dir, origin):
    good = _small(origin, 30)
    wrong = origin.add("/wrong.bin", blob(5000, seed=1))
    cut = origin.add("/cut.bin", blob(9000, seed=2), truncate_at=100, truncate_times=99)
    missing = origin.url("/missing.bin")
    bad = [
        Request(wrong, sha256=sha(b"something else")),
        Request(cut, sha256=sha(blob(9000, seed=2))),
        Request(missing, sha256=sha(b"nothing")),
    ]
    requests: list = [
        Request(u, sha256=d, dest=str(tmp_path / "out" / f"{i}.bin"))
        for i, (u, d) in enumerate(good)
    ]
    for n, item in enumerate(bad):  # spread among the good ones
        requests.insert(5 + 10 * n, item)
    with Store(store_dir, retries=1, backoff_max=0) as store, pytest.raises(BatchError) as info:
        store.get_many(requests, concurrency=4)
    results = info.value.results
    failures = {r.url: r for r in results if isinstance(r, Exception)}
    assert isinstance(failures[wrong], HashMismatch)
    assert isinstance(failures[cut], DownloadError)
    assert isinstance(failures[missing], DownloadError)
    assert info.value.exit_code == DownloadError.exit_code  # the worst: 4 over 3
    for i, (url, digest) in enumerate(good):
        dest = tmp_path / "out" / f"{i}.bin"
        assert dest in results
        assert sha(dest.read_bytes()) == digest
        assert origin.count(_path(url)) == 1
    assert origin.count("/cut.bin") == 2  # retried once, then given up
    assert not Store(store_dir).layout.object_path(sha(b"something else")).exists()
    assert os.listdir(store_dir / "tmp") == []
    assert_store_consistent(store_dir)


def test_an_item_locked_by_another_process_is_put_off_not_waited_for(store, store_dir, origin):
    held_art, *others = _small(origin, 6)
    done: list[int] = []
    with HeldLock(store.layout, held_art[1]) as other:

        def on_done(i: int, outcome: object) -> None:
            done.append(i)
            if len(done) == len(others):  # every other item finished while the lock was held
                other.let_go()

        # One worker: waiting for the held lock first would finish nothing else.
        outcomes = store.ensure_many([held_art, *others], concurrency=1, on_done=on_done)
    assert done[-1] == 0 and sorted(done[:-1]) == list(range(1, len(others) + 1))
    assert [o.sha256 for o in outcomes] == [d for _, d in [held_art, *others]]
    for url, _ in [held_art, *others]:
        assert origin.count(_path(url)) == 1
    assert_store_consistent(store_dir)


def _batch_process(store_dir: Path, items: list[tuple[str, str]], out) -> subprocess.Popen:
    code = (
        "import json, sys\n"
        "from casstore import Store\n"
        "items = [tuple(x) for x in json.loads(sys.argv[2])]\n"
        "Store(sys.argv[1]).get_many(items, concurrency=4)\n"
    )
    import json

    return subprocess.Popen(
        [sys.executable, "-c", code, str(store_dir), json.dumps(items)],
        cwd=ROOT,
        stdout=out,
        stderr=out,
    )


@pytest.mark.parametrize("gate_after", [0, 2048, 4096], ids=["headers", "mid-body", "whole-body"])
def test_killed_batch_leaves_no_partial_object_and_no_dangling_row(
    tmp_path, store_dir, origin, gate_after
):
    """SIGKILL while one item of a batch is stalled in transfer (or, with the whole
    body sent, anywhere in verify/seal/commit) and the others are downloading,
    publishing and indexing in rounds around it."""
    arts = _small(origin, 40)
    data = blob(4096, seed=99)
    gated = origin.add("/gated.bin", data, gate_after=gate_after, chunk=1024)
    items = [*arts[:20], (gated, sha(data)), *arts[20:]]
    route = origin.routes["/gated.bin"]
    with open(tmp_path / "batch.log", "wb") as log:
        proc = _batch_process(store_dir, items, log)
        try:
            assert route.sent_event.wait(60), "the gated item was never requested"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if gate_after < len(data):  # the body never arrived whole: nothing of it is visible
        assert not Store(store_dir).layout.object_path(sha(data)).exists()
    # A dead writer's temps may remain (gc's to sweep); nothing partial, no dangling row.
    for name in os.listdir(store_dir / "tmp"):
        assert parse_temp_name(name)[1] == proc.pid, name
    assert_store_consistent(store_dir, allow_temps=True)
    route.gate.set()
    with Store(store_dir) as store:
        store.gc()
        assert os.listdir(store_dir / "tmp") == []
        paths = store.get_many(items, concurrency=4)
    assert [sha(p.read_bytes()) for p in paths] == [d for _, d in items]
    for url, _ in items:
        # Each at most twice: once by the killed batch, once after it if it had not
        # been published by then.
        assert 1 <= origin.count(_path(url)) <= 2, url
    assert_store_consistent(store_dir)


def _sealed(layout, data: bytes):
    from casstore.ingest import Ingest

    ingest = Ingest(layout)
    ingest.write(data)
    digest = ingest.verify(sha256=sha(data))
    ingest.seal()
    return ingest, digest


def test_rows_wait_for_a_group_but_a_url_keyed_row_is_written_at_once(store, store_dir):
    """batch.py: a published object's row may be queued, unless a process waiting on
    its URL's lock needs the row to learn the digest."""
    from casstore.batch import ROWS, GroupCommit

    store.layout.ensure()
    committer = GroupCommit(store.layout, store.index, rows_age=600)  # no clock in this test
    by_digest = [blob(100 + i, seed=300 + i) for i in range(ROWS - 1)]
    for data in by_digest:
        ingest, digest = _sealed(store.layout, data)
        with ingest:
            published = committer.commit(ingest, digest, {"source": f"http://o/{digest}"})
        assert published.path.read_bytes() == data  # published at once
        assert store.index.get_object(digest) is None  # its row queued
    by_url = blob(99, seed=299)
    ingest, digest = _sealed(store.layout, by_url)
    with ingest:
        committer.commit(ingest, digest, {"source": "http://o/tofu"}, keyed_by_url=True)
    assert store.index.lookup_source("http://o/tofu") == digest
    assert all(store.index.get_object(sha(d)) is not None for d in by_digest)  # all went
    last = blob(98, seed=298)
    ingest, digest = _sealed(store.layout, last)
    with ingest:
        committer.commit(ingest, digest, {})
    assert store.index.get_object(digest) is None
    committer.flush()
    assert store.index.get_object(digest) is not None
    assert_store_consistent(store_dir)


def test_every_row_is_written_by_the_time_get_many_returns(store, store_dir, origin):
    items = _small(origin, 10)
    requests = [
        Request(url, sha256=digest, name=f"item-{i}") for i, (url, digest) in enumerate(items)
    ]
    store.get_many(requests)
    for i, (url, digest) in enumerate(items):
        assert store.index.get_object(digest) is not None
        assert store.index.lookup_source(url) == digest
        assert store.resolve(f"item-{i}") == digest
    assert_store_consistent(store_dir)


def test_a_queued_row_is_written_when_no_other_round_comes(store, store_dir):
    """The timer: a batch whose other workers are all on long downloads."""
    from casstore.batch import GroupCommit

    store.layout.ensure()
    committer = GroupCommit(store.layout, store.index, rows_age=0.05)
    ingest, digest = _sealed(store.layout, blob(5000, seed=301))
    with ingest:
        committer.commit(ingest, digest, {})
    deadline = time.monotonic() + 10
    while store.index.get_object(digest) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.index.get_object(digest) is not None
    committer.close()
    assert_store_consistent(store_dir)


def _index_fds(store) -> int:
    """Descriptors of this process open on the store's index file."""
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}") == str(store.index.path)
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return fds


@pytest.mark.parametrize("thread", ["workers", "timer"])
def test_a_batchs_threads_close_their_index_connections(store, origin, thread):
    # A finished thread's connection sits in a reference cycle until the garbage
    # collector runs, and the command line leaves without it: each of the
    # batch's threads closes its own as it ends, and the last close
    # checkpoints the WAL.
    from casstore.batch import GroupCommit

    gc.disable()
    try:
        if thread == "workers":
            store.get_many(_small(origin, 40), concurrency=8, processes=1)
        else:
            store.layout.ensure()
            threads = threading.active_count()
            committer = GroupCommit(store.layout, store.index, rows_age=0.05)
            ingest, digest = _sealed(store.layout, blob(5000, seed=302))
            with ingest:
                committer.commit(ingest, digest, {})
            deadline = time.monotonic() + 20
            while threading.active_count() > threads or store.index.get_object(digest) is None:
                assert time.monotonic() < deadline, "the timer never wrote the row"
                time.sleep(0.01)
            committer.close()
        assert _index_fds(store) > 0  # this thread's connection
        store.close()
        assert _index_fds(store) == 0
        assert not Path(f"{store.index.path}-wal").exists()
    finally:
        gc.enable()


def test_close_waits_for_a_timer_that_has_fired(store):
    # Else the command line could leave while the timer's thread still holds
    # its connection, and the WAL would stay (its close is the last).
    from casstore.batch import GroupCommit

    store.layout.ensure()
    committer = GroupCommit(store.layout, store.index, rows_age=0.01)
    fired, go = threading.Event(), threading.Event()
    flush = committer._flush_and_let_go

    def held_flush() -> None:
        fired.set()
        assert go.wait(30)
        flush()

    committer._flush_and_let_go = held_flush  # type: ignore[method-assign]
    ingest, digest = _sealed(store.layout, blob(5000, seed=303))
    with ingest:
        committer.commit(ingest, digest, {})
    assert fired.wait(30)
    closing = threading.Thread(target=committer.close)
    closing.start()
    closing.join(0.3)  # (a bound for a negative: with the wait it stays blocked)
    assert closing.is_alive(), "close() returned while the timer was still writing"
    go.set()
    closing.join(30)
    assert not closing.is_alive()
    assert store.index.get_object(digest) is not None


def test_a_helpers_object_has_its_row_queued_with_the_batchs_own(store, store_dir):
    """``adopt``: the row of an object a helper process published is queued like
    the batch's own rows and written by the next round that writes them; one
    whose object is gone by then is left out, as for the batch's own."""
    from casstore.batch import GroupCommit
    from casstore.ingest import Ingest

    store.layout.ensure()
    committer = GroupCommit(store.layout, store.index, rows_age=600)
    kept, gone = blob(4000, seed=310), blob(4001, seed=311)
    for data in (kept, gone):
        with Ingest(store.layout) as ingest:  # as the helper does: published, no row
            ingest.write(data)
            published = ingest.commit(sha256=sha(data))
        row = {
            "blake3": published.blake3,
            "name": f"n{len(data)}",
            "source": f"http://o/{len(data)}",
        }
        committer.adopt(published.sha256, published.size, row)
    assert store.index.get_object(sha(kept)) is None  # queued
    store.layout.object_path(sha(gone)).unlink()
    committer.close()
    assert store.index.get_object(sha(kept))["blake3"] == blake3.blake3(kept).hexdigest()
    assert store.resolve("n4000") == store.index.lookup_source("http://o/4000") == sha(kept)
    assert store.index.get_object(sha(gone)) is None and not committer.unindexed
    assert_store_consistent(store_dir)


@pytest.mark.parametrize("way", ["queued", "at once", "with a dest"])
def test_an_item_whose_row_cannot_be_written_fails_alone(store, store_dir, origin, tmp_path, way):
    """The database refuses one object's row (a trigger, as a full disk or a broken
    index would): that item is an error, the others are fetched and indexed.  The
    row goes in a group after delivery (queued), in its round (an item trusted on
    first use: its waiters need it), or with its link."""
    items = _small(origin, 6)
    refused = items[3][1]
    requests = [Request(url, sha256=digest) for url, digest in items]
    if way == "at once":
        requests[3] = Request(items[3][0])
    elif way == "with a dest":
        requests = [
            Request(url, sha256=digest, dest=str(tmp_path / "out" / str(i)))
            for i, (url, digest) in enumerate(items)
        ]
    refuse_rows(store, refused)
    results = store.ensure_many(requests, concurrency=1)
    assert isinstance(results[3], CasError) and "refused" in str(results[3])
    for i, (url, digest) in enumerate(items):
        if i != 3:
            assert results[i].sha256 == digest
            assert store.index.lookup_source(url) == digest
    assert_store_consistent(store_dir)
