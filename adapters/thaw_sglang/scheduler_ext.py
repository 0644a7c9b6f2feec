"""The scheduler process of a ThawEngine: SGLang's own scheduler with thaw's capture and restore methods.

ThawEngine names `run_scheduler_process` below as SGLang's scheduler-process entry point. It selects the
walkable radix-tree core and replaces the Scheduler class through SGLang's plugin hook registry, only in
that process, before SGLang builds its scheduler. `Engine.collective_rpc("thaw_capture", ...)` then reaches
the methods here between two batches.
"""

from __future__ import annotations

import contextlib
import dataclasses

import thaw_format
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from thaw_format import CorruptSnapshotError, SnapshotFile
from thaw_format.sdk import agreement, error_data, lent, pending_requests
from thaw_format.sdk.head_share import check_regions
from thaw_format.sdk.inplace import InPlaceWeights, check_idle
from thaw_format.sdk.shared import SharedSnapshot, owned_segment, read_source, release
from thaw_format.writer import reseal, unwritten

from . import _internals, rpc, tensor_parallel, transport
from .capture import capture_state
from .identity import model_info
from .kv import tensor_sizes
from .restore import apply_restore, check_restorable, check_restore, restore_state
from .weights import engine_weights_digest


class ThawScheduler(_internals.SleepsWhilePaused):
    # The id of the snapshot this engine was last restored from: the lineage parent of its captures.
    thaw_restored_from: str | None = None
    # The digest of the weights it holds (weights.engine_weights_digest): computed on first use, then kept.
    thaw_weights_digest: str | None = None
    # Weights changed in place since they were loaded (thaw_weights_changed); a restore loading weights resets it.
    # Frozen: each change assigns this scheduler a new value.
    thaw_in_place: InPlaceWeights = InPlaceWeights()
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

            def plan():  # into shared memory the KV goes straight from the engine's buffers, checksummed on the way
                return capture_state(self, page_size=page_size, include_weights=weights, label=label or None,
                                     parent=self.thaw_restored_from, chains=chains, deferred=not path,
                                     requests=requests)

            if tensor_parallel.is_parallel(self):
                snapshot, puts, pages = tensor_parallel.agreed(self, plan)
                tensor_parallel.agree_on(self, "the pages planned (digest of tokens and slots)", pages)
                return self._thaw_capture_shares(snapshot, puts, path, into)
            snapshot, fill, _ = plan()
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

        self._thaw_report(result, work)

    def _thaw_capture_shares(self, snapshot, puts: dict, path: str, into: str) -> str | None:
        """A tensor-parallel capture (tensor_parallel): the first rank publishes the snapshot as thaw_capture says,
        every rank writes its heads of the KV into it, and the first checksums the final bytes (and, given `path`,
        saves it there from a segment of its own, then unlinks that)."""
        def publish() -> tuple[str, str]:  # (the capture's source, the source its ranks write through)
            if path or into == "own":
                shared = SharedSnapshot(snapshot, dict.fromkeys(puts, unwritten))
                shared.detach()
                return shared.source, f"{shared.source}#{shared.nbytes}"
            publisher = lent.owned_lender(self) if into == "lent" else owned_segment(self)
            source = publisher.publish(snapshot, dict.fromkeys(puts, unwritten))
            return source, source

        source, written = tensor_parallel.from_first(self, publish)

        def put() -> None:
            view = lent.writable_view(written)
            with SnapshotFile(view) as published:
                regions = {name: published.info(name)[2] for name in puts}
            spans = {name: (region.offset, region.end) for name, region in regions.items()}
            # The names come from this rank's own puts, so here only the bounds and byte counts can be wrong (vLLM's
            # ranks take theirs from the first rank, where a name can be missing too).
            check_regions(spans, len(view), tensor_sizes(snapshot.kv))
            for name, put_heads in puts.items():
                put_heads(view[slice(*spans[name])])

        first = tensor_parallel.is_first(self)
        try:
            try:
                tensor_parallel.agreed(self, put)
            finally:
                lent.forget(written)
            if not first:
                return None
            view = lent.writable_view(written)
            try:
                reseal(view, list(puts))
            finally:  # a failed reseal leaves no writable mapping cached
                del view
                lent.forget(written)
        except BaseException:
            if first:  # published, and no client will read it: its segment goes now
                self._thaw_withdraw(source, path, into)
            raise
        if not path:
            return source
        try:
            thaw_format.save(read_source(source), path)
        finally:
            release(source)
        return None

    def _thaw_withdraw(self, source: str, path: str, into: str) -> None:
        """Unlink a capture's segment that its client will never get (one of its own, or a lent one taken back);
        the reused segment stays this scheduler's."""
        if path or into == "own":
            release(source)
        elif into == "lent":
            lent.owned_lender(self).withdraw(source)

    def _thaw_report(self, result: str, work, combine=None) -> None:
        """rpc.report of `work`; under tensor parallelism run on every rank, and reported by the first once every
        rank has done (tensor_parallel.agreed: the first failing rank's error), the others reporting nothing. A
        value each rank holds of its own (plain JSON) is reported as `combine` makes one of all ranks' values;
        without `combine`, the first rank's."""
        def everywhere():
            value = tensor_parallel.agreed(self, work)
            return value if combine is None else combine(tensor_parallel.gathered(self, value))

        if not tensor_parallel.is_parallel(self):
            rpc.report(result, work)
        elif tensor_parallel.is_first(self):
            rpc.report(result, everywhere)
        else:
            with contextlib.suppress(Exception):  # the first rank reports it
                everywhere()

    def thaw_restore(self, result: str, source: str, verified: bool = False) -> None:
        """Restore the snapshot `source` names (read in place, verified unless the caller checked it); returns how
        many requests it leaves unfinished, so that the caller reads the snapshot itself only when there are some."""
        def work():
            if not tensor_parallel.is_parallel(self):
                snapshot = transport.read(source, self, verify=not verified)
                restore_state(self, snapshot)
            else:
                snapshot = self._thaw_restore_shares(source, verified)
            self.thaw_restored_from = snapshot.id
            return len(pending_requests(snapshot))

        self._thaw_report(result, work)

    def _thaw_restore_shares(self, source: str, verified: bool):
        """A tensor-parallel restore (tensor_parallel): every rank reads and checks the snapshot (the same on every
        rank: _thaw_read_shares) before any rank changes its cache; then each writes its heads, and if any rank failed
        once a rank had begun, every rank flushes (the ranks' trees must stay one)."""
        snapshot = self._thaw_read_shares(source, verified, check_restore)
        # Past this point every rank writes (a refusal as busy came with the read, before any write): a failure on any
        # rank leaves the ranks' caches differing, so every rank flushes its own.
        try:
            tensor_parallel.agreed(self, lambda: apply_restore(self, snapshot))
        except BaseException as exc:
            flushed = tensor_parallel.gathered(self, _internals.flush(self))
            if not all(flushed):
                refused = [rank for rank, done in enumerate(flushed) if not done]
                raise RuntimeError(f"a tensor-parallel restore failed partway ({error_data.as_data(exc)[1]}) and "
                                   f"SGLang refused to flush the cache on ranks {refused}: the ranks' caches may "
                                   "differ") from exc
            raise
        return snapshot

    def _thaw_read_shares(self, source: str, verified: bool, check):
        """The snapshot `source` names, read and `check`ed on every tensor-parallel rank (verified unless `verified`:
        a segment every rank maps by the first rank alone, agreement.verifies), returned once every rank has, and
        all read the same snapshot; else the first failure, or CorruptSnapshotError, on every rank."""
        def stage():  # all of a rank's work, even which it verifies: no rank may fail before the exchange
            verify = not verified and agreement.verifies(source, tensor_parallel.is_first(self))
            snapshot = transport.read(source, self, verify=verify)
            check(self, snapshot)
            return snapshot

        snapshot = tensor_parallel.agreed(self, stage)
        # The snapshot's id digests its header and its trailer's chunk checksums: a file replaced between two ranks'
        # reads of its path shows here, before any rank writes.
        tensor_parallel.agree_on(self, "the snapshot each read from its source", snapshot.id, CorruptSnapshotError)
        return snapshot

    def thaw_check(self, result: str, source: str, verified: bool = False) -> None:
        """Report check_restorable's refusal (IncompatibleSnapshotError, naming the field) of the snapshot `source`
        names, changing nothing; under tensor parallelism read, verified and agreed on as a restore's
        (_thaw_read_shares), so also CorruptSnapshotError where a rank's verify fails or the ranks' snapshot ids
        differ."""
        def work():
            if tensor_parallel.is_parallel(self):
                self._thaw_read_shares(source, verified, check_restorable)
            else:
                check_restorable(self, transport.read(source, self, verify=not verified))

        self._thaw_report(result, work)

    def thaw_weights_changed(self, result: str, digest: str | None = None) -> None:
        """The weights were changed in place (SGLangEngine.weights_changed), the engine idle: name them by `digest`
        (None: unknown) and flush the radix cache, whose KV is the old weights'."""
        def work():
            check_idle(not _internals.is_idle(self))
            new = InPlaceWeights().change(digest)  # a malformed digest refused before the cache is flushed
            if not _internals.flush(self):
                raise RuntimeError("SGLang refused to flush its cache for weights_changed: nothing changed")
            self.thaw_in_place = new  # named only once the old weights' KV is gone

        self._thaw_report(result, work)

    def thaw_model_info(self, result: str) -> None:
        """The engine's identity (spec 5.1), as plain data."""
        self._thaw_report(result, lambda: dataclasses.asdict(model_info(self, engine_weights_digest(self))))

    def thaw_pause(self, result: str, paused: bool) -> None:
        def work():
            self.thaw_batches_left = None
            _internals.set_paused(self, paused)

        self._thaw_report(result, work)

    def thaw_run_batches(self, result: str, batches: int) -> None:
        def work():
            self.thaw_batches_left = batches
            _internals.set_paused(self, False)

        self._thaw_report(result, work)

    def thaw_release(self, result: str) -> None:
        """Unlink this scheduler's shared-memory segments before the engine ends this process (transport.release)."""
        self._thaw_report(result, lambda: transport.release(self))

    def thaw_leak_warnings(self, result: str) -> None:
        self._thaw_report(result, lambda: _internals.leak_warnings(self), combine=sum)

    def thaw_free_slots(self, result: str) -> None:
        self._thaw_report(result, lambda: _internals.free_slots(self), combine=_one_count("free KV slots"))

    def thaw_unlinked_load_report_path(self, result: str) -> None:
        self._thaw_report(result, lambda: self.thaw_unlinked_load_report)

    def thaw_page_size(self, result: str) -> None:
        self._thaw_report(result, lambda: _internals.engine_page_size(self))


def _one_count(what: str):
    """A `combine` for a count every rank holds the same of (one tree over the same slots): it, or an error."""
    def combine(counts: list[int]) -> int:
        if len(set(counts)) > 1:
            raise RuntimeError(f"the tensor-parallel ranks differ in {what}: {counts} (by rank)")
        return counts[0]

    return combine


def run_scheduler_process(*args, **kwargs):
    _internals.use_walkable_tree_core()
    HookRegistry.register(_internals.SCHEDULER_CLASS_PATH, ThawScheduler, HookType.REPLACE)
    HookRegistry.apply_hooks()
    return _internals.run_scheduler_process(*args, **kwargs)
