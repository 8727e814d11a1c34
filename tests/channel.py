"""A small conda channel, built deterministically, and lock files pointing at it.

Packages are real-format archives: ``.conda`` (an uncompressed zip holding
``metadata.json``, ``info-<dist>.tar.zst`` and ``pkg-<dist>.tar.zst``) and
``.tar.bz2`` (a tar with ``info/index.json``), with fixed mtimes and owners
so the same spec always gives the same bytes.  ``serve`` puts the archives
and a ``repodata.json`` per subdir on a test ``Origin``; ``explicit``,
``conda_lock`` and ``pixi_lock`` write the three lock formats for them.
Used by tests/test_conda.py and bench/bench_conda.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MTIME = 1_600_000_000  # fixed, so archives are byte-for-byte reproducible


@dataclass(frozen=True)
class Spec:
    name: str
    version: str
    build: str = "h0000000_0"
    ext: str = ".conda"
    subdir: str = "linux-64"
    payload: int = 4096  # bytes of (incompressible) file content in the package
    depends: tuple[str, ...] = ()

    @property
    def dist(self) -> str:
        return f"{self.name}-{self.version}-{self.build}"

    @property
    def file_name(self) -> str:
        return self.dist + self.ext


@dataclass
class Package:
    spec: Spec
    data: bytes
    url: str = ""
    md5: str = field(init=False)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.md5 = hashlib.md5(self.data).hexdigest()
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    @property
    def file_name(self) -> str:
        return self.spec.file_name

    @property
    def path(self) -> str:
        """The package's path on the origin."""
        return f"/channel/{self.spec.subdir}/{self.file_name}"

    def record(self) -> dict:
        """Its repodata.json record."""
        return {
            **_index(self.spec),
            "md5": self.md5,
            "sha256": self.sha256,
            "size": len(self.data),
        }


# The seed scenario's shared dependencies, as on conda-forge.
SHARED = (
    Spec("_openmp_mutex", "4.5", "2_gnu", ".tar.bz2", payload=2048),
    Spec("libgcc", "14.2.0", "h767d61c_2", payload=60_000),
    Spec("libgomp", "14.2.0", "h767d61c_2", payload=40_000),
)


def _payload(size: int, seed: str) -> bytes:
    # Seeded (string seeds hash with sha512): the same bytes on every run, fast for 20 MB.
    return random.Random(seed).randbytes(size)


def _index(spec: Spec) -> dict:
    tail = spec.build.rsplit("_", 1)[-1]
    build_number = int(tail) if tail.isdigit() else 0
    return {
        "name": spec.name,
        "version": spec.version,
        "build": spec.build,
        "build_number": build_number,
        "depends": list(spec.depends),
        "subdir": spec.subdir,
        "license": "MIT",
        "timestamp": MTIME * 1000,
    }


def _tar(files: dict[str, bytes], compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:" + compression, format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def build(spec: Spec) -> Package:
    """The archive bytes of one package."""
    import zstandard

    payload = _payload(spec.payload, spec.dist)
    lib = f"lib/{spec.name}.so"
    paths = {
        "paths": [
            {
                "_path": lib,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(payload).hexdigest(),
                "size_in_bytes": len(payload),
            }
        ],
        "paths_version": 1,
    }
    info = {
        "info/index.json": json.dumps(_index(spec), indent=2, sort_keys=True).encode(),
        "info/paths.json": json.dumps(paths, indent=2, sort_keys=True).encode(),
    }
    if spec.ext == ".tar.bz2":
        return Package(spec, _tar({**info, lib: payload}, "bz2"))
    zstd = zstandard.ZstdCompressor(level=3)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        members = {
            "metadata.json": json.dumps({"conda_pkg_format_version": 2}).encode(),
            f"pkg-{spec.dist}.tar.zst": zstd.compress(_tar({lib: payload})),
            f"info-{spec.dist}.tar.zst": zstd.compress(_tar(info)),
        }
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 9, 13, 12, 26, 40)), data)
    return Package(spec, buf.getvalue())


