"""RayForkPool (thaw_ray) on real engines in Ray actors: the fork rounds of tests/fork_pool_checks.py (three
trunks, each child's tokens a fresh engine's and its cached tokens the trunk's full pages; a context without a
full page refused unread), an actor killed mid-round named and replaced, one killed between rounds replaced by
the next round before it runs, an object that fails its check refused by every actor before its engine changes,
engines that hang starting given up together (and one whose window ran out between rounds at once), and
arguments refused before the parent is read."""

import contextlib
import gc
import logging
import os
import re
import signal
import threading
import time

import pytest

import fork_pool_checks as checks
from descendants import (HAS_PROC, descendants, left_behind, lingering, mapped_segments, outliving,
                         unlink_left_behind)
from fork_pool_checks import (  # noqa: F401  the pool's tests, written once for every pool and engine
    test_rounds_with_different_trunks_match_fresh_engines,
    test_a_context_without_a_full_page_is_refused_before_the_parent_is_read)
from thaw_format import CorruptSnapshotError
from thaw_format.sdk import PoolWorkerDied, greedy
from thaw_format.sdk.pool_slots import MAX_FAILED_STARTS

PARAMS = checks.PARAMS
NODE = r"on node \S+ [0-9a-f]+"  # after a worker's pid: its node's address and Ray id
# the tests that run on vLLM and SGLang too (conftest: their engines take tens of seconds to start on two cores)
VLLM_TESTS = frozenset({"test_rounds_with_different_trunks_match_fresh_engines",
                        "test_a_context_without_a_full_page_is_refused_before_the_parent_is_read",
                        "test_an_actor_killed_mid_round_is_named_and_replaced",
                        "test_an_actor_killed_between_rounds_is_replaced_before_the_next_round",
                        "test_a_damaged_object_is_refused_by_every_actor_before_its_engine_changes"})
SGLANG_TESTS = frozenset(VLLM_TESTS)


def test_the_engine_subsets_name_tests_of_this_module() -> None:
    """A test renamed would otherwise drop out of the vLLM or SGLang lane without a word (this test runs in the core
    lane)."""
    assert VLLM_TESTS | SGLANG_TESTS <= {name for name, value in globals().items() if callable(value)}


def _ray():
    import ray

    return ray


