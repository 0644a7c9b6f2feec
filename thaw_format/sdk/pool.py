"""ForkPool: warm engines that take only a trunk's KV each round, for fork at memory speed in steady state.

    pool = ForkPool(parent.launch_spec(), workers=4)      # or ForkPool(parent, workers=4): N engines, started once
    round = pool.fork(parent, 4, context=trunk, suffixes=[s0, s1, s2, s3], params=greedy(32))
    round.generations                                     # one Generation per suffix, cached_tokens from the engine

Each round the parent publishes the KV of the trunk's full pages once in shared memory (`capture_shared`: a
KV-only snapshot, no weights), the pool checks every chunk of it once, and each of n workers restores it from
there (`restore_source(..., verified=True)`: read in place, not checked again) and continues with its suffix,
whose prefill starts with the trunk's last partial page (a full page, of the parent's page_size(), is what
every engine caches). The parent is only read. A worker that dies mid-round is named with its exit status,
the round fails with PoolWorkerDied after the other workers have answered, and the pool starts a replacement,
so the next round runs on a full pool. A replacement finishes starting at the next round; if it fails to start
(its engine's error, or its process ended), that round fails before the parent is read, naming the worker, its
error and its exit status, and the worker is started again for the round after, MAX_FAILED_STARTS failed starts
in a row at most; a slot whose workers died in MAX_DEATHS rounds in a row, none answering a round in between, is
not replaced after the last (an engine that dies on every round would otherwise be restarted for ever). Rounds
needing a slot given up say so, and why: start a new pool. A pool whose first start fails raises, with
nothing left running. Each worker leads its own process group (thaw_format.sdk.engine_process): the processes
its engine starts (vLLM's engine core, SGLang's scheduler) end with it, however it ends. Any contract engine
with a launch spec works (thaw_format.sdk.contract).
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import reprlib
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

from ..errors import CorruptSnapshotError
from ..snapshot import SamplingParams
from .contract import Engine, Generation
from .engine_process import EngineProcess
from .launch import checked_launch_spec
from .lent import forget, open_snapshot
from .shared import capture_shared
from .tokens import token_ids


class PoolWorkerDied(RuntimeError):
    """A pool worker's process ended during a round, or failed to start (or was given up) before one; the
    message names it, its exit status and, for a failed start, its engine's error."""


@dataclass
class ForkRound:
    """One round's results and where its time went (seconds)."""

    generations: list[Generation]
    kv_bytes: int  # the snapshot moved: the trunk's KV pages and their description
    capture_s: float  # the parent's KV out: its capture of the trunk, published once in shared memory
    verify_s: float = 0.0  # the pool's one check of every chunk of that capture, before any worker reads it
    restore_s: list[float] = field(default_factory=list)  # each worker's KV in (scatter + prefix table)
    generate_s: list[float] = field(default_factory=list)  # each worker's suffix prefill + decode
    total_s: float = 0.0


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


MAX_FAILED_STARTS = 3  # failed starts in a row of one worker slot, after which the pool stops restarting it
MAX_DEATHS = 3  # rounds in a row in which one slot's worker died, after which the pool stops replacing it


def _given_up(worker: "_Worker") -> bool:
    return worker.gave_up() is not None


