"""A batch shared with a helper process (spread.py): real processes, a real origin
counting requests, real SIGKILLs.  The batch's two workers are held at the
origin on the list's first two items, so whatever else is fetched meanwhile
was fetched by the helper."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from casstore import Artifact, Request, Store, spread
from casstore.errors import DownloadError
from casstore.spread import HELPER_NAME, SPREAD_MIN, SPREAD_MIN_FORKED, wanted

from .conftest import assert_store_consistent, blob, refuse_rows, sha

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc"),
]

ROOT = Path(__file__).resolve().parent.parent


def _helpers(pid: int | str = "self") -> list[int]:
    """The running helper processes among ``pid``'s children."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            try:  # named by the helper itself, forked or started
                if Path(f"/proc/{child}/comm").read_text().strip() == HELPER_NAME:
                    found.append(child)
            except OSError:
                pass
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def _until(condition, what: str, timeout: float = 60) -> None:
    """Wait for ``condition`` (polled: it is another process's doing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _items(origin, n: int, **route) -> list[tuple[str, bytes]]:
    items = []
    for i in range(n):
        data = blob(3000 + i, seed=700 + i)
        items.append((origin.add(f"/f{i}", data, **route), data))
    return items


class Held:
    """The batch's workers held at the origin on ``paths`` until the block ends."""

    def __init__(self, origin, *paths: str) -> None:
        self.routes = [origin.routes[p] for p in paths]
        for route in self.routes:
            route.gate_after = 0

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        for route in self.routes:
            route.gate.set()


class HelperOn:
    """The helper's first item, ``path``, held at the origin after its first KB
    (only the first request for it, with ``once``) until ``let_go`` or the
    block's end; ``begun()`` waits for the helper to get there, and returns its pid."""

    def __init__(self, origin, path: str, *, once: bool = False) -> None:
        self.route = origin.routes[path]
        self.route.gate_after, self.route.gate_once = 1000, once

    def __enter__(self) -> HelperOn:
        return self

    def begun(self, parent: int | str = "self") -> int:
        assert self.route.sent_event.wait(60)
        (helper,) = _helpers(parent)
        return helper

    def let_go(self) -> None:
        self.route.gate.set()

    def __exit__(self, *exc: object) -> None:
        self.let_go()


def _in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def _batch(store, items: list[tuple[str, bytes]], concurrency: int = 2):
    """``get_many`` of ``items`` with a helper, in a thread: (thread, [paths])."""
    pairs = [(u, sha(d)) for u, d in items]
    return _in_thread(lambda: store.get_many(pairs, concurrency=concurrency, processes=2))


def test_a_helper_fetches_from_the_far_end_while_the_batch_is_held(
    store_dir, origin, tmp_path, caplog
):
    from casstore import Store

    caplog.set_level(logging.DEBUG, logger="casstore")
    # The Store's headers (a token) reach the helper: without them it gets 403s.
    items = _items(origin, 12, require_headers={"Authorization": "Bearer t0ken"})
    requests = [
        Request(url, sha256=sha(data), name=f"n{i}", dest=str(tmp_path / "out" / f"f{i}"))
        for i, (url, data) in enumerate(items)
    ]
    with Store(store_dir, headers={"Authorization": "Bearer t0ken"}) as store:
        with Held(origin, "/f0", "/f1"):
            batch, out = _in_thread(lambda: store.get_many(requests, concurrency=2, processes=2))
            _until(lambda: all(origin.count(f"/f{i}") == 1 for i in range(2, 12)), "the helper")
        batch.join(60)
        (results,) = out
        assert [Path(p).read_bytes() for p in results] == [data for _, data in items]
        assert results == [tmp_path / "out" / f"f{i}" for i in range(12)]
        assert all(origin.count(f"/f{i}") == 1 for i in range(12))
        assert all(r.status == 200 for r in origin.requests())
        assert [store.resolve(f"n{i}") for i in range(12)] == [sha(d) for _, d in items]
    assert "started) may take" in caplog.text  # this process runs threads: not forked
    assert _helpers() == []  # finished and reaped
    assert_store_consistent(store_dir, indexed=True)


