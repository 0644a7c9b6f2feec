"""The scheduler process of a ThawEngine: SGLang's own scheduler with thaw's capture and restore methods.

ThawEngine names `run_scheduler_process` below as SGLang's scheduler-process entry point. It selects the
walkable radix-tree core and replaces the Scheduler class through SGLang's plugin hook registry, only in
that process, before SGLang builds its scheduler. `Engine.collective_rpc("thaw_capture", ...)` then reaches
the methods here between two batches.
"""

from __future__ import annotations

import thaw_format
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from thaw_format.sdk import lent, pending_requests
from thaw_format.sdk.shared import SharedSnapshot, owned_segment

from . import _internals, rpc, transport
from .capture import capture_state
from .restore import check_restorable, restore_state


class ThawScheduler(_internals.SleepsWhilePaused):
    # The id of the snapshot this engine was last restored from: the lineage parent of its captures.
    thaw_restored_from: str | None = None
    # The digest of the weights it holds (weights.engine_weights_digest): computed on first use, then kept.
    thaw_weights_digest: str | None = None
    # Batches left before the engine pauses itself (thaw_run_batches); None: it runs until told to pause.
    thaw_batches_left: int | None = None
    # The load-report file whose name it unlinked (_internals.unlink_load_report), for tests to check.
    thaw_unlinked_load_report: str | None = None

    def init_ipc_channels(self, port_args):
        """SGLang's own, which makes the load-report file; then its name goes (_internals.unlink_load_report)."""
        super().init_ipc_channels(port_args)
        self.thaw_unlinked_load_report = _internals.unlink_load_report(self)

    def process_batch_result(self, batch, result):
        """SGLang's own processing (a batch's tokens go out), then the self-pause thaw_run_batches asked for.

        Pausing here, in the scheduler's own loop, bounds what runs by batches, not by how soon a slow client's
        pause would arrive (under load the request could otherwise run on, even to its end, before it lands).

        Only a batch that gives a token counts. SGLang's overlap scheduler runs a request's next batch before it
        processes the result that finishes it (its last token, or an abort), so one more result arrives for it,
        finished: counted, it would spend the batch a later run_batches allows the next request (whose prefill
        then waits, paused, for good), whenever it is processed after that run_batches arrived.
        """
        gives_tokens = _internals.gives_tokens(batch)  # before its result is processed: that may finish them
        super().process_batch_result(batch, result)
        if self.thaw_batches_left is not None and gives_tokens:
            self.thaw_batches_left -= 1
            if self.thaw_batches_left <= 0:
                self.thaw_batches_left = None
                _internals.set_paused(self, True)

    def thaw_capture(self, result: str, page_size: int, weights: bool, label: str = "", chains=None, path: str = "",
                     into: str = "lent", requests: bool = True) -> None:
        """Capture (the pages holding `chains`, if given) into the file `path`; else publish it in shared memory
        and return its source, `into`: "lent" (a segment lent to the caller, given back when its Snapshot is
        dropped), "reused" (this scheduler's reused segment, valid until its next such capture) or "own" (a
        segment of its own, which the caller unlinks). Without `requests`, KV only: the requests in flight stay
        this engine's (capture_shared's rule)."""
        def work():
            if into not in ("lent", "reused", "own"):
                raise ValueError(f"into: 'lent', 'reused' or 'own', not {into!r}")
            # into shared memory the KV goes straight from the engine's buffers, checksummed on the way
            snapshot, fill = capture_state(self, page_size=page_size, include_weights=weights, label=label or None,
                                           parent=self.thaw_restored_from, chains=chains, deferred=not path,
                                           requests=requests)
            if path:
                thaw_format.save(snapshot, path)
                return None
            if into == "lent":
                return lent.owned_lender(self).publish(snapshot, fill)
            if into == "reused":
                return owned_segment(self).publish(snapshot, fill)
            shared = SharedSnapshot(snapshot, fill)
            shared.detach()
            return shared.source

        rpc.report(result, work)

    def thaw_restore(self, result: str, source: str, verified: bool = False) -> None:
        """Restore the snapshot `source` names (read in place, verified unless the caller checked it); returns how
        many requests it leaves unfinished, so that the caller reads the snapshot itself only when there are some."""
        def work():
            snapshot = transport.read(source, self, verify=not verified)
            restore_state(self, snapshot)
            self.thaw_restored_from = snapshot.id
            return len(pending_requests(snapshot))

        rpc.report(result, work)

    def thaw_check(self, result: str, source: str, verified: bool = False) -> None:
        rpc.report(result, lambda: check_restorable(self, transport.read(source, self, verify=not verified)))

    def thaw_pause(self, result: str, paused: bool) -> None:
        def work():
            self.thaw_batches_left = None
            _internals.set_paused(self, paused)

        rpc.report(result, work)

    def thaw_run_batches(self, result: str, batches: int) -> None:
        def work():
            self.thaw_batches_left = batches
            _internals.set_paused(self, False)

        rpc.report(result, work)

    def thaw_release(self, result: str) -> None:
        """Unlink this scheduler's shared-memory segments before the engine ends this process (transport.release)."""
        rpc.report(result, lambda: transport.release(self))

    def thaw_leak_warnings(self, result: str) -> None:
        rpc.report(result, lambda: _internals.leak_warnings(self))

    def thaw_free_slots(self, result: str) -> None:
        rpc.report(result, lambda: _internals.free_slots(self))

    def thaw_unlinked_load_report_path(self, result: str) -> None:
        rpc.report(result, lambda: self.thaw_unlinked_load_report)

    def thaw_page_size(self, result: str) -> None:
        rpc.report(result, lambda: _internals.engine_page_size(self))


def run_scheduler_process(*args, **kwargs):
    _internals.use_walkable_tree_core()
    HookRegistry.register(_internals.SCHEDULER_CLASS_PATH, ThawScheduler, HookType.REPLACE)
    HookRegistry.apply_hooks()
    return _internals.run_scheduler_process(*args, **kwargs)
