"""The shape of the package: layering, the lazy cache-hit path."""

from __future__ import annotations

import ast
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from casstore.hit import holder_note
from casstore.locks import leave_note

from .conftest import blob, import_probe, run_probed, sha, threads_in_flock

PACKAGE = Path(__file__).resolve().parent.parent / "casstore"
HEAVY = ("httpx", "blake3", "sqlite_utils", "rich", "yaml")
# Beyond HEAVY, what the fast path (hit.py) does without: each costs a process
# milliseconds (pathlib ~9, re ~2; typing pulls in re).
LIGHT_PATH_SKIPS = ("click", "casstore.store", "pathlib", "re", "typing", "urllib.parse")
# ~1 ms together, with the functools and collections they load.
THREADING = ("threading", "contextlib")
# A hit needs them, but a waiter that the holder's note serves (hit.py) does not.
SQLITE = ("_sqlite3", "functools")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.update(
                    [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                )
            elif node.module:
                found.add(node.module.split(".")[0])
    return found


def _modules() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}


def test_httpx_lives_in_fetch_only():
    users = {m for m, deps in _modules().items() if "httpx" in deps}
    assert users <= {"fetch"}, users


def test_sql_lives_in_index_only():
    users = {m for m, deps in _modules().items() if deps & {"sqlite3", "sqlite_utils"}}
    assert users <= {"index"}, users


def test_nothing_imports_the_command_line():
    users = {m for m, deps in _modules().items() if "cli" in deps and m != "__main__"}
    assert not users, users


