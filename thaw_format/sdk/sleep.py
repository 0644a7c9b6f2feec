"""Durable sleep and wake, on any contract engine: the engine goes to a file and stops; later, in this process or
another, an equal engine starts from that file and carries on.

    snapshot_id = sleep(engine, "engine.thaw")        # captured, saved (fsynced), then the engine is closed
    awake = wake("engine.thaw")                       # verified, an engine started and restored: Awake
    done = awake.engine.finish(awake.resumed)         # the requests in flight when it slept, run to the end

`sleep` captures the KV pages with their token ids and the requests in flight (weights by digest only: the
woken engine loads them from its model), records the engine's launch spec in the snapshot's metadata (its
factory, and of its arguments only those the adapter's `launch_options` allows: thaw_format.sdk.launch), and
saves atomically; only once the file is written is the engine closed. Anything failing before that leaves the
engine open and serving as it was, and so does an engine started with an argument the file may not hold (a
secret such as vLLM's hf_token or SGLang's api_key, a value that is not JSON-able): sleep refuses it unless the
caller names that argument in `given_at_wake`, which records it by name only, and `wake` then starts no engine
unless its `overrides` set it. `wake` reads and verifies the whole file before it starts any engine, starts
one from the recorded launch spec (only a factory of thaw's own adapters, thaw_format.sdk.factories, unless the
caller names one, and only with the options its adapter allows, unless the caller overrides them), and closes
it again if it refuses the snapshot. A record naming arguments given at wake is kept under a key of its own
(GIVEN_AT_WAKE_KEY), which thaw versions before given_at_wake do not read: they refuse the file rather than start
an engine without those arguments.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional, Union

from ..errors import IncompatibleSnapshotError
from ..reader import load
from ..snapshot import Lineage, Snapshot
from ..writer import save
from .contract import Engine, LaunchSpec, Resumed, Unsupported, lineage_now, pending_requests, require
from .factories import chosen_factory, registered_factory
from .launch import RefusedLaunch, checked_launch_spec, launch_options, recordable, start_arguments

LAUNCH_KEY = "thaw.launch_spec"  # snapshot.metadata[LAUNCH_KEY] = {"factory": "module:attribute", "kwargs": {...},
#                                                               "given_at_wake": [names]} (the last may be absent)
# A record with given_at_wake names goes under this key instead: thaw before given_at_wake reads LAUNCH_KEY only,
# and would start an engine without those arguments; finding no LAUNCH_KEY it refuses ("not written by sleep").
# Fail closed: a record an older reader cannot honour is one it does not see. Readers take either key, not both.
GIVEN_AT_WAKE_KEY = "thaw.launch_spec.given_at_wake"


@dataclass
class Awake:
    """A woken engine and the requests it continues (run them with `engine.finish(resumed)`, or step it)."""

    engine: Engine
    resumed: list[Resumed]


class SleptNotClosed(RuntimeError):
    """The snapshot file is complete (saved as `sleep` was asked), but closing the engine failed (the cause
    says why)."""

    def __init__(self, snapshot_id: str, path) -> None:
        super().__init__(f"{path} is complete (snapshot {snapshot_id}), but the engine failed to close; it may still "
                         "hold its memory and processes")
        self.snapshot_id = snapshot_id


def sleep(engine: Engine, path, *, given_at_wake: Collection[str] = (), durable: bool = True, progress=None) -> str:
    """Save `engine` to `path` and close it; returns the snapshot id. `durable=False` skips the fsyncs (still
    atomic). If the capture or the save fails, the engine is left open and serving, and the error raised; if
    only closing it fails, SleptNotClosed (with the snapshot id: the file is complete).

    The file records the engine's launch arguments its adapter's `launch_options` lists. One it was started with
    that is not listed (a secret, an option naming code or an endpoint, a value that is not JSON-able) cannot be
    recorded, and wake would start a different engine without it: sleep refuses (Unsupported, naming each; the
    engine untouched, nothing written) unless `given_at_wake` names it. Names in `given_at_wake` (listed ones
    too: a model directory that will move) are written by name only, and wake refuses to start an engine unless
    its `overrides` set each. Sleep knows the arguments the adapter's `launch_spec()` reports only: for vLLM,
    those passed through thaw_vllm.engine_args(...); one given to vllm.LLM beside them is neither recorded nor
    refused.

    An in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) is closed by vLLM's shutdown, which also tears
    down process-wide state that other in-process vLLM engines still use: sleep those last."""
    spec = checked_launch_spec(engine, "sleep")  # first: an engine that cannot say how to start again is untouched
    given_at_wake = _names(given_at_wake)
    kwargs = recordable(type(engine), spec, given_at_wake)  # the adapter's launch options only: no secret is written
    snapshot = engine.capture(include_weights=False)
    in_flight = pending_requests(snapshot)
    if in_flight and "mid_stream" not in type(engine).capabilities():
        raise Unsupported(f"{type(engine).name}: cannot sleep with {len(in_flight)} requests in flight (the adapter "
                          "does not support 'mid_stream'): finish or abort them first; the engine is untouched")
    if any(r.sampling.temperature > 0 and (r.sampling.seed is not None or r.rng_state is not None) for r in in_flight):
        require(engine, "mid_stream_seeded")  # a seeded request must resume with its generator where it was
    key = GIVEN_AT_WAKE_KEY if given_at_wake else LAUNCH_KEY  # one an older wake would ignore: hidden from it
    snapshot.metadata[key] = {"factory": spec.factory, "kwargs": kwargs, "given_at_wake": given_at_wake}
    snapshot.lineage = snapshot.lineage or Lineage(created=lineage_now())  # an engine's own keeps its parent
    snapshot.lineage.label = snapshot.lineage.label or "sleep"  # what `thaw log` shows
    save(snapshot, path, durable=durable, progress=progress)
    try:
        engine.close()
    except Exception as exc:
        raise SleptNotClosed(snapshot.id, path) from exc
    return snapshot.id


def wake(path, *, factory: Union[str, Callable, None] = None, overrides: Optional[Mapping] = None,
         progress=None) -> Awake:
    """Start an engine from the file `sleep` wrote and restore it. The file is verified first (a damaged one
    raises CorruptSnapshotError and starts nothing). `factory` replaces the recorded one (a callable or a
    "module:attribute" path: the caller's choice); `overrides` replace or add arguments. The file holds only the
    options the adapter lets a file set (its `launch_options`); pass the engine's other arguments again here
    (secrets such as vLLM's hf_token or SGLang's api_key, anything not on that list), and a model directory that
    moved. A file setting another option, or a model that is not a local directory, is refused (RefusedLaunch)
    unless `overrides` sets it, and so is one whose sleep was given arguments at wake (`given_at_wake`) that
    `overrides` does not set. An engine that refuses the snapshot (IncompatibleSnapshotError) is closed, and the
    error raised."""
    start = None if factory is None else chosen_factory(factory)
    snapshot = load(path, progress=progress)  # every chunk checked before any engine starts
    recorded = launch_record(snapshot)  # its shape checked before any factory is imported
    if start is None and recorded is None:
        raise IncompatibleSnapshotError(f"{path}: metadata has no {LAUNCH_KEY!r} (not written by sleep): pass "
                                        "factory= and overrides= to say which engine to start")
    kwargs = recorded.kwargs if recorded else {}
    missing = sorted(recorded.unrecorded - set(overrides or {})) if recorded else []
    if missing:
        raise RefusedLaunch(f"{path}: the engine slept with {_listed(missing)} given at wake (sleep's "
                            "given_at_wake): the file does not hold them; pass them in overrides")
    start_arguments(kwargs, overrides, None)  # plain values, before an adapter (vLLM, torch...) is imported
    if start is None:
        start = registered_factory(recorded.factory)
    engine = start(**start_arguments(kwargs, overrides, launch_options(start)))  # the adapter's own list
    try:
        resumed = engine.restore(snapshot)  # checks first, by contract
    except BaseException as error:
        try:
            engine.close()
        except Exception as close_error:
            error.add_note(f"closing the engine that refused it failed too: {type(close_error).__name__}: "
                           f"{close_error}")
        raise
    return Awake(engine, resumed)


def launch_record(snapshot: Snapshot) -> Optional[LaunchSpec]:
    """The launch spec `sleep` recorded, checked for shape (it is the file's word); None if there is none."""
    keys = [key for key in (LAUNCH_KEY, GIVEN_AT_WAKE_KEY) if key in snapshot.metadata]
    if len(keys) > 1:
        raise IncompatibleSnapshotError(f"metadata holds both {LAUNCH_KEY!r} and {GIVEN_AT_WAKE_KEY!r}: sleep writes "
                                        "one launch record")
    if not keys:
        return None
    record = snapshot.metadata[keys[0]]
    given = record.get("given_at_wake", []) if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("factory"), str)
            and isinstance(record.get("kwargs"), dict) and all(isinstance(k, str) for k in record["kwargs"])
            and isinstance(given, list) and all(isinstance(name, str) for name in given)):
        raise IncompatibleSnapshotError(f"metadata {keys[0]!r} must be {{'factory': str, 'kwargs': {{str: ...}}, "
                                        f"'given_at_wake': [str]}}, not {reprlib.repr(record)}")
    return LaunchSpec(record["factory"], record["kwargs"], frozenset(given))


def _listed(names: list[str], most: int = 10) -> str:
    """A file's names for a message: each repr'd and cut (reprlib), the first `most` only."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(map(reprlib.repr, names[:most])) + more


def _names(given_at_wake: Collection[str]) -> list[str]:
    names = given_at_wake if isinstance(given_at_wake, str) else list(given_at_wake)  # a generator: read once
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"given_at_wake is a collection of argument names (str), not {given_at_wake!r}")
    return sorted(set(names))