class _Worker:
    def __init__(self, name: str, config: dict, env: dict, *, failed_starts: int = 0, deaths: int = 0) -> None:
        self.name = name
        self.failed_starts = failed_starts  # its slot's failed starts in a row, this worker's included once failed
        self.start_error: Optional[str] = None  # how this worker failed to start, if it did
        self.deaths = deaths  # rounds in a row in which its slot's worker died, this worker's included once dead
        self.death: Optional[str] = None  # how this worker died in a round, if it did
        self.process = EngineProcess("thaw_format.sdk.pool_worker", config, env)
        self.ready = False
        self.killed = False  # by the pool: replaced by the next round that needs it

    def describe(self) -> str:
        return f"pool worker {self.name} (pid {self.process.pid})"

    def gave_up(self) -> Optional[str]:
        """Why the pool no longer restarts this worker's slot, if it does not: MAX_FAILED_STARTS failed starts in a
        row, or MAX_DEATHS rounds in a row in which the slot's worker died."""
        if self.start_error is not None and self.failed_starts >= MAX_FAILED_STARTS:
            return (f"{self.start_error}; it failed to start {self.failed_starts} times in a row and is no longer "
                    "restarted: close this pool and start a new one")
        if self.death is not None and self.deaths >= MAX_DEATHS:
            return (f"{self.death}; its slot's workers died in {self.deaths} rounds in a row, and it is no longer "
                    "replaced: close this pool and start a new one")
        return None

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

    def ensure_ready(self) -> None:
        """Wait until its engine has started; PoolWorkerDied naming the worker, its engine's error if it sent one,
        and its exit status if it failed (then, and on every later call: the process is gone, its pipes closed)."""
        if self.ready:
            return
        if self.start_error is None:
            line = self.process.stdout.readline()
            reply = json.loads(line) if line else {}
            if reply.get("ready"):
                self.ready, self.failed_starts = True, 0
                return
            self.process.end(timeout=60)  # after its error it exits: its status, not a zombie
            self.failed_starts += 1
            error = f": {reply['error']}" if "error" in reply else ""
            self.start_error = f"{self.describe()} failed to start{error} (it exited with " \
                               f"{self.process.exit_status()})"
        raise PoolWorkerDied(self.start_error)

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


def parent_page_size(parent) -> int:
    """The parent's page_size(): the pool hands over its full pages only. An engine's pages are its own (vLLM's
    CPU blocks are 128 tokens by default): cut at 32 for every engine, a 100-token trunk moved no KV from such a
    parent, and every worker prefilled it all, without a word."""
    method = getattr(parent, "page_size", None)
    if not callable(method):
        raise TypeError(f"a fork round's parent must say its page_size() (thaw_format.sdk.contract); "
                        f"{type(parent).__name__} has none")
    page = method()
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise TypeError(f"the parent's page_size() returned {page!r}, not a whole number of tokens >= 1")
    return page


def _params_per_child(params, n: int) -> list[SamplingParams]:
    """One SamplingParams per child: `params` for all, or its n items; TypeError or ValueError otherwise."""
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, Sequence) and not isinstance(params, (str, bytes)) and \
            all(isinstance(p, SamplingParams) for p in params):
        if len(params) != n:
            raise ValueError(f"{n} children take one SamplingParams, or {n} (one each), got {len(params)}")
        return list(params)
    raise TypeError(f"a fork round's params is a thaw_format.SamplingParams (greedy(n), seeded(...)) or one per "
                    f"child, not {type(params).__name__} {reprlib.repr(params)}")


def _check_workers(workers) -> int:
    """`workers` as an int: a whole number (an int or any integer with __index__, e.g. numpy's, but not a bool),
    at least 1, whose pipes fit this process's open-file limit (each worker holds two here: its stdin and
    stdout); a larger count would start processes until the OS refused one."""
    try:
        count = operator.index(workers)
    except TypeError:
        count = None
    if count is None or isinstance(workers, bool):  # True is an int, and started one worker
        raise TypeError(f"a fork pool's workers is a whole number of engines, not {type(workers).__name__} "
                        f"{workers!r}")
    workers = count
    if workers < 1:
        raise ValueError(f"a fork pool needs workers >= 1, got {workers}")
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY and 2 * workers > limit:
        raise ValueError(f"a fork pool of {workers} workers needs {2 * workers} open files for their pipes; this "
                         f"process may open {limit} (ulimit -n)")
    return workers


