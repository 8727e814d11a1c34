"""The Python API against a real origin on 127.0.0.1."""

from __future__ import annotations

import io
import os
import pickle
import stat

import pytest

import casstore
from casstore import (
    AmbiguousRef,
    CasError,
    DownloadError,
    HashMismatch,
    IntegrityFailure,
    InvalidInput,
    NotFound,
    Store,
)

from .conftest import assert_store_consistent, blob, sha

pytestmark = pytest.mark.timeout(60)


def test_get_downloads_once_then_hits(store, store_dir, origin):
    data = blob(200_000)
    url = origin.add("/pkg.tar.bz2", data)
    path = store.get(url, sha256=sha(data), name="pkg")
    assert path == store_dir / "sha256" / sha(data)[:2] / sha(data)[2:4] / sha(data)
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.get(url, sha256=sha(data)) == path
    assert origin.count("/pkg.tar.bz2") == 1
    info = store.info("pkg")
    assert info.sources == (url,) and info.names == ("pkg",) and info.size == len(data)
    assert info.blake3
    assert_store_consistent(store_dir)


def test_hit_is_served_with_the_server_stopped(store, origin):
    data = b"offline"
    url = origin.add("/a", data)
    store.get(url, sha256=sha(data))
    origin.close()
    assert store.get(url, sha256=sha(data)).read_bytes() == data
    assert store.get("http://127.0.0.1:9/elsewhere", sha256=sha(data)).read_bytes() == data


def test_trust_on_first_use_records_digest_for_url(store, origin, caplog):
    data = b"tofu"
    url = origin.add("/tofu", data)
    with caplog.at_level("WARNING", logger="casstore"):
        path = store.get(url)
    assert path.name == sha(data)
    assert sha(data) in caplog.text
    origin.routes["/tofu"].body = b"changed upstream"
    assert store.get(url) == path
    assert origin.count("/tofu") == 1


def test_hash_mismatch_leaves_nothing_behind(store, store_dir, origin):
    url = origin.add("/bad", b"evil bytes")
    with pytest.raises(HashMismatch) as err:
        store.get(url, sha256=sha(b"good bytes"))
    assert isinstance(err.value, IntegrityFailure) and err.value.exit_code == 3
    assert err.value.expected == sha(b"good bytes") and err.value.actual == sha(b"evil bytes")
    assert not store.layout.object_path(sha(b"evil bytes")).exists()
    assert not store.layout.object_path(sha(b"good bytes")).exists()
    assert store.index.get_object(sha(b"evil bytes")) is None
    assert os.listdir(store_dir / "tmp") == []
    assert_store_consistent(store_dir)


def test_http_404_is_a_download_error_naming_status_and_url(store, origin):
    with pytest.raises(DownloadError) as err:
        store.get(origin.url("/missing"), sha256="a" * 64)
    assert "404" in str(err.value) and "/missing" in str(err.value)
    assert err.value.exit_code == 4 and err.value.status == 404


def test_bad_input_is_refused_before_any_request(store, origin):
    url = origin.add("/x", b"x")
    for kwargs in ({"sha256": "abc"}, {"sha256": "g" * 64}, {"link": "teleport"}):
        with pytest.raises(InvalidInput):
            store.get(url, **kwargs)
    with pytest.raises(InvalidInput, match="scheme"):
        store.get("ftp://127.0.0.1/x", sha256="a" * 64)
    assert origin.requests() == []


def test_sha256_prefix_and_uppercase_accepted(store, origin):
    data = b"case"
    url = origin.add("/c", data)
    assert store.get(url, sha256="sha256:" + sha(data).upper()).name == sha(data)


def test_file_url(store, tmp_path):
    src = tmp_path / "local.bin"
    src.write_bytes(b"local bytes")
    assert store.get(src.as_uri(), sha256=sha(b"local bytes")).read_bytes() == b"local bytes"
    with pytest.raises(DownloadError) as err:
        store.get((tmp_path / "nope").as_uri(), sha256="a" * 64)
    assert err.value.exit_code == 4


def test_get_with_dest_hardlinks_and_records_link(store, origin, tmp_path):
    data = b"linked"
    url = origin.add("/l", data)
    dest = tmp_path / "out" / "l.bin"
    assert store.get(url, sha256=sha(data), dest=dest) == dest
    obj = store.layout.object_path(sha(data))
    assert os.stat(dest).st_ino == obj.stat().st_ino
    links = store.info(sha(data)).links
    assert links[0]["path"] == str(dest) and links[0]["method"] == "hardlink"


