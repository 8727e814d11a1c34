"""Hashing in one pass, and the grammar of digests.

sha256 is the address; blake3 is recorded for ``verify --fast``; md5 is
computed in the same pass only when a caller (a conda lock) asks for it.
blake3 is imported on first write, never on a cache hit.
"""

from __future__ import annotations

from .errors import InvalidInput

_HEX = "0123456789abcdefABCDEF"


def is_hex(text: str) -> bool:
    return bool(text) and not text.strip(_HEX)  # strip runs in C: ~20x a loop over 64 chars


def parse_sha256(text: str, *, what: str = "sha256") -> str:
    """Return the 64-lowercase-hex digest in ``text`` (optionally ``sha256:``-prefixed).

    Raises:
        InvalidInput: ``text`` is not a sha256 digest.
    """
    value = text.strip()
    if value.lower().startswith("sha256:"):
        value = value[7:]
    if len(value) != 64 or not is_hex(value):
        raise InvalidInput(f"invalid {what} {text!r}: expected 64 hex characters", ref=text)
    return value.lower()


def parse_md5(text: str) -> str:
    value = text.strip()
    if len(value) != 32 or not is_hex(value):
        raise InvalidInput(f"invalid md5 {text!r}: expected 32 hex characters", ref=text)
    return value.lower()


class Hasher:
    """sha256 + blake3 (+ md5) fed from the same buffers.

    hashlib and blake3 release the GIL on large buffers, so a second thread
    can write while this one hashes.
    """

    __slots__ = ("_b3", "_md5", "_sha", "size")

    def __init__(self, *, md5: bool = False) -> None:
        import hashlib

        from blake3 import blake3

        self._sha = hashlib.sha256()
        self._b3 = blake3(max_threads=1)
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._b3.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def blake3(self) -> str:
        return self._b3.hexdigest()

    @property
    def md5(self) -> str | None:
        return None if self._md5 is None else self._md5.hexdigest()


def blake3_file(path, *, threads: int = 1) -> str:
    """blake3 of a file, memory-mapped so large files hash across threads."""
    from blake3 import blake3

    hasher = blake3(max_threads=threads if threads > 0 else blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def sha256_file(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
