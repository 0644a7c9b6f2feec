"""RayForkPool: thaw_format.sdk.ForkPool's fork rounds, its workers Ray actors (each holding one warm engine).

    pool = RayForkPool(parent.launch_spec(), workers=4, actor_options={"num_gpus": 1})
    round = pool.fork(parent, 4, context=trunk, suffixes=[s0, s1, s2, s3], params=greedy(32))

The round's arguments are ForkPool's, checked by the same code (thaw_format.sdk.fork_round) before the parent
is read. Each round the parent captures the KV of the trunk's full pages once (`capture_shared`: KV only, no
weights, in the parent's shared-memory segment); an actor on the parent's Ray node is handed that segment's source
and reads it in place, as a ForkPool worker does, while for the actors on other nodes its bytes go into Ray's object
store once (one ray.put, none if every actor of the round is on the parent's node: thaw_ray.capture.hand_out); each
of n actors verifies every chunk of what it was handed, restores it and continues with its suffix (thaw_ray.actor);
the parent is only read. Its result is ForkPool's ForkRound: `capture_s` is the capture and the put, `verify_s` 0
(each actor checks the KV itself: its restore_s includes that check), `kv_via` each actor's way ("segment" or
"object"). The parent reuses its segment round after round: a round ends only once every actor handed it has
answered, died, or been killed and seen to end (an interrupted round's, one Ray reports unavailable), so no actor
still reads it when the next round's capture overwrites it. A worker whose actor dies mid-round is named, the round
fails with PoolWorkerDied once the others have answered, and the pool starts a new actor in its slot for the next round;
one that died between rounds (Ray's answer to the where() each round first asks its actors) is replaced by the
next round that needs it before the parent is read, and the round runs once its replacement has started (a
replacement whose start answered is asked too, before a round has seen it start; and once a round has waited for a
start, its actors are asked again, so one that died meanwhile is replaced before the parent is read too). Starts
that fail are retried, and slots given up, as ForkPool does it (thaw_format.sdk.pool_slots: MAX_FAILED_STARTS failed
starts in a row, or MAX_DEATHS deaths in a row of the slot's actors). An actor whose engine is still starting
start_timeout_s after it was placed has failed to start (killed); one that no node can place yet is still starting:
kept, the round failing (PoolWorkerStarting if no other worker failed), until a node can place it.
`worker_info()` shows each slot's actor (its state, pid, node and Ray id: RoundPool.worker_info).

The Ray cluster is the caller's: the pool needs Ray initialised (ray.init, or a cluster address) and never
calls ray.init or ray.shutdown itself; close() closes its actors' engines and ends its own actors only (ray.kill,
which Ray carries out shortly after).
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
import time
from typing import Mapping, Optional

import ray
from ray.exceptions import RayActorError, RayError

from thaw_format import CorruptSnapshotError
from thaw_format.sdk.fork_round import ForkRound, PoolWorkerDied, RoundArguments, whole_workers
from thaw_format.sdk.launch import startable_launch_spec
from thaw_format.sdk.pool_slots import MAX_DEATHS, given_up, kill_unanswered, note_answer
from thaw_format.sdk.round_pool import RoundPool

from . import leftovers
from .capture import hand_out
from .worker import PING_TIMEOUT_S, START_TIMEOUT_S, ActorWorker, Window, in_brief, require_ray, settle

CLOSE_TIMEOUT_S = 120  # how long close() waits for its actors' engines to close before it kills the actors
# Options the pool owns, and why: each actor is the pool's own, started, replaced and ended by it.
POOL_OPTIONS = {
    "max_restarts": "the pool replaces a dead actor itself",
    "max_task_retries": "the pool replaces a dead actor itself",
    "max_concurrency": "each actor runs one round at a time",
    "lifetime": "its actors end with the pool (a detached one would outlive it, and its driver)",
    "name": "its actors are its own, unnamed (every actor would take the one name, and others could fetch them)",
    "namespace": "its actors are unnamed (a namespace is for named actors)",
    "get_if_exists": "each of its actors is a new one, never an existing actor",
}


def _ended(handed) -> None:
    """Wait until each killed actor of these (worker, what it was handed) pairs that was handed the parent's segment
    has ended (ActorWorker.wait_ended): the parent's next capture overwrites that segment."""
    for worker, kv in handed:
        if isinstance(kv, str):
            worker.wait_ended()


def _checked_actor_options(options) -> dict:
    if options is None:
        return {}
    if not (isinstance(options, Mapping) and all(isinstance(key, str) for key in options)):
        raise TypeError(f"actor_options maps Ray's actor options (num_cpus, num_gpus, resources, runtime_env, ...) "
                        f"to values, not {reprlib.repr(options)}")
    owned = [key for key in POOL_OPTIONS if key in options]
    if owned:
        raise ValueError("actor_options may not set " + "; ".join(f"{key}: {POOL_OPTIONS[key]}" for key in owned))
    return dict(options)


