"""ForkPool on vLLM (the tests of tests/fork_pool_checks.py): warm in-process workers take only the trunk's KV
each round.

The parent's blocks are 64 tokens, not the 32 of DEFAULT_PAGE_SIZE: the pool cut every trunk at 32, so a
context of 32-63 tokens (32-127 on vLLM's default CPU block of 128) moved no KV, and every worker prefilled it
all, reporting 0 cached tokens, without a word."""

import os
import shutil
import signal
import tempfile

import pytest
from conftest import make_engine
from descendants import descendants, outliving

from fork_pool_checks import (  # noqa: F401  the pool's tests and fixtures, written once for every engine
    pool, test_the_parents_page_size_is_its_captures, test_rounds_with_different_trunks_match_fresh_engines,
    test_a_worker_killed_while_the_parent_is_captured_is_named_and_replaced,
    test_a_worker_killed_between_rounds_is_replaced_before_the_next_round,
    test_a_damaged_segment_is_refused_before_any_worker_reads_it,
    test_a_context_without_a_full_page_is_refused_before_the_parent_is_read,
    test_a_parent_with_a_request_in_flight_hands_over_the_trunks_kv_only)
from thaw_format.sdk import ForkPool


@pytest.fixture(scope="module")
def parent(vllm, zoo):
    from thaw_vllm import VLLMEngine

    return VLLMEngine(make_engine(zoo, "llama", "float32", block_size=64))


@pytest.fixture(scope="module")
def pool_env():
    """The workers' engines run in-process, as this test process's, their temporary files in a directory of this
    module's, removed after it: a vLLM engine SIGKILLed (these tests kill workers) leaves its torch.distributed
    rendezvous file behind (vllm_dist_<hex>, in tempfile.gettempdir(); an engine closed, or whose process exits,
    removes its own), one per kill, piling up in /tmp."""
    temp = tempfile.mkdtemp(prefix="thaw-vllm-pool-")
    yield {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TMPDIR": temp}
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def fresh(parent):
    def generate(prompt, params):
        """The parent's output with nothing cached: what a fresh engine computes from scratch."""
        parent.llm.reset_prefix_cache()
        out = parent.generate(prompt, params)
        assert out.cached_tokens == 0
        return out.token_ids
    return generate


def test_a_killed_workers_engine_core_ends_with_it(parent, pool_env):
    """In vLLM's default multiprocessing mode a worker's engine runs in an engine core process of its own, which
    never checks for its parent's death: a worker SIGKILLed (the OOM killer, say) left it running, holding its
    memory, with no one to stop it. It now ends with the worker, between rounds too (no round asks after it)."""
    with ForkPool(parent, workers=1, env={**pool_env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}) as pool:
        victim = pool.worker_info()[0]
        started = descendants(victim.pid)
        assert started  # the engine core, and multiprocessing's resource tracker
        os.kill(victim.pid, signal.SIGKILL)
        assert not outliving(started, timeout=30)
