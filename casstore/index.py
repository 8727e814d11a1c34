"""The SQLite index: the only module that speaks SQL.

The index is metadata (names, sources, links, pins, last use); the objects on
disk are the truth.  One connection per thread (and per process after a
fork), WAL, a long busy timeout, and every write in ``BEGIN IMMEDIATE``: a
deferred ``BEGIN`` fails its read-to-write upgrade without waiting.

The schema comes only from ``migrations/NNNN_name.sql``, each applied with
its record row in one transaction after re-checking under the write lock,
so two processes opening a new store never both apply 0001.

Cache hits use the standard library's sqlite3 alone; sqlite-utils (~85 ms to
import) is loaded for listings and maintenance only.  For them too the
connections are kept in ``_thread``'s thread-local, not ``threading``'s
(the same class; importing threading costs a process ~1 ms).
"""

from __future__ import annotations

import _thread
import os
import time

try:
    # The C module behind sqlite3: the same classes, without sqlite3.dbapi2's
    # date and time adapters (it imports datetime, ~1.3 ms of a ~15 ms cache
    # hit from the command line); times here are plain floats.
    import _sqlite3 as sqlite3
except ImportError:  # an interpreter that does not lay it out so
    import sqlite3

from .errors import CasError
from .layout import INDEX, make_dirs

TYPE_CHECKING = False  # not `typing`: the CLI hit path (hit.py) does not import it
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from types import TracebackType
    from typing import Any, NoReturn

    from .layout import Layout

BUSY_TIMEOUT_MS = 120_000
# A fresh object's row; an existing row keeps its digests and takes the new last use.
_UPSERT_OBJECT = (
    "INSERT INTO objects (sha256, size, blake3, md5, created, last_used) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET "
    "last_used = excluded.last_used, "
    "blake3 = coalesce(objects.blake3, excluded.blake3), "
    "md5 = coalesce(objects.md5, excluded.md5)"
)


