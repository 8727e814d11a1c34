"""Many threads and processes on one store at once (SPEC §1 invariant 6, §4).

Workers are real processes (tests/workers.py) released together by a file
they all wait for; the origin counts what it served.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from casstore import BatchError, DownloadError, Request, Store, locks
from casstore.locks import single_flight

from .conftest import HeldLock, assert_store_consistent, blob, sha, threads_in_flock

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


def _start_together(tmp_path: Path, specs: list[dict], env: dict | None = None) -> list[dict]:
    """Run one worker per spec, released at the same moment; their JSON results."""
    go = tmp_path / "go"
    procs = []
    for i, spec in enumerate(specs):
        spec = {**spec, "ready": str(tmp_path / f"ready-{i}"), "go": str(go)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.workers", json.dumps(spec)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, **(env or {})},
            )
        )
    try:
        readies = [tmp_path / f"ready-{i}" for i in range(len(specs))]
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in readies):
            assert all(p.poll() is None for p in procs), "a worker died before the barrier"
            assert time.monotonic() < deadline, "workers never got ready"
            time.sleep(0.005)
        go.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=90)
            assert b"database is locked" not in err, err.decode()
            assert p.returncode == 0, f"worker failed ({p.returncode}): {out!r} {err.decode()}"
            results.append(json.loads(out))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            # Unread pipes of workers left behind by a failure would surface
            # as ResourceWarnings in whichever test runs next.
            p.stdout.close()
            p.stderr.close()


def _artifacts(origin, n: int, size: int = 300_000) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        data = blob(size, seed=100 + i)
        out.append((origin.add(f"/art-{i}.bin", data), sha(data)))
    return out


def test_threads_of_one_process_exclude_each_other(store, store_dir):
    messages: list[str] = []
    # A second thread is refused while the first holds the lock, and says so.
    with (
        HeldLock(store.layout, "k"),
        single_flight(
            store.layout, "k", label="thing", timeout=1.2, on_wait=messages.append
        ) as got,
    ):
        assert not got
    assert messages[0] == "waiting for another process to fetch thing"
    assert "not granted after 1.2s" in messages[1]
    with single_flight(store.layout, "k", label="thing", timeout=5) as got:
        assert got
    assert (store_dir / "locks" / "k.lock").exists()  # never unlinked


def _flock(path: Path) -> int:
    """A descriptor holding the flock of ``path``, as another process would."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _eventually(condition, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def _blocked_waiter(store, **options) -> tuple[Path, int, dict, threading.Thread, set[int]]:
    """A thread waiting in ``single_flight`` for the lock of "k", which a holder
    (the returned descriptor) has; returns once the waiter blocks in flock.
    The waiter's ``outcome`` says what it held, and whether anyone else could
    take the lock while it did; last come its flock threads."""
    store.layout.ensure()
    lock = store.layout.lock_path("k")
    holder = _flock(lock)
    outcome: dict = {}

    def wait() -> None:
        with single_flight(store.layout, "k", label="thing", timeout=60, **options) as held:
            outcome["held"] = held
            outcome["inode"] = os.stat(lock).st_ino
            outcome["free meanwhile"] = _free(lock)

    others = threads_in_flock()  # other tests' abandoned flocks may still be ending
    waiter = threading.Thread(target=wait)
    waiter.start()
    _eventually(lambda: threads_in_flock() - others, "the waiter never blocked in flock")
    assert waiter.is_alive() and not outcome
    return lock, holder, outcome, waiter, threads_in_flock() - others


def _ended(tids: set[int]) -> bool:
    return not any(os.path.exists(f"/proc/self/task/{tid}") for tid in tids)


def test_a_waiter_blocks_in_flock_and_holds_the_lock_once_released(store):
    lock, holder, outcome, waiter, flocks = _blocked_waiter(store)
    os.close(holder)
    waiter.join(30)
    assert outcome == {"held": True, "inode": os.stat(lock).st_ino, "free meanwhile": False}
    assert _free(lock)
    _eventually(lambda: _ended(flocks), "a flock thread outlived its waiter")


