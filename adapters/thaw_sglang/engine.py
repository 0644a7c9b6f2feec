"""ThawEngine: an SGLang Engine that can be captured, restored and forked."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sglang.srt.entrypoints.engine import Engine
import thaw_format
from thaw_format import Snapshot

from . import _internals, rpc, scheduler_ext
from .requests import resume_arguments

DEFAULT_PAGE_SIZE = 32  # tokens per snapshot page; vLLM's CPU backend needs blocks of a multiple of 32


class ThawEngine(Engine):
    """`sglang.Engine` with the same arguments, whose scheduler process carries thaw's methods."""

    run_scheduler_process_func = staticmethod(scheduler_ext.run_scheduler_process)

    def __init__(self, **kwargs):
        self.engine_kwargs = dict(kwargs)
        super().__init__(**kwargs)

    def shutdown(self) -> None:
        """Shut down this engine alone, leaving the other engines of this process (a fork's family) running."""
        _internals.stop_engine_processes(self)

    def capture(self, path=None, **options) -> Snapshot:
        return capture(self, path, **options)

    def restore(self, snapshot) -> None:
        restore(self, snapshot)

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

    def fork(self, n: int, *, weights: bool = True, **engine_overrides) -> list["ThawEngine"]:
        """Start `n` new engines with this engine's arguments, each holding this engine's state.

        The state is captured once; the children are started one after another and shut down again if any
        of them cannot be started or restored.
        """
        workdir = tempfile.mkdtemp(prefix="thaw-sglang-fork-")
        children: list[ThawEngine] = []
        try:
            path = Path(workdir) / "parent.thaw"
            self.capture(path, weights=weights)
            for _ in range(n):
                children.append(ThawEngine(**{**self.engine_kwargs, **engine_overrides}))
                children[-1].restore(path)
        except BaseException:
            for child in children:
                child.shutdown()
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return children


def capture(
    engine: ThawEngine,
    path: str | os.PathLike | None = None,
    *,
    weights: bool = True,
    page_size: int = DEFAULT_PAGE_SIZE,
    label: str | None = None,
) -> Snapshot:
    """Snapshot the engine between two batches: written to `path` if given, and returned (read back)."""
    if path is not None:
        target = Path(path)
        rpc.call(engine, "thaw_capture", path=str(target), page_size=page_size, weights=weights, label=label or "")
        return thaw_format.load(target)
    with tempfile.TemporaryDirectory(prefix="thaw-sglang-") as workdir:
        return capture(engine, Path(workdir) / "snapshot.thaw", weights=weights, page_size=page_size, label=label)


def restore(engine: ThawEngine, snapshot: Snapshot | str | os.PathLike) -> None:
    """Make an idle engine hold the snapshot's state; an incompatible snapshot is refused before any change."""
    if not isinstance(snapshot, Snapshot):
        rpc.call(engine, "thaw_restore", path=str(Path(snapshot)))
        return
    with tempfile.TemporaryDirectory(prefix="thaw-sglang-") as workdir:
        path = Path(workdir) / "snapshot.thaw"
        thaw_format.save(snapshot, path)
        restore(engine, path)


def resume(engine: ThawEngine, snapshot: Snapshot) -> list[dict]:
    """Continue the snapshot's unfinished requests in an engine holding its state; SGLang's outputs, in order.

    Each output's `output_ids` are the tokens after the request's captured `output_token_ids`.
    """
    pending = [r for r in (snapshot.scheduler.requests if snapshot.scheduler else []) if r.status != "finished"]
    if not pending:
        return []
    inputs, params = zip(*(resume_arguments(r) for r in pending))
    return engine.generate(input_ids=list(inputs), sampling_params=list(params))
