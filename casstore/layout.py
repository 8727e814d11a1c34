"""Where everything lives in a store; the only module that builds store paths.

::

    <root>                        default: platformdirs user cache dir for "casstore"
    ├── sha256/ab/cd/<64 hex>     objects: immutable, mode 0444, content == name
    ├── tmp/                      in-flight writes (same filesystem as sha256/)
    ├── locks/                    per-key lock files (single-flight)
    ├── quarantine/               objects that failed verification, never served
    ├── CACHEDIR.TAG              so backup tools skip the store
    └── index.db                  SQLite index (WAL)

Invariant: a file at ``sha256/ab/cd/D`` has sha256 ``D``; nothing else ever
appears there (see ingest.py for how writes get there).
"""

from __future__ import annotations

import os
from pathlib import Path

OBJECT_MODE = 0o444
CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by casstore.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


def default_root() -> Path:
    """``$CASSTORE_DIR``, else the platform's user cache dir for casstore."""
    env = os.environ.get("CASSTORE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs  # only when no directory was given: it costs ~8 ms

    return Path(platformdirs.user_cache_dir("casstore", appauthor=False))


class Layout:
    """Paths inside one store directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.objects = self.root / "sha256"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.quarantine = self.root / "quarantine"
        self.index = self.root / "index.db"
        self._ready = False

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256[2:4] / sha256

    def lock_path(self, key: str) -> Path:
        return self.locks / f"{key}.lock"

    def ensure(self) -> None:
        """Create the directories and CACHEDIR.TAG; safe to race with other processes."""
        if self._ready:
            return
        for d in (self.objects, self.tmp, self.locks, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            # Written via a unique temp + rename so a reader never sees half a tag.
            temp = self.tmp / f"CACHEDIR.TAG.{os.getpid()}.{os.urandom(8).hex()}"
            temp.write_text(CACHEDIR_TAG)
            os.replace(temp, tag)
        self._ready = True

    def iter_objects(self):
        """Yield (sha256, path) for every file shaped like an object; ignores strays."""
        if not self.objects.is_dir():
            return
        for a in sorted(os.scandir(self.objects), key=lambda e: e.name):
            if len(a.name) != 2 or not a.is_dir():
                continue
            for b in sorted(os.scandir(a.path), key=lambda e: e.name):
                if len(b.name) != 2 or not b.is_dir():
                    continue
                for entry in sorted(os.scandir(b.path), key=lambda e: e.name):
                    name = entry.name
                    if len(name) == 64 and name[:2] == a.name and name[2:4] == b.name:
                        yield name, Path(entry.path)

    def iter_prefix(self, prefix: str):
        """Yield sha256 of on-disk objects starting with ``prefix`` (>= 4 hex chars)."""
        d = self.objects / prefix[:2] / prefix[2:4]
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return
        for name in names:
            if len(name) == 64 and name.startswith(prefix):
                yield name
