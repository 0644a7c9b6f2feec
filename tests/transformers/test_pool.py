"""ForkPool on transformers (the tests of tests/fork_pool_checks.py): warm worker processes, each a
TransformersEngine of the parent's checkpoint and page size, take only the trunk's KV each round.

The parent's pages are 16 tokens, not DEFAULT_PAGE_SIZE's 32: the pool cut every trunk at 32 whatever the
engine's pages, so a 150-token trunk handed over 128 tokens of 144 cached and a 20-token one was refused."""

import pytest
from conftest import model_dir

from fork_pool_checks import (  # noqa: F401  the pool's tests and fixtures, written once for every engine
    pool, pool_env, test_the_parents_page_size_is_its_captures, test_rounds_with_different_trunks_match_fresh_engines,
    test_a_worker_killed_mid_round_is_named_and_replaced,
    test_a_damaged_segment_is_refused_before_any_worker_reads_it,
    test_a_context_without_a_full_page_is_refused_before_the_parent_is_read)
from thaw_transformers import TransformersEngine

PAGE = 16


@pytest.fixture(scope="module")
def parent():
    engine = TransformersEngine.start(str(model_dir("llama")), page_size=PAGE)
    yield engine
    engine.close()


@pytest.fixture
def fresh(parent):
    def generate(prompt, params):
        """A new engine over the parent's model: nothing served, nothing cached."""
        out = TransformersEngine(parent.model, checkpoint=parent.checkpoint, info=parent.info,
                                 page_size=PAGE).generate(prompt, params)
        assert out.cached_tokens == 0
        return out.token_ids
    return generate