def test_what_the_helper_fetched_is_served_as_it_reports_it(store, store_dir, origin):
    # Served (on_done, and with it fetch's progress) as the helper reports it,
    # before the items ahead of it in the list, not when a worker gets there.
    items = _items(origin, 10)
    pairs = [(u, sha(d)) for u, d in items]
    done: list[int] = []

    def batch() -> list:
        return store.ensure_many(
            pairs, concurrency=2, processes=2, on_done=lambda i, _out: done.append(i)
        )

    with Held(origin, "/f1"):  # the batch's worker, after f0
        thread, out = _in_thread(batch)
        # Once the helper is done its slot is the batch's: a second worker serves
        # its items, in the order it reported them (from the far end).
        _until(lambda: len(done) == 9, "the helper's items served")
        assert done == [0, *range(9, 1, -1)]  # not f2 first, as the list has them
    thread.join(60)
    assert done[-1] == 1 and all(isinstance(r, Artifact) for r in out[0])
    assert all(origin.count(f"/f{i}") == 1 for i in range(10))
    assert_store_consistent(store_dir, indexed=True)


def test_a_name_two_groups_give_is_the_later_ones_with_a_helper(store, store_dir, origin):
    # "foo" is item 1's and item 9's, the second of a group whose first item the
    # helper fetches (from the far end): that group is not served before its
    # turn, so the last to record "foo" is item 9, as the batch's order says.
    d0, dh, dg = blob(3000, seed=1), blob(3001, seed=2), blob(3002, seed=3)
    store.put(dh)  # item 1 is a hit: it records its name when served
    fill = [blob(3003 + i, seed=10 + i) for i in range(6)]
    reqs = [Request(origin.add("/f0", d0), sha256=sha(d0))]
    reqs.append(Request(origin.add("/h", dh), sha256=sha(dh), name="foo"))
    reqs += [Request(origin.add(f"/x{i}", d), sha256=sha(d)) for i, d in enumerate(fill)]
    reqs.append(Request(origin.add("/g", dg), sha256=sha(dg)))
    reqs.append(Request(origin.add("/g2", dg), sha256=sha(dg), name="foo"))
    with Held(origin, "/f0"):
        thread, _ = _in_thread(lambda: store.ensure_many(reqs, concurrency=2, processes=2))
        _until(lambda: store.index.lookup_source(reqs[8].url), "the helper's rows")
    thread.join(60)
    assert origin.count("/g") == 1 and origin.count("/g2") == 0
    assert store.index.lookup_name("foo") == sha(dg)
    assert_store_consistent(store_dir, indexed=True)


def test_what_a_helper_is_not_handed(store, store_dir, origin):
    """Items with mirrors or an md5, a name another item also gives, or a URL
    that a digest-less item also asks for, stay the batch's (their sources,
    warnings and records are its own)."""
    items = _items(origin, 8)
    mirror = origin.add("/mirror", items[5][1])
    url = [u for u, _ in items]
    digest = [sha(d) for _, d in items]
    requests = [
        Request(url[0], sha256=digest[0]),
        Request(url[1], sha256=digest[1]),
        Request(url[2], sha256=digest[2]),  # the one the helper may take
        Request(url[3], sha256=digest[3]),  # the same URL unverified, below
        Request(url[4], sha256=digest[4], md5=hashlib.md5(items[4][1]).hexdigest()),
        Request(url[5], sha256=digest[5], mirrors=(mirror,)),
        Request(url[6], sha256=digest[6], name="tool"),  # a name two digests claim
        Request(url[3]),
        Request(url[7], sha256=digest[7], name="tool"),
    ]
    with Held(origin, "/f0", "/f1"):
        batch, out = _in_thread(lambda: store.get_many(requests, concurrency=2, processes=2))
        _until(lambda: origin.count("/f2") == 1, "the helper's one item")
        assert [origin.count(f"/f{i}") for i in (3, 4, 5, 6, 7)] == [0, 0, 0, 0, 0]
    batch.join(60)
    expected = [items[i][1] for i in range(7)] + [items[3][1], items[7][1]]
    assert [Path(p).read_bytes() for p in out[0]] == expected
    # (/f3 may be fetched twice, as without a helper: the unverified item may
    # look before the verified one's row is written.)
    assert all(origin.count(f"/f{i}") == 1 for i in (0, 1, 2, 4, 5, 6, 7))
    assert origin.count("/mirror") == 0
    assert_store_consistent(store_dir, indexed=True)


