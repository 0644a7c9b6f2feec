"""One RayForkPool worker slot's actor, as thaw_format.sdk.pool_slots needs a worker: started at once, waited
for at each round until it has started (`ensure_ready`, `rearm`), named with its actor id, process id and node
in every error. Not placed within start_timeout_s of its creation, it is still starting (PoolWorkerStarting), and
kept; placed, its engine still starting start_timeout_s later, it has failed to start, and is killed. When it was
placed is seen as it happens (a Ray callback), not when a round gets to it: the engines of a round's actors have
their windows side by side, so n engines that hang are given up in one start_timeout_s, not n."""

from __future__ import annotations

import logging
import os
import select
import time
from concurrent.futures import Future
from typing import Callable, NamedTuple, Optional

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError, TaskUnschedulableError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from thaw_format.sdk.fork_round import PoolWorkerDied, PoolWorkerStarting
from thaw_format.sdk.pool_slots import SlotWorker

from . import leftovers
from .actor import PoolActor

RemoteActor = ray.remote(PoolActor)
# On the node of an actor ended without its engine's close (leftovers.sweep): no CPU asked, so that it runs beside
# the node's actors at once; not retried (what a second run would find is what the first left)
remote_sweep = ray.remote(num_cpus=0, max_retries=0)(leftovers.sweep)
START_TIMEOUT_S = 600  # RayForkPool's default wait for an actor's engine to start (placing it included)
# How long a round waits for its actors' answers to where(), which it asks first: a dead actor's is Ray's error.
# A live actor answers, and a SIGKILLed one's error comes, within milliseconds (benchmarks/HISTORY.md, Fork pool);
# one not answered in time (hung, or dead on a node not yet known lost) is left to the round's own call, which tells.
PING_TIMEOUT_S = 10
# How long a round waits for a killed actor it handed the parent's segment to end (ray.kill returns first): the
# raylet SIGKILLs it within milliseconds; one still there after this is warned about, not waited for further
END_WAIT_S = 30
PLACEMENT = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "label_selector",
             "scheduling_strategy")  # the actor options that decide where, and whether, Ray can place an actor


def require_ray() -> None:
    """RuntimeError unless Ray is initialised: Ray's own calls (put, get, kill, .remote) would start a new local
    Ray of their own, behind the caller's back, after the caller's ray.shutdown()."""
    if not ray.is_initialized():
        raise RuntimeError("Ray was shut down after this RayForkPool started (ray.shutdown), and its actors with "
                           "it: close this pool (a round would start a new local Ray that nobody shuts down)")


def in_brief(error: BaseException) -> str:
    """A Ray error's type and first line: its text runs on to a traceback and Ray's advice."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def settle(ref: ray.ObjectRef, failed: Optional[Callable[[BaseException], None]] = None) -> ray.ObjectRef:
    """`ref`, its answer taken whenever it comes, whether or not the pool reads it: Ray logs an error answer
    that nothing read as "Unhandled error" once the ref is dropped (a ping not answered in time, a sweep nobody
    waits for, a start given up or never waited for, a round's call left by an interrupted round, a close not
    answered in time). The ref can still be read (ray.get) as any other. `failed(error)`, on a Ray thread, for an
    error answer."""
    def taken(answer: Future) -> None:
        error = answer.exception()
        if error is not None and failed is not None:
            failed(error)

    ref.future().add_done_callback(taken)
    return ref


def _ended_within(pid: Optional[int], timeout: float) -> bool:
    """Whether the process `pid` (on this node; None: never placed) has ended or ends within `timeout`: woken by
    its exit through a pidfd (Linux), else polled every 10 ms."""
    if pid is None:
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):  # no pidfd here (not Linux, or an old kernel): poll
        return _polled_end(pid, timeout)
    try:
        return bool(select.select([fd], [], [], timeout)[0])  # readable once the process has exited
    finally:
        os.close(fd)


def _polled_end(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() <= deadline:
        try:
            os.kill(pid, 0)  # no signal sent
        except (ProcessLookupError, PermissionError):  # gone (another user's: the pid was reused)
            return True
        time.sleep(0.01)
    return False


class Placed(NamedTuple):
    """Where an actor runs (its answer to where()), and when the pool saw it placed (time.monotonic())."""
    seen: float
    where: dict


class PlacedStamp:
    """When an actor was placed, stamped by Ray's callback on its where() or by the round that waits for it,
    whichever is first. Shared by the callback and the worker, and holding neither: a callback that held its
    worker would keep an abandoned pool's unplaced actor (and its handle) alive until Ray placed it."""

    def __init__(self) -> None:
        self.placed: Optional[Placed] = None

    def __call__(self, answer: Future) -> None:
        """On a Ray thread, as where() answers."""
        if answer.exception() is None:  # an actor that died unplaced: its start's outcome says so
            self.note(answer.result())

    def note(self, where: dict) -> None:
        # no lock: the first stamp wins, and a near-simultaneous second one (the round's) is also taken after the
        # placing, so either is a fair start for the engine's window
        if self.placed is None:
            self.placed = Placed(time.monotonic(), where)


