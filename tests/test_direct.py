"""The direct lane (direct.py): plain GETs over http.client, httpx for the rest.

What each request took is told by what the origin saw: the client's port (one
per connection), the headers, the request counts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from casstore import Store
from casstore.errors import DownloadError, HashMismatch

from .conftest import assert_store_consistent, blob, import_probe, sha
from .origin import Origin

pytestmark = pytest.mark.timeout(60)

DATA = blob(50_000, seed=21)
OTHER = blob(60_000, seed=22)


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setenv("CASSTORE_BACKOFF_MAX", "0.01")


@pytest.fixture
def second_origin():
    o = Origin()
    yield o
    o.close()


def test_a_kept_connection_the_server_dropped_is_replaced_at_once(store, store_dir, origin, caplog):
    first = origin.add("/first", DATA)
    dropped = origin.add("/dropped", OTHER, hangup_first=1)
    assert store.get(first, sha256=sha(DATA)).read_bytes() == DATA
    with caplog.at_level(logging.WARNING, logger="casstore"):
        assert store.get(dropped, sha256=sha(OTHER)).read_bytes() == OTHER
    a, b, c = origin.requests()
    assert b.port == a.port  # asked on the kept connection, which the origin hung up
    assert c.port != b.port and c.status == 200  # asked again on a new one, at once:
    assert "retry" not in caplog.text  # not an attempt of the retry policy
    assert_store_consistent(store_dir)


def test_a_new_connection_hung_up_is_an_attempt_retried(store, store_dir, origin, caplog):
    url = origin.add("/hangup", DATA, hangup_first=1)
    with caplog.at_level(logging.WARNING, logger="casstore"):
        assert store.get(url, sha256=sha(DATA)).read_bytes() == DATA
    assert origin.count("/hangup") == 2
    assert "retry 1 of 3" in caplog.text
    assert_store_consistent(store_dir)


def test_a_connection_with_bytes_left_unread_is_not_reused(store, store_dir, origin):
    # The origin sends 10 bytes more than its Content-Length: they stay on the connection.
    long = origin.add("/long", DATA, content_length=len(DATA) - 10)
    after = origin.add("/after", OTHER)
    with pytest.raises(HashMismatch):
        store.get(long, sha256=sha(DATA))
    assert store.get(after, sha256=sha(OTHER)).read_bytes() == OTHER
    a, b = origin.requests()
    assert b.port != a.port
    assert_store_consistent(store_dir)


def test_a_redirect_to_credentials_goes_on_through_httpx(store, store_dir, origin):
    secret = origin.add("/secret", DATA, auth=("bob", "pw"))
    url = origin.add("/start", redirect_to=secret.replace("http://", "http://bob:pw@"))
    assert store.get(url, sha256=sha(DATA)).read_bytes() == DATA
    assert [(s.path, s.status) for s in origin.requests()] == [("/start", 302), ("/secret", 200)]
    assert_store_consistent(store_dir)


@pytest.mark.parametrize("direct", ["1", "0"], ids=["http.client", "httpx"])
def test_authorization_is_dropped_on_a_redirect_to_another_origin(
    store_dir, origin, second_origin, monkeypatch, direct
):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    final = second_origin.add("/final", DATA)
    hop = origin.add("/hop", redirect_to=final)
    start = origin.add("/start", redirect_to=hop)
    with Store(store_dir, headers={"Authorization": "Bearer t0ken"}) as s:
        assert s.get(start, sha256=sha(DATA)).read_bytes() == DATA
    here = origin.requests()
    assert [r.path for r in here] == ["/start", "/hop"]
    assert all(r.headers.get("authorization") == "Bearer t0ken" for r in here)  # same origin
    (there,) = second_origin.requests()
    assert "authorization" not in there.headers
    assert_store_consistent(store_dir)


@pytest.mark.parametrize("direct", ["1", "0"], ids=["http.client", "httpx"])
def test_what_goes_on_the_wire_is_the_same_either_way(store_dir, origin, monkeypatch, direct):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    url = origin.add("/wire", DATA)
    with Store(store_dir, headers={"X-Token": "abc"}) as s:
        s.get(url + "?q=1", sha256=sha(DATA))
    (seen,) = origin.requests()
    assert seen.path == "/wire"
    headers = dict(seen.headers)
    assert headers.pop("host") == f"127.0.0.1:{origin.port}"
    assert headers.pop("user-agent").startswith("casstore/")
    assert headers == {
        "accept": "*/*",
        "accept-encoding": "identity",
        "connection": "keep-alive",
        "x-token": "abc",
    }


@pytest.mark.timeout(60)
def test_a_cold_get_of_a_plain_url_never_imports_httpx(tmp_path, origin):
    url = origin.add("/cold", DATA)
    env = {**os.environ, "CASSTORE_DIR": str(tmp_path / "s")}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            import_probe("casstore.__main__", ("httpx",)),
            "get",
            url,
            "--sha256",
            sha(DATA),
        ],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "IMPORTED httpx" not in r.stderr.decode()
    assert origin.count("/cold") == 1


def test_a_forked_child_never_uses_the_parents_connections(store, store_dir, origin):
    third = blob(70_000, seed=23)
    a, b, c = (origin.add(p, d) for p, d in (("/a", DATA), ("/b", OTHER), ("/c", third)))
    assert store.get(a, sha256=sha(DATA)).read_bytes() == DATA  # its connection is kept
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if store.get(b, sha256=sha(OTHER)).read_bytes() == OTHER else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get(c, sha256=sha(third)).read_bytes() == third
    first, child, parent = (origin.requests(p)[0] for p in ("/a", "/b", "/c"))
    assert child.port != first.port  # the child connected afresh
    assert parent.port == first.port  # the parent's connection is still its own
    assert_store_consistent(store_dir)


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/pkg.tar", "http://127.0.0.1:port/x"])
def test_a_redirect_to_an_odd_url_is_a_download_error(store, store_dir, origin, target):
    url = origin.add("/odd", redirect_to=target)
    with pytest.raises(DownloadError) as info:
        store.get(url, sha256=sha(DATA))
    assert info.value.exit_code == 4
    assert origin.count("/odd") == 1
    assert_store_consistent(store_dir)
