"""RayForkPool across the nodes of a Ray cluster (conftest's two nodes on this machine, and nodes a test adds and
removes): workers on the node the driver is not on restore an object that crossed to that node, and give a fresh
engine's tokens (the rounds of tests/fork_pool_checks.py), and refuse a copy damaged on its way; a pool split
across two nodes loses one of them mid-round, is told which worker and which node, and runs its next round once
a node that has the lost one's resources joins."""

import mmap
import os
import re
import time

import numpy
import pytest

import fork_pool_checks as checks
from descendants import HAS_PROC, outliving
from thaw_format import CorruptSnapshotError, SnapshotFile
from thaw_format.sdk import PoolWorkerDied, PoolWorkerStarting
from thaw_format.sdk.shared import SHM_PREFIX, open_segment

PARAMS = checks.PARAMS


def test_workers_on_the_other_node_restore_objects_that_crossed_to_it(ray_nodes, parent, fresh, monkeypatch) -> None:
    import ray

    import thaw_ray.capture
    from thaw_ray import RayForkPool

    put, puts = thaw_ray.capture.put_capture, []  # each round's object, held here to find its copies after the round

    def kept(source):
        puts.append(put(source))
        return puts[-1]

    monkeypatch.setattr(thaw_ray.capture, "put_capture", kept)
    assert ray.get_runtime_context().get_node_id() == ray_nodes.head  # the driver, where ray.put stores the object
    with RayForkPool(parent, checks.WORKERS, actor_options={"resources": {"other": 1}},
                     start_timeout_s=120) as pool:
        assert [worker.node for worker in pool.worker_info()] == [ray_nodes.other] * checks.WORKERS
        checks.test_rounds_with_different_trunks_match_fresh_engines(pool, parent, fresh)
        trunk, suffixes = checks.tokens(100, 94), [checks.tokens(5, 940 + i) for i in range(checks.WORKERS)]
        parent.generate(trunk, PARAMS)
        result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
        assert result.kv_via == ["object"] * checks.WORKERS  # off the parent's node: the object store's copy
    assert len(puts) == 4  # one a round
    for ref in puts:  # put on the head, pulled by the other node for its actors
        assert set(ray.experimental.get_object_locations([ref])[ref]["node_ids"]) == {ray_nodes.head, ray_nodes.other}


def test_actors_on_another_node_check_the_copy_that_crossed_to_it(ray_nodes, parent, fresh, monkeypatch) -> None:
    """An actor on another node checks every chunk of its node's copy of the object before its engine is touched:
    an object damaged after the capture (put here from a copy of the segment with one bit flipped) is refused by
    each actor, naming it and the object, and the next round, its object whole, runs."""
    import ray

    import thaw_ray.capture
    from thaw_ray import RayForkPool

    def put_damaged(source):
        name, _, nbytes = source[len(SHM_PREFIX):].partition("#")
        fd = open_segment(name)
        try:
            with mmap.mmap(fd, int(nbytes), access=mmap.ACCESS_READ) as segment:
                data = bytearray(segment)
        finally:
            os.close(fd)
        data[SnapshotFile(data).info("kv/0/k")[2].offset + 1000] ^= 0x40
        return ray.put(numpy.frombuffer(data, numpy.uint8))

    trunk, suffixes = checks.tokens(100, 93), [checks.tokens(5, 930 + i) for i in range(checks.WORKERS)]
    parent.generate(trunk, PARAMS)
    refusal = (rf"pool worker \d \(Ray actor [0-9a-f]+, pid \d+ on node \S+ {ray_nodes.other}\) refused the round's "
               r"object [0-9a-f]+: CorruptSnapshotError: tensor 'kv/0/k' \(region \d+\): checksum mismatch in chunk "
               r"0, .*?its engine is untouched")
    with RayForkPool(parent, checks.WORKERS, actor_options={"resources": {"other": 1}},
                     start_timeout_s=120) as pool:
        monkeypatch.setattr(thaw_ray.capture, "put_capture", put_damaged)
        with pytest.raises(CorruptSnapshotError, match=r"parent engine is untouched\)$") as refused:
            pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
        assert len(re.findall(refusal, str(refused.value))) == checks.WORKERS, str(refused.value)
        monkeypatch.undo()
        result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
        assert [g.token_ids for g in result.generations] == [fresh(trunk + suffix, PARAMS) for suffix in suffixes]


