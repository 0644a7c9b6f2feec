"""ThawEngine: an SGLang Engine that can be captured, restored and forked, and the functions over it."""

from __future__ import annotations

import os
import warnings
from typing import Sequence

from sglang.srt.entrypoints.engine import Engine
import thaw_format
from thaw_format import Snapshot
from thaw_format.sdk import DEFAULT_PAGE_SIZE, Resumed, pending_requests
from thaw_format.sdk import lent
from thaw_format.sdk.shared import checked_by_caller, release

from . import _internals, rpc, scheduler_ext, transport
from .requests import resume_arguments

class ThawEngine(Engine):
    """`sglang.Engine` with the same arguments, whose scheduler process carries thaw's methods.

    `ThawEngine(model_path=..., **kwargs)`, or as SGLang's engine class is named beside it,
    `ThawEngine(sglang.Engine, model_path, **kwargs)`.

    Unlike a plain sglang.Engine, its scheduler sleeps while idle or paused (`sleep_on_idle=True` unless given,
    or unless a whole `server_args` is):
    a fork's family or a pool holds several engines on one machine, and each idle SGLang scheduler otherwise
    spins a whole CPU (README.md: measured cost and gain).
    """

    run_scheduler_process_func = staticmethod(scheduler_ext.run_scheduler_process)

    def __init__(self, *args, **kwargs):
        if args and not isinstance(args[0], (str, os.PathLike)):  # the engine class named first
            import sglang

            if args[0] is not Engine and args[0] is not sglang.Engine:  # sglang.Engine: SGLang's lazy import of it
                raise TypeError(f"ThawEngine({getattr(args[0], '__name__', args[0])!r}, ...): thaw extends "
                                "sglang.Engine only")
            args = args[1:]
        if len(args) > 1 or (args and "model_path" in kwargs):
            raise TypeError("ThawEngine takes the model path as its one positional argument (or model_path=)")
        if args:
            kwargs["model_path"] = str(args[0])
        if "server_args" not in kwargs:  # a ServerArgs given whole is SGLang's as given
            kwargs.setdefault("sleep_on_idle", True)  # in the launch spec too: a pool's workers and forks sleep alike
        self.engine_kwargs = dict(kwargs)
        super().__init__(**kwargs)

    def shutdown(self) -> None:
        """Shut down this engine alone, leaving the other engines of this process (a fork's family) running.

        The scheduler first unlinks its shared-memory segments: SGLang ends it with SIGKILL, and the segments,
        registered with the resource tracker this process shares with it, would otherwise be unlinked by that
        tracker only at this process's exit, with a "leaked shared_memory objects" warning."""
        try:
            # SGLang's RPC waits without a timeout: a dead scheduler (crashed, OOM-killed) would hang exit here
            if getattr(self, "send_to_rpc", None) is not None and _internals.engine_processes_alive(self):
                rpc.call(self, "thaw_release")
        finally:
            _internals.stop_engine_processes(self)

    def capture(self, path=None, **options) -> Snapshot:
        return capture(self, path, **options)

    def restore(self, snapshot) -> list[Resumed]:
        return restore(self, snapshot)

    def resume(self, snapshot: Snapshot) -> list[dict]:
        return resume(self, snapshot)

    def pause(self) -> None:
        """Run no more batches until `unpause`; running requests stay in place with their KV.

        A capture of a paused engine holds each running request exactly where generation stopped, and the
        engine adds nothing after it: to move a request, pause, capture, restore and resume it elsewhere.
        """
        rpc.call(self, "thaw_pause", paused=True)

    def unpause(self) -> None:
        rpc.call(self, "thaw_pause", paused=False)

    def abort(self, rid: str) -> None:
        """SGLang's own abort of a request (what its HTTP server sends when a client leaves): the scheduler drops it
        from its waiting queue, or finishes it at its next batch, freeing its slots as for any finished request.
        Its stream then ends with finish_reason type "abort". SGLang matches the rid as a prefix of request ids."""
        async def send() -> None:  # on the engine's event loop, as its own calls run: the manager asks for it
            self.tokenizer_manager.abort_request(rid=rid)

        self.loop.run_until_complete(send())

    def run_batches(self, batches: int = 1) -> None:
        """Let the engine run exactly `batches` more batches (a prefill, or one decode step of every running
        request), then pause by itself; returns at once, and the batches' tokens arrive as usual.

        To step a streamed request token by token: `run_batches(1)` before sending it (its prefill gives the
        first token), and again before reading each next token. However slow the caller, nothing runs further.
        """
        if batches < 1:
            raise ValueError(f"run_batches needs at least one batch, got {batches}")
        rpc.call(self, "thaw_run_batches", batches=batches)

    def leak_warnings(self) -> int:
        """How many times SGLang's idle pool-leak check has reported a leak in this engine (0 when sound)."""
        return rpc.call(self, "thaw_leak_warnings")

    def free_slots(self) -> int:
        """KV slots no request holds (free, or cached and evictable): back where they were once requests end."""
        return rpc.call(self, "thaw_free_slots")

    def fork(self, n: int, *, include_weights: bool = True, weights: bool | None = None,
             **engine_overrides) -> list["ThawEngine"]:
        """Start `n` new engines with this engine's arguments, each holding this engine's state.

        The state is captured once into shared memory; the children are started one after another, each
        restoring from there, and shut down again if any of them cannot be started or restored.
        (`weights=` is the former name of `include_weights=`.)
        """
        include_weights = _include_weights(include_weights, weights)
        source = rpc.call(self, "thaw_capture", page_size=snapshot_page_size(self), weights=include_weights,
                          into="own")
        children: list[ThawEngine] = []
        try:
            for _ in range(n):
                children.append(ThawEngine(**{**self.engine_kwargs, **engine_overrides}))
                children[-1].restore(source)
        except BaseException:
            for child in children:
                child.shutdown()
            raise
        finally:
            release(source)  # every child has restored it (read in place: their mappings outlive the name)
        return children