class ForkPool:
    """`workers` warm engines started once from a launch spec (or from an engine's own launch_spec())."""

    def __init__(self, spec, workers: int, *, env: Optional[dict] = None) -> None:
        workers = _check_workers(workers)
        if env is not None and not (isinstance(env, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                                      for k, v in env.items())):
            raise TypeError(f"a fork pool's env maps names to strings, not {reprlib.repr(env)}")
        spec = checked_launch_spec(spec, "ForkPool")  # last: it may call into the engine
        self._config = {"factory": spec.factory, "kwargs": spec.kwargs}
        self._env = {**os.environ, **(env or {})}
        self._checked: set[str] = set()  # the rounds' sources the pool has checked (and so mapped)
        self._closed = False
        self._round = threading.Lock()  # one round at a time (see fork)
        self._workers: list[_Worker] = []
        try:  # a start that fails part way (the OS refuses a process) stops the workers started before it
            for i in range(workers):
                self._workers.append(_Worker(str(i), self._config, self._env))
            for worker in self._workers:
                worker.ensure_ready()
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self._workers)

    def fork(self, parent: Engine, n: int, *, context: Sequence[int], suffixes: Sequence[Sequence[int]],
             params: Union[SamplingParams, Sequence[SamplingParams]]) -> ForkRound:
        """n workers restore the KV of `context` from `parent` and each continues with its suffix, sampled with
        `params`: one SamplingParams for every child, or a sequence of n, one per child (e.g. seeds). Arguments
        are checked before the parent is read."""
        if self._closed:  # its workers' pipes are closed: a round would fail mid-send, after the parent's capture
            raise RuntimeError("this ForkPool is closed; start a new one")
        if not 1 <= n <= len(self._workers):
            raise ValueError(f"this pool has {len(self._workers)} workers; a round takes 1..{len(self._workers)}, got {n}")
        if len(suffixes) != n:
            raise ValueError(f"{n} children need {n} suffixes, got {len(suffixes)}")
        suffixes = [token_ids(suffix, f"suffix {i}") for i, suffix in enumerate(suffixes)]
        params = _params_per_child(params, n)
        context = token_ids(context, "the context")
        page = parent_page_size(parent)
        if len(context) < page:  # no full page: nothing to hand over (an engine may refuse the empty KV)
            raise ValueError(f"a fork round's context needs at least one full page ({page} tokens, the parent's "
                             f"page_size()), whose KV the workers take; got {len(context)} tokens: generate on the "
                             "parent instead")
        with self._round:  # rounds share the workers' pipes and the parent's one segment: one at a time
            if self._closed:  # closed while this round waited for the one before it
                raise RuntimeError("this ForkPool is closed; start a new one")
            return self._fork(parent, n, context, page, suffixes, params)

    def _fork(self, parent, n: int, context: list[int], page: int, suffixes, params) -> ForkRound:
        started = time.perf_counter()
        slots = self._finish_starts(n)
        workers = [self._workers[slot] for slot in slots]
        full = len(context) // page * page
        # valid until the parent's next capture_shared: every worker answers before this round ends
        capturing = time.perf_counter()
        source = capture_shared(parent, chains=[context[:full]])
        verifying = time.perf_counter()
        _verify(source)
        self._checked.add(source)
        round_ = ForkRound([], int(source.rpartition("#")[2]), verifying - capturing, time.perf_counter() - verifying)
        replies, failures, answered, replacements = [], [], 0, 0
        try:
            sent = [worker.send({"source": source, "verified": True, "prompt": context + suffix,
                                 "params": dataclasses.asdict(p)})
                    for worker, suffix, p in zip(workers, suffixes, params)]
            for index, (worker, ok) in enumerate(zip(workers, sent)):
                try:  # every live worker answers before the round ends, so none is left mid-message
                    reply = worker.receive() if ok else None
                    if reply is None:
                        raise PoolWorkerDied(f"{worker.describe()} exited with {worker.process.exit_status()}")
                except PoolWorkerDied as exc:
                    answered += 1
                    worker.kill()  # its pipes, closed here, not by the GC (which printed their BrokenPipeError)
                    worker.death, worker.deaths = str(exc), worker.deaths + 1
                    if _given_up(worker):
                        failures.append(PoolWorkerDied(worker.gave_up()))
                    else:
                        failures.append(exc)
                        if not self._closed:
                            replacements += 1
                            self._workers[slots[index]] = _Worker(worker.name, self._config, self._env,
                                                                  deaths=worker.deaths)
                    continue
                answered += 1
                worker.deaths = 0  # it answered: its slot's deaths are no longer in a row
                if "error" in reply:
                    failures.append(RuntimeError(f"{worker.describe()}: {reply['error']}"))
                replies.append(reply)
        except BaseException:  # Ctrl-C mid-round: a worker yet to answer would answer the next round with this one
            for slot in slots[answered:]:  # each in its own try: one that fails leaves the others to be killed
                try:  # replaced by the next round (_finish_starts): a replacement started here, close() waited for
                    self._workers[slot].kill()
                except Exception:  # the original exception (KeyboardInterrupt) is the caller's to see
                    pass
            raise
        if failures:
            died = [f for f in failures if isinstance(f, PoolWorkerDied)]
            kind = PoolWorkerDied if died else RuntimeError
            replaced = ", dead workers are being replaced" if replacements else ""
            raise kind("; ".join(str(f) for f in failures) + ": the fork round failed (the parent engine is "
                       f"untouched{replaced})")
        for reply in replies:
            round_.generations.append(Generation(**reply["generation"]))
            round_.restore_s.append(reply["restore_s"])
            round_.generate_s.append(reply["generate_s"])
        round_.total_s = time.perf_counter() - started
        return round_

    def _finish_starts(self, n: int) -> list[int]:
        """The round's n worker slots, the first n not given up, each started: a replacement started after a failed
        round finishes starting here. One that fails to start fails the round with PoolWorkerDied, before the parent
        is read, and is started again for the next round, up to MAX_FAILED_STARTS failed starts in a row; after
        that (or after MAX_DEATHS rounds in a row in which its workers died) the pool no longer restarts it, and
        rounds use the slots left (fewer than n left: each round
        needing more says so, and a new pool is the way on)."""
        slots, failures = [], []
        for index, worker in enumerate(self._workers):
            if len(slots) == n:
                break
            if _given_up(worker):
                continue
            slots.append(index)
            if worker.killed and not self._closed:  # by an interrupted round
                worker = self._workers[index] = _Worker(worker.name, self._config, self._env, deaths=worker.deaths)
            try:
                worker.ensure_ready()
            except PoolWorkerDied as exc:
                if _given_up(worker):
                    failures.append(worker.gave_up())
                elif self._closed:  # closed meanwhile: close() stops what it finds, and starts nothing
                    failures.append(str(exc))
                else:
                    self._workers[index] = _Worker(worker.name, self._config, self._env,
                                                   failed_starts=worker.failed_starts, deaths=worker.deaths)
                    failures.append(f"{exc}; it is started again for the next round (failed starts in a row: "
                                    f"{worker.failed_starts} of {MAX_FAILED_STARTS})")
        if len(slots) < n:
            usable = len(self._workers) - sum(map(_given_up, self._workers))
            failures += [worker.gave_up() for worker in self._workers if _given_up(worker)]
            failures.append(f"{usable} of the pool's {len(self._workers)} workers are usable; a round of {n} needs {n}")
        if failures:
            raise PoolWorkerDied("; ".join(failures) + ": the fork round failed before the parent was read")
        return slots

    def close(self) -> None:
        """Stop the workers, after the round in progress, if any; a round still waiting for it is refused."""
        self._closed = True  # first: a round waiting for the lock sees it there, and starts no worker
        with self._round:  # a round's workers are its own until it ends (it may replace them)
            for worker in self._workers:
                worker.stop()
            for source in self._checked:  # the check's cached mappings would keep the parent's segments alive
                forget(source)
            self._checked.clear()

    def __enter__(self) -> "ForkPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
