"""The scheduler process of a ThawEngine: SGLang's own scheduler with thaw's capture and restore methods.

ThawEngine names `run_scheduler_process` below as SGLang's scheduler-process entry point. It selects the
walkable radix-tree core and replaces the Scheduler class through SGLang's plugin hook registry, only in
that process, before SGLang builds its scheduler. `Engine.collective_rpc("thaw_capture", ...)` then reaches
the methods here between two batches.
"""

from __future__ import annotations

import thaw_format
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from . import _internals, rpc
from .capture import capture_state
from .restore import check_restorable, restore_state


class ThawScheduler(_internals.Scheduler):
    # The id of the snapshot this engine was last restored from: the lineage parent of its captures.
    thaw_restored_from: str | None = None
    # The digest of the weights it holds (weights.engine_weights_digest): computed on first use, then kept.
    thaw_weights_digest: str | None = None

    def thaw_capture(self, result_path: str, path: str, page_size: int, weights: bool, label: str = "") -> None:
        def work():
            snapshot = capture_state(
                self, page_size=page_size, include_weights=weights, label=label or None, parent=self.thaw_restored_from
            )
            thaw_format.save(snapshot, path)

        rpc.report(result_path, work)

    def thaw_restore(self, result_path: str, path: str) -> None:
        def work():
            snapshot = thaw_format.load(path)
            restore_state(self, snapshot)
            self.thaw_restored_from = snapshot.id

        rpc.report(result_path, work)

    def thaw_check(self, result_path: str, path: str) -> None:
        rpc.report(result_path, lambda: check_restorable(self, thaw_format.load(path)))

    def thaw_pause(self, result_path: str, paused: bool) -> None:
        rpc.report(result_path, lambda: _internals.set_paused(self, paused))

    def thaw_leak_warnings(self, result_path: str) -> None:
        rpc.report(result_path, lambda: _internals.leak_warnings(self))


def run_scheduler_process(*args, **kwargs):
    _internals.use_walkable_tree_core()
    HookRegistry.register(_internals.SCHEDULER_CLASS_PATH, ThawScheduler, HookType.REPLACE)
    HookRegistry.apply_hooks()
    return _internals.run_scheduler_process(*args, **kwargs)