class _ActorProcess:
    """An actor's process, as fork_pool_checks' kill_during_capture kills it: Ray's raylet, its parent, reaps it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)  # no signal sent: whether the process is there (any POSIX system, unlike /proc)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: the pid was reused, so the actor's process is gone
            return False
        return True

    def wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.alive(), f"actor process {self.pid} still there after {timeout} s"


def test_an_actor_killed_mid_round_is_named_and_replaced(pool, parent, fresh) -> None:
    trunk, suffixes = checks.tokens(120, 80), [checks.tokens(5, 800 + i) for i in range(checks.WORKERS)]
    # the next round's: the surviving actor's engine may keep the failed round's prompt in its cache (the toy's
    # restore adds pages to what it holds), which would count beyond the trunk
    others = [checks.tokens(5, 810 + i) for i in range(checks.WORKERS)]
    want = [fresh(trunk + suffix, PARAMS) for suffix in others]
    parent.generate(trunk, PARAMS)
    parent.generate(trunk + suffixes[0], PARAMS)  # the parent's steady state for this prompt
    before = parent.generate(trunk + suffixes[0], PARAMS)
    victim = pool.worker_info()[1]
    killing = checks.kill_during_capture(parent, _ActorProcess(victim.pid))  # SIGKILL, as the OOM killer would
    died = rf"pool worker 1 \(Ray actor [0-9a-f]+, pid {victim.pid} {NODE}\) died: \w+Error: .*parent engine is " \
           r"untouched, dead workers are being replaced"
    with _leaves_nothing(victim.pid), pytest.raises(PoolWorkerDied, match=died):  # its checks after the round's
        pool.fork(killing, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert parent.generate(trunk + suffixes[0], PARAMS) == before  # the parent serves as before, cache and all
    result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=others, params=PARAMS)
    assert [g.token_ids for g in result.generations] == want
    assert [g.cached_tokens for g in result.generations] == [checks.full_pages(trunk, parent)] * checks.WORKERS
    replacement = pool.worker_info()[1]
    assert replacement.state == "ready" and replacement.pid != victim.pid and _ActorProcess(replacement.pid).alive()


def test_an_actor_killed_between_rounds_is_replaced_before_the_next_round(pool, parent) -> None:
    """An actor that died between rounds failed the next round (Ray tells of its death only through a call): each
    round now first asks its actors where they are, and Ray's answer for a dead one has the round start its
    replacement, before the parent is read, and run on it, every child's output the same; what the dead actor's
    engine held in /dev/shm (vLLM's, SGLang's) swept on this path too."""
    trunk, suffixes = checks.tokens(110, 85), [checks.tokens(5, 850 + i) for i in range(checks.WORKERS)]
    parent.generate(trunk, PARAMS)
    before = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    victim = pool.worker_info()[1]
    with _leaves_nothing(victim.pid):
        _kill(pool, [1])
        result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert [g.token_ids for g in result.generations] == [g.token_ids for g in before.generations]
    assert [g.cached_tokens for g in result.generations] == [checks.full_pages(trunk, parent)] * checks.WORKERS
    replacement = pool.worker_info()[1]
    assert replacement.state == "ready" and _ActorProcess(replacement.pid).alive()
    assert replacement.pid != victim.pid and replacement.id != victim.id


def test_a_replacement_killed_before_any_round_saw_it_start_is_replaced_before_the_parent_is_read(
        pool, parent, fresh) -> None:
    """A replacement whose start answered, killed before a round has seen it start: the next round asks it where
    it is as it asks every started actor (Ray keeps its start's answer, which a round would take for a started
    engine), replaces it before the parent is read, and runs on the new one."""
    ray = _ray()
    trunk, suffixes = checks.tokens(70, 86), [checks.tokens(5, 860 + i) for i in range(checks.WORKERS)]
    want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
    parent.generate(trunk, PARAMS)
    victim = pool.worker_info()[1]
    with pytest.raises(PoolWorkerDied, match="dead workers are being replaced"):
        pool.fork(checks.kill_during_capture(parent, _ActorProcess(victim.pid)), checks.WORKERS, context=trunk,
                  suffixes=suffixes, params=PARAMS)
    replacement, replacement_id = pool.actors()[1], pool.worker_info()[1].id
    ray.get(replacement.generate.remote(trunk, dict(max_tokens=1)))  # after its start (an actor's calls in order)
    assert pool.worker_info()[1].state == "starting"  # no round has seen its start
    _kill(pool, [1])
    result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert [g.token_ids for g in result.generations] == want
    assert pool.worker_info()[1].id not in (victim.id, replacement_id)


@contextlib.contextmanager
def _leaves_nothing(pid: int):
    """Around an actor's death: once the block is done, its engine's own processes (vLLM's engine core) have ended,
    by the raylet, a subreaper (conftest's SYSTEM_CONFIG), and what it and they mapped in /dev/shm (vLLM's segments
    and semaphore), left by their tracker's death, is gone: swept on the actor's node by the pool
    (thaw_ray.leftovers) once they have ended. A segment a live process still maps once they have ended is not
    theirs: the parent's, which an actor on the parent's node read in place."""
    started = descendants(pid) if HAS_PROC else set()
    segments = mapped_segments({pid} | started) if HAS_PROC else set()
    try:
        yield
        assert not outliving({pid} | started, timeout=30)
        others = {name for name in segments if os.path.exists(f"/dev/shm/{name}")} - left_behind(segments)
        assert not lingering(segments - others, timeout=90), \
            "the killed actor's engine left its shared memory in /dev/shm"
    finally:
        unlink_left_behind(segments)  # a failed run's, so that runs do not fill /dev/shm


@pytest.mark.skipif(not HAS_PROC, reason="actors record what they hold from /proc (Linux)")
def test_what_the_engine_of_a_dead_actor_made_is_swept_on_its_node_by_the_pools_close(ray_cluster) -> None:
    """A toy engine whose process of its own holds shared memory, as vLLM's engine core does, leaves it with its
    actor SIGKILLed; the pool's close finds the actor dead and sweeps its node (thaw_ray.leftovers), once the
    raylet has ended that process. No actor replaces it: nothing else sweeps there. A segment that was in /dev/shm
    before the engine started, mapped by its process too, is not the engine's: it stays."""
    from multiprocessing import resource_tracker, shared_memory

    from pool_engines import worker_env
    from thaw_format.sdk import LaunchSpec
    from thaw_ray import RayForkPool

    before = shared_memory.SharedMemory(create=True, size=4096)
    resource_tracker.unregister(before._name, "shared_memory")  # unlinked below
    spec = LaunchSpec("pool_engines:ToyHoldingMemory.start", {"vocab_size": 1024, "attach": [before.name]})
    made = set()
    try:
        pool = RayForkPool(spec, workers=1, actor_options={"runtime_env": {"env_vars": worker_env()}})
        try:
            made = mapped_segments(descendants(pool.worker_info()[0].pid)) - {before.name}  # its engine's segment
            assert len(made) == 1, made
            before.close()  # mapped by the engine's process alone
            _kill(pool, [0])
            pool.close()
            assert not lingering(made, timeout=90), "the killed actor's engine left its shared memory in /dev/shm"
            assert os.path.exists(f"/dev/shm/{before.name}"), "the sweep removed a segment older than the engine"
        finally:
            pool.close()
            unlink_left_behind(made)  # a failed run's, so that runs do not fill /dev/shm
    finally:
        before.close()
        unlink_left_behind({before.name})


@pytest.mark.skipif(not HAS_PROC, reason="actors record what they hold from /proc (Linux)")
def test_a_sweep_that_fails_is_warned_and_leaves_ray_no_unhandled_error(ray_cluster, caplog) -> None:
    """The sweep of a dead actor's node runs without anyone waiting for it: one that fails (here its manifest's name
    taken by a directory, which it cannot read) is thaw_ray's warning, naming the actor, and not an error answer
    left unread, which Ray would log later as "Unhandled error" (Ray's own log, which the root logger never sees)."""
    from thaw_conformance.template.adapter import ToyThawEngine
    from thaw_ray import RayForkPool, leftovers

    ray_log = logging.getLogger("ray")
    ray_log.addHandler(caplog.handler)
    unhandled = re.compile(r"Unhandled error.*IsADirectoryError", re.S)  # this sweep's, not an earlier test's
    warned = r"thaw_ray: sweeping what pool worker 0 \(Ray actor {}, pid {} {}\) left on its node: " \
             r"RayTaskError\(IsADirectoryError\)"
    manifest = None
    try:
        with RayForkPool(ToyThawEngine.start(vocab_size=1024), workers=1) as pool:
            victim = pool.worker_info()[0]
            manifest = leftovers.manifest_path(victim.id)
            os.mkdir(manifest)
            _kill(pool, [0])
        # its close found it dead and swept its node: the sweep's answer taken (settle), Ray has marked it read
        # before the warning is logged, so no "Unhandled error" follows the warning
        del pool
        gc.collect()
        warning = warned.format(victim.id, victim.pid, NODE)
        deadline = time.monotonic() + 60
        while not (re.search(warning, caplog.text) or unhandled.search(caplog.text)):
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.1)
        absent = time.monotonic() + 2  # an "Unhandled error" that would follow the warning: given time to show
        while not unhandled.search(caplog.text) and time.monotonic() < absent:
            time.sleep(0.1)
        assert not unhandled.search(caplog.text), caplog.text
    finally:
        ray_log.removeHandler(caplog.handler)
        if manifest is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(manifest)