def test_lower_layers_do_not_import_store():
    for module, deps in _modules().items():
        if module not in ("__init__", "cli", "store", "__main__", "conda", "lists", "spread"):
            assert "store" not in deps, f"{module} imports store"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("entry", "also_absent"),
    [("casstore.__main__", LIGHT_PATH_SKIPS + THREADING), ("casstore.cli", ())],
)
def test_cli_cache_hit_imports_no_heavy_module(tmp_path, origin, entry, also_absent):
    data = b"hit me"
    url = origin.add("/hit", data)
    env = {**os.environ, "CASSTORE_DIR": str(tmp_path / "s")}
    prime = subprocess.run(
        [sys.executable, "-m", "casstore", "get", url, "--sha256", sha(data)],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert prime.returncode == 0, prime.stderr
    hit = run_probed(entry, HEAVY + also_absent, "get", url, "--sha256", sha(data), env=env)
    assert hit.returncode == 0, hit.stderr
    assert hit.stdout.decode().strip().endswith(sha(data))
    assert "LOADED []" in hit.stderr.decode(), hit.stderr.decode()
    assert "IMPORTED" not in hit.stderr.decode(), hit.stderr.decode()
    assert origin.count("/hit") == 1


@pytest.mark.timeout(60)
def test_a_download_over_http_leaves_the_idna_codec_alone(tmp_path, origin):
    # getaddrinfo runs a str host through it: stringprep and unicodedata, ~1 ms.
    data = b"fetched by name"
    url = origin.add("/named", data)
    env = {**os.environ, "CASSTORE_DIR": str(tmp_path / "s")}
    got = run_probed(
        "casstore.__main__", ("encodings.idna",), "get", url, "--sha256", sha(data), env=env
    )
    assert got.returncode == 0, got.stderr
    assert got.stderr.decode().startswith("LOADED []\n")
    assert "IMPORTED" not in got.stderr.decode(), got.stderr.decode()
    assert origin.count("/named") == 1


def _reap(*procs: subprocess.Popen | None) -> None:
    """Kill what a failed test left running."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(60)
def test_get_waiting_on_another_download_stays_light(tmp_path, origin):
    """A crowd behind one download costs little more than a crowd of hits: the
    waiters wait before importing httpx, click or the Store, then serve the hit
    by the note the holder left in the lock file, without even sqlite3 (if
    they read it within the second: else from the index, as a hit would)."""
    data = blob(256 * 1024, seed=7)
    url = origin.add("/wait", data, gate_after=100_000, chunk=16 * 1024)
    route = origin.routes["/wait"]
    env = {**os.environ, "CASSTORE_DIR": str(tmp_path / "s")}
    cmd = ["get", url, "--sha256", sha(data)]
    holder = subprocess.Popen(
        [sys.executable, "-m", "casstore", *cmd], env=env, stdout=subprocess.PIPE
    )
    waiter = None
    try:
        assert route.sent_event.wait(30), "the first download never started"
        waiter = subprocess.Popen(
            [
                sys.executable,
                "-c",
                import_probe("casstore.__main__", HEAVY + LIGHT_PATH_SKIPS + THREADING + SQLITE),
                *cmd,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        loaded = waiter.stderr.readline().decode()
        # Announced after a second of waiting: by then it is past its imports.
        first_line = waiter.stderr.readline().decode()
        assert f"waiting for another process to fetch {url}" in first_line, first_line
        route.gate.set()
        out, err = waiter.communicate(timeout=30)
        holder.communicate(timeout=30)
        assert holder.returncode == 0
    finally:
        _reap(holder, waiter)
    assert waiter.returncode == 0, err
    assert out.decode().strip().endswith(sha(data))
    assert loaded == "LOADED []\n"
    imported = [line for line in err.decode().splitlines() if line.startswith("IMPORTED")]
    if _fresh(Path(out.decode().strip())):
        assert not imported, err.decode()
    else:  # a machine so loaded it woke the waiter over a second late
        assert set(imported) == {f"IMPORTED {m}" for m in SQLITE}, err.decode()
    assert origin.count("/wait") == 1


def _fresh(obj: Path) -> bool:
    """Whether the object at ``obj`` was written less than a second ago: then a
    waiter done by now neither saw it there unnoted for a second nor read its
    holder's note (written after it) over a second late."""
    return time.time() - obj.stat().st_mtime < 1.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "note",
    [
        "just written",
        "a second old",
        "from ahead of the clock",
        "of another file",
        "of an earlier publish",
        "for another URL",
        "with the index gone",
        "none",
    ],
)
def test_a_waiter_serves_by_the_note_only_of_its_object_and_url_just_indexed(
    store, tmp_path, origin, monkeypatch, note
):
    """Served by the holder's note, a waiter records nothing: only right, as
    SPEC §8 coarsens a last use to a second, if its URL is the one indexed
    for that very file within the second.  Else it looks the object up,
    recording its use and its URL."""
    data = b"noted object"
    url, other = origin.add("/n", data), origin.add("/m", data)
    holder, waiter = _waiter_behind_this_process(store, url, sha(data))
    try:
        # This process is the holder: it publishes under the lock it already has.
        monkeypatch.setenv("CASSTORE_LOCK_TIMEOUT", "0")
        obj = store.get(other if note == "for another URL" else url, sha256=sha(data))
        store.index.conn.execute("UPDATE objects SET last_used = last_used - 5")
        written = time.time()
        notes = {
            "a second old": holder_note(obj, written - 1.5, url),
            "from ahead of the clock": holder_note(obj, written + 5, url),
            "of another file": holder_note(tmp_path, written, url),
            "for another URL": holder_note(obj, written, other),
        }
        if note != "none":
            leave_note(store.layout, sha(data), notes.get(note, holder_note(obj, written, url)))
        if note == "of an earlier publish":  # removed and published again since: same inode
            os.utime(obj, ns=(0, os.stat(obj).st_mtime_ns + 1))
        used = store.index.get_object(sha(data))["last_used"]
        if note == "with the index gone":
            store.close()
            for suffix in ("", "-wal", "-shm"):
                (store.root / f"index.db{suffix}").unlink(missing_ok=True)
        os.close(holder)
        out, err = waiter.communicate(timeout=30)
    finally:
        _reap(waiter)
    assert waiter.returncode == 0, err
    assert out.decode().strip() == str(obj)
    looked_up = "IMPORTED _sqlite3" in err.decode()
    # A waiter served by the note leaves the last use as it is (the note's time
    # stands for it); one that looks the object up moves it, or indexes it anew.
    row = store.index.get_object(sha(data))
    assert row is not None and looked_up == (row["last_used"] > used)
    if note != "just written":
        assert looked_up
    elif _fresh(obj):
        assert not looked_up
    assert store.index.lookup_source(url) == sha(data)


