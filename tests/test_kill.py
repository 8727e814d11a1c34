"""SIGKILL of a downloader mid-transfer (SPEC §1 invariants 1 and 6).

The origin stalls the body at a chosen byte (``gate_after``); once it has
sent that much, a second process is started on the same artifact and we wait
for it to announce that it is waiting on the lock.  Then the first process is
killed: its flock dies with it, nothing of its body may appear under
``sha256/``, and the waiter takes over and succeeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from casstore import Store
from casstore.ingest import parse_temp_name

from .conftest import assert_store_consistent, blob, sha

pytestmark = pytest.mark.timeout(90)
SIZE = 256 * 1024


def _cli_get(store_dir, url: str, digest: str, stdout, stderr) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "casstore", "get", url, "--sha256", digest],
        env={**os.environ, "CASSTORE_DIR": str(store_dir)},
        stdout=stdout,
        stderr=stderr,
    )


def _wait_for_text(path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while text not in path.read_text():
        assert proc.poll() is None, f"process ended early: {path.read_text()}"
        assert time.monotonic() < deadline, f"never saw {text!r}"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "gate_after", [0, SIZE // 2, SIZE - 1], ids=["before-first-byte", "mid-body", "last-byte"]
)
def test_killed_downloader_leaves_nothing_and_a_waiter_takes_over(
    tmp_path, store_dir, origin, gate_after
):
    data = blob(SIZE, seed=gate_after)
    digest = sha(data)
    url = origin.add("/pkg.conda", data, gate_after=gate_after, chunk=16 * 1024)
    route = origin.routes["/pkg.conda"]
    first = _cli_get(store_dir, url, digest, subprocess.DEVNULL, subprocess.DEVNULL)
    waiter: subprocess.Popen | None = None
    waiter_err = tmp_path / "waiter.err"
    with open(waiter_err, "wb") as err:
        try:
            assert route.sent_event.wait(30), "the first download never started"
            waiter = _cli_get(store_dir, url, digest, subprocess.PIPE, err)
            # The lock-wait message reaches stderr after a second, naming the artifact.
            _wait_for_text(waiter_err, f"waiting for another process to fetch {url}", waiter)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            assert first.returncode == -signal.SIGKILL
            # Nothing partial published: the waiter is stalled by the same gate.
            assert not Store(store_dir).layout.object_path(digest).exists()
            assert not any(f for _, _, f in os.walk(store_dir / "sha256"))
            route.gate.set()
            out, _ = waiter.communicate(timeout=30)
        finally:
            for p in (first, waiter):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    assert waiter is not None and waiter.returncode == 0, waiter_err.read_text()
    obj = Store(store_dir).layout.object_path(digest)
    assert out.decode().strip() == str(obj)
    assert obj.read_bytes() == data
    assert origin.count("/pkg.conda") == 2
    # The dead writer's temp may remain (gc's job); nothing else does.
    temps = os.listdir(store_dir / "tmp")
    assert all(parse_temp_name(t)[1] == first.pid for t in temps), temps
    for t in temps:
        os.unlink(store_dir / "tmp" / t)
    with Store(store_dir) as store:
        assert store.get(url, sha256=digest) == obj
    assert origin.count("/pkg.conda") == 2
    assert_store_consistent(store_dir)
