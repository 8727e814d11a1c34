"""The wheel ships migrations/ and finds it at run time."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_installed_wheel_finds_its_migrations(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr.decode()
    (wheel,) = wheels.glob("casstore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "casstore/migrations/0001_initial.sql" in names
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    code = (
        "import casstore, casstore.index as i, sys;"
        "print(casstore.__file__); print(i.migrations_dir());"
        "s = casstore.Store(sys.argv[1]); print(s.put(b'wheel'))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store")],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr.decode()
    module_file, migrations, digest = run.stdout.decode().split()
    assert module_file.startswith(str(target)) and migrations.startswith(str(target))
    assert len(digest) == 64
