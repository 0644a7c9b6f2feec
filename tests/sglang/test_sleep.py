"""sleep / wake on SGLang (the test of tests/sleep_checks.py): an SGLangEngine sleeps with two requests in flight,
one being stepped in SGLang and one waiting its turn in the adapter's queue, and one started from the file's
launch spec finishes both exactly. (The waiting one was not in the adapter's captures, so a sleep lost it.)"""

import pytest
from conftest import ENGINE_ARGS

from sleep_checks import in_flight, test_sleep_then_wake_finishes_the_requests_exactly  # noqa: F401  shared


@pytest.fixture
def sleeper(thaw_sglang, zoo):
    return lambda: thaw_sglang.SGLangEngine.start(model_path=str(zoo.make_model("llama")), **ENGINE_ARGS)


@pytest.fixture
def closed():
    from thaw_sglang import _internals

    return lambda engine: not _internals.engine_processes_alive(engine.engine)  # its scheduler processes ended
