"""The shape of the package: layering, the lazy cache-hit path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import sha

PACKAGE = Path(__file__).resolve().parent.parent / "casstore"
HEAVY = ("httpx", "blake3", "sqlite_utils", "tenacity", "rich", "yaml")


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
        if module not in ("__init__", "cli", "store", "__main__", "conda", "lists"):
            assert "store" not in deps, f"{module} imports store"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("entry", "also_absent"),
    [("casstore.__main__", ("click", "casstore.store")), ("casstore.cli", ())],
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
    watched = HEAVY + also_absent
    probe = (
        "import sys, atexit\n"
        f"atexit.register(lambda: print('LOADED', sorted(m for m in {watched!r}"
        " if m in sys.modules), file=sys.stderr))\n"
        f"from {entry} import main\n"
        "main()\n"
    )
    hit = subprocess.run(
        [sys.executable, "-c", probe, "get", url, "--sha256", sha(data)],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert hit.returncode == 0, hit.stderr
    assert hit.stdout.decode().strip().endswith(sha(data))
    assert "LOADED []" in hit.stderr.decode(), hit.stderr.decode()
    assert origin.count("/hit") == 1
