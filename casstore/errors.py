"""The errors casstore raises, one tree so ``except CasError`` catches all of them.

::

    CasError                 exit 1  anything else (LockTimeout, IndexError_...)
    ├── InvalidInput         exit 2  bad ref/hex/size/age/list line, found before any I/O
    │   └── AmbiguousRef             ref, candidates
    ├── IntegrityFailure     exit 3
    │   ├── HashMismatch             url or path, algorithm, expected, actual
    │   ├── SizeMismatch             url or path, expected, actual
    │   └── CorruptObject            path, expected, actual (verify)
    ├── DownloadError        exit 4  url (redacted), status, attempts
    ├── NotFound             exit 5  ref
    └── BatchError           exit = worst item's; results per item

Every error is built from plain keyword values at the raise site; ``str(e)`` is
the one line the command line prints.  Errors keep their keyword arguments so
they pickle across worker processes (conda-package-handling#349 lost them).
"""

from __future__ import annotations


class CasError(Exception):
    """Root of every error casstore raises."""

    exit_code = 1

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self._fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self._fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[CasError], message: str, fields: dict[str, object]) -> CasError:
    return cls(message, **fields)


class InvalidInput(CasError):
    """Bad usage or bad input; always raised before any network or disk work."""

    exit_code = 2


class AmbiguousRef(InvalidInput):
    """A digest prefix matched more than one object (``ref``, ``candidates``)."""


class IntegrityFailure(CasError):
    """Bytes are not what they were promised to be."""

    exit_code = 3


class HashMismatch(IntegrityFailure):
    """A whole body hashed to something else (``url``/``path``, ``algorithm``,
    ``expected``, ``actual``)."""


class SizeMismatch(IntegrityFailure):
    """A whole body had another size than expected (``expected``, ``actual``)."""


class CorruptObject(IntegrityFailure):
    """An object in the store no longer hashes to its name (``path``)."""


class DownloadError(CasError):
    """The source failed after retries (``url`` redacted, ``status``, ``attempts``)."""

    exit_code = 4


class NotFound(CasError):
    """No object answers to ``ref``."""

    exit_code = 5


class LockTimeout(CasError):
    """A lock was not granted in time (only raised where the caller asked for it)."""


class BatchError(CasError):
    """Some items of a batch failed; ``results`` holds a path or an error per item.

    Its exit code is the highest among the failed items.
    """

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message, **fields)
        errors = [r for r in fields.get("results", ()) if isinstance(r, CasError)]
        self.errors = errors
        self.exit_code = max((e.exit_code for e in errors), default=1)


def exit_code_of(exc: BaseException) -> int:
    """The command line's exit code for an exception (1 when it is not ours)."""
    return getattr(exc, "exit_code", 1) if isinstance(exc, CasError) else 1
