"""The ForkPool checks every engine's tests/<engine>/test_pool.py runs on its own engines (a plain module).

Three consecutive rounds with different trunks give, for every child, the greedy output a fresh engine
computes for trunk + suffix, with the engine's own cached-token count equal to the trunk's full pages (what
the pool moves); a worker killed mid-round fails the round with PoolWorkerDied naming it and its exit status,
leaves the parent serving exactly as before, and is replaced, so the next round succeeds.

Each test supplies `parent` (a contract engine holding nothing the trunks need), `pool` (a ForkPool of two
workers started from it) and `fresh(prompt, params)`: the token ids an engine with an empty cache computes.
"""

import os
import random

import pytest

from thaw_format.sdk import DEFAULT_PAGE_SIZE, PoolWorkerDied, greedy
from thaw_format.sdk.shared import capture_shared

PARAMS = greedy(10)
WORKERS = 2


def tokens(n: int, seed: int) -> list[int]:
    """Deterministic ids in [3, 1000): every zoo model's vocabulary holds them."""
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def full_pages(trunk: list[int]) -> int:
    return len(trunk) // DEFAULT_PAGE_SIZE * DEFAULT_PAGE_SIZE


def _round_case(seed: int, length: int):
    trunk = tokens(length, seed)
    return trunk, [tokens(5, seed * 10 + i) for i in range(WORKERS)]


def check_rounds(pool, parent, fresh) -> None:
    for index, length in enumerate((100, 150, 70)):
        trunk, suffixes = _round_case(60 + index, length)
        want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
        parent.generate(trunk, PARAMS)  # the parent holds the trunk in its cache
        result = pool.fork(parent, WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
        assert [g.token_ids for g in result.generations] == want, f"round {index}"
        assert [g.cached_tokens for g in result.generations] == [full_pages(trunk)] * WORKERS, f"round {index}"
        assert result.kv_bytes > 0 and len(result.restore_s) == WORKERS


class _KillDuringCapture:
    """The parent engine, except that its capture (the round's first step) kills one pool worker first."""

    def __init__(self, engine, victim) -> None:
        self.engine, self.victim = engine, victim

    def capture_shared(self, *, chains=None) -> str:
        self.victim.kill()
        self.victim.wait()
        return capture_shared(self.engine, chains=chains)


def check_killed_worker(pool, parent, fresh) -> None:
    trunk, suffixes = _round_case(80, 120)
    want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
    parent.generate(trunk, PARAMS)
    parent.generate(trunk + suffixes[0], PARAMS)  # the parent's steady state for this prompt
    before = parent.generate(trunk + suffixes[0], PARAMS)
    victim = pool._workers[1].process
    with pytest.raises(PoolWorkerDied, match=rf"pool worker 1 \(pid {victim.pid}\) exited with status -9 "
                                             r"\(killed by SIGKILL\).*parent engine is untouched"):
        pool.fork(_KillDuringCapture(parent, victim), WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert parent.generate(trunk + suffixes[0], PARAMS) == before  # the parent serves as before, cache and all
    result = pool.fork(parent, WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert [g.token_ids for g in result.generations] == want
    assert [g.cached_tokens for g in result.generations] == [full_pages(trunk)] * WORKERS
    replaced = pool._workers[1].process.pid
    assert replaced != victim.pid and os.path.exists(f"/proc/{replaced}")
