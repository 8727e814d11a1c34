"""Concurrency benchmarks for casstore (issue 3), against peers in one run.

1. 16 processes ``casstore get`` the same 256 MiB artifact at once from a local
   origin: bytes the origin served / artifact size (target 1.0), and wall time
   against a single ``casstore get`` (target <= 1.3x).
2. 1,000 files of 4 KiB: ``Store.get_many``, ``casstore fetch -j 8``,
   ``pooch.retrieve`` in a loop (in this process, and as a script run as a
   process of its own, as ``fetch`` is) and ``curl -K`` (one process,
   keep-alive), in files/s (target >= 1,500 files/s and >= 3x pooch), with each one's CPU
   time per file (its process and children, the origin's not counted);
   ``get_many`` also with its throttle held at eight workers, to show what
   casstore/throttle.py gains, and in one process (``processes=1``: no
   helper), to show what casstore/spread.py gains.  Nothing is deleted until the end (see
   ``create_cost``), and the cost of creating a file is printed before and after.
   Last, 4 processes ``get_many`` the same list at once into one store: each
   file once from the origin, wall time until all are done.  All of that
   ``--small-rounds`` times (every other round in reverse order); the ratios
   are those of each contestant's median.
   ``--origin nginx`` (the default when installed) serves them with
   bench_download.py's nginx from tmpfs; ``--origin python`` with tests/origin.py.
3. The write path alone for those 1,000 files, per-object durability (fsync
   temp, link, unlink, fsync dir, index row) against the same order with the
   temps synced as a batch first (git's core.fsyncMethod=batch idea).

The origin (nginx, or tests/origin.py in its own process) is fresh for each
contestant, on 127.0.0.1.  Stores go in --dir (default: a temp dir on the
disk that holds /tmp, since fsync costs are part of what is measured).

    .venv/bin/pip install -e '.[test,bench]'
    .venv/bin/python bench/bench_concurrency.py [--size-mib 256] [--files 1000] [--dir DIR]
        [--only flight|small|fsync] [--origin auto|python|nginx] [--small-rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _serve(conn, spec: dict) -> None:
    """Child process: an Origin with the routes in ``spec``; answers 'stats' on the pipe."""
    from tests.origin import Origin

    origin = Origin()
    digests = {}
    for path, (size, seed) in spec.items():
        rng = random.Random(seed)
        data = b"".join(rng.randbytes(min(1 << 20, size - i)) for i in range(0, size, 1 << 20))
        origin.add(path, data, chunk=1 << 20)
        digests[path] = hashlib.sha256(data).hexdigest()
    conn.send((origin.base, digests))
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            reqs = origin.requests()
            conn.send((len([r for r in reqs if r.method == "GET"]), origin.bytes_sent()))
        else:
            origin.close()
            conn.send("bye")
            return


@contextmanager
def origin_process(spec: dict):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, spec), daemon=True)
    proc.start()
    if not parent.poll(300):
        proc.kill()
        raise SystemExit("the origin process did not start")
    base, digests = parent.recv()

    def stats() -> tuple[int, int]:
        parent.send("stats")
        return parent.recv()

    try:
        yield base, digests, stats
    finally:
        parent.send("stop")
        parent.recv()
        proc.join(10)


def _cli(*args: str, store: Path) -> list[str]:
    from bench.entry import casstore_cli

    return [*casstore_cli(), "--store", str(store), *args]


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed_gets(cmd: list[str], procs: int) -> tuple[float, float, list[int]]:
    """Wall and CPU seconds of ``procs`` copies of ``cmd`` started at once, and their exit codes."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    running = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL) for _ in range(procs)]
    codes = [p.wait() for p in running]
    return time.perf_counter() - t0, _children_cpu() - cpu0, codes


