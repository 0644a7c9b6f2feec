"""sleep / wake on MLX (the test of tests/sleep_checks.py): an MLXEngine of a zoo checkpoint sleeps with a request
in flight, and one started from the file's launch spec finishes it exactly. An MLX snapshot holds one sequence, so
with two requests in flight the capture is Unsupported: sleep refuses before anything is written or closed."""

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
    with pytest.raises(Unsupported, match="holds one sequence; 2 requests are in flight"):
        sleep(engine, tmp_path / "slept.thaw")
    assert list(tmp_path.iterdir()) == []
    done = engine.finish()
    assert [done[rid].output_token_ids for rid in ids] == want


def test_every_option_a_file_may_set_is_an_argument_of_start():
    assert MLXEngine.launch_options.keys() <= inspect.signature(MLXEngine.start).parameters.keys()


def test_a_sleep_that_leaves_other_sessions_out_warns_and_the_woken_engine_computes_them(sleeper, tmp_path):
    """An MLX snapshot holds one sequence: sleeping an engine that served two unrelated prompts keeps the latest
    one's KV only, and says so (SessionsNotHeld) rather than leaving it to a cached-token count to find out."""
    import warnings

    from thaw_conformance.sleep_wake import NEW_PROMPT, PARAMS, tokens
    from thaw_format.sdk import wake
    from thaw_mlx import SessionsNotHeld

    engine = sleeper()
    other = tokens(40, seed=9)
    want = {"other": engine.generate(other, PARAMS).token_ids, "new": engine.generate(NEW_PROMPT, PARAMS).token_ids}
    with pytest.warns(SessionsNotHeld, match="KV of 1 other sessions .* left out"):
        sleep(engine, tmp_path / "slept.thaw")
    awake = wake(tmp_path / "slept.thaw")
    try:
        new = awake.engine.generate(NEW_PROMPT, PARAMS)
        assert new.token_ids == want["new"] and new.cached_tokens == len(NEW_PROMPT) - 1
        with warnings.catch_warnings():
            warnings.simplefilter("error", SessionsNotHeld)
            awake.engine.capture(include_weights=False)  # its two sessions hold the same tokens: all held
        again = awake.engine.generate(other, PARAMS)
        assert again.token_ids == want["other"] and again.cached_tokens == 0
    finally:
        awake.engine.close()


def test_sessions_sharing_the_held_prefix_count_only_the_tokens_past_it(sleeper):
    """The warning counts the KV left out: a session sharing the 70-token trunk with the held one leaves out only
    its own last tokens (3 of its prompt and its 12 outputs at most)."""
    import re

    from thaw_conformance.sleep_wake import NEW_PROMPT, PARAMS
    from thaw_mlx import SessionsNotHeld

    engine = sleeper()
    try:
        engine.generate(PROMPTS[0], PARAMS)
        engine.generate(NEW_PROMPT, PARAMS)
        with pytest.warns(SessionsNotHeld, match="capture or sleep holds one sequence") as warned:
            engine.capture(include_weights=False)
        left = int(re.search(r"KV of 1 other sessions \((\d+) tokens past", str(warned[0].message)).group(1))
        assert 0 < left <= 3 + PARAMS.max_tokens
    finally:
        engine.close()


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
