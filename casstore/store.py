"""``Store``: the Python API, composing layout, ingest, index, fetch and link.

A Store is safe to share between threads (the index keeps a connection per
thread; downloads share one thread-safe ``fetch.Session``) and to open from
many processes at once: every write goes through a unique temp and an
idempotent publish, and locks only spare bandwidth.  Its methods mirror the command line one to one:

    get, get_many, aget, put, path, open, link, info, ls, stats, pin, unpin, rm,
    gc, verify

A cache hit by digest is a stat and one indexed read; it imports neither
httpx, blake3 nor sqlite-utils.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from .errors import (
    BatchError,
    CasError,
    DownloadError,
    IntegrityFailure,
    InvalidInput,
    NotFound,
)
from .hashing import parse_md5, parse_sha256
from .hit import BAD, HIT, holder_note, lookup
from .index import Index
from .layout import Layout, default_root
from .link import first_copy_warning, is_live, materialize, parse_mode
from .models import Artifact, LinkMode, LinkResult, Published, Request
from .refs import is_short_prefix, parse_ref, resolve, too_short
from .urls import check_url, redact

if TYPE_CHECKING:
    from .batch import GroupCommit
    from .reports import GcReport, ObjectInfo, Stats, VerifyReport
    from .spread import Fetched, Share

log = logging.getLogger("casstore")
PathLike = str | os.PathLike[str]


class Store:
    """A content-addressed store rooted at ``root`` (default: ``$CASSTORE_DIR`` or
    the user cache dir).  Opening creates nothing; the first write lays out the
    directory."""

    def __init__(
        self,
        root: PathLike | None = None,
        *,
        retries: int | None = None,
        timeout: float | None = None,
        backoff_max: float | None = None,
        headers: Any = (),
        progress: bool = False,
    ) -> None:
        """Download options (SPEC §5): ``retries`` after the first attempt (default 3,
        ``CASSTORE_RETRIES``), ``timeout`` per connect/read in seconds (30),
        ``backoff_max`` seconds (10, ``CASSTORE_BACKOFF_MAX``), extra request
        ``headers`` (a mapping or pairs; sent, never stored or printed), and
        ``progress``: draw a bar on stderr for downloads that take over a second.
        """
        self.layout = Layout(root if root is not None else default_root())
        self.root = self.layout.root
        self.index = Index(self.layout)
        self._session: Any = None  # fetch.Session, made on first download
        self._session_lock = threading.Lock()
        self._download_options = dict(
            retries=retries, timeout=timeout, backoff_max=backoff_max, headers=headers
        )
        self._policy_cache: Any = None
        self.progress = progress
        # aget: per event loop, the in-flight downloads by key and one shared AsyncClient.
        self._aflights: dict[Any, dict[str, Any]] = {}
        self._aclients: dict[Any, list[Any]] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        self.index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- get -----------------------------------------------------------------

    def get(
        self,
        url: str,
        sha256: str | None = None,
        *,
        name: str | None = None,
        mirrors: Sequence[str] = (),
        dest: PathLike | None = None,
        link: str | LinkMode = LinkMode.AUTO,
        md5: str | None = None,
        size: int | None = None,
    ) -> Path:
        """Ensure the object behind ``url`` is in the store; return its path, or ``dest``.

        ``mirrors`` are tried in order after ``url``.  Without ``sha256`` the
        first download is trusted and its digest recorded for the URL; later
        calls are hits.  With ``md5`` (conda) the md5 is checked in the same pass.
        Blocks; safe from many threads and processes at once.

        Raises:
            InvalidInput: malformed digest, URL scheme or link mode (before any I/O).
            IntegrityFailure: every source served other bytes than promised.
            DownloadError: no source could be read.
        """
        req = _request(
            url, sha256, name=name, mirrors=tuple(mirrors), dest=dest, md5=md5, size=size
        )
        artifact = self.ensure(req, link=link)
        return artifact.dest or artifact.path

    def ensure(self, request: Request, *, link: str | LinkMode = LinkMode.AUTO) -> Artifact:
        """``get`` for one Request, returning the whole outcome (digest, size, method)."""
        artifact = self._ensure_retrying(_coerce(request), parse_mode(link))
        assert artifact is not None  # only a batch's item is ever put off
        return artifact

    def _ensure_retrying(
        self, req: Request, mode: LinkMode, committer: GroupCommit | None = None
    ) -> Artifact | None:
        for _ in range(3):
            try:
                return self._ensure(req, mode, committer)
            except FileNotFoundError:
                continue  # gc evicted a hit between the look and the use: fetch it
        raise CasError(f"object for {redact(req.url)} kept vanishing", url=redact(req.url))

    def _ensure(
        self, req: Request, mode: LinkMode, committer: GroupCommit | None = None
    ) -> Artifact | None:
        """``req``'s object, downloaded if the store lacks it, and materialized.

        Raises FileNotFoundError if gc evicted a hit before it was used.  A
        download is published and materialized while its artifact lock is
        held, and gc never evicts an object whose lock is held, so a fresh
        download cannot vanish before its caller has used it.

        With a ``committer`` (a batch's item) the lock is only tried: if
        another process holds it, None is returned and the batch takes this
        item through the waiting path once it holds no locks of its own (so
        two batches never wait for each other); a download is published
        through the committer, in one round with the batch's others.
        """
        source = redact(req.url)
        known = self._known(req)
        if known is not None and self._hit(known, name=req.name, source=source):
            return self._deliver(known, req, mode)
        key = _flight_key(req, known)
        if committer is None:
            from .locks import single_flight

            def published() -> bool:
                return known is not None and self.layout.object_path(known).exists()

            flight = single_flight(
                self.layout, key, label=source, on_wait=log.warning, done=published
            )
        else:
            flight = _lock_now(self.layout, key, label=source)
        with flight as held:
            if held is None:
                return None
            if known is None:
                # Keyed by URL (md5 or trust on first use): whoever held the lock
                # before us recorded what it fetched; look again.
                known = self._known(req)
            if known is not None and self._hit(known, name=req.name, source=source):
                return self._deliver(known, req, mode)
            if committer is None:
                published, final_url = self._download(req)
                # Recorded before the lock is released, so a waiter's look-up finds it.
                indexed = time.time()
                sha = self._record(req, published, final_url)
                if held and key == sha:
                    self._leave_note(sha, indexed, source)
            else:
                published, _ = self._download(req, committer)  # recorded by the committer
                sha = published.sha256
                _warn_trusted(req, sha)
            return self._deliver(sha, req, mode, published.size)

    def _leave_note(self, sha: str, indexed: float, source: str) -> None:
        """Tell the command line's waiters on this lock (hit.py) what was just
        published and indexed, so that they serve it without opening the index."""
        from .locks import leave_note

        try:
            note = holder_note(self.layout.object_path(sha), indexed, source)
        except OSError:
            return  # no note: the waiters look the object up
        leave_note(self.layout, sha, note)

    def _fetch_unindexed(self, req: Request) -> tuple[Published, str] | None:
        """For a batch's helper process (spread.py): download ``req`` (whose
        sha256 is known) under its lock and publish it, without touching the
        index, which is the batch's to write; the object and the final URL.
        None if the store has the object already (the batch serves it as a hit)."""
        from .locks import single_flight

        assert req.sha256 is not None
        path = self.layout.object_path(req.sha256)
        if path.exists():
            return None
        flight = single_flight(
            self.layout, req.sha256, label=redact(req.url), on_wait=log.warning, done=path.exists
        )
        with flight:
            return None if path.exists() else self._download(req)

    def _delivered(
        self, req: Request, mode: LinkMode, committer: GroupCommit | None
    ) -> Artifact | None:
        """``_ensure`` of a request a helper process has just fetched (spread.py;
        its row is queued already), without looking it up again; as ``_ensure``
        if it is gone."""
        assert req.sha256 is not None
        try:
            return self._deliver(req.sha256, req, mode)
        except FileNotFoundError:  # gc evicted it meanwhile
            return self._ensure_retrying(req, mode, committer)

    def _deliver(self, sha: str, req: Request, mode: LinkMode, size: int | None = None) -> Artifact:
        """The Artifact for an object in the store, materialized at ``req.dest`` if
        given.  ``size`` None: the object's own (FileNotFoundError if it is gone);
        a download just published, under its lock, passes its own."""
        path = self.layout.object_path(sha)
        if size is None:
            size = path.stat().st_size
        if req.dest is None:
            return Artifact(sha256=sha, size=size, path=path)
        linked = self._link(sha, Path(req.dest), mode, force=False)
        return Artifact(sha256=sha, size=size, path=path, dest=linked.dest, method=linked.method)

    def _known(self, req: Request) -> str | None:
        """The digest ``req`` is expected to have, if it (or an earlier use) says."""
        if req.sha256 is not None:
            return req.sha256
        if req.md5 is not None:
            return self.index.lookup_md5(req.md5)
        return self.index.lookup_source(redact(req.url))  # trusted on an earlier use

    def _record(self, req: Request, published: Published, final_url: str) -> str:
        """Index a fresh download: object, name, the URL and the final URL after redirects."""
        source = redact(req.url)
        self.index.record_object(
            published.sha256,
            published.size,
            blake3=published.blake3,
            md5=published.md5,
            name=req.name,
            source=source,
        )
        if final_url != req.url and redact(final_url) != source:
            self.index.record_use(published.sha256, published.size, source=redact(final_url))
        _warn_trusted(req, published.sha256)
        return published.sha256

    def _hit(self, sha256: str, *, name: str | None = None, source: str | None = None) -> bool:
        """True if the object is present and sound as far as a stat can tell; records the use.

        An object whose size disagrees with its index row is quarantined and
        treated as a miss, never served.
        """
        status, _ = lookup(
            self.layout.object_path(sha256), self.index, sha256, name=name, source=source
        )
        if status == BAD:
            from .ingest import quarantine

            log.warning("object %s has the wrong size; quarantined and fetching again", sha256)
            quarantine(self.layout, self.layout.object_path(sha256))
            self.index.forget_object(sha256)
        return status == HIT

    def _download(
        self, req: Request, committer: GroupCommit | None = None
    ) -> tuple[Published, str]:
        """Try each source in order; the first whose bytes verify is published
        (with a ``committer``: sealed here, published and indexed in its round)."""
        from .fetch import download
        from .ingest import Ingest

        policy = self._policy()
        failures: list[CasError] = []
        for url in (req.url, *req.mirrors):
            bar = self._progress_bar(url)
            try:
                with Ingest(self.layout, md5=req.md5 is not None, size_hint=req.size) as ingest:
                    fetched = download(
                        url,
                        ingest,
                        session=self._downloads(),
                        policy=policy,
                        size=req.size,
                        progress=bar,
                        verified=req.sha256 is not None or req.md5 is not None,
                    )
                    if committer is None:
                        published = ingest.commit(
                            sha256=req.sha256, size=req.size, md5=req.md5, source=redact(url)
                        )
                    else:
                        sha = ingest.verify(
                            sha256=req.sha256, size=req.size, md5=req.md5, source=redact(url)
                        )
                        ingest.seal()
                        published = committer.commit(
                            ingest,
                            sha,
                            _row(req, ingest.hasher.blake3, ingest.hasher.md5, fetched.url),
                            keyed_by_url=req.sha256 is None,
                        )
                return published, fetched.url
            except (DownloadError, IntegrityFailure) as exc:
                failures.append(exc)
                if req.mirrors:
                    log.warning("%s", exc)
            finally:
                if bar is not None:
                    bar.close()
        raise _all_failed(req, failures)

    async def _adownload(self, req: Request) -> tuple[Published, str]:
        """``_download`` on the event loop's AsyncClient."""
        import asyncio

        from .fetch import adownload
        from .ingest import Ingest

        policy = self._policy()
        failures: list[CasError] = []
        async with self._aclient() as client:
            for url in (req.url, *req.mirrors):
                try:
                    with Ingest(self.layout, md5=req.md5 is not None, size_hint=req.size) as ing:
                        fetched = await adownload(
                            url, ing, client=client, policy=policy, size=req.size
                        )
                        # fsync and publish block: keep them off the event loop.
                        published = await asyncio.to_thread(
                            ing.commit,
                            sha256=req.sha256,
                            size=req.size,
                            md5=req.md5,
                            source=redact(url),
                        )
                    return published, fetched.url
                except (DownloadError, IntegrityFailure) as exc:
                    failures.append(exc)
                    if req.mirrors:
                        log.warning("%s", exc)
        raise _all_failed(req, failures)

    def _policy(self) -> Any:
        """The download policy (built on first download: it reads the environment)."""
        if self._policy_cache is None:
            from .fetch import Policy

            self._policy_cache = Policy.from_env(**self._download_options)
        return self._policy_cache

    def _progress_bar(self, url: str) -> Any:
        if not self.progress:
            return None
        from .progress import Bar

        return Bar(redact(url))

    @property
    def client(self) -> Any:
        """The httpx client downloads use where they do not go over the direct
        lane (created on first use)."""
        return self._downloads().client

    def _share(
        self,
        reqs: list[Request],
        groups: list[list[int]],
        concurrency: int,
        processes: int | None,
        on_fetched: Callable[[int, Fetched], None],
    ) -> Share | None:
        """A helper process for a batch's missing items (spread.py), or None."""
        from collections import Counter

        from . import spread
        from .locks import lock_timeout

        if concurrency < 2 or not spread.wanted(len(groups), processes):
            return None
        pool = self._downloads().pool
        if pool is None:
            return None
        trusting = {req.url for req in reqs if req.sha256 is None}
        # A name two digests claim goes to whichever is recorded last: batch order.
        named = Counter(req.name for req in reqs)
        firsts = [
            (g[0], req)
            for g in groups
            if (req := reqs[g[0]]).sha256 is not None
            and req.md5 is None
            and not req.mirrors
            and req.url not in trusting
            and (req.name is None or named[req.name] == 1)
        ]
        plain = pool.takes_all(req.url for _, req in firsts)
        firsts = [first for first, ok in zip(firsts, plain, strict=True) if ok]
        there = self.layout.have_objects([req.sha256 for _, req in firsts])  # type: ignore[arg-type]
        items = [first for first, have in zip(firsts, there, strict=True) if not have]
        if not spread.wanted(len(items), processes):
            return None
        policy = self._policy()
        options = dict(
            retries=policy.retries,
            timeout=policy.timeout,
            backoff_max=policy.backoff_max,
            headers=policy.headers,
        )
        # A worker waits for an item the helper is fetching as it would on its
        # lock (not at all with locking off: then both fetch, as any two would).
        share = spread.Share(
            self.layout, options, items, patience=max(0.0, lock_timeout()), on_fetched=on_fetched
        )
        if share.proc is None:
            return None
        log.debug(
            "a helper process (pid %d, %s) may take %d items",
            share.proc.pid,
            "forked" if share.forked else "started",
            len(items),
        )
        return share

    def _downloads(self) -> Any:
        """The downloads' shared ``fetch.Session`` (made on first use)."""
        with self._session_lock:
            if self._session is None:
                from .fetch import Session

                self._session = Session(timeout=self._policy().timeout)
            return self._session

    @contextlib.asynccontextmanager
    async def _aclient(self) -> Any:
        """One AsyncClient per event loop, shared by the downloads in flight on it
        and closed when the last one ends (so no connection outlives its loop)."""
        import asyncio

        loop = asyncio.get_running_loop()
        entry = self._aclients.get(loop)
        if entry is None:
            from .fetch import new_async_client

            entry = self._aclients[loop] = [new_async_client(timeout=self._policy().timeout), 0]
        entry[1] += 1
        try:
            yield entry[0]
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._aclients[loop]
                await entry[0].aclose()

    async def aget(
        self,
        url: str,
        sha256: str | None = None,
        *,
        name: str | None = None,
        mirrors: Sequence[str] = (),
        dest: PathLike | None = None,
        link: str | LinkMode = LinkMode.AUTO,
        md5: str | None = None,
        size: int | None = None,
    ) -> Path:
        """``get`` for asyncio, downloading with an ``httpx.AsyncClient``.

        Same semantics and errors as ``get``.  Many ``aget`` of one digest at
        once (``asyncio.gather``) download it once: the first starts the work,
        the others await it; across processes the per-digest lock is taken in a
        worker thread.  Index reads and writes run in worker threads too.
        """
        import asyncio

        req = _request(
            url, sha256, name=name, mirrors=tuple(mirrors), dest=dest, md5=md5, size=size
        )
        mode = parse_mode(link)
        for _ in range(3):
            sha = await self._aflight(req)
            if req.dest is None:
                return self.layout.object_path(sha)
            try:
                linked = await asyncio.to_thread(self._link, sha, Path(req.dest), mode, force=False)
            except FileNotFoundError:
                continue  # gc evicted it between publish and link: fetch again
            return linked.dest
        raise CasError(f"object for {redact(req.url)} kept vanishing", url=redact(req.url))

    async def _aflight(self, req: Request) -> str:
        """The sha256 of ``req``'s object; one task per key and event loop does the work."""
        import asyncio

        loop = asyncio.get_running_loop()
        flights = self._aflights.setdefault(loop, {})
        key = _flight_key(req, req.sha256)
        task = flights.get(key)
        leader = task is None
        if task is None:
            task = flights[key] = loop.create_task(self._aensure(req))

            def landed(_: object) -> None:
                flights.pop(key, None)
                if not flights and self._aflights.get(loop) is flights:
                    del self._aflights[loop]

            task.add_done_callback(landed)
        sha = await asyncio.shield(task)
        if not leader:  # the leader recorded its own name and source
            await asyncio.to_thread(self._hit, sha, name=req.name, source=redact(req.url))
        return sha

    async def _aensure(self, req: Request) -> str:
        import asyncio

        from .locks import single_flight

        source = redact(req.url)
        known = await asyncio.to_thread(self._known, req)
        hit = lambda: known is not None and self._hit(known, name=req.name, source=source)  # noqa: E731
        if await asyncio.to_thread(hit):
            return known  # type: ignore[return-value]
        # The cross-process lock blocks, so it is taken and released in worker
        # threads (locks.py releases a lock from any thread).  A caller that
        # stops waiting (cancels) ends the worker's wait too, and the lock is
        # given back by whichever of the two comes second: never kept for
        # nobody, whether or not the loop runs again.
        gate = threading.Lock()
        cancelled, entered = [False], [False]
        flight = single_flight(
            self.layout,
            _flight_key(req, known),
            label=source,
            on_wait=log.warning,
            done=lambda: cancelled[0],
        )

        def enter() -> None:
            flight.__enter__()
            with gate:
                if cancelled[0]:
                    flight.__exit__()
                else:
                    entered[0] = True

        try:
            await asyncio.to_thread(enter)
        except asyncio.CancelledError:
            with gate:
                cancelled[0] = True
                if entered[0]:
                    flight.__exit__()
            raise
        try:
            if known is None:  # keyed by URL: the lock's last holder may have recorded it
                known = await asyncio.to_thread(self._known, req)
            if await asyncio.to_thread(hit):
                return known  # type: ignore[return-value]
            published, final_url = await self._adownload(req)
            return await asyncio.to_thread(self._record, req, published, final_url)
        finally:
            await asyncio.to_thread(flight.__exit__, None, None, None)

    def get_many(
        self,
        requests: Iterable[Request | tuple[str, str] | str],
        *,
        concurrency: int = 8,
        link: str | LinkMode = LinkMode.AUTO,
        processes: int | None = None,
    ) -> list[Path]:
        """``get`` each request, at most ``concurrency`` at a time (fewer where that
        is no slower: throttle.py); paths (or dests) in request order.

        Each digest is downloaded once however often it is asked for; all
        downloads share one connection pool.  Blocks; safe from many threads.

        Raises:
            InvalidInput: a malformed request (before anything is downloaded).
            BatchError: after every item was tried, if any failed; ``results``
                holds a Path or a CasError per request.
        """
        outcomes = self.ensure_many(
            requests, concurrency=concurrency, link=link, processes=processes
        )
        results = [o if isinstance(o, CasError) else (o.dest or o.path) for o in outcomes]
        failed = [r for r in results if isinstance(r, CasError)]
        if failed:
            raise BatchError(
                f"{len(failed)} of {len(results)} items failed; first: {failed[0]}",
                results=results,
            )
        return results  # type: ignore[return-value]

    def ensure_many(
        self,
        requests: Iterable[Request | tuple[str, str] | str],
        *,
        concurrency: int = 8,
        link: str | LinkMode = LinkMode.AUTO,
        on_done: Callable[[int, Artifact | CasError], None] | None = None,
        processes: int | None = None,
    ) -> list[Artifact | CasError]:
        """``ensure`` each request; an Artifact or the CasError per request, in order.

        Requests are grouped by digest (else md5, else URL) up front: a group
        runs in one worker, its first request downloads and the rest are hits
        that only record names and materialize their ``dest``.  A download
        that failed (DownloadError, IntegrityFailure) is the answer for the
        group's other requests from the same sources too, without asking the
        origin again; other errors (a bad ``dest``) stay with their item.
        ``on_done(i, outcome)`` is called from worker threads as each item
        finishes; index rows are written in groups after that, and an item
        whose row could not be written becomes a CasError in the results.

        Up to ``concurrency`` workers download at once; while the process is
        CPU-bound (small files from a fast origin) fewer run, as long as that
        is no slower (throttle.py).  Downloads are published in rounds
        (batch.py): each worker fsyncs its own temp, one committer links and
        fsyncs each directory once, and index rows are written in groups.  A worker only
        tries an artifact's lock; a group whose lock another process holds is
        put off until this batch holds no locks, then waits for it as ``get``
        does, so two batches over overlapping lists never wait on each other.

        A large batch of missing items may share them with a helper process
        (spread.py), which fetches from the far end while the workers go from
        the front, and counts as one of the ``concurrency``: automatic with
        ``processes`` None (``CASSTORE_PROCESSES``, else a spare core and at
        least 256 such items), never with 1 (say 1 where a test patches this
        process: a helper runs unpatched).

        Raises:
            InvalidInput: a malformed request, before anything is downloaded.
        """
        from .batch import GroupCommit
        from .throttle import Slot, Throttle

        reqs = [_coerce(r) for r in requests]
        mode = parse_mode(link)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(reqs):
            groups.setdefault(_flight_key(req, req.sha256), []).append(i)
        results: list[Artifact | CasError | None] = [None] * len(reqs)
        Failed = dict[tuple[str, ...], CasError]
        put_off: list[tuple[list[int], Failed]] = []
        put_off_lock = threading.Lock()

        def serve_group(
            indices: list[int],
            failed: Failed,
            committer: GroupCommit | None,
            slot: Slot,
            share: Share | None,
        ) -> None:
            fetched: Fetched | Exception | None = None
            if share is not None and committer is not None:
                # Handed to the helper: once it is done with it (another worker
                # may download meanwhile).
                fetched = share.take(indices[0], on_wait=slot.release)
                slot.hold()
            for n, i in enumerate(indices):
                req = reqs[i]
                sources = (req.url, *req.mirrors)
                outcome: Artifact | CasError | None
                if sources in failed:
                    outcome = failed[sources]
                else:
                    try:
                        if n == 0 and isinstance(fetched, Exception):
                            raise fetched  # the helper's try met what ours would: not asked again
                        if n == 0 and fetched is not None:  # by the helper: this name is ours
                            outcome = self._delivered(req, mode, committer)
                            slot.counts = False  # counted as the helper reported it
                        else:
                            outcome = self._ensure_retrying(req, mode, committer)
                    except (DownloadError, IntegrityFailure) as exc:
                        outcome = failed[sources] = exc  # the source's fault: shared
                    except CasError as exc:
                        outcome = exc  # e.g. this item's dest: its own
                    if outcome is None:  # another process holds its lock
                        with put_off_lock:
                            put_off.append((indices[n:], failed))
                        slot.counts = slot.counts and n > 0  # a put-off first item fetched nothing
                        return
                results[i] = outcome
                if n == 0 and isinstance(outcome, Artifact):
                    slot.bytes = outcome.size
                if on_done is not None:
                    on_done(i, outcome)

        def run(
            jobs: list[tuple[list[int], Failed]],
            committer: GroupCommit | None,
            share: Share | None = None,
        ) -> None:
            workers = max(1, min(concurrency, len(jobs)))
            # A helper is one of the ``concurrency``: one worker fewer while it lives
            # (it may outlive the first run: an item that outlasted the wait for it).
            throttle = Throttle(workers - 1 if share is not None else workers, jobs=len(jobs))
            if share is not None:
                share.when_gone(lambda: throttle.set_ceiling(workers))
                counts.append(throttle.count)
                if committer is not None:  # the first run: its jobs are the groups'
                    hurry.append(throttle.hurry)
            throttle.run(
                jobs,
                lambda job, slot: serve_group(*job, committer, slot, share),
                threads=workers,
                on_stop=share.stop if share is not None else None,
                on_thread_end=self.index.close,  # each worker's own connection
            )

        if reqs:
            jobs: list[tuple[list[int], Failed]] = [(g, {}) for g in groups.values()]
            committer = GroupCommit(self.layout, self.index)
            counts: list[Callable[[int], None]] = []  # the running throttle's count
            hurry: list[Callable[[object], None]] = []  # the first run's throttle's
            hurriable: list[dict[int, Any]] = []  # made at the helper's first report

            def helped(group: int, got: Fetched) -> None:
                """The helper has fetched ``group``'s object: its row is the batch's
                to write, whatever becomes of the item (from the share's thread)."""
                req = reqs[group]
                assert req.sha256 is not None
                committer.adopt(req.sha256, got.size, _row(req, got.blake3, None, got.url))
                if counts:
                    counts[-1](got.size)
                if hurry:
                    # Served now, not when the workers reach the far end of the
                    # list: on_done, and with it fetch's progress, follows the helper.
                    if not hurriable:
                        hurriable.append(_hurriable(reqs, jobs))
                    job = hurriable[0].get(group)
                    if job is not None:
                        hurry[0](job)

            share = self._share(reqs, [g for g, _ in jobs], concurrency, processes, helped)
            try:
                try:
                    run(jobs, committer, share)
                finally:
                    committer.close()  # (what the helper reports from now on is written at once)
                if put_off:  # every lock of this batch is released by now
                    run(put_off, None, share)
            finally:
                # After the put-off items: one the helper is still fetching is waited
                # for on its lock there, not fetched again from scratch.
                if share is not None:
                    share.close()
            if committer.unindexed:
                index_of: dict[int, int] = {}
                for i, req in enumerate(reqs):
                    index_of.setdefault(id(req), i)
                for sha, row, reason in committer.unindexed:
                    # The item that downloaded it, whatever its group's others did.
                    owner = index_of[id(row["request"])]
                    results[owner] = CasError(f"could not index {sha}: {reason}")
        return results  # type: ignore[return-value]

    # -- put -----------------------------------------------------------------

    def put(
        self, source: PathLike | bytes | BinaryIO | IO[bytes], *, name: str | None = None
    ) -> str:
        """Ingest a local file, bytes or a binary file object; return its sha256.

        Raises:
            InvalidInput: ``source`` is a path that cannot be opened.
        """
        if isinstance(source, str | os.PathLike):
            label = os.fspath(source)
            try:
                stream = open(source, "rb")  # noqa: SIM115
            except OSError as exc:
                raise InvalidInput(
                    f"cannot read {label}: {exc.strerror or exc}", path=label
                ) from exc
            with stream:
                published = self._put_stream(stream, label)
        elif isinstance(source, bytes | bytearray | memoryview):
            published = self._put_stream(io.BytesIO(source), "<bytes>")
        else:
            published = self._put_stream(source, str(getattr(source, "name", "<stream>")))
        self.index.record_object(
            published.sha256, published.size, blake3=published.blake3, name=name
        )
        return published.sha256

    def _put_stream(self, stream: IO[bytes], label: str) -> Published:
        from .ingest import Ingest

        with Ingest(self.layout) as ingest:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                ingest.write(chunk)
            return ingest.commit(source=label)

    # -- refs ----------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The sha256 of an object present on disk that ``ref`` names.

        Raises:
            InvalidInput / AmbiguousRef: malformed or ambiguous ref.
            NotFound: no such object (a dangling index row is dropped).
        """
        kind, value = parse_ref(ref)  # malformed refs fail before any disk work
        if not self._exists():  # reading must not lay out a store that is not there
            if kind == "name" and is_short_prefix(value):
                raise too_short(ref)
            raise NotFound(f"no object matches ref {ref!r} (no store at {self.root})", ref=ref)
        sha = resolve(ref, self.layout, self.index)
        if not self.layout.object_path(sha).exists():
            if self.index.get_object(sha) is not None:  # the row pointed at nothing: heal it
                self.index.forget_objects(
                    [sha], present=lambda s: self.layout.object_path(s).exists()
                )
            raise NotFound(f"no object matches ref {ref!r}", ref=ref)
        return sha

    def _exists(self) -> bool:
        return self.layout.objects.is_dir() or self.layout.index.exists()

    def path(self, ref: str) -> Path:
        """The object's path in the store (read-only; counts as a use)."""
        sha = self.resolve(ref)
        if not self._hit(sha):
            raise NotFound(f"no object matches ref {ref!r}", ref=ref)
        return self.layout.object_path(sha)

    def open(self, ref: str) -> BinaryIO:
        """The object opened for binary reading (counts as a use)."""
        return open(self.path(ref), "rb")

    def link(
        self,
        ref: str,
        dest: PathLike,
        *,
        link: str | LinkMode = LinkMode.AUTO,
        force: bool = False,
    ) -> LinkResult:
        """Materialize the object at ``dest`` and record the link.

        If gc evicts the object between lookup and link, it is fetched again
        from a recorded source (when it has one).

        Raises:
            InvalidInput: malformed ref or link mode.
            NotFound: no such object, or it vanished and has no source to refetch.
            LinkError (CasError): strict mode impossible, or ``dest`` has other content.
        """
        mode = parse_mode(link)
        sha = resolve(ref, self.layout, self.index)
        # Read before use: gc's eviction drops the sources with the object's row.
        sources = self.index.sources_of(sha)
        for attempt in range(3):
            try:
                if not self._hit(sha):
                    raise FileNotFoundError(sha)
                return self._link(sha, Path(dest), mode, force=force)
            except FileNotFoundError:
                if not sources or attempt == 2:
                    break
                log.info("object %s is gone (evicted?); fetching it again", sha)
                self.ensure(Request(sources[0], sha256=sha, mirrors=tuple(sources[1:])))
        self.resolve(ref)  # heals a row left pointing at nothing, raises NotFound
        raise NotFound(f"object {sha} vanished while linking to {dest}", ref=ref, path=str(dest))

    def _link(self, sha: str, dest: Path, mode: LinkMode, *, force: bool) -> LinkResult:
        """Raises FileNotFoundError when the object is gone (evicted meanwhile)."""
        obj = self.layout.object_path(sha)
        method = materialize(obj, dest, mode, sha256=sha, force=force)
        dest = Path(os.path.abspath(dest))
        if method == "copy" and mode == LinkMode.AUTO and first_copy_warning(dest.parent):
            log.warning("hardlinks impossible from the store to %s; copied instead", dest.parent)
        st = dest.lstat()
        # The object may have no row (a batch's row still queued, a lost index): the
        # link's transaction writes one.  FileNotFoundError: evicted, the caller refetches.
        self.index.record_link(str(dest), st.st_dev, st.st_ino, sha, method, str(obj))
        if method == "symlink":
            obj.stat()  # a symlink to an object evicted meanwhile would dangle
        return LinkResult(sha256=sha, dest=dest, method=method)

    # -- listing -------------------------------------------------------------

    def info(self, ref: str) -> ObjectInfo:
        sha = self.resolve(ref)
        row = self.index.describe(sha)
        if row is None:  # on disk, not indexed (lost index): index it now
            self._hit(sha)
            row = self.index.describe(sha) or {}
        obj = self.layout.object_path(sha)
        row["links"] = [{**lk, "live": is_live(lk, obj)} for lk in row.get("links", ())]
        return self._object_info(sha, row)

    def ls(self, pattern: str | None = None, *, order: str = "sha256") -> list[ObjectInfo]:
        """Indexed objects, optionally those with a name (or sha256) matching the glob
        ``pattern``; ``order`` is "sha256", "size" (largest first) or "used" (latest first).
        Each has its names; its sources and links are left empty (``info`` has them).

        Raises:
            InvalidInput: unknown ``order``.
        """
        if order not in ("sha256", "size", "used"):
            raise InvalidInput(f"unknown sort order {order!r}: choose sha256, size or used")
        if not self._exists():
            return []
        rows = self.index.list_objects(order=order)
        if pattern is not None:
            from fnmatch import fnmatchcase

            rows = [
                r
                for r in rows
                if fnmatchcase(r["sha256"], pattern)
                or any(fnmatchcase(n, pattern) for n in r["names"])
            ]
        return [self._object_info(r["sha256"], r) for r in rows]

    def _object_info(self, sha: str, row: dict) -> ObjectInfo:
        from .reports import ObjectInfo

        return ObjectInfo(
            sha256=sha,
            size=row.get("size", 0),
            path=self.layout.object_path(sha),
            blake3=row.get("blake3"),
            md5=row.get("md5"),
            created=row.get("created"),
            last_used=row.get("last_used"),
            pinned=bool(row.get("pinned")),
            names=tuple(row.get("names", ())),
            sources=tuple(row.get("sources", ())),
            links=tuple(row.get("links", ())),
        )

    def stats(self) -> Stats:
        """Totals; objects and bytes are counted on disk (the truth), the rest in the index."""
        from .reports import Stats

        if not self._exists():
            return Stats(
                objects=0,
                bytes=0,
                names=0,
                pinned=0,
                links=0,
                temp_files=0,
                saved_bytes=0,
                path=self.root,
            )
        totals = self.index.totals()
        count = size = saved = 0
        for _sha, path in self.layout.iter_objects():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            count += 1
            size += st.st_size
            saved += (st.st_nlink - 1) * st.st_size
        totals.update(objects=count, bytes=size)
        try:
            temps = len(os.listdir(self.layout.tmp))
        except FileNotFoundError:
            temps = 0
        return Stats(saved_bytes=saved, temp_files=temps, path=self.root, **totals)

    # -- maintenance ---------------------------------------------------------

    def gc(
        self,
        *,
        max_size: int | str | None = None,
        older_than: float | str | None = None,
        dry_run: bool = False,
        temp_grace: float | str | None = None,
    ) -> GcReport:
        """Reclaim space (SPEC §6); sizes like "10GB", ages like "30d" or seconds.

        Never evicts pinned or linked objects, nor any with more than one link;
        safe beside running gets, links and fetches.

        Raises:
            InvalidInput: a bad size or age (before any work).
        """
        from .gc import DEFAULT_TEMP_GRACE, collect
        from .units import parse_age, parse_size

        size = None if max_size is None else parse_size(max_size)
        age = None if older_than is None else parse_age(older_than)
        grace = DEFAULT_TEMP_GRACE if temp_grace is None else parse_age(temp_grace)
        return collect(
            self.layout,
            self.index,
            max_size=size,
            older_than=age,
            dry_run=dry_run,
            temp_grace=grace,
        )

    def verify(
        self, *, fast: bool = False, repair: bool = False, progress: Any = None
    ) -> VerifyReport:
        """Re-hash every object (SPEC §7); ``fast`` compares blake3 and size instead.

        Returns a report; ``report.unrepaired`` lists corrupt objects still in
        the store.  ``repair`` quarantines corrupt objects, restores modes,
        indexes orphans (rebuilding a lost index) and drops dangling rows.
        """
        from .verify import run

        return run(self.layout, self.index, fast=fast, repair=repair, progress=progress)

    # -- pins and removal ----------------------------------------------------

    def pin(self, ref: str) -> str:
        """Keep the object from gc; returns its sha256."""
        return self._set_pinned(ref, True)

    def unpin(self, ref: str) -> str:
        return self._set_pinned(ref, False)

    def _set_pinned(self, ref: str, pinned: bool) -> str:
        sha = self.resolve(ref)
        self._hit(sha)
        self.index.set_pinned(sha, pinned)
        return sha

    def rm(self, ref: str, *, force: bool = False) -> str:
        """Remove a name, or an object named by digest or prefix.

        An object with live links is refused unless ``force``.  Returns what
        was removed ("name" or "object").
        """
        kind, _ = parse_ref(ref)
        # A name wins over a digest prefix that happens to spell it: removing a
        # name is the harmless reading of `rm cafebabe`.  One DELETE decides,
        # so a name another process re-adds meanwhile never turns this into
        # removing its object.
        if kind != "sha256" and self._exists() and self.index.remove_name(ref.strip()):
            return "name"
        if kind == "name":  # never an object: say what resolve says of a missing name
            raise (
                too_short(ref)
                if is_short_prefix(ref.strip())
                else NotFound(f"no object matches ref {ref!r}", ref=ref)
            )
        sha = self.resolve(ref)
        obj = self.layout.object_path(sha)
        live = [lk["path"] for lk in self.index.links_of(sha) if is_live(lk, obj)]
        if live and not force:
            raise InvalidInput(
                f"object {sha} has {len(live)} live link(s), e.g. {live[0]}; use --force",
                ref=ref,
                path=live[0],
            )
        from .locks import single_flight

        # Under the artifact's lock, as gc evicts: a get that is downloading and
        # materializing this object finishes first instead of losing it midway.
        with single_flight(self.layout, sha, label=sha, on_wait=log.warning):
            try:
                os.unlink(self.layout.object_path(sha))
            except FileNotFoundError:
                pass
            self.index.forget_object(sha)
        return "object"