def bench_single_flight(workdir: Path, size_mib: int, procs: int, rounds: int) -> None:
    import statistics

    size = size_mib << 20
    print(f"\n== {procs} processes get one {size_mib} MiB artifact at once ({rounds} rounds) ==")
    single, many, hits, codes = [], [], [], []
    with origin_process({"/big.bin": (size, 1)}) as (base, digests, stats):
        url, digest = base + "/big.bin", digests["/big.bin"]
        store = workdir / "flight"
        cmd = _cli("-q", "get", url, "--sha256", digest, store=store)
        for _ in range(rounds):
            # Alternated, so drift on a noisy machine hits both alike.
            *one, c = _timed_gets(cmd, 1)
            single.append(one)
            codes += c
            shutil.rmtree(store)
            requests1, served1 = stats()
            *crowd, c = _timed_gets(cmd, procs)
            many.append(crowd)
            codes += c
            requests, served = stats()
            # The floor: the same processes when every one is a cache hit (start-up alone).
            *floor, c = _timed_gets(cmd, procs)
            hits.append(floor)
            codes += c
            shutil.rmtree(store)
            assert requests - requests1 == 1, f"{requests - requests1} requests for one artifact"
            assert served - served1 == size, f"served {served - served1} bytes for {size}"

    def med(runs: list[list[float]], i: int) -> float:
        return statistics.median(r[i] for r in runs)

    ratio = med(many, 0) / med(single, 0)
    print(f"single get               {med(single, 0):6.2f} s wall  {med(single, 1):5.2f} s CPU")
    print(
        f"{procs} gets at once          {med(many, 0):6.2f} s wall  {med(many, 1):5.2f} s CPU"
        f"   ({ratio:.2f}x single; target <= 1.3x)"
    )
    print(
        f"{procs} cache hits at once     {med(hits, 0):6.2f} s wall  {med(hits, 1):5.2f} s CPU"
        "   (process start-up on this machine)"
    )
    per_round = ", ".join(f"{m[0] / s[0]:.2f}" for m, s in zip(many, single, strict=True))
    print(f"ratios per round         {per_round}")
    print("bytes served / size      1.00     (one request per round; asserted)")
    print(f"exit codes               {sorted(set(codes))}")


@contextmanager
def static_origin(spec: dict, workdir: Path):
    """nginx (bench_download.py's set-up) serving ``spec``'s files from tmpfs, counting
    requests in its access log; the same interface as ``origin_process``."""
    from bench.bench_download import Origin as Nginx

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="casstore-bench-origin-", dir=shm))
    digests = {}
    for path, (size, seed) in spec.items():
        data = random.Random(seed).randbytes(size)
        target = work / "www" / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        digests[path] = hashlib.sha256(data).hexdigest()
    log = work / "access.log"
    server = Nginx(work / "www", work, access_log=log)

    def stats() -> tuple[int, int]:
        lines = log.read_text().splitlines() if log.exists() else []
        return len([ln for ln in lines if '"GET ' in ln]), 0

    try:
        yield f"http://127.0.0.1:{server.port}", digests, stats
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


