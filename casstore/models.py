"""Plain records passed between the layers and returned by the API."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


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


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows of one object."""

    sha256: str
    size: int
    path: Path
    blake3: str | None = None
    md5: str | None = None
    created: float | None = None
    last_used: float | None = None
    pinned: bool = False
    names: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    links: tuple[dict, ...] = field(default=())

    def as_dict(self) -> dict:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "path": str(self.path),
            "blake3": self.blake3,
            "md5": self.md5,
            "created": self.created,
            "last_used": self.last_used,
            "pinned": self.pinned,
            "names": list(self.names),
            "sources": list(self.sources),
            "links": list(self.links),
        }


@dataclass(frozen=True)
class Stats:
    """Totals over the store."""

    objects: int
    bytes: int
    names: int
    pinned: int
    links: int
    temp_files: int
    saved_bytes: int
    path: Path

    def as_dict(self) -> dict:
        return {
            "objects": self.objects,
            "bytes": self.bytes,
            "names": self.names,
            "pinned": self.pinned,
            "links": self.links,
            "temp_files": self.temp_files,
            "saved_bytes": self.saved_bytes,
            "path": str(self.path),
        }