class Window(NamedTuple):
    """A wait that began at `began` (time.monotonic()) and lasts the start_timeout_s it was set from, which an
    error names."""
    began: float
    timeout_s: float

    @classmethod
    def from_now(cls, timeout_s: float) -> "Window":
        return cls(time.monotonic(), timeout_s)

    def left(self) -> float:
        return max(0.0, self.began + self.timeout_s - time.monotonic())


class ActorWorker(SlotWorker):
    def __init__(self, name: str, config: str, options: dict, start_timeout_s: float, *, failed_starts: int = 0,
                 deaths: int = 0) -> None:
        super().__init__(name, failed_starts, deaths)
        require_ray()
        self.placing = Window.from_now(start_timeout_s)  # to be placed, from its creation: actors started
        # together wait together; its engine then has the same timeout from when the pool saw it placed
        self.engine: Optional[Window] = None
        self.placement = {key: options[key] for key in PLACEMENT if key in options}
        self._stamp = PlacedStamp()
        self.actor = RemoteActor.options(**options).remote()
        self.id = self.actor._actor_id.hex()  # Ray's id for it, as its errors and tools name it, from its creation
        self._placed = self.actor.where.remote()  # answered once Ray has placed it (PoolActor)
        self._placed.future().add_done_callback(self._stamp)
        self._started = settle(self.actor.start.remote(config))  # run after where(): an actor runs its calls in
        # order; settled: a start given up, or never waited for (the pool closed first), is an answer nobody reads
        self._ping = None  # a round's where(), asked as it begins (ping), answered in lost()
        self.sweep_due = True  # until its engine's close answered: ended otherwise, what it made is swept

    @property
    def placed(self) -> Optional[Placed]:
        return self._stamp.placed

    def _where(self, key: str):
        return self.placed.where[key] if self.placed else None

    # once placed (None before): its process (on its node), its node's Ray id and address
    pid = property(lambda self: self._where("pid"))
    node = property(lambda self: self._where("node_id"))
    node_ip = property(lambda self: self._where("node_ip"))

    def describe(self) -> str:
        if self.placed is None:  # never answered: not placed, or its process died starting
            return f"pool worker {self.name} (Ray actor {self.id}, never answered)"
        return f"pool worker {self.name} (Ray actor {self.id}, pid {self.pid} on node {self.node_ip} " \
               f"{self.node})"

    def _start_outcome(self) -> Optional[str]:
        """Its engine's start (SlotWorker.ensure_ready): failed (the actor killed), its engine's error, Ray's, or its
        engine still starting start_timeout_s after the pool saw the actor placed (an engine that hangs starting
        would otherwise be waited for at every round); PoolWorkerStarting while Ray has not placed it by its
        deadline (Ray keeps an actor whose resources no node has pending for ever, saying nothing): kept."""
        try:
            if self.engine is None:
                self._stamp.note(ray.get(self._placed, timeout=self.placing.left()))
                # its own window from its placing: one placed late is not cut short by the wait for its placing
                self.engine = Window(self.placed.seen, self.placing.timeout_s)
            error = ray.get(self._started, timeout=self.engine.left())
        except GetTimeoutError:
            if self.engine is None:
                raise PoolWorkerStarting(f"{self.describe()}: {self._not_placed()}") from None
            error = f"its engine was still starting {self.engine.timeout_s:g} s (start_timeout_s) after the actor " \
                    "was placed (it is killed)"
        except RayError as exc:  # the actor died (its process, or Ray could not start it)
            error = in_brief(exc)
        if error is not None:
            self.kill()
            return f": {error}"
        return None

    def rearm(self, start_timeout_s: float) -> None:
        """A round begins: an actor whose engine's window is not yet fixed takes the pool's current
        start_timeout_s, for its placing and its engine's start (a pool may wait briefly for placing, then long
        for an engine's start): its placing deadline moves to that timeout from when its placing began, shorter or
        longer; past already (kept by an earlier round, or the timeout lowered), it gets that timeout from now. One
        placed has its engine's window from its placing (_start_outcome), not from now: placed that long ago and
        still starting, it has failed."""
        if self.killed or self.engine is not None:
            return
        self.placing = Window(self.placing.began, start_timeout_s)
        if self.placed is None and self.placing.left() == 0:
            self.placing = Window.from_now(start_timeout_s)

    def _not_placed(self) -> str:
        asks = f"the resources it asks for ({self.placement})" if self.placement else \
            "the 1 CPU Ray reserves to place an actor (actor_options: none of num_cpus, num_gpus, resources, ...)"
        lost = " (it replaces an actor that died: if its node was lost, its resources went with it, and Ray places " \
               "this one once a node that has them free joins)" if self.deaths else ""
        return (f"not placed within {self.placing.timeout_s:g} s (start_timeout_s): Ray has no node with {asks} "
                f"free{lost}, or is still setting up its runtime_env")

    def died(self, error: BaseException, when: str = "") -> PoolWorkerDied:
        """The round's failure for this actor: dead, or unavailable (Ray lost touch with it; the pool kills it);
        `when` (" between rounds", say) follows the verb."""
        if isinstance(error, ActorUnavailableError):
            return PoolWorkerDied(f"{self.describe()} became unavailable{when} (killed, not waited for): "
                                  f"{in_brief(error)}")
        return PoolWorkerDied(f"{self.describe()} died{when}: {in_brief(error)}")

    def ping(self, answers: Window, waited: bool = False) -> None:
        """A round begins: ask a started actor where it is, without waiting (every actor's at once), its answer
        waited for until `answers` ends (the round's pings share it); `waited`: asked again, after the round waited
        for a start (a death seen then is described so). Started: seen so by a round, or its start answered that
        its engine started (a replacement no round has seen yet: dead since, it would fail the round once the parent
        is read, Ray keeping its start's answer)."""
        asked = not self.killed and (self.ready or self._started_well())
        when = " while this round waited for a start" if waited else " between rounds"
        self._ping = (settle(self.actor.where.remote()), answers, when) if asked else None

    def _started_well(self) -> bool:
        """Its start has answered, without waiting, that its engine started (ensure_ready takes it as such)."""
        try:
            # where() answered before start(): stamped here too, so that a dead one is described and swept even
            # if Ray's callback (PlacedStamp) has not run yet
            self._stamp.note(ray.get(self._placed, timeout=0))
            return ray.get(self._started, timeout=0) is None
        except RayError:  # not answered yet (GetTimeoutError), or died starting: ensure_ready tells
            return False

    def lost(self) -> Optional[PoolWorkerDied]:
        """SlotWorker.lost: Ray's answer to the round's ping is the actor's death (or that it is unavailable): it
        is killed (an unavailable one would come back beside its replacement)."""
        ping, self._ping = self._ping, None
        if ping is None or self.killed:
            return None
        try:
            ray.get(ping[0], timeout=ping[1].left())
        except RayActorError as exc:
            self.kill()
            return self.died(exc, ping[2])
        except RayError:  # not answered in time, or a call Ray could not run: the round's own call tells
            pass
        return None

    def kill(self) -> None:
        """End its actor (Ray carries it out shortly after), and sweep what its engine left in /dev/shm on its node
        unless its close answered (leftovers.sweep: it waits for the actor's processes to end)."""
        self.killed = True
        if ray.is_initialized():  # else its actor ended with Ray, and ray.kill would start a new one
            ray.kill(self.actor, no_restart=True)
            if self.sweep_due and self.node is not None:  # placed: its process may have made something
                self._sweep()
        self.sweep_due = False

    def wait_ended(self, timeout: float = END_WAIT_S) -> None:
        """Once killed: wait until its process, on this process's node (it was handed the parent's segment), has
        ended, so that it no longer reads the segment the parent's next capture overwrites; warned if it has not
        within `timeout` (its answer, read or not, is never the round's)."""
        if not _ended_within(self.pid, timeout):
            leftovers.log.warning("thaw_ray: %s, killed, is still running after %g s: it may read the parent's "
                                  "segment while the next capture overwrites it", self.describe(), timeout)

    def _sweep(self) -> None:
        """Submit the sweep on its node (it runs without its caller); a failed submission (a node Ray no longer
        knows, the GCS unreachable) or sweep is warned, never the kill's failure: the node's next actor sweeps it."""
        actor = self.describe()

        def failed(error: BaseException) -> None:
            # a node Ray lost (the actor's with it): nothing can run there, and its /dev/shm went with it
            level = logging.INFO if isinstance(error, TaskUnschedulableError) else logging.WARNING
            leftovers.log.log(level, "thaw_ray: sweeping what %s left on its node: %s", actor, in_brief(error))

        try:
            strategy = NodeAffinitySchedulingStrategy(self.node, soft=False)
            settle(remote_sweep.options(scheduling_strategy=strategy).remote(self.id), failed)  # run, not waited for
        except Exception as exc:
            failed(exc)

    def closed(self, call: ray.ObjectRef) -> None:
        """Its close answered `call`: unless that raised, its engine closed, leaving nothing to sweep."""
        try:
            ray.get(call, timeout=0)
        except RayError:
            return
        self.sweep_due = False
