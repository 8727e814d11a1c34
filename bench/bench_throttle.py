"""get_many with its throttle (casstore/throttle.py) against eight fixed workers.

1,000 files of 4 KiB from nginx (bench_download.py's set-up) on 127.0.0.1,
into a fresh store per run, the two variants alternating and swapping who
goes first each round: on a disk where file creates get cheaper or dearer as
the run goes on (see bench_concurrency.py ``create_cost``), neither is always
the one that pays.  Prints files/s and CPU per file, median of the rounds.

    python bench/bench_throttle.py [--dir /dev/shm] [--rounds 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where the stores go (default: a temp dir under /tmp)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--file-size", type=int, default=4096)
    args = parser.parse_args()

    from bench.bench_concurrency import nginx_available, static_origin
    from casstore import Store
    from casstore.throttle import Throttle

    if not nginx_available():
        raise SystemExit("nginx is needed for this benchmark")
    spec = {f"/s/{i}.bin": (args.file_size, 1000 + i) for i in range(args.files)}
    work = Path(tempfile.mkdtemp(prefix="casstore-bench-", dir=args.dir))
    decide = Throttle.decide
    results: dict[str, list[tuple[float, float]]] = {"throttle": [], "8 fixed workers": []}
    try:
        with static_origin(spec, work) as (base, digests, _):
            items = [(f"{base}{p}", digests[p]) for p in spec]
            runs = 0
            for r in range(args.rounds):
                order = list(results) if r % 2 == 0 else list(reversed(results))
                for variant in order:
                    Throttle.decide = (  # type: ignore[method-assign]
                        decide if variant == "throttle" else lambda self, *measured: None
                    )
                    store = Store(work / f"store-{runs}")
                    runs += 1
                    _ = store.index.conn  # open and migrate the index outside the timing
                    cpu, t0 = time.process_time(), time.perf_counter()
                    store.get_many(items, concurrency=8)
                    elapsed = time.perf_counter() - t0
                    cpu = time.process_time() - cpu
                    store.close()
                    results[variant].append((len(items) / elapsed, cpu / len(items) * 1e3))
    finally:
        Throttle.decide = decide  # type: ignore[method-assign]
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.files} x {args.file_size} B, stores in {work.parent}, {args.rounds} rounds")
    medians = {}
    for variant, runs_ in results.items():
        rates = sorted(rate for rate, _ in runs_)
        cpus = sorted(cpu for _, cpu in runs_)
        medians[variant] = rates[len(rates) // 2]
        each = ", ".join(f"{rate:.0f}" for rate, _ in runs_)
        print(
            f"get_many, {variant:16s} {medians[variant]:6.0f} files/s ({each})"
            f"  {cpus[len(cpus) // 2]:.2f} ms CPU/file"
        )
    print(f"throttle / fixed: {medians['throttle'] / medians['8 fixed workers']:.2f}x")


if __name__ == "__main__":
    main()
