"""Per-artifact single-flight locks.

Locks only save bandwidth: correctness comes from unique temps and an
idempotent publish (ingest.py), so a lock that is not granted in time is
skipped and the caller downloads anyway.  That keeps casstore working on
filesystems whose locks lie (NFS, Lustre grant everyone) or hang.

Each lock is an ``flock`` on ``locks/<key>.lock``, on a file opened for this
one acquisition, so threads of one process exclude each other too
(``fcntl.lockf`` would not), and the kernel drops it when its process dies.
Lock files are never unlinked here; gc removes one only while holding it, and
an acquirer re-checks after locking that the path still names its inode
(filelock#574: else two holders lock two different inodes).  This is what
filelock's UnixFileLock does, without its ~0.3 ms per acquisition, which
showed in batches of small files.

A waiter sleeps in a blocking ``flock`` on a thread of its own
(``_BlockedFlock``), so it gets the lock the moment the holder lets go and
can still stop waiting: at its timeout, or when ``done`` says the holder
published.  A forked child closes its copies of the locks other threads hold
or wait for (``_after_fork``), so a lock never outlives its holder's release.

A holder that has published and indexed an object may leave a note in the
lock file for its waiters (``leave_note``, ``read_note``): the command
line's waiters (hit.py) serve the object by it without opening the index.

The command line's waiters import this module, so it does without
``threading`` and ``contextlib`` (with the functools and collections they
load, ~1 ms of such a process's ~12): ``_thread`` has the lock, the thread
and the thread-local the waits need, and the context managers are classes.
"""

from __future__ import annotations

import _thread
import fcntl
import os
import time

TYPE_CHECKING = False  # not `typing`: the CLI hit path (hit.py) does not import it
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .layout import Layout

DEFAULT_TIMEOUT = 600.0
# A wait longer than this is announced, naming the artifact (uv#16112 hung silently).
ANNOUNCE_AFTER = 1.0

# Locks taken by hold_for_process, held (fd) until a single_flight takes the
# fd over, or given up on (None) for the rest of the process, by the lock
# file's (st_dev, st_ino): the two callers spell the store's path their own ways.
_process_locks: dict[tuple[int, int], int | None] = {}


def lock_timeout() -> float:
    """Seconds to wait for a lock before going on without it (``CASSTORE_LOCK_TIMEOUT``).

    ``0`` skips locking altogether: every caller downloads, only bandwidth is lost.
    """
    value = os.environ.get("CASSTORE_LOCK_TIMEOUT")
    try:
        return float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT


def single_flight(
    layout: Layout,
    key: str,
    *,
    label: str,
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    done: Callable[[], bool] | None = None,
    wait: bool = True,
) -> _Flight:
    """Hold the lock for ``key`` while the ``with`` block runs; ``as`` gives whether it is held.

    Blocks the calling thread.  ``on_wait`` gets one message when the wait
    passes a second, and one if the lock is given up on.  ``done`` is polled
    while waiting: once it is true (the holder published the object) the wait
    ends without the lock, so many waiters do not queue up one by one just to
    find the object there.  ``wait=False`` tries once: a batch's item whose
    lock is taken is put off rather than waited for.
    """

    def lock() -> tuple[bool, int | None]:
        path = layout.lock_path(key)
        if _process_locks:
            decided = _take_process_hold(path)
            if decided is not None:
                # The hold ends with this block, as this block's own lock would:
                # a crowd waiting behind the command line's download goes on as
                # soon as it has published, not when its process exits.
                return decided
        limit = lock_timeout() if timeout is None else timeout
        if limit <= 0:
            return False, None
        layout.ensure()
        fd = _acquire(path, label=label, timeout=limit if wait else 0.0, on_wait=on_wait, done=done)
        return fd is not None, fd

    return _Flight(lock)


