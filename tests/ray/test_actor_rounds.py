"""A RayForkPool actor's rounds (PoolActor.run_round: the object, or the parent's segment read in place by an actor
on its node, checked, restored, its suffix generated) write
each round's trunk over the arrays of the cache the restore replaces, round after round, as an engine in one
process does (thaw_mlx.pages.moved_buffers): nothing the actor keeps between rounds (the object, its checked
view, the last generation) holds them, so a steady round's restore allocates nothing and faults no page in. The
actor's own code runs here, in this process: in Ray's worker process its restores fault no page either
(benchmarks/HISTORY.md, fork pool: the page faults an actor's round takes are its generate's)."""

import dataclasses
import json

import numpy as np
import pytest

from fork_pool_checks import tokens
from thaw_format.sdk import greedy
from thaw_format.sdk.lent import forget, segment_view
from thaw_format.sdk.shared import capture_shared

TRUNK = 80  # the parent's full pages of it: under mlx-lm's growth step, so each round's arrays have one shape


def address(array) -> int:
    """Where the memory of an MLX array lies."""
    from thaw_format.mlx import from_mlx  # here, not at the top: the vLLM lane collects this file without MLX

    return np.frombuffer(from_mlx(array).data, np.uint8).ctypes.data


def addresses(sessions) -> set[int]:
    """Where the memory of the sessions' paged arrays lies."""
    from thaw_mlx._internals import paged_buffers

    return {address(a) for session in sessions for layer in session.cache for a in paged_buffers(layer)}


@pytest.mark.parametrize("handed", ["object", "segment"])
def test_each_round_of_an_actor_writes_its_trunk_over_the_arrays_of_the_last(kind, parent, monkeypatch,
                                                                             handed) -> None:
    if kind != "mlx":
        pytest.skip("an MLX engine's restore writes over the arrays it replaces; the template's keeps no arrays")
    import thaw_mlx.engine
    from thaw_ray.actor import PoolActor

    moved, move = [], thaw_mlx.engine.moved_buffers  # what each restore takes to write over: (array, view) or None
    monkeypatch.setattr(thaw_mlx.engine, "moved_buffers", lambda *args: moved.append(move(*args)) or moved[-1])

    spec = parent.launch_spec()
    actor = PoolActor()
    assert actor.start(json.dumps({"factory": spec.factory, "kwargs": spec.kwargs})) is None
    held, sources = None, set()
    try:
        for seed in (201, 202, 203):  # a new trunk each round, of the same length (seeds no other test uses)
            trunk = tokens(TRUNK, seed)
            parent.generate(trunk, greedy(1))  # the parent holds the trunk in its cache
            source = capture_shared(parent, chains=[trunk[:TRUNK // parent.page_size() * parent.page_size()]])
            sources.add(source)
            # read-only, as Ray hands an actor its object; or the segment's source, as an actor beside the parent
            kv = np.frombuffer(segment_view(source), np.uint8) if handed == "object" else source
            reply = actor.run_round(kv, trunk + tokens(5, seed * 10), dataclasses.asdict(greedy(4)))
            del kv
            assert reply.get("via") == handed, reply
            # where each array the restore wrote lies (None: a new one); the arrays themselves let go of at once,
            # else the next round's restore could not take them
            taken = [None if chosen is None else address(chosen[0]) for layer in moved.pop() for chosen in layer]
            if held is not None:  # every array the restore wrote was one of the last round's, none new
                assert None not in taken and set(taken) <= held
            held = addresses(actor.engine.sessions)  # the trunk's session, and the generated one after it
    finally:
        actor.close()
        for source in sources:
            forget(source)