def nginx_available() -> bool:
    return bool(shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"))


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children so far."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def create_cost(directory: Path, n: int = 200) -> float:
    """Microseconds of CPU to create one empty file in a new ``directory`` (kept)."""
    directory.mkdir()
    cpu = time.process_time()
    for i in range(n):
        os.close(os.open(directory / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return (time.process_time() - cpu) / n * 1e6


def bench_small_files(
    workdir: Path, n: int, file_size: int, origin: str = "python", rounds: int = 3
) -> None:
    print(f"\n== {n} files of {file_size} B, origin: {origin}, stores in {workdir} ==")
    # Nothing is deleted until the end: on an ext4 without a journal (this VM's
    # disk) every new inode is first checked against the recently deleted ones
    # of its group, so one contestant's clean-up would slow the next one's creates.
    print(f"creating a file here costs {create_cost(workdir / 'probe-0'):.0f} us of CPU")
    spec = {f"/s/{i}.bin": (file_size, 1000 + i) for i in range(n)}
    # Each contestant's rates over the rounds; reported as medians, since this
    # machine's speed drifts by tens of percent from one minute to the next.
    results: dict[str, list[float]] = {}

    def run(label: str, fn, workdir: Path) -> None:
        workdir.mkdir(exist_ok=True)
        serve = static_origin(spec, workdir) if origin == "nginx" else origin_process(spec)
        with serve as (base, digests, stats):
            items = [(f"{base}{p}", digests[p]) for p in spec]
            cpu = _cpu()
            elapsed = fn(items, workdir)
            cpu = _cpu() - cpu
            requests, _ = stats()
        assert requests == n, f"{label}: {requests} requests for {n} files"
        results.setdefault(label, []).append(n / elapsed)
        print(
            f"{label:28s} {elapsed:6.2f} s  {n / elapsed:8.0f} files/s"
            f"  {cpu / n * 1e3:6.2f} ms CPU/file (client)"
        )

    def get_many(items, workdir, *, fixed: bool = False, processes: int | None = None) -> float:
        from casstore import Store
        from casstore.throttle import Throttle

        decide = Throttle.decide
        if fixed:  # its throttle held at the ceiling: eight workers throughout
            Throttle.decide = lambda self, *measured: None  # type: ignore[method-assign]
        try:
            store = Store(workdir / ("gm8" if fixed else f"gm{processes}"))
            t0 = time.perf_counter()
            store.get_many(items, concurrency=8, processes=processes)
            elapsed = time.perf_counter() - t0
            store.close()
        finally:
            Throttle.decide = decide  # type: ignore[method-assign]
        return elapsed

    def cli_fetch(items, workdir) -> float:
        listing = workdir / "list.txt"
        listing.write_text("".join(f"{u}#{d}\n" for u, d in items))
        t0 = time.perf_counter()
        subprocess.run(
            _cli("-q", "fetch", str(listing), "-j", "8", store=workdir / "cf"),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        elapsed = time.perf_counter() - t0
        return elapsed

    def pooch_loop(items, workdir) -> float:
        import logging

        import pooch

        pooch.get_logger().setLevel(logging.WARNING)
        out = workdir / "pooch"
        t0 = time.perf_counter()
        for i, (u, d) in enumerate(items):
            pooch.retrieve(
                u, known_hash=f"sha256:{d}", fname=f"{i}.bin", path=out, progressbar=False
            )
        elapsed = time.perf_counter() - t0
        return elapsed

    def pooch_script(items, workdir) -> float:
        """The same loop as a script run as its own process: what `casstore fetch`,
        a process too, is measured against like for like (interpreter and imports)."""
        listing = workdir / "pooch-items.json"
        listing.write_text(json.dumps(items))
        code = (
            "import json, logging, sys\n"
            "import pooch\n"
            "pooch.get_logger().setLevel(logging.WARNING)\n"
            "for i, (u, d) in enumerate(json.load(open(sys.argv[1]))):\n"
            "    pooch.retrieve(u, known_hash=f'sha256:{d}', fname=f'{i}.bin', path=sys.argv[2],"
            " progressbar=False)\n"
        )
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code, str(listing), str(workdir / "pooch-script")], check=True
        )
        return time.perf_counter() - t0

    def curl_k(items, workdir) -> float:
        out = workdir / "curl"
        out.mkdir()
        config = workdir / "curl.cfg"
        config.write_text(
            "".join(f'url = "{u}"\noutput = "{out}/{i}.bin"\n' for i, (u, _) in enumerate(items))
        )
        t0 = time.perf_counter()
        subprocess.run(["curl", "-s", "-K", str(config)], check=True)
        elapsed = time.perf_counter() - t0
        return elapsed

    def overlapping(items, workdir) -> float:
        """4 processes get_many the same list at once (parallel installs sharing a cache)."""
        listing = workdir / "items.json"
        listing.write_text(json.dumps(items))
        store, go = workdir / "ov", workdir / "go"
        code = (
            "import json, os, sys, time\n"
            "from casstore import Store\n"
            "s = Store(sys.argv[1]); s.index.conn\n"
            "open(sys.argv[3], 'w').close()\n"
            "while not os.path.exists(sys.argv[4]): time.sleep(0.001)\n"
            "s.get_many([tuple(i) for i in json.load(open(sys.argv[2]))], concurrency=8)\n"
        )
        readies = [workdir / f"ready-{i}" for i in range(4)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(store), str(listing), str(r), str(go)], cwd=ROOT
            )
            for r in readies
        ]
        while not all(r.exists() for r in readies):
            time.sleep(0.01)
        t0 = time.perf_counter()
        go.touch()
        codes = [p.wait() for p in procs]
        elapsed = time.perf_counter() - t0
        assert codes == [0] * 4, codes
        return elapsed

    contestants = [
        ("Store.get_many (8 threads)", get_many),
        ("  the same, 8 fixed workers", lambda items, d: get_many(items, d, fixed=True)),
        ("  the same, one process", lambda items, d: get_many(items, d, processes=1)),
        ("casstore fetch -j 8", cli_fetch),
        ("pooch.retrieve loop", pooch_loop),
        ("  the same as a script", pooch_script),
        *([("curl -K (keep-alive)", curl_k)] if shutil.which("curl") else []),
        ("4 x get_many, same list", overlapping),
    ]
    for r in range(rounds):
        print(f"-- round {r + 1} of {rounds}")
        # Every other round in reverse order: no contestant always runs first or last.
        for label, fn in contestants if r % 2 == 0 else contestants[::-1]:
            run(label, fn, workdir / f"round-{r}")
    print(f"creating a file here costs {create_cost(workdir / 'probe-1'):.0f} us of CPU")
    rate = {label: statistics.median(rates) for label, rates in results.items()}
    print(f"-- medians of {rounds} round(s)")
    for label, _ in contestants:
        each = " ".join(f"{x:.0f}" for x in results[label])
        print(f"{label:28s} {rate[label]:8.0f} files/s  ({each})")
    pooch_rate = rate["pooch.retrieve loop"]
    for label in ("Store.get_many (8 threads)", "casstore fetch -j 8"):
        # Each round's own ratio too: the two ran minutes apart at most.
        paired = zip(results[label], results["pooch.retrieve loop"], strict=True)
        each = ", ".join(f"{ours / theirs:.1f}" for ours, theirs in paired)
        print(
            f"{label} / pooch: {rate[label] / pooch_rate:.1f}x (target >= 3x, >= 1500 files/s;"
            f" rounds {each})"
        )
    # A process against a process: both pay an interpreter and their imports.
    ratio = rate["casstore fetch -j 8"] / rate["  the same as a script"]
    print(f"casstore fetch -j 8 / pooch as a script: {ratio:.1f}x")
    if "curl -K (keep-alive)" in rate:
        ratio = rate["Store.get_many (8 threads)"] / rate["curl -K (keep-alive)"]
        print(f"get_many / curl -K: {ratio:.2f}x")


