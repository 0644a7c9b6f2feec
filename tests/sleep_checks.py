"""The sleep/wake tests, written once for every engine: each tests/<engine>/test_sleep.py imports them and supplies
its engine's fixtures, so each engine's run stays in that engine's environment (vLLM's sleeps in a helper process,
with these same functions, and wakes in the test's: the file carries the engine across processes).

Two greedy requests sharing a trunk (one on MLX, whose snapshot holds one sequence) run alone first (what each
must give), then together: submitted, stepped a few tokens, and the engine is put to sleep in a file, which
closes it. A new engine woken from the file takes new requests beside them (their ids must not be restored
ones': a fresh engine's id counter starts again), then finishes all: the resumed ones with exactly the token ids
they got alone, its own cached-token count showing that they read the restored pages, and the new ones with the
tokens they get alone. A woken engine may also sleep again before finishing: the next one finishes them exactly.

An engine's module supplies the fixtures `sleeper` (a function returning a new contract engine, which the test
closes by sleeping it) and `closed` (a function of an engine: True once it is closed, by the engine's own state),
and imports `in_flight` (the prompts in flight when the engine sleeps) unless it defines fewer, and `at_sleep`
(a check of the engine just before it sleeps) unless it has one.
"""

import random

import pytest

from thaw_format.sdk import greedy, sleep, wake

PARAMS = greedy(12)
STEPS = 4  # tokens each request has made when the engine sleeps (fewer on an engine whose first step prefills)


def tokens(n: int, seed: int) -> list[int]:
    """Deterministic ids in [3, 250): every zoo model's vocabulary holds them, and the template's (256)."""
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


TRUNK = tokens(70, seed=1)  # two full pages of 32 and a partial one
PROMPTS = [TRUNK + tokens(3, seed=2), TRUNK + tokens(5, seed=3)]
NEW_PROMPT = TRUNK + tokens(4, seed=4)
NEW_REQUESTS = 4  # submitted to a woken engine: as many ids as the sleeper's generate and submit calls used


@pytest.fixture
def in_flight() -> list[list[int]]:
    return PROMPTS


@pytest.fixture
def at_sleep():
    return lambda engine: None


def run_midway(engine, prompts=PROMPTS) -> tuple[list[str], list[list[int]]]:
    """Each prompt alone (the reference), then all submitted and stepped STEPS times: (their ids, references)."""
    want = [engine.generate(prompt, PARAMS).token_ids for prompt in prompts]
    ids = [engine.submit(prompt, PARAMS) for prompt in prompts]
    for _ in range(STEPS):
        engine.step()
    return ids, want


def sleep_midway(engine, path, prompts=PROMPTS, at_sleep=None) -> list[list[int]]:
    """run_midway, then sleep the engine to `path` (closing it all the same if that fails); the references, in
    the prompts' order. `at_sleep(engine)` checks the engine just before it sleeps."""
    try:
        _, want = run_midway(engine, prompts)
        if at_sleep is not None:
            at_sleep(engine)
        sleep(engine, path)
    except BaseException:
        engine.close()
        raise
    return want


def full_pages(engine, prompt: list[int]) -> int:
    return len(prompt) // engine.page_size() * engine.page_size()


def check_woken(awake, want: list[list[int]], prompts=PROMPTS) -> None:
    """The woken engine takes new requests beside the resumed ones, with ids of their own, then finishes them all
    exactly, the resumed ones reading the restored trunk."""
    engine = awake.engine
    assert sorted(r.prompt_token_ids for r in awake.resumed) == sorted(prompts)
    assert any(r.previous_output_token_ids for r in awake.resumed), "they slept mid-generation"
    new = [engine.submit(NEW_PROMPT, PARAMS) for _ in range(NEW_REQUESTS)]
    resumed = {r.request_id for r in awake.resumed}
    assert len(set(new)) == NEW_REQUESTS and not resumed & set(new), f"ids {new} clash with restored {resumed}"
    done = engine.finish()  # every request in flight
    assert done.keys() == resumed | set(new)
    for request in awake.resumed:
        finished = done[request.request_id]
        assert finished.output_token_ids == want[prompts.index(request.prompt_token_ids)]
        assert finished.cached_tokens >= full_pages(engine, TRUNK), "the resumed request read the restored pages"
    alone = engine.generate(NEW_PROMPT, PARAMS).token_ids
    assert all(done[rid].output_token_ids == alone for rid in new)


def test_sleep_then_wake_finishes_the_requests_exactly(sleeper, closed, in_flight, at_sleep, tmp_path) -> None:
    engine = sleeper()
    path = tmp_path / "slept.thaw"
    want = sleep_midway(engine, path, in_flight, at_sleep)
    assert closed(engine)
    awake = wake(path)
    try:
        check_woken(awake, want, in_flight)
    finally:
        awake.engine.close()


def test_a_woken_engine_sleeps_again_before_finishing(sleeper, in_flight, tmp_path) -> None:
    """The restored requests, not yet resumed, are in flight: the second sleep holds them, as they were."""
    want = sleep_midway(sleeper(), tmp_path / "first.thaw", in_flight)
    awake = wake(tmp_path / "first.thaw")
    try:
        sleep(awake.engine, tmp_path / "second.thaw")
    except BaseException:
        awake.engine.close()
        raise
    again = wake(tmp_path / "second.thaw")
    try:
        check_woken(again, want, in_flight)
    finally:
        again.engine.close()
