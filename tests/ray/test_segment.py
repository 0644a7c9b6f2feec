"""RayForkPool's actors on the parent's Ray node read the parent's segment in place, with no ray.put (thaw_ray.capture
.hand_out): each child's tokens and cached tokens as before (the rounds of tests/fork_pool_checks.py), each
actor's way to the KV shown in ForkRound.kv_via; a pool split across the nodes puts once a round, for its actor on
the other node only; shared_memory=False puts for every actor. A damaged segment is refused by each actor, its
engine unchanged; an actor that cannot open the segment fails the round saying why and what to do; and an actor
killed mid-round (a round interrupted once its calls are made, or as they are; one Ray reports unavailable) has
ended before the round is over, so none still reads the segment when the parent's next capture overwrites it."""

import os
import re
import types

import pytest

import fork_pool_checks as checks
from descendants import HAS_PROC, alive
from thaw_format import CorruptSnapshotError
from thaw_format.sdk import PoolWorkerDied
from thaw_format.sdk.lent import parse

PARAMS = checks.PARAMS
# on vLLM and SGLang too (conftest: their engines take tens of seconds to start): an engine that reads the segment in
# processes of its own (vLLM's worker, SGLang's scheduler)
VLLM_TESTS = frozenset({"test_actors_beside_the_parent_read_its_segment_and_nothing_is_put"})
SGLANG_TESTS = VLLM_TESTS


def _on(node: str) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


@pytest.fixture(scope="module")
def beside(ray_nodes, parent):
    """A RayForkPool whose actors are all on the head, the driver's node: where the parent's segment is."""
    from thaw_ray import RayForkPool

    with RayForkPool(parent, checks.WORKERS, actor_options=_on(ray_nodes.head), start_timeout_s=120) as started:
        assert [worker.node for worker in started.worker_info()] == [ray_nodes.head] * checks.WORKERS
        yield started


@pytest.fixture
def puts(monkeypatch):
    """The rounds' puts into Ray's object store, as they happen (each source put)."""
    import thaw_ray.capture

    put, made = thaw_ray.capture.put_capture, []
    monkeypatch.setattr(thaw_ray.capture, "put_capture", lambda source: made.append(source) or put(source))
    return made


def _round(pool, parent, seed: int, engine=None):
    trunk, suffixes = checks.tokens(100, seed), [checks.tokens(5, seed * 10 + i) for i in range(checks.WORKERS)]
    parent.generate(trunk, PARAMS)
    return trunk, suffixes, pool.fork(engine or parent, checks.WORKERS, context=trunk, suffixes=suffixes,
                                      params=PARAMS)


def test_actors_beside_the_parent_read_its_segment_and_nothing_is_put(beside, parent, fresh, puts) -> None:
    checks.test_rounds_with_different_trunks_match_fresh_engines(beside, parent, fresh)
    trunk, suffixes, result = _round(beside, parent, 301)
    assert [g.token_ids for g in result.generations] == [fresh(trunk + s, PARAMS) for s in suffixes]
    assert [g.cached_tokens for g in result.generations] == [checks.full_pages(trunk, parent)] * checks.WORKERS
    assert result.kv_via == ["segment"] * checks.WORKERS
    assert puts == []


def test_without_shared_memory_every_actor_gets_the_one_put(ray_nodes, parent, fresh, puts) -> None:
    from thaw_ray import RayForkPool

    with RayForkPool(parent, checks.WORKERS, actor_options=_on(ray_nodes.head), start_timeout_s=120,
                     shared_memory=False) as pool:
        trunk, suffixes, result = _round(pool, parent, 302)
    assert [g.token_ids for g in result.generations] == [fresh(trunk + s, PARAMS) for s in suffixes]
    assert [g.cached_tokens for g in result.generations] == [checks.full_pages(trunk, parent)] * checks.WORKERS
    assert result.kv_via == ["object"] * checks.WORKERS
    assert len(puts) == 1


def test_shared_memory_is_a_bool(ray_cluster, parent) -> None:
    from thaw_ray import RayForkPool

    with pytest.raises(TypeError, match=r"shared_memory is True or False, not 'no'"):
        RayForkPool(parent, checks.WORKERS, shared_memory="no")


def test_a_pool_split_across_nodes_puts_once_for_its_actor_on_the_other_node(ray_nodes, parent, fresh,
                                                                             puts) -> None:
    """Two CPUs asked per actor, two on each node: one actor on each."""
    from thaw_ray import RayForkPool

    with RayForkPool(parent, checks.WORKERS, actor_options={"num_cpus": 2}, start_timeout_s=120) as pool:
        nodes = [worker.node for worker in pool.worker_info()]
        assert sorted(nodes) == sorted([ray_nodes.head, ray_nodes.other])
        for seed in (303, 304):
            trunk, suffixes, result = _round(pool, parent, seed)
            assert [g.token_ids for g in result.generations] == [fresh(trunk + s, PARAMS) for s in suffixes]
            assert [g.cached_tokens for g in result.generations] == [checks.full_pages(trunk, parent)] * 2
            assert result.kv_via == ["segment" if node == ray_nodes.head else "object" for node in nodes]
    assert len(puts) == 2  # one a round


