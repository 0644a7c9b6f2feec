"""An engine in a process of its own, started by the fork pool (a worker) or by process fork (a child).

The process speaks JSON lines on its stdin and stdout. Its engine may start processes of its own: SGLang's
scheduler and detokenizer, vLLM's engine core in its default multiprocessing mode. When the process dies
(SIGKILL, the OOM killer), those are not told: vLLM's engine core has no parent-death check and lives on,
holding its memory, with no one left to stop it. So each engine process leads a new session (`lead_own_group`,
its first step: its own process group, which the engine's processes join unless they leave it), and once it
has exited, however it came to, whatever is left of its group is killed; only then is it reaped (before that
its pid still names the group, so the group cannot be another's). A watcher thread does this as soon as the
process exits, between rounds too; `wait` and `poll` say the process is done only once it has. `exited` says
so too without reaping it (another thread's poll would reap it between kill()'s check and its killpg, and the
signal could reach a stranger given the freed pid): a pool's monitoring reads that, from any thread.

Multiprocessing's resource tracker is started before the new session, outside the group: killed with it, the
shared memory and semaphores the engine's processes had left to it stayed in /dev/shm (vLLM's engine core:
about 400 MiB per killed worker); it now outlives them and unlinks what they left.

Leading its own session, an engine process no longer gets what its parent's terminal or process group is sent:
Ctrl-C, SIGHUP, a harness's killpg. What ends it instead: its parent's close() (or kill()), the end of its
input, and the parent's death, however it came (SIGKILL included): a thread in the engine process watches its
parent (`os.getppid()`, twice a second, against the parent's pid that its config carries, so a parent that
died before the watch began is seen too) and, once it is gone, kills the engine process's whole group, an
engine still loading too. A SIGINT sent to it on purpose raises KeyboardInterrupt, however its parent was
started: a process started in the background by a non-interactive shell ignores SIGINT, and so did every
engine process it started, and every process their engines started.

The group is killed as soon as the process exits only where Python has `os.waitid` (Linux; macOS from Python
3.13): elsewhere only `kill()` (and so close() after its timeout, and Ctrl-C's kills) ends the whole group,
and what the engine started may outlive a process that died on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

PARENT_CHECK_S = 0.5  # how often an engine process checks that its parent is alive
# How long stop_resource_tracker waits for the tracker: it ends once every process of the engine that held its
# pipe has ended (seconds after a close), and its unlinking of what they left is quick
TRACKER_WAIT_S = 10.0


def _in_words(code: int) -> str:
    """A child process's exit code in words: a negative one names the signal that ended it."""
    if code < 0:
        try:
            return f"status {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"status {code}"
    return f"status {code}"


def lead_own_group(parent: int) -> None:
    """An engine process's first step (after taking its protocol stream off fd 1, which the tracker would
    inherit): multiprocessing's resource tracker, then a new session, which the engine's processes join, and the
    watch of its parent, `parent` (its config's "parent"). The tracker's stdin is /dev/null: holding this
    process's, it kept a dead worker's input pipe open (a send to it went into the pipe instead of failing).

    The tracker is started for every engine, those that never use multiprocessing (MLX, transformers) too: a
    tracker started later, when an engine's first process or segment needs it, would be in the group and die
    with it, and this process cannot tell beforehand whether its engine will. It costs one idle process, which
    exits once every process of the group has (the end of its input)."""
    from multiprocessing import resource_tracker

    signal.signal(signal.SIGINT, signal.default_int_handler)  # not the parent's disposition: see the docstring

    stdin, devnull = os.dup(0), os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(devnull, 0)
        resource_tracker.ensure_running()
    finally:
        os.dup2(stdin, 0)
        os.close(stdin)
        os.close(devnull)
    os.setsid()
    threading.Thread(target=_end_group_once_orphaned, args=(parent,), name="thaw-parent-watch", daemon=True).start()


