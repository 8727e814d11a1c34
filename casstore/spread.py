"""A large batch shared with a helper process, for the second core.

Python runs one thread at a time.  A batch of small files from a fast origin
keeps one core busy with Python (~0.55 ms of CPU per 4 KiB file here) while
the other mostly waits; two processes fetching halves of one list into one
store reach ~1.9x the files/s of one (the README).

So ``Store.ensure_many`` may start one helper and hand it items from the far
end of the batch, a few at a time, while the batch's workers go from the
front; they meet where they meet.  The helper only saves work.  It fetches
an item into the store under the item's lock and says so (with the blake3
and the final URL); the batch then writes its index row and serves the
item itself, without fetching it, so names, rows, destinations, results,
progress and exit codes are the batch's alone.  What the helper does not
report, because it failed, found the object there already, was killed or
never started, the batch does itself.  A worker that comes to an item the
helper has been handed but not begun takes it back.

The helper is forked where that is safe (Linux, and the batch's process runs
one thread when it starts): it then starts in a few milliseconds with all it
needs imported, where a fresh ``python -I`` with the batch's ``sys.path``
takes ~0.1 s of a core the batch needs.  Either way it never opens the
index: SQLite must not be used in a forked child whose parent has a
connection open (the copied lock state lies), and one writer is enough.

What it is handed, so that nothing the batch says or records changes: the
first item of a digest's group that is missing from the store, has a sha256
and no md5 or mirrors, a name no other item gives (the last one recorded
wins), and a plain URL the direct lane takes that no digest-less item of the
batch asks for (a trust-on-first-use warning is the batch's to give).  It
gets no destinations; it retries as the batch would, and the error it ends
with (a 404, wrong bytes, retries spent) is the item's answer, as the
batch's own would have been.  Its warnings (each retry, a wait on another
process's lock) are passed on for the batch to give.

The batch runs one worker fewer while it has a helper, so that ``concurrency``
downloads at most are under way.  A store has at most one helper per spare
core at a time (``_free_slot``).  A helper that answers nothing for a second
gets nothing more, and the batch takes back what it has not said it began
(the item's lock decides, should it have begun one).  The
helper ends at once when its input ends without a ``q`` (the batch died);
the batch kills it once every item it was handed is reported or taken back.

The pipe, after the job (pickled: the items, the store, the options; a forked
helper has it already).  Batch to helper: ``h LO HI`` (hand out positions
LO..HI-1, the highest first), ``x I`` (give I back if not begun), ``q``
(nothing more).  Helper to batch: ``ready``; ``c I`` (given back, never
begun) or ``n I`` (begun, or done: not given back), the answer to each ``x``;
``d I US 1 SIZE BLAKE3 URL`` (in the store after US microseconds' work; the
final URL in hex); ``d I US 0 p HEX`` (failed: the pickled DownloadError or
IntegrityFailure), ``d I US 0 e`` (the batch does the item: the object was
there already, or the helper had trouble of its own); ``w TEXT`` (a warning).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .layout import Layout
from .models import Request

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger("casstore")

# Below this many items to hand out, a started helper's start-up (~0.1 s of
# CPU, on the core the batch would use otherwise) costs more than it saves.
SPREAD_MIN = 256
# A forked one starts in ~2 ms: 64 files of 4 KiB from a fast origin took
# 23% less time with it, 128 files 41% (fresh processes, alternating runs).
SPREAD_MIN_FORKED = 64
# Items handed out ahead: about this much of the helper's work, at least two.
WINDOW_SECONDS = 0.02
WINDOW_MAX = 32
# The job is all the helper's input until it says "ready", so the buffered
# read of it takes nothing that serve() (reading fd 0 itself) would miss.
_BOOT = (
    "import pickle, sys\n"
    "job = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:] = job['path']\n"
    "from casstore.spread import serve\n"
    "serve(job)\n"
)
_HANDED, _BEGUN, _DONE, _BACK = "handed", "begun", "done", "back"
# The helper holds back its reports of items that took less than REPORT_AGE
# each, and sends them together once REPORTS are held, the first was held
# REPORT_AGE ago, it has nothing more in hand, the batch asks for one, or it
# is told to stop.
REPORTS = 16
REPORT_AGE = 0.005
# What ps and top show for a helper (15 characters at most, Linux's limit).
HELPER_NAME = "casstore-helper"
# How long a worker waits for the helper to give back, or say it began, an
# item it was handed: past that the helper is stopped or starved, and the
# batch does all it was handed and not begun itself.
ANSWER_WITHIN = 1.0


def wanted(items: int, processes: int | None) -> bool:
    """Whether a batch with ``items`` to hand out gets a helper.  ``processes``
    None is automatic (``CASSTORE_PROCESSES``, else a spare core and at least
    ``SPREAD_MIN_FORKED`` items where it can be forked, ``SPREAD_MIN`` where
    not); 1 never; 2 or more whenever there is an item."""
    if items == 0 or getattr(sys, "frozen", False):  # a frozen app cannot run -c
        return False
    if processes is None:
        env = os.environ.get("CASSTORE_PROCESSES", "").strip()
        if not env:
            least = SPREAD_MIN_FORKED if _may_fork() else SPREAD_MIN
            return items >= least and _cores() > 1
        processes = int(env) if env.isdigit() else 1
    return processes > 1


class Fetched(NamedTuple):
    """What the helper reports of an object it fetched, for the batch to index."""

    size: int
    blake3: str
    url: str  # the final URL, after redirects


class _Item:
    __slots__ = ("asked_back", "error", "fetched", "state")

    def __init__(self) -> None:
        self.state = _HANDED
        self.fetched: Fetched | None = None
        self.error: Exception | None = None  # a failure more tries would not mend
        self.asked_back = False


class Share:
    """The items of a batch a helper may take: ``items`` (a group id and its
    first request, in batch order).  Workers call ``take(group)`` before
    serving a group; ``close()`` once the batch is done.  ``proc`` is None if
    no helper could be started.  ``on_fetched(group, fetched)`` is called from
    the share's thread as the helper reports each object it put in the store."""

    def __init__(
        self,
        layout: Layout,
        options: dict[str, Any],
        items: Sequence[tuple[int, Request]],
        *,
        patience: float,
        on_fetched: Callable[[int, Fetched], None],
    ) -> None:
        self._groups = [g for g, _ in items]
        self._position = {g: i for i, g in enumerate(self._groups)}
        self._free = len(items)  # positions below this are not handed out yet
        self._taken: set[int] = set()  # positions the batch has begun: its own
        self._items: dict[int, _Item] = {}  # by position: handed out
        self._out = 0  # handed out and neither reported nor given back
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # an item's state moved on
        self._write_lock = threading.Lock()
        self._patience = patience
        self._on_gone: list[Callable[[], None]] = []
        self._on_fetched = on_fetched
        self._per_item: float | None = None
        self._gone = False
        self._stopping = False  # told to stop: close() gives it a moment to report
        self.proc: subprocess.Popen[bytes] | _Forked | None = None
        slot = _free_slot(layout)
        if slot is None:
            return
        job: dict[str, Any] = {
            "root": str(layout.root),
            "options": options,  # headers may hold secrets: the pipe, not argv
            "items": [(r.url, r.sha256, r.size, r.name) for _, r in items],
        }
        self._job: dict[str, Any] | None = None  # what is still to send it
        try:
            if _may_fork():
                try:
                    self.proc = _Forked(job)
                except Exception:  # cannot fork here after all: start one afresh
                    pass
            if self.proc is None:
                import subprocess  # (not before: a forked helper needs none of it)

                package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                self._job = {**job, "path": [package_parent, *sys.path]}
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _BOOT],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(slot,),  # the slot's flock lives as long as the helper
                )
        except (OSError, ValueError):
            self.proc = None
            return
        finally:
            os.close(slot)  # the helper's copy holds the lock now, or nobody's does
        _shares.add(self)
        self._thread = threading.Thread(target=self._talk, name="casstore-spread", daemon=True)
        self._thread.start()

    @property
    def forked(self) -> bool:
        """Whether the helper was forked (else started afresh, or none)."""
        return isinstance(self.proc, _Forked)

    def take(
        self, group: int, on_wait: Callable[[], None] | None = None
    ) -> Fetched | Exception | None:
        """Return once the batch may serve ``group``: at once if the helper was
        not handed it (and from now on never will be); if it was, once the
        helper gives it back unbegun, or has reported it, or is gone.  An
        item the helper is fetching is waited for as on its lock, ``patience``
        seconds at most (the lock then decides who fetches it).  Returns what
        the helper fetched (in the store, its row the batch's to write); the
        DownloadError or IntegrityFailure it ended with (after the batch's
        retries), which is the item's answer; or None: the batch's to do.
        ``on_wait()`` is called first if it waits."""
        at = self._position.get(group)
        if at is None:
            return None
        with self._lock:
            item = self._items.get(at)
            if item is None:
                self._taken.add(at)
                return None
            ask_back = item.state == _HANDED and not item.asked_back and not self._gone
            item.asked_back = True
            waits = item.state in (_HANDED, _BEGUN) and not self._gone
        if waits and on_wait is not None:
            on_wait()
        if ask_back:
            self._write(b"x %d\n" % at)
        start = time.monotonic()
        stalled = False
        with self._changed:
            while item.state in (_HANDED, _BEGUN) and not self._gone:
                waited = time.monotonic() - start
                if item.state == _HANDED and waited >= ANSWER_WITHIN:
                    self._stalled()
                    stalled = True
                    break
                limit = ANSWER_WITHIN if item.state == _HANDED else self._patience
                if waited >= limit:
                    break
                self._changed.wait(limit - waited)
        if stalled:
            # Nothing more: the helper stops after the item in hand, whatever it
            # still has queued (taken back here).
            self._write(b"q\n")
        return item.error or item.fetched

    def stop(self) -> None:
        """The batch is stopping: the helper ends after the item in hand."""
        with self._lock:
            self._free = 0
            self._stopping = True
        self._write(b"q\n")

    def _stalled(self) -> None:
        """The helper answers nothing (stopped, or starved of CPU): hand it no
        more, and take back all it has not begun (with ``_lock`` held).  If it
        begins one of them after all, that item's lock decides who fetches it."""
        self._free = 0
        for item in self._items.values():
            if item.state == _HANDED:
                item.state = _BACK
                self._out -= 1
        self._changed.notify_all()

    def when_gone(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the helper is gone (now, if it is)."""
        with self._lock:
            if not self._gone:
                self._on_gone.append(callback)
                return
        callback()

    def close(self) -> None:
        """Stop the helper and reap it.  By now it holds nothing the batch waits
        for, unless ``patience`` ran out (then its temp is left to gc), or the
        batch was stopped: then the helper is given ``ANSWER_WITHIN`` to end
        after its item in hand and report it, and what it held back, before
        it is killed (their objects would be left without rows)."""
        proc = self.proc
        if proc is None:
            return
        with self._lock:
            self._free = 0
            stopping = self._stopping
        try:
            if stopping:
                self._thread.join(ANSWER_WITHIN)  # its output ends as it exits
        finally:
            # Killed, not asked: the talk thread may be writing to its input,
            # and a stopped process takes no other signal.
            proc.kill()
            proc.wait()
            self._thread.join()
            for stream in (proc.stdin, proc.stdout):
                _close(stream)
            _shares.discard(self)

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            self._send(data)

    def _send(self, data: bytes) -> None:
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.write(data)
            proc.stdin.flush()
        except (OSError, ValueError):
            pass  # the helper is gone: the talk thread sees its output end

    def _talk(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        try:
            if self._job is not None:
                import pickle

                self._write(pickle.dumps(self._job))
            if proc.stdout.readline() != b"ready\n":
                return
            self._hand_out()
            for line in proc.stdout:
                if line.startswith(b"w "):  # a warning of its own (a lock wait): the batch's
                    log.warning("%s", line[2:].rstrip(b"\n").decode(errors="replace"))
                    continue
                kind, at_text, *rest = line.rstrip(b"\n").split(b" ", 6)
                at = int(at_text)
                took = None
                if kind == b"d":
                    took, rest = int(rest[0]) / 1e6, rest[1:]
                fetched = None
                if kind == b"d" and rest[:1] == [b"1"]:
                    size, blake3, url = rest[1:4]
                    url = bytes.fromhex(url.decode()).decode()
                    fetched = Fetched(int(size), blake3.decode(), url)
                    # In the store: its row is the batch's, even if the item was taken back.
                    self._on_fetched(self._groups[at], fetched)
                with self._changed:
                    item = self._items[at]
                    if kind == b"n":
                        if item.state == _HANDED:
                            item.state = _BEGUN
                        self._changed.notify_all()
                        continue
                    if item.state in (_DONE, _BACK):
                        continue  # taken back while the helper stalled: the batch's now
                    item.state = _DONE if kind == b"d" else _BACK
                    item.fetched = fetched
                    if rest[:1] == [b"0"] and rest[1:2] == [b"p"]:
                        item.error = _failure(rest[2])
                    self._out -= 1
                    self._changed.notify_all()
                if took is not None:
                    per = self._per_item
                    self._per_item = took if per is None else (per + took) / 2
                self._hand_out()
        except (OSError, ValueError, KeyError, IndexError):
            pass  # a broken or garbled pipe: the helper is as good as gone
        finally:
            with self._changed:
                self._gone = True
                self._free = 0
                callbacks, self._on_gone = self._on_gone, []
                self._changed.notify_all()
            for callback in callbacks:
                callback()

    def _hand_out(self) -> None:
        """Hand the helper what it lacks of its window, from the far end, once it
        has half of it left (a line per item would cost both processes a
        wakeup per item); send it ``q`` when there is nothing more and it has
        finished."""
        per = self._per_item
        window = 2 if per is None else round(WINDOW_SECONDS / max(per, 1e-6))
        window = max(2, min(WINDOW_MAX, window))
        with self._lock:
            hi = lo = self._free
            while lo > 0 and self._out < window and (lo < hi or self._out <= window // 2):
                if lo - 1 in self._taken:  # the batch has come this far: the rest is its
                    self._free = 0
                    break
                lo -= 1
                self._items[lo] = _Item()
                self._out += 1
            else:
                self._free = lo
            finished = not self._free and not self._out
            # Taken before the items are visible to take(): an "x" for one of
            # them must not reach the helper before the "h" that hands it out.
            self._write_lock.acquire()
        try:
            if lo < hi:
                self._send(b"h %d %d\n" % (lo, hi))
            if finished:
                self._send(b"q\n")
        finally:
            self._write_lock.release()

    def _forget(self) -> None:
        """In a forked child: its copies of the pipes point at /dev/null, so
        that the helper still sees its input end when the batch does."""
        proc = self.proc
        if proc is None:
            return
        null = os.open(os.devnull, os.O_RDWR)
        try:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    os.dup2(null, stream.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(null)


_shares: weakref.WeakSet[Share] = weakref.WeakSet()


def _after_fork() -> None:
    for share in list(_shares):
        share._forget()


os.register_at_fork(after_in_child=_after_fork)


def serve(job: dict[str, Any], rfd: int = 0, wfd: int = 1) -> None:
    """The helper: fetch the positions handed to it, highest first, one at a
    time, and say ``d`` for each once it is in the store (or failed, with
    why); quick ones are held back and said together (``REPORTS``).  A thread
    reads the input (``rfd``) meanwhile, so that an item asked back is given
    back (or said begun) at once, and the input's end without a ``q`` (the
    batch died) ends the helper there and then.  Never returns.

    It never opens the index: the batch writes the rows of what it fetched.
    (A forked helper must not use SQLite at all: the parent's connection state
    is copied into it, and SQLite's locks would be wrong.)"""
    from .errors import CasError, DownloadError, IntegrityFailure
    from .store import Store

    # Ctrl-C reaches the whole process group: the batch stops its helper itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # what ps and top call it (a forked helper shows its batch's command line)
        with open("/proc/self/comm", "w") as comm:
            comm.write(HELPER_NAME)
    except OSError:
        pass
    items = job["items"]
    quick = job.get("report_age", REPORT_AGE)  # (a test makes every item quick)
    queue: deque[int] = deque()
    cond = threading.Condition()
    stop = False
    out_lock = threading.Lock()
    # "d" lines held back while items come quick, sent as one write: a line
    # each would cost the batch a wakeup each (~60 us of its CPU per item).
    reports: list[bytes] = []
    held_since = [0.0]  # when the first of them was held back
    asked: set[int] = set()  # asked back once begun: the batch waits for its "d"

    def send(data: bytes) -> None:  # with out_lock held: whole lines, one writer at a time
        view = memoryview(b"".join(reports) + data)
        reports.clear()
        while view:
            view = view[os.write(wfd, view) :]

    def say(data: bytes) -> None:
        with out_lock:
            send(data)

    def report(at: int, outcome: bytes, started: float) -> None:
        """Item ``at``'s "d" line, begun at ``started``: held back if it was quick."""
        now = time.monotonic()
        with out_lock:
            reports.append(b"d %d %d %s\n" % (at, round((now - started) * 1e6), outcome))
            if len(reports) == 1:
                held_since[0] = now
            if (
                at in asked
                or now - started >= quick
                or now - held_since[0] >= quick
                or len(reports) >= REPORTS
            ):
                send(b"")

    def listen() -> None:
        # os.read, not sys.stdin: a thread blocked in a buffered read holds its
        # lock, and the interpreter could not shut down around it.
        nonlocal stop
        buffered = b""
        try:
            while data := os.read(rfd, 1 << 16):
                *lines, buffered = (buffered + data).split(b"\n")
                for line in lines:
                    kind, *args = line.split()
                    with cond:
                        if kind == b"h":
                            lo, hi = map(int, args)
                            queue.extend(range(hi - 1, lo - 1, -1))
                            cond.notify()
                        elif kind == b"x":
                            at = int(args[0])
                            if at in queue:
                                queue.remove(at)
                                say(b"c %d\n" % at)
                            else:
                                with out_lock:
                                    asked.add(at)
                                    send(b"n %d\n" % at)  # and its "d", if held back
                        elif kind == b"q":
                            stop = True
                            cond.notify()
                            say(b"")  # what is held back: the batch may kill it any moment now
                            return
        except BaseException:
            pass
        os._exit(1)  # the batch died (or its pipe broke): nobody waits for the item in hand

    class Forward(logging.Handler):
        """Its warnings (a wait on another process's lock) are the batch's to give."""

        def emit(self, record: logging.LogRecord) -> None:
            text = " ".join(record.getMessage().split())[:2000]
            say(b"w " + text.encode(errors="replace") + b"\n")

    logger = logging.getLogger("casstore")
    for handler in list(logger.handlers):  # a forked helper's copies of its batch's
        logger.removeHandler(handler)
    logger.addHandler(Forward(logging.WARNING))
    logger.propagate = False

    try:
        store = Store(job["root"], **job["options"])
        threading.Thread(target=listen, daemon=True).start()
        say(b"ready\n")
        while True:
            with cond:
                if not queue:
                    say(b"")  # nothing more in hand: what is held back goes now
                while not queue and not stop:
                    cond.wait()
                if stop:
                    break
                at = queue.popleft()
            started = time.monotonic()
            url, sha256, size, name = items[at]
            try:
                got = store._fetch_unindexed(Request(url=url, sha256=sha256, size=size, name=name))
            except (DownloadError, IntegrityFailure) as exc:  # the source's: the answer
                import pickle

                report(at, b"0 p " + pickle.dumps(exc).hex().encode(), started)
                continue
            except CasError:  # its own trouble: the batch does the item
                got = None
            if got is None:  # (or the store had it: the batch serves it as a hit)
                report(at, b"0 e", started)
                continue
            published, final_url = got
            said = (published.size, published.blake3.encode(), final_url.encode().hex().encode())
            report(at, b"1 %d %s %s" % said, started)
    finally:
        with contextlib.suppress(OSError):
            say(b"")
        os._exit(0)  # no traceback to show, no thread to wait for, nothing to close


def _may_fork() -> bool:
    """Whether a helper may be forked rather than started afresh (~0.1 s of
    imports saved): on Linux, while this process runs one thread (a thread's
    locks would be copied held into the child), and with SIGCHLD not ignored
    (the child would be reaped behind ``wait``'s back and its pid reused)."""
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return False
    if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class _Forked:
    """A helper forked from the batch, with the part of ``subprocess.Popen``
    that ``Share`` uses: ``pid``, ``stdin``, ``stdout``, ``kill``, ``wait``."""

    def __init__(self, job: dict[str, Any]) -> None:
        import gc

        from_batch, to_helper = os.pipe()
        from_helper, to_batch = os.pipe()
        # No collection between the fork and the child's gc.freeze(): the
        # child must not finalize its copies of the batch's objects (a SQLite
        # connection among them).
        collecting = gc.isenabled()
        gc.disable()
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    gc.freeze()
                    gc.enable()
                    _forked_child(job, from_batch, to_batch, (to_helper, from_helper))
                finally:
                    os._exit(1)
        finally:
            if collecting and pid != 0:
                gc.enable()
            os.close(from_batch)
            os.close(to_batch)
            if pid < 0:  # the fork failed
                os.close(to_helper)
                os.close(from_helper)
        self.pid = pid
        self.stdin = open(to_helper, "wb")  # noqa: SIM115 (closed by Share.close)
        self.stdout = open(from_helper, "rb")  # noqa: SIM115
        self._status: int | None = None

    def kill(self) -> None:
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self._status is None:
            try:
                self._status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:  # reaped by someone else's SIGCHLD handler
                self._status = 0
        return self._status


def _forked_child(job: dict[str, Any], rfd: int, wfd: int, batchs: tuple[int, int]) -> None:
    """In a forked helper, before ``serve``: the batch's ends of the pipes, its
    standard streams and its signal handlers are not the helper's.  (The
    batch's other descriptors stay open, untouched, until the helper is killed:
    closing them under their copied Python objects would be worse.)"""
    for fd in batchs:
        os.close(fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in (rfd, wfd, null):
            os.dup2(null, fd)  # as a started helper's: nothing of it reaches the batch's output
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
    serve(job, rfd, wfd)


def _failure(text: bytes) -> Exception | None:
    """The helper's DownloadError or IntegrityFailure, sent pickled (as hex)."""
    import pickle

    from .errors import DownloadError, IntegrityFailure

    try:
        exc = pickle.loads(bytes.fromhex(text.decode()))
    except Exception:
        return None
    return exc if isinstance(exc, DownloadError | IntegrityFailure) else None


def _close(stream: Any) -> None:
    try:
        if stream is not None:
            stream.close()
    except (OSError, ValueError):
        pass


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _free_slot(layout: Layout) -> int | None:
    """An fd holding one of the store's helper slots (one per spare core), or None.

    Several batches at once (parallel installers sharing a store) would each
    start a helper and oversubscribe the cores.  A slot is a lock file nobody
    waits for: taken or skipped.
    """
    import fcntl

    layout.ensure()
    for k in range(max(1, _cores() - 1)):
        path = layout.lock_path(f"spread-{k}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):  # gc unlinks unheld locks
                return fd
        except OSError:
            pass
        os.close(fd)
    return None