def test_a_waiter_that_stops_waiting_leaves_no_lock_behind(store):
    published = threading.Event()
    lock, holder, outcome, waiter, flocks = _blocked_waiter(store, done=published.is_set)
    published.set()  # the holder published: the waiter stops waiting without the lock
    waiter.join(30)
    assert outcome["held"] is False
    # Its abandoned flock is granted once the holder lets go, and dropped at once.
    os.close(holder)
    _eventually(lambda: _ended(flocks), "the abandoned flock never returned")
    assert _free(lock)


def test_a_waiter_follows_a_lock_file_gc_replaced(store):
    lock, old, outcome, waiter, blocked_on_old = _blocked_waiter(store)
    # gc removes the file while holding it; a newcomer locks a new file there.
    lock.unlink()
    new = _flock(lock)
    os.close(old)  # the waiter is granted the orphan inode: that excludes nobody
    _eventually(
        lambda: threads_in_flock() - blocked_on_old, "the waiter did not move to the new file"
    )
    assert waiter.is_alive() and not outcome
    os.close(new)
    waiter.join(30)
    assert outcome == {"held": True, "inode": os.stat(lock).st_ino, "free meanwhile": False}


def test_waits_given_up_on_a_hung_holder_share_one_thread(store):
    store.layout.ensure()
    lock = store.layout.lock_path("k")
    holder = _flock(lock)  # hangs through every timeout below
    others = threads_in_flock()
    fds = _open_fds()
    try:
        for _ in range(20):
            with single_flight(store.layout, "k", label="thing", timeout=0.05) as got:
                assert not got
        mine = threads_in_flock() - others
        assert len(mine) == 1, f"{len(mine)} threads still blocked in flock"
        assert _open_fds() == fds + 1
    finally:
        os.close(holder)
    _eventually(lambda: _ended(mine), "the parked wait never ended")
    assert _free(lock)
    _eventually(lambda: _open_fds() == fds - 1, "the parked wait kept its descriptor")


def _open_fds() -> int:
    # An earlier test's unclosed Store would have its connection closed by the
    # garbage collector at any moment, in the middle of a count: not now.
    # (Locks are raw descriptors, which the collector never closes.)
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_a_flock_that_fails_while_waiting_means_going_on_without_the_lock(store, monkeypatch):
    # ENOLCK and the like, from a lock manager that answers a blocking flock with an
    # error while a try says "held": no spinning until the timeout, no lock.
    real = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_NB:
            raise BlockingIOError(errno.EWOULDBLOCK, "held")
        if operation & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")
        real(fd, operation)

    store.layout.ensure()
    fds = _open_fds()
    monkeypatch.setattr(fcntl, "flock", flock)
    messages: list[str] = []
    with single_flight(
        store.layout, "k", label="thing", timeout=30, on_wait=messages.append
    ) as got:
        assert not got
    assert messages == ["cannot lock thing (No locks available); going on without it"]
    _eventually(lambda: _open_fds() == fds, "a descriptor was left open")


def test_no_thread_to_wait_with_means_going_on_without_the_lock(store, monkeypatch):
    store.layout.ensure()
    holder = _flock(store.layout.lock_path("k"))
    fds = _open_fds()

    def start(*args) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(locks._thread, "start_new_thread", start)
    messages: list[str] = []
    try:
        with single_flight(
            store.layout, "k", label="thing", timeout=30, on_wait=messages.append
        ) as got:
            assert not got
    finally:
        os.close(holder)
    assert len(messages) == 1 and messages[0].startswith("cannot lock thing (")
    assert "can't start new thread" in messages[0]
    assert _open_fds() == fds - 1  # the holder's, closed; none of the waiter's left