def stop_resource_tracker(timeout: float = TRACKER_WAIT_S) -> bool:
    """End this process's multiprocessing resource tracker, so that it unlinks now the shared memory its users
    left registered (vLLM 0.32's engine core, at its shutdown: a segment of 160 MiB), for a process whose
    tracker would otherwise be killed before it could (a Ray actor: the raylet kills an actor's children with it).
    Call it once the engine's processes have ended or are ending: the tracker ends once no process holds its pipe.
    Whether it ended within `timeout` seconds: past it the wait goes on in a daemon thread, holding the tracker's
    lock, so this process must not use multiprocessing's tracker again (a later use would wait on that lock).

    `ResourceTracker._stop` is private (there is no public way): checked against CPython 3.10 to 3.13, whose
    _stop is the same (close the tracker's pipe, then waitpid it)."""
    from multiprocessing import resource_tracker

    def stop() -> None:
        with contextlib.suppress(ChildProcessError):  # reaped already (a SIGCHLD handler, another's os.wait)
            resource_tracker._resource_tracker._stop()

    stopping = threading.Thread(target=stop, name="thaw-tracker-stop", daemon=True)
    stopping.start()
    stopping.join(timeout)
    return not stopping.is_alive()


def _end_group_once_orphaned(parent: int) -> None:
    """Kill this process's group once its parent `parent` is gone (it is then another's child: init's, or a
    subreaper's), at once if it is gone already. Not prctl(PR_SET_PDEATHSIG): Linux only, and it fires when the
    parent's thread that started this process exits, not the parent."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os.killpg(0, signal.SIGKILL)


class EngineProcess(subprocess.Popen):
    """`python -m <module> <config>` with pipes on its stdin and stdout (text), leading its own process group:
    `config` as JSON, with this process's pid added as "parent" (for `lead_own_group`)."""

    def __init__(self, module: str, config: dict, env: Optional[dict] = None) -> None:
        self._group_ended = threading.Event()
        self._exited = threading.Event()  # seen by the watcher's waitid, which leaves it unreaped
        self._reaped_elsewhere = False  # by another's os.wait: its exit status is lost
        super().__init__([sys.executable, "-m", module, json.dumps({**config, "parent": os.getpid()})],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            threading.Thread(target=self._end_group_on_exit, name=f"thaw-group-{self.pid}", daemon=True).start()
        except BaseException:  # "can't start new thread": no one would end its group, nor reap it
            self.kill()
            super().wait()
            self._close_pipes()
            raise

    def _end_group_on_exit(self) -> None:
        try:
            if not hasattr(os, "waitid"):  # not every Unix's Python has it: there kill() alone ends the group
                return
            try:  # its exit, left unreaped (WNOWAIT): its pid still names its group
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # reaped by another's os.wait: its pid, and group id, may be another's now
                self._reaped_elsewhere = True
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):  # none left / one that left for root
                    os.killpg(self.pid, signal.SIGKILL)
            self._exited.set()  # after the killpg: what its engine started is killed once it shows
        finally:  # whatever happened: wait() must not wait for ever
            self._group_ended.set()

    @property
    def exited(self) -> bool:
        """Whether it has exited (reaped, or seen by its watcher once its group is killed), from any thread: reaps
        nothing. Where Python has no `os.waitid` only a reaped process shows."""
        return self.returncode is not None or self._exited.is_set()

    def poll(self) -> Optional[int]:
        return super().poll() if self._group_ended.is_set() else None

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._group_ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return super().wait()

    def exit_status(self) -> str:
        """How it ended, in words, once it has (waits for it): its status, or that it is unknown (it was reaped
        by another's os.wait, and Popen reads that as status 0)."""
        code = self.wait()
        return "an unknown status (reaped elsewhere)" if self._reaped_elsewhere else _in_words(code)

    def kill(self) -> None:
        """SIGKILL the process and every process of its group."""
        if self.returncode is None and not self._reaped_elsewhere:  # not reaped: its pid is still its group's
            with contextlib.suppress(ProcessLookupError, PermissionError):
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:  # it has no group of its own yet (lead_own_group is to come)
                    os.kill(self.pid, signal.SIGKILL)

    def kill_quietly(self) -> None:
        """Kill it, reap it, and close its pipes quietly: after a failed send, closing stdin flushes the bytes
        still buffered and raises BrokenPipeError (printed by the garbage collector if left to it)."""
        self.kill()
        self.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.stdin, self.stdout):
            with contextlib.suppress(OSError, ValueError):
                pipe.close()

    def end(self, timeout: float) -> None:
        """Close its input (an engine process closes its engine and exits at the end of its input) and wait up to
        `timeout` seconds; killed if it has not ended by then (one stuck in its engine would outlive us, holding
        its memory), or if the wait is interrupted (Ctrl-C). Its pipes are closed in any case."""
        try:
            if self.poll() is None:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # killed below if it has not ended
                    self.stdin.close()
                    self.wait(timeout=timeout)
        finally:
            self.kill_quietly()
