"""ForkPool on transformers (the tests of tests/fork_pool_checks.py): warm worker processes, each a
TransformersEngine of the parent's checkpoint and page size, take only the trunk's KV each round.

The parent's pages are 16 tokens, not DEFAULT_PAGE_SIZE's 32: the pool cut every trunk at 32 whatever the
engine's pages, so a 150-token trunk handed over 128 tokens of 144 cached and a 20-token one was refused."""

import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import model_dir
from descendants import alive

import fork_pool_checks as checks
from fork_pool_checks import (  # noqa: F401  the pool's tests and fixtures, written once for every engine
    pool, pool_env, test_the_parents_page_size_is_its_captures, test_rounds_with_different_trunks_match_fresh_engines,
    test_a_worker_killed_while_the_parent_is_captured_is_named_and_replaced,
    test_a_worker_killed_between_rounds_is_replaced_before_the_next_round,
    test_a_damaged_segment_is_refused_before_any_worker_reads_it,
    test_a_context_without_a_full_page_is_refused_before_the_parent_is_read,
    test_a_parent_with_a_request_in_flight_hands_over_the_trunks_kv_only)
from thaw_format.sdk import ForkPool, greedy, seeded
from thaw_format.sdk.shared import capture_shared
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


# The pool's own bookkeeping, the same on every engine: run on transformers, the quickest to start a worker of.

class _WaitForAnother:
    """The parent engine, except that its first capture waits (up to 3 s) for another thread's capture to begin."""

    def __init__(self, engine) -> None:
        self.engine, self.began, self.first = engine, threading.Event(), True

    def page_size(self) -> int:
        return self.engine.page_size()

    def capture_shared(self, *, chains=None) -> str:
        first, self.first = self.first, False
        if first:
            self.began.wait(3)
        else:
            self.began.set()
        return capture_shared(self.engine, chains=chains)


def test_rounds_from_two_threads_run_one_at_a_time(pool, parent, fresh):
    """Two threads' rounds wrote to the same workers' pipes and the parent's one segment at once: a round read the
    other's replies, or its workers restored the other's trunk (0 cached tokens); they now run one after the other."""
    cases = [checks._round_case(100 + i, 90 + 30 * i) for i in range(2)]
    want = [[fresh(trunk + suffix, checks.PARAMS) for suffix in suffixes] for trunk, suffixes in cases]
    for trunk, _ in cases:
        parent.generate(trunk, checks.PARAMS)
    shared = _WaitForAnother(parent)
    with ThreadPoolExecutor(2) as threads:
        rounds = [threads.submit(pool.fork, shared, checks.WORKERS, context=trunk, suffixes=suffixes,
                                 params=checks.PARAMS) for trunk, suffixes in cases]
        results = [r.result() for r in rounds]
    for (trunk, _), result, expected in zip(cases, results, want):
        assert [g.token_ids for g in result.generations] == expected
        assert [g.cached_tokens for g in result.generations] == [checks.full_pages(trunk, parent)] * checks.WORKERS


def test_a_round_interrupted_by_ctrl_c_leaves_no_worker_answering_the_next_one(pool, parent, fresh):
    """Ctrl-C while the workers generated left each with a reply on its way: the next round read those replies
    (the interrupted round's tokens) as its own. The workers yet to answer are killed and replaced."""
    (trunk, suffixes), (again, others) = checks._round_case(110, 100), checks._round_case(111, 120)
    want = [fresh(again + suffix, checks.PARAMS) for suffix in others]
    parent.generate(trunk, checks.PARAMS)
    before = pool.worker_info()
    # half a second after its capture this process gets SIGINT (Ctrl-C), while the workers are generating
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    # Ctrl-C as a terminal gives it, whatever this process inherited: a shell runs a background job (`cmd &`, as
    # a CI may start its tests) with SIGINT ignored, and then the round ran to its end
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):  # 3000 tokens each: seconds, long after the interrupt
            pool.fork(checks.Capturing(parent, after=lambda source: timer.start()), checks.WORKERS, context=trunk,
                      suffixes=suffixes, params=greedy(3000))
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, inherited)
    # killed and reaped ("exited": each process's returncode), not left running; replaced by the next round
    assert pool.worker_info() == tuple(dataclasses.replace(w, state="exited") for w in before)
    assert not alive({w.pid for w in before})
    parent.generate(again, checks.PARAMS)
    result = pool.fork(parent, checks.WORKERS, context=again, suffixes=others, params=checks.PARAMS)
    assert [g.token_ids for g in result.generations] == want
    assert [g.cached_tokens for g in result.generations] == [checks.full_pages(again, parent)] * checks.WORKERS


