"""``casstore fetch FILE``: the list grammar, and batches of real processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from casstore import InvalidInput
from casstore.ingest import parse_temp_name
from casstore.lists import parse_explicit_lines, parse_lines, requests_for

from .conftest import assert_store_consistent, blob, sha

pytestmark = pytest.mark.timeout(90)
A = "a" * 64
B = "b" * 64
M = "c" * 32


def test_all_line_forms_comments_and_explicit():
    text = f"""
# a comment, then a blank line

https://h/x/a.tar.gz#{A}
https://h/x/b.tar.gz  {B.upper()}  bee   # trailing comment
https://h/x/c.tar.gz sha256:{A}
@EXPLICIT
https://h/x/d.conda#{M}
https://h/x/e.conda#sha256:{B}
"""
    entries = parse_lines(text.splitlines(), source="l.txt")
    got = [(e.url, e.sha256, e.md5, e.name, e.line, e.file_name) for e in entries]
    assert got == [
        ("https://h/x/a.tar.gz", A, None, None, 4, "a.tar.gz"),
        ("https://h/x/b.tar.gz", B, None, "bee", 5, "b.tar.gz"),
        ("https://h/x/c.tar.gz", A, None, None, 6, "c.tar.gz"),
        ("https://h/x/d.conda", None, M, None, 8, "d.conda"),
        ("https://h/x/e.conda", B, None, None, 9, "e.conda"),
    ]
    reqs = requests_for(entries, "/dest")
    assert reqs[3].md5 == M and reqs[3].dest == os.path.join("/dest", "d.conda")


def test_explicit_lines_for_conda():
    lines = ["# platform: linux-64", "@EXPLICIT", f"https://c/linux-64/zlib-1.3-h0.conda#{M}"]
    (entry,) = parse_explicit_lines(lines, source="env.txt")
    assert (entry.md5, entry.sha256, entry.line, entry.file_name) == (
        M,
        None,
        3,
        "zlib-1.3-h0.conda",
    )


@pytest.mark.parametrize(
    "line, problem",
    [
        ("https://h/a.tar.gz", "no digest"),
        (f"https://h/a.tar.gz#{A[:-1]}", "invalid digest"),
        (f"https://h/a.tar.gz {A} name extra", "4 fields"),
        (f"ftp://h/a.tar.gz#{A}", "unsupported URL scheme"),
        (f"https://h/a.tar.gz#{A} {A}", "another field"),
        (f"https://h/a.tar.gz sha256:{M}", "invalid digest"),
    ],
)
def test_malformed_line_names_file_and_line(line, problem):
    with pytest.raises(InvalidInput, match=f"^l.txt:3: .*{problem}") as info:
        parse_lines(["# ok", f"https://h/ok#{A}", line], source="l.txt")
    assert info.value.exit_code == 2 and info.value.line == 3


def test_two_digests_for_one_dest_name_is_bad_input():
    entries = parse_lines([f"https://h/1/a.whl#{A}", f"https://h/2/a.whl#{B}"], source="l")
    with pytest.raises(InvalidInput, match=r"l:2: a\.whl is also line 1"):
        requests_for(entries, "/d")
    assert len(requests_for(entries)) == 2  # without --dest they do not collide


def test_malformed_list_exits_2_before_any_request(tmp_path, origin, run_cli, store_dir):
    data = b"x" * 100
    url = origin.add("/x.bin", data)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{url}#{sha(data)}\n\n{url} not-a-digest\n")
    r = run_cli("fetch", str(listing))
    assert r.returncode == 2
    assert r.stderr.decode().strip() == (
        f"casstore: error: {listing}:3: invalid digest 'not-a-digest': "
        "expected 64 hex (sha256) or 32 hex (md5)"
    )
    assert origin.requests() == []
    assert not (store_dir / "sha256").exists() or not any(os.walk(store_dir / "sha256"))[2]
    r = run_cli("fetch", str(tmp_path / "absent.txt"))
    assert r.returncode == 2 and b"absent.txt" in r.stderr


def test_fetch_dest_json_and_worst_exit_code(tmp_path, origin, run_cli, store_dir):
    good, other, bad = blob(3000, 1), blob(4000, 2), blob(5000, 3)
    md5 = hashlib.md5(other).hexdigest()
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"{origin.add('/p/good.tar.gz', good)}#{sha(good)}\n"
        f"{origin.add('/p/gone.tar.gz', good, status=404)} {sha(b'gone')}\n"
        f"{origin.add('/p/bad.tar.gz', bad)}#{sha(b'other bytes')}\n"
        "@EXPLICIT\n"
        f"{origin.add('/p/other.conda', other)}#{md5}\n"
    )
    dest = tmp_path / "dest"
    r = run_cli("--json", "fetch", str(listing), "-j", "3", "--dest", str(dest))
    assert r.returncode == 4, r.stderr  # worst of 3 (hash mismatch) and 4 (404)
    doc = json.loads(r.stdout)
    assert (doc["count"], doc["ok"], doc["failed"], doc["exit_code"]) == (4, 2, 2, 4)
    items = doc["items"]
    assert [i["status"] for i in items] == ["ok", "failed", "failed", "ok"]
    assert [i["exit_code"] for i in items] == [0, 4, 3, 0]
    assert items[0]["dest"] == str(dest / "good.tar.gz") and items[0]["size"] == 3000
    assert items[3]["sha256"] == sha(other)  # md5 verified, sha256 recorded
    assert "404" in items[1]["error"] and items[1]["url"].endswith("/p/gone.tar.gz")
    for item in (items[0], items[3]):
        assert os.stat(item["dest"]).st_ino == os.stat(item["path"]).st_ino
    err = r.stderr.decode()
    assert f"{listing}:2: " in err and f"{listing}:3: " in err
    assert err.strip().splitlines()[-1] == f"casstore: error: 2 of 4 items of {listing} failed"
    assert not (dest / "bad.tar.gz").exists()
    # Text mode: one path per fetched item, in order.
    r = run_cli("fetch", str(listing), "--dest", str(dest))
    assert r.stdout.decode().splitlines() == [str(dest / "good.tar.gz"), str(dest / "other.conda")]
    assert_store_consistent(store_dir)


def _conda_packages(seed: int) -> dict[str, bytes]:
    names = [
        "libgcc-ng-13.2.0-h77fa898_7.conda",
        "_openmp_mutex-4.5-2_gnu.tar.bz2",
        "libgomp-13.2.0-h77fa898_7.conda",
    ]
    return {n: blob(200_000 + i, seed=50 + i) for i, n in enumerate(names)}


def test_three_fetches_share_packages_into_one_dest(tmp_path, origin, store_dir):
    """The origin bug: parallel installers on overlapping lists into one directory."""
    shared = _conda_packages(0)
    gate = "libgcc-ng-13.2.0-h77fa898_7.conda"
    urls = {}
    for name, data in shared.items():
        kw = {"gate_after": 100_000} if name == gate else {}
        urls[name] = origin.add(f"/conda-forge/linux-64/{name}", data, **kw)
    lists = []
    for i in range(3):
        own = blob(10_000, seed=90 + i)
        own_name = f"tool{i}-1.0-0.tar.bz2"
        own_url = origin.add(f"/conda-forge/linux-64/{own_name}", own)
        if i == 0:
            lines = [f"{u}#{sha(shared[n])}" for n, u in urls.items()]
            lines.append(f"{own_url}#{sha(own)}")
        elif i == 1:
            lines = [f"{own_url} {sha(own)} {own_name}"]
            lines += [f"{u} {sha(shared[n])} {n}" for n, u in urls.items()]
        else:
            lines = [
                "# platform: linux-64",
                "@EXPLICIT",
                f"{own_url}#{hashlib.md5(own).hexdigest()}",
            ]
            lines += [f"{u}#sha256:{sha(shared[n])}" for n, u in urls.items()]
        path = tmp_path / f"env{i}.txt"
        path.write_text("\n".join(lines) + "\n")
        lists.append(path)
    dest = tmp_path / "pkgs"
    procs, errs = [], []
    cmd = [sys.executable, "-m", "casstore", "fetch", "-j", "4", "--dest", str(dest)]
    try:
        for i, listing in enumerate(lists):
            errs.append(tmp_path / f"err{i}")
            with open(errs[-1], "wb") as err:
                procs.append(
                    subprocess.Popen(
                        [*cmd, str(listing)],
                        env={**os.environ, "CASSTORE_DIR": str(store_dir)},
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
        # One process is downloading libgcc-ng; hold it until both others say
        # on stderr that they wait for it.
        route = origin.routes[f"/conda-forge/linux-64/{gate}"]
        assert route.sent_event.wait(30)
        deadline = time.monotonic() + 30
        while sum(f"fetch {urls[gate]}" in e.read_text() for e in errs) < 2:
            assert all(p.poll() is None for p in procs), [e.read_text() for e in errs]
            assert time.monotonic() < deadline, [e.read_text() for e in errs]
            time.sleep(0.01)
        route.gate.set()
        codes = [p.wait(60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0, 0], [e.read_text() for e in errs]
    for name, data in shared.items():
        assert origin.count(f"/conda-forge/linux-64/{name}") == 1, name
        obj = store_dir / "sha256" / sha(data)[:2] / sha(data)[2:4] / sha(data)
        assert os.stat(dest / name).st_ino == obj.stat().st_ino
        assert obj.stat().st_nlink == 2
    assert sorted(os.listdir(dest)) == sorted(
        [*shared, *(f"tool{i}-1.0-0.tar.bz2" for i in range(3))]
    )
    assert_store_consistent(store_dir)


def test_an_md5_and_a_sha256_for_one_dest_name_is_bad_input():
    lines = [f"https://h/a/x.bin#{'a' * 64}", f"https://h/b/x.bin#{'b' * 32}"]
    requests_for(parse_lines(lines), None)  # without --dest they do not collide
    with pytest.raises(InvalidInput, match=r"l\.txt:2: x\.bin is also line 1"):
        requests_for(parse_lines(lines, source="l.txt"), "/tmp/dest")


@pytest.mark.parametrize("segment", ["..%2F..%2Fescaped.txt", "..", "a%5Cb", "%2E%2E"])
def test_a_url_file_name_that_would_leave_dest_is_refused(
    segment, tmp_path, origin, run_cli, store_dir
):
    digest = run_cli("put", "-", input=b"payload").stdout.decode().strip()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{origin.base}/x/{segment}#{digest}\n")
    dest = tmp_path / "a" / "dest"
    r = run_cli("fetch", str(listing), "--dest", str(dest))
    assert r.returncode == 2, r.stderr
    assert "unsafe file name" in r.stderr.decode()
    assert not (tmp_path / "escaped.txt").exists() and not dest.exists()
    assert origin.requests() == []


def _held_fetch(store_dir, origin, tmp_path, n: int, *, jobs: int = 2, processes: int = 1):
    """A ``fetch -j JOBS`` of ``n`` items whose bodies the origin holds, once
    ``jobs`` downloads are held there: (process, items by path)."""
    items = {f"/c{i}.bin": blob(5000 + i, seed=900 + i) for i in range(n)}
    lines = [f"{origin.add(p, data, gate_after=0)}#{sha(data)}" for p, data in items.items()]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "CASSTORE_DIR": str(store_dir), "CASSTORE_PROCESSES": str(processes)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "casstore", "fetch", str(listing), "-j", str(jobs)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Python raises KeyboardInterrupt only if SIGINT was not ignored when it
        # started, as it is in a background job of a non-interactive shell.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while len(origin.requests()) < jobs:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    return proc, items


def _ctrl_c(proc, origin, items, *, twice: bool = False, release=None) -> tuple[str, str]:
    """Ctrl-C (SIGINT) to a held fetch, and with ``twice`` a second one once it
    has said it is stopping, before the origin lets the held downloads go (all
    at once, or as ``release()`` does): (its first stderr line, the rest) once
    it has exited."""
    try:
        proc.send_signal(signal.SIGINT)
        said = proc.stderr.readline().decode()
        if twice:
            proc.send_signal(signal.SIGINT)
        elif release is not None:
            release()
        else:
            for path in items:
                origin.routes[path].gate.set()
        _, err = proc.communicate(timeout=60)
    finally:
        for path in items:
            origin.routes[path].gate.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return said, err.decode().strip()


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_stops_a_fetch_after_the_downloads_under_way(jobs, store_dir, origin, tmp_path):
    proc, items = _held_fetch(store_dir, origin, tmp_path, 40, jobs=jobs)
    said, err = _ctrl_c(proc, origin, items)
    assert f"stopping: waiting for {jobs} download(s) under way" in said, said
    assert (proc.returncode, err) == (1, "casstore: aborted")
    # Those under way finished and are stored; nothing else was asked for.
    held = [seen.path for seen in origin.requests()]
    assert len(held) == jobs, held
    for path in held:
        digest = sha(items[path])
        assert (store_dir / "sha256" / digest[:2] / digest[2:4] / digest).is_file()
    assert_store_consistent(store_dir)


def _indexed(store_dir, digest: str) -> bool:
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{store_dir / 'index.db'}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        row = db.execute("SELECT 1 FROM objects WHERE sha256 = ?", (digest,)).fetchone()
    except sqlite3.Error:  # not made yet
        return False
    finally:
        db.close()
    return row is not None


def test_ctrl_c_stops_a_batchs_helper_after_its_item_in_hand(store_dir, origin, tmp_path):
    """The batch's own download ends first; the helper's item in hand, let go
    only then, is still fetched and indexed: the batch waits for the helper to
    end (a second at most) rather than kill it with its reports unsent."""
    # One batch worker and the helper, each held on its first item.
    proc, items = _held_fetch(store_dir, origin, tmp_path, 300, jobs=2, processes=2)
    assert sorted(seen.path for seen in origin.requests()) == ["/c0.bin", "/c299.bin"]

    def stored(path: str) -> Path:
        digest = sha(items[path])
        return store_dir / "sha256" / digest[:2] / digest[2:4] / digest

    def release() -> None:
        origin.routes["/c0.bin"].gate.set()
        # Its row is written as the batch closes, just before it ends the helper.
        deadline = time.monotonic() + 60
        while not _indexed(store_dir, sha(items["/c0.bin"])):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        origin.routes["/c299.bin"].gate.set()

    said, err = _ctrl_c(proc, origin, items, release=release)
    assert "stopping: waiting for 1 download(s) under way" in said, said  # the batch's own
    assert (proc.returncode, err) == (1, "casstore: aborted")
    assert sorted(seen.path for seen in origin.requests()) == ["/c0.bin", "/c299.bin"]
    assert stored("/c299.bin").is_file()
    assert_store_consistent(store_dir, indexed=True)


def test_a_second_ctrl_c_leaves_at_once(store_dir, origin, tmp_path):
    proc, items = _held_fetch(store_dir, origin, tmp_path, 10)
    said, err = _ctrl_c(proc, origin, items, twice=True)  # the origin still holds both
    assert "stopping" in said, said
    assert (proc.returncode, err) == (1, "casstore: aborted")
    assert len(origin.requests()) == 2
    # What the two left is a dead writer's temps each, gc's to sweep, as after a kill.
    temps = os.listdir(store_dir / "tmp")
    assert len(temps) == 2 and all(parse_temp_name(t)[1] == proc.pid for t in temps), temps
    assert_store_consistent(store_dir, allow_temps=True)
