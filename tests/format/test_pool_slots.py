"""The three ways a pool worker's start ends (thaw_format.sdk.pool_slots): started, failed (PoolWorkerDied: the
worker replaced and its failed start counted), or still starting (PoolWorkerStarting: kept as it is, not
counted), on workers of this file's own, no engine and no process; what a round and a pool's first start raise
for each; workers seen dead between rounds replaced by the next round, their replacements started together,
their deaths counted until the slot is given up, and a pool closed as the round begins; and worker_info,
the pool's read-only view of its slots, across a worker dying mid-round, failed starts until its slot is given
up, an interrupted round's kill, and close()."""

import itertools

import pytest

from thaw_format.sdk import PoolWorkerDied, PoolWorkerStarting, WorkerInfo, greedy
from thaw_format.sdk.pool_slots import MAX_DEATHS, MAX_FAILED_STARTS, SlotWorker, finish_starts, note_answer
from thaw_format.sdk.round_pool import RoundPool

PIDS = itertools.count(100)  # each worker's own: a replacement has a new one


class Worker(SlotWorker):
    """A worker whose start ends as `outcome` says: "ready", "failed", "starting", or "bare" (a PoolWorkerDied
    raised past SlotWorker's bookkeeping: no start_error, nothing counted)."""

    def __init__(self, name: str, failed_starts: int = 0, deaths: int = 0, outcome: str = "ready") -> None:
        super().__init__(name, failed_starts, deaths)
        self.outcome, self.killed, self.pid, self.waits = outcome, False, next(PIDS), 0
        self.exited = False  # its process seen to end on its own (as ForkPool's watcher sees it)

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

    def ended(self) -> bool:
        return self.killed or self.exited

    def lost(self):
        if self.ready and self.exited and not self.killed:
            self.kill()
            return PoolWorkerDied(f"worker {self.name} exited between rounds")
        return None


class Pool(RoundPool):
    """A RoundPool of such workers: `outcomes`, in order, for the workers it starts (its first len(outcomes) at
    once); in its rounds the workers in the slots of `dying` die, the others answer (with no generation)."""

    def __init__(self, *outcomes: str, workers: int = 0) -> None:
        self.outcomes, self.dying = list(outcomes), set()
        self._start_workers(workers or len(outcomes))

    def _start(self, name: str, failed_starts: int = 0, deaths: int = 0) -> Worker:
        return Worker(name, failed_starts, deaths, self.outcomes.pop(0))

    def _run(self, round_, slots, source, arguments):
        failures = []
        for slot in slots:
            if slot in self.dying:
                self._workers[slot].kill()
                failures.append(self._died(slot, PoolWorkerDied(f"worker {slot} died")))
            else:
                note_answer(self._workers[slot])
        return [], failures

    def _stop(self) -> None:
        for worker in self._workers:
            worker.kill()


class Parent:
    """A parent that is never read: its capture's source names a segment that no one opens."""

    def page_size(self) -> int:
        return 4

    def capture_shared(self, *, chains=None) -> str:
        return "shm://thaw-unit-never-opened#64"


def round_(pool, n: int = 2):
    return pool.fork(Parent(), n, context=[5] * 8, suffixes=[[6]] * n, params=greedy(1))


def states(pool) -> list[tuple[str, int]]:
    return [(info.state, info.failed_starts) for info in pool.worker_info()]


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
    first = pool._workers[0]
    pool._workers[1] = Worker("1", outcome="starting")
    assert pool.worker_info() == (WorkerInfo(slot=0, state="ready", pid=first.pid),
                                  WorkerInfo(slot=1, state="starting", pid=pool._workers[1].pid))
    pool._workers[0].kill()  # by an interrupted round: no longer started, though its engine once was
    assert pool.worker_info()[0] == WorkerInfo(slot=0, state="exited", pid=first.pid)
    pool._workers[1].exited = True  # its process seen to end between rounds
    assert pool.worker_info()[1].state == "exited"


def test_a_worker_dead_mid_round_shows_its_replacement_starting_then_ready() -> None:
    pool = Pool("ready", "ready", "ready", workers=2)
    before = pool.worker_info()
    pool.dying = {1}
    with pytest.raises(PoolWorkerDied, match="worker 1 died"):
        round_(pool)
    after = pool.worker_info()
    assert after[0] == before[0] and after[1].state == "starting" and after[1].pid != before[1].pid
    pool.dying = set()
    round_(pool)  # its start seen here
    assert pool.worker_info()[1] == WorkerInfo(slot=1, state="ready", pid=after[1].pid)


