"""Conda lock files in, a conda package cache (``pkgs/``) out.

Reads the three formats conda tools pin environments with, into one list of
``CondaPackage`` records (the URL, the archive's file name, its hashes and,
where known, size, name, version and build):

- explicit files (``conda list --explicit``): ``@EXPLICIT`` then one
  ``URL#<md5>``, ``URL#<sha256>`` or ``URL#sha256:<hex>`` per line;
- conda-lock.yml, version 1: a ``package:`` list of ``{name, version,
  manager, platform, url, hash: {md5, sha256?}}``; pip entries are skipped;
- pixi.lock, versions 5 to 7: ``environments.<env>.packages.<platform>`` is
  a list of ``{conda: URL}`` (or ``{pypi: URL}``, skipped) that refers to the
  records of the top-level ``packages:`` list, keyed by ``url`` with
  ``kind: conda`` in v5 and by their ``conda:`` URL in v6 and v7.

A lock is read and checked whole before anything is downloaded: a bad one is
``InvalidInput`` naming the file and the entry.  ``fetch`` then gets every
package once into the store (named by its file name, verified by sha256, or
by md5 in the same pass where the lock gives only md5), hardlinks it as
``<pkgs dir>/<file name>`` and records its URL once in ``urls.txt``, as conda
does.  The records are meant for reuse by later steps (extracting packages,
installing environments).

PyYAML is imported only for YAML locks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform as _platform
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CasError, InvalidInput
from .hashing import parse_md5, parse_sha256
from .models import Artifact, LinkMode, Request
from .urls import check_url, file_name, plain_url, redact

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("casstore")
PathLike = str | os.PathLike[str]
ARCHIVE_EXTENSIONS = (".conda", ".tar.bz2")
PIXI_VERSIONS = (5, 6, 7)
URLS_TXT = "urls.txt"
# An anaconda.org token in a channel URL: .../t/<token>/channel/...


@dataclass(frozen=True)
class CondaPackage:
    """One conda package of a lock: where it lives and what its archive hashes to."""

    url: str
    file_name: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    name: str | None = None
    version: str | None = None
    build: str | None = None

    @property
    def dist(self) -> str:
        """The file name without its extension (conda's ``pkgs/<dist>/`` directory)."""
        for ext in ARCHIVE_EXTENSIONS:
            if self.file_name.endswith(ext):
                return self.file_name[: -len(ext)]
        return self.file_name

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": redact(self.url),
            "file_name": self.file_name,
            "md5": self.md5,
            "sha256": self.sha256,
            "size": self.size,
            "name": self.name,
            "version": self.version,
            "build": self.build,
        }


@dataclass(frozen=True)
class CondaLock:
    """The conda packages a lock file pins for one platform (and environment)."""

    path: str
    format: str  # "explicit", "conda-lock-v1", "pixi-v5", "pixi-v6", "pixi-v7"
    packages: tuple[CondaPackage, ...]
    platform: str | None = None
    environment: str | None = None
    skipped: tuple[str, ...] = ()  # what was left out and why (pip/pypi, source packages)


@dataclass(frozen=True)
class PackageResult:
    """One package's outcome: the artifact (linked into the pkgs dir) or the error."""

    package: CondaPackage
    dest: Path
    artifact: Artifact | None = None
    error: CasError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file_name": self.package.file_name,
            "url": redact(self.package.url),
            "dest": str(self.dest),
            "status": "ok" if self.ok else "failed",
        }
        if self.artifact is not None:
            out.update(
                sha256=self.artifact.sha256,
                size=self.artifact.size,
                path=str(self.artifact.path),
                method=self.artifact.method,
            )
        if self.error is not None:
            out.update(error=str(self.error), exit_code=self.error.exit_code)
        return out


