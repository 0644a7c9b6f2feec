"""A pool's worker slots, their starts and their deaths, whatever a worker is (ForkPool's process, thaw_ray's Ray
actor).

A worker is a SlotWorker (its slot's counts, which decide whether the pool gives the slot up; `info(slot)`, what a
pool's `worker_info()` shows of it) with `killed` (by the pool: replaced by the next round that needs it),
`describe()` (its name in errors), `ended()` where its pool sees its process end without asking it (ForkPool's),
`lost()` (its death since the last round, as the round that needs it sees it before the parent is read: replaced
then, the round waiting for the replacement's start), and `_start_outcome()`, from which SlotWorker's
`ensure_ready()`, waiting for its engine, has one of three outcomes:
- it returns: the engine has started (`ready`);
- PoolWorkerDied naming the worker: it failed to start (then on every later call too), with its `start_error`
  set and `failed_starts` counted: the pool starts another in its slot, MAX_FAILED_STARTS in a row at most;
- PoolWorkerStarting (a PoolWorkerDied): not started within its own time limit, and not failed either (a Ray
  actor that no node can place yet): kept as it is, not a failed start, and waited for again at the next round.
  Only a pool whose workers can wait on something outside them (RayForkPool: Ray placing an actor) raises it;
  ForkPool's workers wait for their engine, however long it takes, and either start or fail. A round whose
  failures are all workers still starting raises it too (finish_starts): the caller's cue to retry later.
A pool starts one with `start(name, failed_starts, deaths)`, carrying its slot's counts on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional

from .fork_round import PoolWorkerDied, PoolWorkerStarting

MAX_FAILED_STARTS = 3  # failed starts in a row of one worker slot, after which the pool stops restarting it
MAX_DEATHS = 3  # deaths in a row of one slot's workers (in a round, or between rounds), none answering a round in
# between, after which the pool stops replacing it


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerInfo:
    """One slot's worker as a pool's `worker_info()` shows it: a copy, taken when asked (the pool's records are its
    own, and a later round may put a new worker in the slot). Built by name: a field added later moves none."""

    slot: int  # its place in the pool, 0..workers-1; errors name its worker "pool worker <slot>"
    state: Literal["starting", "ready", "exited", "given_up"]
    # starting: its engine's start not yet seen (a replacement's is seen by the next round that needs its slot; a
    #   RayForkPool actor may also be waiting for Ray to place it: then node and pid are None);
    # ready: its engine has started, and its process has not been seen to end;
    # exited: a ForkPool worker's process has ended, as the process says: stopped or killed by the pool (a round
    #   interrupted mid-way, a failed start, close()), or seen to exit (as it happens, between rounds too where
    #   Python has os.waitid, once what its engine started has been killed too). A RayForkPool actor shows exited
    #   once the pool has asked Ray to kill it (ray.kill returns before the actor's process has ended); one that
    #   dies between rounds shows as ready until a round begins (Ray tells of an actor's death through a call:
    #   each round first asks its actors where they are). Either way the next round that needs the slot replaces
    #   a started worker before the parent is read, and runs once the replacement has started (a replacement that
    #   fails to start fails that round, naming the dead worker, how it ended and the failed start). A replacement
    #   that dies before a round has seen its start (it shows starting until then) is found by the round that needs
    #   it, before the parent is read: ForkPool's as a failed start; a RayForkPool actor's as a failed start if it
    #   died starting, else (its start answered) as a death between rounds, replaced as a started one is. A worker
    #   that dies while the round waits for another's start: a RayForkPool round asks its actors again once it has
    #   waited, and replaces it before the parent is read; a ForkPool round finds it once it has read the parent,
    #   before any worker is sent the round, and fails naming it (replaced for the next round), as it does one that
    #   dies while the parent is read;
    # given_up: the slot is no longer restarted (MAX_FAILED_STARTS failed starts in a row, or its workers died
    #   MAX_DEATHS times in a row), its last worker ended as an exited one: start a new pool.
    pid: Optional[int]  # its process (on its node), once known
    node: Optional[str] = None  # a RayForkPool actor's Ray node id, once placed; None: a ForkPool worker (on the
    # pool's own machine), or an actor not placed yet
    id: Optional[str] = None  # the worker's own id where its carrier names one (a Ray actor id, hex, from the
    # actor's creation: as errors and Ray's tools name it; a new id in the slot is a new actor); None: ForkPool's
    failed_starts: int = 0  # the slot's failed starts in a row, the current worker's included if its start failed:
    # a worker that fails to start is started again (starting, with this count) until MAX_FAILED_STARTS


class SlotWorker:
    """A worker's part of its slot's record, carried on to each worker started in the slot: its failed starts
    and its deaths in rounds, each in a row (gave_up reads them); and its start's outcome, kept by `ensure_ready`
    from what its `_start_outcome()` says."""

    node: Optional[str] = None  # where it runs (WorkerInfo.node)
    pid: Optional[int] = None
    id: Optional[str] = None  # WorkerInfo.id
    ready = False
    killed = False  # by the pool: replaced by the next round that needs it (each worker sets it when it kills)

    def __init__(self, name: str, failed_starts: int, deaths: int) -> None:
        self.name = name
        self.failed_starts = failed_starts  # its slot's failed starts in a row, this worker's included once failed
        self.start_error: Optional[str] = None  # how this worker failed to start, if it did
        self.deaths = deaths  # its slot's workers' deaths in a row, this worker's included once dead
        self.death: Optional[str] = None  # how this worker died (in a round, or between rounds), if it did

    def info(self, slot: int) -> WorkerInfo:
        if given_up(self):
            state = "given_up"
        elif self.start_error is not None or self.ended():  # a failed start: its worker has been ended
            state = "exited"
        else:
            state = "ready" if self.ready else "starting"
        return WorkerInfo(slot=slot, state=state, pid=self.pid, node=self.node, id=self.id,
                          failed_starts=self.failed_starts)

    def ended(self) -> bool:
        """Its process has ended, as far as the pool knows without asking it: killed by the pool (a worker whose
        pool sees its process exit says so too)."""
        return self.killed

    def lost(self) -> Optional[PoolWorkerDied]:
        """Its death since it last answered (a started worker, not killed by the pool), if its pool sees it now:
        the worker ended and its death, naming it, how it ended (ForkPool: its exit status; RayForkPool: Ray's
        error) and when (between rounds, or while the round waited for a start; ForkPool's `lost(when)` takes the
        words); None if it is not seen dead (one dying as the round asks it fails the round instead). Called
        by the round that needs its slot before the parent is read, and by ForkPool's again once the parent is read,
        before the round is sent to any worker."""
        return None

    def ensure_ready(self) -> None:
        """Wait until its engine has started (returns), or raise: PoolWorkerDied (`start_error`, on this call and
        every later one, its failed start counted once) if it failed, PoolWorkerStarting if it is still starting
        (kept as it is: nothing counted)."""
        if self.ready:
            return
        if self.start_error is None:
            failure = self._start_outcome()
            if failure is None:
                self.ready, self.failed_starts = True, 0
                return
            self.failed_starts += 1
            self.start_error = f"{self.describe()} failed to start{failure}"
        raise PoolWorkerDied(self.start_error)

    def _start_outcome(self) -> Optional[str]:
        """Wait for its engine's start: None once started; or, failed, the worker ended and how it failed (the
        rest of "failed to start..."); or raise PoolWorkerStarting."""
        raise NotImplementedError


def gave_up(worker) -> Optional[str]:
    """Why the pool no longer restarts the worker's slot, if it does not: MAX_FAILED_STARTS failed starts in a
    row, or MAX_DEATHS deaths in a row of the slot's workers, none answering a round in between (an engine that
    dies in every round, or each time before it answers one, would otherwise be restarted for ever). A worker that
    answers every round and dies between them is replaced each time, without limit: each round runs."""
    if worker.start_error is not None and worker.failed_starts >= MAX_FAILED_STARTS:
        return (f"{worker.start_error}; it failed to start {worker.failed_starts} times in a row and is no longer "
                "restarted: close this pool and start a new one")
    if worker.death is not None and worker.deaths >= MAX_DEATHS:
        return (f"{worker.death}; its slot's workers died {worker.deaths} times in a row, none answering a round in "
                "between, and it is no longer replaced: close this pool and start a new one")
    return None


def given_up(worker) -> bool:
    return gave_up(worker) is not None


def finish_starts(workers: list, n: int, closed: Callable[[], bool],
                  start: Callable[[str, int, int], object]) -> list[int]:
    """The round's n worker slots of `workers`, the first n not given up, each started: a replacement started
    after a failed round finishes starting here, and a worker seen dead since the last round (`lost()`) is
    replaced here, its death counted as one in a round is (MAX_DEATHS), the round waiting for the replacement's
    start. One that fails to start fails the round with PoolWorkerDied
    (PoolWorkerStarting when every worker that failed the round is still starting: retry later),
    before the parent is read, and is started again (put in its slot) for the next round, up to
    MAX_FAILED_STARTS failed starts in a row (one still starting, PoolWorkerStarting, fails the round but is
    kept: a Ray actor waiting for a node to place it); after that (or after MAX_DEATHS deaths in a row of its
    workers) the pool no longer restarts it, and rounds use the slots left (fewer than n left: each round
    needing more says so, and a new pool is the way on). `closed()`: the pool was closed meanwhile; close() stops
    what it finds, so nothing is started then."""
    slots, dead = [], {}  # first every slot's worker started, so that replacements start together
    for index, worker in enumerate(workers):
        if len(slots) == n:
            break
        if given_up(worker):
            continue
        died = None if worker.killed or closed() else worker.lost()
        if died is not None:  # seen dead since it last answered: replaced now (close() stops what it finds)
            replace_dead(workers, index, died, closed, start)  # its error is a round's report: this round words
            # its own (a slot given up: with the slots short, below; else `dead`, beside the replacement's start)
            if given_up(worker):
                continue  # as a slot given up before: a round short of slots says why
            dead[index] = died
        elif worker.killed and not closed():  # by an interrupted round
            workers[index] = start(worker.name, 0, worker.deaths)
        slots.append(index)
    if closed():  # from another thread, meanwhile: a dead or killed worker may be left in a slot, not replaced
        raise PoolWorkerDied("the pool was closed as the round began: the fork round failed before the parent was "
                             "read")  # what this pass started, close() stops once the round lets it
    failures, starting = [], 0
    for index in slots:  # then each waited for: n hung replacements cost one start's wait, not n in a row
        worker = workers[index]
        replacing = f"{dead[index]}, and its replacement: " if index in dead else ""
        try:
            worker.ensure_ready()
        except PoolWorkerStarting as exc:  # a Ray actor no node can place yet: kept, not a failed start
            starting += 1
            failures.append(f"{replacing}{exc}; it is kept, still starting, and waited for again at the next round "
                            "(not a failed start)")
        except PoolWorkerDied as exc:
            if given_up(worker):
                failures.append(replacing + gave_up(worker))
            elif closed():
                failures.append(replacing + str(exc))
            else:
                workers[index] = start(worker.name, worker.failed_starts, worker.deaths)
                failures.append(f"{replacing}{exc}; it is started again for the next round (failed starts in a "
                                f"row: {worker.failed_starts} of {MAX_FAILED_STARTS})")
    if len(slots) < n:
        usable = len(workers) - sum(map(given_up, workers))
        failures += [gave_up(worker) for worker in workers if given_up(worker)]
        failures.append(f"{usable} of the pool's {len(workers)} workers are usable; a round of {n} needs {n}")
    if failures:
        failed = PoolWorkerStarting if starting == len(failures) else PoolWorkerDied
        raise failed("; ".join(failures) + ": the fork round failed before the parent was read")
    return slots


def replace_dead(workers: list, slot: int, error: PoolWorkerDied, closed: Callable[[], bool],
                 start: Callable[[str, int, int], object]) -> PoolWorkerDied:
    """What a round reports for the worker in `slot`, which died in it or before it (`error` names it): the slot's
    deaths in a row counted, and a replacement started in it, unless the pool was closed meanwhile or the slot is
    given up (MAX_DEATHS), which the error returned then says."""
    worker = workers[slot]
    worker.death, worker.deaths = str(error), worker.deaths + 1
    if given_up(worker):
        return PoolWorkerDied(gave_up(worker))
    if not closed():
        workers[slot] = start(worker.name, 0, worker.deaths)
    return error


def note_answer(worker) -> None:
    """The worker answered a round: its slot's deaths are no longer in a row."""
    worker.deaths = 0


def kill_unanswered(workers) -> None:
    """Kill the workers a round interrupted mid-way (Ctrl-C) had not heard from: each would still be running that
    round, and answer the next with it. Each in its own try, so one that fails leaves the others to be killed,
    and the round's own exception (KeyboardInterrupt) is the caller's to see. finish_starts replaces them."""
    for worker in workers:
        try:
            worker.kill()
        except Exception:
            pass
