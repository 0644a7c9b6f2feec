"""A RayForkPool worker: one warm engine in a Ray actor, started once from a launch spec, that restores each
round's snapshot and continues its suffix.

A round hands an actor on the parent's node the parent's segment ("shm://name#nbytes"), which it reads in place
(restore_source, as a ForkPool worker does), and one on another node the object of the round's one ray.put (the
snapshot's own bytes as one numpy uint8 array: read in place, no copy, by an actor on the node that holds it), never
a pickled Snapshot. Trust: Ray pickles the array's wrapper, each round's prompt and params, and every reply, so
whoever can write to the cluster's object store (or reach its nodes) can already run code in these actors and in
the driver: the Ray cluster must be trusted like the code it runs. What the check here (every chunk, before the
engine is touched) guards is integrity, not authenticity: bytes damaged on their way (a bit flip, a transfer cut
short between nodes) are refused, with the engine as it was. The replies are those of thaw_format.sdk.pool_worker
({"generation": ..., "restore_s": ..., "generate_s": ..., "via": "segment" or "object"} or {"error": ...}), and
{"corrupt": true} beside the error of a snapshot that failed its check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Optional, Union

import numpy
import ray

from thaw_format import CorruptSnapshotError, loads
from thaw_format.sdk.engine_process import stop_resource_tracker
from thaw_format.sdk.factories import resolve
from thaw_format.sdk.lent import parse
from thaw_format.sdk.shared import restore_source
from thaw_format.snapshot import SamplingParams

from . import leftovers
from .capture import OBJECT, SEGMENT

# While its engine starts, an actor writes down what it holds this often (a record reads /dev/shm, and walks /proc
# only when /dev/shm changed): killed then (its start hung and given up, SIGKILLed), it has left at most the files
# made in the last RECORD_EVERY_S unrecorded, not the whole start's (vLLM's engine core makes its segments early)
RECORD_EVERY_S = 1.0


class PoolActor:
    """Created empty, its engine started by `start`: Ray runs __init__ once it has placed the actor on a node and
    started its process, so `where()`, called first, answers as soon as the actor is placed, and the pool can tell
    an actor Ray has not placed (kept: a node may join) from one placed whose engine hangs starting (given up)."""

    def __init__(self) -> None:
        self.engine = None
        # its Ray id, None outside an actor (a PoolActor run in the caller's process, as a test does): an actor
        # writes down what its engine holds in /dev/shm, for the pool to sweep if it ends unclosed (leftovers);
        # what is there before its engine starts is left out of every record
        self.id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        self.recorder = leftovers.Recorder.made(self.id) if self.id is not None else None

    def where(self) -> dict:
        """{"pid": the actor's process id, "node_id": its node's Ray id (hex), "node_ip": that node's address}. A pid
        names a process on its own node only."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}

    def start(self, config: str) -> Optional[str]:
        """Start its engine from a launch spec's JSON ({"factory": ..., "kwargs": ...}): None once started, or how
        it failed (the pool's to report: raised here, Ray's message would leave the engine's error out)."""
        if self.recorder is not None:  # what actors before it on this node left unswept: never its start's failure
            try:
                leftovers.sweep_ended()
            except Exception as exc:
                leftovers.warn_once(f"sweeping what ended actors left: {type(exc).__name__}: {exc}")
        started, recording = threading.Event(), None
        if self.recorder is not None:
            recording = threading.Thread(target=self._record_until, args=(started,), name="thaw-ray-record",
                                         daemon=True)
            recording.start()
        try:
            config = json.loads(config)
            self.engine = resolve(config["factory"])(**config["kwargs"])
        except Exception as exc:
            return f"starting the pool engine: {type(exc).__name__}: {exc}"
        finally:  # a failed start too: its engine may have started processes before it failed
            started.set()
            if recording is not None:
                recording.join()  # one record at a time: a Recorder is not shared between threads
            self._record()
        return None

    def _record_until(self, started: threading.Event) -> None:
        """Beside its engine's start (a thread of its own): a record every RECORD_EVERY_S until `started` is set."""
        while not started.wait(RECORD_EVERY_S):
            self._record()

    def _record(self) -> None:
        if self.recorder is not None:
            self.recorder.record()  # best effort: never a round's failure

    def run_round(self, kv: Union[str, numpy.ndarray], prompt: list[int], params: dict) -> dict:
        """Restore the round's KV, `kv`: the parent's segment's source (this actor on the parent's node) or the
        round's object, then generate `prompt`."""
        try:
            return self._round(kv, prompt, params)
        finally:  # after the round's times: what its engine made in /dev/shm meanwhile
            self._record()

    def _round(self, kv: Union[str, numpy.ndarray], prompt: list[int], params: dict) -> dict:
        start = time.perf_counter()
        try:
            self._restore(kv)
            restored = time.perf_counter()
            generation = self.engine.generate(prompt, SamplingParams(**params))
        except CorruptSnapshotError as exc:  # the check's, or the engine's own before it changes anything
            return {"error": f"CorruptSnapshotError: {exc}; its engine is untouched", "corrupt": True}
        except Exception as exc:  # reported to the pool, which raises it
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"generation": dataclasses.asdict(generation), "restore_s": restored - start,
                "generate_s": time.perf_counter() - restored, "via": SEGMENT if isinstance(kv, str) else OBJECT}

    def _restore(self, kv: Union[str, numpy.ndarray]) -> None:
        """Every chunk checked before the engine is touched, then restored."""
        if isinstance(kv, numpy.ndarray):
            checked = loads(kv, copy=False, verify=True)
            self.engine.restore(checked)
            del checked  # its tensors view the object: let Ray free it once the round is over
            return
        if self.recorder is not None:  # the parent's, not its engine's: never recorded, so never swept
            self.recorder.leave_out(parse(kv)[0])
        try:
            restore_source(self.engine, kv)  # verified here, in place, as the segment is read
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc}; this actor runs on the parent's Ray node but cannot open its segment (a /dev/shm of "
                f"its own, as in a container?): start the pool with shared_memory=False to send every actor the "
                f"round's KV through Ray's object store") from None

    def generate(self, prompt: list[int], params: dict) -> dict:
        """The engine's own generate, outside any round: what it holds shows in its cached-token count."""
        return dataclasses.asdict(self.engine.generate(prompt, SamplingParams(**params)))

    def close(self) -> None:
        """Close its engine, then, in a Ray actor's process, end multiprocessing's resource tracker
        (engine_process.stop_resource_tracker): the raylet kills it with the actor, and the segment vLLM's engine
        core leaves it at shutdown (160 MiB) stayed in /dev/shm. Outside an actor (a PoolActor run in the caller's
        process, as a test does) the process goes on, and its tracker with it. An engine.close() that raises skips
        it: the engine's processes may still hold the tracker's pipe, and the wait would last until the pool kills
        the actor anyway. Its engine closed, it left nothing to sweep: its manifest goes."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None  # closed: a second close does nothing
            if self.id is not None:
                stop_resource_tracker()
                leftovers.forget(self.id)
