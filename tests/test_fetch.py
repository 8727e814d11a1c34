"""Downloads against the fault-injecting origin (SPEC §5): retries, resume, size
checks, mirrors, redirects, auth, progress, async; request counts asserted."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys

import pytest

from casstore import Store
from casstore.errors import (
    CasError,
    DownloadError,
    HashMismatch,
    IntegrityFailure,
    InvalidInput,
    SizeMismatch,
)
from casstore.fetch import (
    SOCKET_MIN,
    Policy,
    Session,
    _content_range,
    _delay,
    _Retry,
    _retry_after,
    download,
    parse_header,
)

from .conftest import assert_store_consistent, blob, run_in_pty, sha
from .origin import Origin

pytestmark = pytest.mark.timeout(60)

DATA = blob(300_000, seed=4)
# Bodies under 1 MiB are written on the receiving thread, larger ones by a worker.
BIG = blob(3 * (1 << 20) + 17, seed=5)
# Above SOCKET_MIN, all but httpx's first chunk is read straight from the socket.
HUGE = blob(SOCKET_MIN + (2 << 20) + 123, seed=6)
CUT = SOCKET_MIN + 777_777  # past the first chunk, mid-buffer


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    # Backoff in tests is tiny; Retry-After from the origin is 0.
    monkeypatch.setenv("CASSTORE_BACKOFF_MAX", "0.01")


def _temps(store_dir) -> list[str]:
    tmp = store_dir / "tmp"
    return os.listdir(tmp) if tmp.exists() else []


# -- retries -------------------------------------------------------------------


def test_404_is_requested_once(store, store_dir, origin):
    with pytest.raises(DownloadError) as info:
        store.get(origin.url("/nope"), sha256=sha(DATA))
    assert info.value.status == 404
    assert origin.count("/nope") == 1
    assert "/nope" in str(info.value)
    assert _temps(store_dir) == []
    assert_store_consistent(store_dir)


def test_two_500s_then_ok_take_exactly_three_requests(store, store_dir, origin):
    url = origin.add("/flaky", DATA, fail_first=[500, 500])
    path = store.get(url, sha256=sha(DATA))
    assert path.read_bytes() == DATA
    assert origin.count("/flaky") == 3
    assert_store_consistent(store_dir)


def test_429_with_retry_after_is_retried(store, store_dir, origin):
    url = origin.add("/busy", DATA, fail_first=[429, 503])
    assert store.get(url, sha256=sha(DATA)).read_bytes() == DATA
    assert origin.count("/busy") == 3
    assert_store_consistent(store_dir)


def test_retries_run_out_into_a_download_error(store_dir, origin):
    url = origin.add("/down", DATA, fail_first=[503] * 10)
    with Store(store_dir, retries=2) as s, pytest.raises(DownloadError) as info:
        s.get(url, sha256=sha(DATA))
    assert origin.count("/down") == 3
    assert info.value.attempts == 3 and info.value.status == 503
    assert "after 3 attempt(s)" in str(info.value)
    assert _temps(store_dir) == []
    assert_store_consistent(store_dir)


def test_env_sets_retries(store, store_dir, origin, monkeypatch):
    monkeypatch.setenv("CASSTORE_RETRIES", "0")
    url = origin.add("/once", DATA, fail_first=[500])
    with pytest.raises(DownloadError):
        store.get(url, sha256=sha(DATA))
    assert origin.count("/once") == 1
    assert_store_consistent(store_dir)


def test_other_4xx_fail_at_once(store, store_dir, origin):
    url = origin.add("/gone", DATA, status=410)
    with pytest.raises(DownloadError):
        store.get(url, sha256=sha(DATA))
    assert origin.count("/gone") == 1
    assert_store_consistent(store_dir)


@pytest.mark.parametrize(("data", "cut"), [(DATA, 100_000), (HUGE, CUT)])
def test_read_timeout_is_retried_and_resumed(store_dir, origin, data, cut):
    route_url = origin.add("/stall", data, gate_after=cut, gate_once=True)
    with Store(store_dir, timeout=0.3) as s:
        assert s.get(route_url, sha256=sha(data)).read_bytes() == data
    seen = origin.requests("/stall")
    assert len(seen) == 2
    # Nothing received before the timeout is lost: each read returns what one
    # receive brought (direct.Response), so the resume starts where the bytes stopped.
    start = int(seen[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert start == cut
    assert_store_consistent(store_dir)


@pytest.mark.parametrize(("data", "cut"), [(DATA, 100_000), (HUGE, CUT)])
def test_connection_reset_mid_body_is_retried_and_resumed(store, store_dir, origin, data, cut):
    url = origin.add("/reset", data, truncate_at=cut, reset=True)
    assert store.get(url, sha256=sha(data)).read_bytes() == data
    seen = origin.requests("/reset")
    assert [s.status for s in seen] == [200, 206]
    # The reset may discard bytes still in flight: the resume starts at or before the cut.
    start = int(seen[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= cut
    assert_store_consistent(store_dir)


# -- resume and size checks ------------------------------------------------------


SIZES = [(DATA, 120_000), (BIG, 2_500_000), (HUGE, CUT)]


@pytest.mark.parametrize(("data", "cut"), SIZES)
def test_truncated_transfer_resumes_with_one_range_request(store, store_dir, origin, data, cut):
    url = origin.add("/cut", data, truncate_at=cut)
    assert store.get(url, sha256=sha(data)).read_bytes() == data
    seen = origin.requests("/cut")
    assert len(seen) == 2
    assert "range" not in seen[0].headers
    assert seen[1].headers["range"] == f"bytes={cut}-"
    assert seen[1].headers["if-range"] == origin.routes["/cut"].etag
    assert seen[1].status == 206
    assert origin.bytes_sent("/cut") == len(data)
    assert_store_consistent(store_dir)


def test_resume_uses_last_modified_without_a_strong_etag(store, store_dir, origin):
    lm = "Wed, 21 Oct 2015 07:28:00 GMT"
    url = origin.add("/lm", DATA, truncate_at=50_000, etag='W/"weak"', headers={})
    origin.routes["/lm"].headers["Last-Modified"] = lm
    assert store.get(url, sha256=sha(DATA)).read_bytes() == DATA
    seen = origin.requests("/lm")
    # The origin only honours If-Range equal to its ETag, so it answers 200: restart.
    assert seen[1].headers["if-range"] == lm
    assert seen[1].status == 200
    assert_store_consistent(store_dir)


@pytest.mark.parametrize(("data", "cut"), SIZES)
def test_without_range_support_restarts_and_still_verifies(store, store_dir, origin, data, cut):
    url = origin.add("/norange", data, truncate_at=cut, ranges=False)
    assert store.get(url, sha256=sha(data)).read_bytes() == data
    seen = origin.requests("/norange")
    assert [s.status for s in seen] == [200, 200]
    assert origin.bytes_sent("/norange") == cut + len(data)
    assert_store_consistent(store_dir)


def test_206_starting_elsewhere_restarts_from_zero(store, store_dir, origin):
    url = origin.add("/badrange", BIG, truncate_at=2_500_000, range_start=0)
    assert store.get(url, sha256=sha(BIG)).read_bytes() == BIG
    seen = origin.requests("/badrange")
    assert len(seen) == 3
    assert seen[1].status == 206 and seen[1].headers["range"] == "bytes=2500000-"
    assert "range" not in seen[2].headers and seen[2].status == 200
    assert_store_consistent(store_dir)


def test_short_transfer_after_retries_is_a_download_error(store_dir, origin):
    url = origin.add("/short", DATA, truncate_at=1000, truncate_times=10, ranges=False)
    with Store(store_dir, retries=1) as s, pytest.raises(DownloadError) as info:
        s.get(url, sha256=sha(DATA))
    assert origin.count("/short") == 2
    assert info.value.exit_code == 4
    assert _temps(store_dir) == [] and not list((store_dir / "sha256").rglob("*[0-9a-f]"))
    assert_store_consistent(store_dir)


@pytest.mark.parametrize("data", [DATA, HUGE])
def test_body_longer_than_content_length_is_never_published(store, store_dir, origin, data):
    url = origin.add("/long", data, content_length=len(data) - 10)
    with pytest.raises(HashMismatch):
        store.get(url, sha256=sha(data))
    assert not (store_dir / "sha256").exists() or not list((store_dir / "sha256").rglob("*"))[2:]
    assert _temps(store_dir) == []
    assert_store_consistent(store_dir)


def test_announced_size_other_than_expected_fails_before_the_body(store, store_dir, origin):
    url = origin.add("/sized", DATA, gate_after=1)
    with pytest.raises(SizeMismatch) as info:
        store.get(url, sha256=sha(DATA), size=len(DATA) + 1)
    assert info.value.exit_code == 3
    # The origin stalls after 1 byte until the test ends: the body was never read.
    assert origin.routes["/sized"].sent_event.wait(10)
    assert origin.bytes_sent("/sized") == 1
    assert_store_consistent(store_dir)


def test_chunked_body_longer_than_expected_size_is_cut_off(store, store_dir, origin):
    url = origin.add("/chunked", DATA, chunked=True)
    with pytest.raises(SizeMismatch) as info:
        store.get(url, size=len(DATA) - 5)
    assert info.value.expected == len(DATA) - 5
    assert _temps(store_dir) == []
    assert store.get(url, size=len(DATA)).read_bytes() == DATA  # right size: fine
    assert_store_consistent(store_dir)


def test_announced_size_beyond_free_space_is_refused(store, store_dir, origin):
    url = origin.add("/huge", DATA, content_length=1 << 60, gate_after=1)
    with pytest.raises(CasError, match="not enough free space"):
        store.get(url, sha256=sha(DATA))
    assert origin.count("/huge") == 1
    assert _temps(store_dir) == []
    assert_store_consistent(store_dir)


@pytest.mark.parametrize("size", [3 << 20, SOCKET_MIN + (1 << 20)])
def test_write_error_is_clear_and_removes_the_temp(run_cli, store_dir, origin, size):
    url = origin.add("/big", blob(size, seed=9))

    def limit_file_size():  # Python ignores SIGXFSZ, so write() fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = {**os.environ, "CASSTORE_DIR": str(store_dir)}
    r = subprocess.run(
        [sys.executable, "-m", "casstore", "get", url],
        env=env,
        capture_output=True,
        timeout=30,
        preexec_fn=limit_file_size,
    )
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "cannot write the download of" in err and "/big" in err
    assert err.count("\n") == 1
    assert origin.count("/big") == 1  # a disk error is not retried
    assert _temps(store_dir) == []
    assert_store_consistent(store_dir)


# -- large bodies straight from the socket ---------------------------------------
# After a body read from the socket, httpx never saw its end, so the connection is
# closed instead of going back to the pool: the client's port, as the origin saw
# it, tells which path a body took.  These run with the direct lane off.


@pytest.fixture
def httpx_only(monkeypatch):
    monkeypatch.setenv("CASSTORE_DIRECT", "0")


def test_large_body_from_the_socket_leaves_its_connection_unused(
    httpx_only, store, store_dir, origin
):
    small = origin.add("/small", DATA)
    huge = origin.add("/huge", HUGE)
    after = origin.add("/after", BIG)
    assert store.get(small, sha256=sha(DATA)).read_bytes() == DATA
    assert store.get(huge, sha256=sha(HUGE)).read_bytes() == HUGE
    assert store.get(after, sha256=sha(BIG)).read_bytes() == BIG  # the client still works
    ports = [s.port for s in origin.requests()]
    assert ports[1] == ports[0]  # through httpx: back to the pool, reused
    assert ports[2] != ports[1]  # from the socket: closed
    assert_store_consistent(store_dir)


def test_large_body_through_the_direct_lane_keeps_its_connection(store, store_dir, origin):
    small = origin.add("/small", DATA)
    huge = origin.add("/huge", HUGE)
    chunked = origin.add("/chunked", BIG, chunked=True)  # the origin closes after it
    other = blob(1000, seed=7)
    after = origin.add("/after", other)
    assert store.get(small, sha256=sha(DATA)).read_bytes() == DATA
    assert store.get(huge, sha256=sha(HUGE)).read_bytes() == HUGE
    assert store.get(chunked, sha256=sha(BIG)).read_bytes() == BIG
    assert store.get(after, sha256=sha(other)).read_bytes() == other
    ports = [s.port for s in origin.requests()]
    assert ports[0] == ports[1] == ports[2] != ports[3]
    assert_store_consistent(store_dir)


def test_large_body_trusted_on_first_use_goes_through_httpx(httpx_only, store, store_dir, origin):
    """No digest to check it against: httpx reads the whole body (download's ``verified``)."""
    url = origin.add("/tofu", HUGE)
    after = origin.add("/after", DATA)
    assert store.get(url).read_bytes() == HUGE
    assert store.get(after, sha256=sha(DATA)).read_bytes() == DATA
    first, second = origin.requests()
    assert first.port == second.port
    assert_store_consistent(store_dir)


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "httpx"])
def test_large_body_with_a_content_coding_is_stored_as_served(
    store, store_dir, origin, monkeypatch, direct
):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    url = origin.add("/coded", HUGE, headers={"Content-Encoding": "gzip"})
    after = origin.add("/after", DATA)
    assert store.get(url, sha256=sha(HUGE)).read_bytes() == HUGE  # as served, not decoded
    assert store.get(after, sha256=sha(DATA)).read_bytes() == DATA
    first, second = origin.requests()
    assert first.port == second.port
    assert_store_consistent(store_dir)