def test_each_child_may_have_its_own_params(pool, parent, fresh):
    """Rollouts of one trunk with a seed each: params took one SamplingParams for every child, and a list failed
    after the parent's capture ('asdict() should be called on dataclass instances')."""
    trunk, (suffix, _) = checks._round_case(120, 80)
    params = [seeded(7, 10), seeded(8, 10)]
    want = [fresh(trunk + suffix, p) for p in params]
    parent.generate(trunk, checks.PARAMS)
    result = pool.fork(parent, checks.WORKERS, context=trunk, suffixes=[suffix] * checks.WORKERS, params=params)
    assert [g.token_ids for g in result.generations] == want and want[0] != want[1]
    assert [g.cached_tokens for g in result.generations] == [checks.full_pages(trunk, parent)] * checks.WORKERS


@pytest.mark.parametrize("suffixes, params, error", [
    ([[5], [6]], {"max_tokens": 5}, r"params is a thaw_format.SamplingParams .* or one per child, not dict"),
    ([[5], [6]], [checks.PARAMS] * 3, r"2 children take one SamplingParams, or 2 \(one each\), got 3"),
    ([[5], "ab"], checks.PARAMS, r"suffix 1 is a sequence of token ids \(whole numbers\), not str 'ab'"),
    ([[5], [6.5]], checks.PARAMS, r"suffix 1 is a sequence of token ids \(whole numbers\), not list \[6.5\]"),
    ([[5], 6], checks.PARAMS, r"suffix 1 is a sequence of token ids \(whole numbers\), not int 6"),
    ([[5], [True, 6]], checks.PARAMS, r"suffix 1 is a sequence of token ids \(whole numbers\), not list \[True, 6\]"),
])
def test_bad_params_and_suffixes_are_refused_before_the_parent_is_read(pool, parent, suffixes, params, error):
    """These failed after the parent's capture, with errors that named neither the argument nor the child (a float
    token was cut to an int by int())."""
    with pytest.raises((TypeError, ValueError), match=error):
        pool.fork(checks.Unread(parent.page_size()), checks.WORKERS, context=checks.tokens(40, 3), suffixes=suffixes,
                  params=params)


def _pool_workers_alive() -> list[int]:
    """The pids of this process's children that run a pool worker."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                ppid = int(stat.read().rpartition(")")[2].split()[1])
                command = cmdline.read()
        except OSError:  # ended meanwhile
            continue
        if ppid == os.getpid() and b"thaw_format.sdk.pool_worker" in command:
            alive.append(int(pid))
    return alive


def test_closing_while_a_round_waits_leaves_no_worker_running(parent):
    """close() took no lock: a round waiting for the one before it went on against the closed pipes (a write to a
    closed stdin raised ValueError, not BrokenPipeError), and its handler killed and started a new engine per
    worker that nothing stopped. The waiting round is now refused, and no worker process is left."""
    others = set(_pool_workers_alive())  # the module's pool's
    trunk, (suffix, _) = checks._round_case(140, 40)
    parent.generate(trunk, checks.PARAMS)
    pool = ForkPool(parent, workers=1)
    started, holding_it, go, outcome = pool.worker_info(), threading.Event(), threading.Event(), {}
    # its capture (a round's first step, once the round holds the pool) waits for `go`: a round in progress
    held = checks.Capturing(parent, before=lambda: (holding_it.set(), go.wait(60)))

    def fork(key, engine):
        try:
            outcome[key] = pool.fork(engine, 1, context=trunk, suffixes=[suffix], params=checks.PARAMS)
        except Exception as exc:
            outcome[key] = exc

    holding = threading.Thread(target=fork, args=("held", held))
    holding.start()
    try:
        assert holding_it.wait(60)  # a round in progress
        waiting = threading.Thread(target=fork, args=("waiting", parent))
        waiting.start()
        time.sleep(0.5)  # the round waits for the pool
        closing = threading.Thread(target=pool.close)
        closing.start()
        deadline = time.monotonic() + 60
        while not pool.closed:  # close() has begun; it waits for the round in progress
            assert time.monotonic() < deadline, "close() did not mark the pool closed within 60 s"
            time.sleep(0.01)
    finally:
        go.set()
    for thread in (holding, waiting, closing):
        thread.join(60)
    assert len(outcome["held"].generations) == 1  # the round in progress ends as it would have
    assert str(outcome["waiting"]) == "this ForkPool is closed; start a new one"
    assert pool.worker_info() == tuple(dataclasses.replace(w, state="exited") for w in started)
    assert set(_pool_workers_alive()) == others
