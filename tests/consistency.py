"""``assert_store_consistent``: SPEC §1's invariants, checked after every test that writes."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from pathlib import Path


def assert_store_consistent(
    root: str | os.PathLike[str], *, allow_temps: bool = False, indexed: bool = False
) -> None:
    """With ``indexed``, also every object has its row, blake3 included (as it
    must after a batch that ended, even by Ctrl-C; not after a kill)."""
    root = Path(root)
    objects = root / "sha256"
    found = set()
    if objects.exists():
        for dirpath, _dirs, files in os.walk(objects):
            for name in files:
                path = Path(dirpath) / name
                rel = path.relative_to(objects).parts
                assert len(rel) == 3 and rel[0] == name[:2] and rel[1] == name[2:4], (
                    f"stray file in sha256/: {path}"
                )
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                assert digest == name, f"object {path} has sha256 {digest}"
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode == 0o444, f"object {path} has mode {oct(mode)}"
                found.add(name)
    if not allow_temps and (root / "tmp").exists():
        temps = [n for n in os.listdir(root / "tmp")]
        assert not temps, f"temp files left in tmp/: {temps}"
    index = root / "index.db"
    if index.exists():
        conn = sqlite3.connect(index)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if "objects" not in tables:
                # Made, and killed before its first migration committed: the next
                # open migrates it; nothing in it to check.
                return
            rows = {r[0] for r in conn.execute("SELECT sha256 FROM objects")}
            if indexed:
                assert not found - rows, f"objects without rows: {sorted(found - rows)}"
                thin = conn.execute("SELECT sha256 FROM objects WHERE blake3 IS NULL").fetchall()
                assert not thin, f"rows without blake3: {thin}"
            for table in ("names", "sources", "links"):
                for (sha,) in conn.execute(f"SELECT sha256 FROM {table}"):
                    assert sha in rows, f"{table} row points at unindexed object {sha}"
        finally:
            conn.close()
        missing = rows - found
        assert not missing, f"index rows without objects: {sorted(missing)}"
