"""Plain records of a download, passed between the layers and returned by the API.

(What the maintenance commands report is in reports.py: every ``get`` and
``fetch`` imports this module, and each dataclass costs ~0.4 ms to make.)"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


def __getattr__(name: str) -> object:
    # The report classes lived here: old imports and old pickles still find them.
    if name in ("GcReport", "ObjectInfo", "Stats", "VerifyReport"):
        from . import reports

        return getattr(reports, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LinkMode(enum.StrEnum):
    """How an object is materialized at a destination."""

    AUTO = "auto"  # hardlink, then reflink, then copy
    HARDLINK = "hardlink"
    REFLINK = "reflink"
    COPY = "copy"
    SYMLINK = "symlink"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Request:
    """One artifact to get: a URL (plus mirrors) and, ideally, its sha256."""

    url: str
    sha256: str | None = None
    name: str | None = None
    mirrors: tuple[str, ...] = ()
    dest: str | None = None
    md5: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Published:
    """The outcome of one write: the object now exists at ``path``.

    ``created`` is False when another writer had published the same content first.
    """

    sha256: str
    size: int
    blake3: str
    path: Path
    created: bool
    md5: str | None = None


@dataclass(frozen=True)
class Artifact:
    """A requested object, present in the store; ``dest`` when it was materialized."""

    sha256: str
    size: int
    path: Path
    dest: Path | None = None
    method: str | None = None

    def as_dict(self) -> dict:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "path": str(self.path),
            "dest": None if self.dest is None else str(self.dest),
            "method": self.method,
        }


@dataclass(frozen=True)
class LinkResult:
    """An object materialized at ``dest`` with ``method`` (hardlink, reflink, copy, symlink)."""

    sha256: str
    dest: Path
    method: str