@pytest.mark.skipif(not HAS_PROC, reason="actors record what they hold from /proc (Linux)")
def test_what_an_engine_made_while_its_start_hung_is_swept_when_the_start_is_given_up(ray_cluster, tmp_path) -> None:
    """An actor writes down what its engine holds while the engine starts, not only once it has started: an engine
    whose start hangs after its process made shared memory, given up at start_timeout_s (its actor killed), leaves
    nothing in /dev/shm, swept on its node."""
    from pool_engines import worker_env
    from thaw_format.sdk import LaunchSpec
    from thaw_ray import RayForkPool

    said = tmp_path / "segment"
    spec = LaunchSpec("pool_engines:holding_then_hanging", {"said": str(said), "vocab_size": 1024})
    try:
        with pytest.raises(PoolWorkerDied, match=r"its engine was still starting 20 s \(start_timeout_s\)"):
            RayForkPool(spec, workers=1, actor_options={"runtime_env": {"env_vars": worker_env()}},
                        start_timeout_s=20)
        assert said.exists(), "the engine's start did not reach its segment within start_timeout_s"
        assert not lingering({said.read_text()}, timeout=90), \
            "the given-up actor's engine left its shared memory in /dev/shm"
    finally:  # a failed run's, so that runs do not fill /dev/shm: its name read here too, said after the assert
        unlink_left_behind({said.read_text()} if said.exists() else set())


def test_a_damaged_object_is_refused_by_every_actor_before_its_engine_changes(pool, parent, fresh) -> None:
    """What an actor is handed is checked in the actor (the object store's bytes may come over the network): one
    bit flipped in the parent's capture, put as it is or read in place, fails the round by the object's or the
    segment's name, and each actor's engine serves as it did, holding the last good round's KV."""
    ray = _ray()
    good, bad = checks.tokens(100, 91), checks.tokens(110, 92)
    suffixes = [checks.tokens(5, 900 + i) for i in range(checks.WORKERS)]
    parent.generate(good, PARAMS)
    pool.fork(parent, checks.WORKERS, context=good, suffixes=suffixes, params=PARAMS)
    actors = pool.actors()  # to ask each engine outside a round
    probe = [dict(temperature=0.0, max_tokens=10, ignore_eos=True)]
    held = [ray.get(a.generate.remote(good + s, *probe)) for a, s in zip(actors, suffixes)]  # steady state
    assert all(h["cached_tokens"] >= checks.full_pages(good, parent) for h in held)  # what a change would show
    parent.generate(bad, PARAMS)
    # an actor on the parent's node reads its segment, one on the other node the object (test_segment.py)
    refusal = (rf"pool worker \d \(Ray actor [0-9a-f]+, pid \d+ {NODE}\) refused the round's (?:object [0-9a-f]+|"
               r"segment shm://\S+): "
               r"CorruptSnapshotError: tensor 'kv/0/k' \(region \d+\): checksum mismatch in chunk 0, .*?its engine is "
               r"untouched")
    with pytest.raises(CorruptSnapshotError, match=r"parent engine is untouched\)$") as refused:
        pool.fork(checks.Capturing(parent, after=checks.flip_a_bit), checks.WORKERS, context=bad, suffixes=suffixes,
                  params=PARAMS)
    assert len(re.findall(refusal, str(refused.value))) == checks.WORKERS, str(refused.value)
    assert [ray.get(a.generate.remote(good + s, *probe)) for a, s in zip(actors, suffixes)] == held
    want = [fresh(bad + suffix, PARAMS) for suffix in suffixes]
    result = pool.fork(parent, checks.WORKERS, context=bad, suffixes=suffixes, params=PARAMS)  # a fresh capture
    assert [g.token_ids for g in result.generations] == want


@pytest.mark.parametrize("arguments, error", [
    (dict(n=0), r"this pool has 2 workers; a round takes 1\.\.2, got 0"),
    (dict(n=3), r"this pool has 2 workers; a round takes 1\.\.2, got 3"),
    (dict(suffixes=[[5]]), r"2 children need 2 suffixes, got 1"),
    (dict(suffixes=[[5], "ab"]), r"suffix 1 is a sequence of token ids"),
    (dict(params={"max_tokens": 3}), r"params is a thaw_format.SamplingParams .* or one per child, not dict"),
    (dict(params=[greedy(3)]), r"2 children take one SamplingParams, or 2 \(one each\), got 1"),
    (dict(context=[1.5] * 40), r"the context is a sequence of token ids"),
])
def test_arguments_are_refused_before_the_parent_is_read(pool, arguments, error) -> None:
    """The same checks as ForkPool's (thaw_format.sdk.fork_round), before any capture or put."""
    round_ = dict(n=checks.WORKERS, context=checks.tokens(40, 1), suffixes=[[5], [6]], params=PARAMS) | arguments
    with pytest.raises((TypeError, ValueError), match=error):
        pool.fork(checks.Unread(), round_.pop("n"), **round_)