def test_the_batch_writes_the_rows_of_what_the_helper_fetched(store, store_dir, origin):
    """The helper never writes the index: a row the index refuses (a trigger, as
    a full disk would) fails that item in the batch's results, and only it."""
    items = _items(origin, 8)
    refuse_rows(store, sha(items[7][1]))  # the helper's first item
    with Held(origin, "/f0", "/f1"):
        pairs = [(u, sha(d)) for u, d in items]
        batch, out = _in_thread(lambda: store.ensure_many(pairs, concurrency=2, processes=2))
        _until(lambda: all(origin.count(f"/f{i}") == 1 for i in range(2, 8)), "the helper")
    batch.join(60)
    (outcomes,) = out
    assert "refused" in str(outcomes[7])
    assert [o.path.read_bytes() for o in outcomes[:7]] == [d for _, d in items[:7]]
    assert all(store.index.lookup_source(u) == sha(d) for u, d in items[:7])
    assert all(origin.count(f"/f{i}") == 1 for i in range(8))
    assert_store_consistent(store_dir)


def test_the_helper_retries_as_the_batch_would_and_says_so(store, store_dir, origin, caplog):
    items = _items(origin, 6)
    origin.routes["/f5"].fail_first = [503, 503]  # the helper's first item
    with Held(origin, "/f0", "/f1"):
        batch, out = _batch(store, items)
        _until(lambda: all(origin.count(f"/f{i}") == 1 for i in (2, 3, 4)), "the helper")
        # All three tries were the helper's, while the batch's workers were held.
        assert [r.status for r in origin.requests("/f5")] == [503, 503, 200]
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "/f5" in m and "retry" in m] == [
        m for m in said if "/f5: HTTP 503 Service Unavailable; retry" in m
    ]
    assert sum("/f5: HTTP 503 Service Unavailable; retry" in m for m in said) == 2
    assert_store_consistent(store_dir, indexed=True)


def test_the_error_the_helper_ends_with_is_the_items_answer(store, store_dir, origin, caplog):
    items = _items(origin, 6)
    origin.routes["/f5"].fail_first = [503] * 10  # the helper's first item: retries spent
    origin.routes["/f4"].status = 404
    with Store(store_dir, retries=1, backoff_max=0.01) as s:
        with Held(origin, "/f0", "/f1"):
            batch, out = _in_thread(
                lambda: s.ensure_many([(u, sha(d)) for u, d in items], concurrency=2, processes=2)
            )
            _until(lambda: origin.count("/f2") == 1, "the helper")
        batch.join(60)
    (outcomes,) = out
    assert isinstance(outcomes[4], DownloadError) and outcomes[4].status == 404
    assert isinstance(outcomes[5], DownloadError) and outcomes[5].status == 503
    assert "after 2 attempt(s)" in str(outcomes[5]) and outcomes[5].exit_code == 4
    assert origin.count("/f4") == 1 and origin.count("/f5") == 2  # not asked again
    assert [o.path.read_bytes() for o in outcomes[:4]] == [d for _, d in items[:4]]
    assert_store_consistent(store_dir, indexed=True)


def test_a_helper_killed_midway_costs_the_batch_nothing_but_its_item(store, store_dir, origin):
    items = _items(origin, 8)
    with HelperOn(origin, "/f7") as first, Held(origin, "/f0", "/f1"):
        batch, out = _batch(store, items)
        helper = first.begun()
        os.kill(helper, signal.SIGKILL)
        _until(lambda: _gone(helper), "the helper to die")
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert origin.count("/f7") == 2  # the helper's, cut off, and the batch's own
    assert all(origin.count(f"/f{i}") == 1 for i in range(7))
    assert_store_consistent(store_dir, allow_temps=True)  # the killed helper's, gc's to sweep


