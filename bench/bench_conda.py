"""Benchmark: a 40-package conda lock fetched with 8 at a time, against aria2c and pooch.

    .venv/bin/python bench/bench_conda.py [--rounds 3] [--origin nginx|python]

Builds 40 real-format packages (``.conda`` and small ``.tar.bz2``, 10 KB to
20 MB, log-spaced; ~115 MB in all) with tests/channel.py, serves them from
127.0.0.1 (nginx when installed, else the tests' threaded Python origin) and
fetches the whole set, each round from cold, with:

- ``casstore conda fetch LOCK --pkgs-dir DIR -j 8`` (a fresh store: download,
  sha256 + blake3 while streaming, publish, hardlink, urls.txt);
- ``casstore conda fetch`` again into a new pkgs dir (warm store: links only);
- ``aria2c -j 8 -i LIST`` with ``checksum=sha-256=...`` per file (skipped
  with a note when aria2c is missing and cannot be installed);
- ``pooch.retrieve(url, known_hash="sha256:...")`` in a loop, one process.

Every peer writes to /dev/shm (tmpfs: disk writes here are erratic, see
BASELINE.md) and is run as a whole process, so start-up counts for all.
Prints the median wall time per peer and its ratio to casstore's cold fetch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import channel  # noqa: E402

N_PACKAGES = 40
SMALLEST, LARGEST = 10_000, 20_000_000


def specs() -> list[channel.Spec]:
    ratio = (LARGEST / SMALLEST) ** (1 / (N_PACKAGES - 1))
    out = []
    for i in range(N_PACKAGES):
        size = int(SMALLEST * ratio**i)
        # bz2 of incompressible bytes is slow to build: .tar.bz2 for the small ones only.
        ext = ".tar.bz2" if i % 4 == 1 and size < 1_000_000 else ".conda"
        out.append(channel.Spec(f"pkg{i:02d}", "1.0", f"h{i:07x}_0", ext, payload=size))
    return out


# -- origins ------------------------------------------------------------------------


class NginxOrigin:
    """nginx serving a directory on 127.0.0.1 (keep-alive, sendfile)."""

    def __init__(self, root: Path, work: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        conf = work / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  types {{ }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
  }}
}}
"""
        )
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(work)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("nginx did not start")

    def add(self, path: str, body: bytes) -> str:
        raise NotImplementedError  # files are written to the root before start

    def close(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(10)


class _Recorder:
    """Collects what ``channel.serve`` puts on an origin, to write it to disk."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.files: dict[str, bytes] = {}

    def add(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.base + path


# -- peers ---------------------------------------------------------------------------


def run(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, **kw)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        tail = out.stderr.decode()[-2000:]
        raise SystemExit(f"{' '.join(cmd[:8])} failed ({out.returncode}): {tail}")
    return elapsed


def casstore_cmd(store: Path, lock: Path, pkgs: Path) -> list[str]:
    from bench.entry import casstore_cli

    return [
        *casstore_cli(),
        "--store",
        str(store),
        "-q",
        "conda",
        "fetch",
        str(lock),
        "--pkgs-dir",
        str(pkgs),
        "-j",
        "8",
        "--platform",
        "linux-64",
    ]


def aria2_available() -> bool:
    if shutil.which("aria2c"):
        return True
    print("aria2c missing; trying apt-get install -y aria2", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "aria2"], capture_output=True)
    return bool(shutil.which("aria2c"))


POOCH_LOOP = """
import json, sys, pooch
items = json.load(open(sys.argv[1]))
for url, name, digest in items:
    pooch.retrieve(url, known_hash="sha256:" + digest, fname=name, path=sys.argv[2],
                   progressbar=False)
"""


def verify(pkgs: Path, packages) -> None:
    import hashlib

    for p in packages:
        data = (pkgs / p.file_name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == p.sha256, p.file_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--origin", choices=["nginx", "python"], default=None)
    args = ap.parse_args()
    use_nginx = args.origin == "nginx" or (args.origin is None and shutil.which("nginx"))
    scratch = Path(tempfile.mkdtemp(prefix="bench-conda-", dir="/dev/shm"))
    scratch.chmod(0o755)  # nginx workers run as nobody
    origin = None
    import logging

    logging.getLogger("pooch").setLevel(logging.WARNING)
    try:
        t0 = time.perf_counter()
        if use_nginx:
            www = scratch / "www"
            recorder = _Recorder("")
            packages = channel.serve(recorder, specs())
            for path, body in recorder.files.items():
                target = www / path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(body)
            (scratch / "nginx").mkdir()
            origin = NginxOrigin(www, scratch / "nginx")
            for p in packages:
                p.url = origin.base + p.path
            origin_name = "nginx"
        else:
            from tests.origin import Origin

            origin = Origin()
            packages = channel.serve(origin, specs())
            origin_name = "python threaded origin"
        total = sum(len(p.data) for p in packages)
        print(
            f"{len(packages)} packages, {total / 1e6:.1f} MB "
            f"({min(len(p.data) for p in packages) / 1e3:.0f} KB to "
            f"{max(len(p.data) for p in packages) / 1e6:.1f} MB), origin: {origin_name}, "
            f"built in {time.perf_counter() - t0:.1f}s"
        )
        lock = channel.conda_lock(packages, scratch / "conda-lock.yml")
        aria_list = scratch / "aria2.txt"
        aria_list.write_text(
            "".join(
                f"{p.url}\n  out={p.file_name}\n  checksum=sha-256={p.sha256}\n" for p in packages
            )
        )
        pooch_items = scratch / "pooch.json"
        pooch_items.write_text(json.dumps([[p.url, p.file_name, p.sha256] for p in packages]))
        has_aria = aria2_available()
        if not has_aria:
            print("note: aria2c not installable here; that peer is skipped")

        times: dict[str, list[float]] = {"casstore cold": [], "casstore warm": []}
        if has_aria:
            times["aria2c -j 8"] = []
        times["pooch loop"] = []
        for r in range(args.rounds):
            d = scratch / f"round{r}"
            store = d / "store"
            times["casstore cold"].append(run(casstore_cmd(store, lock, d / "pkgs-cold")))
            verify(d / "pkgs-cold", packages)
            times["casstore warm"].append(run(casstore_cmd(store, lock, d / "pkgs-warm")))
            if has_aria:
                times["aria2c -j 8"].append(
                    run(
                        [
                            "aria2c",
                            "-j",
                            "8",
                            "-i",
                            str(aria_list),
                            "-d",
                            str(d / "aria2"),
                            "--console-log-level=warn",
                            "--summary-interval=0",
                            "--file-allocation=none",
                            "--auto-file-renaming=false",
                            "-q",
                        ]
                    )
                )
                verify(d / "aria2", packages)
            times["pooch loop"].append(
                run([sys.executable, "-c", POOCH_LOOP, str(pooch_items), str(d / "pooch")])
            )
            verify(d / "pooch", packages)
            shutil.rmtree(d)

        base = statistics.median(times["casstore cold"])
        print(f"\nmedian of {args.rounds} rounds (wall, whole process):")
        print(f"{'peer':<16}{'seconds':>9}{'MB/s':>9}{'ratio to casstore cold':>25}")
        for name, values in times.items():
            med = statistics.median(values)
            print(f"{name:<16}{med:>9.3f}{total / 1e6 / med:>9.0f}{med / base:>25.2f}")
    finally:
        if origin is not None:
            origin.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
