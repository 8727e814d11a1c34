"""``python -m casstore`` and the ``casstore`` console script."""

from __future__ import annotations

import sys


def main() -> None:
    # A plain `get` hit is served without importing click or the Store (hit.py).
    from .hit import serve

    code = serve(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
