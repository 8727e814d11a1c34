"""Group commit: many verified temps published and indexed together.

A batch (``Store.ensure_many``) downloads in several worker threads.  Each
worker verifies and seals its temp (``Ingest.verify``, ``Ingest.seal``: mode
0444, fsync) itself, so the fsyncs of the batch run from several threads at
once and the filesystem folds them into few journal commits; then it calls
``GroupCommit.commit`` and waits.  The worker at the head of the queue leads
a round for every temp queued so far, its own included:

1. links each temp to its object and unlinks the temp (``ingest.publish``:
   EEXIST is success; a wrong-sized object is quarantined and replaced);
2. fsyncs each directory that gained an object, once, however many it gained;
3. queues the round's index rows, and writes every queued row in one
   transaction once ``ROWS`` are queued, the round holds an item keyed by
   URL (see below), ``ROWS_AGE`` seconds after the oldest was queued (a
   timer enters a round of its own if no other comes), or when the batch
   ends (``close``);
4. wakes the round's workers; each materializes its ``dest`` and only then
   releases its artifact's lock (so gc cannot evict the object before use).

Why rows wait: once the batch has settled on one worker (throttle.py), a
round holds one temp, and a transaction per row cost ~45 µs of CPU on tmpfs
and ~80 µs on disk against ~16 and ~25 in transactions of 32 (measured on
``Index.record_objects`` alone; a whole small file costs ~600 µs).  An object
whose row is still queued is already complete and durable: another process
finds it by its path, and a hit on an object without a row indexes it (the
objects are the truth; gc leaves an object without a row alone for a
minute, and a queued row whose object has gone is dropped).  Only an item
keyed by URL (trust on first use, or md5 only) needs its row before its lock
goes: a process waiting on that lock learns the digest from the row.  A row
that cannot be written once its item was delivered fails that item in
``ensure_many``'s results, as a row written at once would have.  The rows
of objects a helper process fetched for the batch (spread.py) are queued the
same way (``adopt``), as the helper reports each: it never writes the index.

Why SPEC §1's order still holds for every single object: its bytes are
durable (fsync by its worker) and verified before its ``link`` (step 1), the
link is atomic, the temp is gone and the directory entry durable (step 2)
before the object's row commits (step 3, or later).  A round only
interleaves steps of *different* objects, never reorders two steps of one.
A kill at any instant leaves, for each object of the round: a temp in ``tmp/`` (a dead writer's,
gc's to sweep), or a complete verified object without its row yet (objects
are the truth: the next get is a hit and indexes it), or object and row;
never a partial object and never a row without its object.  The artifact
locks are held by the workers from before their downloads until after step
4, so one download per digest across threads and processes holds as for
``get``.

A round never waits for an artifact lock, so it always finishes; it holds at
most one temp per worker, since each worker waits for its own.  Measured on
2 cores, one worker, 980 files of 4 KiB to tmpfs in alternating runs: 0.60-0.68
ms of wall per file with rows queued, 0.66-0.74 with a transaction per row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .index import Index
from .ingest import Ingest, fsync_dir, publish
from .layout import Layout
from .models import Published

log = logging.getLogger("casstore")

ROWS = 32
ROWS_AGE = 0.5


class _Pending:
    """A temp handed to a round; with ``ingest`` None, the row of an object a
    helper published (``adopt``), or with no ``sha256`` either, a request to
    write the queued rows (``flush``)."""

    __slots__ = (
        "error",
        "finished",
        "ingest",
        "keyed_by_url",
        "published",
        "row",
        "sha256",
        "size",
    )

    def __init__(
        self,
        ingest: Ingest | None,
        sha256: str,
        row: dict[str, Any],
        keyed_by_url: bool = False,
        size: int = 0,
    ) -> None:
        self.ingest = ingest
        self.sha256 = sha256
        self.size = ingest.size if ingest is not None else size
        self.row = row
        self.keyed_by_url = keyed_by_url
        self.finished = False
        self.error: BaseException | None = None
        self.published: Published | None = None


class GroupCommit:
    """Publishes the temps of one batch's workers in rounds; safe to share between threads.

    ``commit`` blocks its worker until that temp is published and its
    directory durable; its row is queued (see the module's docstring).
    There is no committer thread: the worker at the head of the queue leads
    a round for every temp queued so far (its own included) while the
    workers that arrive meanwhile wait; when it is done, the next waiting
    worker leads the next round (LevelDB's writer queue).  A lone worker thus
    commits its own temp at once, with no hand-off between threads.  Queued
    rows are written by a round, never beside one: ``flush`` (and a timer,
    ``rows_age`` after a row was queued, for when no round comes) enters the
    queue as a round of its own.
    """

    def __init__(
        self, layout: Layout, index: Index, *, rows: int = ROWS, rows_age: float = ROWS_AGE
    ) -> None:
        self.layout = layout
        self.index = index
        self.rows, self.rows_age = rows, rows_age
        # Delivered items whose rows could not be written: (sha256, row, reason).
        self.unindexed: list[tuple[str, dict[str, Any], BaseException]] = []
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Pending] = []  # published, rows not yet written (leaders only)
        self._since = 0.0
        self._timer: threading.Timer | None = None
        self._firing = 0  # timers that fired and are not done yet
        self._adopted: list[_Pending] = []  # rows of objects a helper published
        self._closed = False

    def commit(
        self, ingest: Ingest, sha256: str, row: dict[str, Any], *, keyed_by_url: bool = False
    ) -> Published:
        """Publish ``ingest``'s verified, sealed temp as ``sha256`` and queue its index
        row (``Index.record_objects`` options): written at once if
        ``keyed_by_url``, else once ``rows`` are queued or ``rows_age``
        seconds after, and by ``close``.  Blocks the calling worker.

        Raises whatever publishing (or writing its own row) raised; the temp
        is then left to the caller's ``Ingest`` to remove.
        """
        pending = self._enter(_Pending(ingest, sha256, row, keyed_by_url))
        if pending.error is not None:
            raise pending.error
        assert pending.published is not None
        return pending.published

    def adopt(self, sha256: str, size: int, row: dict[str, Any]) -> None:
        """Queue the row of an object another process published for this batch
        (spread.py's helper), complete and durable already: the next round
        that writes rows writes it, ``rows_age`` seconds from now at the
        latest (after ``close``, at once).  A row that cannot be written goes
        to ``unindexed``.  Does not wait for a round: the helper's reports are
        read on one thread."""
        pending = _Pending(None, sha256, row, size=size)
        pending.finished = True  # nobody waits for it: a failure goes to unindexed
        with self._cond:
            self._adopted.append(pending)
            closed = self._closed
        if closed:
            self._flush_and_let_go()
        else:
            self._arm()

    def flush(self) -> None:
        """Write every queued row now, in a round of its own."""
        marker = self._enter(_Pending(None, "", {}))
        if isinstance(marker.error, Exception):  # the round itself failed, not a row: say so
            log.warning("could not index this batch's last objects: %s", marker.error)
        elif marker.error is not None:
            raise marker.error  # Ctrl-C and the like

    def close(self) -> None:
        """Write every queued row and stop the timer; call once the workers are done.
        Returns once a timer that has fired meanwhile is done too (its thread's
        connection closed)."""
        with self._cond:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self.flush()
        with self._cond:
            while self._firing:
                self._cond.wait()

    def _arm(self) -> None:
        """Have a round write the queued rows ``rows_age`` seconds from now, if
        none is due already (for when no other round comes)."""
        with self._cond:
            if self._timer is not None or self._closed:
                return
            timer = self._timer = threading.Timer(self.rows_age, self._due)
            timer.daemon = True
        timer.start()  # (a close meanwhile has cancelled it: then it does nothing)

    def _enter(self, pending: _Pending) -> _Pending:
        with self._cond:
            self._queue.append(pending)
            while not pending.finished and self._queue[0] is not pending:
                self._cond.wait()
            batch = [] if pending.finished else list(self._queue)
        if batch:
            try:
                self._round(batch)
            except BaseException as exc:  # never leave a worker waiting
                for p in batch:
                    if p.published is None and p.error is None:
                        p.error = exc
            finally:
                with self._cond:
                    for p in batch:
                        p.finished = True
                        self._queue.popleft()
                    self._cond.notify_all()
        return pending

    def _round(self, batch: list[_Pending]) -> None:
        linked: list[tuple[_Pending, Path, bool]] = []
        dirs: dict[Path, list[_Pending]] = {}
        for p in batch:
            if p.ingest is None:
                continue
            try:
                path, created = publish(
                    self.layout, p.ingest.temp, p.sha256, p.ingest.size, sync_dir=False
                )
            except Exception as exc:
                self._fail(p, exc)
                continue
            linked.append((p, path, created))
            if created:
                dirs.setdefault(path.parent, []).append(p)
        for directory, members in dirs.items():
            try:
                fsync_dir(directory)
            except OSError as exc:
                for p in members:
                    self._fail(p, exc)
        durable = [(p, path, created) for p, path, created in linked if p.error is None]
        with self._cond:
            adopted, self._adopted = self._adopted, []
        fresh = [p for p, _, _ in durable] + adopted
        if fresh and not self._rows:
            self._since = time.monotonic()
        self._rows.extend(fresh)
        if self._rows and (
            len(self._rows) >= self.rows
            or time.monotonic() - self._since >= self.rows_age
            or any(p.keyed_by_url for p in fresh)
            or any(not p.sha256 for p in batch)
        ):
            self._write_rows()
        elif self._rows:
            self._arm()
        for p, path, created in durable:
            if p.error is None:
                p.published = p.ingest.published_at(path, created)  # type: ignore[union-attr]

    def _due(self) -> None:
        with self._cond:
            self._timer = None
            self._firing += 1
        try:
            self._flush_and_let_go()
        finally:
            with self._cond:
                self._firing -= 1
                self._cond.notify_all()

    def _flush_and_let_go(self) -> None:
        """``flush`` from a thread that is not one of the batch's workers (the
        timer's, the one reading the helper's reports), then close that
        thread's index connection: nothing else closes it (index.py)."""
        try:
            self.flush()
        finally:
            self.index.close()

    def _write_rows(self) -> None:
        pending, self._rows = self._rows, []

        def present(sha256: str) -> bool:
            # gc drops an object without a row only after a minute; asked anyway.
            return self.layout.object_path(sha256).exists()

        def record(group: list[_Pending]) -> None:
            rows = [(p.sha256, p.size, p.row) for p in group]
            self.index.record_objects(rows, present=present)

        try:
            record(pending)
            return
        except Exception:
            pass
        # One bad row must not cost the others theirs: index them one by one.
        for p in pending:
            try:
                record([p])
            except Exception as exc:
                if not p.finished:
                    self._fail(p, exc)  # its worker is waiting in this round: its error
                else:
                    # Delivered already: ensure_many turns that item into an error.
                    self.unindexed.append((p.sha256, p.row, exc))

    @staticmethod
    def _fail(p: _Pending, exc: BaseException) -> None:
        p.error = exc
