"""casstore: a content-addressed artifact store.

Downloads artifacts once, proves them by sha256, keeps one copy per content
and hands them out as hardlinks; safe under any number of threads and
processes sharing one store.

    from casstore import Store
    path = Store().get(url, sha256="...")
"""

from __future__ import annotations

__version__ = "0.1.0"

# Loaded on first use (PEP 562), so that `import casstore.hit` for a
# command-line cache hit does not pay for the whole API.
_LAZY = {
    **dict.fromkeys(
        [
            "AmbiguousRef",
            "BatchError",
            "CasError",
            "CorruptObject",
            "DownloadError",
            "HashMismatch",
            "IntegrityFailure",
            "InvalidInput",
            "LockTimeout",
            "NotFound",
            "SizeMismatch",
        ],
        "errors",
    ),
    **dict.fromkeys(
        ["Artifact", "LinkMode", "LinkResult", "ObjectInfo", "Published", "Request", "Stats"],
        "models",
    ),
    "Store": "store",
}


TYPE_CHECKING = False  # typing is not imported on the hit path
if TYPE_CHECKING:
    from .errors import (
        AmbiguousRef,
        BatchError,
        CasError,
        CorruptObject,
        DownloadError,
        HashMismatch,
        IntegrityFailure,
        InvalidInput,
        LockTimeout,
        NotFound,
        SizeMismatch,
    )
    from .models import Artifact, LinkMode, LinkResult, ObjectInfo, Published, Request, Stats
    from .store import Store


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'casstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AmbiguousRef",
    "Artifact",
    "BatchError",
    "CasError",
    "CorruptObject",
    "DownloadError",
    "HashMismatch",
    "IntegrityFailure",
    "InvalidInput",
    "LinkMode",
    "LinkResult",
    "LockTimeout",
    "NotFound",
    "ObjectInfo",
    "Published",
    "Request",
    "SizeMismatch",
    "Stats",
    "Store",
    "__version__",
]
