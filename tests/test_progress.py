"""The overall progress display of batches: drawn on a terminal only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import assert_store_consistent, blob, run_in_pty, sha

pytestmark = pytest.mark.timeout(120)


def _slow_list(origin, tmp_path, tag: str) -> str:
    lines = []
    for i in range(3):
        data = blob(120_000, seed=40 + i)
        url = origin.add(f"/{tag}{i}.bin", data, chunk=16_384, drip=0.05)  # ~0.4 s each
        lines.append(f"{url}#{sha(data)}")
    listing = tmp_path / f"{tag}.txt"
    listing.write_text("\n".join(lines) + "\n")
    return str(listing)


@pytest.mark.parametrize("flag", ["", "-q", "--json"])
def test_fetch_draws_one_overall_display_on_a_terminal_only(store_dir, origin, tmp_path, flag):
    env = {**os.environ, "CASSTORE_DIR": str(store_dir), "TERM": "xterm", "COLUMNS": "100"}
    listing = _slow_list(origin, tmp_path, "t")
    code, out = run_in_pty([*([flag] if flag else []), "fetch", listing, "-j", "1"], env)
    assert code == 0, out
    assert ("fetch" in out and "/3" in out) is not bool(flag), out
    assert_store_consistent(store_dir)
    if flag:
        return
    piped = subprocess.run(
        [sys.executable, "-m", "casstore", "fetch", _slow_list(origin, tmp_path, "p"), "-j", "1"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert piped.returncode == 0 and "/3" not in piped.stderr.decode()


def test_verify_draws_progress_on_a_terminal(store, store_dir):
    for i in range(3):
        store.put(blob(200_000, seed=i))
    env = {**os.environ, "CASSTORE_DIR": str(store_dir), "TERM": "xterm", "COLUMNS": "100"}
    code, out = run_in_pty(["verify"], env)
    assert code == 0, out
    assert "verify" in out and "checked 3 objects" in out