def test_a_pool_is_refused_by_name_before_any_actor_starts(ray_cluster, parent) -> None:
    from thaw_ray import RayForkPool

    with pytest.raises(TypeError, match="workers is a whole number of engines, not bool"):
        RayForkPool(parent, True)
    with pytest.raises(ValueError, match="needs workers >= 1, got 0"):
        RayForkPool(parent, 0)
    with pytest.raises(TypeError, match="RayForkPool takes a contract engine .* or a LaunchSpec, not str"):
        RayForkPool("x", 1)
    with pytest.raises(ValueError, match="actor_options may not set max_restarts: the pool replaces a dead actor"):
        RayForkPool(parent, 1, actor_options={"max_restarts": 3})
    with pytest.raises(ValueError, match=r"may not set lifetime: its actors end with the pool .*; name: .*; "
                                         r"get_if_exists: each of its actors is a new one"):
        RayForkPool(parent, 1, actor_options={"get_if_exists": True, "name": "a", "lifetime": "detached"})
    with pytest.raises(ValueError, match="start_timeout_s is a number of seconds > 0, not 0"):
        RayForkPool(parent, 1, start_timeout_s=0)


def test_a_closed_pool_refuses_a_round_before_the_parent_is_read(ray_cluster, parent) -> None:
    """And its close forgets this process's mapping of the parent's segment (lent's cache, which its puts read
    through): kept, it would keep the segment's memory alive after the parent unlinks it. Its actor on the other
    node, so that the round puts: one Ray placed beside the driver would read the segment in place, and nothing
    here would map it (test_segment.py)."""
    from thaw_format.sdk import lent
    from thaw_ray import RayForkPool

    trunk = checks.tokens(40, 7)
    parent.generate(trunk, PARAMS)
    pool = RayForkPool(parent, workers=1, actor_options={"resources": {"other": 1}}, start_timeout_s=120)
    worker, sources = pool.worker_info()[0], []
    result = pool.fork(checks.Capturing(parent, after=sources.append), 1, context=trunk, suffixes=[[5]],
                       params=PARAMS)
    assert result.kv_via == ["object"]
    (name,) = {lent.parse(source)[0] for source in sources}  # the parent's segment, which the round's put read
    assert (name, False) in lent._MAPPINGS
    pool.close()
    assert (name, False) not in lent._MAPPINGS
    with pytest.raises(RuntimeError, match="this RayForkPool is closed; start a new one"):
        pool.fork(checks.Unread(), 1, context=checks.tokens(40, 7), suffixes=[[5]], params=PARAMS)
    _ActorProcess(worker.pid).wait(timeout=60)  # close() ended it


def _kill(pool, slots) -> None:
    """SIGKILL the actors in `slots` (as the OOM killer would) and wait until they are gone: between rounds, the
    next round finds them dead and starts their replacements first; during a capture, the round fails and starts
    them."""
    for slot in slots:
        os.kill(pool.worker_info()[slot].pid, signal.SIGKILL)
    for slot in slots:
        _ActorProcess(pool.worker_info()[slot].pid).wait()


def _failed_start(why: str, attempt: int, slot: str = "0") -> str:
    return (rf"pool worker {slot} \(Ray actor [0-9a-f]+, pid \d+ {NODE}\) failed to start: {why}; it is started again "
            rf"for the next round \(failed starts in a row: {attempt} of {MAX_FAILED_STARTS}\)")


def test_an_actor_that_keeps_failing_to_start_is_retried_then_given_up(ray_cluster, tmp_path) -> None:
    """The pool's own bookkeeping (thaw_format.sdk.pool_slots, shared with ForkPool), on the toy engine: a
    replacement actor whose engine fails to start fails the next round before the parent is read, naming it, its
    node and why, and is started again, MAX_FAILED_STARTS times in a row at most."""
    from pool_engines import queue_starts, worker_env
    from thaw_conformance.template.adapter import ToyThawEngine
    from thaw_format.sdk import LaunchSpec
    from thaw_ray import RayForkPool

    config = {"vocab_size": 1024}
    parent = ToyThawEngine.start(**config)
    trunk, suffixes = checks.tokens(40, 3), [[5], [6]]
    parent.generate(trunk, PARAMS)
    instructions = tmp_path / "starts"
    instructions.mkdir()
    spec = LaunchSpec("pool_engines:flaky", {"instructions": str(instructions), **config})
    # the tests' directory on the actors' path, for pool_engines (pytest puts it on this process's only)
    with RayForkPool(spec, workers=2, actor_options={"runtime_env": {"env_vars": worker_env()}}) as pool:
        queue_starts(instructions, *["error"] * MAX_FAILED_STARTS)
        victim = pool.worker_info()[0]
        _kill(pool, [0])
        for attempt in range(1, MAX_FAILED_STARTS):  # the first: the dead actor's replacement, named with it
            replacing = rf"pool worker 0 \(Ray actor {victim.id}, pid {victim.pid} {NODE}\) died between rounds: " \
                        r"\w+Error: [^;]*, and its replacement: " if attempt == 1 else ""
            with pytest.raises(PoolWorkerDied, match="^" + replacing + _failed_start(r"starting the pool engine: "
                                                                                     r"RuntimeError: told to fail by "
                                                                                     r".*", attempt) +
                                                     ": the fork round failed before the parent was read$"):
                pool.fork(checks.Unread(), 2, context=trunk, suffixes=suffixes, params=PARAMS)
        with pytest.raises(PoolWorkerDied, match=rf"failed to start {MAX_FAILED_STARTS} times in a row and is no "
                                                 "longer restarted: close this pool and start a new one"):
            pool.fork(checks.Unread(), 2, context=trunk, suffixes=suffixes, params=PARAMS)
        result = pool.fork(parent, 1, context=trunk, suffixes=suffixes[:1], params=PARAMS)  # the slot left
        assert [g.token_ids for g in result.generations] == \
            [ToyThawEngine.start(**config).generate(trunk + suffixes[0], PARAMS).token_ids]


