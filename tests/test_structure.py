"""The shape of the package: layering, the lazy cache-hit path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import blob, import_probe, run_probed, sha

PACKAGE = Path(__file__).resolve().parent.parent / "casstore"
HEAVY = ("httpx", "blake3", "sqlite_utils", "rich", "yaml")
# Beyond HEAVY, what the fast path (hit.py) does without: each costs a process
# milliseconds (pathlib ~9, re ~2; typing pulls in re).
LIGHT_PATH_SKIPS = ("click", "casstore.store", "pathlib", "re", "typing", "urllib.parse")


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
    [("casstore.__main__", LIGHT_PATH_SKIPS), ("casstore.cli", ())],
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


def _reap(*procs: subprocess.Popen | None) -> None:
    """Kill what a failed test left running."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(60)
def test_get_waiting_on_another_download_stays_light(tmp_path, origin):
    """A crowd behind one download costs little more than a crowd of hits: the
    waiters wait before importing httpx, click or the Store, then serve the hit."""
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
                import_probe("casstore.__main__", HEAVY + LIGHT_PATH_SKIPS),
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
    assert "IMPORTED" not in err.decode(), err.decode()
    assert origin.count("/wait") == 1


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
