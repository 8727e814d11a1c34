"""Worker processes for the race and kill tests: ``python -m tests.workers SPEC_JSON``.

Each worker opens the store named in the spec, writes ``ready`` and waits for
the ``go`` file (so many processes start at the same moment), runs its job,
prints one JSON document (what it did, errors by kind) and exits 0 only if
every operation that must succeed did.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path

from casstore import CasError, NotFound, Store


def _barrier(spec: dict) -> None:
    if spec.get("ready"):
        Path(spec["ready"]).touch()
    go = spec.get("go")
    if go:
        deadline = time.monotonic() + 60
        while not os.path.exists(go):  # the test creates it once every worker is ready
            if time.monotonic() > deadline:
                raise SystemExit("go file never appeared")
            time.sleep(0.001)


def get_threads(store: Store, spec: dict) -> dict:
    """``threads`` threads each get every (url, sha256) in its own shuffled order."""
    errors: list[str] = []
    paths: list[str] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        items = list(spec["requests"])
        random.Random(spec.get("seed", 0) * 100 + n).shuffle(items)
        for url, digest in items:
            try:
                path = store.get(url, sha256=digest)
                with lock:
                    paths.append(str(path))
            except CasError as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(n,)) for n in range(spec.get("threads", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"paths": paths, "errors": errors}


def get_many(store: Store, spec: dict) -> dict:
    """One ``get_many`` of ``requests`` (url, sha256) in a seeded shuffled order."""
    items = [tuple(r) for r in spec["requests"]]
    random.Random(spec.get("seed", 0)).shuffle(items)
    try:
        paths = store.get_many(items, concurrency=spec.get("concurrency", 8))
    except CasError as exc:
        return {"paths": [], "errors": [f"{type(exc).__name__}: {exc}"]}
    return {"paths": [str(p) for p in paths], "errors": []}


def put_many(store: Store, spec: dict) -> dict:
    """``count`` puts of distinct small blobs, each with a name."""
    errors = []
    for i in range(spec["count"]):
        data = f"{spec['seed']}:{i}:".encode() * 64
        try:
            store.put(data, name=f"w{spec['seed']}-{i}")
        except Exception as exc:  # a "database is locked" must be reported, whatever its type
            errors.append(f"{type(exc).__name__}: {exc}")
    return {"errors": errors}


def random_ops(store: Store, spec: dict) -> dict:
    """``count`` seeded random put/get/link/path/rm operations on a small shared set.

    A get must always succeed, even when another process removes the object
    under it; link, path and rm of an object another process just removed may
    say NotFound, which is the SPEC's answer, not a failure.
    """
    rng = random.Random(spec["seed"])
    remote = [tuple(r) for r in spec["requests"]]  # (url, sha256)
    local = [bytes.fromhex(h) for h in spec["blobs"]]
    digests = [d for _, d in remote] + spec["blob_digests"]
    dest_dir = Path(spec["dest_dir"])
    errors: list[str] = []
    counts: dict[str, int] = {}
    for _ in range(spec["count"]):
        op = rng.choices(["get", "put", "link", "path", "rm", "rmname"], [35, 20, 20, 5, 15, 5])[0]
        counts[op] = counts.get(op, 0) + 1
        try:
            if op == "get":
                url, digest = rng.choice(remote)
                dest = (
                    dest_dir / f"get-{digest[:8]}-{rng.randrange(2)}"
                    if rng.random() < 0.5
                    else None
                )
                path = store.get(url, sha256=digest, dest=dest, name=f"n{digest[:6]}")
                if dest is None:
                    assert path.name == digest
            elif op == "put":
                data = rng.choice(local)
                store.put(data, name=f"p{rng.randrange(3)}")
            elif op == "link":
                store.link(rng.choice(digests), dest_dir / f"l{rng.randrange(4)}", force=True)
            elif op == "path":
                store.path(rng.choice(digests))
            elif op == "rm":
                store.rm(rng.choice(digests), force=True)
            else:
                store.rm(f"p{rng.randrange(3)}")
        except NotFound:
            if op == "get":
                errors.append("get said NotFound")
        except CasError as exc:
            errors.append(f"{op}: {type(exc).__name__}: {exc}")
        except Exception as exc:  # a crash is what this test looks for
            errors.append(f"{op} crashed: {type(exc).__name__}: {exc}")
    return {"errors": errors, "counts": counts}


JOBS = {
    "get_threads": get_threads,
    "get_many": get_many,
    "put_many": put_many,
    "random_ops": random_ops,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    store = Store(spec["store"])
    _barrier(spec)
    result = JOBS[spec["job"]](store, spec)
    store.close()
    print(json.dumps(result))
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