def _toy_round(seed: int):
    """A two-child round on the toy engine: its config, the parent holding the trunk, the trunk, the suffixes, and
    each child's tokens from a fresh engine."""
    from thaw_conformance.template.adapter import ToyThawEngine

    config = {"vocab_size": 1024}
    parent = ToyThawEngine.start(**config)
    trunk, suffixes = checks.tokens(40, seed), [[5], [6]]
    parent.generate(trunk, PARAMS)
    return config, parent, trunk, suffixes, [ToyThawEngine.start(**config).generate(trunk + suffix, PARAMS).token_ids
                                             for suffix in suffixes]


def test_an_actor_that_dies_while_the_round_waits_for_a_replacement_is_replaced_before_the_parent_is_read(
        ray_cluster, tmp_path) -> None:
    """The round asks its actors where they are as it begins, then waits for a replacement's start: an actor that
    answered and dies during that wait is asked again once the wait is over, and replaced before the parent is read
    (else its death would fail the round once the parent is read)."""
    from pool_engines import queue_starts, worker_env
    from thaw_format.sdk import LaunchSpec
    from thaw_ray import RayForkPool

    exceptions = ray_cluster.exceptions
    config, parent, trunk, suffixes, want = _toy_round(6)
    instructions = tmp_path / "starts"
    instructions.mkdir()
    spec = LaunchSpec("pool_engines:flaky", {"instructions": str(instructions), **config})
    with RayForkPool(spec, workers=2, actor_options={"runtime_env": {"env_vars": worker_env()}}) as pool:
        queue_starts(instructions, "held", "held")  # slot 0's replacement, then slot 1's
        answered, handle = pool.worker_info()[1], pool.actors()[1]
        _kill(pool, [0])
        done, seen = threading.Event(), {}

        def kill_while_the_round_waits() -> None:  # once slot 0's replacement has begun: the round asked slot 1
            try:
                while not ((instructions / "claimed-0").exists() or done.wait(0.05)):
                    pass
                os.kill(answered.pid, signal.SIGKILL)
                while not done.is_set():  # dead to Ray (as the round's next pass finds it) before the release
                    try:
                        ray_cluster.get(handle.where.remote(), timeout=10)
                    except exceptions.RayActorError:
                        break
                    except exceptions.GetTimeoutError:
                        continue
                    done.wait(0.05)
                seen["replaced early"] = (instructions / "claimed-1").exists()
            finally:
                (instructions / "release").write_text("")

        killer = threading.Thread(target=kill_while_the_round_waits)
        killer.start()
        try:
            result = pool.fork(parent, 2, context=trunk, suffixes=suffixes, params=PARAMS)
        finally:
            done.set()
            killer.join()
        # slot 1's replacement began only once slot 0's start was released: the round's second pass replaced it
        assert seen == {"replaced early": False} and (instructions / "claimed-1").exists()
        assert [g.token_ids for g in result.generations] == want
        assert pool.worker_info()[1].id != answered.id and pool.worker_info()[1].state == "ready"
        assert not _ActorProcess(answered.pid).alive()


def test_actors_that_keep_dying_while_the_round_waits_fail_it_before_the_parent_is_read(ray_cluster,
                                                                                        monkeypatch) -> None:
    """The round asks its actors again after each start it waited for, MAX_DEATHS + 1 passes at most: actors that
    keep dying meanwhile (here each pass replaces its actor) fail it (PoolWorkerDied), not a wait without end."""
    from thaw_conformance.template.adapter import ToyThawEngine
    from thaw_format.sdk import round_pool
    from thaw_format.sdk.pool_slots import MAX_DEATHS
    from thaw_ray import RayForkPool

    passes = []

    def replacing(pool, n: int) -> list[int]:  # a pass whose actor died meanwhile: its replacement waited for
        passes.append(n)
        pool._workers[0].kill()
        pool._workers[0] = pool._start("0")
        pool._workers[0].ensure_ready()
        return [0]

    with RayForkPool(ToyThawEngine.start(vocab_size=1024), workers=1) as pool:
        monkeypatch.setattr(round_pool.RoundPool, "_ready_slots", replacing)
        with pytest.raises(PoolWorkerDied, match=rf"actors kept dying while the round waited for their replacements "
                                                 rf"\({MAX_DEATHS + 1} passes\): the fork round failed before the "
                                                 rf"parent was read"):
            pool.fork(checks.Unread(), 1, context=checks.tokens(40, 7), suffixes=[[5]], params=PARAMS)
        assert passes == [1] * (MAX_DEATHS + 1)