def test_a_process_hold_ends_with_the_single_flight_that_takes_it_over(store, monkeypatch):
    # The command line's downloader (hit.py waited, then the Store downloads):
    # the processes queued behind it go on once the Store's block has
    # published, not when the downloader's process exits.
    holds: dict = {}
    monkeypatch.setattr(locks, "_process_locks", holds)
    store.layout.ensure()
    lock = store.layout.lock_path("k")
    try:
        assert locks.hold_for_process(str(lock), label="thing")
        assert not _free(lock)
        with single_flight(store.layout, "k", label="thing", timeout=0.5) as held:
            assert held  # taken over, not waited for (its own flock would wait on the hold)
            assert not _free(lock)
        assert _free(lock)
        with single_flight(store.layout, "k", label="thing", timeout=0.5) as held:
            assert held and not _free(lock)  # the next block locks afresh
        assert _free(lock)
    finally:
        for fd in holds.values():
            if fd is not None:
                os.close(fd)


def test_a_waiter_looks_for_the_published_object_less_often_as_it_waits(store):
    # Each look costs a waiting process ~0.2 ms of CPU; holders release the
    # lock when they publish, so looking is only the fallback.
    store.layout.ensure()
    holder = _flock(store.layout.lock_path("k"))
    looks: list[float] = []
    start = time.monotonic()
    timer = threading.Timer(0.8, os.close, (holder,))
    timer.start()
    try:
        with single_flight(
            store.layout, "k", label="thing", done=lambda: looks.append(time.monotonic()) and False
        ) as held:
            assert held
    finally:
        timer.join()
    assert time.monotonic() - start >= 0.8
    # After 50 ms, then twice as long each time up to 0.4 s: 5 looks in 0.8 s, not 16.
    assert 2 <= len(looks) <= 6, [round(t - start, 3) for t in looks]


def test_a_process_waiter_granted_a_published_object_lets_the_next_in(store, monkeypatch):
    # The command line's waiter (hit.py) keeps a lock it must download under
    # (until its Store's block ends), but not one granted after the holder published.
    monkeypatch.setattr(locks, "DONE_POLL", 30.0)  # so only the grant wakes it early
    store.layout.ensure()
    lock = store.layout.lock_path("k")
    holder = _flock(lock)
    published = threading.Event()
    outcome: list[bool] = []
    others = threads_in_flock()
    waiter = threading.Thread(
        target=lambda: outcome.append(
            locks.hold_for_process(str(lock), label="thing", done=published.is_set)
        )
    )
    waiter.start()
    _eventually(lambda: threads_in_flock() - others, "the waiter never blocked in flock")
    published.set()
    os.close(holder)  # granted to the waiter, which finds the object published
    waiter.join(30)
    assert outcome == [False]
    assert _free(lock)


def test_a_get_that_held_the_lock_leaves_its_waiters_a_note(store, origin):
    """What the command line's waiters (hit.py) may serve by: the object's file
    (inode and write time), a time no later than its row's last use, and the URL."""
    data = b"noted"
    url = origin.add("/noted", data)
    before = time.time()
    path = store.get(url, sha256=sha(data))
    note = locks.read_note(str(store.layout.lock_path(sha(data))))
    kind, identity, indexed, source = note.split(" ")
    st = os.stat(path)
    assert (kind, identity, source) == ("published", f"{st.st_ino}:{st.st_mtime_ns}", url + "\n")
    assert before <= float(indexed) <= store.index.get_object(sha(data))["last_used"]


