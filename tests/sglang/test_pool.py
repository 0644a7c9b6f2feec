"""ForkPool on SGLang (tests/fork_pool_checks.py): warm worker processes, each an SGLangEngine started from the
parent's launch spec, take only the trunk's KV each round, published by the parent's scheduler in shared memory
and read in place by each worker's scheduler."""

import pytest
from conftest import ENGINE_ARGS

import fork_pool_checks as checks


@pytest.fixture(scope="module")
def parent(thaw_sglang, zoo):
    engine = thaw_sglang.SGLangEngine.start(model_path=str(zoo.make_model("llama")), **ENGINE_ARGS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def pool(parent):
    from thaw_format.sdk import ForkPool

    with ForkPool(parent, workers=checks.WORKERS) as pool:
        yield pool


def fresh_of(parent):
    def fresh(prompt, params):
        """The parent's output with its cache flushed: what a fresh engine computes from scratch."""
        assert parent.engine.flush_cache().success
        out = parent.generate(prompt, params)
        assert out.cached_tokens == 0
        return out.token_ids
    return fresh


def test_rounds_with_different_trunks_match_fresh_engines(pool, parent):
    checks.check_rounds(pool, parent, fresh_of(parent))


def test_a_worker_killed_mid_round_is_named_and_replaced(pool, parent):
    checks.check_killed_worker(pool, parent, fresh_of(parent))


def test_a_chain_capture_holds_only_the_chains_pages(parent):
    trunk, other = checks.tokens(100, seed=90), checks.tokens(40, seed=91)
    parent.generate(trunk, checks.PARAMS)
    parent.generate(other, checks.PARAMS)
    snapshot = parent.capture(include_weights=False, chains=[trunk[:64]])
    assert [snapshot.prefix.chain_tokens(leaf) for leaf in snapshot.prefix.leaves()] == [trunk[:64]]
    assert snapshot.kv.num_pages == 2
