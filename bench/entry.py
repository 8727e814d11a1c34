"""How the benchmarks start casstore: as its users do, by the console script
that installing it put beside this interpreter (``.venv/bin/casstore``).
The script runs the casstore that venv has installed: with the README's
``pip install -e``, this checkout (a venv shared by several checkouts runs
whichever one it was installed from).

``python -m casstore`` works too, but runpy's imports (importlib.util,
contextlib, functools, collections) cost each process ~1-4 ms of CPU more
than the script, which a crowd of processes on two cores adds up.
"""

from __future__ import annotations

import sys
from pathlib import Path


def casstore_cli() -> list[str]:
    """The command that runs casstore: its console script, else ``python -m casstore``."""
    script = Path(sys.executable).with_name("casstore")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "casstore"]