@dataclass(frozen=True)
class CondaFetchReport:
    """What ``fetch`` did: one result per package, in lock order."""

    lock: CondaLock
    pkgs_dir: Path
    results: tuple[PackageResult, ...]

    @property
    def failed(self) -> list[PackageResult]:
        return [r for r in self.results if not r.ok]

    @property
    def exit_code(self) -> int:
        """The worst failure's exit code, 0 when every package was fetched and linked."""
        return max((r.error.exit_code for r in self.failed if r.error), default=0)

    @property
    def bytes(self) -> int:
        return sum(r.artifact.size for r in self.results if r.artifact is not None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lock": self.lock.path,
            "format": self.lock.format,
            "platform": self.lock.platform,
            "environment": self.lock.environment,
            "pkgs_dir": str(self.pkgs_dir),
            "packages": len(self.results),
            "fetched": len(self.results) - len(self.failed),
            "failed": len(self.failed),
            "bytes": self.bytes,
            "skipped": list(self.lock.skipped),
            "results": [r.as_dict() for r in self.results],
        }


# -- platform -----------------------------------------------------------------

_MACHINES = {
    "x86_64": "64",
    "amd64": "64",
    "aarch64": "aarch64",
    "arm64": "arm64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "i386": "32",
    "i686": "32",
    "x86": "32",
}


def current_platform() -> str:
    """This machine's conda subdir: ``linux-64``, ``osx-arm64``, ``win-64``..."""
    machine = _MACHINES.get(_platform.machine().lower(), _platform.machine().lower())
    if sys.platform.startswith("linux"):
        return "linux-" + machine.replace("arm64", "aarch64")
    if sys.platform == "darwin":
        return "osx-" + machine.replace("aarch64", "arm64")
    if sys.platform in ("win32", "cygwin"):
        return "win-" + machine.replace("aarch64", "arm64")
    return f"{sys.platform}-{machine}"


# -- reading locks --------------------------------------------------------------


def read_lock(
    path: PathLike, *, platform: str | None = None, environment: str | None = None
) -> CondaLock:
    """Read and check a lock file whole; its format is recognised from its content.

    ``platform`` defaults to the current one and ``environment`` (pixi) to
    ``default``; an explicit file is for one platform and is taken as it is
    (the platform its ``# platform:`` header names, if any, is reported).

    Raises:
        InvalidInput: unreadable file, unknown format, malformed YAML, an entry
            without URL or hash, a platform or environment the lock lacks.
    """
    label = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidInput(f"cannot read lock file {label}: {reason}", path=label) from exc
    if _is_explicit(text):
        header = re.search(r"^#\s*platform:\s*(\S+)", text, re.M)  # as conda writes it
        packages = tuple(parse_explicit(text, label=label))
        return CondaLock(label, "explicit", packages, header.group(1) if header else None)
    data = _load_yaml(text, label)
    plat = platform or current_platform()
    if isinstance(data, dict) and "package" in data and "environments" not in data:
        return _read_conda_lock(data, label, plat)
    if isinstance(data, dict) and "environments" in data and "packages" in data:
        return _read_pixi(data, label, plat, environment or "default")
    raise InvalidInput(
        f"{label}: not a conda lock file (expected @EXPLICIT, conda-lock.yml or pixi.lock)",
        path=label,
    )


def _is_explicit(text: str) -> bool:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line == "@EXPLICIT"
    return False


def parse_explicit(text: str, *, label: str = "<explicit>") -> list[CondaPackage]:
    """The packages of an ``@EXPLICIT`` file, each line checked (grammar in lists.py).

    Raises:
        InvalidInput: a line without a hash, with a malformed one, or not a conda archive URL.
    """
    from .lists import parse_explicit_lines

    packages = [
        _package(e.url, f"{label}:{e.line}", md5=e.md5, sha256=e.sha256)
        for e in parse_explicit_lines(text.splitlines(), source=label)
    ]
    return _unique(packages, label)


def _load_yaml(text: str, label: str) -> Any:
    import yaml

    # libyaml's loader parses a large pixi.lock ~10x faster than the pure-Python one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidInput(f"{where}: malformed YAML: {problem}", path=label) from exc


