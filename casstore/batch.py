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
3. writes the index rows of the whole round in one transaction;
4. wakes the round's workers; each materializes its ``dest`` and only then
   releases its artifact's lock (so gc cannot evict the object before use).

Why SPEC §1's order still holds for every single object: its bytes are
durable (fsync by its worker) and verified before its ``link`` (step 1), the
link is atomic, the temp is gone and the directory entry durable (step 2)
before the object's row commits (step 3).  A round only interleaves steps of
*different* objects, never reorders two steps of one.  A kill at any instant
leaves, for each object of the round: a temp in ``tmp/`` (a dead writer's,
gc's to sweep), or a complete verified object without its row yet (objects
are the truth: the next get is a hit and indexes it), or object and row;
never a partial object and never a row without its object.  The artifact
locks are held by the workers from before their downloads until after step
4, so one download per digest across threads and processes holds as for
``get``.

A round never waits for an artifact lock, so it always finishes; it holds at
most one temp per worker, since each worker waits for its own.  Measured on
2 cores (bench/bench_concurrency.py ``--only small`` and the README): about
even with one commit per object for one process, and ahead when several
processes fetch overlapping lists, where the rounds grow.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

from .index import Index
from .ingest import Ingest, fsync_dir, publish
from .layout import Layout
from .models import Published


class _Pending:
    __slots__ = ("error", "finished", "ingest", "published", "row", "sha256")

    def __init__(self, ingest: Ingest, sha256: str, row: dict[str, Any]) -> None:
        self.ingest = ingest
        self.sha256 = sha256
        self.row = row
        self.finished = False
        self.error: BaseException | None = None
        self.published: Published | None = None


class GroupCommit:
    """Publishes the temps of one batch's workers in rounds; safe to share between threads.

    ``commit`` blocks its worker until that temp is published, its directory
    durable and its row committed.  There is no committer thread: the worker
    at the head of the queue leads a round for every temp queued so far
    (its own included) while the workers that arrive meanwhile wait; when it
    is done, the next waiting worker leads the next round (LevelDB's writer
    queue).  A lone worker thus commits its own temp at once, with no
    hand-off between threads.
    """

    def __init__(self, layout: Layout, index: Index) -> None:
        self.layout = layout
        self.index = index
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()

    def commit(self, ingest: Ingest, sha256: str, row: dict[str, Any]) -> Published:
        """Publish ``ingest``'s verified, sealed temp as ``sha256`` and index it with ``row``
        (``Index.record_objects`` options).  Blocks the calling worker.

        Raises whatever publishing or indexing this object raised; the temp
        is then left to the caller's ``Ingest`` to remove.
        """
        pending = _Pending(ingest, sha256, row)
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
        if pending.error is not None:
            raise pending.error
        assert pending.published is not None
        return pending.published

    def _round(self, batch: list[_Pending]) -> None:
        linked: list[tuple[_Pending, Path, bool]] = []
        dirs: dict[Path, list[_Pending]] = {}
        for p in batch:
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
        rows = [(p.sha256, p.ingest.size, p.row) for p, _, _ in durable]
        try:
            self.index.record_objects(rows)
        except Exception:
            # One bad row must not cost the others theirs: index them one by one.
            for p, _, _ in durable:
                try:
                    self.index.record_objects([(p.sha256, p.ingest.size, p.row)])
                except Exception as exc:
                    self._fail(p, exc)
        for p, path, created in durable:
            if p.error is None:
                p.published = p.ingest.published_at(path, created)

    @staticmethod
    def _fail(p: _Pending, exc: BaseException) -> None:
        p.error = exc
