"""The three ways a pool worker's start ends (thaw_format.sdk.pool_slots): started, failed (PoolWorkerDied: the
worker replaced and its failed start counted), or still starting (PoolWorkerStarting: kept as it is, not
counted), on workers of this file's own, no engine and no process; and worker_info, the pool's read-only view."""

import pytest

from thaw_format.sdk import PoolWorkerDied, PoolWorkerStarting, WorkerInfo
from thaw_format.sdk.pool_slots import SlotWorker, finish_starts


class Worker(SlotWorker):
    """A worker whose start ends as `outcome` says: "ready", "failed" or "starting"."""

    def __init__(self, name: str, failed_starts: int = 0, deaths: int = 0, outcome: str = "ready") -> None:
        super().__init__(name, failed_starts, deaths)
        self.outcome, self.killed, self.pid = outcome, False, 100 + int(name)

    def ensure_ready(self) -> None:
        if self.outcome == "starting":
            raise PoolWorkerStarting(f"worker {self.name} is not placed yet")
        if self.outcome == "failed":
            self.failed_starts += 1
            self.start_error = f"worker {self.name} failed to start"
            raise PoolWorkerDied(self.start_error)
        self.ready = True


def test_a_worker_still_starting_is_kept_and_one_that_failed_is_replaced_and_counted() -> None:
    workers = [Worker("0"), Worker("1", outcome="starting"), Worker("2", outcome="failed")]
    starting, failed, started = workers[1], workers[2], []

    def start(name, failed_starts, deaths):
        started.append(Worker(name, failed_starts, deaths))
        return started[-1]

    with pytest.raises(PoolWorkerDied, match=r"^worker 1 is not placed yet; it is kept, still starting, and waited "
                                             r"for again at the next round \(not a failed start\); worker 2 failed "
                                             r"to start; it is started again for the next round \(failed starts in "
                                             r"a row: 1 of 3\): the fork round failed before the parent was read$"):
        finish_starts(workers, 3, lambda: False, start)
    assert workers[1] is starting and starting.failed_starts == 0  # the same worker, no failed start counted
    assert workers[2] is started[0] is not failed and started[0].failed_starts == 1  # replaced, its count carried on
    starting.outcome = "ready"
    assert finish_starts(workers, 3, lambda: False, start) == [0, 1, 2]
    assert len(started) == 1


def test_worker_info_is_each_slots_worker_as_it_is_now() -> None:
    from thaw_format.sdk.round_pool import RoundPool

    class Pool(RoundPool):
        _run = _start = _stop = None

    pool = Pool()
    pool._workers = [Worker("0"), Worker("1", outcome="starting")]
    pool._workers[0].ensure_ready()
    assert pool.worker_info() == (WorkerInfo("0", None, 100, True), WorkerInfo("1", None, 101, False))
