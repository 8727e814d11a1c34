"""``casstore conda fetch``: explicit files, conda-lock.yml and pixi.lock into a pkgs dir."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from casstore import InvalidInput
from casstore import conda as conda_
from casstore.urls import plain_url

from . import channel
from .conftest import assert_store_consistent

pytestmark = pytest.mark.timeout(60)

UNIQUE = (
    channel.Spec("zlib", "1.3.1", "hb9d3cd8_2", payload=30_000),
    channel.Spec("python_abi", "3.12", "5_cp312", ".tar.bz2", payload=1000),
    channel.Spec("numpy", "2.1.3", "py312h58c1407_0", payload=300_000),
    channel.Spec("tzdata", "2025a", "h78e105d_0", ".tar.bz2", subdir="noarch", payload=9000),
    channel.Spec("libstdcxx-ng", "14.2.0", "h4852527_2", payload=20_000),
    channel.Spec("ca-certificates", "2025.1.31", "hbcca054_0", payload=5000),
)
FORMATS = [
    "explicit-md5",
    "explicit-sha256",
    "explicit-sha256-prefixed",
    "conda-lock",
    "conda-lock-md5-only",
    "pixi-v5",
    "pixi-v6",
    "pixi-v7",
]


@pytest.fixture
def packages(origin) -> list[channel.Package]:
    return channel.serve(origin, channel.SHARED + UNIQUE)


def write_lock(fmt: str, pkgs, path: Path) -> Path:
    if fmt.startswith("explicit"):
        hashes = {"md5": "md5", "sha256": "sha256", "sha256-prefixed": "sha256:"}
        return channel.explicit(pkgs, path, hashes=hashes[fmt.split("-", 1)[1]])
    if fmt.startswith("conda-lock"):
        return channel.conda_lock(pkgs, path, sha256=not fmt.endswith("md5-only"))
    return channel.pixi_lock(pkgs, path, version=int(fmt[-1]))


def fetch(store, lock, pkgs_dir, **kw):
    kw.setdefault("platform", "linux-64")
    return conda_.fetch(store, lock, pkgs_dir, **kw)


def urls_txt(pkgs_dir: Path) -> list[str]:
    return (pkgs_dir / "urls.txt").read_text().splitlines()


def assert_linked(store, pkgs_dir: Path, pkg: channel.Package) -> None:
    dest = pkgs_dir / pkg.file_name
    obj = store.layout.object_path(pkg.sha256)
    assert dest.stat().st_ino == obj.stat().st_ino, f"{dest} is not a hardlink to its object"
    assert dest.read_bytes() == pkg.data


# -- 1. every format ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_fetches_every_package_and_a_rerun_is_free(
    fmt, packages, origin, store, store_dir, tmp_path
):
    lock = write_lock(fmt, packages, tmp_path / "lock")
    pkgs_dir = tmp_path / "pkgs" / "nested"  # created on demand
    report = fetch(store, lock, pkgs_dir, concurrency=4)
    assert report.exit_code == 0, [str(r.error) for r in report.failed]
    assert report.lock.format.startswith(fmt.split("-")[0])
    assert [r.package.file_name for r in report.results] == [p.file_name for p in packages]
    for pkg in packages:
        assert_linked(store, pkgs_dir, pkg)
        assert origin.count(pkg.path) == 1
        info = store.info(pkg.sha256)
        assert pkg.file_name in info.names and pkg.url in info.sources
    requests = len(origin.requests())

    again = fetch(store, lock, pkgs_dir, concurrency=4)
    assert again.exit_code == 0
    assert len(origin.requests()) == requests, "a re-run sent requests"
    assert urls_txt(pkgs_dir) == [p.url for p in packages]
    assert_store_consistent(store_dir)


def test_pixi_records_keep_name_version_build_size(packages, tmp_path):
    for version in (5, 6, 7):
        lock = channel.pixi_lock(packages, tmp_path / f"pixi{version}.lock", version=version)
        read = conda_.read_lock(lock, platform="linux-64")
        numpy = next(p for p in read.packages if p.name == "numpy")
        assert (numpy.version, numpy.build) == ("2.1.3", "py312h58c1407_0")
        assert numpy.dist == "numpy-2.1.3-py312h58c1407_0"
        src = next(p for p in packages if p.spec.name == "numpy")
        assert (numpy.size, numpy.md5, numpy.sha256) == (len(src.data), src.md5, src.sha256)


def test_platform_and_environment_select_packages(origin, tmp_path):
    here = conda_.current_platform()
    other = "win-64" if here != "win-64" else "linux-64"
    specs = (
        channel.Spec("a", "1", subdir=here),
        channel.Spec("b", "1", subdir=other),
        channel.Spec("c", "1", subdir="noarch", ext=".tar.bz2"),
    )
    pkgs = channel.serve(origin, specs)
    lock = channel.pixi_lock(pkgs, tmp_path / "pixi.lock", env="dev")
    doc = yaml.safe_load(lock.read_text())
    doc["environments"]["dev"]["packages"][here] = [{"conda": pkgs[0].url}]
    lock.write_text(yaml.safe_dump(doc))
    read = conda_.read_lock(lock, environment="dev")  # default platform: this machine's
    assert (read.platform, read.environment) == (here, "dev")
    assert [p.name for p in read.packages] == ["a"]
    assert [p.name for p in conda_.read_lock(lock, platform=other, environment="dev").packages] == [
        "b"
    ]
    cl = conda_.read_lock(channel.conda_lock(pkgs, tmp_path / "cl.yml"), platform=other)
    assert [p.name for p in cl.packages] == ["b"]


def test_pip_and_pypi_entries_are_skipped_with_a_note(packages, tmp_path):
    cl = conda_.read_lock(
        channel.conda_lock(packages, tmp_path / "cl.yml", pip=True), platform="linux-64"
    )
    assert len(cl.packages) == len(packages)
    assert len(cl.skipped) == 1 and "pip" in cl.skipped[0]
    for version in (5, 6, 7):
        px = conda_.read_lock(
            channel.pixi_lock(packages, tmp_path / "p.lock", version=version, pypi=True),
            platform="linux-64",
        )
        assert len(px.packages) == len(packages)
        assert len(px.skipped) == 1 and "pypi" in px.skipped[0]


# -- 2. the seed scenario -----------------------------------------------------------


CLI = (sys.executable, "-m", "casstore")


FLAGS = ("-j", "4", "--platform", "linux-64")


def _joined(outputs: list[list[str]]) -> list[str]:
    return [line for lines in outputs for line in lines]


def _reader(proc: subprocess.Popen, lines: list[str], needle: str, seen: threading.Semaphore):
    told = False
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        lines.append(line)
        if needle in line and not told:
            told = True
            seen.release()


@pytest.mark.parametrize("hashes", ["sha256", "md5-only"])
def test_three_processes_share_one_download_of_each_common_package(
    hashes, origin, store_dir, tmp_path
):
    """Three installs start together on three locks sharing libgcc, _openmp_mutex and
    libgomp: all succeed and each shared package is requested once.

    The origin stalls libgcc mid-body until both other processes report they are
    waiting for the one downloading it, so the three really overlap.
    """
    shared = channel.serve(origin, channel.SHARED)
    libgcc = next(p for p in shared if p.spec.name == "libgcc")
    route = origin.routes[libgcc.path]
    route.gate_after = 1000
    mine = [channel.serve(origin, UNIQUE[i * 2 : i * 2 + 2]) for i in range(3)]
    if hashes == "sha256":
        locks = [
            channel.explicit(shared + mine[0], tmp_path / "a.txt", hashes="sha256:"),
            channel.conda_lock(mine[1] + shared, tmp_path / "b.yml"),
            channel.pixi_lock(shared[::-1] + mine[2], tmp_path / "c.lock", version=6),
        ]
    else:
        locks = [
            channel.explicit(shared + mine[0], tmp_path / "a.txt", hashes="md5"),
            channel.conda_lock(mine[1] + shared, tmp_path / "b.yml", sha256=False),
            channel.explicit(shared[::-1] + mine[2], tmp_path / "c.txt", hashes="md5"),
        ]
    pkgs_dir = tmp_path / "pkgs"
    env = {**os.environ, "CASSTORE_DIR": str(store_dir)}
    procs, outputs, readers = [], [], []
    waiting = threading.Semaphore(0)  # released once per process waiting for libgcc
    for lock in locks:
        proc = subprocess.Popen(
            [*CLI, "conda", "fetch", str(lock), "--pkgs-dir", str(pkgs_dir), *FLAGS],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        lines: list[str] = []
        reader = threading.Thread(
            target=_reader, args=(proc, lines, f"fetch {libgcc.url}", waiting), daemon=True
        )
        reader.start()
        readers.append(reader)
        procs.append(proc)
        outputs.append(lines)
    try:
        assert route.sent_event.wait(30), "nobody started downloading libgcc"
        # The two others must be waiting on the one downloading libgcc.
        for _ in range(2):
            assert waiting.acquire(timeout=30), "".join(_joined(outputs))
        route.gate.set()
        codes = [p.wait(30) for p in procs]
    finally:
        route.gate.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for reader in readers:
            reader.join(10)
        for p in procs:
            p.stderr.close()
    assert codes == [0, 0, 0], "".join(_joined(outputs))
    for pkg in shared:
        assert origin.count(pkg.path) == 1, f"{pkg.file_name} requested {origin.count(pkg.path)}x"
    everything = shared + [p for group in mine for p in group]
    lines = urls_txt(pkgs_dir)
    assert sorted(lines) == sorted(p.url for p in everything)
    for pkg in everything:
        assert (pkgs_dir / pkg.file_name).read_bytes() == pkg.data
        obj = store_dir / "sha256" / pkg.sha256[:2] / pkg.sha256[2:4] / pkg.sha256
        assert (pkgs_dir / pkg.file_name).stat().st_ino == obj.stat().st_ino
    assert_store_consistent(store_dir)


# -- 3. md5-only entries -------------------------------------------------------------


def test_md5_only_entries_verify_and_record_sha256_for_later_hits(
    packages, origin, store, store_dir, tmp_path
):
    lock = channel.conda_lock(packages, tmp_path / "cl.yml", sha256=False)
    report = fetch(store, lock, tmp_path / "pkgs")
    assert report.exit_code == 0
    assert all(r.package.sha256 is None for r in report.results)
    before = len(origin.requests())
    for pkg in packages:
        assert store.info(pkg.sha256).md5 == pkg.md5  # computed in the same pass
        # A later request by sha256 is a hit: no request reaches the origin.
        assert store.get(pkg.url, sha256=pkg.sha256).read_bytes() == pkg.data
    assert len(origin.requests()) == before
    assert_store_consistent(store_dir)


# -- 4. failures ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_a_wrong_hash_fails_that_package_only_with_exit_3(
    algorithm, packages, run_cli, store, store_dir, tmp_path
):
    lock = channel.conda_lock(packages, tmp_path / "cl.yml", sha256=algorithm == "sha256")
    doc = yaml.safe_load(lock.read_text())
    bad = packages[3]
    doc["package"][3]["hash"][algorithm] = "0" * (64 if algorithm == "sha256" else 32)
    lock.write_text(yaml.safe_dump(doc))
    pkgs_dir = tmp_path / "pkgs"
    out = run_cli(
        "--json", "conda", "fetch", str(lock), "--pkgs-dir", str(pkgs_dir), "--platform", "linux-64"
    )
    assert out.returncode == 3, out.stderr
    stderr = out.stderr.decode()
    assert bad.file_name in stderr and f"{algorithm} mismatch" in stderr
    report = json.loads(out.stdout)
    by_file = {r["file_name"]: r for r in report["results"]}
    assert by_file[bad.file_name]["status"] == "failed"
    assert by_file[bad.file_name]["exit_code"] == 3
    assert (report["fetched"], report["failed"]) == (len(packages) - 1, 1)
    assert not (pkgs_dir / bad.file_name).exists()
    for pkg in packages:
        if pkg is not bad:
            assert by_file[pkg.file_name]["status"] == "ok"
            assert by_file[pkg.file_name]["sha256"] == pkg.sha256
            assert_linked(store, pkgs_dir, pkg)
    assert bad.url not in urls_txt(pkgs_dir)
    assert len(urls_txt(pkgs_dir)) == len(packages) - 1
    assert_store_consistent(store_dir)


def test_the_worst_failure_decides_the_exit_code(packages, origin, run_cli, store_dir, tmp_path):
    pkgs = list(packages)
    missing = channel.build(channel.Spec("gone", "1.0", "h0_0"))
    missing.url = origin.url(missing.path)  # never added: the origin answers 404
    lock = channel.explicit([*pkgs, missing], tmp_path / "explicit.txt", hashes="sha256")
    text = lock.read_text().replace(pkgs[0].sha256, "f" * 64)
    lock.write_text(text)
    pkgs_dir = tmp_path / "pkgs"
    out = run_cli("conda", "fetch", str(lock), "--pkgs-dir", str(pkgs_dir))
    assert out.returncode == 4, out.stderr  # 404 (4) beats a hash mismatch (3)
    stderr = out.stderr.decode()
    assert missing.file_name in stderr and pkgs[0].file_name in stderr
    linked = out.stdout.decode().split()
    assert sorted(linked) == sorted(str(pkgs_dir / p.file_name) for p in pkgs[1:])
    assert origin.count(missing.path) == 1  # a 404 is not retried
    assert_store_consistent(store_dir)


# -- 5. a pkgs dir conda recognises --------------------------------------------------


def _index_json(path: Path) -> dict:
    """info/index.json of an archive, read the way conda-package-handling does."""
    if path.name.endswith(".tar.bz2"):
        with tarfile.open(path, "r:bz2") as tar:
            return json.load(tar.extractfile("info/index.json"))
    import zstandard

    with zipfile.ZipFile(path) as z:
        assert json.loads(z.read("metadata.json")) == {"conda_pkg_format_version": 2}
        info = next(n for n in z.namelist() if n.startswith("info-") and n.endswith(".tar.zst"))
        assert path.name == info[len("info-") : -len(".tar.zst")] + ".conda"
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(z.read(info))).read()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            return json.load(tar.extractfile("info/index.json"))


def test_the_pkgs_dir_is_one_conda_recognises(packages, run_cli, store_dir, tmp_path):
    import hashlib

    lock = channel.pixi_lock(packages, tmp_path / "pixi.lock", version=6)
    pkgs_dir = tmp_path / "pkgs"
    (pkgs_dir).mkdir()
    # A line conda wrote earlier, without a trailing newline, is kept and not repeated.
    (pkgs_dir / "urls.txt").write_text(packages[0].url)
    for _ in range(2):
        out = run_cli(
            "conda", "fetch", str(lock), "--pkgs-dir", str(pkgs_dir), "--platform", "linux-64"
        )
        assert out.returncode == 0, out.stderr
        assert out.stderr == b""  # no progress bar in a pipe, no noise
    lines = urls_txt(pkgs_dir)
    assert sorted(lines) == sorted(p.url for p in packages)
    assert len(lines) == len(set(lines))
    entries = {p.file_name: p for p in conda_.read_lock(lock, platform="linux-64").packages}
    for pkg in packages:
        archive = pkgs_dir / pkg.file_name
        data = archive.read_bytes()
        entry = entries[pkg.file_name]
        assert len(data) == entry.size
        assert hashlib.md5(data).hexdigest() == entry.md5
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        index = _index_json(archive)
        assert (index["name"], index["version"], index["build"]) == (
            entry.name,
            entry.version,
            entry.build,
        )
    assert_store_consistent(store_dir)


def test_concurrent_url_records_write_each_url_once(tmp_path):
    urls = [f"https://example.org/c/linux-64/p{i}-1-0.conda" for i in range(50)]

    def run(order):
        for u in order:
            conda_.record_urls(tmp_path, [u])

    threads = [threading.Thread(target=run, args=(urls[::step],)) for step in (1, -1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(urls_txt(tmp_path)) == sorted(urls)


def test_urls_txt_holds_no_credentials():
    url = "https://user:pw@conda.example.org/t/tk-123/chan/linux-64/a-1-0.conda"
    assert plain_url(url) == "https://conda.example.org/chan/linux-64/a-1-0.conda"


# -- bad input -----------------------------------------------------------------------

GOOD = "http://127.0.0.1:1/channel/linux-64/zlib-1.3.1-h0_0.conda"
MD5 = "0123456789abcdef0123456789abcdef"

BAD_LOCKS = {
    "malformed-yaml": ("version: 1\npackage: [\n  - {url: x\n", "malformed YAML"),
    "unknown-format": ("name: env\ndependencies: [python]\n", "not a conda lock file"),
    "conda-lock-no-url": (
        yaml.safe_dump(
            {"version": 1, "package": [{"name": "zlib", "platform": "linux-64", "hash": {}}]}
        ),
        "package #1 (zlib): no hash",
    ),
    "conda-lock-missing-url": (
        yaml.safe_dump(
            {
                "version": 1,
                "package": [
                    {
                        "name": "zlib",
                        "manager": "conda",
                        "platform": "linux-64",
                        "hash": {"md5": MD5},
                    }
                ],
            }
        ),
        "package #1 (zlib): no url",
    ),
    "conda-lock-v2": (yaml.safe_dump({"version": 2, "package": []}), "conda-lock version 2"),
    "conda-lock-bad-md5": (
        yaml.safe_dump(
            {
                "version": 1,
                "package": [
                    {"name": "z", "platform": "linux-64", "url": GOOD, "hash": {"md5": "x"}}
                ],
            }
        ),
        "invalid md5",
    ),
    "explicit-no-hash": (f"@EXPLICIT\n{GOOD}\n", ":2: http"),
    "explicit-short-hash": (f"@EXPLICIT\n{GOOD}#{MD5[:-1]}\n", ":2: invalid digest"),
    "pixi-empty-entry": (
        "version: 6\nenvironments:\n  default:\n    channels: []\n    packages:\n"
        "      linux-64:\n      - {}\npackages: []\n",
        "neither a conda nor a pypi package",
    ),
    "pixi-boolean-size": (
        "version: 6\nenvironments:\n  default:\n    channels: []\n    packages:\n"
        "      linux-64:\n      - conda: https://h/a-1-0.conda\npackages:\n"
        "- conda: https://h/a-1-0.conda\n  md5: " + MD5 + "\n  size: true\n",
        "invalid size True",
    ),
    "conda-lock-unknown-manager": (
        "version: 1\nmetadata: {platforms: [linux-64]}\npackage:\n"
        "- {name: a, manager: [x], platform: linux-64, url: 'https://h/a-1-0.conda',"
        " hash: {md5: " + MD5 + "}}\n",
        "unknown manager",
    ),
    "explicit-traversal": (
        f"@EXPLICIT\nhttps://h/x/..%2F..%2Fevil-1.0-0.conda#{MD5}\n",
        ":2: unsafe file name",
    ),
    "explicit-not-a-package": (
        f"@EXPLICIT\nhttps://example.org/x-1.0-py3-none-any.whl#{MD5}\n",
        "not a conda package",
    ),
    "explicit-bad-scheme": (f"@EXPLICIT\nftp://example.org/a/b-1-0.conda#{MD5}\n", "scheme"),
    "pixi-v4": (yaml.safe_dump({"version": 4, "environments": {}, "packages": []}), "version 4"),
    "pixi-no-env": (
        yaml.safe_dump({"version": 6, "environments": {"dev": {}}, "packages": []}),
        "no environment 'default' (it has: dev)",
    ),
    "pixi-no-platform": (
        yaml.safe_dump(
            {
                "version": 6,
                "environments": {"default": {"packages": {"osx-arm64": []}}},
                "packages": [],
            }
        ),
        "no packages for platform linux-64 (it has: osx-arm64)",
    ),
    "pixi-unknown-url": (
        yaml.safe_dump(
            {
                "version": 6,
                "environments": {"default": {"packages": {"linux-64": [{"conda": GOOD}]}}},
                "packages": [],
            }
        ),
        "has no record",
    ),
    "pixi-no-hash": (
        yaml.safe_dump(
            {
                "version": 6,
                "environments": {"default": {"packages": {"linux-64": [{"conda": GOOD}]}}},
                "packages": [{"conda": GOOD, "size": 3}],
            }
        ),
        "zlib-1.3.1-h0_0.conda: no md5 or sha256",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LOCKS))
def test_a_bad_lock_is_invalid_input_naming_file_and_entry(case, tmp_path):
    text, message = BAD_LOCKS[case]
    lock = tmp_path / f"{case}.lock"
    lock.write_text(text)
    with pytest.raises(InvalidInput) as info:
        conda_.read_lock(lock, platform="linux-64")
    assert str(lock) in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "case",
    [
        "missing-file",
        "malformed-yaml",
        "explicit-short-hash",
        "explicit-traversal",
        "pixi-no-platform",
    ],
)
def test_bad_input_exits_2_before_any_request(case, origin, run_cli, store_dir, tmp_path):
    good = channel.serve(origin, channel.SHARED[:1])[0]
    lock = tmp_path / "lock"
    if case != "missing-file":
        text = BAD_LOCKS[case][0]
        # A good line first: nothing of it may be fetched either.
        if case.startswith("explicit"):
            text = text.replace("@EXPLICIT\n", f"@EXPLICIT\n{good.url}#{good.md5}\n")
        lock.write_text(text)
    pkgs_dir = tmp_path / "pkgs"
    out = run_cli("conda", "fetch", str(lock), "--pkgs-dir", str(pkgs_dir))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and str(lock) in lines[0], lines
    assert origin.requests() == []
    assert not pkgs_dir.exists()
    assert not (store_dir / "sha256").exists()


def test_one_file_name_twice_with_different_hashes_is_bad_input(tmp_path):
    lock = tmp_path / "explicit.txt"
    lock.write_text(f"@EXPLICIT\n{GOOD}#{MD5}\n{GOOD}#{'1' * 32}\n")
    with pytest.raises(InvalidInput, match="listed twice"):
        conda_.read_lock(lock)
    lock.write_text(f"@EXPLICIT\n{GOOD}#{MD5}\n{GOOD}#{MD5}\n")  # a repeat is harmless
    assert len(conda_.read_lock(lock).packages) == 1
