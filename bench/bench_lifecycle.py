"""Lifecycle benchmarks: verify --fast vs verify, gc over many objects, linking a tree.

    python bench/bench_lifecycle.py                      # 2 GiB, 100,000 objects, 10,000 links
    python bench/bench_lifecycle.py --verify-mib 256 --gc-objects 10000 --links 2000

Each contest runs its contestants side by side in one run and prints a ratio:
- ``verify --fast`` (blake3 + size, every core) against full ``verify``
  (sha256, one core), over objects of 64 MiB;
- ``gc`` over many small objects: a pass that keeps everything, and one that
  evicts everything (seconds);
- ``Store.link`` of N objects into a tree against ``cp -al`` of the same objects.

Setup writes objects straight into the layout (no fsync) to keep it quick;
only the contestants are timed.  Everything stays in a temp dir on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from casstore import Store


def _fill(store: Store, blobs, *, age: float = 0.0) -> list[str]:
    """Write objects directly (content-addressed, 0444) and index them with blake3."""
    from blake3 import blake3

    store.layout.ensure()
    rows, digests = [], []
    when = time.time() - age
    for data in blobs:
        d = hashlib.sha256(data).hexdigest()
        path = store.layout.object_path(d)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o444)
        rows.append((d, len(data), blake3(data).hexdigest(), when))
        digests.append(d)
    store.index.index_objects(rows)
    return digests


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_verify(root: Path, mib: int) -> None:
    store = Store(root / "verify")
    chunk = 64 << 20
    count = max(1, (mib << 20) // chunk)
    seed = os.urandom(1 << 20)
    _fill(store, ((bytes([i]) * 16 + seed * 64)[:chunk] for i in range(count)))
    total = count * chunk
    # Warm the page cache once so both contestants read from memory.
    store.verify(fast=True)
    full, r1 = _timed(lambda: store.verify())
    fast, r2 = _timed(lambda: store.verify(fast=True))
    assert not r1.corrupt and not r2.corrupt and r1.objects == r2.objects == count
    gib = total / (1 << 30)
    print(f"verify        {count} objects, {gib:.2f} GiB")
    print(f"  full (sha256, 1 core)     {full:7.2f} s   {total / full / 1e9:5.2f} GB/s")
    print(f"  fast (blake3, all cores)  {fast:7.2f} s   {total / fast / 1e9:5.2f} GB/s")
    print(f"  ratio full / fast         {full / fast:7.2f}x")
    store.close()


def bench_gc(root: Path, n: int) -> None:
    store = Store(root / "gc")
    _fill(store, (f"object {i}".encode() * 8 for i in range(n)), age=3600)
    keep, r1 = _timed(lambda: store.gc())
    evict, r2 = _timed(lambda: store.gc(older_than=0))
    assert r1.objects_evicted == 0 and r2.objects_evicted == n, (r1, r2)
    print(f"gc            {n} small objects")
    print(f"  pass that keeps all       {keep:7.2f} s   {n / keep:9.0f} objects/s")
    print(f"  pass that evicts all      {evict:7.2f} s   {n / evict:9.0f} objects/s")
    store.close()


def bench_link(root: Path, n: int) -> None:
    store = Store(root / "link")
    digests = _fill(store, (f"linked {i}".encode() * 8 for i in range(n)), age=3600)
    tree = root / "tree"

    def link_all():
        for d in digests:
            store.link(d, tree / d[:2] / d)

    ours, _ = _timed(link_all)
    cp, _ = _timed(
        lambda: subprocess.run(
            ["cp", "-al", str(store.layout.objects), str(root / "cp-tree")], check=True
        )
    )
    assert sum(len(files) for _, _, files in os.walk(tree)) == n
    print(f"link          {n} objects into a tree")
    print(f"  Store.link (auto)         {ours:7.2f} s   {n / ours:9.0f} links/s")
    print(f"  cp -al                    {cp:7.2f} s   {n / cp:9.0f} links/s")
    print(f"  ratio ours / cp -al       {ours / cp:7.2f}x")
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verify-mib", type=int, default=2048)
    ap.add_argument("--gc-objects", type=int, default=100_000)
    ap.add_argument("--links", type=int, default=10_000)
    ap.add_argument("--only", choices=["verify", "gc", "link"])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="casstore-bench-", dir=os.environ.get("TMPDIR", "/tmp")))
    try:
        if args.only in (None, "verify"):
            bench_verify(root, args.verify_mib)
        if args.only in (None, "gc"):
            bench_gc(root, args.gc_objects)
        if args.only in (None, "link"):
            bench_link(root, args.links)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
