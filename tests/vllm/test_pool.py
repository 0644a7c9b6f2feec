"""ForkPool on vLLM (tests/fork_pool_checks.py): warm in-process workers take only the trunk's KV each round."""

import pytest
from conftest import make_engine

import fork_pool_checks as checks


@pytest.fixture(scope="module")
def parent(vllm, zoo):
    from thaw_vllm import VLLMEngine

    return VLLMEngine(make_engine(zoo, "llama", "float32"))


@pytest.fixture(scope="module")
def pool(parent):
    from thaw_format.sdk import ForkPool

    with ForkPool(parent, workers=checks.WORKERS, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}) as pool:
        yield pool


def fresh_of(parent):
    def fresh(prompt, params):
        """The parent's output with nothing cached: what a fresh engine computes from scratch."""
        parent.llm.reset_prefix_cache()
        out = parent.generate(prompt, params)
        assert out.cached_tokens == 0
        return out.token_ids
    return fresh


def test_rounds_with_different_trunks_match_fresh_engines(pool, parent):
    checks.check_rounds(pool, parent, fresh_of(parent))


def test_a_worker_killed_mid_round_is_named_and_replaced(pool, parent):
    checks.check_killed_worker(pool, parent, fresh_of(parent))
