"""Group commit: many verified temps published and indexed together.

A batch (``Store.ensure_many``) downloads in several worker threads.  Each
worker verifies and seals its temp (``Ingest.verify``, ``Ingest.seal``: mode
0444, fsync) itself, so the fsyncs of the batch run from several threads at
once and the filesystem folds them into few journal commits; then it hands
the temp to ``GroupCommit.commit`` and waits.  One committer thread takes
every temp handed over since its last round and, for all of them together:

1. links each temp to its object and unlinks the temp (``ingest.publish``:
   EEXIST is success; a wrong-sized object is quarantined and replaced);
2. fsyncs each directory that gained an object, once, however many it gained;
3. writes the index rows of the whole round in one transaction;
4. wakes each waiting worker, which materializes its ``dest`` and only then
   releases the artifact's lock (so gc cannot evict it before its use).

Why SPEC §1's order still holds for every single object: its bytes are
durable (fsync by its worker) and verified before its ``link`` (step 1), the
link is atomic, the temp is gone and the directory entry durable (step 2)
before the object's row commits (step 3).  Grouping only reorders steps of
*different* objects, never two steps of one.  A kill at any instant leaves,
for each object of the round: a temp in ``tmp/`` (a dead writer's, gc's to
sweep), or a complete verified object without its row yet (objects are the
truth: the next get is a hit and indexes it), or object and row; never a
partial object and never a row without its object.  The artifact locks are
held by the workers from before their download until after step 4, so one
download per digest across threads and processes holds as for ``get``.

The committer never waits for a lock, so it always makes progress; a round
holds at most as many temps as there are workers, since each worker waits
for its own.  Measured: see bench/bench_concurrency.py ``--only small``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .index import Index
from .ingest import Ingest, fsync_dir, publish
from .layout import Layout
from .models import Published


class _Pending:
    __slots__ = ("done", "error", "ingest", "published", "row", "sha256")

    def __init__(self, ingest: Ingest, sha256: str, row: dict[str, Any]) -> None:
        self.ingest = ingest
        self.sha256 = sha256
        self.row = row
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.published: Published | None = None


class GroupCommit:
    """The committer thread of one batch; a context manager (stops the thread on exit).

    ``commit`` is called from worker threads and blocks until that temp is
    published, its directory durable and its row committed.
    """

    def __init__(
        self, layout: Layout, index: Index, *, on_round: Callable[[int], None] | None = None
    ):
        self.layout = layout
        self.index = index
        self._on_round = on_round  # called with each round's size (tests and benchmarks)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="casstore-commit", daemon=True)
        self._thread.start()

    def __enter__(self) -> GroupCommit:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()

    def commit(self, ingest: Ingest, sha256: str, row: dict[str, Any]) -> Published:
        """Publish ``ingest``'s verified, sealed temp as ``sha256`` and index it with ``row``
        (``Index.record_objects`` options).  Blocks the calling worker.

        Raises whatever publishing or indexing this object raised; the temp
        is then left to the caller's ``Ingest`` to remove.
        """
        pending = _Pending(ingest, sha256, row)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.published is not None
        return pending.published

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._round(batch)
            except BaseException as exc:  # never leave a worker waiting
                for p in batch:
                    if not p.done.is_set():
                        p.error = exc
                        p.done.set()

    def _round(self, batch: list[_Pending]) -> None:
        if self._on_round is not None:
            self._on_round(len(batch))
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
                p.done.set()

    @staticmethod
    def _fail(p: _Pending, exc: BaseException) -> None:
        p.error = exc
        p.done.set()