def leave_note(layout: Layout, key: str, note: str) -> None:
    """Leave ``note`` in ``key``'s lock file for the processes waiting on it,
    in place of the last holder's.  Only while holding the lock: a waiter reads
    it while it waits, or once the lock is its own.  Best effort: a
    waiter without a note does the work the note would have spared it."""
    try:
        # A second descriptor on the file: closing it keeps the flock, which
        # belongs to the holder's own open file (fcntl locks would be lost).
        fd = os.open(layout.lock_path(key), os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        data = note.encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError:
        pass
    finally:
        os.close(fd)


def read_note(path: str) -> str:
    """The note the last holder of the lock file at ``path`` left; "" if none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, 4096).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def hold_for_process(
    path: str,
    *,
    label: str,
    on_wait: Callable[[str], None] | None = None,
    done: Callable[[], bool] | None = None,
    poll: Callable[[], bool] | None = None,
) -> bool:
    """Wait for the lock file at ``path`` as ``single_flight`` does, and keep it
    for this process's first ``single_flight`` block on it (or until the
    process exits); returns whether it is held.  ``done`` says whether the
    holder published, looked at once the wait ends; ``poll``, if given, is
    what is looked at while it lasts (else ``done``).

    For the command line's fast path (hit.py): a ``get`` that misses waits
    here, before importing httpx and the Store, so fifteen processes queued
    behind one download cost little more than fifteen cache hits.  The next
    ``single_flight`` on this lock in this process takes this outcome over
    instead of locking again (its own flock would wait on this one).  When
    ``done`` ends the wait nothing is kept: the caller looks again, and locks
    as usual if it must download after all.  The store must be laid out.
    """
    timeout = lock_timeout()
    if timeout <= 0:
        return False
    fd = _acquire(path, label=label, timeout=timeout, on_wait=on_wait, done=poll or done)
    try:
        published = done is not None and done()
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    if published:
        # Granted by a holder that published: let the next waiter in at once
        # rather than keep the lock until this process exits.
        if fd is not None:
            os.close(fd)
        return False
    try:
        st = os.stat(path) if fd is None else os.fstat(fd)
    except FileNotFoundError:
        return False  # gave up on a lock file gc has since removed: nothing to remember
    _process_locks[(st.st_dev, st.st_ino)] = fd  # None: given up on, so no second wait
    return fd is not None


def _take_process_hold(path: Path) -> tuple[bool, int | None] | None:
    """What hold_for_process decided for the lock at ``path``: (True, its
    descriptor), handed over for the caller to release; (False, None) if it gave
    up on that lock, which stays so, not to be waited for twice; None if it did
    not decide."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (st.st_dev, st.st_ino)
    if key not in _process_locks:
        return None
    fd = _process_locks[key]
    if fd is None:
        return False, None
    del _process_locks[key]
    return True, fd


def try_hold(layout: Layout, key: str) -> _Flight:
    """Take the lock for ``key`` if nobody holds it, without waiting, for the
    ``with`` block; ``as`` gives whether it is held.

    gc holds an artifact's lock while it evicts the object, and skips it when
    someone else holds it: a get publishes and materializes under that lock.
    """

    def lock() -> tuple[bool, int | None]:
        try:
            fd = _try_lock(layout.lock_path(key), create=False)
        except FileNotFoundError:
            # Nobody has locked it since the last gc.  Not creating a file per
            # object keeps eviction cheap; a get that locks it from now on
            # publishes a new inode, which gc's re-check sees as changed.
            return True, None
        except OSError:
            return True, None  # no lock to be had here: only the retries protect the getter
        return fd is not None, fd

    return _Flight(lock)


# Locks held in a ``with`` block, by descriptor, with the thread whose block it
# is.  A child forked meanwhile has only the forking thread: it closes its
# copies of the others (_after_fork), else the lock would outlive their release
# for as long as the child lives (a DataLoader worker, say).
_held: dict[int, int] = {}


