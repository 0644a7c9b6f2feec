"""The three ways a pool worker's start ends (thaw_format.sdk.pool_slots): started, failed (PoolWorkerDied: the
worker replaced and its failed start counted), or still starting (PoolWorkerStarting: kept as it is, not
counted), on workers of this file's own, no engine and no process; what a round and a pool's first start raise
for each; and worker_info, the pool's read-only view."""

import pytest

from thaw_format.sdk import PoolWorkerDied, PoolWorkerStarting, WorkerInfo
from thaw_format.sdk.pool_slots import SlotWorker, finish_starts
from thaw_format.sdk.round_pool import RoundPool


class Worker(SlotWorker):
    """A worker whose start ends as `outcome` says: "ready", "failed", "starting", or "bare" (a PoolWorkerDied
    raised past SlotWorker's bookkeeping: no start_error, nothing counted)."""

    def __init__(self, name: str, failed_starts: int = 0, deaths: int = 0, outcome: str = "ready") -> None:
        super().__init__(name, failed_starts, deaths)
        self.outcome, self.killed, self.pid, self.waits = outcome, False, 100 + int(name), 0

    def describe(self) -> str:
        return f"worker {self.name}"

    def _start_outcome(self):
        self.waits += 1
        if self.outcome == "starting":
            raise PoolWorkerStarting(f"worker {self.name} is not placed yet")
        if self.outcome == "bare":
            raise PoolWorkerDied(f"worker {self.name} raised")
        return " (told to)" if self.outcome == "failed" else None

    def kill(self) -> None:
        self.killed = True


class Pool(RoundPool):
    """A RoundPool of such workers: `outcomes`, in order, for the workers it starts."""

    def __init__(self, *outcomes: str) -> None:
        self.outcomes, self.stopped = list(outcomes), False
        self._start_workers(len(outcomes))

    def _start(self, name: str, failed_starts: int = 0, deaths: int = 0) -> Worker:
        return Worker(name, failed_starts, deaths, self.outcomes.pop(0))

    def _run(self, round_, slots, source, arguments):
        raise AssertionError("no round runs here")

    def _stop(self) -> None:
        self.stopped = True


def starter(started: list):
    def start(name, failed_starts, deaths):
        started.append(Worker(name, failed_starts, deaths))
        return started[-1]
    return start


def test_a_worker_still_starting_is_kept_and_one_that_failed_is_replaced_and_counted() -> None:
    workers = [Worker("0"), Worker("1", outcome="starting"), Worker("2", outcome="failed")]
    starting, failed, started = workers[1], workers[2], []
    with pytest.raises(PoolWorkerDied, match=r"^worker 1 is not placed yet; it is kept, still starting, and waited "
                                             r"for again at the next round \(not a failed start\); worker 2 failed "
                                             r"to start \(told to\); it is started again for the next round \(failed "
                                             r"starts in a row: 1 of 3\): the fork round failed before the parent was "
                                             r"read$") as raised:
        finish_starts(workers, 3, lambda: False, starter(started))
    assert type(raised.value) is PoolWorkerDied  # a worker failed: not only still starting
    assert workers[1] is starting and starting.failed_starts == 0  # the same worker, no failed start counted
    assert workers[2] is started[0] is not failed and started[0].failed_starts == 1  # replaced, its count carried on
    with pytest.raises(PoolWorkerDied, match=r"^worker 2 failed to start \(told to\)$"):
        failed.ensure_ready()  # the same failure again, not waited for, not counted again
    assert failed.waits == 1 and failed.failed_starts == 1 and failed.start_error is not None
    starting.outcome = "ready"
    assert finish_starts(workers, 3, lambda: False, starter(started)) == [0, 1, 2]
    assert len(started) == 1


def test_a_round_whose_workers_are_all_still_starting_raises_pool_worker_starting() -> None:
    workers = [Worker("0", outcome="starting"), Worker("1"), Worker("2", outcome="starting")]
    kept = list(workers)
    with pytest.raises(PoolWorkerStarting, match=r"^worker 0 is not placed yet; .*; worker 2 is not placed yet; "
                                                 r".*: the fork round failed before the parent was read$"):
        finish_starts(workers, 3, lambda: False, starter([]))
    assert workers == kept


def test_a_bare_pool_worker_died_is_a_failed_start_replaced_not_a_worker_kept_starting() -> None:
    """Only PoolWorkerStarting keeps a worker: a PoolWorkerDied without a start_error (which an earlier rule took
    for "still starting") is replaced like any failed start."""
    workers, started = [Worker("0", outcome="bare")], []
    bare = workers[0]
    with pytest.raises(PoolWorkerDied, match=r"^worker 0 raised; it is started again for the next round") as raised:
        finish_starts(workers, 1, lambda: False, starter(started))
    assert type(raised.value) is PoolWorkerDied and bare.start_error is None
    assert workers == started and started[0] is not bare


def test_a_pools_first_start_still_starting_fails_the_pool_with_pool_worker_died() -> None:
    """PoolWorkerStarting means "kept, retry": at a pool's start the pool is closed, so the caller sees a plain
    PoolWorkerDied."""
    with pytest.raises(PoolWorkerDied, match=r"^worker 1 is not placed yet$") as raised:
        Pool("ready", "starting")
    assert type(raised.value) is PoolWorkerDied


def test_worker_info_is_each_slots_worker_as_it_is_now() -> None:
    pool = Pool("ready", "ready")
    pool._workers[1] = Worker("1", outcome="starting")
    assert pool.worker_info() == (WorkerInfo("0", None, 100, True), WorkerInfo("1", None, 101, False))
    pool._workers[0].kill()  # by an interrupted round: no longer started, though its engine once was
    assert pool.worker_info()[0] == WorkerInfo("0", None, 100, False)