def test_a_helper_stops_when_its_batch_is_killed(store_dir, origin):
    items = _items(origin, 40)
    code = (
        "import json, sys\n"
        "from casstore import Store\n"
        "items = json.loads(sys.argv[2])\n"
        "Store(sys.argv[1]).get_many([tuple(i) for i in items], concurrency=2, processes=2)\n"
    )
    listing = json.dumps([(u, sha(d)) for u, d in items])
    with Held(origin, "/f0", "/f1", "/f39"):
        batch = subprocess.Popen([sys.executable, "-c", code, str(store_dir), listing], cwd=ROOT)
        try:
            assert origin.routes["/f39"].sent_event.wait(60)
            (helper,) = _helpers(batch.pid)
            batch.kill()
            batch.wait(30)
            # Its input ended with the batch: it stops there and then, in the
            # middle of /f39 (still held); /f38, handed to it too, never begun.
            # (Sooner than the 30 s in which its read of /f39 would time out.)
            _until(lambda: _gone(helper), "the helper to exit", timeout=20)
        finally:
            if batch.poll() is None:
                batch.kill()
                batch.wait()
    assert origin.count("/f39") == 1 and origin.count("/f38") == 0
    assert_store_consistent(store_dir, allow_temps=True)  # the killed batch's, gc's to sweep


def test_what_the_helper_fetched_is_indexed_when_its_batch_is_stopped(store_dir, origin, tmp_path):
    """Ctrl-C to a ``fetch`` whose one worker is held on its first item, once the
    helper has fetched all the rest: each of those has its row (written as the
    helper reports it, not when a worker comes to the item)."""
    items = _items(origin, 300)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{u}#{sha(d)}\n" for u, d in items))
    env = {**os.environ, "CASSTORE_DIR": str(store_dir), "CASSTORE_PROCESSES": "2"}
    with Held(origin, "/f0"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "casstore", "fetch", str(listing), "-j", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # see test_lists
        )
        try:
            _until(lambda: all(origin.count(f"/f{i}") == 1 for i in range(1, 300)), "the helper")
            proc.send_signal(signal.SIGINT)
            assert b"stopping" in proc.stderr.readline()
        except BaseException:
            proc.kill()
            raise
    proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert origin.count("/f0") == 1
    assert_store_consistent(store_dir, indexed=True)


