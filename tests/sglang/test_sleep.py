"""sleep / wake on SGLang (the tests of tests/sleep_checks.py): an SGLangEngine sleeps with two requests in flight,
one being stepped in SGLang and one waiting its turn in the adapter's queue, and one started from the file's
launch spec finishes both exactly. (The waiting one was not in the adapter's captures, so a sleep lost it.)
A woken engine's restored requests wait in the adapter until `finish` sends them: a second sleep before that
holds them too (it lost them)."""

import pytest
from conftest import ENGINE_ARGS

from sleep_checks import in_flight  # noqa: F401  a shared fixture
from sleep_checks import test_a_capture_does_not_change_as_the_engine_goes_on  # noqa: F401  the shared tests
from sleep_checks import test_a_woken_engine_sleeps_again_before_finishing  # noqa: F401
from sleep_checks import test_sleep_then_wake_finishes_the_requests_exactly  # noqa: F401


@pytest.fixture
def sleeper(thaw_sglang, zoo):
    return lambda: thaw_sglang.SGLangEngine.start(model_path=str(zoo.make_model("llama")), **ENGINE_ARGS)


@pytest.fixture
def closed():
    from thaw_sglang import _internals

    return lambda engine: not _internals.engine_processes_alive(engine.engine)  # its scheduler processes ended


@pytest.fixture
def at_sleep():
    def one_stepped_one_queued(engine):
        assert engine.streaming is not None and len(engine.queued) == 1, "a request waits in the adapter's queue"

    return one_stepped_one_queued


def test_every_option_a_file_may_set_is_an_engine_argument(thaw_sglang):
    """SGLangEngine.launch_options names SGLang's own ServerArgs fields (start passes them to sglang.Engine), no
    revision (the model is a directory), and load formats SGLang's LoadFormat knows."""
    import inspect

    from sglang.srt.configs.load_config import LoadFormat
    from sglang.srt.server_args import ServerArgs  # a msgspec Struct: its fields are its constructor's arguments

    options = thaw_sglang.SGLangEngine.launch_options
    assert options.keys() <= inspect.signature(ServerArgs).parameters.keys() and "revision" not in options
    assert {LoadFormat(name) for name in options["load_format"].values} <= {LoadFormat.AUTO, LoadFormat.PT,
                                                                             LoadFormat.SAFETENSORS}
