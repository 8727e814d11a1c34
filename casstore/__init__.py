"""casstore: a content-addressed artifact store.

Downloads artifacts once, proves them by sha256, keeps one copy per content
and hands them out as hardlinks; safe under any number of threads and
processes sharing one store.

    from casstore import Store
    path = Store().get(url, sha256="...")
"""

from __future__ import annotations

__version__ = "0.1.0"

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
from .models import (
    Artifact,
    GcReport,
    LinkMode,
    LinkResult,
    ObjectInfo,
    Published,
    Request,
    Stats,
    VerifyReport,
)
from .store import Store

__all__ = [
    "AmbiguousRef",
    "Artifact",
    "BatchError",
    "CasError",
    "CorruptObject",
    "DownloadError",
    "GcReport",
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
    "VerifyReport",
    "__version__",
]
