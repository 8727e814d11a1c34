"""The ref grammar (SPEC §2) and its resolution to a sha256.

A ref is a 64-hex sha256, ``sha256:<64 hex>``, a unique hex prefix of at
least 8 characters, or a name from the index.  Resolution looks at both the
index and the disk, since the objects are the truth and the index may be
behind (a lost index, an object published by a killed process).
"""

from __future__ import annotations

from .errors import AmbiguousRef, InvalidInput, NotFound
from .hashing import is_hex, parse_sha256
from .index import Index
from .layout import Layout

MIN_PREFIX = 8


def parse_ref(ref: str) -> tuple[str, str]:
    """Classify ``ref`` without I/O: ("sha256", hex) | ("prefix", hex) | ("name", text).

    Raises:
        InvalidInput: an empty ref or a malformed ``sha256:`` digest.
    """
    text = ref.strip()
    if not text:
        raise InvalidInput("empty ref", ref=ref)
    if text.lower().startswith("sha256:"):
        return "sha256", parse_sha256(text, what="ref")
    if len(text) == 64 and is_hex(text):
        return "sha256", text.lower()
    if is_hex(text) and MIN_PREFIX <= len(text) < 64:
        return "prefix", text.lower()
    return "name", text


def is_short_prefix(text: str) -> bool:
    """Hex too short to be a digest prefix: bad input, unless it is a name."""
    return is_hex(text) and len(text) < MIN_PREFIX


def too_short(ref: str) -> InvalidInput:
    return InvalidInput(
        f"ref {ref!r} is too short: a digest prefix needs at least {MIN_PREFIX} hex characters",
        ref=ref,
    )


def resolve(ref: str, layout: Layout, index: Index) -> str:
    """The sha256 that ``ref`` names.

    A full digest resolves without looking (the caller checks the object
    exists).  Raises:
        InvalidInput: malformed, or hex under 8 characters that is no name.
        AmbiguousRef: a prefix that matches several objects (``candidates``).
        NotFound: nothing answers to ``ref``.
    """
    kind, value = parse_ref(ref)
    if kind == "sha256":
        return value
    if kind == "prefix":
        found = sorted(set(index.match_prefix(value)) | set(layout.iter_prefix(value)))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise AmbiguousRef(
                f"ambiguous ref {ref!r}: matches {', '.join(found)}",
                ref=ref,
                candidates=found,
            )
    sha = index.lookup_name(value)
    if sha is not None:
        return sha
    if is_short_prefix(value):
        raise too_short(ref)
    raise NotFound(f"no object matches ref {ref!r}", ref=ref)