@contextlib.contextmanager
def _lock_now(layout: Layout, key: str, *, label: str) -> Iterator[bool | None]:
    """The artifact lock if it is free now: yields True (held), False (locking is
    off: go on without it) or None (another holds it, or it cannot be taken:
    the caller takes the waiting path instead)."""
    from .locks import lock_timeout, single_flight

    if lock_timeout() <= 0:
        yield False
        return
    with single_flight(layout, key, label=label, wait=False) as held:
        yield True if held else None


def _hurriable(reqs: list[Request], jobs: list[Any]) -> dict[int, Any]:
    """By its item, each job ``ensure_many`` may serve out of batch order once
    the helper has fetched it: one item that gives no URL, name or destination
    another item also gives (where two do, the last one recorded wins, and
    batch order decides which that is)."""
    from collections import Counter

    urls = Counter(req.url for req in reqs)
    names = Counter(req.name for req in reqs if req.name is not None)
    # (As given, with no syscall each: two spellings of one path count as two.)
    dests = Counter(str(req.dest) for req in reqs if req.dest is not None)
    out = {}
    for job in jobs:
        (i, *more) = job[0]
        req = reqs[i]
        if (
            not more
            and urls[req.url] == 1
            and (req.name is None or names[req.name] == 1)
            and (req.dest is None or dests[str(req.dest)] == 1)
        ):
            out[i] = job
    return out


