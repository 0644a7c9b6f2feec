"""ForkPool: warm engines that take only a trunk's KV each round, for fork at memory speed in steady state.

    pool = ForkPool(parent.launch_spec(), workers=4)      # or ForkPool(parent, workers=4): N engines, started once
    round = pool.fork(parent, 4, context=trunk, suffixes=[s0, s1, s2, s3], params=greedy(32))
    round.generations                                     # one Generation per suffix, cached_tokens from the engine

Each round the parent publishes the KV of the trunk's full pages once in shared memory (`capture_shared`: a KV-only
snapshot, no weights), the pool checks every chunk of it once, and each of n workers restores it from there
(`restore_source(..., verified=True)`: read in place, not checked again) and continues with its suffix, whose
prefill starts with the trunk's last partial page (a full page, of the parent's page_size(), is what every engine
caches). The parent is only read. A worker that dies while the round reads the parent (its capture, and the pool's
check of it) is named with its exit status, and the round fails with PoolWorkerDied as soon as that read ends,
before it is sent to any worker (none runs a round that fails); one that dies once the round is sent fails it the
same way after the other workers have answered. Either way the pool starts a replacement, so the next round runs on
a full pool; one seen dead between rounds is replaced by the next round that needs it, before the parent is read,
and that round runs once the replacement has started. A replacement finishes starting at the next round; if it fails
to start (its engine's error, or its process ended), that round fails before the parent is read, naming the worker,
its error and its exit status (and the dead worker it replaces, and how that one ended), and the worker is started
again for the round after, MAX_FAILED_STARTS failed starts in a row at most; a slot whose workers died MAX_DEATHS
times in a row (in rounds or between them), none answering a round in between, is not replaced after the last (an
engine that dies on every round would otherwise be restarted for ever). Rounds needing a slot given up say so, and
why: start a new pool. A pool whose first start fails raises, with nothing left running. Each worker leads its own
process group (thaw_format.sdk.engine_process): the processes its engine starts (vLLM's engine core, SGLang's
scheduler) end with it, however it ends. `worker_info()` shows each slot's worker (RoundPool.worker_info: its pid,
whether it is starting, ready, exited or given up, and the slot's failed starts in a row); a worker's exit shows
there once its process's watcher has seen it and killed what its engine started, between rounds too where Python has
os.waitid (Linux; elsewhere once the pool reaps it, at the next round that needs it). Any contract engine with a
launch spec works (thaw_format.sdk.contract).
"""

from __future__ import annotations

import dataclasses
import json
import os
import reprlib
import resource
import time
from typing import Mapping, Optional

from ..errors import CorruptSnapshotError
from .engine_process import EngineProcess
from .fork_round import ForkRound, PoolWorkerDied, PoolWorkerStarting, RoundArguments, parent_page_size, whole_workers
from .launch import startable_launch_spec
from .lent import open_snapshot
from .pool_slots import MAX_DEATHS, MAX_FAILED_STARTS, SlotWorker, WorkerInfo, kill_unanswered, note_answer
from .round_pool import RoundPool

__all__ = ["ForkPool", "ForkRound", "MAX_DEATHS", "MAX_FAILED_STARTS", "PoolWorkerDied", "PoolWorkerStarting",
           "WorkerInfo", "parent_page_size"]


def _verify(source: str) -> None:
    """Check every chunk of the round's segment once, here, for all its workers; CorruptSnapshotError, before
    any worker is sent the round, if one is damaged.

    Each worker used to check the whole segment itself before scattering it: n reads of the same bytes at once
    on the same memory bus. Measured in the vLLM pool (4 workers, 2 CPUs, a 4096-token trunk of 256 MiB): each
    worker's check took 35-45 ms of its 150 ms restore; the one check here takes 15 ms (both CPUs, nothing else
    running), and the slowest restore fell to 108 ms. Checked once here, the workers restore with
    `verified=True`. The check is as strong as theirs: the segment is the parent's, rewritten only by its next
    capture_shared, which comes after every worker has answered (a process that wrote into it meanwhile could
    do so just as well between a worker's check and its scatter).
    """
    try:
        open_snapshot(source)  # a cached mapping: every round's check reads the same warm pages
    except CorruptSnapshotError as exc:
        raise CorruptSnapshotError(f"the parent's capture for this round ({source}): {exc}; no worker was sent "
                                   "it (the parent engine is untouched)") from None