def _read_conda_lock(data: dict, label: str, plat: str) -> CondaLock:
    version = data.get("version")
    if version != 1:
        raise InvalidInput(
            f"{label}: unsupported conda-lock version {version!r} (version 1 is supported)",
            path=label,
        )
    entries = data.get("package")
    if not isinstance(entries, list):
        raise InvalidInput(f"{label}: 'package' is not a list", path=label)
    packages, skipped, platforms = [], [], set()
    for i, entry in enumerate(entries, 1):
        where = f"{label}: package #{i}"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where}: not a mapping", path=label)
        name = entry.get("name")
        where += f" ({name})" if name else ""
        platforms.add(str(entry.get("platform")))
        if entry.get("platform") != plat:
            continue
        manager = entry.get("manager", "conda")
        if manager not in ("conda", "pip"):
            raise InvalidInput(f"{where}: unknown manager {manager!r}", path=label)
        if manager != "conda":
            skipped.append(f"{name or entry.get('url')}: {manager} package, not conda")
            continue
        hashes = entry.get("hash")
        if not isinstance(hashes, dict) or not (hashes.get("md5") or hashes.get("sha256")):
            raise InvalidInput(f"{where}: no hash (expected hash: {{md5: ...}})", path=label)
        packages.append(
            _package(
                entry.get("url"),
                where,
                md5=_checked(parse_md5, hashes.get("md5"), where),
                sha256=_checked(parse_sha256, hashes.get("sha256"), where),
                name=name,
                version=entry.get("version"),
            )
        )
    if not packages and not skipped:
        _no_platform(label, plat, sorted(platforms | set(_meta_platforms(data))))
    return CondaLock(label, "conda-lock-v1", _unique(packages, label), plat, None, tuple(skipped))


def _meta_platforms(data: dict) -> list[str]:
    meta = data.get("metadata")
    plats = meta.get("platforms") if isinstance(meta, dict) else None
    return [str(p) for p in plats] if isinstance(plats, list) else []


def _read_pixi(data: dict, label: str, plat: str, env: str) -> CondaLock:
    version = data.get("version")
    if version not in PIXI_VERSIONS:
        raise InvalidInput(
            f"{label}: unsupported pixi.lock version {version!r} (versions 5 to 7 are supported)",
            path=label,
        )
    envs = data.get("environments")
    if not isinstance(envs, dict) or env not in envs:
        have = ", ".join(sorted(envs)) if isinstance(envs, dict) else "none"
        raise InvalidInput(f"{label}: no environment {env!r} (it has: {have})", path=label)
    env_data = envs[env] if isinstance(envs[env], dict) else {}
    by_platform = env_data.get("packages") or {}
    if not isinstance(by_platform, dict) or plat not in by_platform:
        _no_platform(label, plat, sorted(by_platform) if isinstance(by_platform, dict) else [])
    records = _pixi_records(data.get("packages"), label, version)
    packages, skipped = [], []
    for i, ref in enumerate(by_platform[plat] or [], 1):
        where = f"{label}: environment {env}, {plat}, package #{i}"
        if not isinstance(ref, dict):
            raise InvalidInput(f"{where}: not a mapping", path=label)
        if "conda" not in ref:
            kind = next(iter(ref), None)
            if kind not in ("pypi", "pip"):  # an empty or unknown entry is a broken lock
                raise InvalidInput(f"{where}: neither a conda nor a pypi package", path=label)
            skipped.append(f"{ref.get(kind)}: {kind} package, not conda")
            continue
        url = ref["conda"]
        if not isinstance(url, str) or "://" not in url:
            # A source package (``conda: ./path``) is built locally, not downloaded.
            skipped.append(f"{url}: source package, not downloadable")
            continue
        record = records.get(url)
        if record is None:
            raise InvalidInput(f"{where}: {redact(url)} has no record in 'packages'", path=label)
        where = f"{label}: package {file_name(url)}"
        if not (record.get("md5") or record.get("sha256")):
            raise InvalidInput(f"{where}: no md5 or sha256", path=label)
        size = record.get("size")
        packages.append(
            _package(
                url,
                where,
                md5=_checked(parse_md5, record.get("md5"), where),
                sha256=_checked(parse_sha256, record.get("sha256"), where),
                size=_size(size, where),
                name=record.get("name"),
                version=record.get("version"),
                build=record.get("build"),
            )
        )
    return CondaLock(label, f"pixi-v{version}", _unique(packages, label), plat, env, tuple(skipped))


