"""``python -m casstore`` and the ``casstore`` console script."""

from __future__ import annotations

import os
import sys


def main() -> None:
    # A plain `get` hit is served without importing click or the Store (hit.py).
    from .hit import serve

    code = serve(sys.argv[1:])
    if code is not None:
        # Served: the path is written and flushed, the index row committed.
        # Skipping the interpreter's teardown (module clean-up, and closing
        # SQLite, which checkpoints the WAL) saves a hit ~2-3 ms of CPU, and
        # most of the tail when a crowd of waiters wakes at once (15 waiters:
        # ~50 ms from the holder's release to the last exit, ~15 ms without).
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr: the hit is served all the same
        os._exit(code)
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
