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

The names are also given as plain strings (``object_name``, ``lock_name``,
``make_dirs``) for the command line's cache-hit path (hit.py), which never
imports pathlib: that import alone costs a process ~9 ms of CPU, a third of a hit.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not `typing`: the CLI hit path (hit.py) does not import it
if TYPE_CHECKING:
    from pathlib import Path

OBJECT_MODE = 0o444
CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by casstore.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


OBJECTS, TMP, LOCKS, QUARANTINE, INDEX = "sha256", "tmp", "locks", "quarantine", "index.db"


def object_name(sha256: str) -> str:
    """An object's path relative to the store's root."""
    return f"{OBJECTS}/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def lock_name(key: str) -> str:
    """A lock file's path relative to the store's root."""
    return f"{LOCKS}/{key}.lock"


def make_dirs(root: str | os.PathLike[str]) -> None:
    """Create the store's directories and CACHEDIR.TAG; safe to race with other processes."""
    for d in (OBJECTS, TMP, LOCKS, QUARANTINE):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    tag = os.path.join(root, "CACHEDIR.TAG")
    if not os.path.exists(tag):
        # Written via a unique temp + rename so a reader never sees half a tag.
        temp = os.path.join(root, TMP, f"CACHEDIR.TAG.{os.getpid()}.{os.urandom(8).hex()}")
        with open(temp, "w") as f:
            f.write(CACHEDIR_TAG)
        os.replace(temp, tag)


def default_root() -> str:
    """``$CASSTORE_DIR``, else the platform's user cache dir for casstore.

    On Linux that is platformdirs' rule, ``$XDG_CACHE_HOME/casstore`` or
    ``~/.cache/casstore``, applied here without importing it (with pathlib,
    ~10 ms of a cache hit's ~25); elsewhere platformdirs is asked.
    """
    env = os.environ.get("CASSTORE_DIR")
    if env:
        return os.path.expanduser(env)
    if sys.platform.startswith("linux") and "ANDROID_DATA" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.expanduser("~/.cache")
        return os.path.join(base, "casstore")
    import platformdirs

    return platformdirs.user_cache_dir("casstore", appauthor=False)


class Layout:
    """Paths inside one store directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        from pathlib import Path

        self.root = Path(root).expanduser().absolute()
        self.objects = self.root / OBJECTS
        self.tmp = self.root / TMP
        self.locks = self.root / LOCKS
        self.quarantine = self.root / QUARANTINE
        self.index = self.root / INDEX
        self._ready = False
        # A get asks for its object's path several times (look, lock, publish,
        # deliver); pathlib's join is the cost, so recent ones are kept.
        self._paths: dict[str, Path] = {}

    def object_path(self, sha256: str) -> Path:
        path = self._paths.get(sha256)
        if path is None:
            if len(self._paths) >= 1024:
                self._paths.clear()
            path = self._paths[sha256] = self.root / object_name(sha256)
        return path

    def has_object(self, sha256: str) -> bool:
        """Whether the object is on disk (a stat, without pathlib: for many at once)."""
        return os.path.exists(f"{self.root}/{object_name(sha256)}")

    def have_objects(self, shas: list[str]) -> list[bool]:
        """``has_object`` of each, after one listing of ``sha256/``: an object
        whose ``ab/`` is not there costs no stat (in a new store, none is: a
        stat of a missing object cost a batch of 1,000 ~3 ms before it began).
        One made meanwhile counts as missing, as it would a moment earlier."""
        try:
            tops = set(os.listdir(self.objects))
        except FileNotFoundError:
            tops = set()
        except OSError:  # not a directory, not readable: as has_object finds them
            return [self.has_object(sha) for sha in shas]
        return [sha[:2] in tops and self.has_object(sha) for sha in shas]

    def lock_path(self, key: str) -> Path:
        return self.root / lock_name(key)

    def ensure(self) -> None:
        """Create the directories and CACHEDIR.TAG (``make_dirs``), once per Layout."""
        if not self._ready:
            make_dirs(self.root)
            self._ready = True

    def iter_objects(self):
        """Yield (sha256, path) for every file shaped like an object; ignores strays."""
        from pathlib import Path

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
