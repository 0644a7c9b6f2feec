"""The sleep/wake tests, written once for every engine: each tests/<engine>/test_sleep.py imports them and supplies
its engine's fixtures, so each engine's run stays in that engine's environment (vLLM's sleeps in a helper process,
with these same functions, and wakes in the test's: the file carries the engine across processes). The check
itself (what runs before the sleep, what a woken engine must do) is thaw_conformance.sleep_wake, which the
conformance suite runs too.

Two greedy requests sharing a trunk (one on MLX, whose snapshot resumes one request) are in flight when the engine
sleeps; the woken engine finishes them exactly, beside new requests. A woken engine may also sleep again before
finishing: the next one finishes them exactly. And a capture taken mid-stream does not change as the engine goes
on (it holds none of the engine's own lists or arrays).

An engine's module supplies the fixtures `sleeper` (a function returning a new contract engine, which the test
closes by sleeping it) and `closed` (a function of an engine: True once it is closed, by the engine's own state),
and imports `in_flight` (the prompts in flight when the engine sleeps) unless it defines fewer, and `at_sleep`
(a check of the engine just before it sleeps) unless it has one.
"""

import dataclasses

import pytest

from thaw_conformance.sleep_wake import NEW_PROMPT, PARAMS, PROMPTS, check_woken, run_midway, sleep_midway
from thaw_format.sdk import sleep, wake


@pytest.fixture
def in_flight() -> list[list[int]]:
    return PROMPTS


@pytest.fixture
def at_sleep():
    return lambda engine: None


def held(snapshot) -> tuple:
    """What a capture holds, as values: its requests and prefix tree as text, its generator states and KV bytes."""
    requests = [(repr(dataclasses.replace(r, rng_state=None)), r.rng_state and r.rng_state.tobytes())
                for r in snapshot.scheduler.requests]
    layers = snapshot.kv.layers if snapshot.kv else []
    kv = [{role: t.tobytes() for role, t in layer.tensors.items()} for layer in layers]
    return requests, repr(snapshot.prefix), kv


def check_capture_holds_still(engine, prompts=PROMPTS) -> None:
    """A capture taken mid-stream is not changed by the engine going on: it holds no list or array the engine
    still writes (a sleep's file, or a restore, would resume the requests from further on than captured)."""
    run_midway(engine, prompts)
    snapshot = engine.capture(include_weights=False)
    assert snapshot.scheduler and snapshot.scheduler.requests, "captured mid-stream"
    before = held(snapshot)
    engine.step()
    engine.finish()
    engine.generate(NEW_PROMPT, PARAMS)
    assert held(snapshot) == before


def test_a_capture_does_not_change_as_the_engine_goes_on(sleeper, in_flight) -> None:
    engine = sleeper()
    try:
        check_capture_holds_still(engine, in_flight)
    finally:
        engine.close()


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