class _Flight:
    """A ``with`` block holding the lock that ``lock`` takes: (whether held, its
    descriptor or None); the descriptor is closed, releasing the flock, as the
    block ends.  A class, not contextlib.contextmanager: see the module's doc."""

    def __init__(self, lock: Callable[[], tuple[bool, int | None]]) -> None:
        self._lock = lock
        self._fd: int | None = None

    def __enter__(self) -> bool:
        held, self._fd = self._lock()
        if self._fd is not None:
            _held[self._fd] = _thread.get_ident()
        return held

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            del _held[fd]
            os.close(fd)  # closing the only descriptor releases the flock

    def __del__(self) -> None:
        # A block entered and never ended (its caller dropped it midway): let
        # go with the object, as a generator's ``finally`` would, not only at
        # the process's exit.
        if self._fd is not None:
            try:
                self.__exit__()
            except (OSError, KeyError, TypeError):  # (TypeError: at interpreter shutdown)
                pass


def _acquire(path: str | Path, *, label: str, timeout: float, on_wait, done=None) -> int | None:
    """Wait up to ``timeout`` seconds for the lock, announcing a long wait; its fd or None."""
    start = time.monotonic()
    announced = False
    poll = DONE_POLL
    blocked: _BlockedFlock | None = None
    try:
        while True:
            try:
                if blocked is None:
                    fd = _try_lock(path)
                elif blocked.granted.is_set():
                    fd, blocked = blocked.take(path), None
                else:
                    fd = None
            except OSError as exc:
                return _without_lock(label, exc, on_wait)
            if fd is not None:
                return fd
            if done is not None and done():
                return None
            waited = time.monotonic() - start
            if not announced and waited >= ANNOUNCE_AFTER:
                announced = True
                if on_wait:
                    on_wait(f"waiting for another process to fetch {label}")
            if waited >= timeout:
                if on_wait:
                    on_wait(f"lock for {label} not granted after {timeout:g}s; going on without it")
                return None
            if blocked is None:
                try:
                    blocked = _BlockedFlock.on(path)
                except FileNotFoundError:
                    continue  # gc removed the file since we tried it: lock the new one
                except OSError as exc:
                    return _without_lock(label, exc, on_wait)
            pause = timeout - waited
            if done is not None:
                pause, poll = min(pause, poll), min(poll * 2, DONE_POLL_MAX)
            if not announced:
                pause = min(pause, ANNOUNCE_AFTER - waited)
            blocked.granted.wait(max(pause, 0.0))
    finally:
        if blocked is not None:
            blocked.abandon()


def _without_lock(label: str, exc: OSError, on_wait) -> None:
    # A read-only locks/, a filesystem refusing locks, no thread or descriptor
    # to wait with: locks only spare bandwidth, so go on without one rather
    # than fail the get.
    if on_wait:
        on_wait(f"cannot lock {label} ({exc.strerror or exc}); going on without it")


# How often a waiter looks whether the holder has published (``done``) while
# its flock waits: first after 50 ms, then twice as long each time up to
# 0.4 s.  Holders release the lock right after publishing (the command line's
# too: single_flight takes its hold over), which wakes the waiter at once, so
# looking only matters for one that keeps it longer (a slow copy to a
# ``--dest``); each look costs a waiter ~0.2 ms of CPU.
DONE_POLL, DONE_POLL_MAX = 0.05, 0.4

# Waits whose descriptor is still their thread's (not yet taken): a child
# forked meanwhile has no such thread, and closes its copies (_after_fork) so
# that the open file description, and a flock granted on it, dies with the
# parent's close rather than with the child.
_pending: set[_BlockedFlock] = set()
# Waits given up on while still blocked, by lock file (st_dev, st_ino): the
# next wait on that file takes one over rather than start another thread, so
# a holder that hangs through many timeouts costs one thread, not one each.
_parked: dict[tuple[int, int], list[_BlockedFlock]] = {}
_parked_lock = _thread.allocate_lock()  # taken after a wait's own mutex, never before


