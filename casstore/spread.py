"""A large batch shared with a helper process, for the second core.

Python runs one thread at a time.  A batch of many small files from a fast
origin keeps one core busy with Python (~0.6 ms of CPU per 4 KiB file here)
while the second mostly waits; two processes already started, each fetching
half of a list into one store, reached ~1.4x one process's files/s
(``bench/bench_concurrency.py --only small`` and the README).

So ``Store.ensure_many`` may start one helper (``python -m casstore.spread``)
and hand it the batch's items that have a digest, last first; it fetches
one at a time (a thread of Python is what it adds), and the batch runs one
worker fewer, so that the ceiling (``concurrency``) still holds.  The helper
fetches them into the same store from that end of the list while this
process goes through the whole list in order, as it would alone: an item
the helper has published is a hit here (a stat and a row), one it is
fetching right now is put off and found done.  The helper only ever saves
work.  If it cannot start, is slow, fails or is killed, this process does
that work itself, and the results, names, destinations, messages and exit
codes are this process's alone: the helper gets neither names nor
destinations, nothing trusted on first use (its warning belongs here), and
no retries (a failing source costs it one try; this process then tries with
its own).  Its messages go nowhere.  Closing its stdin tells it to stop
after the items it has in hand; a helper whose batch process died stops the
same way, since the pipe closes.

The single-flight locks are what make this safe, as between any two
processes sharing a store: one download per digest, whoever comes first.
A store has at most one helper per spare core at a time (``_free_slot``).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .layout import Layout
from .models import Request

# Below this many items with a digest a helper's start-up (~0.1-0.2 s of CPU,
# on the core this process would use otherwise) costs more than it saves.
SPREAD_MIN = 256
# Items per ensure_many call in the helper: between calls it looks whether to stop.
CHUNK = 32
# How long the batch waits for its helper to finish the items it has in hand.
FINISH_TIMEOUT = 30.0


def wanted(items: int, processes: int | None) -> bool:
    """Whether a batch of ``items`` with a digest gets a helper: ``processes``
    None is automatic (``CASSTORE_PROCESSES`` else more than one CPU and at
    least ``SPREAD_MIN`` items), 1 never, 2 or more whenever there is an item."""
    if processes is None:
        env = os.environ.get("CASSTORE_PROCESSES", "").strip()
        if env:
            processes = int(env) if env.isdigit() else 1
        else:
            return items >= SPREAD_MIN and (os.cpu_count() or 1) > 1
    return processes > 1 and items > 0


class Helper:
    """One helper process fetching ``requests`` (in that order) into the store at
    ``layout``'s root; it holds the helper slot ``slot`` (a locked fd) until it exits."""

    def __init__(
        self, layout: Layout, options: dict[str, Any], requests: Sequence[Request], slot: int
    ) -> None:
        job = {
            "root": str(layout.root),
            # Retries are the batch's to make; headers may hold secrets: the pipe, not argv.
            "options": {**options, "retries": 0},
            "requests": [replace(r, name=None, dest=None) for r in requests],
        }
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": package_parent + (os.pathsep + path if path else "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "casstore.spread"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            pass_fds=(slot,),  # the slot's flock lives as long as the helper
        )
        try:
            assert self.proc.stdin is not None
            pickle.dump(job, self.proc.stdin)
            self.proc.stdin.flush()
        except BaseException:
            self.finish()
            raise

    def finish(self) -> None:
        """Tell the helper to stop and wait for it (it holds no item the batch
        still needs: those were put off here and waited for)."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(FINISH_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its temp, if any, is gc's to sweep
            self.proc.wait()


def start(layout: Layout, options: dict[str, Any], requests: Sequence[Request]) -> Helper | None:
    """A helper for ``requests``, or None if no slot is free or it cannot be
    started (the batch goes alone)."""
    slot = _free_slot(layout)
    if slot is None:
        return None
    try:
        return Helper(layout, options, requests, slot)
    except (OSError, ValueError, TypeError, AttributeError, pickle.PicklingError):
        return None
    finally:
        os.close(slot)  # the helper's copy holds the lock now, or nobody's does


def _free_slot(layout: Layout) -> int | None:
    """An fd holding one of the store's ``cpu_count - 1`` helper slots, or None.

    Helpers only pay with a core to spare: several batches at once (parallel
    installers sharing a store) would each start one and leave the cores
    oversubscribed, so a store has at most one helper per spare core at a
    time.  A slot is a lock file that nobody waits for: taken or skipped.
    """
    import fcntl

    layout.ensure()
    for k in range(max(1, (os.cpu_count() or 1) - 1)):
        path = layout.lock_path(f"spread-{k}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):  # gc unlinks unheld locks
                return fd
        except OSError:
            pass
        os.close(fd)
    return None


def main() -> None:
    """The helper: read the job from stdin, fetch in chunks until done or stdin closes."""
    from .store import Store

    job = pickle.load(sys.stdin.buffer)
    stop = threading.Event()

    def watch() -> None:
        sys.stdin.buffer.read()  # returns when the batch closes the pipe, or dies
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    requests = job["requests"]
    with Store(job["root"], **job["options"]) as store:
        for i in range(0, len(requests), CHUNK):
            if stop.is_set():
                break
            store.ensure_many(requests[i : i + CHUNK], concurrency=1, processes=1)


if __name__ == "__main__":
    main()
