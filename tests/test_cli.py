"""The command line, run as a real process against a real origin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import assert_store_consistent, blob, run_probed, sha

pytestmark = pytest.mark.timeout(120)


def test_get_prints_path_then_hits(run_cli, origin, store_dir):
    data = blob(50_000)
    url = origin.add("/tool.tar.gz", data)
    first = run_cli("get", url, "--sha256", sha(data))
    assert first.returncode == 0, first.stderr
    path = first.stdout.decode().strip()
    assert path == str(store_dir / "sha256" / sha(data)[:2] / sha(data)[2:4] / sha(data))
    again = run_cli("get", url, "--sha256", sha(data))
    assert again.stdout == first.stdout and origin.count("/tool.tar.gz") == 1
    assert_store_consistent(store_dir)


def test_get_output_dest_and_json(run_cli, origin, tmp_path, store_dir):
    data = b"wheel bytes"
    url = origin.add("/a-1.0-py3-none-any.whl", data)
    dest = tmp_path / "wheels" / "a.whl"
    r = run_cli("--json", "get", url, "--sha256", sha(data), "-o", str(dest), "--name", "a")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["sha256"] == sha(data) and doc["size"] == len(data)
    assert doc["dest"] == str(dest) and doc["method"] == "hardlink"
    assert os.stat(dest).st_ino == os.stat(doc["path"]).st_ino
    info = json.loads(run_cli("--json", "info", "a").stdout)
    assert info["links"][0]["path"] == str(dest) and info["sources"] == [url]


def test_trust_on_first_use_prints_digest_on_stderr(run_cli, origin):
    url = origin.add("/t", b"tofu")
    r = run_cli("get", url)
    assert r.returncode == 0
    assert sha(b"tofu") in r.stderr.decode() and "first use" in r.stderr.decode()
    assert r.stdout.decode().strip().endswith(sha(b"tofu"))


def test_malformed_sha256_exits_2_before_any_request(run_cli, origin):
    url = origin.add("/x", b"x")
    r = run_cli("get", url, "--sha256", "not-a-digest")
    assert r.returncode == 2
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "not-a-digest" in err
    assert origin.requests() == []


def test_hash_mismatch_exits_3_and_leaves_nothing(run_cli, origin, store_dir):
    url = origin.add("/bad", b"wrong")
    r = run_cli("get", url, "--sha256", sha(b"right"))
    assert r.returncode == 3
    assert "/bad" in r.stderr.decode() and len(r.stderr.decode().strip().splitlines()) == 1
    assert [p for p in (store_dir / "sha256").rglob("*") if p.is_file()] == []
    assert os.listdir(store_dir / "tmp") == []
    assert_store_consistent(store_dir)


def test_404_exits_4(run_cli, origin):
    r = run_cli("get", origin.url("/nope"), "--sha256", "a" * 64)
    assert r.returncode == 4 and "404" in r.stderr.decode()


def test_unsupported_scheme_exits_2(run_cli):
    r = run_cli("get", "ftp://127.0.0.1/x", "--sha256", "a" * 64)
    assert r.returncode == 2 and "ftp" in r.stderr.decode()


def test_password_never_appears_anywhere(run_cli, origin, store_dir):
    data = b"secret package"
    origin.add("/private/p.whl", data, auth=("alice", "hunter2-s3cret"))
    url = origin.base.replace("http://", "http://alice:hunter2-s3cret@") + "/private/p.whl"
    ok = run_cli("--json", "get", url, "--sha256", sha(data))
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("get", url, "--sha256", sha(b"other"))
    missing = run_cli("get", url.replace("/private/p.whl", "/private/none"), "--sha256", "b" * 64)
    assert (bad.returncode, missing.returncode) == (3, 4)
    info = run_cli("--json", "info", sha(data))
    for r in (ok, bad, missing, info):
        assert b"hunter2" not in r.stdout + r.stderr
    for f in store_dir.glob("index.db*"):
        assert b"hunter2" not in f.read_bytes()
    assert "***@127.0.0.1" in json.loads(info.stdout)["sources"][0]


def test_put_path_cat_ls_stats_dir(run_cli, tmp_path, store_dir):
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights")
    r = run_cli("put", str(f), "--name", "model")
    assert r.returncode == 0 and r.stdout.decode().strip() == sha(b"weights")
    r = run_cli("put", "-", input=b"from stdin")
    assert r.stdout.decode().strip() == sha(b"from stdin")
    assert run_cli("cat", "model").stdout == b"weights"
    assert run_cli("path", sha(b"weights")[:10]).stdout.decode().strip().endswith(sha(b"weights"))
    ls = json.loads(run_cli("--json", "ls").stdout)
    assert {o["sha256"] for o in ls} == {sha(b"weights"), sha(b"from stdin")}
    assert all({"sha256", "size", "path"} <= o.keys() for o in ls)
    assert "model" in run_cli("ls").stdout.decode()
    stats = json.loads(run_cli("--json", "stats").stdout)
    assert stats["objects"] == 2 and stats["bytes"] == len(b"weights") + len(b"from stdin")
    assert run_cli("dir").stdout.decode().strip() == str(store_dir)
    assert json.loads(run_cli("--json", "dir").stdout)["path"] == str(store_dir)
    assert_store_consistent(store_dir)


def test_put_missing_file_exits_2_and_writes_nothing(run_cli, tmp_path, store_dir):
    good = tmp_path / "good"
    good.write_bytes(b"good")
    r = run_cli("put", str(good), str(tmp_path / "missing"))
    assert r.returncode == 2 and "missing" in r.stderr.decode()
    assert not (store_dir / "sha256").exists() or not list((store_dir / "sha256").rglob("*good*"))
    assert run_cli("path", sha(b"good")).returncode == 5


def test_refs_exit_codes(run_cli, store_dir):
    run_cli("put", "-", input=b"x")
    assert run_cli("path", "unknown-name").returncode == 5
    assert run_cli("path", "abc").returncode == 2
    assert run_cli("path", "sha256:zz").returncode == 2
    assert run_cli("cat", "f" * 64).returncode == 5


def test_link_pin_unpin_rm(run_cli, tmp_path):
    d = run_cli("put", "-", "--name", "n", input=b"linkable").stdout.decode().strip()
    dest = tmp_path / "d" / "file"
    r = run_cli("--json", "link", "n", str(dest))
    assert r.returncode == 0 and json.loads(r.stdout)["method"] == "hardlink"
    assert dest.read_bytes() == b"linkable"
    pinned = json.loads(run_cli("--json", "pin", "n").stdout)
    assert pinned["pinned"] is True and pinned["sha256"] == d and pinned["size"] == 8
    assert pinned["path"].endswith(d)
    assert json.loads(run_cli("--json", "info", d).stdout)["pinned"] is True
    assert run_cli("unpin", d).returncode == 0
    assert run_cli("rm", d).returncode == 2  # live link
    assert run_cli("rm", "n").returncode == 0
    assert run_cli("path", "n").returncode == 5
    assert run_cli("rm", "--force", d).returncode == 0
    assert run_cli("path", d).returncode == 5


def test_store_option_and_version(run_cli, tmp_path):
    other = tmp_path / "other"
    r = run_cli("--store", str(other), "put", "-", input=b"elsewhere", store=False)
    assert r.returncode == 0 and (other / "index.db").exists()
    v = run_cli("--version")
    assert v.returncode == 0 and "casstore" in v.stdout.decode()


def test_bad_usage_exits_2(run_cli):
    assert run_cli("get").returncode == 2
    assert run_cli("no-such-command").returncode == 2
    assert run_cli("get", "http://127.0.0.1/x", "--link", "teleport").returncode == 2


def test_quiet_silences_messages(run_cli, origin):
    url = origin.add("/q", b"quiet")
    r = run_cli("-q", "get", url)
    assert r.returncode == 0 and r.stderr == b""


def test_fast_hit_path_matches_full_command_line(run_cli, origin, store_dir, tmp_path):
    data = b"fast"
    url = origin.add("/fast", data)
    full = run_cli("--json", "get", url, "--sha256", sha(data))  # miss: full CLI
    expected = json.loads(full.stdout)["path"]
    for args in (
        ("get", url, "--sha256", sha(data)),
        ("get", "--sha256", sha(data), url),
        ("-q", "get", url, f"--sha256={sha(data)}"),
        ("--store", str(store_dir), "get", url, "--sha256", sha(data).upper()),
    ):
        r = run_cli(*args)
        assert r.returncode == 0 and r.stdout.decode().strip() == expected, args
    assert origin.count("/fast") == 1
    # Not hits: the full command line answers, with its errors and exit codes.
    assert run_cli("get", url, "--sha256", "bad").returncode == 2
    assert run_cli("get", "ftp://x/y", "--sha256", sha(data)).returncode == 2
    other = run_cli("--store", str(tmp_path / "empty"), "get", url, "--sha256", sha(data))
    assert other.returncode == 0 and origin.count("/fast") == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("store_arg", "env", "root"),
    [
        (["--store", "rel/./s//"], {}, "rel/s"),
        (["--store", "~/s"], {"HOME": "{tmp}/home"}, "home/s"),
        ([], {"CASSTORE_DIR": "{tmp}/env//s/"}, "env/s"),
        ([], {"XDG_CACHE_HOME": "{tmp}/xdg"}, "xdg/casstore"),
    ],
    ids=["relative", "home", "env", "default"],
)
def test_hit_and_miss_print_the_same_path_however_the_store_is_spelled(
    origin, tmp_path, store_arg, env, root
):
    data = b"spelled"
    url = origin.add("/spelled", data)
    full_env = {k: v for k, v in os.environ.items() if k != "CASSTORE_DIR"}
    full_env.update({k: v.format(tmp=tmp_path) for k, v in env.items()})
    args = [*store_arg, "get", url, "--sha256", sha(data)]
    miss = subprocess.run(
        [sys.executable, "-m", "casstore", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        timeout=30,
    )
    # The hit must be served by the fast path (hit.py), which spells the root itself.
    hit = run_probed("casstore.__main__", ("click",), *args, cwd=tmp_path, env=full_env)
    assert miss.returncode == 0 and hit.returncode == 0, (miss.stderr, hit.stderr)
    assert hit.stdout == miss.stdout
    assert b"LOADED []" in hit.stderr and b"IMPORTED" not in hit.stderr, hit.stderr
    path = miss.stdout.decode().strip()
    assert path == f"{tmp_path}/{root}/sha256/{sha(data)[:2]}/{sha(data)[2:4]}/{sha(data)}"
    assert Path(path).is_file()
    assert origin.count("/spelled") == 1


def test_a_url_the_fast_path_leaves_alone_still_hits(run_cli, origin, store_dir):
    data = b"query"
    url = origin.add("/q", data) + "?token=secret&x=1"
    first = run_cli("get", url, "--sha256", sha(data))
    again = run_cli("get", url, "--sha256", sha(data))
    assert first.returncode == 0 and again.stdout == first.stdout
    assert origin.count("/q") == 1


def test_get_size_reads_units_and_a_wrong_size_is_never_published(run_cli, origin, store_dir):
    data = blob(1024, seed=9)
    url = origin.add("/kib", data)
    wrong = run_cli("get", url, "--sha256", sha(data), "--size", "1KB")  # 1000 bytes
    assert wrong.returncode == 3 and "size" in wrong.stderr.decode()
    assert [p for p in (store_dir / "sha256").rglob("*") if p.is_file()] == []
    assert run_cli("get", url, "--sha256", sha(data), "--size", "lots").returncode == 2
    ok = run_cli("get", url, "--sha256", sha(data), "--size", "1KiB")
    assert ok.returncode == 0, ok.stderr
    assert_store_consistent(store_dir)


def test_rm_of_a_name_that_spells_a_digest_prefix_removes_the_name(run_cli, tmp_path):
    d = run_cli("put", "-", "--name", "cafebabe", input=b"named like hex").stdout.decode().strip()
    r = run_cli("rm", "cafebabe")
    assert r.returncode == 0 and "removed name" in r.stdout.decode()
    assert run_cli("path", d).returncode == 0  # the object stays
    assert run_cli("path", "cafebabe").returncode in (2, 5)


def test_reading_a_store_that_is_not_there_creates_nothing(run_cli, tmp_path):
    missing = tmp_path / "nowhere"
    env = {"CASSTORE_DIR": str(missing)}
    assert run_cli("path", "abc123", env=env, store=False).returncode == 2
    assert run_cli("info", "nosuch", env=env, store=False).returncode == 5
    assert run_cli("cat", "f" * 64, env=env, store=False).returncode == 5
    assert json.loads(run_cli("--json", "ls", env=env, store=False).stdout) == []
    assert json.loads(run_cli("--json", "stats", env=env, store=False).stdout)["objects"] == 0
    assert not missing.exists()


def test_stdin_given_twice_is_bad_input(run_cli, store_dir):
    r = run_cli("put", "-", "-", input=b"once")
    assert r.returncode == 2 and "stdin" in r.stderr.decode()
    assert not (store_dir / "sha256").exists()


def test_channel_tokens_are_redacted_in_errors_and_the_index(run_cli, origin, store_dir):
    data = b"private channel"
    origin.add("/t/SECRET-TOKEN-123/chan/x-1.0-0.conda", data)
    url = origin.url("/t/SECRET-TOKEN-123/chan/x-1.0-0.conda")
    missing = run_cli("get", url.replace("x-1.0", "y-1.0"), "--sha256", "a" * 64)
    ok = run_cli("--json", "get", url, "--sha256", sha(data))
    info = run_cli("--json", "info", sha(data))
    assert (missing.returncode, ok.returncode, info.returncode) == (4, 0, 0)
    for r in (missing, ok, info):
        assert b"SECRET-TOKEN" not in r.stdout + r.stderr
    assert "/t/***/chan/" in json.loads(info.stdout)["sources"][0]
    for f in store_dir.glob("index.db*"):
        assert b"SECRET-TOKEN" not in f.read_bytes()


def test_fast_hit_path_survives_a_closed_or_broken_stdout(run_cli, origin, store_dir):
    import subprocess
    import sys

    data = b"pipe"
    url = origin.add("/pipe", data)
    assert run_cli("get", url, "--sha256", sha(data)).returncode == 0
    env = {**os.environ, "CASSTORE_DIR": str(store_dir)}
    cmd = [sys.executable, "-m", "casstore", "get", url, "--sha256", sha(data)]
    closed = subprocess.run(
        cmd,
        env=env,
        stdout=None,
        stderr=subprocess.PIPE,
        timeout=30,
        close_fds=True,
        preexec_fn=lambda: os.close(1),
    )
    assert b"Traceback" not in closed.stderr
    with open("/dev/full", "w") as full:
        r = subprocess.run(cmd, env=env, stdout=full, stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1


def test_ambiguous_prefix_exits_2_listing_candidates(run_cli, store_dir):
    run_cli("put", "-", input=b"seed")  # lays out the store
    names = ["deadbeef" + "0" * 56, "deadbeef" + "1" * 56]
    for name in names:  # laid out by hand: real 8-hex collisions cost ~2**32 hashes
        p = store_dir / "sha256" / name[:2] / name[2:4] / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    r = run_cli("path", "deadbeef")
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1
    assert names[0] in err and names[1] in err


def test_cat_into_a_closed_pipe_is_not_an_error(store_dir):
    import subprocess
    import sys

    from casstore import Store

    with Store(store_dir) as store:
        digest = store.put(blob(4 << 20, seed=3))
    env = {**os.environ, "CASSTORE_DIR": str(store_dir)}
    cat = subprocess.Popen(
        [sys.executable, "-m", "casstore", "cat", digest],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    cat.stdout.read(10)
    cat.stdout.close()  # the reader leaves early, like `| head -c 10`
    _, err = cat.communicate(timeout=30)
    assert cat.returncode == 0 and b"Traceback" not in err


def test_readme_setup_example_runs(run_cli):
    readme = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
    r = run_cli("get", "file://" + os.path.abspath(readme))
    assert r.returncode == 0 and "first use" in r.stderr.decode()
    assert os.path.isfile(r.stdout.decode().strip())


def test_a_url_with_bytes_that_are_not_utf8(run_cli, store_dir, tmp_path):
    # As a raw byte on the command line: bad input, one line, nothing stored.
    name = os.fsdecode(b"f\xffx")
    (tmp_path / name).write_bytes(b"latin")
    raw = os.fsencode(f"file://{tmp_path}/") + b"f\xffx"
    r = subprocess.run(
        [sys.executable, "-m", "casstore", "get", raw],
        capture_output=True,
        env={**os.environ, "CASSTORE_DIR": str(store_dir)},
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    err = r.stderr.decode()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not UTF-8" in err and "\\xff" in err
    objects = store_dir / "sha256"
    assert not objects.exists() or not [p for p in objects.rglob("*") if p.is_file()]
    # Percent-encoded, the byte names that file.
    r = run_cli("get", f"file://{tmp_path}/f%FFx", "--sha256", sha(b"latin"))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.decode().strip()).read_bytes() == b"latin"
    assert_store_consistent(store_dir)


def test_the_command_line_closes_its_index_before_it_exits(run_cli, origin, store_dir, tmp_path):
    # It leaves without the interpreter's teardown (__main__._exit), so its store
    # is closed first: SQLite checkpoints and removes the WAL, as at any close.
    # Enough items for a batch's worker threads, each with a connection of its own.
    items = [blob(100, seed=i) for i in range(40)]
    listing = tmp_path / "list.txt"
    lines = [f"{origin.add(f'/c{i}', d)} {sha(d)}\n" for i, d in enumerate(items)]
    listing.write_text("".join(lines))
    r = run_cli("fetch", str(listing))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.decode().splitlines()) == 40
    assert (store_dir / "index.db").exists()
    assert not (store_dir / "index.db-wal").exists()
    assert_store_consistent(store_dir, indexed=True)


def test_a_hit_that_turns_out_a_miss_closes_its_index_too(run_cli, origin, store_dir):
    # The fast path (hit.py) read the index, then finds the object bad and hands
    # over to the full command line: its connection must not outlive it (the
    # collector is off here, as it may not run before the quick exit).
    data = b"gets healed"
    url = origin.add("/heal", data)
    assert run_cli("get", url, "--sha256", sha(data)).returncode == 0
    obj = store_dir / "sha256" / sha(data)[:2] / sha(data)[2:4] / sha(data)
    obj.chmod(0o644)
    with open(obj, "ab") as f:
        f.write(b"!")  # the wrong size: not a hit
    code = (
        "import gc, sys\n"
        "gc.disable()\n"
        "from casstore.__main__ import main\n"
        f"sys.argv = ['casstore', 'get', {url!r}, '--sha256', {sha(data)!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "CASSTORE_DIR": str(store_dir)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert obj.read_bytes() == data
    assert not (store_dir / "index.db-wal").exists()


_QUICK_EXIT = """
import atexit, sys, threading, time
from casstore.__main__ import _exit
atexit.register(lambda: print("atexit ran", end=""))
sys.stdout.write("buffered;")
if sys.argv[1] == "thread":
    def late():
        time.sleep(0.5)  # still running when _exit looks
        print("thread done;", end="")
    threading.Thread(target=late).start()
_exit(5)
"""


@pytest.mark.parametrize(
    ("mode", "out"),
    [("alone", "buffered;atexit ran"), ("thread", "buffered;thread done;atexit ran")],
)
def test_the_quick_exit_flushes_runs_atexit_and_waits_for_threads(mode, out):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as usual
    r = subprocess.run(
        [sys.executable, "-c", _QUICK_EXIT, mode], capture_output=True, env=env, timeout=30
    )
    assert (r.returncode, r.stdout.decode(), r.stderr) == (5, out, b"")
