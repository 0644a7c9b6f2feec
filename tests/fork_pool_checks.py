"""The ForkPool tests, written once for every engine: each tests/<engine>/test_pool.py imports them (and the
`pool` fixture) and supplies its engine's fixtures, so each engine's run stays in that engine's environment.

Three consecutive rounds with different trunks give, for every child, the greedy output a fresh engine
computes for trunk + suffix, with the engine's own cached-token count equal to the trunk's full pages (what
the pool moves; pages of the parent's own page_size(), which need not be 32); a worker killed while the parent
is captured fails the round with PoolWorkerDied naming it, its exit status and when, once the capture ends, before
the round is sent to any worker; it leaves the parent serving exactly as before, and is replaced, so the next round
succeeds, and every process its engine started (SGLang's scheduler) ends with it; a worker killed between rounds is
replaced by the next round, which succeeds, each child's output as before; a round whose segment is damaged is
refused by the pool's own check, naming the chunk, before any worker is sent it. A worker that dies once the round
is sent to it (found as its reply is read) is checked on the toy engine only, whose workers die in the round they
run (pool_engines.ToyDyingInRounds, tests/conformance/test_pool_workers.py): a real engine's worker killed at that
moment would need a kill timed against its restore.

An engine's module supplies the fixtures `parent` (a contract engine holding nothing the trunks need, module
scope), `fresh` (a function of (prompt, params): the token ids an engine with an empty cache computes) and,
where the workers need one, `pool_env` (the environment the pool's workers start with; empty by default).
"""

import mmap
import os
import random
import signal
import time

import pytest

from descendants import HAS_PROC, descendants, outliving
from thaw_format import CorruptSnapshotError, SnapshotFile
from thaw_format.sdk import ForkPool, PoolWorkerDied, greedy
from thaw_format.sdk.shared import capture_shared, open_segment, read_source

PARAMS = greedy(10)
WORKERS = 2


def tokens(n: int, seed: int) -> list[int]:
    """Deterministic ids in [3, 1000): every zoo model's vocabulary holds them."""
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def full_pages(trunk: list[int], parent) -> int:
    """The tokens of the trunk's full pages: the parent's pages, whatever their size."""
    return len(trunk) // parent.page_size() * parent.page_size()


def _round_case(seed: int, length: int):
    trunk = tokens(length, seed)
    return trunk, [tokens(5, seed * 10 + i) for i in range(WORKERS)]


@pytest.fixture(scope="module")
def pool_env() -> dict:
    """What the pool's workers' environment adds to this process's: nothing, unless an engine's module says."""
    return {}


@pytest.fixture(scope="module")
def pool(parent, pool_env):
    """A ForkPool of WORKERS workers started from the parent's launch spec."""
    with ForkPool(parent, workers=WORKERS, env=pool_env) as started:
        yield started


