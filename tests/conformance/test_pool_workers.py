"""The fork pool's and process fork's own processes, on the template's toy engine (quick to start): a worker
that fails to start is named and started again, a bounded number of times; what a dead worker's engine started
dies with it; close() during a round leaves nothing running; a dead worker's pipes are closed here, not by the
garbage collector."""

import contextlib
import dataclasses
import gc
import inspect
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from multiprocessing import resource_tracker

import pytest
from descendants import HAS_PROC, alive, descendants, needs_proc, outliving, zombie
from pool_engines import queue_starts, worker_env

from fork_pool_checks import Capturing, Unread, WorkerProcess, kill_and_wait
from thaw_conformance.template.adapter import ToyThawEngine
from thaw_conformance.template.engine import ToyModelConfig
from thaw_format.sdk import ForkPool, LaunchSpec, PoolWorkerDied, fork, greedy
from thaw_format.sdk import engine_process, pool as fork_pool
from thaw_format.sdk.engine_process import EngineProcess
from thaw_format.sdk.pool import MAX_DEATHS, MAX_FAILED_STARTS

TRUNK = list(range(3, 40))  # 9 full pages of the toy's 4 tokens, and one token more
SUFFIXES = [[41, 42], [43]]
PARAMS = greedy(6)
CONFIG = dataclasses.asdict(ToyModelConfig())


@pytest.fixture
def parent():
    engine = ToyThawEngine.start(**CONFIG)
    engine.generate(TRUNK, greedy(1))  # the trunk's pages, cached: what each round hands over
    yield engine
    engine.close()


@pytest.fixture
def pools():
    """A list a test puts the pools it starts without `with` in: each is closed after the test, however it ends (a
    failed test's workers ran on into the next tests)."""
    started = []
    yield started
    for pool in started:
        pool.close()


def expected():
    """What each suffix gives on a fresh engine: the tokens a worker must give."""
    return [ToyThawEngine.start(**CONFIG).generate(TRUNK + suffix, PARAMS).token_ids for suffix in SUFFIXES]


def engines_own(pids: set[int]) -> list[int]:
    """Those of `pids` that are a ToyWithAProcess's own process."""
    own = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"time.sleep(3600)" in cmdline.read():
                    own.append(pid)
        except OSError:  # ended meanwhile
            pass
    return own


