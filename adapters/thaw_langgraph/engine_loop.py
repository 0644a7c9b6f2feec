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

Abandoned requests: a caller that stops listening (a stream closed early, a cancelled task, an event loop gone)
cancels its job, or its listener raises ListenerGone; the loop then aborts the request in the engine (the
contract's `abort`, on this thread like every engine call), which frees its batch slot and KV at once instead
of generating up to max_tokens for no one.
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


class ListenerGone(Exception):
    """Raised by a listener whose caller is gone: the loop aborts the request."""


@dataclass(eq=False)  # a job is itself: two with equal prompts are two requests
class _Job:
    prompt: list[int]
    params: thaw_format.SamplingParams
    listener: Listener
    failed: Callable[[BaseException], None]
    request_id: Optional[str] = None  # the engine's id once admitted


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
    def __init__(self, engine, *, coalesce: bool = True, min_shared: Optional[int] = None) -> None:
        self.engine = engine
        if min_shared is None:  # a page of the engine's: a shorter shared prefix caches nothing (vLLM's may be 128)
            min_shared = engine.page_size() if callable(getattr(engine, "page_size", None)) else DEFAULT_PAGE_SIZE
        self.coalesce, self.min_shared = coalesce, min_shared
        self._cond = threading.Condition()
        self._new: list[_Job] = []
        self._calls: list[_Call] = []
        self._active: dict[str, _Job] = {}
        self._held: dict[str, list[_Job]] = {}  # prefix request id -> the group admitted once it is done
        self._cancelled: list[_Job] = []  # jobs whose callers left, aborted on the loop's thread
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="thaw-engine-loop", daemon=True)
        self._thread.start()

    # --- any thread ---------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: thaw_format.SamplingParams, listener: Listener,
               failed: Callable[[BaseException], None]) -> _Job:
        """Queue a request; the job returned is what `cancel` takes."""
        job = _Job(list(prompt), params, listener, failed)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine loop is closed")
            self._new.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: _Job) -> None:
        """The job's caller is gone: the loop drops it, aborting its request in the engine if it is in flight. Its
        listener and `failed` are not called once the loop has taken the cancel (a job that finished meanwhile is
        left alone)."""
        with self._cond:
            self._cancelled.append(job)
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
                while not (self._closed or self._new or self._calls or self._active or self._held or self._cancelled):
                    self._cond.wait()
                cancelled, self._cancelled = self._cancelled, []
                self._new = [job for job in self._new if job not in cancelled]  # never reaches the engine
                if self._closed and not (self._active or self._held):
                    closed = RuntimeError("the engine loop is closed")
                    for call in self._calls:
                        call.future.set_exception(closed)
                    for job in self._new:
                        self._fail(job, closed)
                    return
                busy = bool(self._active or self._held)
                calls = [c for c in self._calls if not c.idle or not busy]
                self._calls = [c for c in self._calls if c not in calls]
                waiting_idle = bool(self._calls)  # an idle call waits: admit nothing new until it runs
                new, self._new = ([], self._new) if waiting_idle else (self._new, [])
            try:
                for job in cancelled:  # before the calls: a call made after a cancel finds the request gone
                    self._drop(job)
                for call in calls:
                    try:
                        call.future.set_result(call.fn(self.engine))
                    except BaseException as exc:  # the caller raises it
                        call.future.set_exception(exc)
                self._admit(new)
                if self._active or self._held:
                    self._step()
            except BaseException as exc:  # an engine failure fails every request in flight, not the loop
                log.exception("engine step failed")
                for job in [*self._active.values(), *(j for group in self._held.values() for j in group)]:
                    self._fail(job, exc)
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
                self._fail(job, exc)
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
            except ListenerGone:
                self._drop(job)
            except Exception:  # a caller's listener must not stop the other requests
                log.exception("a token listener failed")

    def _drop(self, job: _Job) -> None:
        """Forget a job whose caller is gone, aborting its request in the engine (or, for a member of a group
        waiting on its shared prefix, the prefix request once no member is left)."""
        if self._active.get(job.request_id) is job:
            del self._active[job.request_id]
            self._abort(job.request_id)
            return
        for prefix_id, group in list(self._held.items()):
            if job in group:
                group.remove(job)
                if not group:
                    del self._held[prefix_id]
                    self._abort(prefix_id)
                return

    def _abort(self, request_id: str) -> None:
        # No one waits on an abort: a failing one (an engine process gone) is logged, and the calls and requests
        # of this turn still get their answers.
        try:
            self.engine.abort(request_id)
        except Exception:
            log.exception("aborting request %s failed", request_id)

    @staticmethod
    def _fail(job: _Job, exc: BaseException) -> None:
        # A caller that is gone (ListenerGone from its `failed`) or whose `failed` breaks must not stop the loop or
        # the other requests of this turn.
        try:
            job.failed(exc)
        except ListenerGone:
            pass
        except Exception:
            log.exception("a request's failure callback failed")

    def _admit_alone(self, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                job.request_id = self.engine.submit(job.prompt, job.params)
                self._active[job.request_id] = job
            except Exception as exc:  # a request the engine refuses (too long, bad parameters) fails alone
                self._fail(job, exc)


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
