"""Cache-hit cost: `casstore get URL --sha256 HEX` on a hit, as a process and in-process.

Peers, side by side in one run: `python -c 'import sqlite3'` (the floor for any
Python tool that reads an index) and `python -c pass`; in-process, a bare
`os.stat` of the object.  casstore runs by its console script, as users run it
(bench/entry.py), and as `python -m casstore`.  Prints medians and ratios.

    python bench/bench_hit.py [--runs 40]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _median_ms(cmd: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "artifact.bin"
        src.write_bytes(os.urandom(1 << 20))
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        env = {**os.environ, "CASSTORE_DIR": str(Path(tmp) / "store")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure with .pyc, as installed
        from bench.entry import casstore_cli

        get = ["get", src.as_uri(), "--sha256", digest]
        casstore = [*casstore_cli(), *get]
        subprocess.run(casstore, env=env, stdout=subprocess.DEVNULL, check=True)  # prime
        rows = {
            "python -c pass": _median_ms([sys.executable, "-c", "pass"], env, args.runs),
            "python -c 'import sqlite3'": _median_ms(
                [sys.executable, "-c", "import sqlite3"], env, args.runs
            ),
            "casstore get (hit)": _median_ms(casstore, env, args.runs),
            "python -m casstore get (hit)": _median_ms(
                [sys.executable, "-m", "casstore", *get], env, args.runs
            ),
        }
        base = rows["python -c 'import sqlite3'"]
        print(f"{'process':34} {'median ms':>10} {'vs import sqlite3':>18}")
        for name, ms in rows.items():
            print(f"{name:34} {ms:10.1f} {ms / base:17.2f}x")

        from casstore import Store

        store = Store(env["CASSTORE_DIR"])
        store.get(src.as_uri(), sha256=digest)
        n = 20_000
        t = time.perf_counter()
        for _ in range(n):
            store.get(src.as_uri(), sha256=digest)
        per_get = (time.perf_counter() - t) / n * 1e6
        obj = store.layout.object_path(digest)
        t = time.perf_counter()
        for _ in range(n):
            os.stat(obj)
        per_stat = (time.perf_counter() - t) / n * 1e6
        print(f"\nin-process Store.get hit: {per_get:.1f} us (os.stat alone: {per_stat:.1f} us)")


if __name__ == "__main__":
    main()