def _size(value: Any, where: str) -> int | None:
    """A lock's optional byte size; anything but a non-negative integer is bad input."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{where}: invalid size {value!r}")
    return value


def _pixi_records(entries: Any, label: str, version: int) -> dict[str, dict]:
    """The conda records of pixi's top-level ``packages:`` list, by URL."""
    if not isinstance(entries, list):
        raise InvalidInput(f"{label}: 'packages' is not a list", path=label)
    records: dict[str, dict] = {}
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise InvalidInput(f"{label}: packages entry #{i} is not a mapping", path=label)
        if version == 5:
            url = entry.get("url") if entry.get("kind") == "conda" else None
        else:
            url = entry.get("conda")
        if isinstance(url, str):
            records.setdefault(url, entry)
    return records


def _no_platform(label: str, plat: str, have: Sequence[str]) -> None:
    listed = ", ".join(p for p in have if p and p != "None") or "none"
    raise InvalidInput(
        f"{label}: no packages for platform {plat} (it has: {listed}); choose one with --platform",
        path=label,
    )


def _checked(parse: Callable[[str], str], value: Any, where: str) -> str | None:
    """``parse(value)`` with the entry named in the error; None stays None."""
    if value is None or value == "":
        return None
    try:
        return parse(str(value))
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}", ref=str(value)) from None


def _package(url: Any, where: str, **fields: Any) -> CondaPackage:
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"{where}: no url")
    url = url.strip()
    try:
        check_url(url)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}", url=redact(url)) from None
    try:
        name = file_name(url)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}", url=redact(url)) from None
    if not name.endswith(ARCHIVE_EXTENSIONS):
        raise InvalidInput(
            f"{where}: {redact(url)} is not a conda package (.conda or .tar.bz2)",
            url=redact(url),
        )
    if not (fields.get("name") and fields.get("version") and fields.get("build")):
        # name-version-build.ext: names may hold dashes, versions and builds may not.
        parts = name[: -len(next(e for e in ARCHIVE_EXTENSIONS if name.endswith(e)))]
        pieces = parts.rsplit("-", 2)
        if len(pieces) == 3:
            for key, value in zip(("name", "version", "build"), pieces, strict=True):
                fields[key] = fields.get(key) or value
    for key in ("name", "version", "build"):
        if fields.get(key) is not None:
            fields[key] = str(fields[key])
    return CondaPackage(url=url, file_name=name, **fields)


def _unique(packages: list[CondaPackage], label: str) -> tuple[CondaPackage, ...]:
    """Drop repeated URLs; two different packages under one file name are bad input."""
    by_name: dict[str, CondaPackage] = {}
    out = []
    for pkg in packages:
        seen = by_name.get(pkg.file_name)
        if seen is None:
            by_name[pkg.file_name] = pkg
            out.append(pkg)
        elif seen.url != pkg.url or (seen.md5, seen.sha256) != (pkg.md5, pkg.sha256):
            raise InvalidInput(
                f"{label}: {pkg.file_name} is listed twice with different URLs or hashes",
                path=label,
            )
    return tuple(out)


# -- fetching into a pkgs dir ---------------------------------------------------