def test_a_damaged_segment_is_refused_by_every_actor_beside_the_parent(beside, parent) -> None:
    ray = _ray()
    good, suffixes, _ = _round(beside, parent, 305)
    probe = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
    held = [ray.get(a.generate.remote(good + s, probe)) for a, s in zip(beside.actors(), suffixes)]
    refusal = (r"pool worker \d \(Ray actor [0-9a-f]+, pid \d+ on node \S+ [0-9a-f]+\) refused the round's segment "
               r"shm://\S+: CorruptSnapshotError: .*?checksum mismatch in chunk 0.*?its engine is untouched")
    bad = checks.tokens(110, 306)
    parent.generate(bad, PARAMS)
    with pytest.raises(CorruptSnapshotError, match=r"parent engine is untouched\)$") as refused:
        beside.fork(checks.Capturing(parent, after=checks.flip_a_bit), checks.WORKERS, context=bad,
                    suffixes=suffixes, params=PARAMS)
    assert len(re.findall(refusal, str(refused.value))) == checks.WORKERS, str(refused.value)
    assert [ray.get(a.generate.remote(good + s, probe)) for a, s in zip(beside.actors(), suffixes)] == held


def _hidden(source: str) -> None:
    """The segment's name gone from /dev/shm, as a reader with a /dev/shm of its own sees it (the parent keeps
    its mapping)."""
    name = parse(source)[0]
    os.rename(f"/dev/shm/{name}", f"/dev/shm/{name}.hidden")


def test_an_actor_that_cannot_open_the_segment_fails_the_round_saying_so(ray_nodes, parent, fresh) -> None:
    """A pool of its own: an actor that has read the segment once keeps its mapping (lent's cache), and reads it
    whatever its name."""
    from thaw_ray import RayForkPool

    trunk, suffix = checks.tokens(100, 307), checks.tokens(5, 3070)
    parent.generate(trunk + suffix, PARAMS)  # the parent's steady state for this prompt
    before = parent.generate(trunk + suffix, PARAMS)
    sources = []
    cannot = (r"^pool worker 0 [^:]*: FileNotFoundError: [^;]* is gone: [^;]*; this actor runs on the "
              r"parent's Ray node but cannot open its segment .*?start the pool with shared_memory=False.*parent "
              r"engine is untouched")
    with RayForkPool(parent, 1, actor_options=_on(ray_nodes.head), start_timeout_s=120) as pool:
        try:
            with pytest.raises(RuntimeError, match=cannot):
                pool.fork(checks.Capturing(parent, after=lambda source: sources.append(source) or _hidden(source)),
                          1, context=trunk, suffixes=[suffix], params=PARAMS)
        finally:
            for source in sources:
                name = parse(source)[0]
                os.rename(f"/dev/shm/{name}.hidden", f"/dev/shm/{name}")
        assert parent.generate(trunk + suffix, PARAMS) == before
        other = checks.tokens(5, 3080)
        result = pool.fork(parent, 1, context=trunk, suffixes=[other], params=PARAMS)
    assert [g.token_ids for g in result.generations] == [fresh(trunk + other, PARAMS)]


def _ray():
    import ray

    return ray


class _Interrupted(BaseException):
    """Ctrl-C's kind of exception, raised mid-round by a hook."""


def test_an_interrupted_round_ends_after_the_actors_it_killed_have_ended(beside, parent, monkeypatch) -> None:
    """ray.kill returns before the actor's process ends: the round waits for it, since it was reading the segment
    the parent's next capture overwrites."""
    import thaw_ray.pool

    answered, before = thaw_ray.pool.note_answer, beside.worker_info()

    def interrupt(worker):
        answered(worker)
        raise _Interrupted()  # after the first actor's answer: the other's call is killed mid-way

    monkeypatch.setattr(thaw_ray.pool, "note_answer", interrupt)
    with pytest.raises(_Interrupted):
        _round(beside, parent, 308)
    assert [w.state for w in beside.worker_info()] == ["ready", "exited"]
    assert not (HAS_PROC and alive({before[1].pid}))  # ended already, not only asked to


def test_a_round_interrupted_as_its_calls_are_made_ends_the_actors_it_handed_the_segment(beside, parent,
                                                                                         monkeypatch) -> None:
    """Interrupted once the first actor's call is made, before the second's: the first may be reading the segment,
    so it is killed and ended before the round is over; the second, never handed it, is left as it was."""
    import thaw_ray.pool

    _round(beside, parent, 313)  # each slot's actor ready (an earlier test's killed one replaced)
    settle, before = thaw_ray.pool.settle, beside.worker_info()

    def interrupt(ref, *args):
        settle(ref, *args)
        raise _Interrupted()

    monkeypatch.setattr(thaw_ray.pool, "settle", interrupt)
    with pytest.raises(_Interrupted):
        _round(beside, parent, 310)
    monkeypatch.undo()
    assert [w.state for w in beside.worker_info()] == ["exited", "ready"]
    assert not (HAS_PROC and alive({before[0].pid}))  # ended already, not only asked to
    assert beside.worker_info()[1].id == before[1].id
    _round(beside, parent, 311)  # the next round replaces the first


def test_an_unavailable_actor_has_ended_before_the_round_fails(beside, parent, monkeypatch) -> None:
    import thaw_ray.pool

    ray, calls = _ray(), []
    victim = beside.worker_info()[1]

    def get(ref, **options):
        reply = ray.get(ref, **options)
        calls.append(ref)
        if len(calls) == 2:  # the second actor's answer, lost: Ray no longer reaches it
            raise ray.exceptions.ActorUnavailableError("the node is unreachable", None)
        return reply

    trunk, suffixes = checks.tokens(100, 309), [checks.tokens(5, 3090 + i) for i in range(checks.WORKERS)]
    parent.generate(trunk, PARAMS)
    monkeypatch.setattr(thaw_ray.pool, "ray", types.SimpleNamespace(get=get))
    with pytest.raises(PoolWorkerDied, match=r"pool worker 1 .*became unavailable"):
        beside.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert not (HAS_PROC and alive({victim.pid}))
