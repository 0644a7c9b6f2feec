"""sleep / wake on transformers (the test of tests/sleep_checks.py): a TransformersEngine of a zoo checkpoint
sleeps with two requests in flight, and one started from the file's launch spec finishes them exactly."""

import inspect

import pytest
from conftest import model_dir

from sleep_checks import at_sleep, in_flight  # noqa: F401  shared fixtures
from sleep_checks import test_a_capture_does_not_change_as_the_engine_goes_on  # noqa: F401  the shared tests
from sleep_checks import test_a_woken_engine_sleeps_again_before_finishing  # noqa: F401
from sleep_checks import test_sleep_then_wake_finishes_the_requests_exactly  # noqa: F401
from thaw_transformers import TransformersEngine


@pytest.fixture
def sleeper():
    return lambda: TransformersEngine.start(str(model_dir("llama")))


@pytest.fixture
def closed():
    return lambda engine: not engine.requests and engine.cache.pages == []  # what TransformersEngine.close drops


def test_every_option_a_file_may_set_is_an_argument_of_start():
    assert TransformersEngine.launch_options.keys() <= inspect.signature(TransformersEngine.start).parameters.keys()