class _LoseNodeDuringCapture:
    """The parent engine, except that its capture (the round's first step) first ends every process of a node
    (its raylet, object store and actors, SIGKILLed: a machine lost)."""

    def __init__(self, engine, cluster, node) -> None:
        self.engine, self.cluster, self.node = engine, cluster, node

    def page_size(self) -> int:
        return self.engine.page_size()

    def capture_shared(self, *, chains=None) -> str:
        self.cluster.remove_node(self.node, allow_graceful=False)
        return self.engine.capture_shared(chains=chains)


def test_a_pool_split_across_nodes_loses_one_mid_round_and_runs_on_a_node_that_joins(ray_nodes, added_nodes, parent,
                                                                                       fresh) -> None:
    """What Ray does: the lost node's actor is reported unavailable (or dead) at once, and its replacement asks
    for resources no node has free until one that has them joins; until then the round fails after
    start_timeout_s, saying so (2 s here: 600 by default)."""
    from thaw_ray import RayForkPool

    lost = added_nodes({"spread": 1})
    with RayForkPool(parent, checks.WORKERS, actor_options={"resources": {"spread": 1}}, start_timeout_s=120) as pool:
        nodes = [worker.node for worker in pool.worker_info()]
        assert sorted(nodes) == sorted([ray_nodes.head, lost.node_id])  # one actor on each
        checks.test_rounds_with_different_trunks_match_fresh_engines(pool, parent, fresh)

        trunk, suffixes = checks.tokens(120, 61), [checks.tokens(5, 610 + i) for i in range(checks.WORKERS)]
        parent.generate(trunk + suffixes[0], PARAMS)  # the parent's steady state for this prompt
        before = parent.generate(trunk + suffixes[0], PARAMS)
        slot, victim = nodes.index(lost.node_id), pool.worker_info()[nodes.index(lost.node_id)]
        pool.start_timeout_s = 2  # for the replacement the round starts
        with pytest.raises(PoolWorkerDied, match=rf"pool worker {slot} \(Ray actor {victim.id}, pid "
                                                 rf"{victim.pid} on node \S+ {lost.node_id}\) (died|became "
                                                 r"unavailable \(killed, not waited for\)): \w+Error: .*dead "
                                                 r"workers are being replaced"):
            pool.fork(_LoseNodeDuringCapture(parent, ray_nodes.cluster, lost), checks.WORKERS, context=trunk,
                      suffixes=suffixes, params=PARAMS)
        assert parent.generate(trunk + suffixes[0], PARAMS) == before
        assert not (HAS_PROC and outliving({victim.pid}, timeout=30))  # its actor ended with its node
        ray_nodes.remove(lost)  # marked dead now: no later replacement is placed on it
        # the replacement is pending (no node has "spread" free), or, placed on the lost node before Ray marked it
        # dead, died starting and was started again: the round fails either way, naming it
        with pytest.raises(PoolWorkerDied, match=rf"^pool worker {slot} \(Ray actor [0-9a-f]+, never answered\)"
                                                 r"(: not placed within 2 s \(start_timeout_s\): Ray has "
                                                 r"no node with the resources it asks for \(\{'resources': "
                                                 r"\{'spread': 1\}\}\) free \(it replaces an actor that died: if "
                                                 r"its node was lost, .*; it is kept, still starting| failed to "
                                                 r"start: \w+Error: .*; it is started again for the next round)"
                                                 r".*before the parent was read$"):
            pool.fork(checks.Unread(), checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)

        pool.start_timeout_s = 120  # for the replacement, from the next round on: placed, and its engine started
        joined = added_nodes({"spread": 1})
        # new suffixes: the surviving actor's engine may keep the failed round's prompt in its cache (the toy's
        # restore adds pages to what it holds), which would count beyond the trunk
        others = [checks.tokens(5, 620 + i) for i in range(checks.WORKERS)]
        want = [fresh(trunk + suffix, PARAMS) for suffix in others]
        result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=others, params=PARAMS)
        assert [g.token_ids for g in result.generations] == want
        assert [g.cached_tokens for g in result.generations] == [checks.full_pages(trunk, parent)] * checks.WORKERS
        assert pool.worker_info()[slot].node == joined.node_id


