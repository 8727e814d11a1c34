"""The direct lane (direct.py): plain GETs on its own connections, httpx for the rest.

What each request took is told by what the origin saw: the client's port (one
per connection), the headers, the request counts."""

from __future__ import annotations

import itertools
import logging
import os

import pytest

from casstore import Store
from casstore.errors import DownloadError, HashMismatch, InvalidInput, SizeMismatch

from .conftest import assert_store_consistent, blob, run_probed, sha
from .origin import Origin
from .raw import Raw

pytestmark = pytest.mark.timeout(60)

DATA = blob(50_000, seed=21)
OTHER = blob(60_000, seed=22)


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setenv("CASSTORE_BACKOFF_MAX", "0.01")


def _objects(store_dir) -> list[str]:
    root = store_dir / "sha256"
    return [p.name for p in root.rglob("*") if p.is_file()] if root.exists() else []


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
    # The origin sends 10 bytes more than its Content-Length: past the body read into
    # the sink's buffers, they stay in the socket.  (Bytes received with the end of
    # an answer: test_a_connection_is_kept_only_when_it_can_carry_the_next_answer.)
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


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "httpx"])
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


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "httpx"])
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
def test_a_cold_get_of_a_plain_url_never_imports_httpx_or_ssl(tmp_path, origin):
    url = origin.add("/cold", DATA)
    env = {**os.environ, "CASSTORE_DIR": str(tmp_path / "s")}
    watched = ("httpx", "ssl", "http.client", "email")
    r = run_probed("casstore.__main__", watched, "get", url, "--sha256", sha(DATA), env=env)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED" not in r.stderr.decode()
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


# -- what httpx does, the direct lane does too (review findings) ----------------------

BOTH = pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "httpx"])