class _Worker(SlotWorker):
    def __init__(self, name: str, config: dict, env: dict, *, failed_starts: int = 0, deaths: int = 0) -> None:
        super().__init__(name, failed_starts, deaths)
        self.process = EngineProcess("thaw_format.sdk.pool_worker", config, env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> str:
        return f"pool worker {self.name} (pid {self.pid})"

    def ended(self) -> bool:
        """Its process has ended, as the process says (`exited`, which reaps nothing: worker_info() may be called
        from any thread, and only the pool's own calls may reap it): reaped after the pool killed it, or seen to
        exit by its watcher once what its engine started is killed too, between rounds too (where Python has
        os.waitid; elsewhere once the pool reaps it)."""
        return self.process.exited

    def _seen_exited(self) -> bool:
        """Its process has ended, as the round's own call sees it: its watcher's word (set before poll() returns,
        which waits for what its engine started to be killed), or poll(), which reaps it (no os.waitid)."""
        return self.process.exited or self.process.poll() is not None

    def lost(self, when: str = "between rounds") -> Optional[PoolWorkerDied]:
        """SlotWorker.lost: its process seen to have ended, its pipes closed here; `when` it died, in words."""
        if not self.ready or self.killed or not self._seen_exited():
            return None
        status = self.process.exit_status()
        self.kill()
        return PoolWorkerDied(f"{self.describe()} exited with {status} {when}")

    def send(self, message: dict) -> bool:
        """False if the worker is gone."""
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            return True
        except (OSError, ValueError):  # ValueError: its stdin was closed here (the pool was closed)
            return False

    def receive(self) -> dict:
        """The next reply; PoolWorkerDied if the process ended first."""
        line = self.process.stdout.readline()
        if not line:
            raise PoolWorkerDied(f"{self.describe()} exited with {self.process.exit_status()}")
        return json.loads(line)

    def _start_outcome(self) -> Optional[str]:
        """Its engine's start (SlotWorker.ensure_ready): failed, its error if it sent one and its exit status. One
        that said ready and has exited since (a replacement killed before the round that reads its reply) failed
        too: else the round would read the parent, then fail on it."""
        line = self.process.stdout.readline()
        reply = json.loads(line) if line else {}
        if reply.get("ready") and not self._seen_exited():
            return None
        self.process.end(timeout=60)  # after its error it exits: its status, not a zombie
        error = f": {reply['error']}" if "error" in reply else ": it said ready, then exited" if reply else ""
        return f"{error} (it exited with {self.process.exit_status()})"

    def kill(self) -> None:
        self.process.kill_quietly()
        self.killed = True

    def stop(self, timeout: float = 120) -> None:
        """End it: a ready worker closes its engine at the end of its input; one still starting is killed (it
        reads no input until its engine has started: closing it waited out each worker's whole start)."""
        if self.ready:
            self.process.end(timeout)
        else:
            self.kill()


def _check_workers(workers) -> int:
    """`workers` as an int (fork_round.whole_workers) whose pipes fit this process's open-file limit (each worker
    holds two here: its stdin and stdout); a larger count would start processes until the OS refused one."""
    workers = whole_workers(workers)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY and 2 * workers > limit:
        raise ValueError(f"a fork pool of {workers} workers needs {2 * workers} open files for their pipes; this "
                         f"process may open {limit} (ulimit -n)")
    return workers


class ForkPool(RoundPool):
    """`workers` warm engines started once from a launch spec (or from an engine's own launch_spec())."""

    def __init__(self, spec, workers: int, *, env: Optional[dict] = None) -> None:
        workers = _check_workers(workers)
        if env is not None and not (isinstance(env, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                                      for k, v in env.items())):
            raise TypeError(f"a fork pool's env maps names to strings, not {reprlib.repr(env)}")
        spec = startable_launch_spec(spec, "ForkPool")  # last: it may call into the engine
        self._config = {"factory": spec.factory, "kwargs": spec.kwargs}
        self._env = {**os.environ, **(env or {})}
        self._start_workers(workers)  # a start that fails part way (the OS refuses a process) stops the others

    def _run(self, round_: ForkRound, slots: list[int], source: str, arguments: RoundArguments):
        workers = [self._workers[slot] for slot in slots]
        verifying = time.perf_counter()
        _verify(source)
        round_.verify_s = time.perf_counter() - verifying
        # A worker that died while the parent was read fails the round here, before any worker restores and
        # generates for a round that would fail. Its watcher has seen it exit; one it has not seen yet, dying this
        # instant, is found as the round is sent to it or as its reply is read, the others answering first.
        dead = [(slot, died) for slot, worker in zip(slots, workers)
                if (died := worker.lost("before the round was sent to any worker")) is not None]
        if dead:
            return [], [self._died(slot, died) for slot, died in dead]
        replies, failures, answered = [], [], 0
        try:
            sent = [worker.send({"source": source, "verified": True, "prompt": arguments.context + suffix,
                                 "params": dataclasses.asdict(p)})
                    for worker, suffix, p in zip(workers, arguments.suffixes, arguments.params)]
            for index, (worker, ok) in enumerate(zip(workers, sent)):
                try:  # every live worker answers before the round ends, so none is left mid-message
                    reply = worker.receive() if ok else None
                    if reply is None:
                        raise PoolWorkerDied(f"{worker.describe()} exited with {worker.process.exit_status()}")
                except PoolWorkerDied as exc:
                    answered += 1
                    worker.kill()  # its pipes, closed here, not by the GC (which printed their BrokenPipeError)
                    failures.append(self._died(slots[index], exc))
                    continue
                answered += 1
                note_answer(worker)
                if "error" in reply:
                    failures.append(RuntimeError(f"{worker.describe()}: {reply['error']}"))
                replies.append(reply)
        except BaseException:  # Ctrl-C mid-round: replaced by the next round (a replacement started here, close()
            kill_unanswered(workers[answered:])  # waited for)
            raise
        return replies, failures

    def _start(self, name: str, failed_starts: int = 0, deaths: int = 0) -> _Worker:
        return _Worker(name, self._config, self._env, failed_starts=failed_starts, deaths=deaths)

    def _stop(self) -> None:
        for worker in self._workers:
            worker.stop()
