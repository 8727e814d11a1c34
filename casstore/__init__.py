"""casstore: a content-addressed artifact store.

Downloads artifacts once, proves them by sha256, keeps one copy per content
and hands them out as hardlinks; safe under any number of threads and
processes sharing one store.

    from casstore import Store
    path = Store().get(url, sha256="...")
"""

from __future__ import annotations

__version__ = "0.1.0"

_ERRORS = (
    "AmbiguousRef", "BatchError", "CasError", "CorruptObject", "DownloadError", "HashMismatch",
    "IntegrityFailure", "InvalidInput", "LockTimeout", "NotFound", "SizeMismatch",
)  # fmt: skip
_MODELS = ("Artifact", "LinkMode", "LinkResult", "Published", "Request")
_REPORTS = ("GcReport", "ObjectInfo", "Stats", "VerifyReport")
# Loaded on first use (PEP 562), so that `import casstore.hit` for a
# command-line cache hit does not pay for the whole API.
_LAZY = {
    **dict.fromkeys(_ERRORS, "errors"),
    **dict.fromkeys(_MODELS, "models"),
    **dict.fromkeys(_REPORTS, "reports"),
    "Store": "store",
}

__all__ = [
    "AmbiguousRef", "Artifact", "BatchError", "CasError", "CorruptObject", "DownloadError",
    "GcReport", "HashMismatch", "IntegrityFailure", "InvalidInput", "LinkMode", "LinkResult",
    "LockTimeout", "NotFound", "ObjectInfo", "Published", "Request", "SizeMismatch", "Stats",
    "Store", "VerifyReport", "__version__",
]  # fmt: skip

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
    )  # fmt: skip
    from .models import Artifact, LinkMode, LinkResult, Published, Request
    from .reports import GcReport, ObjectInfo, Stats, VerifyReport
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
    return __all__
