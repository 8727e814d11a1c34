"""How many of a batch's workers run at once (casstore/throttle.py).

The policy is driven window by window through ``decide`` with the rates and
CPU use a batch would have measured; the slots with real threads.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from casstore.throttle import FIRST_PAUSE, Throttle

pytestmark = pytest.mark.timeout(60)


def _run(throttle: Throttle, windows: int, rate_at, busy_at) -> list[int]:
    """The limit after each of ``windows`` windows whose rates and CPU use depend on the limit."""
    limits = []
    for _ in range(windows):
        limit = throttle.limit
        throttle.decide((rate_at(limit), rate_at(limit) * 4096), busy_at(limit))
        limits.append(throttle.limit)
    return limits


def _trials(limits: list[int], trial: int, settled: int) -> list[int]:
    """Where ``limits`` tried ``trial``, checking that each trial was undone at once."""
    at = [i for i, limit in enumerate(limits) if limit == trial]
    assert set(limits) == {trial, settled}
    assert all(limits[i + 1] == settled for i in at if i + 1 < len(limits))
    return at


def _gaps(trials: list[int]) -> list[int]:
    return [b - a - 1 for a, b in itertools.pairwise(trials)]


def test_a_cpu_bound_batch_that_fewer_workers_do_not_slow_settles_on_one():
    # A fast origin: the process keeps a core busy and eight threads are no faster than one.
    limits = _run(Throttle(8), 40, rate_at=lambda n: 900.0, busy_at=lambda n: 1.1)
    assert limits[0] == 1  # at once: a whole core busy says no worker waits on anything else
    # Then it looks now and then, ever less often, whether two would be faster.
    trials = _trials(limits[1:], trial=2, settled=1)
    assert _gaps(trials)[:3] == [FIRST_PAUSE + 1, 2 * FIRST_PAUSE + 1, 4 * FIRST_PAUSE + 1]


def test_fewer_workers_are_only_tried_while_the_process_is_busy():
    # A slow origin: the workers wait on the network, so fewer could only be slower.
    limits = _run(Throttle(8), 50, rate_at=lambda n: 20.0 * n, busy_at=lambda n: 0.3)
    assert set(limits) == {8}


def test_a_trial_that_slows_the_batch_is_undone_and_retried_ever_less_often():
    # Busy, but each worker still adds throughput (a CDN capping each connection).
    limits = _run(Throttle(8), 40, rate_at=lambda n: 100.0 * n, busy_at=lambda n: 1.2)
    assert limits[:2] == [1, 8]  # the first guess, undone
    trials = _trials(limits[1:], trial=4, settled=8)
    assert _gaps(trials)[:2] == [2 * FIRST_PAUSE + 1, 4 * FIRST_PAUSE + 1]


def test_a_batch_climbs_back_once_its_workers_wait_on_the_network():
    throttle = Throttle(8)
    _run(throttle, 6, rate_at=lambda n: 900.0, busy_at=lambda n: 1.1)
    assert throttle.limit == 1
    # Now large files from a slower mirror: more workers, more throughput.
    limits = _run(throttle, 8, rate_at=lambda n: 30.0 * n, busy_at=lambda n: 0.4)
    climb = limits[limits.index(2) :]
    assert climb[:3] == [2, 4, 8]  # one window each, once the pause is over
    assert set(climb[3:]) == {8}


def test_more_workers_are_kept_only_if_they_make_the_batch_faster():
    throttle = Throttle(8)
    _run(throttle, 6, rate_at=lambda n: 900.0, busy_at=lambda n: 1.1)
    limits = _run(throttle, 8, rate_at=lambda n: 50.0, busy_at=lambda n: 0.5)
    assert limits.count(2) == 1 and limits[limits.index(2) + 1] == 1  # tried, no faster, undone


def test_the_first_trial_of_fewer_is_as_few_as_the_cpu_use_suggests():
    guesses = [
        _run(Throttle(8), 1, rate_at=lambda n: 900.0, busy_at=lambda n, b=busy: b)[0]
        for busy in (0.7, 0.8, 0.9, 1.0, 1.5)
    ]
    assert guesses == [4, 3, 2, 1, 1]  # never more than half


def test_slots_admit_at_most_the_limit_and_follow_it_down():
    # A clock that never moves: no window ends, so only decide() changes the limit.
    throttle = Throttle(3, clock=lambda: 0.0, cpu=lambda: 0.0)
    inside = 0
    most = {"before": 0, "after": 0}
    phase = "before"
    count = threading.Lock()
    entered = threading.Semaphore(0)
    go = {"before": threading.Event(), "after": threading.Event()}

    def serve(job: int, slot) -> None:
        nonlocal inside
        with count:
            inside += 1
            mine = phase
            most[mine] = max(most[mine], inside)
        entered.release()
        go[mine].wait(30)
        slot.bytes = 4096
        with count:
            inside -= 1

    runner = threading.Thread(target=throttle.run, args=(range(10), serve), kwargs={"threads": 10})
    runner.start()
    for _ in range(3):
        assert entered.acquire(timeout=30)
    assert not entered.acquire(timeout=0.2)  # the other seven wait for a slot
    throttle.decide((10.0, 40960.0), 1.0)  # CPU-bound: a trial with one slot
    assert throttle.limit == 1
    with count:
        phase = "after"
    go["before"].set()  # the three leave; from now on one at a time
    assert entered.acquire(timeout=30)
    assert not entered.acquire(timeout=0.2)
    go["after"].set()
    runner.join(30)
    assert not runner.is_alive()
    assert most == {"before": 3, "after": 1}


def test_a_worker_keeps_its_slot_from_job_to_job(monkeypatch):
    # Handing the slot over would wake another thread for every job.
    throttle = Throttle(1, clock=lambda: 0.0, cpu=lambda: 0.0)
    served: list[tuple[int, str]] = []
    handed_over = []
    leave = Throttle._leave
    monkeypatch.setattr(Throttle, "_leave", lambda self: handed_over.append(1) or leave(self))

    def serve(job: int, slot) -> None:
        served.append((job, threading.current_thread().name))

    throttle.run(range(50), serve, threads=4)
    assert [job for job, _ in served] == list(range(50))
    assert len({name for _, name in served}) == 1
    assert handed_over == []


def test_a_limit_raised_after_a_job_wakes_the_parked_workers():
    now = [0.0]
    throttle = Throttle(4, clock=lambda: now[0], cpu=lambda: now[0])
    throttle.decide((10.0, 40960.0), 1.0)  # busy: a trial of one worker
    assert throttle.limit == 1
    both = threading.Barrier(2, timeout=10)

    def serve(job: int, slot) -> None:
        if job == 0:  # once the other three are parked, waiting for a slot
            deadline = time.monotonic() + 30
            while len(throttle._cond._waiters) < 3:  # type: ignore[attr-defined]
                assert time.monotonic() < deadline
                time.sleep(0.001)
        if job < 8:
            now[0] += 0.2  # a slow window at one worker: the trial is undone, back to 4
        else:
            both.wait()  # two jobs at once, or this times out

    throttle.run(range(10), serve, threads=4)
    assert throttle.limit == 4


def test_a_released_slot_lets_another_worker_run_meanwhile():
    throttle = Throttle(1, clock=lambda: 0.0, cpu=lambda: 0.0)
    second_served = threading.Event()
    inside = 0
    most = 0
    count = threading.Lock()

    def serve(job: int, slot) -> None:
        nonlocal inside, most
        if job == 0:
            slot.release()  # waiting on something that is not a download
            assert second_served.wait(30)
            slot.hold()
        with count:
            inside += 1
            most = max(most, inside)
        if job == 1:
            second_served.set()
        with count:
            inside -= 1

    throttle.run(range(2), serve, threads=2)
    assert second_served.is_set() and most == 1


def test_a_failing_job_stops_the_jobs_not_begun():
    throttle = Throttle(1, clock=lambda: 0.0, cpu=lambda: 0.0)
    served = []

    def serve(job: int, slot) -> None:
        served.append(job)
        if job == 3:
            raise RuntimeError("job 3")

    with pytest.raises(RuntimeError, match="job 3"):
        throttle.run(range(10), serve, threads=3)
    assert served == [0, 1, 2, 3]


@pytest.mark.timeout(30)
def test_hurried_jobs_are_served_before_their_turn_and_each_once():
    jobs = [["a"], ["b"], ["c"], ["d"], ["e"]]  # (ids tell jobs apart, as the batch's)
    throttle = Throttle(1)
    served = []

    def serve(job, slot):
        served.append(job[0])
        if job is jobs[0]:
            throttle.hurry(jobs[4])  # a helper's item, reported
            throttle.hurry(jobs[4])  # (reported twice: served once)
            throttle.hurry(jobs[1])  # next anyway
            throttle.hurry(jobs[0])  # under way already

    throttle.run(jobs, serve, threads=1)
    assert served == ["a", "e", "b", "c", "d"]


@pytest.mark.timeout(30)
def test_a_hurry_is_the_run_under_ways_only():
    throttle = Throttle(1)
    served = []
    throttle.run([["a"], ["b"]], lambda job, slot: served.append(job[0]), threads=1)
    throttle.hurry(["late"])  # (a helper's report after the run: nobody's job now)
    throttle.run([["x"], ["y"]], lambda job, slot: served.append(job[0]), threads=1)
    assert served == ["a", "b", "x", "y"]


@pytest.mark.timeout(30)
def test_a_job_hurried_from_another_thread_is_served_once_by_many_workers():
    jobs = [[i] for i in range(400)]
    throttle = Throttle(4)
    served = []
    lock = threading.Lock()

    def serve(job, slot):
        with lock:
            served.append(job[0])

    hurrier = threading.Thread(target=lambda: [throttle.hurry(j) for j in reversed(jobs)])
    hurrier.start()
    throttle.run(jobs, serve, threads=4)
    hurrier.join()
    assert sorted(served) == list(range(400))


def test_between_one_and_the_ceiling_trials_alternate_fewer_and_more():
    # Busy, and fastest at four workers: it settles there, looking both ways in turn.
    rate = {8: 800.0, 4: 1000.0, 2: 700.0, 1: 400.0}
    limits = _run(Throttle(8), 40, rate_at=rate.__getitem__, busy_at=lambda n: 1.2)
    assert limits[:6] == [1, 8, 8, 8, 4, 2]  # the first guess, too few; then halving
    tried = [limit for limit in limits[6:] if limit != 4]
    assert tried[:3] == [8, 2, 8]
    assert limits[-1] == 4 or limits[-2] == 4


def test_steps_each_a_little_slower_do_not_add_up():
    # Each halving costs 4%, within what one trial forgives; two in a row do not pass.
    rate = {8: 1000.0, 4: 960.0, 2: 921.6, 1: 884.7}
    limits = _run(Throttle(8), 7, rate_at=rate.__getitem__, busy_at=lambda n: 1.2)
    assert limits == [1, 8, 8, 8, 4, 2, 4]  # the first guess is one step of its own


def test_a_ceiling_lent_to_a_helper_and_given_back():
    throttle = Throttle(4, clock=lambda: 0.0, cpu=lambda: 0.0)
    throttle.set_ceiling(3)  # a helper process took a slot
    assert (throttle.ceiling, throttle.limit) == (3, 3)
    throttle.set_ceiling(4)  # and is gone: a limit at the top follows the ceiling up
    assert (throttle.ceiling, throttle.limit) == (4, 4)
    throttle.decide((10.0, 40960.0), 1.0)  # CPU-bound: a trial of fewer
    low = throttle.limit
    assert low < 4
    throttle.set_ceiling(3)
    throttle.set_ceiling(4)
    assert throttle.limit == low  # one the batch chose below it stays


def test_downloads_counted_for_the_batch_end_its_windows_too():
    # A helper process's downloads, reported to the batch, are part of its rate.
    now, cpu = [0.0], [0.0]
    throttle = Throttle(8, clock=lambda: now[0], cpu=lambda: cpu[0])
    for _ in range(15):
        now[0] += 0.01
        cpu[0] += 0.011
        throttle.count(4096)
    assert throttle.limit == 8  # a window needs two downloads per worker
    now[0] += 0.01
    cpu[0] += 0.011
    throttle.count(4096)
    assert throttle.limit == 1  # the first window is busy: the first guess


def test_a_short_batch_measures_a_window_first_and_halves():
    # 40 large downloads: a wrong first trial would cost a large share of the batch.
    now, cpu = [0.0], [0.0]
    throttle = Throttle(8, jobs=40, clock=lambda: now[0], cpu=lambda: cpu[0])

    def downloads(n: int, seconds: float) -> None:
        for _ in range(n):
            now[0] += seconds / n
            cpu[0] += 1.2 * seconds / n  # busy: hashing on more than one core
            throttle.count(10 << 20)

    downloads(16, 0.05)
    assert throttle.limit == 8  # the first window lasts its 0.1 s
    downloads(16, 0.06)
    assert throttle.limit == 8  # and is not a measure
    downloads(16, 0.11)
    assert throttle.limit == 4  # the first trial halves; a long batch would guess 1
    long = Throttle(8, jobs=1000, clock=lambda: now[0], cpu=lambda: cpu[0])
    throttle = long
    downloads(16, 0.05)
    assert long.limit == 1


def test_ctrl_c_delivered_to_a_worker_thread_stops_the_batch_soon():
    """The kernel may hand SIGINT to any thread; Python handles it on the main
    thread, which must not sleep through it until the jobs end."""
    import signal

    started, release, stopped = threading.Event(), threading.Event(), threading.Event()
    workers: list[int] = []

    def serve(job: int, slot) -> None:
        workers.append(threading.get_ident())
        started.set()
        release.wait(30)

    def interrupt() -> None:
        assert started.wait(30)
        signal.pthread_kill(workers[0], signal.SIGINT)
        try:  # the main thread has noticed, and stops the batch
            assert stopped.wait(5), "Ctrl-C was not noticed while the job ran"
        finally:
            release.set()

    checker = threading.Thread(target=interrupt)
    checker.start()
    with pytest.raises(KeyboardInterrupt):
        Throttle(1).run([1, 2], serve, threads=1, on_stop=stopped.set)
    checker.join(30)
    assert stopped.is_set() and len(workers) == 1  # the job under way ended; no other began
