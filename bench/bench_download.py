"""Download benchmark: casstore get (cold) against curl, wget, curl|tee|sha256sum and pooch.

One local origin (nginx if installed, else a small sendfile Python server) serves
one file from tmpfs (/dev/shm); every contestant downloads it to tmpfs, side by
side in one run, round-robin, so drift hits all of them alike.  Prints each
one's median wall time as a ratio to ``curl -o``, its throughput, peak RSS
(ru_maxrss of the process and the children it waited for), and where the CPU
went: the contestant's user+sys seconds per GiB, the origin's meanwhile, and
the least wall time those two allow on this machine's CPUs ("floor").

    python bench/bench_download.py               # 1 GiB, 5 rounds
    python bench/bench_download.py --size 64M --rounds 3   # a quick check

Network only to 127.0.0.1.  Needs curl; wget and pooch (the ``bench`` extra)
are skipped when missing.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import math
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", text.strip(), re.I)
    if not m:
        raise SystemExit(f"bad size {text!r}: use e.g. 64M or 1G")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Origin:
    """nginx with sendfile when available, else a Python server using socket.sendfile."""

    def __init__(self, www: Path, work: Path, *, access_log: Path | None = None) -> None:
        """``access_log``: nginx logs each request there (one line each), for counting."""
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.server: http.server.ThreadingHTTPServer | None = None
        nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if nginx:
            log = f"access_log {access_log};" if access_log else "access_log off;"
            conf = work / "nginx.conf"
            conf.write_text(
                f"""
daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 64; }}
http {{
  {log} sendfile on; tcp_nopush on; keepalive_timeout 30; keepalive_requests 100000;
  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
  uwsgi_temp_path {work}; scgi_temp_path {work};
  server {{ listen 127.0.0.1:{self.port}; root {www}; }}
}}
"""
            )
            self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)])
            self.kind = "nginx"
        else:
            self.server = _python_origin(www, self.port)
            self.kind = "python (sendfile)"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)

    def cpu(self) -> float:
        """User + sys CPU seconds the origin has used so far (nginx: its workers)."""
        if self.proc is None:
            # The Python origin serves from threads of this process, idle otherwise.
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return usage.ru_utime + usage.ru_stime
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in _children(self.proc.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.server is not None:
            self.server.shutdown()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _python_origin(www: Path, port: int) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            path = www / self.path.lstrip("/")
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self.wfile.flush()
                self.connection.sendfile(f)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


TIME = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)


class Run(NamedTuple):
    wall: float  # seconds
    rss: int  # peak bytes
    cpu: float  # user + sys seconds of the command and the children it waited for
    origin_cpu: float  # user + sys seconds the origin spent meanwhile (nan if unknown)


def run(cmd: list[str], *, shell: bool = False, origin: Origin | None = None) -> Run:
    """Wall seconds, peak RSS (bytes) and CPU seconds of one command and the
    children it waited for, and the origin's CPU seconds meanwhile.

    RSS comes from GNU time when installed: a child forked from this Python
    process starts with its high-water mark (~25 MiB), which would floor
    every figure; GNU time's own child does not.
    """
    argv = ["bash", "-c", cmd[0]] if shell else cmd
    rss_file = None
    if TIME:
        fd, rss_file = tempfile.mkstemp(suffix=".rss")
        os.close(fd)
        argv = [TIME, "-f", "%M", "-o", rss_file, *argv]
    origin_before = origin.cpu() if origin else math.nan
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    origin_cpu = (origin.cpu() if origin else math.nan) - origin_before
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {cmd}")
    rss = usage.ru_maxrss * 1024
    if rss_file:
        rss = int(Path(rss_file).read_text().split()[-1]) * 1024
        os.unlink(rss_file)
    return Run(wall, rss, usage.ru_utime + usage.ru_stime, origin_cpu)


def compile_casstore() -> None:
    """Byte-compile casstore as pip does when it installs a wheel: run from a
    source tree under PYTHONDONTWRITEBYTECODE, every get would compile its
    modules again (~40 ms of its start)."""
    import compileall

    import casstore

    compileall.compile_dir(Path(casstore.__file__).parent, quiet=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="file size, e.g. 64M, 1G (default 1G)")
    ap.add_argument("--rounds", type=int, default=5, help="runs per contestant (median)")
    ap.add_argument("--only", help="comma-separated contestant names")
    args = ap.parse_args()
    size = parse_size(args.size)

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="casstore-bench-", dir=shm))
    www = work / "www"
    www.mkdir()
    out = work / "out"
    out.mkdir()
    print(f"making a {size} byte file in {www} ...", file=sys.stderr)
    digest = make_file(www / "blob.bin", size)
    origin = Origin(www, work)
    url = f"http://127.0.0.1:{origin.port}/blob.bin"
    env_python = sys.executable
    store = work / "store"

    def casstore() -> Run:
        return run(
            [
                env_python,
                "-m",
                "casstore",
                "--store",
                str(store),
                "-q",
                "get",
                url,
                "--sha256",
                digest,
            ],
            origin=origin,
        )

    def pooch() -> Run:
        code = (
            "import pooch; pooch.retrieve("
            f"{url!r}, known_hash='sha256:{digest}', path={str(out / 'pooch')!r}, "
            "fname='blob.bin', progressbar=False)"
        )
        return run([env_python, "-c", code], origin=origin)

    contestants = {
        "curl -o": lambda: run(["curl", "-sS", "-o", str(out / "curl.bin"), url], origin=origin),
        "casstore get": casstore,
        "wget -O": lambda: run(["wget", "-q", "-O", str(out / "wget.bin"), url], origin=origin),
        "curl|tee|sha256sum": lambda: run(
            [f"curl -sS {url} | tee {out / 'tee.bin'} | sha256sum"], shell=True, origin=origin
        ),
        "pooch.retrieve": pooch,
    }
    if not shutil.which("wget"):
        del contestants["wget -O"]
    try:
        import pooch as _  # noqa: F401
    except ImportError:
        del contestants["pooch.retrieve"]
    if args.only:
        keep = {n.strip() for n in args.only.split(",")} | {"curl -o"}
        contestants = {k: v for k, v in contestants.items() if k in keep}

    results: dict[str, list[Run]] = {k: [] for k in contestants}
    compile_casstore()
    try:
        run(["curl", "-sS", "-o", os.devnull, url])  # warm-up
        for r in range(args.rounds):
            for name, fn in contestants.items():
                # Each contestant writes into memory freed just before it starts.  On a
                # VM that hands free pages back to its host (virtio free page
                # reporting), a page freed seconds earlier costs a host fault on first
                # touch: left to chance, that made `curl -o` (which ran after pooch's
                # long run) take 3x the time it takes right after a free.
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(store, ignore_errors=True)
                out.mkdir()
                results[name].append(fn())
            walls = "  ".join(
                f"{name} {runs[-1].wall:.2f}s ({runs[-1].cpu:.2f} CPU-s)"
                for name, runs in results.items()
            )
            print(f"round {r + 1}/{args.rounds}: {walls}", file=sys.stderr)
    finally:
        origin.close()
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(r.wall for r in results["curl -o"])
    best_base = min(r.wall for r in results["curl -o"])
    gib = size / (1 << 30)
    ncpu = os.cpu_count() or 1
    print(
        f"\n{size / (1 << 20):.0f} MiB over loopback from {origin.kind}, to tmpfs; "
        f"{args.rounds} rounds; {ncpu} CPUs"
    )
    print(
        f"{'contestant':<20} {'median s':>9} {'x curl':>7} {'best s':>7} {'x curl':>7}"
        f" {'GB/s':>6} {'peak RSS MiB':>13} {'CPU s/GiB':>10} {'origin':>7} {'floor s':>8}"
    )
    for name, runs in results.items():
        wall = statistics.median(r.wall for r in runs)
        best = min(r.wall for r in runs)
        rss = max(r.rss for r in runs)
        cpu = statistics.median(r.cpu for r in runs)
        origin_cpu = statistics.median(r.origin_cpu for r in runs)
        # No schedule on ncpu cores beats (client + origin CPU) / ncpu, nor the
        # busiest single thread; the first is printed as the floor.
        floor = (cpu + origin_cpu) / ncpu
        print(
            f"{name:<20} {wall:>9.3f} {wall / base:>7.2f} {best:>7.3f} {best / best_base:>7.2f}"
            f" {size / wall / 1e9:>6.2f} {rss / (1 << 20):>13.1f} {cpu / gib:>10.2f}"
            f" {origin_cpu / gib:>7.2f} {floor:>8.3f}"
        )
    print(
        "best: the fastest round (the least disturbed by other load); CPU s/GiB (median): "
        "user+sys of the command and its children;\norigin: the origin's user+sys meanwhile; "
        f"floor: (both) / {ncpu} CPUs, the least wall time that much CPU allows"
    )


if __name__ == "__main__":
    main()