class _Memory:
    """The smallest sink: no separate update/append, so the worker does both."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.size = 0

    def write(self, data) -> None:
        self.data += data
        self.size += len(data)

    def reset(self) -> None:
        self.data.clear()
        self.size = 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "httpx"])
def test_large_body_progress_and_resume_into_any_sink(origin, direct):
    url = origin.add("/progress", HUGE, truncate_at=CUT)
    sink, calls = _Memory(), []
    with Session(direct=direct) as session:
        fetched = download(
            url, sink, session=session, progress=lambda *a: calls.append(a), verified=True
        )
    assert bytes(sink.data) == HUGE and fetched.attempts == 2
    assert calls[-1] == (len(HUGE), len(HUGE))
    done = [n for n, _ in calls]
    assert done == sorted(done) and len(done) > len(HUGE) // (1 << 20)
    assert origin.requests("/progress")[1].headers["range"] == f"bytes={CUT}-"


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs openssl to make a certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = str(where / "cert.pem"), str(where / "key.pem")
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", key, "-out", cert, "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture
def tls_origin(tls_cert):
    o = Origin(tls=tls_cert)
    yield o
    o.close()


def test_https_large_body_from_the_tls_socket(tls_origin, tls_cert, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_cert[0])
    urls = [
        tls_origin.add("/cut", HUGE, truncate_at=CUT),
        tls_origin.add("/whole", HUGE),
        tls_origin.add("/after", DATA),
    ]
    with Session(direct=False) as session:
        for url, data in zip(urls, (HUGE, HUGE, DATA), strict=True):
            sink = _Memory()
            download(url, sink, session=session, verified=True)
            assert bytes(sink.data) == data
    seen = tls_origin.requests()
    assert [s.path for s in seen] == ["/cut", "/cut", "/whole", "/after"]
    assert seen[1].headers["range"] == f"bytes={CUT}-" and seen[1].status == 206
    assert seen[2].port == seen[1].port  # the resumed remainder, small: through httpx
    assert seen[3].port != seen[2].port  # /whole came from the TLS socket


def test_https_through_the_direct_lane_is_verified_and_kept_alive(
    store, store_dir, tls_origin, tls_cert, monkeypatch
):
    monkeypatch.setenv("SSL_CERT_FILE", tls_cert[0])
    urls = [tls_origin.add("/one", DATA), tls_origin.add("/two", BIG), tls_origin.add("/3", HUGE)]
    for url, data in zip(urls, (DATA, BIG, HUGE), strict=True):
        assert store.get(url, sha256=sha(data)).read_bytes() == data
    assert len({s.port for s in tls_origin.requests()}) == 1  # one TLS connection, kept
    assert_store_consistent(store_dir)


def test_https_certificate_is_verified(store, store_dir, tls_origin):
    url = tls_origin.add("/untrusted", DATA)
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
        store.get(url, sha256=sha(DATA))
    assert tls_origin.requests() == []  # refused during the handshake
    assert_store_consistent(store_dir)


# -- mirrors -------------------------------------------------------------------


def test_mirror_serving_wrong_bytes_is_skipped(store, store_dir, origin):
    bad = origin.add("/m1", b"evil" * 1000)
    good = origin.add("/m2", DATA)
    path = store.get(bad, sha256=sha(DATA), mirrors=[good])
    assert path.read_bytes() == DATA
    assert origin.count("/m1") == 1 and origin.count("/m2") == 1
    assert_store_consistent(store_dir)


def test_every_mirror_wrong_is_exit_3_listing_each(run_cli, store_dir, origin):
    a = origin.add("/w1", b"one")
    b = f"http://u:hunter2@127.0.0.1:{origin.port}/w2"
    origin.add("/w2", b"two")
    r = run_cli("get", a, b, "--sha256", sha(DATA))
    err = r.stderr.decode()
    assert r.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert "every source served wrong bytes" in last
    assert a in last and "http://***@127.0.0.1" in last
    assert "hunter2" not in err
    assert_store_consistent(store_dir)


def test_failure_and_mismatch_among_mirrors_is_exit_4(run_cli, store_dir, origin):
    a = origin.url("/absent")
    b = origin.add("/wrong", b"two")
    r = run_cli("get", a, b, "--sha256", sha(DATA))
    last = r.stderr.decode().strip().splitlines()[-1]
    assert r.returncode == 4
    assert "every source failed" in last and "404" in last and "/wrong" in last
    assert_store_consistent(store_dir)


# -- redirects -------------------------------------------------------------------


def test_redirect_chain_is_followed_and_final_url_recorded(store, store_dir, origin):
    final = origin.add("/final", DATA)
    mid = origin.add("/hop2", redirect_to=final)
    start = origin.add("/hop1", redirect_to=mid)
    path = store.get(start, sha256=sha(DATA))
    assert path.read_bytes() == DATA
    sources = store.info(sha(DATA)).sources
    urls = {s["url"] if isinstance(s, dict) else s for s in sources}
    assert start in str(urls) and final in str(urls)
    assert_store_consistent(store_dir)


def test_redirect_loop_is_exit_4(run_cli, store_dir, origin):
    a = origin.url("/loopa")
    b = origin.add("/loopb", redirect_to=a)
    origin.add("/loopa", redirect_to=b)
    r = run_cli("get", a, "--sha256", sha(DATA))
    assert r.returncode == 4
    assert "redirects" in r.stderr.decode()
    assert origin.count("/loopa") == 6  # 1 + 10 redirects, alternating; never retried
    assert_store_consistent(store_dir)


# -- auth and headers -------------------------------------------------------------


def test_basic_auth_from_url_never_stored_or_printed(run_cli, store_dir, origin):
    origin.add("/private", DATA, auth=("alice", "s3cret-pw"))
    url = f"http://alice:s3cret-pw@127.0.0.1:{origin.port}/private"
    r = run_cli("get", url)  # trust on first use prints the URL on stderr
    assert r.returncode == 0, r.stderr
    assert b"s3cret-pw" not in r.stdout + r.stderr
    assert b"s3cret-pw" not in _store_bytes(store_dir)
    assert origin.count("/private") == 1
    assert_store_consistent(store_dir)


def test_missing_credentials_are_a_401_requested_once(store, store_dir, origin):
    url = origin.add("/locked", DATA, auth=("alice", "pw"))
    with pytest.raises(DownloadError) as info:
        store.get(url, sha256=sha(DATA))
    assert info.value.status == 401 and origin.count("/locked") == 1
    assert_store_consistent(store_dir)


def test_basic_auth_from_netrc(store, store_dir, origin, tmp_path):
    url = origin.add("/netrc", DATA, auth=("bob", "from-netrc"))
    home = tmp_path / "home"  # conftest points HOME here
    home.mkdir(exist_ok=True)
    netrc = home / ".netrc"
    netrc.write_text("machine 127.0.0.1 login bob password from-netrc\n")
    netrc.chmod(0o600)
    assert store.get(url, sha256=sha(DATA)).read_bytes() == DATA
    assert b"from-netrc" not in _store_bytes(store_dir)
    assert_store_consistent(store_dir)


def test_a_netrc_written_during_a_batch_is_used_once_looked_at_again(
    store, store_dir, origin, tmp_path, monkeypatch
):
    from casstore import direct

    first = origin.add("/open", DATA)
    other = blob(1000, seed=7)
    locked = origin.add("/later", other, auth=("bob", "pw"))
    assert store.get(first, sha256=sha(DATA)).read_bytes() == DATA  # no ~/.netrc yet
    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir(exist_ok=True)
    netrc.write_text("machine 127.0.0.1 login bob password pw\n")
    monkeypatch.setattr(direct, "NETRC_FRESH", 0.0)  # (else within a second)
    assert store.get(locked, sha256=sha(other)).read_bytes() == other
    assert [r.status for r in origin.requests("/later")] == [200]


def test_header_option_is_sent_but_never_stored(run_cli, store_dir, origin):
    url = origin.add("/token", DATA, require_headers={"X-Token": "tok-123456"})
    r = run_cli("get", url, "--header", "X-Token: tok-123456", "--header", "X-Other: 1")
    assert r.returncode == 0, r.stderr
    assert origin.requests("/token")[0].headers["x-other"] == "1"
    assert b"tok-123456" not in r.stdout + r.stderr + _store_bytes(store_dir)
    r = run_cli("get", url)  # a hit now: the digest was recorded for the URL
    assert r.returncode == 0 and origin.count("/token") == 1
    assert_store_consistent(store_dir)


def test_connect_error_names_the_url_redacted(run_cli, store_dir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("get", f"http://bob:pw123@127.0.0.1:{port}/x", "--retries", "1")
    err = r.stderr.decode()
    assert r.returncode == 4
    assert f"http://***@127.0.0.1:{port}/x" in err.splitlines()[-1]
    assert "retry 1 of 1" in err and "pw123" not in err


def test_proxy_comes_from_the_environment(store, store_dir, origin, monkeypatch):
    # The origin stands in for a proxy: it sees the absolute URL and answers 404.
    monkeypatch.setenv("HTTP_PROXY", origin.base)
    with pytest.raises(DownloadError) as info:
        store.get("http://artifacts.example.invalid/pkg.tar", sha256=sha(DATA))
    assert info.value.status == 404
    assert [s.path for s in origin.requests()] == ["http://artifacts.example.invalid/pkg.tar"]
    assert_store_consistent(store_dir)


def _store_bytes(store_dir) -> bytes:
    out = b""
    for name in os.listdir(store_dir):
        if name.startswith("index.db"):
            out += (store_dir / name).read_bytes()
    return out


# -- command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--header", "no colon here"], {}),
        (["--retries", "-1"], {}),
        (["--timeout", "0"], {}),
        (["--size", "-5"], {}),
        ([], {"CASSTORE_RETRIES": "many"}),
    ],
)
def test_bad_download_options_are_exit_2_before_any_request(run_cli, origin, args, env):
    url = origin.add("/opt", DATA)
    r = run_cli("get", url, "--sha256", sha(DATA), *args, env=env)
    assert r.returncode == 2, r.stderr
    assert origin.requests() == []


def test_cli_retries_and_size(run_cli, store_dir, origin):
    url = origin.add("/cli", DATA, fail_first=[500, 500])
    r = run_cli("get", url, "--retries", "1", "--sha256", sha(DATA))
    assert r.returncode == 4 and origin.count("/cli") == 2
    r = run_cli("get", url, "--retries", "1", "--size", str(len(DATA)), "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert "retry 1 of 1" not in r.stderr.decode()  # the third request succeeded at once
    assert_store_consistent(store_dir)


def test_cli_file_url_missing_is_exit_4(run_cli, tmp_path):
    r = run_cli("get", f"file://{tmp_path}/absent")
    assert r.returncode == 4 and "absent" in r.stderr.decode()


# -- progress -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["", "-q", "--json"])
def test_progress_bar_on_a_terminal_only(store_dir, origin, flag):
    data = blob(400_000, seed=2)
    url = origin.add("/slow", data, chunk=16_384, drip=0.07)  # about 1.7 s
    env = {**os.environ, "CASSTORE_DIR": str(store_dir), "TERM": "xterm", "COLUMNS": "100"}
    code, out = run_in_pty([*([flag] if flag else []), "get", url, "--sha256", sha(data)], env)
    assert code == 0, out
    assert ("━" in out and "B/s" in out) is not bool(flag), out
    assert_store_consistent(store_dir)
    if flag:
        return
    # Piped: the same slow download draws nothing.
    url2 = origin.add("/slow2", data, chunk=16_384, drip=0.07)
    piped = subprocess.run(
        [sys.executable, "-m", "casstore", "get", url2], env=env, capture_output=True, timeout=30
    )
    assert piped.returncode == 0
    assert "━" not in piped.stderr.decode() and "B/s" not in piped.stderr.decode()
    assert_store_consistent(store_dir)


# -- async ------------------------------------------------------------------------------


def test_aget_many_of_one_digest_download_once(store, store_dir, origin):
    url = origin.add("/async", DATA, drip=0.01)

    async def main():
        return await asyncio.gather(*(store.aget(url, sha256=sha(DATA)) for _ in range(8)))

    paths = asyncio.run(main())
    assert len(set(paths)) == 1 and paths[0].read_bytes() == DATA
    assert origin.count("/async") == 1
    assert_store_consistent(store_dir)


def test_aget_retries_resumes_and_skips_bad_mirrors(store, store_dir, origin, tmp_path):
    bad = origin.add("/abad", b"wrong")
    good = origin.add("/agood", BIG, fail_first=[503], truncate_at=2_000_000)
    dest = tmp_path / "out" / "file.bin"
    dest.parent.mkdir()

    async def main():
        return await store.aget(bad, sha256=sha(BIG), mirrors=[good], dest=dest)

    assert asyncio.run(main()) == dest
    assert dest.read_bytes() == BIG
    seen = origin.requests("/agood")
    assert [s.status for s in seen] == [503, 200, 206]
    assert origin.bytes_sent("/agood") == len(BIG)
    # A second aget is a hit.
    assert asyncio.run(store.aget(good, sha256=sha(BIG))).read_bytes() == BIG
    assert origin.count("/agood") == 3
    assert_store_consistent(store_dir)


def test_aget_errors_match_get(store, store_dir, origin):
    bad = origin.add("/aw", b"wrong")
    with pytest.raises(HashMismatch):
        asyncio.run(store.aget(bad, sha256=sha(DATA)))
    with pytest.raises(DownloadError) as info:
        asyncio.run(store.aget(origin.url("/a404"), sha256=sha(DATA)))
    assert info.value.status == 404 and origin.count("/a404") == 1
    with pytest.raises(InvalidInput):
        asyncio.run(store.aget("ftp://x/y", sha256=sha(DATA)))
    assert _temps(store_dir) == []
    assert_store_consistent(store_dir)


# -- the pure helpers ----------------------------------------------------------------------


def test_backoff_is_capped_and_retry_after_honoured_up_to_60s():
    policy = Policy(backoff_max=2.0)
    assert all(0 < _delay(None, n, policy) <= 2.0 for n in range(1, 12))
    assert _delay(_Retry("x", retry_after=7), 1, policy) == 7
    assert _delay(_Retry("x", retry_after=3600), 1, policy) == 60
    assert _retry_after("12") == 12.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert _retry_after("soon") is None


def test_policy_from_env(monkeypatch):
    monkeypatch.setenv("CASSTORE_RETRIES", "5")
    monkeypatch.setenv("CASSTORE_BACKOFF_MAX", "0.5")
    p = Policy.from_env(headers={"X-A": "b"})
    assert (p.retries, p.backoff_max, p.headers) == (5, 0.5, (("X-A", "b"),))
    assert Policy.from_env(retries=1).retries == 1
    assert "X-A" not in repr(p)
    with pytest.raises(InvalidInput):
        Policy.from_env(timeout=0)
    assert parse_header("Authorization:  Bearer x ") == ("Authorization", "Bearer x")
    with pytest.raises(InvalidInput) as info:
        parse_header("bad header: secret")
    assert "secret" not in str(info.value)


def test_content_range_parsing():
    assert _content_range("bytes 5-9/10") == (5, 10)
    assert _content_range("bytes 5-9/*") == (5, None)
    assert _content_range("garbage") == (None, None)
    assert isinstance(SizeMismatch("x"), IntegrityFailure)
