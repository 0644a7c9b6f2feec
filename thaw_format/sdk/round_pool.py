"""RoundPool: what every pool of warm engines shares, whatever carries its rounds (ForkPool's processes,
thaw_ray's Ray actors): its workers started once, a round's arguments checked before the parent is read, one
round at a time, the parent's one capture per round, the round's failure, and close().

A pool subclasses it with three methods: `_start(name, failed_starts=0, deaths=0)` starts a worker
(thaw_format.sdk.pool_slots says what a worker is, and the three ways its start ends: started, failed, or still
starting), `_run(round_, slots, source, arguments)` hands the parent's capture (the source of its capture_shared) to
the workers in those slots and returns their replies and failures (`_died` for a worker that died in the round, or
while the parent was read: a pool may then fail the round before sending it to any worker, as ForkPool does;
`pool_slots.note_answer` for one that answered; its reads of the segment may go through lent's cached mappings,
which close() forgets), and `_stop()` ends every worker; `_ready_slots(n)` is its hook into a round once the round
holds the pool (the round's slots, each worker started: pool_slots.finish_starts). A round failing before the parent
is read only for workers still starting raises PoolWorkerStarting (retry later); a pool's first start raises
PoolWorkerDied, the pool closed.
"""

from __future__ import annotations

import abc
import threading
import time
from typing import Sequence, TypeVar, Union

from ..snapshot import SamplingParams
from .contract import Engine
from .fork_round import ForkRound, PoolWorkerDied, PoolWorkerStarting, RoundArguments, checked_round, round_failure
from .lent import forget, parse
from .pool_slots import WorkerInfo, finish_starts, replace_dead
from .shared import capture_shared


Pool = TypeVar("Pool", bound="RoundPool")


class RoundPool(abc.ABC):
    def _start_workers(self, count: int) -> None:
        self._closed = False
        self._round = threading.Lock()  # rounds share the workers and the parent's one segment: one at a time
        self._workers: list = []
        # the parent's segments by name (its source, latest): this process's cached mappings of them (lent: the
        # rounds' check, or put) are forgotten at close, else they would keep the segments' memory alive
        self._segments: dict[str, str] = {}
        try:  # a start that fails part way stops the workers started before it
            for i in range(count):
                self._workers.append(self._start(str(i)))
            for worker in self._workers:
                worker.ensure_ready()
        except PoolWorkerStarting as exc:  # closed with the pool: no round waits for it again, so it failed
            self.close()
            raise PoolWorkerDied(str(exc)) from None
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def closed(self) -> bool:
        """close() has begun (it may still be waiting for the round in progress): no round starts from here on."""
        return self._closed

    def worker_info(self) -> tuple[WorkerInfo, ...]:
        """Each slot's worker as it is now, in slot order (pool_slots.WorkerInfo: its slot, state, pid, node and id
        where they apply, and the slot's failed starts in a row), the same for every pool. A copy, read without
        waiting for the round in progress: a replacement a later round starts shows in a later call, and a reading
        taken while a round runs reads each field as it is at that moment (its state may still say starting beside
        a pid just learnt, or a worker just replaced)."""
        return tuple(worker.info(slot) for slot, worker in enumerate(self._workers))

    def fork(self, parent: Engine, n: int, *, context: Sequence[int], suffixes: Sequence[Sequence[int]],
             params: Union[SamplingParams, Sequence[SamplingParams]]) -> ForkRound:
        """n workers restore the KV of `context` from `parent` and each continues with its suffix, sampled with
        `params`: one SamplingParams for every child, or a sequence of n, one per child (e.g. seeds). Arguments
        are checked before the parent is read."""
        if self._closed:  # its workers are gone: a round would fail mid-way, after the parent's capture
            raise RuntimeError(f"this {type(self).__name__} is closed; start a new one")
        arguments = checked_round(parent, n, len(self._workers), context, suffixes, params)
        with self._round:
            if self._closed:  # closed while this round waited for the one before it
                raise RuntimeError(f"this {type(self).__name__} is closed; start a new one")
            started = time.perf_counter()
            slots = self._ready_slots(n)
            capturing = time.perf_counter()
            # valid until the parent's next capture_shared: every worker answers before this round ends
            source = capture_shared(parent, chains=[arguments.context[:arguments.full]])
            name, nbytes = parse(source)
            self._segments[name] = source
            round_ = ForkRound([], nbytes, time.perf_counter() - capturing)
            workers = [self._workers[slot] for slot in slots]
            replies, failures = self._run(round_, slots, source, arguments)
            if failures:  # a slot holding a new worker: its worker died, and it is being replaced
                replaced = any(self._workers[slot] is not worker for slot, worker in zip(slots, workers))
                raise round_failure(failures, replaced=replaced)
            for reply in replies:
                round_.add(reply)
            round_.total_s = time.perf_counter() - started
            return round_

    @abc.abstractmethod
    def _run(self, round_: ForkRound, slots: list[int], source: str,
             arguments: RoundArguments) -> tuple[list[dict], list[Exception]]:
        """The workers in `slots` run the round from the parent's capture `source`: their replies, and failures."""

    @abc.abstractmethod
    def _start(self, name: str, failed_starts: int = 0, deaths: int = 0):
        """A new worker (thaw_format.sdk.pool_slots), its engine starting; ensure_ready() waits for it."""

    def _died(self, slot: int, error: PoolWorkerDied) -> PoolWorkerDied:
        """The failure to report for the worker in `slot`, which died in the round: replaced for the next round
        unless the pool is closed or the slot given up (pool_slots.replace_dead)."""
        return replace_dead(self._workers, slot, error, lambda: self._closed, self._start)

    def _ready_slots(self, n: int) -> list[int]:
        """A round of n workers holds the pool: its slots, each worker started (pool_slots.finish_starts), before
        the parent is read (a pool's hook: RayForkPool's first waits anew for its actors still not placed, and asks
        the round's others where they are, for their `lost()`)."""
        return finish_starts(self._workers, n, lambda: self._closed, self._start)

    @abc.abstractmethod
    def _stop(self) -> None:
        """End every worker."""

    def close(self) -> None:
        """Stop the workers, after the round in progress, if any; a round still waiting for it is refused."""
        self._closed = True  # first: a round waiting for the lock sees it there, and starts no worker
        with self._round:  # a round's workers are its own until it ends (it may replace them)
            try:
                self._stop()
            finally:
                for source in self._segments.values():
                    forget(source)
                self._segments.clear()

    def __enter__(self: Pool) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