def serve(origin, specs) -> list[Package]:
    """Build each spec, put it and a repodata.json per subdir on ``origin``."""
    packages = [build(s) for s in specs]
    subdirs: dict[str, dict] = {}
    for pkg in packages:
        pkg.url = origin.add(pkg.path, pkg.data)
        repo = subdirs.setdefault(
            pkg.spec.subdir,
            {"info": {"subdir": pkg.spec.subdir}, "packages": {}, "packages.conda": {}},
        )
        key = "packages.conda" if pkg.spec.ext == ".conda" else "packages"
        repo[key][pkg.file_name] = pkg.record()
    for subdir, repo in subdirs.items():
        origin.add(f"/channel/{subdir}/repodata.json", json.dumps(repo, sort_keys=True).encode())
    return packages


# -- lock files -----------------------------------------------------------------


def target(pkg: Package) -> str:
    """The platform a lock lists a package under (noarch ones under linux-64)."""
    return "linux-64" if pkg.spec.subdir == "noarch" else pkg.spec.subdir


def explicit(packages, path: Path, *, hashes: str = "md5") -> Path:
    """``hashes``: "md5" (URL#md5), "sha256" (URL#<64 hex>) or "sha256:" (URL#sha256:<hex>)."""
    lines = ["# platform: linux-64", "@EXPLICIT"]
    for p in packages:
        digest = {"md5": p.md5, "sha256": p.sha256, "sha256:": "sha256:" + p.sha256}[hashes]
        lines.append(f"{p.url}#{digest}")
    path.write_text("\n".join(lines) + "\n")
    return path


def conda_lock(packages, path: Path, *, sha256: bool = True, pip: bool = False) -> Path:
    """A conda-lock.yml v1 (md5 always; sha256 when asked; a pip entry when asked)."""
    plats = sorted({target(p) for p in packages})
    entries = []
    for p in packages:
        hashes = {"md5": p.md5, **({"sha256": p.sha256} if sha256 else {})}
        entries.append(
            {
                "name": p.spec.name,
                "version": p.spec.version,
                "manager": "conda",
                "platform": target(p),
                "dependencies": {},
                "url": p.url,
                "hash": hashes,
                "category": "main",
                "optional": False,
            }
        )
    if pip:
        entries.append(
            {
                "name": "requests",
                "version": "2.32.3",
                "manager": "pip",
                "platform": plats[0],
                "dependencies": {},
                "url": "https://files.pythonhosted.org/packages/requests-2.32.3-py3-none-any.whl",
                "hash": {
                    "sha256": "70761cfe03c773ceb22aa2f671b4757976145175cdfca038c02654d061d6dcc6"
                },
                "category": "main",
                "optional": False,
            }
        )
    doc = {
        "version": 1,
        "metadata": {
            "content_hash": {p: "0" * 64 for p in plats},
            "channels": [{"url": "local", "used_env_vars": []}],
            "platforms": plats,
            "sources": ["environment.yml"],
        },
        "package": entries,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def pixi_lock(
    packages, path: Path, *, version: int = 6, env: str = "default", pypi: bool = False
) -> Path:
    """A pixi.lock of ``version`` 5, 6 or 7 with one environment."""
    by_plat: dict[str, list] = {}
    records = []
    for p in packages:
        by_plat.setdefault(target(p), []).append({"conda": p.url})
        common = {"sha256": p.sha256, "md5": p.md5, "size": len(p.data), "timestamp": MTIME}
        if version == 5:
            rec = {
                "kind": "conda",
                "name": p.spec.name,
                "version": p.spec.version,
                "build": p.spec.build,
                "subdir": p.spec.subdir,
                "url": p.url,
                **common,
            }
        else:  # v6+: name, version, build come from the file name
            rec = {"conda": p.url, **common, "license": "MIT"}
        records.append(rec)
    if pypi:
        url = "https://files.pythonhosted.org/packages/click-8.1.7-py3-none-any.whl"
        for lst in by_plat.values():
            lst.append({"pypi": url})
        pyrec = {"name": "click", "version": "8.1.7", "url": url, "sha256": "ab" * 32}
        records.append({"kind": "pypi", **pyrec} if version == 5 else {"pypi": url, **pyrec})
    doc: dict = {"version": version}
    if version >= 7:
        doc["platforms"] = [{"name": p} for p in sorted(by_plat)]
    doc["environments"] = {
        env: {"channels": [{"url": "http://127.0.0.1/channel/"}], "packages": by_plat}
    }
    doc["packages"] = records
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