def _row(req: Request, blake3: str, md5: str | None, final_url: str) -> dict[str, Any]:
    """A fresh download's index row options, as ``_record`` writes them one at a time."""
    source = redact(req.url)
    final = redact(final_url)
    return {
        "request": req,  # not a column: which item to fail if the row cannot be written
        "blake3": blake3,
        "md5": md5,
        "name": req.name,
        "source": source,
        "also_source": final if final_url != req.url and final != source else None,
    }


def _warn_trusted(req: Request, sha256: str) -> None:
    if req.sha256 is None and req.md5 is None:
        log.warning("trusting %s on first use: sha256 %s", redact(req.url), sha256)


def _flight_key(req: Request, known: str | None) -> str:
    """The single-flight key: the digest when known, else the md5 (one lock per
    content, whichever mirror serves it), else the (redacted) URL's hash."""
    if known is not None:
        return known
    if req.md5 is not None:
        return "md5-" + req.md5
    return "url-" + hashlib.sha256(redact(req.url).encode()).hexdigest()


def _all_failed(req: Request, failures: list[CasError]) -> CasError:
    """The error when no source worked: exit 3 only if every source served wrong bytes;
    the message names each source (redacted, inside each reason) and why it failed."""
    if len(failures) == 1:
        return failures[0]
    reasons = "; ".join(map(str, failures))
    if all(isinstance(e, IntegrityFailure) for e in failures):
        return type(failures[-1])(
            f"every source served wrong bytes: {reasons}",
            url=redact(req.url),
            errors=[str(e) for e in failures],
        )
    return DownloadError(
        f"every source failed: {reasons}", url=redact(req.url), errors=[str(e) for e in failures]
    )


def _request(
    url: str,
    sha256: str | None,
    *,
    name: str | None = None,
    mirrors: tuple[str, ...] = (),
    dest: PathLike | None = None,
    md5: str | None = None,
    size: int | None = None,
) -> Request:
    """A checked Request; raises InvalidInput before any I/O."""
    for u in (url, *mirrors):
        check_url(u)
    if size is not None and size < 0:
        raise InvalidInput(f"invalid size {size} for {redact(url)}", url=redact(url))
    return Request(
        url=url,
        sha256=parse_sha256(sha256) if sha256 else None,
        name=name,
        mirrors=mirrors,
        dest=os.fspath(dest) if dest is not None else None,
        md5=parse_md5(md5) if md5 else None,
        size=size,
    )


def _coerce(item: Request | tuple[str, str] | str) -> Request:
    if isinstance(item, Request):
        r = item
    elif isinstance(item, str):
        r = Request(item)
    else:
        r = Request(*item)
    return _request(
        r.url, r.sha256, name=r.name, mirrors=tuple(r.mirrors), dest=r.dest, md5=r.md5, size=r.size
    )
