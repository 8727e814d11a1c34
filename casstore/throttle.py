"""How many of a batch's workers run at once: as many as make the batch faster.

A batch (``Store.ensure_many``) starts ``concurrency`` workers, which pays
where each download mostly waits on the network: a distant origin, a CDN
that caps each connection.  Where the origin is fast (a mirror on the LAN,
loopback) a small download is mostly Python's own CPU, and more running
threads than cores only pass the GIL to and fro: 1,000 files of 4 KiB from a
local nginx ran at ~900 files/s with one worker and ~520/s with eight, more
slowly than a plain serial loop.

So workers take a slot per download, and the number of slots follows what
the batch measures, window by window (the first, which pays for new
connections, is not a measure).  While the process keeps a CPU core busy,
it tries half as many slots for a window, and keeps them unless the rate
(downloads and bytes per second) drops; while it does not, the workers wait
on the network or the disk, and below the ceiling it tries twice as many,
kept only if the rate rises.  A trial that fails is undone, the next one
goes the other way where it can, and it waits twice as long.  A batch on a
slow origin thus never tries fewer workers, and one that moves from small
files to large ones (or to a slower mirror) climbs back.  A wrong guess
costs one window's speed, never correctness.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
# CPU cores a process keeps busy (all its threads) from which fewer workers
# may help: below it they mostly wait on the network or the disk.
BUSY = 0.7


class Slot:
    """A worker's slot: set ``bytes`` to what its download fetched, or
    ``counts`` to False if it downloaded nothing worth measuring (an item put
    off because another process holds its lock)."""

    __slots__ = ("bytes", "counts")

    def __init__(self) -> None:
        self.bytes = 0
        self.counts = True


class Throttle:
    """Slots for a batch's workers, between 1 and ``ceiling``; safe between threads."""

    def __init__(
        self,
        ceiling: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = self.ceiling
        self._clock = clock
        self._cpu = cpu
        self._cond = threading.Condition()
        self._running = 0
        self._window_start = clock()
        self._window_cpu = self._cpu()
        self._downloads = 0
        self._bytes = 0
        self._warm = False
        # While a trial runs: the limit it started from and that limit's rates.
        self._trial_from: tuple[int, tuple[float, float]] | None = None
        self._up = False  # whether the next trial is of more workers, where both may be
        self._pause = FIRST_PAUSE
        self._wait = 0

    def set_ceiling(self, ceiling: int) -> None:
        """Change the most slots (a helper process took one of them, or gave it
        back).  A limit at the old ceiling follows it; a trial under way ends."""
        with self._cond:
            at_top = self.limit >= self.ceiling
            self.ceiling = max(1, ceiling)
            self._trial_from = None
            self.limit = self.ceiling if at_top else min(self.limit, self.ceiling)
            self._cond.notify_all()

    @contextmanager
    def slot(self) -> Iterator[Slot]:
        """Hold one of the ``limit`` slots while the block runs."""
        with self._cond:
            while self._running >= self.limit:
                self._cond.wait()
            self._running += 1
        slot = Slot()
        try:
            yield slot
        finally:
            with self._cond:
                self._running -= 1
                try:
                    if slot.counts:
                        self._finished(slot.bytes)
                finally:
                    # As many as there are free slots: waking every idle worker
                    # on each download would pass the GIL around for nothing.
                    self._cond.notify(max(0, self.limit - self._running))

    def _finished(self, nbytes: int) -> None:
        self._downloads += 1
        self._bytes += nbytes
        now = self._clock()
        elapsed = now - self._window_start
        if self._downloads < max(WINDOW_DOWNLOADS, 2 * self.limit) or elapsed < WINDOW_SECONDS:
            return
        cpu = self._cpu()
        rates = (self._downloads / elapsed, self._bytes / elapsed)
        busy = (cpu - self._window_cpu) / elapsed
        self._window_start, self._window_cpu, self._downloads, self._bytes = now, cpu, 0, 0
        if self._warm:
            self.decide(rates, busy)
        self._warm = True  # the first window pays for new connections: not a measure

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
