"""ForkPool on SGLang (the tests of tests/fork_pool_checks.py): warm worker processes, each an SGLangEngine started
from the parent's launch spec, take only the trunk's KV each round, published by the parent's scheduler in shared
memory and read in place by each worker's scheduler."""

import pytest
from conftest import ENGINE_ARGS
from descendants import descendants

import fork_pool_checks as checks
from fork_pool_checks import (  # noqa: F401  the pool's tests and fixtures, written once for every engine
    pool, test_the_parents_page_size_is_its_captures, pool_env, test_rounds_with_different_trunks_match_fresh_engines,
    test_a_worker_killed_while_the_parent_is_captured_is_named_and_replaced,
    test_a_worker_killed_between_rounds_is_replaced_before_the_next_round,
    test_a_damaged_segment_is_refused_before_any_worker_reads_it,
    test_a_context_without_a_full_page_is_refused_before_the_parent_is_read,
    test_a_parent_with_a_request_in_flight_hands_over_the_trunks_kv_only)


@pytest.fixture(scope="module")
def parent(thaw_sglang, zoo):
    engine = thaw_sglang.SGLangEngine.start(model_path=str(zoo.make_model("llama")), **ENGINE_ARGS)
    yield engine
    engine.close()


@pytest.fixture
def fresh(parent):
    def generate(prompt, params):
        """The parent's output with its cache flushed: what a fresh engine computes from scratch."""
        assert parent.engine.flush_cache().success
        out = parent.generate(prompt, params)
        assert out.cached_tokens == 0
        return out.token_ids
    return generate


def test_a_chain_capture_holds_only_the_chains_pages(parent):
    trunk, other = checks.tokens(100, seed=90), checks.tokens(40, seed=91)
    parent.generate(trunk, checks.PARAMS)
    parent.generate(other, checks.PARAMS)
    snapshot = parent.capture(include_weights=False, chains=[trunk[:64]])
    assert [snapshot.prefix.chain_tokens(leaf) for leaf in snapshot.prefix.leaves()] == [trunk[:64]]
    assert snapshot.kv.num_pages == 2


def test_the_pools_workers_sleep_while_idle_as_the_parent_does(parent):
    """SGLang's sleep_on_idle is in the parent's launch spec, which the pool's workers start from: an idle
    worker waits for its next message instead of spinning a CPU beside the parent's capture."""
    assert parent.launch_spec().kwargs["sleep_on_idle"] is True


def test_the_pools_workers_engines_have_processes_of_their_own(pool):
    """What test_a_worker_killed_while_the_parent_is_captured_is_named_and_replaced checks does end with a killed
    worker, here: each worker's SGLang engine runs its scheduler (and detokenizer) in processes of its own."""
    assert all(descendants(worker.pid) for worker in pool.worker_info())