def started_by_its_engine(pid: int, timeout: float = 30) -> set[int]:
    """The processes descended from `pid` once its ToyWithAProcess's own process shows: Popen returns once that
    process has begun its exec, and for a while after (under load, long enough for a round) its command line is
    still empty."""
    deadline = time.monotonic() + timeout
    while not engines_own(started := descendants(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return started


def flaky(tmp_path):
    """A directory of instructions for the next starts (pool_engines.queue_starts), and a flaky engine's spec."""
    instructions = tmp_path / "starts"
    instructions.mkdir()
    return instructions, LaunchSpec("pool_engines:flaky", {"instructions": str(instructions), **CONFIG})


def open_pipes() -> dict[str, str]:
    """This process's open pipes, by fd (from /proc; none read elsewhere), once its multiprocessing resource
    tracker has started: a round's first shared-memory segment starts it, and its pipe stays open for good."""
    resource_tracker.ensure_running()
    opened = {}
    for fd in os.listdir("/proc/self/fd") if HAS_PROC else ():
        with contextlib.suppress(OSError):  # the listing's own fd, closed by now
            if (link := os.readlink(f"/proc/self/fd/{fd}")).startswith("pipe:"):
                opened[fd] = link
    return opened


def assert_pipes_back(before: dict[str, str], timeout: float = 10) -> None:
    """This process has the pipes open that it had `before`, within `timeout` seconds (a thread that held one
    may be finishing): a pool's workers' pipes are closed by close(), not left to the garbage collector."""
    deadline = time.monotonic() + timeout
    while (now := open_pipes()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now == before, f"{timeout} s after close(), open: {sorted(now.items() - before.items())}, closed: " \
                          f"{sorted(before.items() - now.items())}"


def round_(pool, parent):
    return pool.fork(parent, 2, context=TRUNK, suffixes=SUFFIXES, params=PARAMS)


def test_a_replacement_that_fails_to_start_is_named_and_started_again(parent, tmp_path):
    """A replacement that failed to start failed every later round at the same dead worker ('RuntimeError: pool
    worker 1 ...' for ever, or a read of its closed pipe): the round now names it, its engine's error and its exit
    status, and the dead worker it replaces with its own, before the parent is read, and it is started again for
    the next round."""
    fail, spec = flaky(tmp_path)
    with ForkPool(spec, workers=2, env=worker_env()) as pool:
        queue_starts(fail, "error", "exit")  # the replacement's start, then its restart's ("exit": without a word)
        victim = kill_and_wait(WorkerProcess(pool, 1))  # the next round finds it dead, and starts its replacement
        with pytest.raises(PoolWorkerDied, match=rf"^pool worker 1 \(pid {victim.pid}\) exited with status -9 \(killed "
                           rf"by SIGKILL\) between rounds, and its replacement: pool worker 1 \(pid (?!{victim.pid}\))"
                           r"\d+\) failed to start: starting the pool engine: RuntimeError: told to fail by .* \(it "
                           r"exited with status 1\); it is started again for the next round \(failed starts in a row: "
                           r"1 of 3\): the fork round failed before the parent was read$"):
            round_(pool, Unread(parent.page_size()))
        failing = pool.worker_info()[1]
        assert failing.state == "starting" and failing.failed_starts == 1  # its restart, its slot's count carried on
        with pytest.raises(PoolWorkerDied, match=rf"^pool worker 1 \(pid {failing.pid}\) failed to start \(it exited "
                                                 r"with status 3\); .*failed starts in a row: 2 of 3"):
            round_(pool, Unread(parent.page_size()))
        result = round_(pool, parent)  # its next restart finds no instruction left
        assert [g.token_ids for g in result.generations] == expected()
        assert [g.cached_tokens for g in result.generations] == [36, 36]
        assert pool.worker_info()[1].state == "ready"
        assert pool.worker_info()[1].failed_starts == 0  # a start that works resets its count


def test_a_worker_that_keeps_failing_to_start_is_given_up_after_a_bounded_number_of_tries(parent, tmp_path):
    fail, spec = flaky(tmp_path)
    with ForkPool(spec, workers=2, env=worker_env()) as pool:
        queue_starts(fail, *["error"] * MAX_FAILED_STARTS)
        kill_and_wait(WorkerProcess(pool, 0))
        for attempt in range(1, MAX_FAILED_STARTS):  # the first: the dead worker's replacement
            with pytest.raises(PoolWorkerDied, match=f"failed starts in a row: {attempt} of {MAX_FAILED_STARTS}"):
                round_(pool, Unread(parent.page_size()))
        last = pool.worker_info()[0]
        for _ in range(2):  # the last failure, then a round that finds it given up: no new process
            with pytest.raises(PoolWorkerDied, match=rf"pool worker 0 \(pid {last.pid}\) failed to start: .*; it "
                               rf"failed to start {MAX_FAILED_STARTS} times in a row and is no longer restarted: close "
                               "this pool and start a new one"):
                round_(pool, Unread(parent.page_size()))
            assert pool.worker_info()[0] == dataclasses.replace(last, state="given_up", failed_starts=MAX_FAILED_STARTS)
        # a given-up slot leaves the others serving (every round used slot 0, and failed)
        result = pool.fork(parent, 1, context=TRUNK, suffixes=SUFFIXES[:1], params=PARAMS)
        assert [g.token_ids for g in result.generations] == expected()[:1]
        with pytest.raises(PoolWorkerDied, match=r"1 of the pool's 2 workers are usable; a round of 2 needs 2: the "
                                                 "fork round failed before the parent was read$"):
            round_(pool, Unread(parent.page_size()))


def test_a_worker_that_dies_in_every_round_is_given_up_after_a_bounded_number_of_rounds(parent, tmp_path):
    """Only failed starts were counted: a worker whose engine died in every round (one request that crashes it)
    was replaced after each, for ever, each replacement loading its engine again. A slot whose workers died in
    MAX_DEATHS rounds in a row, none answering a round in between, is now given up, the round saying so."""
    dies = tmp_path / "dies"
    spec = LaunchSpec("pool_engines:ToyDyingInRounds.start", {"marker": str(dies), **CONFIG})
    died = r"pool worker {} \(pid {}\) exited with status 4"
    with ForkPool(spec, workers=2, env=worker_env()) as pool:
        dies.touch()
        for _ in range(MAX_DEATHS - 1):  # then a round they answer: their deaths are no longer in a row
            with pytest.raises(PoolWorkerDied, match=r"status 4; .*status 4: .*dead workers are being replaced\)$"):
                round_(pool, parent)
        dies.unlink()
        assert [g.token_ids for g in round_(pool, parent).generations] == expected()
        dies.touch()
        for _ in range(MAX_DEATHS - 1):
            with pytest.raises(PoolWorkerDied, match="dead workers are being replaced"):
                round_(pool, parent)
        last = pool.worker_info()
        given_up = r"; its slot's workers died {} times in a row, none answering a round in between, and it is no " \
                   "longer replaced: close this pool and start a new one"
        with pytest.raises(PoolWorkerDied, match="^" + "; ".join(died.format(w.slot, w.pid) +
                                                               given_up.format(MAX_DEATHS) for w in last) +
                           r": the fork round failed \(the parent engine is untouched\)$"):
            round_(pool, parent)
        assert pool.worker_info() == tuple(dataclasses.replace(w, state="given_up") for w in last)  # no replacement
        with pytest.raises(PoolWorkerDied, match=given_up.format(MAX_DEATHS) + r".*0 of the pool's 2 workers are "
                                                 "usable; a round of 2 needs 2: the fork round failed before the "
                                                 "parent was read$"):
            round_(pool, Unread(parent.page_size()))
        assert [w.state for w in pool.worker_info()] == ["given_up"] * 2


@pytest.mark.parametrize("reading", ["capture", "check"])
def test_a_worker_killed_while_the_parent_is_read_fails_the_round_before_any_worker_is_sent_it(parent, tmp_path,
                                                                                                monkeypatch, reading):
    """A worker that died while the round read the parent (its capture, or the pool's check of it) was found only
    as the round was sent to it: every other worker restored and generated first, for a round that then failed.
    It is found once the read ends, named with its exit status, before any worker is sent the round; the others are
    left as they were, and the next round runs on its replacement."""
    log = tmp_path / "rounds"
    spec = LaunchSpec("pool_engines:ToyDyingInRounds.start", {"marker": str(tmp_path / "never"), "log": str(log),
                                                                **CONFIG})
    with ForkPool(spec, workers=2, env=worker_env()) as pool:
        healthy, victim = WorkerProcess(pool, 0), WorkerProcess(pool, 1)
        read = parent
        if reading == "capture":
            read = Capturing(parent, lambda: kill_and_wait(victim))
        else:
            check = fork_pool._verify
            monkeypatch.setattr(fork_pool, "_verify", lambda source: (kill_and_wait(victim), check(source)))
        with pytest.raises(PoolWorkerDied, match=rf"^pool worker 1 \(pid {victim.pid}\) exited with status -9 "
                                                 r"\(killed by SIGKILL\) before the round was sent to any worker: the "
                                                 r"fork round failed \(the parent engine is untouched, dead workers are "
                                                 r"being replaced\)$"):
            round_(pool, read)
        assert not log.exists()  # no worker ran the round
        monkeypatch.undo()
        left = pool.worker_info()[0]
        assert (left.state, left.pid) == ("ready", healthy.pid)
        assert [g.token_ids for g in round_(pool, parent).generations] == expected()
        replaced = pool.worker_info()[1]
        assert replaced.state == "ready" and replaced.pid != victim.pid
        assert sorted(log.read_text().split()) == sorted([str(healthy.pid), str(replaced.pid)])


def test_a_replacement_killed_after_saying_ready_fails_the_next_round_before_the_parent_is_read(parent):
    """A replacement started after a round's death says ready on its pipe, which the next round reads: one killed
    before that round showed as exited but was not seen dead (its start not yet seen), so the round read the
    parent, then failed on it. Its start now counts as failed: the round fails first, and it is started again."""
    with ForkPool(parent, workers=2) as pool:
        with pytest.raises(PoolWorkerDied, match="being replaced"):
            round_(pool, Capturing(parent, WorkerProcess(pool, 1).kill))
        replacement = pool._workers[1].process  # its pipe, to see it said ready
        assert select.select([replacement.stdout], [], [], 60)[0], "the replacement did not say ready in 60 s"
        os.kill(replacement.pid, signal.SIGKILL)
        replacement.wait(timeout=60)  # its watcher has seen it exit
        with pytest.raises(PoolWorkerDied, match=rf"^pool worker 1 \(pid {replacement.pid}\) failed to start: it said "
                                                 r"ready, then exited \(it exited with status -9 \(killed by SIGKILL\)"
                                                 r"\); it is started again for the next round"):
            round_(pool, Unread(parent.page_size()))
        assert [g.token_ids for g in round_(pool, parent).generations] == expected()


@needs_proc
@pytest.mark.parametrize("when", ["between rounds", "mid-round"])
def test_what_a_killed_workers_engine_started_ends_with_it(parent, when):
    """A worker's engine may start processes of its own (vLLM's engine core, SGLang's scheduler). SIGKILLed, the
    worker left them running, holding their memory, for ever: vLLM's engine core never checks for its parent's
    death. They now end with it, whether the pool is reading from it at the time or not."""
    spec = LaunchSpec("pool_engines:ToyWithAProcess.start", CONFIG)
    with ForkPool(spec, workers=2, env=worker_env()) as pool:
        victim = WorkerProcess(pool, 1)
        started = started_by_its_engine(victim.pid)  # its engine's own process, and multiprocessing's tracker
        assert len(engines_own(started)) == 1
        if when == "between rounds":
            victim.kill()
            assert not outliving(started, timeout=10)  # its watcher's doing: nothing asked the pool meanwhile
            victim.wait()  # the pool sees it exit, no round run since
            assert zombie(victim.pid)  # and has not reaped it: only its own calls do (kill() relies on that)
        else:
            with pytest.raises(PoolWorkerDied, match=rf"pool worker 1 \(pid {victim.pid}\) exited with status -9"):
                round_(pool, Capturing(parent, victim.kill))
            assert not outliving(started, timeout=10)
        result = round_(pool, parent)  # the replacement serves (between rounds: started by this round)
        assert [g.token_ids for g in result.generations] == expected()


@needs_proc
def test_what_a_killed_fork_childs_engine_started_ends_with_it(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    from pool_engines import ToyWithAProcess

    engine = ToyWithAProcess.start(**CONFIG)
    try:
        engine.generate(TRUNK, PARAMS)
        [child] = fork(engine, 1, context=TRUNK, processes=True)
        try:
            started = started_by_its_engine(child.process.pid)
            assert len(engines_own(started)) == 1
            os.kill(child.process.pid, signal.SIGKILL)
            assert not outliving(started, timeout=10)
            with pytest.raises(RuntimeError, match=r"exited with status -9 \(killed by SIGKILL\)"):
                child.generate(TRUNK + [41], PARAMS)
        finally:
            child.close()
    finally:
        engine.close()


@pytest.mark.parametrize("dies", [False, True])
def test_close_from_another_thread_while_a_round_runs(parent, dies, pools):
    """close() while a round runs (not only while one waits for the lock): the round ends as it would have
    (its results, or PoolWorkerDied for a worker that died in it), no replacement is started for a worker that
    died in it, and once close() returns no worker is running."""
    closing = threading.Thread(target=lambda: pool.close())

    def close_meanwhile():
        if dies:
            WorkerProcess(pool, 1).kill()
        closing.start()
        deadline = time.monotonic() + 60
        while not pool.closed:  # close() has begun; it waits for this round to end
            assert time.monotonic() < deadline, "close() did not mark the pool closed within 60 s"
            time.sleep(0.001)

    pipes = open_pipes()
    pool = ForkPool(parent, workers=2)
    pools.append(pool)
    workers = pool.worker_info()
    try:
        if dies:
            with pytest.raises(PoolWorkerDied, match=r"pool worker 1 .* exited with status -9 .*: the fork round "
                                                     r"failed \(the parent engine is untouched\)$"):  # none replaced
                round_(pool, Capturing(parent, close_meanwhile))
        else:
            result = round_(pool, Capturing(parent, close_meanwhile))
            assert [g.token_ids for g in result.generations] == expected()
    finally:
        if closing.ident is not None:  # started (join raises for a thread that never was)
            closing.join(60)
    assert closing.ident is not None and not closing.is_alive()
    # no replacement, and none running, its pipes closed
    assert pool.worker_info() == tuple(dataclasses.replace(w, state="exited") for w in workers)
    assert not alive({w.pid for w in workers})
    assert_pipes_back(pipes)


def test_a_dead_workers_pipes_are_closed_here_not_by_the_garbage_collector(parent, tmp_path):
    """Pipes left to the garbage collector print 'ResourceWarning: unclosed file' and, for a stdin holding bytes
    a dead worker never read, 'Exception ignored ... BrokenPipeError'. Every worker this pool ever started, dead
    mid-round, failed to start, or stopped by close(), has both pipes closed: this process's open pipes are back
    to those it had before the pool (Linux), before any collection; and the collection, inside the watch for
    both, prints nothing."""
    fail, spec = flaky(tmp_path)
    printed, hook = [], sys.unraisablehook
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", ResourceWarning)
        sys.unraisablehook = printed.append
        try:
            pipes = open_pipes()
            pool = ForkPool(spec, workers=2, env=worker_env())
            try:  # not the `pools` fixture: it would hold the pool past the collection below
                queue_starts(fail, "error")  # the replacement's start; its restart starts normally
                with pytest.raises(PoolWorkerDied):  # worker 1 dies as the round begins; its send finds no reader
                    round_(pool, Capturing(parent, WorkerProcess(pool, 1).kill))
                with pytest.raises(PoolWorkerDied, match="failed to start"):
                    round_(pool, Unread(parent.page_size()))
                assert pool.worker_info()[1].failed_starts == 1
            finally:
                pool.close()
            assert_pipes_back(pipes)
            del pool
            gc.collect()
        finally:
            sys.unraisablehook = hook
    assert not printed and not [w for w in warned if issubclass(w.category, ResourceWarning)], (printed, warned)


@needs_proc
def test_process_fork_started_part_way_leaves_no_child(parent, tmp_path):
    """fork(..., processes=True) started its children in one list expression: when the OS refused the k-th
    process, the k-1 already started were never killed. Run in a process of its own with a low open-file limit."""
    script = tmp_path / "part_way.py"
    script.write_text(f"""
import os, resource
from descendants import descendants
from thaw_conformance.template.adapter import ToyThawEngine
from thaw_format.sdk import fork, greedy

engine = ToyThawEngine.start()
engine.generate({TRUNK}, greedy(1))
resource.setrlimit(resource.RLIMIT_NOFILE, (30, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    fork(engine, 20, context={TRUNK}, processes=True)
except OSError as exc:
    print(type(exc).__name__, exc)
def command(pid):
    with open(f"/proc/{{pid}}/cmdline", "rb") as cmdline:
        return cmdline.read()

# not the process's every child: capture_shared started multiprocessing's resource tracker
left = [pid for pid in descendants(os.getpid()) if b"thaw_format.sdk.child" in command(pid)]
print("children left" if left else "no children left")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **worker_env()})
    assert proc.returncode == 0, proc.stderr
    assert "Too many open files" in proc.stdout and proc.stdout.endswith("no children left\n"), proc.stdout



def pool_script(factory: str) -> str:
    """The start of a script that starts a pool of `factory` in a process of its own (a test then kills it)."""
    return f"""
import os, signal, threading, time
from descendants import descendants
from pool_engines import queue_starts, worker_env
from thaw_format.sdk import ForkPool, LaunchSpec

spec = LaunchSpec("pool_engines:{factory}", {CONFIG})

def wait_for_engines(count):
    \"\"\"Until `count` workers' engines have started their own process.\"\"\"
    while len(engines_own(descendants(os.getpid()))) < count:
        time.sleep(0.05)

{inspect.getsource(engines_own)}"""


@needs_proc
@pytest.mark.parametrize("factory", ["ToyWithAProcess.start", "loading_for_ever"])
def test_a_pools_workers_end_when_the_process_holding_the_pool_is_killed(tmp_path, factory):
    """Each worker leads its own session: the SIGKILL (or Ctrl-C, or killpg) that ends the pool's process does not
    reach it. A ready worker ends at the end of its input; one still loading its engine read no input, and lived
    on, with what its engine had started, holding their memory. Each now watches its parent and ends its own
    group once the parent is gone."""
    script = tmp_path / "holds_a_pool.py"
    script.write_text(pool_script(factory) + """
threading.Thread(target=ForkPool, args=(spec, 2), kwargs={"env": worker_env()}, daemon=True).start()
wait_for_engines(2)
print(" ".join(str(pid) for pid in descendants(os.getpid())), flush=True)
time.sleep(3600)
""")
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **worker_env()})
    try:
        started = {int(pid) for pid in holder.stdout.readline().split()}
        assert len(engines_own(started)) == 2, started
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not outliving(started, timeout=10)


@needs_proc
def test_a_worker_whose_parent_died_before_its_watch_began_ends(tmp_path):
    """The watch waited for os.getppid() to change from what it was when the watch began: a worker whose parent
    died before that (while the worker loaded Python) watched its new parent, init, went on loading its engine,
    and lived on, with what its engine started. It now compares with its parent's pid from its config."""
    script = tmp_path / "orphans_a_worker.py"
    script.write_text(f"""
import os, time
from pool_engines import worker_env
from thaw_format.sdk.engine_process import EngineProcess

os.environ["HOLDER_PID"] = str(os.getpid())  # the worker waits for this process to die (orphaned_worker)
worker = EngineProcess("orphaned_worker", {{"factory": "pool_engines:loading_for_ever", "kwargs": {CONFIG}}},
                       {{**os.environ, **worker_env()}})
print(worker.pid, flush=True)
time.sleep(3600)
""")
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **worker_env()})
    try:
        worker = int(holder.stdout.readline())
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    try:
        assert not outliving({worker}, timeout=60)  # it loads Python and thaw_format first: slow beside a CPU hog
    finally:  # without the fix: it and its engine's process, in its own group by now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker, signal.SIGKILL)


@needs_proc
def test_an_engine_process_ends_on_sigint_though_its_parent_ignores_it():
    """A process started in the background by a non-interactive shell (a CI's `pytest &`) ignores SIGINT, and every
    engine process it started, and what their engines started, inherited that: a SIGINT sent to one did nothing.
    An engine process now sets its own: KeyboardInterrupt, then its engine is closed and its group ends."""
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = idle_worker()
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        assert json.loads(process.stdout.readline()) == {"ready": True}
        started = descendants(process.pid)
        os.kill(process.pid, signal.SIGINT)
        process.wait(timeout=60)
        assert process.exit_status() == "status -2 (killed by SIGINT)"
        assert not outliving(started, timeout=10)
    finally:
        process.kill_quietly()


@needs_proc
def test_ctrl_c_while_the_pool_starts_ends_its_workers_at_once(tmp_path):
    """Ctrl-C while the workers load: close() closed each worker's input and waited up to 120 s for it to end, but
    a worker reads no input until its engine has started: the Ctrl-C took each worker's whole start (minutes,
    for a large model). A worker still starting is now killed."""
    script = tmp_path / "interrupts_a_pool.py"
    script.write_text(pool_script("loading_for_ever") + """
def interrupt():
    wait_for_engines(2)
    global interrupted
    interrupted = time.monotonic()
    os.kill(os.getpid(), signal.SIGINT)

signal.signal(signal.SIGINT, signal.default_int_handler)  # a process started in the background inherits SIGINT ignored
threading.Thread(target=interrupt, daemon=True).start()
try:
    ForkPool(spec, 2, env=worker_env())
except KeyboardInterrupt:
    print(f"closed {time.monotonic() - interrupted:.1f} s after Ctrl-C;", len(engines_own(descendants(os.getpid()))),
          "engines left")
""")
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **worker_env()})
    try:
        said = holder.communicate(timeout=60)[0]  # TimeoutExpired if it took the workers' starts
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    seconds, left = re.fullmatch(r"closed (\S+) s after Ctrl-C; (\d+) engines left\n", said).groups()
    assert float(seconds) < 10 and left == "0", said


def test_ctrl_c_mid_round_kills_the_workers_yet_to_answer_and_starts_their_replacements_next_round(parent,
                                                                                                  monkeypatch):
    """Interrupted mid-round, the pool started the replacements at once: a close() that followed (the usual next
    step after Ctrl-C) waited for each to finish starting. They are now started by the next round."""
    with ForkPool(parent, workers=2) as pool:
        before, answered = pool.worker_info(), fork_pool.note_answer

        def interrupted(worker):
            answered(worker)
            monkeypatch.setattr(fork_pool, "note_answer", answered)  # the next round's answers are noted as usual
            raise KeyboardInterrupt  # after worker 0's answer: worker 1 is yet to answer

        monkeypatch.setattr(fork_pool, "note_answer", interrupted)
        with pytest.raises(KeyboardInterrupt):
            round_(pool, parent)
        # worker 1 killed and reaped ("exited": its process's returncode), none replaced yet
        assert pool.worker_info() == (before[0], dataclasses.replace(before[1], state="exited"))
        assert not alive({before[1].pid})
        result = round_(pool, parent)
        assert [g.token_ids for g in result.generations] == expected()
        after = pool.worker_info()
        assert after[0] == before[0] and after[1].state == "ready" and after[1].pid != before[1].pid


def idle_worker() -> EngineProcess:
    """A pool worker's process, on the toy engine, waiting for its first round."""
    spec = LaunchSpec("pool_engines:ToyWithAProcess.start", CONFIG)
    return EngineProcess("thaw_format.sdk.pool_worker", {"factory": spec.factory, "kwargs": spec.kwargs},
                         {**os.environ, **worker_env()})


@needs_proc
def test_an_engine_process_whose_watcher_cannot_start_is_killed_and_reaped(monkeypatch):
    """Without its watcher no one would end its group, nor reap it: the constructor's error left it running."""
    def refused(thread):
        raise RuntimeError("can't start new thread")

    before = descendants(os.getpid())
    monkeypatch.setattr(engine_process.threading.Thread, "start", refused)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        idle_worker()
    monkeypatch.undo()
    assert not outliving(descendants(os.getpid()) - before, timeout=10)


def test_an_engine_process_reaped_elsewhere_has_an_unknown_status_and_its_group_is_not_killed(monkeypatch):
    """Reaped by another's os.wait, its pid, and so its group id, may already be another process's: killing
    that group could kill a stranger; and Popen reads the lost status as 0, which said it exited cleanly."""
    def reaped(*args):
        raise ChildProcessError

    killed = []
    monkeypatch.setattr(engine_process.os, "waitid", reaped)
    monkeypatch.setattr(engine_process.os, "killpg", lambda *args: killed.append(args))
    process = idle_worker()
    process.stdin.close()  # it exits at the end of its input
    process.wait(timeout=60)
    monkeypatch.undo()
    assert process.exit_status() == "an unknown status (reaped elsewhere)"
    process.kill_quietly()
    assert not killed
