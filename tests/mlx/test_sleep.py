"""sleep / wake on MLX (the test of tests/sleep_checks.py): an MLXEngine of a zoo checkpoint sleeps with a request
in flight, and one started from the file's launch spec finishes it exactly, and serves every session the sleeper held
from its pages. An MLX snapshot resumes one request in flight, so with two the capture is Unsupported: sleep
refuses before anything is written or closed."""

import inspect

import pytest

from sleep_checks import PROMPTS, at_sleep, run_midway  # noqa: F401  at_sleep: a shared fixture
from sleep_checks import test_a_capture_does_not_change_as_the_engine_goes_on  # noqa: F401  the shared tests
from sleep_checks import test_a_woken_engine_sleeps_again_before_finishing  # noqa: F401
from sleep_checks import test_sleep_then_wake_finishes_the_requests_exactly  # noqa: F401
from thaw_conformance import zoo
from thaw_format.sdk import Unsupported, sleep
from thaw_mlx import MLXEngine


@pytest.fixture
def sleeper():
    return lambda: MLXEngine.start(str(zoo.make_model("llama")))


@pytest.fixture
def closed():
    return lambda engine: engine.sessions == [] and engine.running == {}  # MLXEngine.close drops both


@pytest.fixture
def in_flight():
    return PROMPTS[:1]


def test_two_requests_in_flight_are_refused_and_the_engine_serves_on(sleeper, tmp_path):
    engine = sleeper()
    ids, want = run_midway(engine)
    with pytest.raises(Unsupported, match="holds at most one request in flight; 2 are in flight"):
        sleep(engine, tmp_path / "slept.thaw")
    assert list(tmp_path.iterdir()) == []
    done = engine.finish()
    assert [done[rid].output_token_ids for rid in ids] == want


def test_every_option_a_file_may_set_is_an_argument_of_start():
    assert MLXEngine.launch_options.keys() <= inspect.signature(MLXEngine.start).parameters.keys()


def test_a_woken_engine_serves_every_session_from_its_pages(sleeper, tmp_path):
    """The sleeper served two prompts on one trunk and one unrelated to it, and has a request in flight: the
    sleep holds them all (no SessionsNotHeld), and the woken engine finishes the request exactly and serves a
    prompt extending each session with the sleeper's tokens, reading that session's whole KV."""
    import warnings

    from thaw_conformance.sleep_wake import NEW_PROMPT, PARAMS, tokens
    from thaw_format.sdk import wake
    from thaw_mlx import SessionsNotHeld

    engine = sleeper()
    for prompt in [*PROMPTS, tokens(40, seed=9)]:
        engine.generate(prompt, PARAMS)
    extending = [s.tokens + [3, 1, 4] for s in engine.sessions]
    want = [engine.generate(prompt, PARAMS) for prompt in [*extending, NEW_PROMPT]]
    del engine.sessions[len(extending):]  # the references' own sessions: the woken engine reads the served ones
    rid = engine.submit(NEW_PROMPT, PARAMS)
    engine.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SessionsNotHeld)
        sleep(engine, tmp_path / "slept.thaw")
    awake = wake(tmp_path / "slept.thaw")
    try:
        assert awake.engine.finish()[rid].output_token_ids == want[-1].token_ids
        for prompt, expected in zip(extending, want):
            got = awake.engine.generate(prompt, PARAMS)
            assert (got.token_ids, got.cached_tokens) == (expected.token_ids, expected.cached_tokens)
            assert got.cached_tokens == len(prompt) - 4  # the session's every cached token
    finally:
        awake.engine.close()


def test_a_capture_of_no_chains_holds_no_kv_and_does_not_warn(sleeper):
    import warnings

    from thaw_conformance.sleep_wake import NEW_PROMPT, PARAMS
    from thaw_mlx import SessionsNotHeld

    engine = sleeper()
    try:
        engine.generate(PROMPTS[0], PARAMS)
        engine.generate(NEW_PROMPT, PARAMS)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SessionsNotHeld)
            assert engine.capture(include_weights=False, chains=[]).kv is None
    finally:
        engine.close()