@pytest.mark.parametrize("sigchld", ["default", "ignored"])
def test_a_forked_helper_leaves_its_batchs_process_as_it_found_it(sigchld, store_dir, origin):
    """gc enabled, with what the program froze still frozen; and no fork where
    SIGCHLD is ignored (the child would be reaped behind the batch's back)."""
    items = _items(origin, 20)
    code = (
        "import gc, json, logging, signal, sys\n"
        "from casstore import Store\n"
        "if sys.argv[3] == 'ignored':\n"
        "    signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(message)s')\n"
        "kept = [[i] for i in range(1000)]\n"
        "gc.freeze()  # (the count falls as frozen objects are freed: kept are not)\n"
        "items = [tuple(i) for i in json.loads(sys.argv[2])]\n"
        "paths = Store(sys.argv[1]).get_many(items, concurrency=2, processes=2)\n"
        "assert gc.isenabled() and gc.get_freeze_count() >= 1000, gc.get_freeze_count()\n"
        "print(len(paths))\n"
    )
    listing = json.dumps([(u, sha(d)) for u, d in items])
    run = subprocess.run(
        [sys.executable, "-c", code, str(store_dir), listing, sigchld],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert (run.returncode, run.stdout) == (0, b"20\n"), run.stderr.decode()
    started = "forked" if sigchld == "default" else "started"
    assert f", {started}) may take 20 items" in run.stderr.decode()
    assert all(origin.count(f"/f{i}") == 1 for i in range(20))
    assert_store_consistent(store_dir, indexed=True)


@pytest.mark.parametrize(("then", "n"), [("asked", 3), ("stopped", 3), ("asked", 18)])
def test_the_helper_holds_back_quick_reports_and_never_opens_the_index(then, n, store_dir, origin):
    """The helper alone, on its pipe: the reports of quick items wait while it
    fetches the next (one write for many, REPORTS at most); they go at once
    when the batch asks for one of them, or stops the helper (which it may
    kill any moment then).  The index is the batch's: the helper never opens it."""
    import pickle
    import re
    import select

    from casstore.spread import _BOOT, REPORTS

    items = _items(origin, n)
    origin.routes["/f0"].gate_after = 0  # its last item, held at the origin
    job = {
        "path": [str(ROOT), *sys.path],
        "root": str(store_dir),
        "options": {},
        "items": [(u, sha(d), None, None) for u, d in items],
        "report_age": 600,  # every item quick, however busy the machine
    }
    helper = subprocess.Popen(
        [sys.executable, "-I", "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )

    def tell(line: bytes) -> None:
        helper.stdin.write(line)
        helper.stdin.flush()

    def reported(i: int) -> None:  # "d I US 1 SIZE BLAKE3 URL": in the store
        line = helper.stdout.readline()
        assert re.fullmatch(rb"d %d \d+ 1 %d [0-9a-f]{64} [0-9a-f]+\n" % (i, 3000 + i), line)

    quick = list(range(n - 1, 0, -1))  # fetched in this order, then /f0
    sent, held = quick[: len(quick) // REPORTS * REPORTS], quick[len(quick) // REPORTS * REPORTS :]
    with helper:
        try:
            tell(pickle.dumps(job))
            assert helper.stdout.readline() == b"ready\n"
            tell(b"h 0 %d\n" % n)
            assert origin.routes["/f0"].sent_event.wait(60)
            for i in sent:  # REPORTS held: sent together
                reported(i)
            # The rest are in the store, their reports held back (lines written
            # at once would be in the pipe by now).
            assert select.select([helper.stdout], [], [], 0)[0] == []
            assert all((store_dir / "sha256" / sha(items[i][1])[:2]).is_dir() for i in held)
            tell(b"x 1\n" if then == "asked" else b"q\n")
            for i in held:
                reported(i)
            if then == "asked":
                assert helper.stdout.readline() == b"n 1\n"
            origin.routes["/f0"].gate.set()
            reported(0)  # held back too, sent once it has nothing in hand
            if then == "asked":
                tell(b"q\n")
            assert helper.wait(60) == 0
        finally:
            origin.routes["/f0"].gate.set()
            helper.kill()
    assert [origin.count(f"/f{i}") for i in range(n)] == [1] * n
    assert not (store_dir / "index.db").exists()
    assert_store_consistent(store_dir)


def test_no_helper_when_the_stores_slots_are_taken_or_nothing_is_missing(
    store, store_dir, origin, caplog
):
    import fcntl

    caplog.set_level(logging.DEBUG, logger="casstore")
    items = _items(origin, 4)
    pairs = [(u, sha(d)) for u, d in items]
    store.get_many(pairs[:2], processes=1)
    store.get_many(pairs[:2], concurrency=2, processes=2)  # all hits: nothing to hand out
    assert "a helper process" not in caplog.text
    store.layout.ensure()
    slots = []
    for k in range(max(1, len(os.sched_getaffinity(0)) - 1)):  # another batch's helpers
        fd = os.open(store.layout.lock_path(f"spread-{k}"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        slots.append(fd)
    try:
        assert store.get_many(pairs, concurrency=2, processes=2)
    finally:
        for fd in slots:
            os.close(fd)
    assert "a helper process" not in caplog.text
    assert all(origin.count(f"/f{i}") == 1 for i in range(4))
    assert_store_consistent(store_dir, indexed=True)


@pytest.mark.parametrize("forked", [False, True])
def test_when_a_batch_wants_a_helper(forked, monkeypatch):
    """From SPREAD_MIN items where the helper would be started afresh, from
    SPREAD_MIN_FORKED where it can be forked (a process running one thread)."""
    monkeypatch.setattr(spread, "_may_fork", lambda: forked)
    least = SPREAD_MIN_FORKED if forked else SPREAD_MIN
    cores = len(os.sched_getaffinity(0))
    assert wanted(least, None) == (cores > 1)
    assert not wanted(least - 1, None)
    assert not wanted(10_000, 1) and wanted(1, 2) and not wanted(0, 2)
    monkeypatch.setenv("CASSTORE_PROCESSES", "1")
    assert not wanted(10_000, None)
    monkeypatch.setenv("CASSTORE_PROCESSES", "2")
    assert wanted(1, None)
    monkeypatch.setattr(sys, "frozen", True, raising=False)  # no interpreter to start
    assert not wanted(10_000, 2)


def test_a_helper_is_one_of_the_batchs_concurrency(store, store_dir, origin, caplog):
    caplog.set_level(logging.DEBUG, logger="casstore")
    items = _items(origin, 12, chunk=1000, drip=0.01)  # each request takes ~30 ms
    now_and_most = [0, 0]
    lock = threading.Lock()
    serve = origin._serve

    def counting(h, *, head: bool) -> None:
        with lock:
            now_and_most[0] += 1
            now_and_most[1] = max(now_and_most[1], now_and_most[0])
        try:
            serve(h, head=head)
        finally:
            with lock:
                now_and_most[0] -= 1

    origin._serve = counting
    with Held(origin, "/f0", "/f1"):
        batch, out = _batch(store, items, concurrency=3)
        # Two workers are held; the third has begun /f2 and waits for a slot,
        # which the helper has.
        _until(lambda: all(origin.count(f"/f{i}") == 1 for i in range(3, 12)), "the helper")
        assert now_and_most[1] == 3
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert now_and_most[1] <= 3 and "a helper process" in caplog.text
    assert_store_consistent(store_dir, indexed=True)


def test_an_item_the_helper_has_not_begun_is_taken_back(store, store_dir, origin):
    items = _items(origin, 8)
    with HelperOn(origin, "/f7") as first:  # the second item, /f6, waits behind it
        with Held(origin, "/f0", "/f1"):
            batch, out = _batch(store, items)
            first.begun()
        # The batch comes to /f6 while the helper is held on /f7: it takes /f6 back.
        _until(lambda: origin.count("/f6") == 1, "the batch to fetch /f6")
        assert origin.count("/f7") == 1
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert all(origin.count(f"/f{i}") == 1 for i in range(8))
    assert_store_consistent(store_dir, indexed=True)


def test_a_forked_child_does_not_keep_a_helper_alive(store_dir, origin, tmp_path):
    """A child forked from a batch (a multiprocessing worker) keeps no copy of the
    helper's input: the helper still stops when its batch dies."""
    items = _items(origin, 40)
    first = HelperOn(origin, "/f39")
    code = (
        "import json, os, sys\n"
        "from casstore import Store\n"
        "items = json.loads(sys.argv[2])\n"
        "forked = []\n"
        "def on_done(i, outcome):\n"
        "    if not forked:\n"
        "        forked.append(os.fork())\n"
        "        if forked[0] == 0:\n"
        "            open(sys.argv[3], 'w').write(str(os.getpid()))\n"
        "            os.read(os.open(sys.argv[3] + '.fifo', os.O_RDONLY), 1)\n"
        "            os._exit(0)\n"
        "Store(sys.argv[1]).ensure_many(\n"
        "    [tuple(i) for i in items], concurrency=2, processes=2, on_done=on_done\n"
        ")\n"
    )
    pid_file = tmp_path / "child.pid"
    os.mkfifo(f"{pid_file}.fifo")
    listing = json.dumps([(u, sha(d)) for u, d in items])
    child = None
    with Held(origin, "/f1"):  # /f0 is done: on_done forks
        batch = subprocess.Popen(
            [sys.executable, "-c", code, str(store_dir), listing, str(pid_file)], cwd=ROOT
        )
        try:
            helper = first.begun(batch.pid)
            _until(lambda: pid_file.exists() and pid_file.read_text(), "the forked child")
            child = int(pid_file.read_text())
            batch.kill()
            batch.wait(30)
        finally:
            first.let_go()
            if batch.poll() is None:
                batch.kill()
                batch.wait()
        try:
            _until(lambda: _gone(helper), "the helper to exit")
            assert not _gone(child)  # the child still holds whatever it inherited
        finally:
            fifo = os.open(f"{pid_file}.fifo", os.O_WRONLY | os.O_NONBLOCK)
            os.write(fifo, b"x")
            os.close(fifo)
    assert_store_consistent(store_dir, allow_temps=True)


def test_a_batch_gets_its_worker_back_when_the_helper_is_gone(store, store_dir, origin):
    items = _items(origin, 12)
    with HelperOn(origin, "/f11", once=True) as first, Held(origin, "/f0"):
        batch, out = _batch(store, items)
        os.kill(first.begun(), signal.SIGKILL)
        # One worker is held on /f0; the other, idle while the helper lived, does the rest.
        _until(lambda: all(origin.count(f"/f{i}") == 1 for i in range(1, 11)), "the batch")
        _until(lambda: origin.count("/f11") == 2, "the batch to fetch /f11 again")
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert_store_consistent(store_dir, allow_temps=True)  # the killed helper's, gc's to sweep


def test_a_stopped_helper_holds_up_only_the_item_it_has_begun(store, store_dir, origin):
    items = _items(origin, 12)
    helper = None
    with HelperOn(origin, "/f11") as first:  # /f10 was handed with it
        try:
            with Held(origin, "/f0"):
                batch, out = _batch(store, items)
                helper = first.begun()
                os.kill(helper, signal.SIGSTOP)
            # The batch asks for /f10 back, hears nothing, and fetches it itself.
            _until(lambda: origin.count("/f10") == 1, "the batch to fetch /f10")
            assert origin.count("/f11") == 1
        finally:
            if helper is not None:
                os.kill(helper, signal.SIGCONT)
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert all(origin.count(f"/f{i}") == 1 for i in range(12))
    assert_store_consistent(store_dir, indexed=True)


def test_an_item_the_helper_outlasts_the_wait_for_is_not_fetched_twice(
    store, store_dir, origin, monkeypatch, caplog
):
    """A worker waits for the helper's item as on a lock, at most the lock's
    timeout; then it is put off, and the put-off items (waited for on the lock)
    come before the helper is stopped, so the helper's fetch is not lost."""
    monkeypatch.setenv("CASSTORE_LOCK_TIMEOUT", "3")
    items = _items(origin, 8)

    def waits() -> int:
        return sum("waiting for another process" in r.getMessage() for r in caplog.records)

    with HelperOn(origin, "/f7") as first:
        with Held(origin, "/f0", "/f1"):
            batch, out = _batch(store, items)
            first.begun()
        _until(lambda: waits() >= 1, "the put-off item's wait on the helper's lock")
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert all(origin.count(f"/f{i}") == 1 for i in range(8))
    assert_store_consistent(store_dir, indexed=True)


def test_the_helpers_wait_on_another_processs_lock_is_said(store, store_dir, origin, caplog):
    from .conftest import HeldLock

    items = _items(origin, 6)
    with Held(origin, "/f0", "/f1"), HeldLock(store.layout, sha(items[5][1])) as other:
        batch, out = _batch(store, items)
        # The helper's first item is another process's: it waits, and the batch says so.
        _until(lambda: "waiting for another process to fetch" in caplog.text, "the message")
        assert "/f5" in caplog.text and origin.count("/f5") == 0
        other.let_go()
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert all(origin.count(f"/f{i}") == 1 for i in range(6))
    assert_store_consistent(store_dir, indexed=True)


def test_an_item_another_process_published_meanwhile_is_the_batchs_hit(
    store, store_dir, origin, caplog
):
    """The helper waits on another process's lock, which publishes the object
    and lets go: the helper fetches nothing and the batch serves the item as a
    hit, recording this request's name and URL for it."""
    from casstore.ingest import Ingest

    from .conftest import HeldLock

    items = _items(origin, 6)
    requests = [Request(u, sha256=sha(d), name=f"n{i}") for i, (u, d) in enumerate(items)]
    with Held(origin, "/f0", "/f1"), HeldLock(store.layout, sha(items[5][1])) as other:
        batch, out = _in_thread(lambda: store.get_many(requests, concurrency=2, processes=2))
        _until(lambda: "waiting for another process to fetch" in caplog.text, "the helper")
        with Ingest(store.layout) as ingest:  # the other process's download
            ingest.write(items[5][1])
            ingest.commit(sha256=sha(items[5][1]))
        other.let_go()
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert origin.count("/f5") == 0
    assert store.resolve("n5") == store.index.lookup_source(items[5][0]) == sha(items[5][1])
    assert_store_consistent(store_dir)


def test_ctrl_c_is_the_batchs_to_handle_not_the_helpers(store, store_dir, origin):
    items = _items(origin, 8)
    with HelperOn(origin, "/f7") as first, Held(origin, "/f0", "/f1"):
        batch, out = _batch(store, items)
        helper = first.begun()
        os.kill(helper, signal.SIGINT)  # as a terminal's Ctrl-C reaches the process group
        first.let_go()
        _until(lambda: origin.count("/f6") == 1, "the helper to go on")
        assert not _gone(helper)
    batch.join(60)
    assert [Path(p).read_bytes() for p in out[0]] == [d for _, d in items]
    assert all(origin.count(f"/f{i}") == 1 for i in range(8))
    assert_store_consistent(store_dir, indexed=True)


def test_fetch_says_and_does_the_same_with_a_helper_as_without(origin, tmp_path):
    """`casstore fetch --json` of a list with names, dests, a duplicate, a 404 and
    wrong bytes: the same report, exit code, messages, files and names either way."""
    items = _items(origin, 300)
    origin.add("/gone", status=404)
    # The helper's second item is redirected: the final URL is recorded too.
    moved = origin.add("/moved", redirect_to=items[298][0])
    lines = [f"{u} {sha(d)} n{i}" for i, (u, d) in enumerate(items)]
    lines[298] = f"{moved} {sha(items[298][1])} n298"
    lines += [f"{items[3][0]}#{sha(items[3][1])}", f"{origin.url('/gone')}#{'0' * 64}"]
    lines.append(f"{origin.add('/wrong', b'other bytes')}#{sha(b'the bytes promised')}")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")

    def fetch(processes: str) -> tuple[int, dict, str, dict[str, bytes], dict]:
        store, dest = tmp_path / f"store{processes}", tmp_path / f"dest{processes}"
        env = {**os.environ, "CASSTORE_DIR": str(store), "CASSTORE_PROCESSES": processes}
        env["CASSTORE_BACKOFF_MAX"] = "0.01"
        command = ["fetch", str(listing), "-j", "4", "--dest", str(dest)]
        out, err = tmp_path / f"out{processes}", tmp_path / f"err{processes}"
        # With a helper, the batch's first item is held until the helper has
        # fetched the far end (the 404, the wrong bytes and /f299): it takes part.
        with Held(origin, "/f0") if processes == "2" else contextlib.nullcontext():
            with open(out, "wb") as o, open(err, "wb") as e:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "casstore", "--json", *command],
                    stdout=o,
                    stderr=e,
                    env=env,
                )
            if processes == "2":
                _until(lambda: origin.count("/f299") == 2, "the helper")
                # One thread when it began: its helper is forked, not started afresh.
                (helper,) = _helpers(proc.pid)
                cmdline = Path(f"/proc/{helper}/cmdline").read_bytes()
                assert cmdline == Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        proc.wait(60)
        doc = json.loads(out.read_bytes())
        for item in doc["items"]:  # the store's own paths differ by store
            for key in ("path", "dest"):
                if item[key]:
                    item[key] = os.path.relpath(item[key], store if key == "path" else dest)
        files = {p.name: p.read_bytes() for p in dest.iterdir()}
        assert_store_consistent(store, indexed=True)
        db = sqlite3.connect(store / "index.db")
        try:  # what the index says, not where or when
            index = {
                "objects": db.execute("SELECT sha256, size, blake3, md5 FROM objects").fetchall(),
                "names": db.execute("SELECT name, sha256 FROM names").fetchall(),
                "sources": db.execute("SELECT url, sha256 FROM sources").fetchall(),
                "links": [
                    (os.path.relpath(path, dest), sha)
                    for path, sha in db.execute("SELECT path, sha256 FROM links")
                ],
            }
        finally:
            db.close()
        return (
            proc.returncode,
            doc,
            err.read_text(),
            files,
            {k: sorted(v) for k, v in index.items()},
        )

    alone, helped = fetch("1"), fetch("2")
    assert helped[0] == alone[0] == 4
    assert helped[1] == alone[1]
    assert helped[2].splitlines() == alone[2].splitlines()  # the same messages
    assert helped[3] == alone[3] and helped[4] == alone[4]
    assert len(alone[4]["names"]) == 300 and alone[4]["links"]
    assert (items[298][0], sha(items[298][1])) in alone[4]["sources"]
    assert origin.count("/gone") == origin.count("/wrong") == 2  # once each way
