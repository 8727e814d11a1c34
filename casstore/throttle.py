"""How many of a batch's workers run at once: as many as make the batch faster.

A batch (``Store.ensure_many``) starts ``concurrency`` workers, which pays
where each download mostly waits on the network: a distant origin, a CDN
that caps each connection.  Where the origin is fast (a mirror on the LAN,
loopback) a small download is mostly Python's own CPU, and more running
threads than cores only pass the GIL to and fro: 1,000 files of 4 KiB from a
local nginx ran at ~900 files/s with one worker and ~520/s with eight, more
slowly than a plain serial loop.

So workers take a slot per download, and the number of slots follows what
the batch measures, window by window.  While the process keeps a CPU core
busy, it tries fewer slots for a window, and keeps them unless the rate
(downloads and bytes per second) drops, half as many each time.  A long
batch (256 downloads or more) starts sooner: its first trial comes right
after its first downloads, as few as its CPU use suggests (1,000 small
files last half a second, and halving from eight took three of its 0.1 s
windows).  A short one measures a whole window first (its first pays for
new connections), since a wrong trial would cost it a larger share of its
time: 40 conda packages of up to 20 MB were 10% slower.  While the process
does not keep a core busy, the workers wait on the network or the disk, and
below the ceiling it tries twice as many, kept only if the rate rises.  A
trial that fails is undone, the next one goes the other way where it can,
and it waits twice as long.  A batch on a slow origin thus never tries
fewer workers, and one that moves from small files to large ones (or to a
slower mirror) climbs back.  A wrong guess costs one window's speed, never
correctness.  The downloads of the batch's helper process (spread.py)
count in its rate: the batch's own workers taking a core from the helper
would otherwise look faster.

A worker keeps its slot from one download to the next (``Throttle.run``):
handing it to a waiting thread each time cost a thread switch and a pass of
the GIL per download, ~7% of a batch of small files.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TypeVar

# A window ends after at least this many downloads and this many seconds, so
# that one slow or fast download does not decide it.
WINDOW_DOWNLOADS = 8
WINDOW_SECONDS = 0.1
# A trial keeps fewer workers unless both rates drop below this share of the
# best, and keeps more only if one of them rises above this factor.
KEEP_FEWER = 0.95
KEEP_MORE = 1.1
# Windows between trials; doubled after each trial that failed.
FIRST_PAUSE = 2
# A batch of at least this many downloads decides from its first ones.
LONG_BATCH = 256
# CPU cores a process keeps busy (all its threads) from which fewer workers
# may help: below it they mostly wait on the network or the disk.
BUSY = 0.7

T = TypeVar("T")
log = logging.getLogger("casstore")


class Slot:
    """A worker's slot for one job: set ``bytes`` to what its download fetched,
    or ``counts`` to False if it downloaded nothing worth measuring (an item
    put off because another process holds its lock).  ``release()`` gives
    the slot up for a wait that downloads nothing (another worker may run
    meanwhile); the worker takes one again with ``hold()``."""

    __slots__ = ("_held", "_throttle", "bytes", "counts")

    def __init__(self, throttle: Throttle) -> None:
        self._throttle = throttle
        self._held = False
        self.bytes = 0
        self.counts = True

    def hold(self) -> None:
        if not self._held:
            with self._throttle._cond:
                self._throttle._enter()
            self._held = True

    def release(self) -> None:
        if self._held:
            with self._throttle._cond:
                self._throttle._leave()
            self._held = False


class Throttle:
    """Slots for a batch's workers, between 1 and ``ceiling``; safe between threads."""

    def __init__(
        self,
        ceiling: int,
        *,
        jobs: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.ceiling = max(1, ceiling)
        # A long batch (or one of unknown length) decides from its first
        # downloads, its first trial a guess; in a short one a wrong trial
        # would cost a large share of its time: it measures a window first,
        # and halves.
        self._quick = jobs is None or jobs >= LONG_BATCH
        self.limit = self.ceiling
        self._clock = clock
        self._cpu = cpu
        self._cond = threading.Condition()
        self._running = 0
        self._window_start = clock()
        self._window_cpu = self._cpu()
        self._downloads = 0
        self._bytes = 0
        self._decided = False  # whether a window has ended
        # Whether the first trial of fewer (a guess, not a halving) is behind it.
        self._guessed = not self._quick
        # While a trial runs: the limit it started from and that limit's rates.
        self._trial_from: tuple[int, tuple[float, float]] | None = None
        self._up = False  # whether the next trial is of more workers, where both may be
        self._pause = FIRST_PAUSE
        self._wait = 0
        # Jobs to serve before their turn (``hurry``): of the run under way only.
        self._urgent: deque[object] | None = None

    def set_ceiling(self, ceiling: int) -> None:
        """Change the most slots (a helper process took one of them, or gave it
        back).  A limit at the old ceiling follows it; a trial under way ends."""
        with self._cond:
            at_top = self.limit >= self.ceiling
            self.ceiling = max(1, ceiling)
            self._trial_from = None
            self.limit = self.ceiling if at_top else min(self.limit, self.ceiling)
            self._cond.notify_all()

    def hurry(self, job: object) -> None:
        """Have the next free worker of the run under way serve ``job`` (one of
        its jobs, not yet begun) before the jobs ahead of it: a helper process
        has fetched its item (spread.py), and the batch's progress should say so
        now rather than when its workers reach the far end of the list."""
        with self._cond:  # (no one to wake: a parked worker waits for a slot, not a job)
            if self._urgent is not None:
                self._urgent.append(job)

    def run(
        self,
        jobs: Iterable[T],
        serve: Callable[[T, Slot], None],
        *,
        threads: int,
        on_stop: Callable[[], None] | None = None,
        on_thread_end: Callable[[], None] | None = None,
    ) -> None:
        """``serve(job, slot)`` each job, in order, on up to ``threads`` threads, at
        most ``limit`` of them at once; return once all are served.  Each thread
        calls ``on_thread_end()`` as it ends, before this returns.

        A thread keeps its slot from one job to the next, and gives it up
        when it is over the limit, when the jobs run out, and while ``serve``
        has it released.

        An exception from ``serve`` (or a KeyboardInterrupt here) stops the
        jobs not yet begun (and calls ``on_stop``); those under way finish (a
        second interrupt does not wait for them), then it is raised here.
        """
        todo = deque(jobs)
        urgent: deque[object] = deque()
        begun: set[int] = set()  # ids of the jobs served or under way (early ones: skipped)
        with self._cond:
            self._urgent = urgent
        errors: list[BaseException] = []
        # Threads started and not ended, and those serving a job, under _cond.
        # Waited for on _cond, not joined: before Python 3.13 a join that an
        # interrupt cut short marks the thread ended while it still runs.
        live, serving = [0], [0]

        def work() -> None:
            slot = Slot(self)
            try:
                while True:
                    with self._cond:
                        if slot._held and self._running > self.limit:
                            self._leave()
                            slot._held = False
                        while True:
                            while todo and id(todo[0]) in begun:
                                todo.popleft()  # served before its turn
                            if not todo:
                                return
                            if slot._held:
                                break
                            if self._running < self.limit:
                                self._running += 1
                                slot._held = True
                                break
                            self._cond.wait()
                        job = None
                        while urgent and job is None:
                            hurried = urgent.popleft()
                            job = None if id(hurried) in begun else hurried
                        if job is None:
                            job = todo.popleft()
                        begun.add(id(job))
                        serving[0] += 1
                    slot.bytes, slot.counts = 0, True
                    try:
                        serve(job, slot)
                    finally:
                        with self._cond:
                            serving[0] -= 1
                    slot.hold()
                    with self._cond:
                        if slot.counts:
                            self._finished(slot.bytes)
                        # Only a limit raised wakes anyone: a thread carries on itself.
                        self._cond.notify(max(0, self.limit - self._running))
            except BaseException as exc:
                errors.append(exc)
                with self._cond:
                    todo.clear()
            finally:
                try:
                    if on_thread_end is not None:
                        on_thread_end()
                finally:
                    with self._cond:
                        if slot._held:
                            self._running -= 1
                        live[0] -= 1
                        self._cond.notify_all()  # the jobs may have run out: parked threads end

        def wait() -> None:
            with self._cond:
                while live[0]:
                    # Not forever at once: Ctrl-C may be delivered to a worker
                    # thread, and the main thread only sees it between waits.
                    self._cond.wait(0.2)

        try:
            for k in range(max(1, threads)):
                worker = threading.Thread(target=work, name=f"casstore-{k}", daemon=True)
                with self._cond:
                    live[0] += 1
                try:
                    worker.start()
                except BaseException:
                    with self._cond:
                        live[0] -= 1
                    raise
            wait()
        except BaseException:
            with self._cond:
                todo.clear()
                self._cond.notify_all()
                under_way = serving[0]
            if on_stop is not None:
                on_stop()
            if under_way:
                log.warning(
                    "stopping: waiting for %d download(s) under way (interrupt again to leave now)",
                    under_way,
                )
            wait()
            raise
        finally:
            with self._cond:
                self._urgent = None  # (a hurry from now on is too late for this run)
        if errors:
            raise errors[0]

    def count(self, nbytes: int) -> None:
        """Count a download done elsewhere for the batch (by its helper process):
        the batch's rate is both's, or the workers taking a core from the
        helper would look faster."""
        with self._cond:
            self._finished(nbytes)
            self._cond.notify(max(0, self.limit - self._running))

    def _enter(self) -> None:
        while self._running >= self.limit:
            self._cond.wait()
        self._running += 1

    def _leave(self) -> None:
        self._running -= 1
        self._cond.notify(max(0, self.limit - self._running))

    def _finished(self, nbytes: int) -> None:
        self._downloads += 1
        self._bytes += nbytes
        now = self._clock()
        elapsed = now - self._window_start
        if self._downloads < max(WINDOW_DOWNLOADS, 2 * self.limit) or elapsed <= 0:
            return
        if elapsed < WINDOW_SECONDS and (self._decided or not self._quick):
            # A quick batch's first window ends on its downloads alone: about
            # two per worker (each has its connection by then).
            return
        cpu = self._cpu()
        rates = (self._downloads / elapsed, self._bytes / elapsed)
        busy = (cpu - self._window_cpu) / elapsed
        self._window_start, self._window_cpu, self._downloads, self._bytes = now, cpu, 0, 0
        first, self._decided = not self._decided, True
        if first and not self._quick:
            return  # it paid for new connections: not a measure
        # A quick batch's first window pays for them too: its low rates make a
        # trial of fewer easier to keep, which is what a busy batch needs.
        limit = self.limit
        self.decide(rates, busy)
        if self.limit != limit:
            log.debug(
                "workers: %d -> %d (%.0f downloads/s, %.2f cores busy)",
                limit,
                self.limit,
                rates[0],
                busy,
            )

    def decide(self, rates: tuple[float, float], busy: float) -> None:
        """Take a window's (downloads, bytes) per second at ``limit``, and the CPU
        cores the process kept busy meanwhile; set the next limit."""
        if self._trial_from is not None:
            start, best = self._trial_from
            self._trial_from = None
            if _better(rates, best, fewer=self.limit < start):
                self._pause = FIRST_PAUSE
                # A step further the same way (at 1 or the ceiling, stay a
                # while), judged against the best rates so far, so that steps
                # each a little slower cannot add up to a slow batch.
                best = (max(rates[0], best[0]), max(rates[1], best[1]))
                if not self._try(best, busy, up=self.limit > start):
                    self._wait = self._pause
                return
            self._up = self.limit < start  # next time, the other way
            self.limit = start
            self._wait = self._pause
            self._pause *= 2
        elif self._wait > 0:
            self._wait -= 1
        else:
            self._try(rates, busy)

    def _try(self, rates: tuple[float, float], busy: float, *, up: bool | None = None) -> bool:
        """Start a trial one step on from ``limit`` (only ``up`` or down, if
        given); False if there is none to take.  Fewer workers only while the
        process keeps a CPU core busy (else they wait, on the network or the
        disk, and fewer could only be slower); more below the ceiling, when
        fewer may not be tried or the last trial of fewer failed."""
        fewer = busy >= BUSY and self.limit > 1 and up is not True
        more = self.limit < self.ceiling and up is not False
        if more and (self._up or not fewer):
            step = min(self.ceiling, self.limit * 2)
        elif fewer:
            step = self.limit // 2
            if not self._guessed:
                # Workers beyond one wait on something other than this core (the
                # network, the disk) for the 1 - busy share of the window: about
                # that many more keep it as busy.  The trial judges the guess.
                self._guessed = True
                step = min(step, math.ceil(1 + self.limit * (1 - min(busy, 1.0)) / busy))
        else:
            return False
        self._up = step > self.limit
        self._trial_from = (self.limit, rates)
        self.limit = step
        return True


def _better(rates: tuple[float, float], best: tuple[float, float], *, fewer: bool) -> bool:
    """Whether a trial's rates justify its limit: fewer workers unless the batch got
    slower, more only if it got faster."""
    if fewer:
        return all(r >= b * KEEP_FEWER for r, b in zip(rates, best, strict=True))
    return any(r > b * KEEP_MORE for r, b in zip(rates, best, strict=True))
