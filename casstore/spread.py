"""A large batch shared with a helper process, for the second core.

Python runs one thread at a time.  A batch of small files from a fast origin
keeps one core busy with Python (~0.55 ms of CPU per 4 KiB file here) while
the other mostly waits; two processes fetching halves of one list into one
store reach ~1.9x the files/s of one (the README).

So ``Store.ensure_many`` may start one helper (``python -I``, the batch's
``sys.path``) and hand it items from the far end of the batch, a few at a
time as it finishes them, while the batch's workers go from the front; they
meet where they meet.  The helper only saves work.  It fetches an item into
the store with ``Store.ensure``, which indexes it, and says so; the batch then
serves that item itself, as a hit, so names, destinations, results, progress
and exit codes are the batch's alone.  What the helper does not report,
because it failed, was killed or never started, the batch does itself.

What it is handed, so that nothing the batch says or records changes: the
first item of a digest's group that is missing from the store, has a sha256
and no md5 or mirrors, and a plain URL the direct lane takes that no
digest-less item of the batch asks for (a trust-on-first-use warning is the
batch's to give).  It gets no destinations and no retries (a failure costs
one try, then the batch tries with its own), and its messages go nowhere.

It is handed about ``WINDOW_SECONDS`` of its own work at a time (measured as
it goes, two items at first), so the batch's last workers wait little for it
whether the files are small or large.  It runs one download at a time and
counts as one of the batch's ``concurrency`` once it is ready.  A store has
at most one helper per spare core at a time (``_free_slot``).  It stops when
its input ends: when the batch has nothing more for it, or died.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .layout import Layout
from .models import Request

# Below this many items to hand out, a helper's start-up (~0.1 s of CPU, on
# the core the batch would use otherwise) costs more than it saves.
SPREAD_MIN = 256
WINDOW_SECONDS = 0.02
WINDOW_MAX = 32
# How long a worker waits for an item handed to a helper that is still alive
# before fetching it itself (the item's lock then decides who does).
PATIENCE = 120.0
_BOOT = (
    "import pickle, sys\n"
    "job = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:] = job['path']\n"
    "from casstore.spread import serve\n"
    "serve(job)\n"
)


def wanted(items: int, processes: int | None) -> bool:
    """Whether a batch with ``items`` to hand out gets a helper.  ``processes``
    None is automatic (``CASSTORE_PROCESSES``, else a spare core and at least
    ``SPREAD_MIN`` items); 1 never; 2 or more whenever there is an item."""
    if items == 0 or getattr(sys, "frozen", False):  # a frozen app cannot run -c
        return False
    if processes is None:
        env = os.environ.get("CASSTORE_PROCESSES", "").strip()
        if not env:
            return items >= SPREAD_MIN and _cores() > 1
        processes = int(env) if env.isdigit() else 1
    return processes > 1


class Share:
    """The items of a batch a helper may take: ``items`` (a group id and its
    first request, in batch order).  Workers call ``take(group)`` before
    serving a group; ``close()`` once the batch is done.

    The helper gets the items in its job; after that a hand-out is a line
    ``lo hi`` (positions in ``items``) and a report a line ``lo hi`` followed
    by the positions it could not fetch."""

    def __init__(
        self,
        layout: Layout,
        options: dict[str, Any],
        items: Sequence[tuple[int, Request]],
        *,
        on_ready: Callable[[], None] = lambda: None,
        on_gone: Callable[[], None] = lambda: None,
    ) -> None:
        self._groups = [g for g, _ in items]
        self._position = {g: i for i, g in enumerate(self._groups)}
        self._free = len(items)  # positions below this are not handed out yet
        self._taken: set[int] = set()  # positions the batch has begun: its own
        self._handed: dict[int, threading.Event] = {}  # by position; set once reported
        self._ranges = 0  # handed out, not yet reported
        self._fetched: set[int] = set()
        self._lock = threading.Lock()
        self._on_ready, self._on_gone = on_ready, on_gone
        self._per_item: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        slot = _free_slot(layout)
        if slot is None:
            return
        try:
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            self._job = {
                "path": [package_parent, *sys.path],
                "root": str(layout.root),
                "options": options,  # headers may hold secrets: the pipe, not argv
                "items": [(r.url, r.sha256, r.size, r.name) for _, r in items],
            }
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                pass_fds=(slot,),  # the slot's flock lives as long as the helper
            )
        except (OSError, ValueError):
            self.proc = None
            return
        finally:
            os.close(slot)  # the helper's copy holds the lock now, or nobody's does
        self._thread = threading.Thread(target=self._talk, name="casstore-spread", daemon=True)
        self._thread.start()

    def take(self, group: int) -> bool:
        """Return once the batch may serve ``group``: at once if the helper
        does not have it (and from now on never will), else when the helper
        has reported it, is gone, or ``PATIENCE`` ran out.  True if the
        helper put the group's object in the store and indexed it."""
        at = self._position.get(group)
        if at is None:
            return False
        with self._lock:
            event = self._handed.get(at)
            if event is None:
                self._taken.add(at)
                return False
        event.wait(PATIENCE)
        return at in self._fetched

    def close(self) -> None:
        """End the helper's input and wait for it (by now it holds nothing the
        batch waits for); one that does not stop is killed (its temp is gc's)."""
        proc = self.proc
        if proc is None:
            return
        with self._lock:
            self._free = 0
        _close(proc.stdin)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._thread.join()
        _close(proc.stdout)

    def _talk(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        ready = False
        try:
            proc.stdin.write(pickle.dumps(self._job))
            proc.stdin.flush()
            if proc.stdout.readline() != b"ready\n":
                return
            ready = True
            self._on_ready()
            self._hand_out()
            last = time.monotonic()
            for line in proc.stdout:  # "lo hi failed...": a report per batch it ran
                lo, hi, *failed = map(int, line.split())
                now = time.monotonic()
                took, last = (now - last) / max(1, hi - lo), now
                self._per_item = took if self._per_item is None else (self._per_item + took) / 2
                with self._lock:
                    events = [self._handed[at] for at in range(lo, hi)]
                    self._ranges -= 1
                    self._fetched.update(set(range(lo, hi)).difference(failed))
                for event in events:
                    event.set()
                self._hand_out()
        except (OSError, ValueError, KeyError):
            pass  # a broken or garbled pipe: the helper is as good as gone
        finally:
            with self._lock:
                self._free = 0
                self._ranges = 0
                left = list(self._handed.values())
            for event in left:
                event.set()
            _close(proc.stdin)
            if ready:
                self._on_gone()

    def _hand_out(self) -> None:
        """Hand the helper what it lacks of its window, from the far end; end
        its input when there is nothing more and it has finished."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        per_item = self._per_item
        window = 2 if per_item is None else round(WINDOW_SECONDS / max(per_item, 1e-6))
        window = max(2, min(WINDOW_MAX, window))
        ranges = []
        with self._lock:
            # Two ranges out: the one it works on and the next, so that it
            # never waits for this thread (which waits for the GIL) between them.
            while self._free and self._ranges < 2:
                hi = lo = self._free
                while lo > 0 and hi - lo < window:
                    if lo - 1 in self._taken:  # the batch has come this far: the rest is its
                        self._free = 0
                        break
                    lo -= 1
                    self._handed[lo] = threading.Event()
                else:
                    self._free = lo
                if lo < hi:
                    ranges.append(b"%d %d\n" % (lo, hi))
                    self._ranges += 1
            finished = not self._free and not self._ranges
        if ranges:
            proc.stdin.write(b"".join(ranges))
            proc.stdin.flush()
        if finished:
            _close(proc.stdin)


def serve(job: dict[str, Any]) -> None:
    """The helper: fetch each range handed to it, far end first, as one batch
    (its rows are written when the batch ends), then report it."""
    from .models import Artifact
    from .store import Store

    items = job["items"]
    out, buffered = sys.stdout.buffer, b""
    with Store(job["root"], **job["options"]) as store:
        out.write(b"ready\n")
        out.flush()
        # Ends when the batch has nothing more, or died.
        while data := sys.stdin.buffer.read1(1 << 16):
            *lines, buffered = (buffered + data).split(b"\n")
            for line in lines:
                lo, hi = map(int, line.split())
                positions = range(hi - 1, lo - 1, -1)
                requests = [
                    Request(url=u, sha256=s, size=z, name=n)
                    for u, s, z, n in (items[at] for at in positions)
                ]
                outcomes = store.ensure_many(requests, concurrency=1, processes=1)
                failed = [
                    b"%d" % at
                    for at, o in zip(positions, outcomes, strict=True)
                    if not isinstance(o, Artifact)
                ]
                out.write(b" ".join([b"%d %d" % (lo, hi), *failed]) + b"\n")
                out.flush()


def _close(stream: Any) -> None:
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _free_slot(layout: Layout) -> int | None:
    """An fd holding one of the store's helper slots (one per spare core), or None.

    Several batches at once (parallel installers sharing a store) would each
    start a helper and oversubscribe the cores.  A slot is a lock file nobody
    waits for: taken or skipped.
    """
    import fcntl

    layout.ensure()
    for k in range(max(1, _cores() - 1)):
        path = layout.lock_path(f"spread-{k}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):  # gc unlinks unheld locks
                return fd
        except OSError:
            pass
        os.close(fd)
    return None