def _include_weights(include_weights: bool, weights: bool | None) -> bool:
    if weights is None:
        return include_weights
    warnings.warn("thaw_sglang: weights= is now include_weights=, as on every engine", DeprecationWarning, stacklevel=3)
    return weights


def snapshot_page_size(engine: ThawEngine) -> int:
    """Tokens per page of this engine's captures: 32 (DEFAULT_PAGE_SIZE), or the least multiple of SGLang's own
    page size at least as long. SGLang caches whole pages of its own only, so every page boundary of a capture
    is one of SGLang's, and a caller that cuts prompts at this size (a fork pool) hands over only what it keeps.
    SGLang's page size is the scheduler's (the engine's arguments leave it None to SGLang's choice): asked once."""
    own = engine.__dict__.get("_thaw_engine_page_size")
    if own is None:
        own = engine._thaw_engine_page_size = rpc.call(engine, "thaw_page_size")
    return -(-DEFAULT_PAGE_SIZE // own) * own


def capture(
    engine: ThawEngine,
    path: str | os.PathLike | None = None,
    *,
    include_weights: bool = True,
    weights: bool | None = None,
    page_size: int | None = None,
    label: str | None = None,
    chains: Sequence[Sequence[int]] | None = None,
) -> Snapshot:
    """Snapshot the engine between two batches (only the pages holding `chains`, if given): written to `path`
    if given, and returned, read back; otherwise lent in shared memory, its tensors viewing the segment the
    scheduler gathered into (given back when the Snapshot is dropped). Pages of `page_size` tokens, a multiple of
    SGLang's own (default: snapshot_page_size). (`weights=` is the former name of `include_weights=`.)"""
    options = dict(page_size=snapshot_page_size(engine) if page_size is None else page_size,
                   weights=_include_weights(include_weights, weights), label=label or "",
                   chains=None if chains is None else [[int(t) for t in chain] for chain in chains])
    if path is not None:
        rpc.call(engine, "thaw_capture", path=str(path), **options)
        return thaw_format.load(path)
    # The scheduler computed every chunk's checksum in its gather's own pass: the header is parsed and checked,
    # the bytes are not read again here, nor by a restore of it into an engine of this client (thaw_format.sdk.
    # lent's trust rule); a saved copy is verified when it is loaded.
    return lent._borrow_capture(rpc.call(engine, "thaw_capture", into="lent", **options))


def capture_shared(engine: ThawEngine, *, chains: Sequence[Sequence[int]] | None = None) -> str:
    """A KV-only capture (no request: those in flight stay this engine's) published by the scheduler itself in
    its reused segment: "shm://<name>#<nbytes>", valid until the engine's next capture_shared. The KV goes from
    the engine's buffers to shared memory once."""
    return rpc.call(engine, "thaw_capture", page_size=snapshot_page_size(engine), weights=False, into="reused",
                    requests=False, chains=None if chains is None else [[int(t) for t in chain] for chain in chains])


def check(engine: ThawEngine, snapshot: Snapshot | str | os.PathLike) -> None:
    """Raise IncompatibleSnapshotError, naming the field, if the engine cannot hold the snapshot; changes nothing."""
    transport.sending(engine, snapshot, lambda source, checked: rpc.call(engine, "thaw_check", source=source,
                                                                          verified=checked))


def restore_pending(engine: ThawEngine, snapshot: Snapshot | str | os.PathLike, *,
                    verified: bool = False) -> list[thaw_format.Request]:
    """Make an idle engine hold the snapshot (a Snapshot, or a source: "shm://..." or a file) and return its
    unfinished requests; the scheduler reads the source (its chunks unchecked if `verified`, a segment the
    caller checked, thaw_format.sdk.shared.checked_by_caller, or if it is a Snapshot that thaw_format.sdk.lent's
    trust rule counts as checked, transport.sending), and this process only when it has requests. `verified` is
    for a source: a Snapshot is checked as the trust rule says, and verified=True with one is refused."""
    if verified and isinstance(snapshot, Snapshot):
        raise ValueError("verified=True is for a shared-memory source its caller checked (thaw_format.sdk.shared."
                         "checked_by_caller); a Snapshot is checked as thaw_format.sdk.lent's trust rule says")

    def restore(source: str, checked: bool) -> int:
        return rpc.call(engine, "thaw_restore", source=source, verified=checked or checked_by_caller(source, verified))

    if not transport.sending(engine, snapshot, restore):
        return []
    return pending_requests(snapshot if isinstance(snapshot, Snapshot) else transport.read(str(snapshot)))


def restore(engine: ThawEngine, snapshot: Snapshot | str | os.PathLike) -> list[Resumed]:
    """Make an idle engine hold the snapshot's state; an incompatible snapshot is refused before any change.
    Returns the snapshot's unfinished requests, which `resume` (or SGLangEngine.finish) runs."""
    return resumed_of(restore_pending(engine, snapshot))


def resumed_of(requests: list[thaw_format.Request]) -> list[Resumed]:
    return [Resumed(r.id, r.prompt_token_ids, r.output_token_ids) for r in requests]


def _resumed(snapshot: Snapshot) -> list[Resumed]:
    return [Resumed(r.id, r.prompt_token_ids, r.output_token_ids) for r in pending_requests(snapshot)]


def resume(engine: ThawEngine, snapshot: Snapshot) -> list[dict]:
    """Continue the snapshot's unfinished requests in an engine holding its state; SGLang's outputs, in order.

    Each output's `output_ids` are the tokens after the request's captured `output_token_ids`.
    (SGLangEngine.finish is the adapter contract's name for this.)
    """
    pending = pending_requests(snapshot)
    if not pending:
        return []
    inputs, params = zip(*(resume_arguments(r) for r in pending))
    return engine.generate(input_ids=list(inputs), sampling_params=list(params))