class _BlockedFlock:
    """A blocking flock on a thread of its own, so that a waiter gets the lock the
    moment it is released, without polling (a crowd of polling waiters cost
    ~15 ms of CPU each per second of waiting), and can still stop waiting.

    States, changed under ``_mutex``: "waiting" (a waiter owns it), "parked"
    (given up on while blocked: a later waiter may ``adopt`` it), "granted"
    (the flock returned; the owner may ``take`` the descriptor), "taken", and
    "closed".  The thread owns the descriptor until it is taken, so its number
    is never reused under the flock; a lock granted to a parked wait is
    released at once by the thread's close.
    """

    def __init__(self, path: str | Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._file = (st.st_dev, st.st_ino)
        self._mutex = _thread.allocate_lock()
        self._state = "waiting"
        self._error: OSError | None = None
        self.granted = _Flag()
        _pending.add(self)
        try:
            # A bare thread: like a daemon thread, it does not hold up an exit.
            _thread.start_new_thread(self._block, ())
        except RuntimeError as exc:  # no thread to be had
            _pending.discard(self)
            os.close(self._fd)
            raise OSError(f"cannot start a thread to wait for the lock: {exc}") from exc

    @classmethod
    def on(cls, path: str | Path) -> _BlockedFlock:
        """A wait on the lock file at ``path``: a parked one taken over, else a new one."""
        st = os.stat(path)
        while True:
            with _parked_lock:
                parked = _parked.get((st.st_dev, st.st_ino))
                if not parked:
                    return cls(path)
                blocked = parked.pop()
            if blocked._adopt():
                return blocked

    def _block(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:  # ENOLCK and the like: take() raises it
            self._error = exc
        with self._mutex:
            if self._state == "parked":
                self._close()
            else:
                self._state = "granted"
                self.granted.set()

    def _adopt(self) -> bool:
        with self._mutex:
            if self._state != "parked":
                return False
            self._state = "waiting"
            return True

    def take(self, path: str | Path) -> int | None:
        """Once ``granted``: the descriptor if it holds the lock of the file still
        at ``path``, None if gc replaced that file.  Raises the OSError that
        kept the flock (or the look at ``path``) from succeeding."""
        with self._mutex:
            self._state = "taken"
        _pending.discard(self)
        try:
            if self._error is not None:
                raise self._error
            if _names(path, self._fd):
                return self._fd
        except BaseException:
            os.close(self._fd)
            raise
        os.close(self._fd)
        return None

    def abandon(self) -> None:
        with self._mutex:
            if self._state == "waiting":
                self._state = "parked"
                with _parked_lock:
                    _parked.setdefault(self._file, []).append(self)
            elif self._state == "granted":
                self._close()

    def _close(self) -> None:
        """Close the descriptor (and so any lock on it); under ``_mutex``."""
        self._state = "closed"
        _pending.discard(self)
        with _parked_lock:
            parked = _parked.get(self._file, [])
            if self in parked:
                parked.remove(self)
            if not parked:
                _parked.pop(self._file, None)
        os.close(self._fd)


class _Flag:
    """threading.Event's ``set``, ``is_set`` and ``wait`` for one setting thread
    and one waiting thread: a lock held until it is set."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float) -> bool:
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True


def _after_fork() -> None:
    """In a forked child: close the descriptors of waits and held locks whose
    threads did not come along (see ``_pending`` and ``_held``)."""
    me = _thread.get_ident()
    for blocked in list(_pending):
        _close_quietly(blocked._fd)
    _pending.clear()
    global _parked_lock
    _parked_lock = _thread.allocate_lock()  # a thread that held it did not come along
    _parked.clear()
    for fd, owner in list(_held.items()):
        if owner != me:
            del _held[fd]
            _close_quietly(fd)


os.register_at_fork(after_in_child=_after_fork)


def _try_lock(path: str | Path, *, create: bool = True) -> int | None:
    """The locked descriptor of ``path``, or None if someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not _names(path, fd):
            os.close(fd)
            return None
        return fd
    except BaseException:
        _close_quietly(fd)
        raise


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _names(path: str | Path, fd: int) -> bool:
    """Whether ``path`` still names the file open at ``fd``.  gc may have
    unlinked it (while holding its lock): a lock on that orphan inode
    excludes nobody, so the caller tries again on the new file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)