def test_put_path_bytes_and_stream(store, tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"one")
    assert store.put(f) == sha(b"one")
    assert store.put(b"two", name="second") == sha(b"two")
    assert store.put(io.BytesIO(b"three")) == sha(b"three")
    assert store.path("second").read_bytes() == b"two"
    with pytest.raises(InvalidInput):
        store.put(tmp_path / "missing")


def test_refs_resolve_and_fail_clearly(store):
    a = store.put(b"alpha", name="alpha")
    assert store.path(a) == store.path("sha256:" + a) == store.path(a[:8]) == store.path("alpha")
    with store.open("alpha") as f:
        assert f.read() == b"alpha"
    with pytest.raises(NotFound):
        store.path("no-such-name")
    with pytest.raises(NotFound):
        store.path("f" * 64)
    with pytest.raises(InvalidInput):
        store.path("abc")
    with pytest.raises(InvalidInput):
        store.path("sha256:xyz")


def test_ambiguous_prefix_lists_candidates(store):
    # Two digests sharing 8 hex characters cost ~2**32 hashes to find, so the
    # files are laid out by hand: ref resolution only reads names.
    store.put(b"seed")
    names = ["deadbeef" + "0" * 56, "deadbeef" + "1" * 56]
    for name in names:
        p = store.layout.object_path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    with pytest.raises(AmbiguousRef) as err:
        store.path("deadbeef")
    assert err.value.candidates == names and err.value.exit_code == 2
    assert names[0] in str(err.value) and names[1] in str(err.value)
    assert store.path("deadbeef0").name == names[0]


def test_dangling_row_is_a_miss_and_healed(store, origin):
    data = b"heal me"
    url = origin.add("/h", data)
    path = store.get(url, sha256=sha(data))
    os.chmod(path, 0o644)
    path.unlink()
    assert store.get(url, sha256=sha(data)).read_bytes() == data
    assert origin.count("/h") == 2
    store.put(b"gone", name="gone")
    store.layout.object_path(sha(b"gone")).unlink()
    with pytest.raises(NotFound):
        store.path("gone")
    assert store.index.get_object(sha(b"gone")) is None


def test_wrong_size_object_is_never_served(store, origin):
    data = b"genuine content"
    url = origin.add("/w", data)
    path = store.get(url, sha256=sha(data))
    os.chmod(path, 0o644)
    path.write_bytes(b"tampered")
    assert store.get(url, sha256=sha(data)).read_bytes() == data
    assert origin.count("/w") == 2


def test_pin_unpin_rm(store, tmp_path):
    d = store.put(b"pinned", name="p")
    store.pin("p")
    assert store.info(d).pinned
    store.unpin(d)
    assert not store.info(d).pinned
    assert store.rm("p") == "name"
    assert store.info(d).names == ()
    store.link(d, tmp_path / "live")
    with pytest.raises(InvalidInput, match="live link"):
        store.rm(d)
    assert store.rm(d, force=True) == "object"
    with pytest.raises(NotFound):
        store.path(d)
    assert (tmp_path / "live").read_bytes() == b"pinned"


def test_stats_and_ls(store, tmp_path):
    d = store.put(b"12345", name="five")
    store.link(d, tmp_path / "x")
    s = store.stats()
    assert (s.objects, s.bytes, s.names, s.links, s.temp_files) == (1, 5, 1, 1, 0)
    assert s.saved_bytes == 5
    assert [o.sha256 for o in store.ls()] == [d]


def test_errors_pickle_with_their_fields():
    err = HashMismatch("sha256 mismatch for u", url="u", expected="a", actual="b")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is HashMismatch and str(back) == str(err)
    assert (back.url, back.expected, back.actual) == ("u", "a", "b")
    assert isinstance(back, CasError)


def test_public_surface_is_pinned():
    assert sorted(casstore.__all__) == sorted(
        [
            "AmbiguousRef",
            "Artifact",
            "BatchError",
            "CasError",
            "CorruptObject",
            "DownloadError",
            "GcReport",
            "HashMismatch",
            "IntegrityFailure",
            "InvalidInput",
            "LinkMode",
            "LinkResult",
            "LockTimeout",
            "NotFound",
            "ObjectInfo",
            "Published",
            "Request",
            "SizeMismatch",
            "Stats",
            "Store",
            "VerifyReport",
            "__version__",
        ]
    )
    for name in casstore.__all__:
        assert hasattr(casstore, name)


def test_default_store_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CASSTORE_DIR", str(tmp_path / "envstore"))
    assert Store().root == tmp_path / "envstore"
    monkeypatch.delenv("CASSTORE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Store().root == tmp_path / "xdg" / "casstore"