def test_actors_of_a_lost_node_wait_together_and_are_kept_until_a_node_joins(ray_nodes, added_nodes, parent,
                                                                              fresh) -> None:
    """Two actors on a node that is lost between rounds: the next round finds both dead and starts their
    replacements before the parent is read; pending (no node has their resources), they fail each round after
    about start_timeout_s (their waits overlap, not one after the other), are kept rather than
    counted as failed starts (more rounds than MAX_FAILED_STARTS), and run the round once a node joins."""
    from thaw_format.sdk.pool_slots import MAX_FAILED_STARTS
    from thaw_ray import RayForkPool

    timeout, resources = 5, {"pair": checks.WORKERS}
    lost = added_nodes(resources, cpus=checks.WORKERS)
    with RayForkPool(parent, checks.WORKERS, actor_options={"resources": {"pair": 1}}, start_timeout_s=120) as pool:
        assert [worker.node for worker in pool.worker_info()] == [lost.node_id] * checks.WORKERS
        ray_nodes.remove(lost)  # and marked dead: the replacements cannot be placed on it
        pool.start_timeout_s = timeout
        trunk, suffixes = checks.tokens(120, 71), [checks.tokens(5, 710 + i) for i in range(checks.WORKERS)]
        parent.generate(trunk + suffixes[0], PARAMS)  # the parent holds the trunk: its capture has it
        dead = pool.worker_info()
        # Ray's answer to the round's first call: both dead, replaced before the parent is read, the replacements
        # not placed (only still starting: retry later)
        replacing = r"pool worker {} \(Ray actor {}, pid {} on node \S+ {}\) (?:died|became unavailable) between " \
                    r"rounds(?: \(killed, not waited for\))?: \w+Error: .*?, and " \
                    r"its replacement: pool worker {} .*?not placed within {} s .*?; it is kept, still starting"
        with pytest.raises(PoolWorkerStarting, match="^" + ".*; ".join(
                replacing.format(w.slot, w.id, w.pid, lost.node_id, w.slot, timeout) for w in dead)):
            pool.fork(checks.Unread(), checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
        pending = pool.worker_info()  # not placed: no node or pid yet, but each actor's id, from its creation
        created = [worker.placing.began for worker in pool._workers]  # the replacements: created together, not
        assert max(created) - min(created) < timeout / 2, created  # each after the one before had waited it out
        assert all(worker.id and worker.node is None and worker.state == "starting" for worker in pending), pending
        for _ in range(MAX_FAILED_STARTS + 1):
            began = time.monotonic()
            with pytest.raises(PoolWorkerStarting, match=rf"^pool worker 0 .*not placed within {timeout} s .*; it "
                                                         r"is kept, still starting.*; pool worker 1 .*not placed "
                                                         r"within"):  # only still starting: retry later
                pool.fork(checks.Unread(), checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
            assert time.monotonic() - began < 1.8 * timeout  # one timeout, not one per actor
            assert pool.worker_info() == pending  # still asking Ray for a node (kept: no failed start counted)

        pool.start_timeout_s = 120  # for the kept actors, from the next round on: placed, and their engines started
        joined = added_nodes(resources, cpus=checks.WORKERS)
        want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
        result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
        assert [g.token_ids for g in result.generations] == want
        assert [worker.node for worker in pool.worker_info()] == [joined.node_id] * checks.WORKERS
        assert [worker.id for worker in pool.worker_info()] == [worker.id for worker in pending]  # the same actors
