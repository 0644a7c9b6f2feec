"""thaw_format.sdk.agreement raises a rank's own failure without its frame keeping it: else exception ->
traceback -> agreed's frame -> the failure is a cycle, and work's locals (a restore's buffers) live until the
next full collection. The other rank is played here (gathered returns two ranks' values); the collector is off,
so only reference counts free what the failure held."""

import gc
import weakref

import pytest
from thaw_format.sdk import agreement


class Held:
    pass


@pytest.fixture
def no_collector(monkeypatch):
    monkeypatch.setattr(agreement, "gathered", lambda group, value: [value, value])
    monkeypatch.setattr(agreement, "is_first", lambda group: True)
    gc.disable()
    yield
    gc.enable()


def _failing_work(refs: list):
    def work():
        held = Held()
        refs.append(weakref.ref(held))
        raise OSError("this rank's read failed")
    return work


@pytest.mark.parametrize("exchange", [agreement.agreed, agreement.from_first])
def test_a_ranks_own_failure_frees_works_locals_once_caught(no_collector, exchange):
    refs = []
    try:
        exchange("the group", _failing_work(refs))
    except OSError:
        pass
    assert refs[0]() is None
