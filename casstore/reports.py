"""What the store's maintenance commands return: ``info``, ``ls``, ``stats``,
``gc`` and ``verify`` (models.py has the records of a download)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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


@dataclass
class GcReport:
    """What one gc run freed (or, with ``dry_run``, would free)."""

    dry_run: bool = False
    objects_evicted: int = 0
    bytes_freed: int = 0
    temps_removed: int = 0
    temp_bytes: int = 0
    locks_removed: int = 0
    rows_dropped: int = 0  # object rows whose object was not on disk
    links_dropped: int = 0  # link rows no longer live
    roots: int = 0
    objects_kept: int = 0
    bytes_kept: int = 0
    evicted: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "objects_evicted": self.objects_evicted,
            "bytes_freed": self.bytes_freed,
            "temps_removed": self.temps_removed,
            "temp_bytes": self.temp_bytes,
            "locks_removed": self.locks_removed,
            "rows_dropped": self.rows_dropped,
            "links_dropped": self.links_dropped,
            "roots": self.roots,
            "objects_kept": self.objects_kept,
            "bytes_kept": self.bytes_kept,
            "evicted": list(self.evicted),
        }


@dataclass
class VerifyReport:
    """What one verify run found and, with ``repair``, fixed."""

    fast: bool = False
    repair: bool = False
    objects: int = 0
    bytes: int = 0
    rehashed: int = 0  # fast mode: objects without a recorded blake3, checked by sha256
    corrupt: list[str] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)  # sha256, quarantine path
    exposed: list[dict] = field(default_factory=list)  # destinations holding a bad inode
    bad_modes: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    dangling: list[str] = field(default_factory=list)
    reindexed: int = 0
    broken_index: list[str] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[str]:
        """Corrupt objects still in the store (exit 3 while any remain)."""
        done = {q["sha256"] for q in self.quarantined}
        return [s for s in self.corrupt if s not in done]

    @property
    def lost_metadata(self) -> str | None:
        """What a re-index could not bring back, or None."""
        if not self.reindexed:
            return None
        text = (
            f"{self.reindexed} object(s) re-indexed from disk; their names, sources, "
            "links and pins lived only in the index and are lost"
        )
        if self.broken_index:
            text += f" (the unreadable index was kept as {', '.join(self.broken_index)})"
        return text

    def as_dict(self) -> dict:
        return {
            "fast": self.fast,
            "repair": self.repair,
            "objects": self.objects,
            "bytes": self.bytes,
            "rehashed": self.rehashed,
            "corrupt": list(self.corrupt),
            "unrepaired": self.unrepaired,
            "quarantined": list(self.quarantined),
            "exposed": list(self.exposed),
            "bad_modes": list(self.bad_modes),
            "orphans": list(self.orphans),
            "dangling": list(self.dangling),
            "reindexed": self.reindexed,
            "broken_index": list(self.broken_index),
            "lost_metadata": self.lost_metadata,
        }
