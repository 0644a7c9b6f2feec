"""ForkPool on vLLM: warm workers take only the trunk's KV each round. Three rounds with different trunks give,
for every child, the greedy output a fresh engine computes for trunk + suffix, with the trunk's full pages
reported as cached by the worker's engine; a worker killed mid-round fails the round with its name and exit
status, leaves the parent as it was, and is replaced, so the next round succeeds."""

import os

import pytest
from conftest import make_engine, trunk_tokens


@pytest.fixture(scope="module")
def parent(vllm, zoo):
    from thaw_vllm import VLLMEngine

    return VLLMEngine(make_engine(zoo, "llama", "float32"))


def fresh(parent, prompt, params):
    """The parent's output with nothing cached: what a fresh engine computes from scratch."""
    parent.llm.reset_prefix_cache()
    out = parent.generate(prompt, params)
    assert out.cached_tokens == 0
    return out.token_ids


class KillDuringCapture:
    """The parent engine, except that its capture (the round's first step) kills one pool worker first."""

    def __init__(self, engine, victim) -> None:
        self.engine, self.victim = engine, victim

    def capture(self, **kwargs):
        self.victim.kill()
        self.victim.wait()
        return self.engine.capture(**kwargs)


def test_rounds_match_fresh_engines_and_a_killed_worker_is_replaced(parent):
    from thaw_format.sdk import ForkPool, PoolWorkerDied, greedy

    params = greedy(10)
    with ForkPool(parent, workers=2, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}) as pool:
        for round_index, length in enumerate((100, 150, 70)):
            trunk = trunk_tokens(length, seed=60 + round_index)
            suffixes = [trunk_tokens(5, seed=70 + 2 * round_index + i) for i in range(2)]
            want = [fresh(parent, trunk + s, params) for s in suffixes]
            parent.generate(trunk, params)  # the parent holds the trunk in its cache
            result = pool.fork(parent, 2, context=trunk, suffixes=suffixes, params=params)
            assert [g.token_ids for g in result.generations] == want
            assert [g.cached_tokens for g in result.generations] == [length // 32 * 32] * 2

        trunk, suffixes = trunk_tokens(120, seed=80), [trunk_tokens(5, seed=81), trunk_tokens(5, seed=82)]
        want = [fresh(parent, trunk + s, params) for s in suffixes]
        parent.generate(trunk, params)
        victim = pool._workers[1].process
        with pytest.raises(PoolWorkerDied, match=rf"pool worker 1 \(pid {victim.pid}\) exited with status -9 "
                                                 r"\(killed by SIGKILL\).*parent engine is untouched"):
            pool.fork(KillDuringCapture(parent, victim), 2, context=trunk, suffixes=suffixes, params=params)
        assert parent.generate(trunk + suffixes[0], params).cached_tokens == 96  # the parent still serves its cache
        result = pool.fork(parent, 2, context=trunk, suffixes=suffixes, params=params)
        assert [g.token_ids for g in result.generations] == want
        assert [g.cached_tokens for g in result.generations] == [96, 96]
        assert pool._workers[1].process.pid != victim.pid and os.path.exists(f"/proc/{pool._workers[1].process.pid}")