class Migration:
    """``migrations/NNNN_name.sql``: applied in order of ``id``."""

    def __init__(self, id: int, name: str, path: str) -> None:
        self.id, self.name, self.path = id, name, path

    @property
    def sql(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()


def migrations_dir() -> str:
    """``migrations/`` inside an installed wheel, else at the top of a checkout.

    Plain strings: every index open (the CLI's cache hit too) looks here.
    """
    here = os.path.dirname(os.path.realpath(__file__))
    for candidate in (
        os.path.join(here, "migrations"),
        os.path.join(here, os.pardir, "migrations"),
    ):
        if os.path.isdir(candidate):
            return os.path.normpath(candidate)
    raise CasError(f"casstore's migrations/ folder is missing next to {here}", path=here)


def known_migrations() -> list[Migration]:
    """The migrations shipped, in order."""
    folder = migrations_dir()
    found = [
        Migration(*parsed, os.path.join(folder, name))
        for name in os.listdir(folder)
        if (parsed := _migration_name(name)) is not None
    ]
    return sorted(found, key=lambda m: m.id)


def _migration_name(file_name: str) -> tuple[int, str] | None:
    """(number, name) of ``NNNN_name.sql`` (name: a-z, 0-9, _), else None.

    Checked without ``re``: every index open (the CLI's cache hit too) lists
    the migrations, and importing ``re`` would cost that process ~2 ms.
    """
    number, _, rest = file_name.partition("_")
    stem, dot, ext = rest.partition(".")
    if not (len(number) == 4 and number.isascii() and number.isdigit() and dot and ext == "sql"):
        return None
    if not stem or not all(c == "_" or c.isdigit() or "a" <= c <= "z" for c in stem):
        return None
    return int(number), stem


def _statements(sql: str) -> Iterator[str]:
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise CasError("migration ends in an incomplete statement")


def _retry_busy(fn, deadline: float = BUSY_TIMEOUT_MS / 1000):
    """Call ``fn`` again while SQLite answers "locked"/"busy" without waiting.

    The busy handler does not cover every case: switching a new database to
    WAL, or reading while another connection recovers the WAL, returns
    SQLITE_BUSY at once.
    """
    end = time.monotonic() + deadline
    delay = 0.001
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if ("locked" not in text and "busy" not in text) or time.monotonic() > end:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class _Write:
    """``Index._write``'s transaction: BEGIN IMMEDIATE as the block starts; COMMIT
    as it ends, or ROLLBACK if it raised.  ``index`` names the index in the
    CasError an SQLite error becomes (None: raised as it is).  A class rather
    than contextlib.contextmanager, which a cache hit would import for nothing."""

    def __init__(self, conn: sqlite3.Connection, index: str | None) -> None:
        self.conn, self.index = conn, index

    def __enter__(self) -> sqlite3.Connection:
        try:
            # The busy timeout covers the wait for the write lock; a few busy states
            # (a WAL being recovered or reset by another process) answer at once,
            # so those are retried here rather than shown as "database is locked".
            _retry_busy(lambda: self.conn.execute("BEGIN IMMEDIATE"))
        except sqlite3.Error as exc:
            self._raise(exc)
        return self.conn

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException as failed:
                self._rollback()  # a failed COMMIT may leave it open
                self._raise(failed)
        self._rollback()
        if isinstance(exc, sqlite3.Error) and self.index is not None:
            self._raise(exc)

    def _rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _raise(self, exc: BaseException) -> NoReturn:
        if self.index is None or not isinstance(exc, sqlite3.Error):
            raise exc
        raise CasError(f"cannot write the index {self.index}: {exc}", path=self.index) from exc


class Index:
    """Per-store index; safe to share between threads (a connection each)."""

    def __init__(self, store: Layout | str) -> None:
        """``store``: its Layout, or its root as an absolute path string (the
        command line's cache-hit path, hit.py, which never imports pathlib)."""
        if isinstance(store, str):
            self.path: str | Path = os.path.join(store, INDEX)
            self._lay_out = lambda: make_dirs(store)
        else:
            self.path = store.index
            self._lay_out = store.ensure
        self._local = _thread._local()
        self._open_lock = _thread.allocate_lock()

    # -- connections -------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._connect()
            local.conn, local.pid = conn, os.getpid()
        return conn

    @property
    def db(self):
        """A sqlite_utils.Database over this thread's connection (imported on first use)."""
        local = self._local
        db = getattr(local, "db", None)
        if db is None or db.conn is not self.conn:
            import sqlite_utils

            db = local.db = sqlite_utils.Database(self.conn)
        return db

    def close(self) -> None:
        """Close the calling thread's connection (each thread opens its own).

        A thread that ends without closing its connection leaves it open until
        the garbage collector finds it (it sits in a reference cycle), which a
        command line that leaves without the interpreter's teardown never
        runs: the WAL would stay unchecked.  So casstore's own threads close
        theirs as they end (a batch's workers, its row timer, the thread
        reading its helper's reports).  Never another thread's: closing a
        connection while another thread runs a statement on it can crash the
        interpreter.
        """
        local = self._local
        conn = getattr(local, "conn", None)
        local.conn = None
        if conn is not None and local.pid == os.getpid():
            conn.close()  # (a forked parent's is not the child's to close)

    def _connect(self) -> sqlite3.Connection:
        self._lay_out()
        try:
            return _retry_busy(self._open)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise CasError(
                    f"cannot open index {self.path}: {exc}", path=str(self.path)
                ) from exc
            # Not a database (truncated, overwritten): keep it aside, start afresh.
            # Objects are the truth; `verify --repair` re-indexes them.
            with self._open_lock:
                self._set_aside()
            return _retry_busy(self._open)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.rename(f"{self.path}{suffix}", f"{self.path}.broken-{stamp}{suffix}")
            except FileNotFoundError:
                pass

    # -- migrations --------------------------------------------------------

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        try:
            row = conn.execute("SELECT max(id) FROM casstore_migrations").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise
        return row[0] or 0

    def _migrate(self, conn: sqlite3.Connection) -> None:
        migrations = known_migrations()
        latest = migrations[-1].id if migrations else 0
        current = self._schema_version(conn)
        if current > latest:
            raise CasError(
                f"index {self.path} has schema {current}, newer than this casstore knows "
                f"({latest}); upgrade casstore",
                path=str(self.path),
            )
        for migration in migrations:
            if migration.id <= current:
                continue
            with self._write(conn, raw=True):
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS casstore_migrations "
                    "(id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
                )
                # Re-check under the write lock: another process may have won.
                if self._schema_version(conn) >= migration.id:
                    continue
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO casstore_migrations (id, name, applied) VALUES (?, ?, ?)",
                    (migration.id, migration.name, time.time()),
                )

    # -- transactions ------------------------------------------------------

    def _write(self, conn: sqlite3.Connection | None = None, *, raw: bool = False) -> _Write:
        """A write transaction for a ``with`` block.  SQLite's errors (a full disk,
        a lock held past the busy timeout, a refused row) leave as a CasError
        naming the index, so that a batch fails the one item and the command line
        prints one line; ``raw`` keeps them as they are (migrations: opening tells
        a broken file by them)."""
        return _Write(conn or self.conn, None if raw else str(self.path))

    # -- objects -----------------------------------------------------------

    def get_object(self, sha256: str) -> dict[str, object] | None:
        row = self.conn.execute("SELECT * FROM objects WHERE sha256 = ?", (sha256,)).fetchone()
        return dict(row) if row else None

    def record_object(
        self,
        sha256: str,
        size: int,
        *,
        blake3: str | None = None,
        md5: str | None = None,
        name: str | None = None,
        source: str | None = None,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> None:
        """Insert or refresh an object's row, with its name and source, in one transaction."""
        now = time.time()
        with self._write() as conn:
            conn.execute(_UPSERT_OBJECT, (sha256, size, blake3, md5, now, now))
            self._record_name_source(conn, sha256, name, source, etag, last_modified, now)

    def record_objects(
        self,
        rows: list[tuple[str, int, dict[str, Any]]],
        *,
        present: Callable[[str], bool] | None = None,
    ) -> None:
        """``record_object`` for many fresh objects in one transaction (a batch's).

        Each row is (sha256, size, options) with ``record_object``'s keyword
        options, plus ``also_source``: a second URL (the final one after
        redirects) recorded for the same object.  ``present(sha256)``, if
        given, is asked inside the transaction, and a row whose object it
        says is gone is left out: gc unlinks an object before it takes the
        write lock to drop its row, so no row can come back without its file.
        """
        now = time.time()
        with self._write() as conn:
            for sha256, size, opts in rows:
                if present is not None and not present(sha256):
                    continue
                conn.execute(
                    _UPSERT_OBJECT, (sha256, size, opts.get("blake3"), opts.get("md5"), now, now)
                )
                self._record_name_source(
                    conn, sha256, opts.get("name"), opts.get("source"), None, None, now
                )
                if opts.get("also_source"):
                    self._record_name_source(
                        conn, sha256, None, opts["also_source"], None, None, now
                    )

    def record_use(
        self, sha256: str, size: int, *, name: str | None = None, source: str | None = None
    ) -> None:
        """A cache hit: move last use (coarsened to 1 s) and add a new name or source.

        Writes nothing when nothing changes, so a hot hit is one indexed read.
        """
        now = time.time()
        conn = self.conn
        row = conn.execute("SELECT last_used FROM objects WHERE sha256 = ?", (sha256,)).fetchone()
        need_name = (
            name is not None
            and not conn.execute(
                "SELECT 1 FROM names WHERE name = ? AND sha256 = ?", (name, sha256)
            ).fetchone()
        )
        need_source = (
            source is not None
            and not conn.execute(
                "SELECT 1 FROM sources WHERE url = ? AND sha256 = ?", (source, sha256)
            ).fetchone()
        )
        if row is not None and now - row[0] < 1.0 and not need_name and not need_source:
            return
        with self._write(conn):
            conn.execute(
                "INSERT INTO objects (sha256, size, created, last_used) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (sha256) DO UPDATE SET last_used = max(last_used, excluded.last_used)",
                (sha256, size, now, now),
            )
            self._record_name_source(
                conn,
                sha256,
                name if need_name else None,
                source if need_source else None,
                None,
                None,
                now,
            )

    @staticmethod
    def _record_name_source(conn, sha256, name, source, etag, last_modified, now) -> None:
        if name is not None:
            conn.execute(
                "INSERT INTO names (name, sha256, recorded) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, "
                "recorded = excluded.recorded",
                (name, sha256, now),
            )
        if source is not None:
            conn.execute(
                "INSERT INTO sources (url, sha256, etag, last_modified, recorded) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (url) DO UPDATE SET "
                "sha256 = excluded.sha256, etag = coalesce(excluded.etag, sources.etag), "
                "last_modified = coalesce(excluded.last_modified, sources.last_modified), "
                "recorded = excluded.recorded",
                (source, sha256, etag, last_modified, now),
            )

    def forget_object(self, sha256: str) -> None:
        """Drop an object's row and, by cascade, its names, sources and links."""
        with self._write() as conn:
            conn.execute("DELETE FROM objects WHERE sha256 = ?", (sha256,))

    def set_pinned(self, sha256: str, pinned: bool) -> bool:
        """Returns False when the object has no row."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE objects SET pinned = ? WHERE sha256 = ?", (int(pinned), sha256)
            )
        return cur.rowcount > 0

    # -- names and sources -------------------------------------------------

    def lookup_name(self, name: str) -> str | None:
        row = self.conn.execute("SELECT sha256 FROM names WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def lookup_source(self, url: str) -> str | None:
        row = self.conn.execute("SELECT sha256 FROM sources WHERE url = ?", (url,)).fetchone()
        return row[0] if row else None

    def lookup_md5(self, md5: str) -> str | None:
        row = self.conn.execute("SELECT sha256 FROM objects WHERE md5 = ?", (md5,)).fetchone()
        return row[0] if row else None

    def remove_name(self, name: str) -> bool:
        with self._write() as conn:
            cur = conn.execute("DELETE FROM names WHERE name = ?", (name,))
        return cur.rowcount > 0

    def match_prefix(self, prefix: str) -> list[str]:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = self.conn.execute(
            "SELECT sha256 FROM objects WHERE sha256 >= ? AND sha256 < ? LIMIT 20",
            (prefix, upper),
        ).fetchall()
        return [r[0] for r in rows]

    # -- links -------------------------------------------------------------

    def record_link(
        self, path: str, device: int, inode: int, sha256: str, method: str, object_path: str
    ) -> None:
        """Record a materialized destination of the object at ``object_path``, writing
        the object's row too if it has none (a batch's row still queued, a lost
        index), in one transaction.

        Raises:
            FileNotFoundError: the object is gone.  It is looked at inside the
                transaction, as ``record_objects``'s ``present`` is, so gc
                (unlink, then drop the row) can never leave a row behind it.
        """
        now = time.time()
        with self._write() as conn:
            size = os.stat(object_path).st_size
            conn.execute(
                "INSERT INTO objects (sha256, size, created, last_used) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (sha256) DO NOTHING",
                (sha256, size, now, now),
            )
            conn.execute(
                "INSERT INTO links (path, device, inode, sha256, method, recorded) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
                "device = excluded.device, inode = excluded.inode, sha256 = excluded.sha256, "
                "method = excluded.method, recorded = excluded.recorded",
                (path, device, inode, sha256, method, now),
            )

    def sources_of(self, sha256: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT url FROM sources WHERE sha256 = ? ORDER BY recorded DESC", (sha256,)
        )
        return [r[0] for r in rows]

    def links_of(self, sha256: str) -> list[dict[str, object]]:
        rows = self.conn.execute(
            "SELECT path, device, inode, method FROM links WHERE sha256 = ? ORDER BY path",
            (sha256,),
        )
        return [dict(r) for r in rows]

    # -- listings ----------------------------------------------------------

    def describe(self, sha256: str) -> dict[str, object] | None:
        """An object's row with its names, sources and links."""
        obj = self.get_object(sha256)
        if obj is None:
            return None
        conn = self.conn
        key = (sha256,)
        obj["names"] = [
            r[0] for r in conn.execute("SELECT name FROM names WHERE sha256 = ? ORDER BY 1", key)
        ]
        obj["sources"] = [
            r[0] for r in conn.execute("SELECT url FROM sources WHERE sha256 = ? ORDER BY 1", key)
        ]
        obj["links"] = self.links_of(sha256)
        return obj

    def list_objects(self, *, order: str = "sha256") -> list[dict[str, object]]:
        column = {"sha256": "sha256", "size": "size DESC", "used": "last_used DESC"}[order]
        names: dict[str, list[str]] = {}
        for row in self.db.query("SELECT sha256, name FROM names ORDER BY name"):
            names.setdefault(row["sha256"], []).append(row["name"])
        out = []
        for row in self.db["objects"].rows_where(order_by=column):
            row["names"] = names.get(row["sha256"], [])
            out.append(row)
        return out

    def totals(self) -> dict[str, int]:
        conn = self.conn
        objects, size, pinned = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(pinned), 0) FROM objects"
        ).fetchone()
        return {
            "objects": objects,
            "bytes": size,
            "pinned": pinned,
            "names": conn.execute("SELECT count(*) FROM names").fetchone()[0],
            "links": conn.execute("SELECT count(*) FROM links").fetchone()[0],
        }

    # -- maintenance (gc, verify) ------------------------------------------

    def object_rows(self) -> dict[str, dict[str, object]]:
        """Every object row by sha256 (size, blake3, last_used, pinned), in one read."""
        rows = self.conn.execute("SELECT sha256, size, blake3, last_used, pinned FROM objects")
        return {
            r[0]: {"size": r[1], "blake3": r[2], "last_used": r[3], "pinned": r[4]} for r in rows
        }

    def all_links(self) -> list[dict[str, object]]:
        rows = self.conn.execute("SELECT path, device, inode, sha256, method FROM links")
        return [dict(r) for r in rows]

    def forget_objects(
        self, sha256s: list[str], *, present: Callable[[str], bool] | None = None
    ) -> int:
        """Drop many object rows (and by cascade their names, sources, links) at once.

        ``present(sha256)``, if given, is asked inside each transaction and a row
        whose object it finds is kept: a writer may have published the object
        again, and committed its row, since the caller looked.
        """
        return self._delete_many("DELETE FROM objects WHERE sha256 = ?", sha256s, keep=present)

    def forget_links(self, paths: list[str]) -> int:
        return self._delete_many("DELETE FROM links WHERE path = ?", paths)

    def _delete_many(
        self, sql: str, keys: list[str], *, keep: Callable[[str], bool] | None = None
    ) -> int:
        done = 0
        for start in range(0, len(keys), 500):  # short transactions: writers keep going
            with self._write() as conn:
                for key in keys[start : start + 500]:
                    if keep is None or not keep(key):
                        done += conn.execute(sql, (key,)).rowcount
        return done

    def index_objects(
        self,
        rows: list[tuple[str, int, str | None, float]],
        *,
        present: Callable[[str], bool] | None = None,
    ) -> int:
        """Add rows for objects found on disk: (sha256, size, blake3, time of last use).

        An object that gained a row meanwhile keeps it; with ``present``, one gone
        meanwhile (asked inside the transaction, as ``record_objects`` does) gets none.
        """
        added = 0
        for start in range(0, len(rows), 500):
            with self._write() as conn:
                for sha256, size, blake3, when in rows[start : start + 500]:
                    if present is not None and not present(sha256):
                        continue
                    added += conn.execute(
                        "INSERT INTO objects (sha256, size, blake3, created, last_used) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                        (sha256, size, blake3, when, when),
                    ).rowcount
        return added

    def set_blake3(self, sha256: str, blake3: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE objects SET blake3 = ? WHERE sha256 = ? AND blake3 IS NULL",
                (blake3, sha256),
            )

    def broken_copies(self) -> list[Path]:
        """Index files set aside as unreadable (``index.db.broken-<time>``)."""
        from pathlib import Path

        path = Path(self.path)
        return sorted(path.parent.glob(path.name + ".broken-*[0-9]"))