@contextlib.contextmanager
def _hanging_replacements(tmp_path, workers: int, timeout: float):
    """A toy pool of `workers` actors, killed in a round: the round fails and starts their replacements, whose
    engines hang starting, each with `timeout` s (start_timeout_s). Yields the pool, the toy parent, its trunk and
    suffixes once every replacement is placed."""
    from pool_engines import queue_starts, worker_env
    from thaw_conformance.template.adapter import ToyThawEngine
    from thaw_format.sdk import LaunchSpec
    from thaw_ray import RayForkPool

    config = {"vocab_size": 1024}
    parent = ToyThawEngine.start(**config)
    trunk, suffixes = checks.tokens(40, 5), [[5 + i] for i in range(workers)]
    parent.generate(trunk, PARAMS)
    instructions = tmp_path / "starts"
    instructions.mkdir()
    spec = LaunchSpec("pool_engines:flaky", {"instructions": str(instructions), **config})
    options = {"num_cpus": 0.5, "runtime_env": {"env_vars": worker_env()}}  # beside the session's pool
    with RayForkPool(spec, workers=workers, actor_options=options, start_timeout_s=120) as pool:
        pool.start_timeout_s = timeout  # for the replacements (their starts hang): a start under load takes longer
        queue_starts(instructions, *["hang"] * workers)
        with pytest.raises(PoolWorkerDied, match="died: .*dead workers are being replaced"):
            pool.fork(checks.Capturing(parent, before=lambda: _kill(pool, range(workers))), workers, context=trunk,
                      suffixes=suffixes, params=PARAMS)
        waiting = time.monotonic() + 120
        while not all(worker.pid for worker in pool.worker_info()):  # the replacements placed, their engines hanging
            assert time.monotonic() < waiting, pool.worker_info()
            time.sleep(0.05)
        yield pool, trunk, suffixes


def _hung(timeout: float) -> str:
    return _failed_start(rf"its engine was still starting {timeout} s \(start_timeout_s\) after the actor was "
                         r"placed \(it is killed\)", attempt=1, slot=r"\d")


def test_actors_whose_engines_all_hang_starting_are_given_up_together(ray_cluster, tmp_path) -> None:
    """Each placed actor's engine has start_timeout_s from its own placing, seen as it happens for every actor
    (not when the round gets to it): n engines that hang starting fail the round in about one start_timeout_s,
    not n of them one after another, each a failed start (its actor killed), not kept as one still starting."""
    timeout, workers = 8, 3
    with _hanging_replacements(tmp_path, workers, timeout) as (pool, trunk, suffixes):
        placed = time.monotonic()
        with pytest.raises(PoolWorkerDied) as raised:
            pool.fork(checks.Unread(), workers, context=trunk, suffixes=suffixes, params=PARAMS)
        took = time.monotonic() - placed
        assert type(raised.value) is PoolWorkerDied  # failed starts, not ones still starting
        assert len(re.findall(_hung(timeout), str(raised.value))) == workers, str(raised.value)
        assert timeout - 1 <= took < 1.5 * timeout  # one window from their placing, not one per actor


def test_an_engine_hanging_past_its_window_between_rounds_fails_the_next_round_at_once(ray_cluster,
                                                                                      tmp_path) -> None:
    """An actor placed between rounds, its engine hanging starting for longer than start_timeout_s before the
    next round: that round fails its start at once (its window ran from its placing), not after a fresh one."""
    timeout = 6
    with _hanging_replacements(tmp_path, 1, timeout) as (pool, trunk, suffixes):
        time.sleep(timeout + 1)  # its window, from its placing, is over
        began = time.monotonic()
        with pytest.raises(PoolWorkerDied) as raised:
            pool.fork(checks.Unread(), 1, context=trunk, suffixes=suffixes, params=PARAMS)
        took = time.monotonic() - began
        assert type(raised.value) is PoolWorkerDied and re.search(_hung(timeout), str(raised.value)), raised.value
        assert took < timeout / 3, took  # at once, not a new start_timeout_s


def test_an_actor_that_dies_in_every_round_is_given_up_after_a_bounded_number_of_rounds(ray_cluster,
                                                                                       tmp_path) -> None:
    """ForkPool's rule, from the bookkeeping both pools share (thaw_format.sdk.pool_slots): a slot whose actors
    died MAX_DEATHS times in a row, none answering a round in between, is no longer replaced, the round
    saying so; a round they answer starts the count again."""
    from pool_engines import worker_env
    from thaw_format.sdk import LaunchSpec
    from thaw_format.sdk.pool_slots import MAX_DEATHS
    from thaw_ray import RayForkPool

    config, parent, trunk, suffixes, expected = _toy_round(3)
    dies = tmp_path / "dies"
    spec = LaunchSpec("pool_engines:ToyDyingInRounds.start", {"marker": str(dies), **config})
    died = r"pool worker {} \(Ray actor {}, pid \d+ " + NODE + r"\) died: \w+: [^;]*"
    given_up = r"; its slot's workers died {} times in a row, none answering a round in between, and it is no " \
               "longer replaced: close this pool and start a new one".format(MAX_DEATHS)

    def round_(engine):
        return pool.fork(engine, 2, context=trunk, suffixes=suffixes, params=PARAMS)

    with RayForkPool(spec, workers=2, actor_options={"runtime_env": {"env_vars": worker_env()}}) as pool:
        dies.touch()
        for _ in range(MAX_DEATHS - 1):  # then a round they answer: their deaths are no longer in a row
            with pytest.raises(PoolWorkerDied, match=r"died: .*; .*died: .*dead workers are being replaced\)$"):
                round_(parent)
        dies.unlink()
        assert [g.token_ids for g in round_(parent).generations] == expected
        dies.touch()
        for _ in range(MAX_DEATHS - 1):
            with pytest.raises(PoolWorkerDied, match="dead workers are being replaced"):
                round_(parent)
        with pytest.raises(PoolWorkerDied) as failed:
            round_(parent)
        last = [worker.id for worker in pool.worker_info()]  # the actors that died in it: no replacement
        assert re.fullmatch("; ".join(died.format(name, actor) + given_up for name, actor in enumerate(last)) +
                            r": the fork round failed \(the parent engine is untouched\)", str(failed.value))
        with pytest.raises(PoolWorkerDied, match=given_up + r".*0 of the pool's 2 workers are usable; a round of 2 "
                                                 "needs 2: the fork round failed before the parent was read$"):
            round_(checks.Unread())
        assert [(worker.id, worker.state) for worker in pool.worker_info()] == [(id, "given_up") for id in last]