def _checked_timeout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"start_timeout_s is a number of seconds > 0, not {value!r}")
    return value


class RayForkPool(RoundPool):
    """`workers` Ray actors, each a warm engine started once from a launch spec (or an engine's launch_spec())."""

    def __init__(self, spec, workers: int, *, actor_options: Optional[Mapping] = None,
                 start_timeout_s: float = START_TIMEOUT_S, shared_memory: bool = True) -> None:
        """`actor_options` go to Ray's .options() for each actor (num_cpus, num_gpus, resources, runtime_env, ...);
        `start_timeout_s`: how long an actor may take to be placed, from its creation, and then to start its engine,
        from when it was placed (seen as it happens, for every actor at once: n engines that hang starting are given
        up together; at least until its placing deadline). Its engine still starting then, its start has failed (the
        actor killed and started again, as any failed start); not placed, the round fails with PoolWorkerStarting
        but the actor is kept, waited for another start_timeout_s at the next round: Ray keeps an actor whose
        resources no node has pending for ever, saying nothing, and a node that joins later places it.
        At the pool's start, either fails the pool (PoolWorkerDied).
        `shared_memory`: an actor on this process's Ray node reads the parent's segment in place (one that cannot
        open it, a /dev/shm of its own, fails the round saying so); False sends every actor the object of one
        ray.put, as the actors on other nodes always are."""
        workers = whole_workers(workers)
        options = _checked_actor_options(actor_options)
        start_timeout_s = _checked_timeout(start_timeout_s)
        spec = startable_launch_spec(spec, "RayForkPool")  # the last argument checked: it may call into the engine
        if not ray.is_initialized():  # a remote call would start a local Ray of its own, which nobody shuts down
            raise RuntimeError("RayForkPool needs Ray initialised: call ray.init() (or ray.init(address=...) for "
                               "a cluster) first; the pool never starts or stops Ray itself")
        self._config = json.dumps({"factory": spec.factory, "kwargs": spec.kwargs})
        self._options = options
        self._start_timeout_s = start_timeout_s
        if not isinstance(shared_memory, bool):
            raise TypeError(f"shared_memory is True or False, not {shared_memory!r}")
        # the node whose /dev/shm holds the parent's segment: this process's (the parent's engine is here)
        self._node = ray.get_runtime_context().get_node_id() if shared_memory else None
        self._start_workers(workers)  # the actors' engines start side by side

    @property
    def start_timeout_s(self) -> float:
        """The constructor's start_timeout_s, or the value set since (not under the round's lock): a new value
        applies to the actors started after it is set, and from the next round's start to those whose engine's
        window is not fixed yet (ActorWorker.rearm). An actor placed keeps its window."""
        return self._start_timeout_s

    @start_timeout_s.setter
    def start_timeout_s(self, value: float) -> None:
        self._start_timeout_s = _checked_timeout(value)

    def actors(self) -> tuple[ray.actor.ActorHandle, ...]:
        """Each slot's Ray actor handle as it is now, in slot order (as worker_info(), whose `id` names each one):
        for calls of your own outside a round (an engine's `generate(prompt, params)`, as a round's child runs it:
        thaw_ray.actor.PoolActor), or Ray's tools. A later round may put a new actor in a slot: ask again. The
        pool's own calls (start, run_round, close) are the pool's: called on these handles, they break it."""
        return tuple(worker.actor for worker in self._workers)

    def fork(self, parent, n: int, *, context, suffixes, params) -> ForkRound:
        """RoundPool.fork, once Ray is known to be up (before the parent is read)."""
        if not self._closed:  # a closed pool says so (RoundPool.fork)
            require_ray()
        return super().fork(parent, n, context=context, suffixes=suffixes, params=params)

    def _ready_slots(self, n: int) -> list[int]:
        """The round's slots, each actor started, none seen dead (RoundPool._ready_slots): an actor dead since the
        last round is replaced before the parent is read (ActorWorker.lost), and the round waits for its
        replacement's start; one that dies during that wait (a replacement whose start answered, or an actor asked
        already) is asked again once it is over, and replaced in turn: the actors are asked until a pass waited for
        none, each of the round's actors asked in it (each death counted: MAX_DEATHS in a row give a slot up), for
        MAX_DEATHS + 1 passes at most: then the round fails (PoolWorkerDied) before the parent is read."""
        for passes in range(MAX_DEATHS + 1):  # a pass after the first follows a start waited for in the one before
            ready = [worker for worker in self._workers if worker.ready]
            for worker in self._workers:
                worker.rearm(self._start_timeout_s)  # one not placed yet, kept by an earlier round: waited for anew
            # only the n slots the round asks first are pinged, and their answers share one wait, not
            # PING_TIMEOUT_S each
            answers = Window.from_now(PING_TIMEOUT_S)
            pinged = [worker for worker in self._workers if not given_up(worker)][:n]
            for worker in pinged:
                worker.ping(answers, waited=passes > 0)
            slots = super()._ready_slots(n)
            # a slot given up during the pass lets in a spare never pinged: the next pass asks it
            checked = [worker for worker in ready if any(worker is asked for asked in pinged)]
            if all(any(self._workers[slot] is worker for worker in checked) for slot in slots):
                return slots  # none waited for, each asked: what the pings said holds as the parent is read
        raise PoolWorkerDied(f"actors kept dying while the round waited for their replacements ({MAX_DEATHS + 1} "
                             f"passes): the fork round failed before the parent was read")

    def _start(self, name: str, failed_starts: int = 0, deaths: int = 0) -> ActorWorker:
        return ActorWorker(name, self._config, self._options, self._start_timeout_s, failed_starts=failed_starts,
                           deaths=deaths)

    def _run(self, round_: ForkRound, slots: list[int], source: str, arguments: RoundArguments):
        workers = [self._workers[slot] for slot in slots]
        putting = time.perf_counter()
        kvs = hand_out(source, [worker.node for worker in workers], self._node)
        round_.capture_s += time.perf_counter() - putting
        calls, replies, failures, handed, answered = [], [], [], 0, 0
        try:  # from the first call on: one interrupted while the calls are made leaves actors reading the segment
            for worker, kv, suffix, p in zip(workers, kvs, arguments.suffixes, arguments.params):
                handed += 1  # before the call: an interruption as it is made kills an actor that may have it
                # settled: an interrupted round leaves the calls of the actors it killed unread
                calls.append(settle(worker.actor.run_round.remote(kv, arguments.context + suffix,
                                                                  dataclasses.asdict(p))))
            for slot, worker, kv, call in zip(slots, workers, kvs, calls):  # every live actor answers first
                try:
                    reply = ray.get(call)
                except RayActorError as exc:  # dead, or unavailable (ActorUnavailableError): may yet come back
                    worker.kill()  # so an unavailable one does not come back beside its replacement
                    _ended([(worker, kv)])
                    answered += 1  # once ended: interrupted before, it is killed and waited for below
                    failures.append(self._died(slot, worker.died(exc)))  # its replacement is ready by the next round
                    continue
                except RayError as exc:  # a call Ray could not run in the actor (its object lost, say)
                    answered += 1
                    failures.append(RuntimeError(f"{worker.describe()}: {in_brief(exc)}"))
                    continue
                answered += 1
                note_answer(worker)
                if reply.get("corrupt"):
                    what = f"segment {kv}" if isinstance(kv, str) else f"object {kv.hex()}"
                    failures.append(CorruptSnapshotError(f"{worker.describe()} refused the round's {what}: "
                                                         f"{reply['error']}"))
                elif "error" in reply:
                    failures.append(RuntimeError(f"{worker.describe()}: {reply['error']}"))
                else:
                    replies.append(reply)
        except BaseException:  # Ctrl-C mid-round: an actor yet to answer would still be running this round's call
            kill_unanswered(workers[answered:handed])  # an actor never handed the round has no call to stop
            _ended(zip(workers[answered:handed], kvs[answered:handed]))
            raise
        return replies, failures

    def _stop(self) -> None:
        """Close the engines side by side, waiting CLOSE_TIMEOUT_S for them all, then end every actor (one whose
        engine did not close in time, or never started, killed as it is)."""
        try:
            if ray.is_initialized():  # else Ray was shut down first (by its owner): its actors are gone with it
                closing = {worker: settle(worker.actor.close.remote()) for worker in self._workers  # read or not
                           if worker.ready and not worker.killed}
                if closing:  # an actor dead already answers with its error: done too
                    done, _ = ray.wait(list(closing.values()), num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
                    for worker, call in closing.items():  # one whose engine closed is not swept (worker.kill)
                        if call in done:
                            worker.closed(call)
        finally:
            for worker in self._workers:  # killed, or marked so where Ray is gone: each shows exited
                try:  # one Ray refuses to kill (the GCS gone) does not leave the others running
                    worker.kill()
                except Exception as exc:
                    leftovers.log.warning("thaw_ray: killing %s: %s", worker.describe(), in_brief(exc))
