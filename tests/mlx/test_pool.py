"""ForkPool on MLX (the tests of tests/fork_pool_checks.py): warm worker processes, each an MLXEngine of the
parent's checkpoint, take only the trunk's KV each round."""

import pytest

import fork_pool_checks as checks
from fork_pool_checks import (  # noqa: F401  the pool's tests and fixtures, written once for every engine
    pool, test_the_parents_page_size_is_its_captures, pool_env, test_rounds_with_different_trunks_match_fresh_engines,
    test_a_worker_killed_while_the_parent_is_captured_is_named_and_replaced,
    test_a_worker_killed_between_rounds_is_replaced_before_the_next_round,
    test_a_damaged_segment_is_refused_before_any_worker_reads_it,
    test_a_context_without_a_full_page_is_refused_before_the_parent_is_read,
    test_a_parent_with_a_request_in_flight_hands_over_the_trunks_kv_only)
from thaw_conformance import zoo
from thaw_mlx import MLXEngine


@pytest.fixture(scope="module")
def parent():
    engine = MLXEngine.start(str(zoo.make_model("llama")))
    yield engine
    engine.close()


@pytest.fixture
def fresh(parent):
    def generate(prompt, params):
        """A new engine over the parent's model: nothing served, nothing cached."""
        out = MLXEngine(parent.model, parent.info, checkpoint=parent.checkpoint).generate(prompt, params)
        assert out.cached_tokens == 0
        return out.token_ids
    return generate


def test_a_chain_capture_holds_only_the_chain_of_a_longer_session(parent):
    trunk = checks.tokens(70, seed=5)
    parent.generate(trunk, checks.PARAMS)  # a session of trunk + 10 output tokens
    snapshot = parent.capture(include_weights=False, chains=[trunk[:64]])
    assert snapshot.prefix.chain_tokens(snapshot.prefix.leaves()[0]) == trunk[:64]
    assert snapshot.kv.num_pages == 2
    whole = parent.capture(include_weights=False, chains=[trunk])  # the session's first 70 tokens
    assert whole.prefix.chain_tokens(whole.prefix.leaves()[0]) == trunk
    for layer, longer in zip(snapshot.kv.layers, whole.kv.layers):  # the same bytes where they overlap
        for role in layer.tensors:
            assert bytes(layer.tensors[role].data) == bytes(longer.tensors[role].data[: len(layer.tensors[role].data)])


def test_a_closed_pool_refuses_a_round_before_the_parent_is_read(parent):
    """After close() a round failed mid-send with 'ValueError: I/O operation on closed file', once the parent's
    capture was taken; the pool says it is closed, before anything runs. (The pool's own bookkeeping, the same
    on every engine: run on MLX, the quickest to start a worker of.)"""
    pool = checks.ForkPool(parent, workers=1)
    pool.close()
    trunk = checks.tokens(40, seed=7)
    with pytest.raises(RuntimeError, match="this ForkPool is closed; start a new one"):
        pool.fork(checks.Unread(), 1, context=trunk, suffixes=[[5]], params=checks.PARAMS)