def test_a_lock_entered_and_dropped_is_released_with_it(store):
    # As a generator's ``finally`` would: never held for the rest of the process.
    store.layout.ensure()
    flight = single_flight(store.layout, "k", label="thing")
    assert flight.__enter__()
    assert not _free(store.layout.lock_path("k"))
    del flight
    gc.collect()
    assert _free(store.layout.lock_path("k"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["while it waits", "once it has the lock"])
def test_an_aget_cancelled_as_its_worker_takes_the_lock_leaves_it_to_nobody(store, origin, when):
    """asyncio.run cancels what is left of a loop; its worker thread must not
    keep the lock for nobody (every later get would wait out the lock timeout),
    whether or not the loop runs again, nor wait on for it."""
    import asyncio

    data = b"given up"
    url = origin.add("/given-up", data)
    store.layout.ensure()
    lock = store.layout.lock_path(sha(data))
    holder = _flock(lock)
    others = threads_in_flock()
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(store.aget(url, sha256=sha(data)))

        async def waiting() -> None:
            while not threads_in_flock() - others:
                assert not task.done(), task
                await asyncio.sleep(0.001)

        loop.run_until_complete(waiting())
        if when == "once it has the lock":
            os.close(holder)  # granted to the worker while the loop does not run
            _eventually(  # (woken in flock, it still has to take the lock)
                lambda: not threads_in_flock() - others and not _free(lock),
                "the worker never got it",
            )
        left = asyncio.all_tasks(loop)
        for t in left:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        assert task.cancelled()
    finally:
        loop.close()  # without waiting for the worker thread
    if when == "while it waits":
        # It stops waiting: its flock, still blocked, is parked (dropped once granted).
        st = os.stat(lock)
        _eventually(lambda: (st.st_dev, st.st_ino) in locks._parked, "the worker waited on")
        os.close(holder)
    # Given back by the worker, or by the cancelled task: whichever came second.
    _eventually(lambda: _free(lock), "the lock was kept for nobody")


def test_a_get_that_gave_up_on_the_lock_leaves_no_note(store, origin, monkeypatch):
    # The lock is another's: a note is only ever its holder's to write.
    data = b"not noted"
    url = origin.add("/not-noted", data)
    monkeypatch.setenv("CASSTORE_LOCK_TIMEOUT", "0.1")
    with HeldLock(store.layout, sha(data)):
        store.get(url, sha256=sha(data))
        assert locks.read_note(str(store.layout.lock_path(sha(data)))) == ""


@contextmanager
def _forked_child(*close: int) -> Iterator[None]:
    """A child forked here that lives on with what it inherited (but ``close``)
    until the block ends; the block starts once the child is past its fork
    handlers."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in close:
            os.close(fd)
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"r"
        yield
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)


def test_a_child_forked_while_a_waiter_blocks_does_not_keep_its_lock(store):
    lock, holder, outcome, waiter, _ = _blocked_waiter(store)
    with _forked_child(holder):  # the holder's own fd is the test's, not casstore's
        os.close(holder)
        waiter.join(30)  # granted, held, released by the waiter
        assert outcome["held"] is True
        assert _free(lock), "the forked child kept the waiter's lock"


def test_a_child_forked_while_another_thread_holds_a_lock_does_not_keep_it(store):
    lock = store.layout.lock_path("k")
    with HeldLock(store.layout, "k") as holder, _forked_child():
        holder.let_go()
        assert _free(lock), "the forked child kept the lock its parent released"


def test_processes_and_threads_fetch_each_url_once(tmp_path, store_dir, origin):
    arts = _artifacts(origin, 4)
    spec = {"job": "get_threads", "store": str(store_dir), "threads": 4, "requests": arts}
    results = _start_together(tmp_path, [{**spec, "seed": i} for i in range(8)])
    for (url, digest), i in zip(arts, range(4), strict=True):
        assert origin.count(f"/art-{i}.bin") == 1, url
        obj = Store(store_dir).layout.object_path(digest)
        assert sum(r["paths"].count(str(obj)) for r in results) == 8 * 4
    assert_store_consistent(store_dir)


def test_lying_lock_wastes_bandwidth_but_stays_correct(tmp_path, store_dir, origin):
    arts = _artifacts(origin, 4)
    spec = {"job": "get_threads", "store": str(store_dir), "threads": 2, "requests": arts}
    _start_together(
        tmp_path, [{**spec, "seed": i} for i in range(8)], env={"CASSTORE_LOCK_TIMEOUT": "0"}
    )
    assert not (store_dir / "locks").exists() or not os.listdir(store_dir / "locks")
    for i in range(4):
        assert origin.count(f"/art-{i}.bin") >= 1
    assert_store_consistent(store_dir)


def test_random_operations_leave_the_store_consistent(tmp_path, store_dir, origin):
    arts = _artifacts(origin, 4, size=20_000)
    blobs = [blob(5_000, seed=200 + i) for i in range(4)]
    specs = [
        {
            "job": "random_ops",
            "store": str(store_dir),
            "seed": i,
            "count": 200,
            "requests": arts,
            "blobs": [b.hex() for b in blobs],
            "blob_digests": [sha(b) for b in blobs],
            "dest_dir": str(tmp_path / f"dest-{i}"),
        }
        for i in range(4)
    ]
    _start_together(tmp_path, specs)
    store = Store(store_dir)
    # An `rm` racing a get can leave a row whose object is gone; SPEC §1.3 has
    # such rows treated as a miss and healed on use, which resolve() does.
    for row in store.ls():
        if not row.path.exists():
            with pytest.raises(Exception, match="no object matches"):
                store.resolve(row.sha256)
    store.close()
    assert_store_consistent(store_dir)


def test_sixteen_writers_never_see_database_locked(tmp_path, store_dir):
    specs = [
        {"job": "put_many", "store": str(store_dir), "seed": i, "count": 60} for i in range(16)
    ]
    _start_together(tmp_path, specs)
    store = Store(store_dir)
    assert store.stats().names == 16 * 60
    store.close()
    assert_store_consistent(store_dir)


def test_get_many_downloads_each_digest_once_and_reports_every_failure(store, store_dir, origin):
    a, b = blob(50_000, seed=1), blob(60_000, seed=2)
    ua, ub = origin.add("/a.bin", a), origin.add("/b.bin", b)
    missing = origin.url("/missing.bin")
    requests = [
        Request(ua, sha256=sha(a)),
        (ub, sha(b)),
        Request(ua, sha256=sha(a), dest=str(store_dir.parent / "out" / "a.bin")),
        Request(missing, sha256=sha(b"nope")),
        Request(ua, sha256=sha(a), name="a-again"),
        Request(missing, sha256=sha(b"nope")),
        (ub, sha(b)),
    ]
    with pytest.raises(BatchError) as info:
        store.get_many(requests, concurrency=4)
    results = info.value.results
    assert info.value.exit_code == DownloadError.exit_code
    assert origin.count("/a.bin") == 1 and origin.count("/b.bin") == 1
    assert origin.count("/missing.bin") == 1  # the duplicate shares the failure
    obj_a, obj_b = store.layout.object_path(sha(a)), store.layout.object_path(sha(b))
    assert results[0] == obj_a and results[1] == obj_b and results[4] == obj_a
    assert results[6] == obj_b
    assert results[2] == store_dir.parent / "out" / "a.bin"
    assert results[2].stat().st_ino == obj_a.stat().st_ino
    assert isinstance(results[3], DownloadError) and results[5] is results[3]
    assert store.info("a-again").sha256 == sha(a)
    assert store.get_many([(ua, sha(a)), (ub, sha(b))]) == [obj_a, obj_b]
    assert_store_consistent(store_dir)


@pytest.mark.parametrize("mode", ["auto", "copy", "symlink"])
def test_many_threads_materialize_one_dest(store, store_dir, tmp_path, mode):
    digest = store.put(blob(100_000, seed=7))
    dest = tmp_path / "out" / "pkg.conda"
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait(30)
        for _ in range(25):
            try:
                store.link(digest, dest, link=mode)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    obj = store.layout.object_path(digest)
    if mode == "auto":
        assert dest.stat().st_ino == obj.stat().st_ino
    elif mode == "symlink":
        assert os.readlink(dest) == str(obj)
    assert sha(dest.read_bytes()) == digest
    assert os.listdir(dest.parent) == ["pkg.conda"]  # no temp left beside it
    assert_store_consistent(store_dir)


def test_get_many_keeps_a_bad_dest_to_its_own_item(store, store_dir, tmp_path, origin):
    data = blob(10_000, seed=3)
    url = origin.add("/c.bin", data)
    taken = tmp_path / "taken.bin"
    taken.write_bytes(b"other content")
    outcomes = store.ensure_many(
        [Request(url, sha256=sha(data), dest=str(taken)), Request(url, sha256=sha(data))]
    )
    assert "exists with other content" in str(outcomes[0])
    assert outcomes[1].path == store.layout.object_path(sha(data))
    assert taken.read_bytes() == b"other content" and origin.count("/c.bin") == 1
    assert_store_consistent(store_dir)