def _waiter_behind_this_process(store, url: str, digest: str) -> tuple[int, subprocess.Popen]:
    """This process holding ``digest``'s lock (the descriptor), and a light
    ``casstore get`` (import_probe, watching sqlite3) blocked in flock behind it."""
    store.layout.ensure()
    holder = os.open(store.layout.lock_path(digest), os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            import_probe("casstore.__main__", ("_sqlite3",)),
            *("--store", str(store.root), "get", url, "--sha256", digest),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not threads_in_flock(waiter.pid):
        if waiter.poll() is not None or time.monotonic() > deadline:
            _reap(waiter)
            os.close(holder)
            raise AssertionError(f"the waiter never blocked in flock: {waiter.communicate()}")
        time.sleep(0.005)
    return holder, waiter


def _woken(pid: int) -> int:
    """How often the main thread of ``pid`` has gone to sleep: a waiter's does
    once per look at the lock's holder (locks.DONE_POLL)."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("holder", ["notes and lets go", "notes and keeps the lock", "never notes"])
def test_a_waiter_opens_the_index_only_for_an_object_kept_unnoted_a_second(
    store, origin, monkeypatch, holder
):
    """Between publishing and its note, a holder fsyncs and indexes: a waiter
    that looks meanwhile waits for the note rather than load sqlite3, and
    serves by it as soon as it is there, even while the holder keeps the lock
    (copying to a slow --dest, say).  Past a second unnoted (a batch's holder
    leaves no note), it goes on without waiting for the holder to let go, and
    looks the object up."""
    holder_notes = holder != "never notes"
    data = b"published, not yet noted"
    url = origin.add("/unnoted", data)
    holder_fd, waiter = _waiter_behind_this_process(store, url, sha(data))
    deadline = time.monotonic() + 30
    try:
        monkeypatch.setenv("CASSTORE_LOCK_TIMEOUT", "0")  # this process holds the lock
        obj = store.get(url, sha256=sha(data))
        if holder_notes:
            looks = _woken(waiter.pid)
            while _woken(waiter.pid) < looks + 2:  # it has looked at least once since
                assert waiter.poll() is None, waiter.communicate()
                assert time.monotonic() < deadline, "the waiter never looked"
                time.sleep(0.005)
            leave_note(store.layout, sha(data), holder_note(obj, time.time(), url))
            if holder == "notes and lets go":
                os.close(holder_fd)
        out, err = waiter.communicate(timeout=30)  # else while the lock is still held
    finally:
        try:
            os.close(holder_fd)
        except OSError:
            pass  # closed already: the holder let go
        _reap(waiter)
    assert waiter.returncode == 0, err
    assert out.decode().strip() == str(obj)
    looked_up = "IMPORTED _sqlite3" in err.decode()
    if not holder_notes:
        assert looked_up
    elif _fresh(obj):
        assert not looked_up, err.decode()


@pytest.mark.timeout(60)
def test_get_that_gives_up_waiting_downloads_without_waiting_again(tmp_path, origin):
    """Past CASSTORE_LOCK_TIMEOUT the light waiter hands over to the full command
    line, which downloads without the lock instead of waiting a second time."""
    data = blob(256 * 1024, seed=8)
    url = origin.add("/slow", data, gate_after=100_000, chunk=16 * 1024)
    route = origin.routes["/slow"]
    env = {**os.environ, "CASSTORE_DIR": str(tmp_path / "s"), "CASSTORE_LOCK_TIMEOUT": "1.5"}
    cmd = [sys.executable, "-m", "casstore", "get", url, "--sha256", sha(data)]
    holder = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    waiter = None
    try:
        assert route.sent_event.wait(30), "the first download never started"
        waiter = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert "waiting for another process" in waiter.stderr.readline().decode()
        assert "not granted after 1.5s" in waiter.stderr.readline().decode()
        # The waiter now downloads too; its request reaching the gate proves it.
        while origin.count("/slow") < 2:
            assert waiter.poll() is None, waiter.stderr.read()
            time.sleep(0.01)
        route.gate.set()
        out, err = waiter.communicate(timeout=30)
        assert holder.wait(30) == 0
    finally:
        _reap(holder, waiter)
    assert waiter.returncode == 0, err
    assert out.decode().strip().endswith(sha(data))
    assert "waiting" not in err.decode() and "not granted" not in err.decode(), err.decode()
    assert origin.count("/slow") == 2
