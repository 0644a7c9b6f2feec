"""One RayForkPool worker slot's actor, as thaw_format.sdk.pool_slots needs a worker: started at once, waited
for at its first round (`ensure_ready`), named with its actor id and process id in every error."""

from __future__ import annotations

from typing import Optional

import ray
from ray.exceptions import RayError

from thaw_format.sdk.fork_round import PoolWorkerDied
from thaw_format.sdk.pool_slots import SlotWorker

from .actor import PoolActor

RemoteActor = ray.remote(PoolActor)
CLOSE_TIMEOUT_S = 120  # how long close() waits for an engine to close before it kills its actor


def in_brief(error: BaseException) -> str:
    """A Ray error's type and first line: its text runs on to a traceback and Ray's advice."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class ActorWorker(SlotWorker):
    def __init__(self, name: str, config: str, options: dict, *, failed_starts: int = 0, deaths: int = 0) -> None:
        super().__init__(name, failed_starts, deaths)
        self.actor = RemoteActor.options(**options).remote(config)
        self._ready = self.actor.ready.remote()
        self.pid: Optional[int] = None
        self.ready = False
        self.killed = False  # pool_slots' word for a worker an interrupted round left: never so here

    def describe(self) -> str:
        pid = f", pid {self.pid}" if self.pid is not None else ""
        return f"pool worker {self.name} (Ray actor {self.actor._actor_id.hex()}{pid})"

    def ensure_ready(self) -> None:
        """Wait until its engine has started; PoolWorkerDied naming the worker and its engine's error if it
        failed (then, and on every later call: the actor is gone)."""
        if self.ready:
            return
        if self.start_error is None:
            try:
                reply = ray.get(self._ready)
            except RayError as exc:  # the actor died (its process, or Ray could not start it)
                reply = {"error": in_brief(exc)}
            self.pid = reply.get("pid")
            if "error" not in reply:
                self.ready, self.failed_starts = True, 0
                return
            self.failed_starts += 1
            self.start_error = f"{self.describe()} failed to start: {reply['error']}"
            self.kill()
        raise PoolWorkerDied(self.start_error)

    def died(self, error: BaseException) -> PoolWorkerDied:
        return PoolWorkerDied(f"{self.describe()} died: {in_brief(error)}")

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)

    def stop(self) -> None:
        """Close its engine, then end its actor (killed if it does not close in time, or never started)."""
        try:
            if self.ready:
                ray.get(self.actor.close.remote(), timeout=CLOSE_TIMEOUT_S)
        except RayError:  # dead already, or stuck (GetTimeoutError): killed below
            pass
        finally:
            self.kill()