def test_failed_starts_show_as_the_slots_count_until_it_is_given_up() -> None:
    pool = Pool("ready", "ready", *["failed"] * MAX_FAILED_STARTS, workers=2)
    pool.dying = {1}
    with pytest.raises(PoolWorkerDied, match="worker 1 died"):
        round_(pool)
    pool.dying = set()
    assert states(pool) == [("ready", 0), ("starting", 0)]
    for attempt in range(1, MAX_FAILED_STARTS):
        with pytest.raises(PoolWorkerDied, match="failed to start"):
            round_(pool)
        assert states(pool) == [("ready", 0), ("starting", attempt)]  # started again, its slot's count carried on
    last = pool.worker_info()[1].pid
    with pytest.raises(PoolWorkerDied, match="no longer restarted"):
        round_(pool)
    assert pool.worker_info()[1] == WorkerInfo(slot=1, state="given_up", pid=last, failed_starts=MAX_FAILED_STARTS)
    round_(pool, 1)  # the other slot serves
    assert states(pool) == [("ready", 0), ("given_up", MAX_FAILED_STARTS)]


def test_a_worker_seen_dead_between_rounds_is_replaced_by_the_round_and_its_death_counted() -> None:
    """The round replaces it before the parent is read and runs on the replacement; its death counts towards
    MAX_DEATHS as a death in a round does (here its replacements then die in rounds: given up after the last)."""
    pool = Pool(*["ready"] * (2 + MAX_DEATHS), workers=2)
    dead = pool._workers[1]
    dead.exited = True
    round_(pool)
    assert pool._workers[1] is not dead and pool._workers[1].deaths == 0  # its replacement answered
    pool._workers[1].exited = True  # its death the first in a row, then its replacements' in rounds
    pool.dying = {1}
    for _ in range(MAX_DEATHS - 2):
        with pytest.raises(PoolWorkerDied, match=r"^worker 1 died: .*being replaced\)$"):
            round_(pool)
    with pytest.raises(PoolWorkerDied, match=rf"^worker 1 died; its slot's workers died {MAX_DEATHS} times in a row, "
                                             "none answering a round in between, and it is no longer replaced"):
        round_(pool)
    assert [info.state for info in pool.worker_info()] == ["ready", "given_up"]


def test_workers_seen_dead_between_rounds_are_all_started_again_before_any_is_waited_for() -> None:
    """Their replacements start side by side: n engines that hang starting cost one start's wait, not n."""
    workers = [Worker(str(slot)) for slot in range(3)]
    for worker in workers:
        worker.ensure_ready()
        worker.exited = True
    started, waited_at_each_start = [], []

    def start(name, failed_starts, deaths):
        waited_at_each_start.append(sum(worker.waits for worker in started))
        return starter(started)(name, failed_starts, deaths)

    assert finish_starts(workers, 3, lambda: False, start) == [0, 1, 2]
    assert workers == started and waited_at_each_start == [0, 0, 0]
    assert [worker.waits for worker in started] == [1, 1, 1]


def test_deaths_between_rounds_give_a_slot_up_and_a_spare_slot_serves() -> None:
    """MAX_DEATHS deaths in a row, each seen as a round begins: the slot is given up, the error naming the last
    death; with a slot to spare the round runs on it, with none it fails before the parent is read."""
    for workers, n in ((2, 2), (3, 2)):
        pool = Pool(*["ready"] * (workers + MAX_DEATHS), workers=workers)
        pool._workers[1].deaths = MAX_DEATHS - 1  # its slot's earlier deaths in a row
        pool._workers[1].exited = True
        if workers == n:
            with pytest.raises(PoolWorkerDied, match=rf"^worker 1 exited between rounds; its slot's workers died "
                                                     rf"{MAX_DEATHS} times in a row, .* 1 of the pool's 2 workers are "
                                                     r"usable; a round of 2 needs 2: the fork round failed before "
                                                     r"the parent was read$"):
                round_(pool, n)
        else:
            round_(pool, n)
            assert pool._workers[2].deaths == 0  # the spare slot answered
        assert [info.state for info in pool.worker_info()][:2] == ["ready", "given_up"]


def test_a_pool_closed_as_a_round_begins_fails_it_with_nothing_started() -> None:
    """close() from another thread: a dead worker is not replaced, so the round does not run on it."""
    workers = [Worker("0"), Worker("1")]
    for worker in workers:
        worker.ensure_ready()
    workers[1].exited, started = True, []
    with pytest.raises(PoolWorkerDied, match=r"^the pool was closed as the round began: the fork round failed "
                                             r"before the parent was read$"):
        finish_starts(workers, 2, lambda: True, starter(started))
    assert started == []


def test_close_shows_every_worker_exited() -> None:
    pool = Pool("ready", "ready")
    pids = [info.pid for info in pool.worker_info()]
    assert not pool.closed
    pool.close()
    assert pool.closed
    assert pool.worker_info() == tuple(WorkerInfo(slot=slot, state="exited", pid=pid) for slot, pid in enumerate(pids))