@pytest.fixture
def raw():
    servers: list[Raw] = []

    def start(answer) -> Raw:
        servers.append(Raw(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _answer(status: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in (f"HTTP/1.1 {status}", *headers))
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@BOTH
def test_interim_answers_are_skipped_and_never_taken_for_the_next(
    store_dir, raw, monkeypatch, direct
):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    server = raw(
        lambda head: (hints if "/a " in head else b"") + _answer("200 OK", head[:6].encode())
    )
    with Store(store_dir) as s:
        assert s.get(f"{server.base}/a").read_bytes() == b"GET /a"
        assert s.get(f"{server.base}/b").read_bytes() == b"GET /b"
    assert_store_consistent(store_dir)


@BOTH
def test_a_range_answer_longer_than_its_content_range_is_refused(
    store_dir, raw, monkeypatch, direct
):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    data = blob(3 << 20, seed=24)
    cut = 1 << 20

    def answer(head: str) -> bytes:
        if "range: bytes=" not in head.lower():
            # All of it announced, a third sent: the client asks for the rest.
            whole = f'HTTP/1.1 200 OK\r\nETag: "e"\r\nContent-Length: {len(data)}\r\n\r\n'
            return whole.encode() + data[:cut], Raw.CLOSE
        rest = data[cut:] + b"E" * (2 << 20)  # 2 MiB past what Content-Range says
        return _answer(
            "206 Partial Content",
            rest,
            'ETag: "e"',
            f"Content-Range: bytes {cut}-{len(data) - 1}/{len(data)}",
        )

    server = raw(answer)
    with Store(store_dir) as s, pytest.raises(SizeMismatch, match="runs past"):
        s.get(f"{server.base}/f")
    assert _objects(store_dir) == [] and os.listdir(store_dir / "tmp") == []
    assert_store_consistent(store_dir)


@BOTH
def test_cookies_follow_redirects_as_httpx_has_them(
    store_dir, origin, second_origin, monkeypatch, direct
):
    """A Cookie the caller set is sent to the first URL only; one a redirect sets
    is sent on to the next hop (a cookie-gated download link)."""
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    elsewhere = second_origin.add("/elsewhere", DATA)
    gated = origin.add("/gated", OTHER, require_headers={"Cookie": "grant=yes"})
    origin.add("/away", redirect_to=elsewhere)
    origin.add("/login", redirect_to=gated, headers={"Set-Cookie": "grant=yes; Path=/"})
    with Store(store_dir, headers={"Cookie": "mine=1"}) as s:
        assert s.get(origin.url("/away"), sha256=sha(DATA)).read_bytes() == DATA
    with Store(store_dir) as s:
        assert s.get(origin.url("/login"), sha256=sha(OTHER)).read_bytes() == OTHER
    # A cookie for this host only does not go to another: the chain is not restarted.
    theirs = second_origin.add("/theirs", OTHER * 2).replace("127.0.0.1", "localhost")
    origin.add("/mine", redirect_to=theirs, headers={"Set-Cookie": "k=v"})
    with Store(store_dir) as s:
        assert s.get(origin.url("/mine"), sha256=sha(OTHER * 2)).read_bytes() == OTHER * 2
    assert origin.count("/mine") == 1
    assert origin.requests("/away")[0].headers["cookie"] == "mine=1"
    assert "cookie" not in second_origin.requests("/elsewhere")[0].headers
    assert origin.requests("/gated")[-1].status == 200
    assert_store_consistent(store_dir)


@BOTH
@pytest.mark.parametrize("middle", ["localhost", "u:p@localhost"], ids=["direct", "to-httpx"])
def test_a_cookie_set_early_in_a_chain_goes_back_to_its_host(
    store_dir, origin, second_origin, monkeypatch, direct, middle
):
    """127.0.0.1 sets a cookie and sends us to localhost, which sends us back.  With
    credentials in the middle URL (a hop only httpx takes), httpx takes the chain
    from its start, cookie and all."""
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    end = origin.add("/end", DATA, require_headers={"Cookie": "grant=yes"})
    mid = second_origin.add("/mid", redirect_to=end).replace("127.0.0.1", middle)
    start = origin.add("/start", redirect_to=mid, headers={"Set-Cookie": "grant=yes"})
    with Store(store_dir) as s:
        assert s.get(start, sha256=sha(DATA)).read_bytes() == DATA
    assert origin.requests("/end")[-1].status == 200


def test_which_cookies_could_go_with_a_later_hop():
    from casstore.direct import _applies

    assert _applies("k=v", "example.com", "example.com")
    assert _applies("k=v", "example.com", "www.example.com")  # as http.cookiejar sends it
    assert _applies("k=v; Path=/; Domain=.example.com", "a.example.com", "b.example.com")
    assert not _applies("k=v", "example.com", "example.org")
    assert not _applies("k=v; Domain=a.example.com", "a.example.com", "b.example.com")


def test_authorization_stays_on_an_upgrade_to_https_of_the_same_host():
    from casstore.direct import _is_https_upgrade, _origin

    def upgrade(a: str, b: str) -> bool:
        return _is_https_upgrade(_origin(a), _origin(b))

    assert upgrade("http://example.org/a", "https://example.org/b")
    assert upgrade("http://example.org:80/a", "https://example.org:443/b")
    assert not upgrade("http://example.org/a", "https://other.org/b")
    assert not upgrade("http://example.org:8080/a", "https://example.org/b")
    assert not upgrade("https://example.org/a", "http://example.org/b")


@BOTH
def test_a_redirect_to_no_url_at_all_is_a_download_error(
    store_dir, origin, monkeypatch, caplog, direct
):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    url = origin.add("/bad", redirect_to="http://user:s3cret@[::1/x")
    with Store(store_dir, retries=1) as s, pytest.raises(DownloadError) as info:
        s.get(url, sha256=sha(DATA))
    assert info.value.exit_code == 4
    assert origin.count("/bad") == 2  # a protocol error: retried, as httpx's
    assert "s3cret" not in str(info.value) and "s3cret" not in caplog.text


@BOTH
def test_bad_header_values_and_host_names_are_clear_errors(store_dir, origin, monkeypatch, direct):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    url = origin.add("/x", DATA)
    with Store(store_dir, headers={"X-Name": "café"}) as s, pytest.raises(InvalidInput):
        s.get(url, sha256=sha(DATA))
    assert origin.requests() == []
    # An empty label, too long ones, and a non-ASCII one (which re.I alone took as plain).
    for host in ("a..b", "a" * 64 + ".b", "b." + "a" * 64, "\u017f.invalid"):
        with Store(store_dir) as s, pytest.raises(DownloadError, match="invalid URL") as info:
            s.get(f"http://{host}/x", sha256=sha(DATA))
        assert info.value.exit_code == 4


def test_a_connection_unused_for_a_while_is_not_reused(origin):
    from casstore.direct import Pool

    url = origin.add("/again", DATA)

    def twice(keep_idle: float) -> list[int]:
        pool = Pool(headers={}, tls=None, connect_timeout=5, max_redirects=10, keep_idle=keep_idle)
        for _ in range(2):
            with pool.get(url, {}, timeout=5) as r:
                assert r.status == 200
                assert b"".join(iter(lambda: r.read1(1 << 16), b"")) == DATA
        pool.close()
        return [s.port for s in origin.requests("/again")[-2:]]

    first, second = twice(keep_idle=60)
    assert first == second
    first, second = twice(keep_idle=0)
    assert first != second


def test_connections_are_reused_with_many_files_open(store, store_dir, origin):
    """A batch may hold descriptors past 1024, which select() refuses."""
    a, b = origin.add("/one", DATA), origin.add("/two", OTHER)
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        store.get(a, sha256=sha(DATA))
        store.get(b, sha256=sha(OTHER))
    finally:
        for fd in held:
            os.close(fd)
    first, second = origin.requests()
    assert first.port == second.port
    assert_store_consistent(store_dir)


@BOTH
@pytest.mark.parametrize(
    ("asked", "sent"),
    [("/dir/../wire?q=1", "/wire?q=1"), ("/wire?", "/wire?"), ("/wire?a=%20b", "/wire?a=%20b")],
)
def test_the_request_target_is_the_same_either_way(
    store_dir, origin, monkeypatch, direct, asked, sent
):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    origin.add("/wire", DATA)
    with Store(store_dir) as s:
        s.get(origin.url(asked), sha256=sha(DATA))
    assert [r.target for r in origin.requests()] == [sent]


@BOTH
def test_a_netrc_that_is_not_text_is_ignored(store_dir, origin, tmp_path, monkeypatch, direct):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir(exist_ok=True)
    netrc.write_bytes(b"machine \xff\xfe login x password y\n")
    url = origin.add("/x", DATA)
    with Store(store_dir) as s:
        assert s.get(url, sha256=sha(DATA)).read_bytes() == DATA


@pytest.mark.parametrize(
    ("value", "on"), [("0", False), ("off", False), ("No", False), ("1", True)]
)
def test_casstore_direct_turns_the_direct_path_off(monkeypatch, value, on):
    from casstore.fetch import Session

    monkeypatch.setenv("CASSTORE_DIRECT", value)
    with Session() as session:
        assert (session.pool is not None) is on


@BOTH
def test_header_blocks_are_read_as_httpx_reads_them(store_dir, raw, monkeypatch, direct):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    body = b"folded"

    def answer(head: str) -> bytes | tuple[bytes, object]:
        if head.startswith("GET /folded "):  # a folded line and a name in odd case: fine
            return b"HTTP/1.1 200 OK\r\nX-Note: one\r\n  two\r\ncontent-LENGTH: 6\r\n\r\n" + body
        # A line that is no field: h11 refuses the answer (the email package would
        # have ended the block there and taken the rest for the body).
        return b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 5\r\n\r\nother", Raw.CLOSE

    server = raw(answer)
    with Store(store_dir, retries=1) as s:
        assert s.get(f"{server.base}/folded", sha256=sha(body)).read_bytes() == body
        with pytest.raises(DownloadError, match="/bad failed after 2 attempt"):
            s.get(f"{server.base}/bad", sha256=sha(b"other"))
    assert sum(head.startswith("GET /bad ") for _, head in server.seen) == 2
    assert len(_objects(store_dir)) == 1 and os.listdir(store_dir / "tmp") == []


def test_header_fields_are_looked_up_as_http_client_has_them():
    from casstore.direct import Fields

    fields = Fields([("Set-Cookie", "a=1"), ("ETag", '"x"'), ("set-cookie", "b=2")])
    assert fields.get("etag") == '"x"' and fields.get("ETAG") == '"x"'
    assert fields.get("SET-COOKIE") == "a=1"  # the first, as HTTPMessage.get
    assert fields.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert fields.get("location") is None and fields.get_all("location") is None
    assert "Etag" in fields and "location" not in fields


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_session_dropped_unclosed_lets_go_of_its_connections_at_once(origin):
    # Freed by reference counting, not left to the GC: no cycle through its pool.
    # (Its kept socket goes with it, with Python's "unclosed socket" warning.)
    import gc
    import weakref

    from casstore.fetch import Session

    url = origin.add("/s", DATA)
    gc.disable()
    try:
        session = Session()
        with session.pool.get(url, {}, 10) as r:
            while r.read1(1 << 16):
                pass
        assert session.pool._idle  # a connection kept
        gone = weakref.ref(session)
        del session, r
        assert gone() is None
    finally:
        gc.enable()


def test_urls_are_taken_apart_as_urlsplit_takes_them():
    # direct._split takes the common shape apart with a regex: it must agree with
    # urlsplit (its reference, and its fallback) on every URL, common or not.
    from itertools import product
    from urllib.parse import urlsplit

    from casstore import direct

    def reference(url: str) -> object:
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            key = (scheme, parts.hostname or "", parts.port or direct._PORTS[scheme])
        except ValueError:
            return ValueError
        return key, parts.path, parts.query, parts.username is not None

    def split(url: str) -> object:
        try:
            return direct._split(url)
        except ValueError:
            return ValueError

    schemes = ["http", "HTTPS", "hTTp"]
    hosts = ["h", "Example.ORG", "a-b.c", "127.0.0.1", "[::1]", "u:p@h", "@h", "h.", "H_x"]
    ports = ["", ":", ":0", ":80", ":443", ":8080", ":65535", ":65536", ":99999", ":08", ":x"]
    rests = ["", "/", "/a/b", "/a?b=1", "/a?", "?q", "#f", "/p#f?x", "/p?q#f", "/%41", "//x"]
    rests += ["/a\nb", "/a\tb", "/a b", "/a\x00"]  # (urlsplit drops tabs and line ends)
    for parts in product(schemes, hosts, ports, rests):
        url = "{}://{}{}{}".format(*parts)
        assert split(url) == reference(url), url


@pytest.mark.parametrize(
    ("env", "proxied"),
    [
        ({}, False),
        ({"no_proxy": "example.org"}, False),
        ({"HTTP_PROXY": ""}, False),
        ({"https_proxy": "http://127.0.0.1:9"}, True),
        ({"All_Proxy": "http://127.0.0.1:9"}, True),
        ({"ftp_proxy": "http://127.0.0.1:9"}, False),
        ({"HTTP_PROXY": "http://127.0.0.1:9"}, True),
        ({"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": ""}, False),
    ],
)
def test_a_proxy_is_seen_as_urllib_sees_it(monkeypatch, env, proxied):
    # The pool leaves proxied requests to httpx; it looks at the environment
    # without importing urllib.request when no http, https or all proxy is set.
    import urllib.request

    from casstore import direct

    monkeypatch.delenv("NO_PROXY")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expected = any(urllib.request.getproxies().get(k) for k in ("http", "https", "all"))
    assert direct._proxied() is proxied is expected


# -- framing: the direct lane reads an answer's body as httpx does ---------------------

BODY = blob(70_000, seed=25)


def _chunked(body: bytes, ext: str = "", trailer: str = "", hexa: str = "%x") -> bytes:
    """``body`` in chunks of 1, 4093 and 65536 bytes, then the last chunk and ``trailer``."""
    out, at = [], 0
    for n in itertools.cycle((1, 4093, 65536)):
        if at >= len(body):
            break
        part, at = body[at : at + n], at + n
        out.append((hexa % len(part)).encode() + ext.encode() + b"\r\n" + part + b"\r\n")
    return b"".join(out) + b"0" + ext.encode() + b"\r\n" + trailer.encode() + b"\r\n"


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
FRAMED = {
    "chunked": CHUNKED + _chunked(BODY),
    "chunked, extensions, upper-case sizes and a trailer": CHUNKED
    + _chunked(BODY, ext=";a=b", trailer="X-Sum: 1\r\nX-More: 2\r\n", hexa="%X"),
    "sized by the close (HTTP/1.0)": (b"HTTP/1.0 200 OK\r\n\r\n" + BODY, Raw.CLOSE),
    "sized by the close (HTTP/1.1)": (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY,
        Raw.CLOSE,
    ),
    "sized, a byte at a time": (_answer("200 OK", BODY[:3000]), Raw.DRIP),
    "chunked, a byte at a time": (CHUNKED + _chunked(BODY[:3000], trailer="X: y\r\n"), Raw.DRIP),
    "sized, the length given twice": _answer("200 OK", BODY).replace(
        b"Content-Length: 70000", b"Content-Length: 70000, 70000"
    ),
}


@BOTH
@pytest.mark.parametrize("case", FRAMED)
def test_bodies_are_framed_as_httpx_frames_them(store_dir, raw, monkeypatch, direct, case):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    answer = FRAMED[case]
    body = BODY[:3000] if "a byte at a time" in case else BODY
    server = raw(lambda head: answer)
    with Store(store_dir, retries=0) as s:
        assert s.get(f"{server.base}/f", sha256=sha(body)).read_bytes() == body
    assert len(server.seen) == 1
    assert_store_consistent(store_dir)


BROKEN = {
    "a chunk cut short": (CHUNKED + b"ffff\r\n" + BODY[:1000], Raw.CLOSE),
    "a bad chunk size": CHUNKED + b"zz\r\nab\r\n0\r\n\r\n",
    "a chunk longer than its size": CHUNKED + b"3\r\nabcd\r\n0\r\n\r\n",
    "no last chunk": (CHUNKED + b"3\r\nabc\r\n", Raw.CLOSE),
    "no status line": (b"hello\r\n\r\n", Raw.CLOSE),
    "a status below 100": (b"HTTP/1.1 99 Low\r\nContent-Length: 0\r\n\r\n", Raw.CLOSE),
    "a status that is no number": (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", Raw.CLOSE),
    "closed inside the header block": (b"HTTP/1.1 200 OK\r\nContent-Le", Raw.CLOSE),
    # Cut after a whole line: no body must not pass for an empty one.
    "closed after a header line": (b"HTTP/1.1 200 OK\r\nServer: x\r\n", Raw.CLOSE),
    "closed after the status line": (b"HTTP/1.1 200 OK\r\n", Raw.CLOSE),
    "closed inside the status line": (b"HTTP/1.1 200 OK", Raw.CLOSE),
    "closed in the trailer": (CHUNKED + b"3\r\nabc\r\n0\r\n", Raw.CLOSE),
    "a status of four digits": (b"HTTP/1.1 0200 OK\r\nContent-Length: 0\r\n\r\n", Raw.CLOSE),
    "two spaces in the status line": (
        b"HTTP/1.1  200 OK\r\nContent-Length: 2\r\n\r\nhi",
        Raw.CLOSE,
    ),
    "a version that is no version": (b"HTTP/1.1x 200 OK\r\nContent-Length: 2\r\n\r\nhi", Raw.CLOSE),
    # int() takes all of these; as a size, "-0" would end the body early, unnoticed.
    "a chunk size of -0": (CHUNKED + b"5\r\nhello\r\n-0\r\n\r\n5\r\nworld\r\n0\r\n\r\n", Raw.CLOSE),
    "a chunk size of 0x5": (CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", Raw.CLOSE),
    "a chunk size of +5": (CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", Raw.CLOSE),
    "a chunk size after a space": (CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", Raw.CLOSE),
    # A body that could only be stored as it came, framing and all.
    "a transfer coding before chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Raw.CLOSE,
    ),
    "conflicting Content-Lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 3\r\n\r\nhello",
        Raw.CLOSE,
    ),
    # Kept, a bare CR in an ETag would go back out in an If-Range: a header injected.
    "a bare CR in a field value": (
        b'HTTP/1.1 200 OK\r\nETag: "v1"\rX-Injected: yes\r\nContent-Length: 5\r\n\r\nhello',
        Raw.CLOSE,
    ),
}
# http.client's limit, kept: httpx takes a header block of any size that comes in one piece.
BROKEN_DIRECT = {
    "a header line over 64 KiB": (
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
        Raw.CLOSE,
    ),
}


@pytest.mark.parametrize(
    ("case", "direct"),
    [(case, lane) for case in BROKEN for lane in ("1", "0")] + [(c, "1") for c in BROKEN_DIRECT],
)
def test_broken_framing_is_a_retried_download_error(store_dir, raw, monkeypatch, direct, case):
    monkeypatch.setenv("CASSTORE_DIRECT", direct)
    answer = {**BROKEN, **BROKEN_DIRECT}[case]
    server = raw(lambda head: answer)
    # Trusted on first use: whatever the client took for an answer would be stored.
    with Store(store_dir, retries=1) as s, pytest.raises(DownloadError, match="after 2 attempt"):
        s.get(f"{server.base}/f")
    assert len(server.seen) == 2
    assert _objects(store_dir) == [] and os.listdir(store_dir / "tmp") == []
    assert_store_consistent(store_dir)


KEPT = {  # an answer, and whether the connection may carry the next
    "sized": (_answer("200 OK", BODY), True),
    "chunked": (CHUNKED + _chunked(BODY, trailer="X: y\r\n"), True),
    "HTTP/1.1, Connection: close": (_answer("200 OK", BODY, "Connection: close"), False),
    "HTTP/1.0": (_answer("200 OK", BODY).replace(b"HTTP/1.1", b"HTTP/1.0", 1), False),
    "HTTP/1.0, keep-alive": (
        _answer("200 OK", BODY, "Connection: Keep-Alive").replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        True,
    ),
    # Received with the body (a small one): left in the reader, not in the socket.
    "bytes past a small body": (_answer("200 OK", BODY[:100]) + b"HTTP/1.1 200 OK\r\n", False),
}


@pytest.mark.parametrize("case", KEPT)
def test_a_connection_is_kept_only_when_it_can_carry_the_next_answer(store_dir, raw, case):
    answer, kept = KEPT[case]
    body = BODY[:100] if "small" in case else BODY
    server = raw(lambda head: answer if "/a " in head else _answer("200 OK", OTHER))
    with Store(store_dir, retries=0) as s:
        assert s.get(f"{server.base}/a", sha256=sha(body)).read_bytes() == body
        assert s.get(f"{server.base}/b", sha256=sha(OTHER)).read_bytes() == OTHER
    (first, _), (second, _) = server.seen
    assert (first == second) is kept
    assert_store_consistent(store_dir)
