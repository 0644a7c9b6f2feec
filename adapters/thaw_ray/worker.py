"""One RayForkPool worker slot's actor, as thaw_format.sdk.pool_slots needs a worker: started at once, waited
for at each round until it has started (`ensure_ready`, `rearm`), named with its actor id, process id and node
in every error. Placed and starting its engine past its deadline, it has failed to start, and is killed; not
placed yet, it is still starting (PoolWorkerStarting), and kept."""

from __future__ import annotations

import time
from typing import Optional

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayError

from thaw_format.sdk.fork_round import PoolWorkerDied, PoolWorkerStarting
from thaw_format.sdk.pool_slots import SlotWorker

from .actor import PoolActor

RemoteActor = ray.remote(PoolActor)
START_TIMEOUT_S = 600  # RayForkPool's default wait for an actor's engine to start (placing it included)
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


class ActorWorker(SlotWorker):
    def __init__(self, name: str, config: str, options: dict, start_timeout_s: float, *, failed_starts: int = 0,
                 deaths: int = 0) -> None:
        super().__init__(name, failed_starts, deaths)
        require_ray()
        self.start_timeout_s = start_timeout_s
        self.deadline = time.monotonic() + start_timeout_s  # from its creation: actors started together wait together
        self.placement = {key: options[key] for key in PLACEMENT if key in options}
        self.actor = RemoteActor.options(**options).remote()
        self._placed = self.actor.where.remote()  # answered once Ray has placed it (PoolActor)
        self._started = self.actor.start.remote(config)  # run after where(): an actor runs its calls in order
        self.actor_id: Optional[str] = None  # Ray's id for it, its node's Ray id (`node`) and that node's address,
        self.node_ip: Optional[str] = None  # once it answers where()
        self.killed = False  # by an interrupted round: replaced by the next round that needs it

    def describe(self) -> str:
        if self.actor_id is None:  # never answered: not placed, or its process died starting
            return f"pool worker {self.name} (a Ray actor that never answered)"
        return f"pool worker {self.name} (Ray actor {self.actor_id}, pid {self.pid} on node {self.node_ip} " \
               f"{self.node})"

    def ensure_ready(self) -> None:
        """Wait until its engine has started, until its deadline at most; PoolWorkerDied naming the worker (and its
        node, once placed) if it failed to start: its engine's error, Ray's, or, placed, its engine still starting
        at the deadline (killed: an engine that hangs starting would otherwise be waited for at every round). Then
        the actor is gone, and every later call raises the same. One Ray has not placed by its deadline has not
        failed: PoolWorkerStarting, and the actor is kept, still asking Ray for a node (one that joins later places
        it); `rearm` gives it start_timeout_s more at the next round."""
        if self.ready:
            return
        if self.start_error is None:
            error = self._start_outcome()
            if error is None:
                self.ready, self.failed_starts = True, 0
                return
            self.failed_starts += 1
            self.start_error = f"{self.describe()} failed to start: {error}"
            self.kill()
        raise PoolWorkerDied(self.start_error)

    def _start_outcome(self) -> Optional[str]:
        """None once its engine has started, or how its start failed; PoolWorkerStarting while Ray has not placed
        it by its deadline (Ray keeps an actor whose resources no node has pending for ever, saying nothing)."""
        try:
            if self.actor_id is None:
                placed = ray.get(self._placed, timeout=self._left())
                self.pid, self.actor_id, self.node, self.node_ip = (placed["pid"], placed["actor_id"],
                                                                    placed["node_id"], placed["node_ip"])
            return ray.get(self._started, timeout=self._left())
        except GetTimeoutError:
            if self.actor_id is None:
                raise PoolWorkerStarting(f"{self.describe()}: {self._not_placed()}") from None
            return f"its engine was still starting after start_timeout_s ({self.start_timeout_s:g} s; the actor is " \
                   "killed)"
        except RayError as exc:  # the actor died (its process, or Ray could not start it)
            return in_brief(exc)

    def _left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def rearm(self, start_timeout_s: float) -> None:
        """A round begins: an actor Ray had not placed by its deadline (kept by an earlier round; one placed by then
        was given up) gets start_timeout_s more, from now, placing it and starting its engine included."""
        if not self.ready and self.start_error is None and time.monotonic() >= self.deadline:
            self.start_timeout_s, self.deadline = start_timeout_s, time.monotonic() + start_timeout_s

    def _not_placed(self) -> str:
        asks = f"the resources it asks for ({self.placement})" if self.placement else \
            "the 1 CPU Ray reserves to place an actor (actor_options: none of num_cpus, num_gpus, resources, ...)"
        lost = " (it replaces an actor that died: if its node was lost, its resources went with it, and Ray places " \
               "this one once a node that has them free joins)" if self.deaths else ""
        return (f"not placed within {self.start_timeout_s:g} s (start_timeout_s): Ray has no node with {asks} "
                f"free{lost}, or is still setting up its runtime_env")

    def died(self, error: BaseException) -> PoolWorkerDied:
        """The round's failure for this actor: dead, or unavailable (Ray lost touch with it; the pool kills it)."""
        if isinstance(error, ActorUnavailableError):
            return PoolWorkerDied(f"{self.describe()} became unavailable (killed, not waited for): {in_brief(error)}")
        return PoolWorkerDied(f"{self.describe()} died: {in_brief(error)}")

    def kill(self) -> None:
        if ray.is_initialized():  # else its actor ended with Ray, and ray.kill would start a new one
            ray.kill(self.actor, no_restart=True)
        self.killed = True
