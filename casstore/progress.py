"""Progress on stderr: a bar per download shown once it has taken a while, and
one overall display per batch (``tally``).

The command line turns it on when stderr is a terminal and neither ``-q`` nor
``--json`` was given; fetch.py calls the bar after every chunk with the bytes
so far and the total (None when the origin did not say).  rich is imported
only when a bar is actually drawn, so quick downloads and cache hits never
load it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# A bar for a download that ends within this many seconds would only flicker.
SHOW_AFTER = 1.0
# Redraws are rich's job (its own thread, 10 per second); we update it at most this often.
UPDATE_EVERY = 0.1


class Bar:
    """Bytes, rate and ETA for one download; call it with (done, total), then ``close()``."""

    def __init__(self, label: str, *, show_after: float = SHOW_AFTER) -> None:
        self.label = label
        self._start = time.monotonic()
        self._show_at = self._start + show_after
        self._next = self._show_at
        self._progress: Any = None
        self._task: Any = None
        self._done, self._total = 0, None

    def __call__(self, done: int, total: int | None) -> None:
        self._done, self._total = done, total
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + UPDATE_EVERY
        if self._progress is None:
            self._open(total)
        self._progress.update(self._task, completed=done, total=total)

    def _open(self, total: int | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}", table_column=None),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        name = self.label.rsplit("/", 1)[-1] or self.label
        self._task = self._progress.add_task(name[:40], total=total)
        self._progress.start()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self._done, total=self._total)
            self._progress.stop()
            self._progress = None


@contextmanager
def tally(
    label: str, total: int | None = None, *, enabled: bool = True, unit: str = "items"
) -> Iterator[Callable[[int], None]]:
    """One overall display for a batch (fetch, conda fetch, verify); yields ``advance(n)``.

    ``unit`` is "items" (n of total) or "bytes".  ``advance`` may be called
    from several threads (rich's Progress takes its own lock).  Disabled, it
    draws nothing and imports nothing.
    """
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    columns = (TextColumn("{task.description}"), BarColumn(), count, TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)
