"""A batch shared with a helper process (spread.py): real processes, a real origin
counting requests, real SIGKILLs; interleavings forced with the origin's gates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from casstore import Request

from .conftest import assert_store_consistent, blob, sha

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int | str = "self") -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _helpers(pid: int | str = "self") -> list[int]:
    found = []
    for child in _children(pid):
        try:
            if b"casstore.spread" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found


def _until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _items(origin, n: int) -> list[tuple[str, bytes]]:
    return [
        (origin.add(f"/f{i}", blob(3000 + i, seed=700 + i)), blob(3000 + i, seed=700 + i))
        for i in range(n)
    ]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_helper_fetches_from_the_other_end_of_the_list(store, store_dir, origin, tmp_path):
    items = _items(origin, 12)
    # The batch's one worker stalls on the first item: only a helper can fetch the rest.
    origin.routes["/f0"].gate_after = 0
    requests = [
        Request(url, sha256=sha(data), name=f"n{i}", dest=str(tmp_path / "out" / f"f{i}"))
        for i, (url, data) in enumerate(items)
    ]
    results: list = []
    batch = threading.Thread(
        target=lambda: results.extend(store.get_many(requests, concurrency=2, processes=2))
    )
    batch.start()
    try:
        _until(lambda: all(origin.count(f"/f{i}") == 1 for i in range(1, 12)), "the helper")
    finally:
        origin.routes["/f0"].gate.set()
        batch.join(60)
    assert [Path(p).read_bytes() for p in results] == [data for _, data in items]
    assert all(origin.count(f"/f{i}") == 1 for i in range(12))
    assert [store.resolve(f"n{i}") for i in range(12)] == [sha(d) for _, d in items]
    assert _helpers() == []  # finished and reaped
    assert_store_consistent(store_dir)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_helper_killed_midway_costs_the_batch_nothing_but_its_item(store, store_dir, origin):
    items = _items(origin, 8)
    origin.routes["/f0"].gate_after = 0  # the batch's worker waits here
    last = origin.routes["/f7"]  # the helper's first item
    last.gate_after = 1000
    results: list = []
    batch = threading.Thread(
        target=lambda: results.extend(
            store.get_many([(u, sha(d)) for u, d in items], concurrency=2, processes=2)
        )
    )
    batch.start()
    try:
        assert last.sent_event.wait(60)
        (helper,) = _helpers()
        os.kill(helper, signal.SIGKILL)
    finally:
        last.gate.set()
        origin.routes["/f0"].gate.set()
        batch.join(60)
    assert [Path(p).read_bytes() for p in results] == [data for _, data in items]
    assert origin.count("/f7") == 2  # the helper's, cut off, and the batch's own
    assert all(origin.count(f"/f{i}") == 1 for i in range(7))
    assert_store_consistent(store_dir, allow_temps=True)  # the killed helper's, gc's to sweep


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_helper_stops_when_its_batch_is_killed(tmp_path, store_dir, origin):
    items = _items(origin, 200)
    origin.routes["/f0"].gate_after = 0
    code = (
        "import json, sys\n"
        "from casstore import Store\n"
        "items = json.loads(sys.argv[2])\n"
        "Store(sys.argv[1]).get_many([tuple(i) for i in items], concurrency=2, processes=2)\n"
    )
    import json

    listing = json.dumps([(u, sha(d)) for u, d in items])
    batch = subprocess.Popen([sys.executable, "-c", code, str(store_dir), listing], cwd=ROOT)
    try:
        _until(lambda: origin.count("/f199") == 1, "the helper's first item")
        (helper,) = _helpers(batch.pid)
        batch.kill()
        batch.wait(30)
        origin.routes["/f0"].gate.set()
        # The pipe closed with the batch: the helper ends its chunk and stops.
        _until(
            lambda: not Path(f"/proc/{helper}").exists() or _zombie(helper), "the helper to exit"
        )
        assert sum(origin.count(f"/f{i}") for i in range(200)) < 200
    finally:
        origin.routes["/f0"].gate.set()
        if batch.poll() is None:
            batch.kill()
            batch.wait()
    assert_store_consistent(store_dir, allow_temps=True)  # the killed batch's, gc's to sweep


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_no_helper_when_the_stores_slots_are_taken(store, store_dir, origin):
    """One helper per spare core per store: parallel batches do not oversubscribe."""
    import fcntl

    store.layout.ensure()
    slots = []
    for k in range(max(1, (os.cpu_count() or 1) - 1)):  # another batch's helpers
        fd = os.open(store.layout.lock_path(f"spread-{k}"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        slots.append(fd)
    items = _items(origin, 4)
    origin.routes["/f0"].gate_after = 0
    results: list = []
    batch = threading.Thread(
        target=lambda: results.extend(
            store.get_many([(u, sha(d)) for u, d in items], concurrency=2, processes=2)
        )
    )
    batch.start()
    try:
        assert origin.routes["/f0"].sent_event.wait(60)
        assert _helpers() == []
    finally:
        origin.routes["/f0"].gate.set()
        batch.join(60)
        for fd in slots:
            os.close(fd)
    assert [Path(p).read_bytes() for p in results] == [d for _, d in items]
    assert_store_consistent(store_dir)