def fetch(
    store: Store,
    lock_file: PathLike,
    pkgs_dir: PathLike,
    *,
    platform: str | None = None,
    environment: str | None = None,
    concurrency: int = 8,
    on_done: Callable[[PackageResult, int, int], None] | None = None,
) -> CondaFetchReport:
    """Read ``lock_file`` and fetch its packages into ``pkgs_dir`` (see ``fetch_packages``).

    Raises:
        InvalidInput: the lock is unreadable or malformed (before any download).
    """
    lock = read_lock(lock_file, platform=platform, environment=environment)
    for note in lock.skipped:
        log.info("skipped %s", note)
    return fetch_packages(store, lock, pkgs_dir, concurrency=concurrency, on_done=on_done)


def fetch_packages(
    store: Store,
    lock: CondaLock,
    pkgs_dir: PathLike,
    *,
    concurrency: int = 8,
    on_done: Callable[[PackageResult, int, int], None] | None = None,
) -> CondaFetchReport:
    """Get each package of ``lock`` once into the store and hardlink it into ``pkgs_dir``.

    Each package is named by its file name and verified by sha256, or by md5
    in the same pass when the lock has no sha256 (the sha256 is then recorded
    beside the md5).  ``pkgs_dir/<file name>`` is made atomically with the
    ``auto`` link mode; the URL of every package linked is appended to
    ``pkgs_dir/urls.txt`` once, under an flock, so several runs may share a
    pkgs dir.  A failing package does not stop the others: the report holds
    one result per package and ``exit_code`` is the worst failure's.
    ``on_done(result, done, total)`` is called as each package finishes.
    Blocks; safe to run from many processes at once.
    """
    pkgs = Path(os.path.abspath(pkgs_dir))
    try:
        pkgs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CasError(
            f"cannot create pkgs dir {pkgs}: {exc.strerror or exc}", path=str(pkgs)
        ) from exc
    requests = [
        Request(
            pkg.url,
            sha256=pkg.sha256,
            # md5 only where it is the sole proof: it costs a second hash per byte.
            md5=None if pkg.sha256 else pkg.md5,
            name=pkg.file_name,
            dest=str(pkgs / pkg.file_name),
            size=pkg.size,
        )
        for pkg in lock.packages
    ]
    total = len(requests)
    done = 0
    done_lock = threading.Lock()

    def finished(i: int, outcome: Artifact | CasError) -> None:
        nonlocal done
        if on_done is None:
            return
        with done_lock:  # called from the worker threads
            done += 1
            on_done(_result(lock.packages[i], pkgs, outcome), done, total)

    outcomes = store.ensure_many(
        requests, concurrency=concurrency, link=LinkMode.AUTO, on_done=finished
    )
    results = tuple(
        _result(pkg, pkgs, outcome) for pkg, outcome in zip(lock.packages, outcomes, strict=True)
    )
    record_urls(pkgs, [r.package.url for r in results if r.ok])
    return CondaFetchReport(lock=lock, pkgs_dir=pkgs, results=results)


def _result(pkg: CondaPackage, pkgs: Path, outcome: Artifact | CasError) -> PackageResult:
    dest = pkgs / pkg.file_name
    if isinstance(outcome, CasError):
        return PackageResult(pkg, dest, error=outcome)
    return PackageResult(pkg, dest, artifact=outcome)


def record_urls(pkgs_dir: Path, urls: Sequence[str]) -> list[str]:
    """Append each URL missing from ``pkgs_dir/urls.txt``; returns those appended.

    Under an exclusive flock on urls.txt itself, the file is re-read and only
    missing lines are written, so concurrent runs never write a URL twice.
    (conda appends without a lock; a line it adds meanwhile is still seen.)
    """
    wanted = list(dict.fromkeys(plain_url(u) for u in urls))
    if not wanted:
        return []
    path = pkgs_dir / URLS_TXT
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(fd, "r+", encoding="utf-8", closefd=False) as f:
            f.seek(0)
            text = f.read()
            have = {line.strip() for line in text.splitlines()}
            missing = [u for u in wanted if u not in have]
            if missing:
                lead = "\n" if text and not text.endswith("\n") else ""
                f.write(lead + "".join(u + "\n" for u in missing))
                f.flush()
    finally:
        os.close(fd)  # closing the descriptor releases the flock
    return missing
