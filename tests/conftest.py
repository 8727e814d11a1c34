from __future__ import annotations

import hashlib
import os
import pty
import select
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from casstore import Store

from .consistency import assert_store_consistent
from .origin import Origin

_ENV_TO_CLEAR = (
    "CASSTORE_DIR",
    "CASSTORE_LOCK_TIMEOUT",
    "CASSTORE_RETRIES",
    "CASSTORE_BACKOFF_MAX",
    "CASSTORE_DIRECT",
    "CASSTORE_PROCESSES",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "NETRC",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in _ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    # No ~/.netrc of the machine's may leak into requests.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir):
    s = Store(store_dir)
    yield s
    s.close()


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.close()


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible-ish bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def run_cli(store_dir):
    """Run ``python -m casstore`` against the test store; returns CompletedProcess."""

    def run(
        *args: str,
        input: bytes | None = None,
        env: dict | None = None,
        timeout=60,
        store: bool = True,
    ):
        full_env = {**os.environ, **(env or {})}
        if store:
            full_env["CASSTORE_DIR"] = str(store_dir)
        return subprocess.run(
            [sys.executable, "-m", "casstore", *args],
            input=input,
            capture_output=True,
            env=full_env,
            timeout=timeout,
        )

    return run


def run_in_pty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the command line with stdout and stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "casstore", *args], stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=30), out.decode(errors="replace")


__all__ = ["assert_store_consistent", "blob", "run_in_pty", "sha"]


def import_probe(entry: str, watched: tuple[str, ...]) -> str:
    """A program running casstore's ``main`` from ``entry`` that says on stderr
    which of ``watched`` it had loaded before (``LOADED [...]``) and each one it
    imports while running (``IMPORTED name``).  It reports as things happen,
    not on exit: a served hit leaves through ``os._exit``."""
    return (
        "import sys\n"
        f"watched = {watched!r}\n"
        "print('LOADED', sorted(m for m in watched if m in sys.modules), file=sys.stderr)\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in watched:\n"
        "            print('IMPORTED', name, file=sys.stderr, flush=True)\n"
        "sys.meta_path.insert(0, Watch())\n"
        f"from {entry} import main\n"
        "main()\n"
    )


def run_probed(
    entry: str, watched: tuple[str, ...], *args: str, **kwargs
) -> subprocess.CompletedProcess:
    """Run ``import_probe(entry, watched)`` with the command line ``args``; output captured."""
    return subprocess.run(
        [sys.executable, "-c", import_probe(entry, watched), *args],
        capture_output=True,
        timeout=30,
        **kwargs,
    )


def threads_in_flock(pid: int | str = "self") -> set[int]:
    """Native ids of the threads of process ``pid`` asleep in flock(2), read from
    /proc: a lock's waiters (locks._BlockedFlock) are bare threads, which
    threading does not list, and may be in another process."""
    asleep = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return asleep  # the process is gone
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                # Where flock sleeps: locks_lock_inode_wait (flock_lock_inode_wait
                # or flock_lock_file_wait in older kernels).
                if "lock_inode_wait" in (where := f.read()) or "flock" in where:
                    asleep.add(int(tid))
        except OSError:  # ENOENT, ESRCH: ended meanwhile
            pass
    return asleep


def refuse_rows(store, sha256: str) -> None:
    """Make the index refuse any row for ``sha256`` (a trigger, as a full disk
    or a broken index would)."""
    import sqlite3

    store.layout.ensure()
    store.index.conn  # noqa: B018 - create the schema
    db = sqlite3.connect(store.root / "index.db")
    try:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON objects "
            f"WHEN NEW.sha256 = '{sha256}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        db.commit()
    finally:
        db.close()


class HeldLock:
    """A thread holding the single-flight lock for ``key`` (as another process
    downloading that artifact would) from entry until ``let_go``."""

    def __init__(self, layout, key: str) -> None:
        from casstore.locks import single_flight

        self._held, self._release = threading.Event(), threading.Event()

        def hold() -> None:
            with single_flight(layout, key, label="other") as got:
                assert got
                self._held.set()
                self._release.wait(60)

        self._thread = threading.Thread(target=hold)

    def __enter__(self) -> HeldLock:
        self._thread.start()
        assert self._held.wait(30), "the holder never got the lock"
        return self

    def let_go(self) -> None:
        """Release the lock; returns once it is released."""
        self._release.set()
        self._thread.join(30)

    def __exit__(self, *exc: object) -> None:
        self.let_go()
