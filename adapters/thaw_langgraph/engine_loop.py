"""One thread owns the engine; callers on any thread or event loop hand it requests and get tokens back.

An engine is not thread-safe, and LangGraph runs a fan-out's branches concurrently (threads for `invoke`,
tasks for `ainvoke`). Every engine call therefore happens on this loop's thread: it admits the requests that
arrived since the last engine step, steps the engine once for all of them (concurrent calls are served in one
batch), and hands each request its tokens after every step (streaming).

Coalescing: requests that arrive together and share a prompt prefix of at least `min_shared` tokens would
each compute that prefix (an engine caches a prefix only once it has computed it, not for requests scheduled
in the same step). The loop first runs the shared prefix alone (one token) and admits the group once it is
done, so every member reads the prefix from the engine's cache. Nothing else changes: each member is the same
request with the same sampling parameters, so its tokens are those it gets alone.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import thaw_format
from thaw_format.sdk.contract import DEFAULT_PAGE_SIZE, Progress, Refused, greedy

log = logging.getLogger(__name__)
Listener = Callable[[Progress], None]  # called on the loop's thread after each step; the last has finished=True


@dataclass
class _Job:
    prompt: list[int]
    params: thaw_format.SamplingParams
    listener: Listener
    failed: Callable[[BaseException], None]


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    idle: bool  # run only when no request is in flight (a restore)
    future: Future = field(default_factory=Future)


def shared_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix every prompt starts with."""
    first, n = prompts[0], min(len(p) for p in prompts)
    for prompt in prompts[1:]:
        n = next((i for i in range(n) if prompt[i] != first[i]), n)
    return list(first[:n])


def coalesce(prompts: Sequence[Sequence[int]], min_shared: int) -> list[tuple[Optional[list[int]], list[int]]]:
    """Group prompts (by index) that share at least `min_shared` leading tokens: [(shared prefix or None, indices)].
    Prompts are grouped by their first `min_shared` tokens, and each group's prefix is its longest common one."""
    groups: dict[tuple, list[int]] = {}
    for i, prompt in enumerate(prompts):
        key = tuple(prompt[:min_shared]) if len(prompt) >= min_shared else ("alone", i)
        groups.setdefault(key, []).append(i)
    out = []
    for indices in groups.values():
        prefix = shared_prefix([prompts[i] for i in indices]) if len(indices) > 1 else []
        out.append((prefix if len(prefix) >= min_shared else None, indices))
    return out


class EngineLoop:
    def __init__(self, engine, *, coalesce: bool = True, min_shared: int = DEFAULT_PAGE_SIZE) -> None:
        self.engine = engine
        self.coalesce, self.min_shared = coalesce, min_shared
        self._cond = threading.Condition()
        self._new: list[_Job] = []
        self._calls: list[_Call] = []
        self._active: dict[str, _Job] = {}
        self._held: dict[str, list[_Job]] = {}  # prefix request id -> the group admitted once it is done
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="thaw-engine-loop", daemon=True)
        self._thread.start()

    # --- any thread ---------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: thaw_format.SamplingParams, listener: Listener,
               failed: Callable[[BaseException], None]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine loop is closed")
            self._new.append(_Job(list(prompt), params, listener, failed))
            self._cond.notify()

    def call(self, fn: Callable[[Any], Any], *, idle: bool = False) -> Any:
        """Run fn(engine) on the loop's thread between steps (idle=True: once no request is in flight; new
        requests wait meanwhile) and return its result or raise its exception."""
        if threading.current_thread() is self._thread:
            return fn(self.engine)
        call = _Call(fn, idle)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine loop is closed")
            self._calls.append(call)
            self._cond.notify()
        return call.future.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # --- the loop's thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._new or self._calls or self._active or self._held):
                    self._cond.wait()
                if self._closed and not (self._active or self._held):
                    closed = RuntimeError("the engine loop is closed")
                    for call in self._calls:
                        call.future.set_exception(closed)
                    for job in self._new:
                        job.failed(closed)
                    return
                busy = bool(self._active or self._held)
                calls = [c for c in self._calls if not c.idle or not busy]
                self._calls = [c for c in self._calls if c not in calls]
                waiting_idle = bool(self._calls)  # an idle call waits: admit nothing new until it runs
                new, self._new = ([], self._new) if waiting_idle else (self._new, [])
            for call in calls:
                try:
                    call.future.set_result(call.fn(self.engine))
                except BaseException as exc:  # the caller raises it
                    call.future.set_exception(exc)
            try:
                self._admit(new)
                if self._active or self._held:
                    self._step()
            except BaseException as exc:  # an engine failure fails every request in flight, not the loop
                log.exception("engine step failed")
                for job in [*self._active.values(), *(j for group in self._held.values() for j in group)]:
                    job.failed(exc)
                self._active.clear()
                self._held.clear()

    def _admit(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        groups = coalesce([j.prompt for j in jobs], self.min_shared) if self.coalesce else [(None, range(len(jobs)))]
        for prefix, indices in groups:
            if prefix is None:
                self._admit_alone([jobs[i] for i in indices])
            else:
                try:
                    self._held[self.engine.submit(prefix, greedy(1))] = [jobs[i] for i in indices]
                except Exception:  # the shared prefix is refused: each member is then served or refused alone
                    self._admit_alone([jobs[i] for i in indices])

    def _step(self) -> None:
        try:
            self.engine.step()
        except Refused as exc:  # a request the engine refused when its turn came: it fails alone
            group = self._held.pop(exc.request_id, None)
            if group is not None:  # a shared prefix: each member is then served or refused alone
                self._admit_alone(group)
            job = self._active.pop(exc.request_id, None)
            if job is not None:
                job.failed(exc)
        for request_id, progress in self.engine.progress().items():
            group = self._held.get(request_id)
            if group is not None:
                if progress.finished:
                    del self._held[request_id]
                    self._admit_alone(group)
                continue
            job = self._active.get(request_id)
            if job is None:
                continue
            if progress.finished:
                del self._active[request_id]
            try:
                job.listener(progress)
            except Exception:  # a caller's listener must not stop the other requests
                log.exception("a token listener failed")

    def _admit_alone(self, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                self._active[self.engine.submit(job.prompt, job.params)] = job
            except Exception as exc:  # a request the engine refuses (too long, bad parameters) fails alone
                job.failed(exc)


_LOOPS: dict[int, EngineLoop] = {}
_LOOPS_LOCK = threading.Lock()


def loop_for(engine, *, coalesce: bool = True) -> EngineLoop:
    """The one loop serving `engine` in this process (every ChatThaw over the engine shares it)."""
    with _LOOPS_LOCK:
        loop = _LOOPS.get(id(engine))
        if loop is None or loop.engine is not engine:
            loop = _LOOPS[id(engine)] = EngineLoop(engine, coalesce=coalesce)
        if loop.coalesce != coalesce:
            raise ValueError(f"this engine's loop already runs with coalesce={loop.coalesce}")
        return loop
