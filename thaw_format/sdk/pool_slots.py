"""A pool's worker slots and their starts, whatever a worker is (ForkPool's process, thaw_ray's Ray actor).

A worker is anything with `name`, `failed_starts` (its slot's failed starts in a row, its own included once
failed), `start_error` (how it failed to start, or None), `killed` (by the pool: replaced by the next round
that needs it) and `ensure_ready()`, which waits for its engine and raises PoolWorkerDied naming it if it
failed to start (then on every later call too).
"""

from __future__ import annotations

from typing import Callable

from .fork_round import PoolWorkerDied

MAX_FAILED_STARTS = 3  # failed starts in a row of one worker slot, after which the pool stops restarting it


def given_up(worker) -> bool:
    """Whether the pool no longer restarts the worker's slot: MAX_FAILED_STARTS failed starts in a row."""
    return worker.start_error is not None and worker.failed_starts >= MAX_FAILED_STARTS


def gave_up(worker) -> str:
    return (f"{worker.start_error}; it failed to start {worker.failed_starts} times in a row and is no longer "
            "restarted: close this pool and start a new one")


def finish_starts(workers: list, n: int, closed: Callable[[], bool],
                  start: Callable[[str, int], object]) -> list[int]:
    """The round's n worker slots of `workers`, the first n not given up, each started: a replacement started
    after a failed round finishes starting here. One that fails to start fails the round with PoolWorkerDied,
    before the parent is read, and is started again (`start(name, failed_starts)`, put in its slot) for the next
    round, up to MAX_FAILED_STARTS failed starts in a row; after that the pool no longer restarts it, and rounds
    use the slots left (fewer than n left: each round needing more says so, and a new pool is the way on).
    `closed()`: the pool was closed meanwhile; close() stops what it finds, so nothing is started then."""
    slots, failures = [], []
    for index, worker in enumerate(workers):
        if len(slots) == n:
            break
        if given_up(worker):
            continue
        slots.append(index)
        if worker.killed and not closed():  # by an interrupted round
            worker = workers[index] = start(worker.name, 0)
        try:
            worker.ensure_ready()
        except PoolWorkerDied as exc:
            if given_up(worker):
                failures.append(gave_up(worker))
            elif closed():
                failures.append(str(exc))
            else:
                workers[index] = start(worker.name, worker.failed_starts)
                failures.append(f"{exc}; it is started again for the next round (failed starts in a row: "
                                f"{worker.failed_starts} of {MAX_FAILED_STARTS})")
    if len(slots) < n:
        usable = len(workers) - sum(map(given_up, workers))
        failures += [gave_up(worker) for worker in workers if given_up(worker)]
        failures.append(f"{usable} of the pool's {len(workers)} workers are usable; a round of {n} needs {n}")
    if failures:
        raise PoolWorkerDied("; ".join(failures) + ": the fork round failed before the parent was read")
    return slots

