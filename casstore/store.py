"""``Store``: the Python API, composing layout, ingest, index, fetch and link.

A Store is safe to share between threads (the index keeps a connection per
thread, httpx's client is thread-safe) and to open from many processes at
once: every write goes through a unique temp and an idempotent publish, and
locks only spare bandwidth.  Its methods mirror the command line one to one:

    get, get_many, aget, put, path, open, link, info, ls, stats, pin, unpin, rm

A cache hit by digest is a stat and one indexed read; it imports neither
httpx, blake3 nor sqlite-utils.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

from .errors import (
    BatchError,
    CasError,
    DownloadError,
    IntegrityFailure,
    InvalidInput,
    NotFound,
)
from .hashing import parse_md5, parse_sha256
from .index import Index
from .layout import Layout, default_root
from .link import materialize, parse_mode
from .models import Artifact, LinkMode, LinkResult, ObjectInfo, Published, Request, Stats
from .refs import parse_ref, resolve
from .urls import check_url, redact

log = logging.getLogger("casstore")
PathLike = str | os.PathLike[str]


class Store:
    """A content-addressed store rooted at ``root`` (default: ``$CASSTORE_DIR`` or
    the user cache dir).  Opening creates nothing; the first write lays out the
    directory."""

    def __init__(self, root: PathLike | None = None) -> None:
        self.layout = Layout(root if root is not None else default_root())
        self.root = self.layout.root
        self.index = Index(self.layout)
        self._client: Any = None  # httpx.Client, imported on first download
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
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
        req = _coerce(request)
        mode = parse_mode(link)
        for _ in range(3):
            sha = self._ensure(req)
            path = self.layout.object_path(sha)
            try:
                size = path.stat().st_size
                if req.dest is None:
                    return Artifact(sha256=sha, size=size, path=path)
                linked = self._link(sha, Path(req.dest), mode, force=False)
            except FileNotFoundError:
                continue  # gc evicted the object between publish and use: fetch again
            return Artifact(
                sha256=sha, size=size, path=path, dest=linked.dest, method=linked.method
            )
        raise CasError(f"object for {redact(req.url)} kept vanishing", url=redact(req.url))

    def _ensure(self, req: Request) -> str:
        """The sha256 of ``req``'s object, downloading it if the store lacks it."""
        source = redact(req.url)
        known = req.sha256
        if known is None and req.md5 is not None:
            known = self.index.lookup_md5(req.md5)
        elif known is None:
            known = self.index.lookup_source(source)  # trusted on an earlier use
        if known is not None and self._hit(known, name=req.name, source=source):
            return known
        from .locks import single_flight

        if known is not None:
            key = known
        elif req.md5 is not None:  # one lock per content, whichever mirror serves it
            key = "md5-" + req.md5
        else:
            key = "url-" + hashlib.sha256(source.encode()).hexdigest()
        with single_flight(self.layout, key, label=source, on_wait=log.warning):
            # Re-check under the lock: the holder we waited for may have fetched it.
            if known is None and req.sha256 is None and req.md5 is None:
                known = self.index.lookup_source(source)
            elif known is None and req.md5 is not None:
                known = self.index.lookup_md5(req.md5)
            if known is not None and self._hit(known, name=req.name, source=source):
                return known
            published, final_url = self._download(req)
            # Recorded before the lock is released, so a waiter keyed by URL
            # (trust on first use, md5) finds the row and does not download again.
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
        if req.sha256 is None and req.md5 is None:
            log.warning("trusting %s on first use: sha256 %s", source, published.sha256)
        return published.sha256

    def _hit(self, sha256: str, *, name: str | None = None, source: str | None = None) -> bool:
        """True if the object is present and sound as far as a stat can tell; records the use.

        An object whose size disagrees with its index row is quarantined and
        treated as a miss, never served.
        """
        path = self.layout.object_path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        row = self.index.get_object(sha256)
        if row is not None and row["size"] != st.st_size:
            from .ingest import quarantine

            log.warning("object %s has the wrong size; quarantined and fetching again", sha256)
            quarantine(self.layout, path)
            self.index.forget_object(sha256)
            return False
        self.index.record_use(sha256, st.st_size, name=name, source=source)
        return True

    def _download(self, req: Request) -> tuple[Published, str]:
        """Try each source in order; the first whose bytes verify is published."""
        from .fetch import download
        from .ingest import Ingest

        failures: list[CasError] = []
        for url in (req.url, *req.mirrors):
            try:
                with Ingest(self.layout, md5=req.md5 is not None, size_hint=req.size) as ingest:
                    fetched = download(url, ingest, client=self.client)
                    published = ingest.commit(
                        sha256=req.sha256, size=req.size, md5=req.md5, source=redact(url)
                    )
                return published, fetched.url
            except (DownloadError, IntegrityFailure) as exc:
                failures.append(exc)
                if req.mirrors:
                    log.warning("%s", exc)
        if len(failures) == 1:
            raise failures[0]
        if all(isinstance(e, IntegrityFailure) for e in failures):
            raise type(failures[-1])(
                "every source served wrong bytes: " + "; ".join(map(str, failures)),
                url=redact(req.url),
                errors=[str(e) for e in failures],
            )
        raise DownloadError(
            "every source failed: " + "; ".join(map(str, failures)),
            url=redact(req.url),
            errors=[str(e) for e in failures],
        )

    @property
    def client(self) -> Any:
        """The shared httpx client (created on first download)."""
        with self._client_lock:
            if self._client is None:
                from .fetch import new_client

                self._client = new_client()
            return self._client

    def get_many(
        self,
        requests: Iterable[Request | tuple[str, str] | str],
        *,
        concurrency: int = 8,
        link: str | LinkMode = LinkMode.AUTO,
    ) -> list[Path]:
        """``get`` each request, ``concurrency`` at a time; paths (or dests) in request order.

        Each digest is downloaded once however often it is asked for; all
        downloads share one connection pool.  Blocks; safe from many threads.

        Raises:
            InvalidInput: a malformed request (before anything is downloaded).
            BatchError: after every item was tried, if any failed; ``results``
                holds a Path or a CasError per request.
        """
        outcomes = self.ensure_many(requests, concurrency=concurrency, link=link)
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
    ) -> list[Artifact | CasError]:
        """``ensure`` each request; an Artifact or the CasError per request, in order.

        Requests are grouped by digest (else md5, else URL) up front: a group
        runs in one worker, its first request downloads and the rest are hits
        that only record names and materialize their ``dest``.  A download
        that failed (DownloadError, IntegrityFailure) is the answer for the
        group's other requests from the same sources too, without asking the
        origin again; other errors (a bad ``dest``) stay with their item.  ``on_done(i, outcome)``
        is called from worker threads as each item finishes.

        Raises:
            InvalidInput: a malformed request, before anything is downloaded.
        """
        from concurrent.futures import ThreadPoolExecutor

        reqs = [_coerce(r) for r in requests]
        mode = parse_mode(link)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(reqs):
            groups.setdefault(_group_key(req), []).append(i)
        results: list[Artifact | CasError | None] = [None] * len(reqs)

        def run_group(indices: list[int]) -> None:
            failed: dict[tuple[str, ...], CasError] = {}
            for i in indices:
                req = reqs[i]
                sources = (req.url, *req.mirrors)
                outcome: Artifact | CasError
                if sources in failed:
                    outcome = failed[sources]
                else:
                    try:
                        outcome = self.ensure(req, link=mode)
                    except (DownloadError, IntegrityFailure) as exc:
                        outcome = failed[sources] = exc  # the source's fault: shared
                    except CasError as exc:
                        outcome = exc  # e.g. this item's dest: its own
                results[i] = outcome
                if on_done is not None:
                    on_done(i, outcome)

        if reqs:
            workers = max(1, min(concurrency, len(groups)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="casstore") as pool:
                for future in [pool.submit(run_group, g) for g in groups.values()]:
                    future.result()
        return results  # type: ignore[return-value]

    # -- put -----------------------------------------------------------------

    def put(
        self, source: PathLike | bytes | BinaryIO | IO[bytes], *, name: str | None = None
    ) -> str:
        """Ingest a local file, bytes or a binary file object; return its sha256.

        Raises:
            InvalidInput: ``source`` is a path that cannot be read (checked first).
        """
        from .ingest import Ingest

        label = "<bytes>"
        opened: BinaryIO | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            stream: IO[bytes] = io.BytesIO(source)
        elif isinstance(source, str | os.PathLike):
            label = os.fspath(source)
            try:
                opened = stream = open(source, "rb")  # noqa: SIM115
            except OSError as exc:
                raise InvalidInput(
                    f"cannot read {label}: {exc.strerror or exc}", path=label
                ) from exc
        else:
            stream, label = source, getattr(source, "name", "<stream>")
        try:
            with Ingest(self.layout) as ingest:
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                readinto = getattr(stream, "readinto", None)
                while True:
                    if readinto is not None:
                        n = readinto(buf)
                        if not n:
                            break
                        ingest.write(view[:n])
                    else:
                        chunk = stream.read(1 << 20)
                        if not chunk:
                            break
                        ingest.write(chunk)
                published = ingest.commit(source=str(label))
        finally:
            if opened is not None:
                opened.close()
        self.index.record_object(
            published.sha256, published.size, blake3=published.blake3, name=name
        )
        return published.sha256

    # -- refs ----------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The sha256 of an object present on disk that ``ref`` names.

        Raises:
            InvalidInput / AmbiguousRef: malformed or ambiguous ref.
            NotFound: no such object (a dangling index row is dropped).
        """
        sha = resolve(ref, self.layout, self.index)
        if not self.layout.object_path(sha).exists():
            if self.index.get_object(sha) is not None:
                self.index.forget_object(sha)  # the row pointed at nothing: heal it
            raise NotFound(f"no object matches ref {ref!r}", ref=ref)
        return sha

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
        """Materialize the object at ``dest`` and record the link."""
        mode = parse_mode(link)
        sha = self.resolve(ref)
        self._hit(sha)
        try:
            return self._link(sha, Path(dest), mode, force=force)
        except FileNotFoundError:
            raise NotFound(f"object {sha} vanished while linking", ref=ref) from None

    def _link(self, sha: str, dest: Path, mode: LinkMode, *, force: bool) -> LinkResult:
        obj = self.layout.object_path(sha)
        method = materialize(obj, dest, mode, sha256=sha, force=force)
        if method == "copy" and mode == LinkMode.AUTO:
            log.warning("hardlinks impossible from the store to %s; copied instead", dest.parent)
        dest = Path(os.path.abspath(dest))
        st = dest.lstat()
        self.index.record_link(str(dest), st.st_dev, st.st_ino, sha, method)
        return LinkResult(sha256=sha, dest=dest, method=method)

    # -- listing -------------------------------------------------------------

    def info(self, ref: str) -> ObjectInfo:
        sha = self.resolve(ref)
        row = self.index.describe(sha)
        if row is None:  # on disk, not indexed (lost index): index it now
            self._hit(sha)
            row = self.index.describe(sha) or {}
        return self._object_info(sha, row)

    def ls(self, *, order: str = "sha256") -> list[ObjectInfo]:
        return [self._object_info(r["sha256"], r) for r in self.index.list_objects(order=order)]

    def _object_info(self, sha: str, row: dict) -> ObjectInfo:
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
        totals = self.index.totals()
        saved = 0
        for _sha, path in self.layout.iter_objects():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            saved += (st.st_nlink - 1) * st.st_size
        try:
            temps = len(os.listdir(self.layout.tmp))
        except FileNotFoundError:
            temps = 0
        return Stats(saved_bytes=saved, temp_files=temps, path=self.root, **totals)

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
        kind, value = parse_ref(ref)
        if kind == "name" and self.index.lookup_name(value) is not None:
            self.index.remove_name(value)
            return "name"
        sha = self.resolve(ref)
        live = [lk["path"] for lk in self.index.links_of(sha) if _is_live(lk, self.layout, sha)]
        if live and not force:
            raise InvalidInput(
                f"object {sha} has {len(live)} live link(s), e.g. {live[0]}; use --force",
                ref=ref,
                path=live[0],
            )
        try:
            os.unlink(self.layout.object_path(sha))
        except FileNotFoundError:
            pass
        self.index.forget_object(sha)
        return "object"


def _is_live(link: dict, layout: Layout, sha: str) -> bool:
    path = link["path"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if link["method"] == "symlink":
        return os.path.islink(path) and Path(os.readlink(path)) == layout.object_path(sha)
    return (st.st_dev, st.st_ino) == (link["device"], link["inode"])


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


def _group_key(req: Request) -> str:
    """What identifies one download in a batch: the digest, else md5, else the source."""
    if req.sha256:
        return req.sha256
    if req.md5:
        return "md5:" + req.md5
    return "url:" + redact(req.url)


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