def test_a_put_that_fails_raises_rays_error(ray_cluster, parent, monkeypatch) -> None:
    """ray.put refused (the object store full, say): its own error."""
    from thaw_format.sdk import lent
    from thaw_format.sdk.shared import capture_shared
    from thaw_ray import capture

    trunk = checks.tokens(40, 11)
    parent.generate(trunk, PARAMS)
    source = capture_shared(parent, chains=[trunk[:checks.full_pages(trunk, parent)]])

    def full(value):
        raise ray_cluster.exceptions.ObjectStoreFullError("the object store is full")

    monkeypatch.setattr(capture.ray, "put", full)
    try:
        with pytest.raises(ray_cluster.exceptions.ObjectStoreFullError, match="the object store is full"):
            capture.put_capture(source)
    finally:
        lent.forget(source)  # the mapping its read kept (no pool closes here to forget it)


def test_two_puts_of_one_segment_read_it_through_one_mapping(ray_cluster, parent) -> None:
    """The parent reuses its segment round after round: each put reads it through the one mapping lent keeps,
    not a new one (which faulted in every page again)."""
    from thaw_format.sdk import lent
    from thaw_format.sdk.shared import capture_shared
    from thaw_ray import capture

    trunk = checks.tokens(40, 12)
    parent.generate(trunk, PARAMS)
    source = capture_shared(parent, chains=[trunk[:checks.full_pages(trunk, parent)]])
    key = (lent.parse(source)[0], False)
    try:
        first = capture.put_capture(source)
        mapping = lent._MAPPINGS[key]
        second = capture.put_capture(source)
        assert lent._MAPPINGS[key] is mapping
        assert (ray_cluster.get(first) == ray_cluster.get(second)).all()
    finally:
        lent.forget(source)


def test_an_actor_ray_cannot_place_fails_its_start_within_the_timeout_naming_what_it_asks_for(
        ray_cluster, parent, monkeypatch) -> None:
    """Ray keeps an actor whose resources no node has pending for ever: its start fails after start_timeout_s,
    naming the resources, and the pending actor is killed (by the pool's close: its start failed)."""
    from thaw_ray import RayForkPool, worker

    killed, kill = [], ray_cluster.kill
    monkeypatch.setattr(worker.ray, "kill", lambda actor, **options: (killed.append(actor), kill(actor, **options)))
    with pytest.raises(PoolWorkerDied, match=r"^pool worker 0 \(Ray actor [0-9a-f]+, never answered\): "
                                             r"not placed within 0\.5 s \(start_timeout_s\): Ray has no "
                                             r"node with the resources it asks for "
                                             r"\(\{'resources': \{'nonexistent': 1\}\}\) free") as raised:
        RayForkPool(parent, 1, actor_options={"resources": {"nonexistent": 1}}, start_timeout_s=0.5)
    assert type(raised.value) is PoolWorkerDied  # not PoolWorkerStarting: the pool is closed, nothing kept to retry
    assert killed
    with pytest.raises(ray_cluster.exceptions.RayActorError):
        ray_cluster.get(killed[0].where.remote(), timeout=60)


def test_an_actor_not_placed_takes_a_lowered_timeout_at_the_next_round_and_names_it(ray_cluster) -> None:
    """A round's rearm moves the placing deadline of an actor not yet placed to the pool's new start_timeout_s,
    from when it began waiting (past already: from the round's start), and its error names that timeout."""
    from thaw_format.sdk import PoolWorkerStarting
    from thaw_ray.worker import ActorWorker

    # never placed, so its engine never starts: no launch spec needed
    actor = ActorWorker("0", "{}", {"resources": {"nonexistent": 1}}, start_timeout_s=600)
    try:
        actor.rearm(0.5)  # a round begins, the pool's start_timeout_s set to 0.5 meanwhile
        began = time.monotonic()
        with pytest.raises(PoolWorkerStarting, match=r"not placed within 0\.5 s \(start_timeout_s\)"):
            actor.ensure_ready()
        assert time.monotonic() - began < 60  # the new timeout, not the 600 s its creation set
    finally:
        actor.kill()


def test_an_actor_placed_after_a_lowered_timeout_has_that_timeout_for_its_engine(ray_cluster, monkeypatch) -> None:
    """Placed after a round's rearm lowered its timeout, its engine's window is that timeout from its placing, not
    the placing deadline set at its creation, and its error names it. Ray's get is stubbed: the actor (never
    placed by Ray) answers where() at once, and its engine's start times out, as one that hangs."""
    from ray.exceptions import GetTimeoutError

    from thaw_ray import worker
    from thaw_ray.worker import ActorWorker

    actor = ActorWorker("0", "{}", {"resources": {"nonexistent": 1}}, start_timeout_s=600)
    waits, real = [], worker.ray.get

    def get(ref, timeout=None, **options):
        if ref is actor._placed:
            return {"pid": 1, "node_id": "ab", "node_ip": "127.0.0.1"}
        if ref is actor._started:
            waits.append(timeout)
            raise GetTimeoutError("its engine still starting")
        return real(ref, timeout=timeout, **options)  # Ray's own threads', and the session pool's

    try:
        actor.rearm(0.2)  # a replacement pending, the pool's start_timeout_s set to 0.2 meanwhile
        monkeypatch.setattr(worker.ray, "get", get)
        with pytest.raises(PoolWorkerDied, match=r"failed to start: its engine was still starting 0\.2 s "
                                                 r"\(start_timeout_s\) after the actor was placed"):
            actor.ensure_ready()
        assert len(waits) == 1 and waits[0] <= 0.2  # not the 600 s of its creation's placing deadline
    finally:
        monkeypatch.undo()
        actor.kill()


