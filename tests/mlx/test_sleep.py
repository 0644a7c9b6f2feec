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
