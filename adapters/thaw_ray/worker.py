"""One RayForkPool worker slot's actor, as thaw_format.sdk.pool_slots needs a worker: started at once, waited
for at each round until it has started (`ensure_ready`, `rearm`), named with its actor id, process id and node
in every error."""

from __future__ import annotations

import time
from typing import Optional

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayError

from thaw_format.sdk.fork_round import PoolWorkerDied
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
        self.actor = RemoteActor.options(**options).remote(config)
        self._ready = self.actor.ready.remote()
        self.pid: Optional[int] = None
        self.actor_id: Optional[str] = None  # Ray's id for it, once it answers ready()
        self.node_id: Optional[str] = None  # its node's Ray id, and that node's address, once it answers ready()
        self.node_ip: Optional[str] = None
        self.ready = False
        self.killed = False  # by an interrupted round: replaced by the next round that needs it

    def describe(self) -> str:
        if self.actor_id is None:  # never answered: not placed, or its process died starting
            return f"pool worker {self.name} (a Ray actor that never answered)"
        return f"pool worker {self.name} (Ray actor {self.actor_id}, pid {self.pid} on node {self.node_ip} " \
               f"{self.node_id})"

    def ensure_ready(self) -> None:
        """Wait until its engine has started; PoolWorkerDied naming the worker and its engine's error if it
        failed (then, and on every later call: the actor is gone). One not started by its deadline is not a failed
        start: PoolWorkerDied says so, and the actor is kept, still asking Ray for a node (one that joins later
        places it); `rearm` gives it start_timeout_s more at the next round."""
        if self.ready:
            return
        if self.start_error is None:
            try:
                reply = ray.get(self._ready, timeout=max(0.0, self.deadline - time.monotonic()))
            except GetTimeoutError:  # pending for ever where no node has what it asks for: Ray waits, silently
                raise PoolWorkerDied(f"{self.describe()}: {self._not_started()}") from None
            except RayError as exc:  # the actor died (its process, or Ray could not start it)
                reply = {"error": in_brief(exc)}
            self.pid, self.actor_id = reply.get("pid"), reply.get("actor_id")
            self.node_id, self.node_ip = reply.get("node_id"), reply.get("node_ip")
            if "error" not in reply:
                self.ready, self.failed_starts = True, 0
                return
            self.failed_starts += 1
            self.start_error = f"{self.describe()} failed to start: {reply['error']}"
            self.kill()
        raise PoolWorkerDied(self.start_error)

    def rearm(self, start_timeout_s: float) -> None:
        """A round begins: an actor still starting after its deadline (kept by an earlier round) gets
        start_timeout_s more, from now."""
        if not self.ready and self.start_error is None and time.monotonic() >= self.deadline:
            self.start_timeout_s, self.deadline = start_timeout_s, time.monotonic() + start_timeout_s

    def _not_started(self) -> str:
        asks = f"the resources it asks for ({self.placement})" if self.placement else \
            "the 1 CPU Ray reserves to place an actor (actor_options: none of num_cpus, num_gpus, resources, ...)"
        lost = " (it replaces an actor that died: if its node was lost, its resources went with it, and Ray places " \
               "this one once a node that has them free joins)" if self.deaths else ""
        return (f"not started within {self.start_timeout_s:g} s (start_timeout_s): either Ray has no node with "
                f"{asks} free{lost}, or its engine is slower to start than that")

    def died(self, error: BaseException) -> PoolWorkerDied:
        """The round's failure for this actor: dead, or unavailable (Ray lost touch with it; the pool kills it)."""
        if isinstance(error, ActorUnavailableError):
            return PoolWorkerDied(f"{self.describe()} became unavailable (killed, not waited for): {in_brief(error)}")
        return PoolWorkerDied(f"{self.describe()} died: {in_brief(error)}")

    def kill(self) -> None:
        if ray.is_initialized():  # else its actor ended with Ray, and ray.kill would start a new one
            ray.kill(self.actor, no_restart=True)
        self.killed = True
