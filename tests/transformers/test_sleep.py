"""sleep / wake on transformers (the test of tests/sleep_checks.py): a TransformersEngine of a zoo checkpoint
sleeps with two requests in flight, and one started from the file's launch spec finishes them exactly."""

import pytest
from conftest import model_dir

from sleep_checks import in_flight, test_sleep_then_wake_finishes_the_requests_exactly  # noqa: F401  shared
from thaw_transformers import TransformersEngine


@pytest.fixture
def sleeper():
    return lambda: TransformersEngine.start(str(model_dir("llama")))


@pytest.fixture
def closed():
    return lambda engine: not engine.requests and engine.cache.pages == []  # what TransformersEngine.close drops
