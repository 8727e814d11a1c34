"""``python -m casstore`` and the ``casstore`` console script."""

from __future__ import annotations

import os
import sys


def main() -> None:
    # A plain `get` hit is served without importing click or the Store (hit.py).
    from .hit import serve

    code = serve(sys.argv[1:])
    if code is None:
        from .cli import main as cli_main

        try:
            cli_main()
        except SystemExit as exc:
            if not isinstance(exc.code, int | None):
                raise
            code = exc.code or 0
    _exit(code or 0)


def _exit(code: int) -> None:
    """End the process without the interpreter's teardown.

    The command is done: a hit served (its path written, its row committed),
    or a full command run and its store closed (cli.py).  The teardown frees
    every object and module one by one (~20 ms after a batch of 1,000 files)
    for memory the kernel takes back at once; a hit also skips closing
    SQLite, which checkpoints the WAL: ~2-3 ms of CPU, and most of the tail
    when a crowd of waiters wakes at once (15 waiters: ~50 ms from the
    holder's release to the last exit, ~15 ms without).  What the teardown
    would do that matters is done here: the atexit handlers (logging's), and
    stdout and stderr flushed.  Should a thread of ours still run, or a flush
    fail, the interpreter exits as usual, to wait for it or to report the
    failure.
    """
    threading = sys.modules.get("threading")
    if threading and any(
        t is not threading.main_thread() and not t.daemon for t in threading.enumerate()
    ):
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    main()
