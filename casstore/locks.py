"""Per-artifact single-flight locks.

Locks only save bandwidth: correctness comes from unique temps and an
idempotent publish (ingest.py), so a lock that is not granted in time is
skipped and the caller downloads anyway.  That keeps casstore working on
filesystems whose locks lie (NFS, Lustre grant everyone) or hang.

Each lock is an ``flock`` on ``locks/<key>.lock`` through filelock, one open
file per acquisition, so threads of one process exclude each other too
(``fcntl.lockf`` would not).  Lock files are never unlinked here; gc removes
one only while holding it, and filelock re-checks the inode after acquiring.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .layout import Layout

DEFAULT_TIMEOUT = 600.0
# A wait longer than this is announced, naming the artifact (uv#16112 hung silently).
ANNOUNCE_AFTER = 1.0


def lock_timeout() -> float:
    """Seconds to wait for a lock before going on without it (``CASSTORE_LOCK_TIMEOUT``).

    ``0`` skips locking altogether: every caller downloads, only bandwidth is lost.
    """
    value = os.environ.get("CASSTORE_LOCK_TIMEOUT")
    try:
        return float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT


@contextmanager
def single_flight(
    layout: Layout,
    key: str,
    *,
    label: str,
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[bool]:
    """Hold the lock for ``key`` while the block runs; yields whether it is held.

    Blocks the calling thread.  ``on_wait`` gets one message when the wait
    passes a second, and one if the lock is given up on.
    """
    timeout = lock_timeout() if timeout is None else timeout
    if timeout <= 0:
        yield False
        return
    from filelock import FileLock, Timeout

    layout.ensure()
    lock = FileLock(layout.lock_path(key), thread_local=False)
    held = _acquire(lock, Timeout, label=label, timeout=timeout, on_wait=on_wait)
    try:
        yield held
    finally:
        if held:
            lock.release()


def _acquire(lock, timeout_error, *, label: str, timeout: float, on_wait) -> bool:
    """Try for ``timeout`` seconds, announcing a wait past ANNOUNCE_AFTER; True if held."""
    start = time.monotonic()
    try:
        try:
            lock.acquire(timeout=min(ANNOUNCE_AFTER, timeout), poll_interval=0.01)
            return True
        except timeout_error:
            pass
        if on_wait:
            on_wait(f"waiting for another process to fetch {label}")
        try:
            lock.acquire(timeout=max(0.0, timeout - (time.monotonic() - start)), poll_interval=0.05)
            return True
        except timeout_error:
            if on_wait:
                on_wait(f"lock for {label} not granted after {timeout:g}s; going on without it")
            return False
    except OSError as exc:
        # A read-only locks/ or a filesystem refusing locks: locks only spare
        # bandwidth, so go on without one rather than fail the get.
        if on_wait:
            on_wait(f"cannot lock {label} ({exc.strerror or exc}); going on without a lock")
        return False