def test_start_timeout_s_is_checked_when_set(pool) -> None:
    before = pool.start_timeout_s
    for value in (0, -1, True, "5"):
        with pytest.raises(ValueError, match=f"start_timeout_s is a number of seconds > 0, not {value!r}"):
            pool.start_timeout_s = value
    assert pool.start_timeout_s == before


_AFTER_SHUTDOWN = """
import shutil, sys, tempfile
import ray
from thaw_conformance.template.adapter import ToyThawEngine
from thaw_format.sdk import greedy
from thaw_ray import RayForkPool

temp = tempfile.mkdtemp(dir="/tmp", prefix="thawray")
try:
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False, _temp_dir=temp)
    parent = ToyThawEngine.start(vocab_size=1024)
    parent.generate(list(range(40)), greedy(3))
    pool = RayForkPool(parent, workers=1)
    ray.shutdown()
    try:
        pool.fork(parent, 1, context=list(range(40)), suffixes=[[5]], params=greedy(3))
    except RuntimeError as exc:
        print("refused:", exc)
    pool.close()
    print("initialized after:", ray.is_initialized())
    print("states after close:", [worker.state for worker in pool.worker_info()])
finally:
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
"""


def test_a_round_after_rays_shutdown_is_refused_and_starts_no_ray(ray_cluster) -> None:
    """Ray's calls start a local Ray of their own when none is up: after the caller's ray.shutdown(), a round
    (and close()) must not, and the round says why (in a process of its own: the session's Ray stays up). The
    closed pool's actors show exited (they went with Ray), not ready."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _AFTER_SHUTDOWN], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: Ray was shut down after this RayForkPool started (ray.shutdown), and its actors with it: " \
           "close this pool" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "initialized after: False" in done.stdout
    assert "states after close: ['exited']" in done.stdout, done.stdout


class _Interrupted(BaseException):
    """Ctrl-C's kind of exception (not an Exception), raised mid-round by a hook."""


def test_a_round_interrupted_mid_way_kills_the_actors_yet_to_answer_and_the_next_round_replaces_them(
        pool, parent, fresh, monkeypatch) -> None:
    """As ForkPool does: an actor still running an interrupted round's call would run it on; it is killed, and the
    next round starts a new actor in its slot."""
    import thaw_ray.pool

    trunk, suffixes = checks.tokens(60, 71), [checks.tokens(5, 700 + i) for i in range(checks.WORKERS)]
    want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
    parent.generate(trunk, PARAMS)
    answered, before = thaw_ray.pool.note_answer, pool.worker_info()

    def interrupt(worker):
        answered(worker)
        raise _Interrupted()  # after the first actor's answer: the others are yet to answer

    monkeypatch.setattr(thaw_ray.pool, "note_answer", interrupt)
    with pytest.raises(_Interrupted):
        pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    monkeypatch.undo()
    assert [w.state for w in pool.worker_info()] == ["ready"] + ["exited"] * (checks.WORKERS - 1)  # the others killed
    _ActorProcess(before[1].pid).wait(timeout=60)
    result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert [g.token_ids for g in result.generations] == want
    after = pool.worker_info()
    assert after[0].id == before[0].id and after[1].id != before[1].id and after[1].state == "ready"


def test_an_unavailable_actor_is_killed_and_replaced(pool, parent, fresh, monkeypatch) -> None:
    """ActorUnavailableError (a RayActorError: Ray lost touch with the actor, which may yet come back): the round
    says so, not "died", and the actor is killed before its slot gets a new one."""
    import types

    import thaw_ray.pool

    ray = _ray()
    trunk, suffixes = checks.tokens(60, 73), [checks.tokens(5, 730 + i) for i in range(checks.WORKERS)]
    parent.generate(trunk, PARAMS)
    victim, calls = pool.worker_info()[1], []

    def get(ref, **options):
        reply = ray.get(ref, **options)
        calls.append(ref)
        if len(calls) == 2:  # the second actor's answer, lost
            raise ray.exceptions.ActorUnavailableError("the node is unreachable", None)
        return reply

    monkeypatch.setattr(thaw_ray.pool, "ray", types.SimpleNamespace(get=get))
    with pytest.raises(PoolWorkerDied, match=rf"pool worker 1 \(Ray actor [0-9a-f]+, pid \d+ {NODE}\) became "
                                             r"unavailable \(killed, not waited for\): ActorUnavailableError: "
                                             r".*the node is unreachable.*dead workers are being replaced"):
        pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    monkeypatch.undo()
    _ActorProcess(victim.pid).wait(timeout=60)
    assert pool.worker_info()[1].id != victim.id
    others = [checks.tokens(5, 740 + i) for i in range(checks.WORKERS)]
    result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=others, params=PARAMS)
    assert [g.token_ids for g in result.generations] == [fresh(trunk + suffix, PARAMS) for suffix in others]