_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _sync_file_range(fd: int, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    if libc.sync_file_range(fd, 0, 0, flags) != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range failed")


def bench_batched_fsync(workdir: Path, n: int, file_size: int) -> None:
    """Publish n small objects: per-object durability vs temps synced in one batch.

    Both keep SPEC §1's order per object: the temp's bytes are durable before
    link(temp, object); the temp is unlinked and the object's directory fsynced
    before the index row commits.  The batch variant only reorders *between*
    objects: every temp is written, then all are synced, then all published,
    then the directories synced once each, then one index transaction.
    """
    from casstore.index import Index
    from casstore.ingest import Ingest, fsync_dir
    from casstore.layout import OBJECT_MODE, Layout

    print(f"\n== write path, {n} objects of {file_size} B (durability order kept) ==")
    blobs = [random.Random(5000 + i).randbytes(file_size) for i in range(n)]

    def per_object() -> float:
        layout = Layout(workdir / "po")
        index = Index(layout)
        index.conn  # noqa: B018  open (and migrate) outside the timing
        t0 = time.perf_counter()
        for data in blobs:
            with Ingest(layout) as ingest:
                ingest.write(data)
                p = ingest.commit()
            index.record_object(p.sha256, p.size, blake3=p.blake3)
        elapsed = time.perf_counter() - t0
        index.close()
        shutil.rmtree(layout.root)
        return elapsed

    def batched() -> float:
        layout = Layout(workdir / "ba")
        index = Index(layout)
        index.conn  # noqa: B018
        t0 = time.perf_counter()
        ingests = []
        for data in blobs:
            ingest = Ingest(layout)
            ingest.write(data)
            ingests.append(ingest)
        # 1. make every temp durable, git's core.fsyncMethod=batch way: write
        # back each file's pages without a disk-cache flush, wait for them,
        # then one fsync whose flush covers them all.
        for ing in ingests:
            os.fchmod(ing._fd, OBJECT_MODE)
            _sync_file_range(ing._fd, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
        os.fsync(ingests[-1]._fd)
        for ing in ingests:
            os.close(ing._fd)
            ing._fd = None
        # 2. link, unlink (EEXIST = success), 3. fsync each directory once
        dirs = set()
        rows = []
        for ing in ingests:
            h = ing.hasher
            obj = layout.object_path(h.sha256)
            obj.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(ing.temp, obj)
                dirs.add(obj.parent)
            except FileExistsError:
                pass
            os.unlink(ing.temp)
            rows.append((h.sha256, h.size, h.blake3))
        for d in dirs:
            fsync_dir(d)
        # 4. the index rows, after the objects are durable
        for sha, size, b3 in rows:
            index.record_object(sha, size, blake3=b3)
        elapsed = time.perf_counter() - t0
        index.close()
        shutil.rmtree(layout.root)
        return elapsed

    a, b = per_object(), batched()
    print(f"per object (fsync each)  {a:6.2f} s  {n / a:8.0f} objects/s")
    print(f"batched temp sync        {b:6.2f} s  {n / b:8.0f} objects/s  ({a / b:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--procs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the flight benchmark")
    parser.add_argument(
        "--small-rounds",
        type=lambda v: max(1, int(v)),
        default=3,
        help="rounds of the small-files benchmark (at least 1)",
    )
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--file-size", type=int, default=4096)
    parser.add_argument("--dir", help="where the stores go (default: a temp dir under /tmp)")
    parser.add_argument("--only", choices=["flight", "small", "fsync"])
    parser.add_argument(
        "--origin",
        choices=["auto", "python", "nginx"],
        default="auto",
        help="origin of the small files (auto: nginx when installed, as bench_download.py)",
    )
    args = parser.parse_args()
    # Start-up is part of what is measured: run with .pyc files, as installed.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="casstore-bench-", dir=base))
    print(f"stores in {workdir} (python {sys.version.split()[0]}, {os.cpu_count()} cpus)")
    try:
        if args.only in (None, "flight"):
            bench_single_flight(workdir, args.size_mib, args.procs, args.rounds)
        if args.only in (None, "small"):
            origin = args.origin
            if origin == "auto":
                origin = "nginx" if nginx_available() else "python"
            bench_small_files(workdir, args.files, args.file_size, origin, args.small_rounds)
        if args.only in (None, "fsync"):
            bench_batched_fsync(workdir, args.files, args.file_size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
