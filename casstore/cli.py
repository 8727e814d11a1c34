"""The command line: parse, make one Store call, print.

Machine output goes to stdout through ``_emit`` (one JSON document with
``--json``); messages go to stderr through logging, silenced by ``-q``.
Exit codes are decided once, in ``main()``, from the error's class.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from . import __version__
from .errors import BatchError, CasError, exit_code_of
from .models import LinkMode
from .store import Store

LINK_MODES = click.Choice([m.value for m in LinkMode])


class _Context:
    def __init__(self, store_dir: str | None, as_json: bool, quiet: bool = False) -> None:
        self.store_dir = store_dir
        self.json = as_json
        self.quiet = quiet
        # Download options a command sets before its first use of ``store``.
        self.store_options: dict[str, Any] = {}
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.store_dir, **self.store_options)
        return self._store

    def close(self) -> None:
        """Close the store, if a command made one (its index first of all)."""
        if self._store is not None:
            self._store.close()

    @property
    def show_progress(self) -> bool:
        """A progress bar only on a terminal, never with -q or --json (SPEC §5)."""
        return not (self.quiet or self.json) and sys.stderr.isatty()


pass_ctx = click.make_pass_decorator(_Context)


def _emit(ctx: _Context, data: Any, text: str | None = None) -> None:
    """Machine output: ``data`` as JSON with --json, else ``text``."""
    if ctx.json:
        import json

        click.echo(json.dumps(data, indent=None, sort_keys=False))
    elif text:
        click.echo(text)


def _object_doc(ctx: _Context, sha256: str, **extra: Any) -> dict[str, Any]:
    """An object as --json prints it: always sha256, size and path (SPEC §3)."""
    path = ctx.store.layout.object_path(sha256)
    return {"sha256": sha256, "size": path.stat().st_size, "path": str(path), **extra}


def _size_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "store_dir",
    envvar="CASSTORE_DIR",
    type=click.Path(file_okay=False),
    help="Store directory (default: $CASSTORE_DIR or the user cache dir).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("-v", "--verbose", count=True, help="More messages on stderr.")
@click.version_option(__version__, "--version", prog_name="casstore")
@click.pass_context
def cli(
    click_ctx: click.Context, store_dir: str | None, as_json: bool, quiet: bool, verbose: int
) -> None:
    """casstore: download artifacts once, prove them by hash, hardlink them everywhere.

    Example: casstore get https://example.org/tool.tar.gz --sha256 <64 hex>
    """
    level = (
        logging.ERROR
        if quiet
        else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("casstore: %(message)s"))
    log = logging.getLogger("casstore")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    click_ctx.obj = _Context(store_dir, as_json, quiet)
    click_ctx.call_on_close(click_ctx.obj.close)


@cli.command()
@click.argument("urls", nargs=-1, required=True)
@click.option("--sha256", help="Expected sha256 (64 hex); without it, trust on first use.")
@click.option("--name", help="Record this name for the object.")
@click.option(
    "-o",
    "--output",
    "dest",
    type=click.Path(dir_okay=False),
    help="Materialize the object here and print this path.",
)
@click.option("--link", "link_mode", type=LINK_MODES, default="auto", show_default=True)
@click.option("--md5", help="Also check this md5 in the same pass.")
@click.option("--size", help="Expected size (bytes, or with a unit: 12MB, 3MiB).")
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    help="Retries per source after transient failures [default: 3, $CASSTORE_RETRIES].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait to connect or for each read [default: 30].",
)
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar="'NAME: VALUE'",
    help="Extra request header (repeatable); sent, never stored or printed.",
)
@pass_ctx
def get(
    ctx: _Context,
    urls: tuple[str, ...],
    sha256: str | None,
    name: str | None,
    dest: str | None,
    link_mode: str,
    md5: str | None,
    size: str | None,
    retries: int | None,
    timeout: float | None,
    headers: tuple[str, ...],
) -> None:
    """Ensure the object behind URL is in the store; print its path (or DEST).

    Extra URLs are mirrors, tried in order.

    Example: casstore get https://example.org/a.whl --sha256 <hex> -o ./a.whl
    """
    from .models import Request
    from .units import parse_size

    if headers:
        from .fetch import parse_header

        ctx.store_options["headers"] = [parse_header(h) for h in headers]
    ctx.store_options.update(retries=retries, timeout=timeout, progress=ctx.show_progress)
    artifact = ctx.store.ensure(
        Request(
            urls[0],
            sha256=sha256,
            name=name,
            mirrors=urls[1:],
            dest=dest,
            md5=md5,
            size=None if size is None else parse_size(size),
        ),
        link=link_mode,
    )
    _emit(ctx, artifact.as_dict(), str(artifact.dest or artifact.path))


@cli.command()
@click.argument("file")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Downloads at once, at most (fewer where that is no slower).",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    help="Materialize each artifact as DIR/<last segment of its URL>.",
)
@click.option("--link", "link_mode", type=LINK_MODES, default="auto", show_default=True)
@pass_ctx
def fetch(ctx: _Context, file: str, jobs: int, dest: str | None, link_mode: str) -> None:
    """Get every artifact a list FILE names, each digest downloaded once ('-' = stdin).

    Lines: 'URL#SHA256', 'URL SHA256 [NAME]', or a conda @EXPLICIT file
    (URL#MD5, URL#SHA256, URL#sha256:HEX). '#' starts a comment. The whole
    list is checked before anything is downloaded; the exit status is the
    worst failure's, after every item was tried.

    Example: casstore fetch packages.txt -j 8 --dest ./pkgs
    """
    from .lists import read_list, report, requests_for

    entries = read_list(file)
    requests = requests_for(entries, dest)
    from .progress import tally

    with tally("fetch", len(requests), enabled=ctx.show_progress and len(requests) > 1) as advance:
        outcomes = ctx.store.ensure_many(
            requests, concurrency=jobs, link=link_mode, on_done=lambda _i, _out: advance(1)
        )
    doc = report(entries, outcomes)
    log = logging.getLogger("casstore")
    for item, out in zip(doc["items"], outcomes, strict=True):
        if isinstance(out, CasError):
            log.error("%s:%d: %s", file, item["line"], out)
    _emit(ctx, doc, "\n".join(i["dest"] or i["path"] for i in doc["items"] if i["path"]))
    if doc["failed"]:
        raise BatchError(
            f"{doc['failed']} of {doc['count']} items of {file} failed",
            results=list(outcomes),
        )


@cli.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--name", help="Record this name for the object (one file only).")
@pass_ctx
def put(ctx: _Context, files: tuple[str, ...], name: str | None) -> None:
    """Ingest local files ('-' for stdin); print each sha256.

    Example: casstore put ./model.bin --name model
    """
    from .errors import InvalidInput

    if name and len(files) > 1:
        raise InvalidInput("--name takes one file only")
    if files.count("-") > 1:
        raise InvalidInput("'-' (stdin) can be given once only")
    for f in files:  # unreadable files are bad input, checked before writing any
        if f != "-" and (not os.access(f, os.R_OK) or os.path.isdir(f)):
            raise InvalidInput(f"cannot read {f}: no such readable file", path=f)
    out = []
    for f in files:
        sha = ctx.store.put(sys.stdin.buffer if f == "-" else f, name=name)
        out.append(_object_doc(ctx, sha, file=f))
    _emit(ctx, out if len(out) > 1 else out[0], "\n".join(o["sha256"] for o in out))


@cli.command()
@click.argument("ref")
@pass_ctx
def path(ctx: _Context, ref: str) -> None:
    """Print the path of the object REF names.

    Example: casstore path sha256:<hex>
    """
    p = ctx.store.path(ref)
    _emit(ctx, _object_doc(ctx, p.name), str(p))


@cli.command()
@click.argument("ref")
@pass_ctx
def cat(ctx: _Context, ref: str) -> None:
    """Write the bytes of the object REF names to stdout.

    Example: casstore cat my-name > file
    """
    import shutil

    with ctx.store.open(ref) as f:
        try:
            shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # `casstore cat X | head`: the reader left, not an error of ours.  Caught
            # here: click turns EPIPE into exit 1 before main() could see it.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@cli.command()
@click.argument("ref")
@click.argument("dest", type=click.Path())
@click.option("--link", "link_mode", type=LINK_MODES, default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace a DEST that has other content.")
@pass_ctx
def link(ctx: _Context, ref: str, dest: str, link_mode: str, force: bool) -> None:
    """Materialize the object REF names at DEST.

    Example: casstore link numpy.whl ./wheels/numpy.whl --link hardlink
    """
    result = ctx.store.link(ref, dest, link=link_mode, force=force)
    doc = _object_doc(ctx, result.sha256, dest=str(result.dest), method=result.method)
    _emit(ctx, doc, str(result.dest))
    logging.getLogger("casstore").info("%s: %s", result.method, result.dest)


@cli.command()
@click.argument("ref")
@pass_ctx
def info(ctx: _Context, ref: str) -> None:
    """Show one object with its names, sources and links.

    Example: casstore info 1a2b3c4d
    """
    obj = ctx.store.info(ref)
    lines = [
        f"sha256   {obj.sha256}",
        f"size     {obj.size} ({_size_text(obj.size)})",
        f"path     {obj.path}",
        f"blake3   {obj.blake3 or '-'}",
        f"pinned   {'yes' if obj.pinned else 'no'}",
    ]
    if obj.md5:
        lines.append(f"md5      {obj.md5}")
    lines += [f"name     {n}" for n in obj.names]
    lines += [f"source   {s}" for s in obj.sources]
    lines += [
        f"link     {lk['path']} ({lk['method']}{'' if lk.get('live', True) else ', gone'})"
        for lk in obj.links
    ]
    if obj.last_used:
        import time

        lines.append(
            f"used     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(obj.last_used))}"
        )
    _emit(ctx, obj.as_dict(), "\n".join(lines))


@cli.command("ls")
@click.argument("pattern", required=False)
@click.option(
    "--sort",
    "order",
    type=click.Choice(["sha256", "size", "used"]),
    default="sha256",
    show_default=True,
    help="size: largest first; used: most recently used first.",
)
@pass_ctx
def ls_(ctx: _Context, pattern: str | None, order: str) -> None:
    """List objects: sha256, size, last use, names; PATTERN is a glob on names or sha256.

    Example: casstore ls '*.conda' --sort used
    """
    import time

    objs = ctx.store.ls(pattern, order=order)

    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

    # A listing reads names only: sources and links are `info`'s to show.
    unread = ("sources", "links")
    summary = [{k: v for k, v in o.as_dict().items() if k not in unread} for o in objs]
    _emit(
        ctx,
        summary,
        "\n".join(
            f"{o.sha256}  {o.size:>12}  {when(o.last_used)}  {' '.join(o.names)}".rstrip()
            for o in objs
        ),
    )


@cli.command()
@pass_ctx
def stats(ctx: _Context) -> None:
    """Totals: objects, bytes, names, pins, links, temp files.

    Example: casstore --json stats
    """
    s = ctx.store.stats()
    text = "\n".join(
        [
            f"objects     {s.objects}",
            f"bytes       {s.bytes} ({_size_text(s.bytes)})",
            f"saved       {s.saved_bytes} ({_size_text(s.saved_bytes)}) by hardlinks",
            f"names       {s.names}",
            f"pinned      {s.pinned}",
            f"links       {s.links}",
            f"temp files  {s.temp_files}",
            f"path        {s.path}",
        ]
    )
    _emit(ctx, s.as_dict(), text)


@cli.command()
@click.argument("ref")
@pass_ctx
def pin(ctx: _Context, ref: str) -> None:
    """Keep the object REF names from gc.

    Example: casstore pin my-dataset
    """
    sha = ctx.store.pin(ref)
    _emit(ctx, _object_doc(ctx, sha, pinned=True), sha)


@cli.command()
@click.argument("ref")
@pass_ctx
def unpin(ctx: _Context, ref: str) -> None:
    """Let gc evict the object REF names again.

    Example: casstore unpin my-dataset
    """
    sha = ctx.store.unpin(ref)
    _emit(ctx, _object_doc(ctx, sha, pinned=False), sha)


@cli.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove an object even while it has live links.")
@pass_ctx
def rm(ctx: _Context, ref: str, force: bool) -> None:
    """Remove a name, or an object named by digest.

    Example: casstore rm old-name
    """
    what = ctx.store.rm(ref, force=force)
    _emit(ctx, {"ref": ref, "removed": what}, f"removed {what} {ref}")


@cli.command()
@click.option("--max-size", help="Evict least recently used objects until the store fits (10GB).")
@click.option("--older-than", help="Evict objects unused for this long (30d, 12h, seconds).")
@click.option("--dry-run", is_flag=True, help="Report what would go; change nothing.")
@pass_ctx
def gc(ctx: _Context, max_size: str | None, older_than: str | None, dry_run: bool) -> None:
    """Reclaim space: dead temps, stale locks and rows always; objects on request.

    Pinned objects, objects with live links and hardlinked objects are never
    evicted.

    Example: casstore gc --max-size 10GB --older-than 30d
    """
    report = ctx.store.gc(max_size=max_size, older_than=older_than, dry_run=dry_run)
    verb = "would evict" if dry_run else "evicted"
    removed = "would remove" if dry_run else "removed"
    text = "\n".join(
        [
            f"{verb} {report.objects_evicted} objects ({_size_text(report.bytes_freed)})",
            f"{removed} {report.temps_removed} temp files ({_size_text(report.temp_bytes)}), "
            f"{report.locks_removed} stale locks, {report.rows_dropped} rows of missing "
            f"objects, {report.links_dropped} dead link rows",
            f"kept {report.objects_kept} objects ({_size_text(report.bytes_kept)}), "
            f"{report.roots} of them rooted",
        ]
    )
    _emit(ctx, report.as_dict(), text)


@cli.command()
@click.option("--fast", is_flag=True, help="Compare blake3 and size (parallel) instead of sha256.")
@click.option("--repair", is_flag=True, help="Quarantine corrupt objects, fix the rest.")
@pass_ctx
def verify(ctx: _Context, fast: bool, repair: bool) -> None:
    """Re-hash every object; report corruption, wrong modes, orphans, dangling rows.

    Exits 3 while corrupt objects remain in the store.

    Example: casstore verify --fast --repair
    """
    from .errors import CorruptObject
    from .progress import tally

    log = logging.getLogger("casstore")
    with tally("verify", enabled=ctx.show_progress, unit="bytes") as advance:
        report = ctx.store.verify(fast=fast, repair=repair, progress=advance)
    fixed = " (repaired)" if repair else ""
    lines = [f"checked {report.objects} objects ({_size_text(report.bytes)})"]
    for sha in report.corrupt:
        lines.append(f"corrupt   {sha}")
    lines += [f"moved     {q['sha256']} -> {q['path']}" for q in report.quarantined]
    lines += [f"exposed   {e['path']} still holds corrupt {e['sha256']}" for e in report.exposed]
    lines += [f"mode      {s}{fixed}" for s in report.bad_modes]
    lines += [f"orphan    {s}{' (indexed)' if repair else ''}" for s in report.orphans]
    lines += [f"dangling  {s}{' (dropped)' if repair else ''}" for s in report.dangling]
    _emit(ctx, report.as_dict(), "\n".join(lines))
    if report.lost_metadata:
        log.warning("%s", report.lost_metadata)
    bad = report.unrepaired
    if bad:
        raise CorruptObject(
            f"{len(bad)} corrupt object(s) in {ctx.store.root}, e.g. "
            f"{ctx.store.layout.object_path(bad[0])}; run `casstore verify --repair`",
            path=str(ctx.store.layout.object_path(bad[0])),
            expected=bad[0],
        )


@cli.command("dir")
@pass_ctx
def dir_(ctx: _Context) -> None:
    """Print the store's directory.

    Example: cd "$(casstore dir)"
    """
    _emit(ctx, {"path": str(ctx.store.root)}, str(ctx.store.root))


@cli.group()
def conda() -> None:
    """Conda front-end: lock files into a conda package cache.

    Example: casstore conda fetch conda-lock.yml --pkgs-dir ~/miniforge3/pkgs
    """


@conda.command("fetch")
@click.argument("lock", type=click.Path(dir_okay=False))
@click.option(
    "--pkgs-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Conda package cache to link the archives into (created if needed).",
)
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--platform", help="Conda subdir to fetch, e.g. linux-64 (default: this machine).")
@click.option("--env", "environment", help="pixi.lock environment (default: default).")
@pass_ctx
def conda_fetch(
    ctx: _Context,
    lock: str,
    pkgs_dir: str,
    jobs: int,
    platform: str | None,
    environment: str | None,
) -> None:
    """Fetch every package of LOCK once into the store and hardlink it into --pkgs-dir.

    LOCK is an @EXPLICIT file, a conda-lock.yml (v1) or a pixi.lock (v5-v7).
    Each archive's URL is recorded once in PKGS_DIR/urls.txt, as conda does.

    Example: casstore conda fetch pixi.lock --pkgs-dir ./pkgs -j 8 --platform linux-64
    """
    from . import conda as conda_
    from .progress import tally

    parsed = conda_.read_lock(lock, platform=platform, environment=environment)
    for note in parsed.skipped:
        logging.getLogger("casstore").info("skipped %s", note)
    total = len(parsed.packages)
    with tally("conda packages", total, enabled=ctx.show_progress) as advance:
        report = conda_.fetch_packages(
            ctx.store, parsed, pkgs_dir, concurrency=jobs, on_done=lambda *_: advance(1)
        )
    log = logging.getLogger("casstore")
    for failed in report.failed:
        log.error("%s: %s", failed.package.file_name, failed.error)
    _emit(ctx, report.as_dict(), "\n".join(str(r.dest) for r in report.results if r.ok))
    log.info(
        "%d of %d packages in %s (%s)",
        len(report.results) - len(report.failed),
        len(report.results),
        report.pkgs_dir,
        _size_text(report.bytes),
    )
    if report.failed:
        raise BatchError(
            f"{len(report.failed)} of {len(report.results)} packages failed",
            results=[r.error or r.dest for r in report.results],
        )


def main(argv: list[str] | None = None) -> None:
    """Run the command line; exit with the SPEC's code for whatever went wrong."""
    try:
        cli.main(args=argv, prog_name="casstore", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        exc.show()
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("casstore: aborted", err=True)
        sys.exit(1)
    except CasError as exc:
        click.echo(f"casstore: error: {exc}", err=True)
        sys.exit(exit_code_of(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        click.echo(f"casstore: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(0)