def test_rounds_with_different_trunks_match_fresh_engines(pool, parent, fresh) -> None:
    for index, length in enumerate((100, 150, 70)):
        trunk, suffixes = _round_case(60 + index, length)
        want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
        parent.generate(trunk, PARAMS)  # the parent holds the trunk in its cache
        result = pool.fork(parent, WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
        assert [g.token_ids for g in result.generations] == want, f"round {index}"
        assert [g.cached_tokens for g in result.generations] == [full_pages(trunk, parent)] * WORKERS, f"round {index}"
        assert result.kv_bytes > 0 and len(result.restore_s) == WORKERS


def test_the_parents_page_size_is_its_captures(parent) -> None:
    """page_size() is the unit the pool cuts the trunk at: the page the engine's captures hold."""
    trunk = tokens(70, 50)
    parent.generate(trunk, PARAMS)
    assert parent.capture(include_weights=False, chains=[trunk]).kv.page_size == parent.page_size()


class WorkerProcess:
    """A ForkPool worker's process, by its slot, as the pool's worker_info() shows it: its pid; kill() (SIGKILL, the
    worker alone, as the OOM killer would); and wait() until the pool shows it exited: its process's watcher has
    seen it exit and killed what its engine started. Nothing has reaped it then (worker_info() reaps nothing): the
    pool does, in the round that finds it dead, or in close()."""

    def __init__(self, pool, slot: int) -> None:
        self.pool, self.slot = pool, slot
        self.pid = pool.worker_info()[slot].pid

    def kill(self) -> None:
        info = self.pool.worker_info()[self.slot]
        assert info.state == "ready" and info.pid == self.pid, info  # not a pid the pool has let go of
        os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = self.pool.worker_info()[self.slot]
            assert info.pid == self.pid, f"slot {self.slot} holds another worker: {info}"
            if info.state == "exited":
                return
            assert time.monotonic() < deadline, f"pool worker {self.slot} (pid {self.pid}) not seen to exit in " \
                                                f"{timeout} s: {info}"
            time.sleep(0.05)


def kill_and_wait(victim):
    """SIGKILL `victim` (a WorkerProcess, or a process like one) and wait until it has gone; `victim`."""
    victim.kill()
    victim.wait()
    return victim


class Capturing:
    """The parent engine, except that its capture (the round's first step) runs `before()` first and
    `after(source)` once the capture is published (source: its shm:// name)."""

    def __init__(self, engine, before=lambda: None, after=lambda source: None) -> None:
        self.engine, self.before, self.after = engine, before, after

    def page_size(self) -> int:
        return self.engine.page_size()

    def capture_shared(self, *, chains=None) -> str:
        self.before()
        source = capture_shared(self.engine, chains=chains)
        self.after(source)
        return source


def kill_during_capture(engine, victim) -> Capturing:
    """The parent engine, except that its capture SIGKILLs one pool worker first (the worker alone, as the OOM
    killer would; not the processes its engine started), and waits until it has gone: `victim.kill()`,
    `victim.wait()`."""
    return Capturing(engine, before=lambda: kill_and_wait(victim))


def test_a_worker_killed_while_the_parent_is_captured_is_named_and_replaced(pool, parent, fresh) -> None:
    trunk, suffixes = _round_case(80, 120)
    want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
    parent.generate(trunk, PARAMS)
    parent.generate(trunk + suffixes[0], PARAMS)  # the parent's steady state for this prompt
    before = parent.generate(trunk + suffixes[0], PARAMS)
    victim = WorkerProcess(pool, 1)
    started = descendants(victim.pid) if HAS_PROC else set()  # its engine's own processes (unchecked off Linux)
    with pytest.raises(PoolWorkerDied, match=rf"pool worker 1 \(pid {victim.pid}\) exited with status -9 "
                                             r"\(killed by SIGKILL\) before the round was sent to any worker: "
                                             r".*parent engine is untouched"):
        pool.fork(kill_during_capture(parent, victim), WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert not outliving(started, timeout=30)
    assert parent.generate(trunk + suffixes[0], PARAMS) == before  # the parent serves as before, cache and all
    result = pool.fork(parent, WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert [g.token_ids for g in result.generations] == want
    assert [g.cached_tokens for g in result.generations] == [full_pages(trunk, parent)] * WORKERS
    replaced = pool.worker_info()[1]
    assert replaced.state == "ready" and replaced.pid != victim.pid and os.path.exists(f"/proc/{replaced.pid}")


def test_a_worker_killed_between_rounds_is_replaced_before_the_next_round(pool, parent) -> None:
    """A worker that died between rounds failed the next round (PoolWorkerDied, the round to be made again): that
    round now starts its replacement, before the parent is read, and runs on it, every child's output the same."""
    trunk, suffixes = _round_case(85, 110)
    parent.generate(trunk, PARAMS)
    before = pool.fork(parent, WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    victim = kill_and_wait(WorkerProcess(pool, 1))
    result = pool.fork(parent, WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    assert [g.token_ids for g in result.generations] == [g.token_ids for g in before.generations]
    assert [g.cached_tokens for g in result.generations] == [full_pages(trunk, parent)] * WORKERS
    replaced = pool.worker_info()[1]
    assert replaced.state == "ready" and replaced.pid != victim.pid and os.path.exists(f"/proc/{replaced.pid}")


def flip_a_bit(source: str) -> None:
    """Flip one bit of layer 0's K in a published capture."""
    name, _, nbytes = source[len("shm://"):].partition("#")
    fd = open_segment(name, os.O_RDWR)
    try:
        with mmap.mmap(fd, int(nbytes)) as segment:
            segment[SnapshotFile(segment).info("kv/0/k")[2].offset + 1000] ^= 0x40
    finally:
        os.close(fd)


def test_a_damaged_segment_is_refused_before_any_worker_reads_it(pool, parent, fresh) -> None:
    trunk, suffixes = _round_case(90, 110)
    want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
    parent.generate(trunk, PARAMS)
    # The pool's own error, not a worker's (a worker's refusal is a RuntimeError naming the worker).
    with pytest.raises(CorruptSnapshotError, match=r"the parent's capture for this round \(shm://.*\): tensor "
                       r"'kv/0/k' \(region \d+\): checksum mismatch in chunk 0, .*no worker was sent it"):
        pool.fork(Capturing(parent, after=flip_a_bit), WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
    result = pool.fork(parent, WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)  # a fresh capture
    assert [g.token_ids for g in result.generations] == want
    assert [g.cached_tokens for g in result.generations] == [full_pages(trunk, parent)] * WORKERS


class Unread:
    """A parent that must not be read: the round is refused before any capture. It tells its page size only."""

    def __init__(self, page_size: int = 32) -> None:
        self.page = page_size

    def page_size(self) -> int:
        return self.page

    def capture_shared(self, *, chains=None) -> str:
        raise AssertionError("the parent was read")


def test_a_context_without_a_full_page_is_refused_before_the_parent_is_read(pool, parent) -> None:
    """The pool hands over full pages only: with none, MLX's workers refused the empty KV each (a RuntimeError
    naming both) while others prefilled everything; every engine now gets the same refusal, up front. A page is
    the parent's own: a vLLM parent of 64-token blocks was cut at 32, and a 63-token context moved no KV while
    every worker prefilled it all, reporting 0 cached tokens."""
    page = parent.page_size()
    with pytest.raises(ValueError, match=rf"needs at least one full page \({page} tokens, the parent's page_size\(\)\)"
                                         rf".*got {page - 1} tokens: generate on the parent instead"):
        pool.fork(Unread(page), WORKERS, context=tokens(page - 1, 3), suffixes=[[5]] * WORKERS, params=PARAMS)


def test_a_parent_with_a_request_in_flight_hands_over_the_trunks_kv_only(pool, parent, fresh) -> None:
    """A request in flight on the parent is its own to finish: its capture handed it to the workers too
    (transformers, SGLang), each resumed it beside its round, and the next round's restore was refused ('restore
    needs an idle engine'). The rounds now move the trunk's KV only, and the parent finishes its request as alone."""
    trunk, suffixes = _round_case(130, 100)
    other = tokens(50, 131)
    want = [fresh(trunk + suffix, PARAMS) for suffix in suffixes]
    alone = fresh(other, greedy(30))
    parent.generate(trunk, PARAMS)
    request = parent.submit(other, greedy(30))
    for _ in range(3):
        parent.step()
    for index in range(2):
        result = pool.fork(parent, WORKERS, context=trunk, suffixes=suffixes, params=PARAMS)
        assert [g.token_ids for g in result.generations] == want, f"round {index}"
        assert [g.cached_tokens for g in result.generations] == [full_pages(trunk, parent)] * WORKERS, f"round {index}"
    # A round's capture holds the trunk's full pages and nothing else: transformers and SGLang added the request's
    # pages, so every round moved KV no worker used.
    captured = read_source(capture_shared(parent, chains=[trunk[:full_pages(trunk, parent)]]))
    assert captured.scheduler is None or not captured.scheduler.requests
    tree = captured.prefix
    assert [tree.chain_tokens(leaf) for leaf in tree.leaves()] == [trunk[:full_pages(trunk, parent)]]
    assert sum(map(len, tree.tokens)) == full_pages(trunk, parent)
    del captured, tree  # done reading the parent's segment before its next capture
    assert parent.finish()[request].output_token_ids == alone
