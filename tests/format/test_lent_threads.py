"""Lent slots given back from many threads at once (thaw_format.sdk.lent): a borrowed snapshot's finalizer runs on
whichever thread drops its last view, so this process's cache of the lenders' control segments is shared by them
all. Unlocked, threads that found a control unmapped each opened and mapped it."""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy
import pytest

import thaw_format
from thaw_format.sdk import lent

THREADS = 8


@pytest.fixture
def lenders(request):
    """`request.param` lenders, closed after the test, and the control cache as it was before it."""
    started = [lent.Lender() for _ in range(request.param)]
    yield started
    for lender in started:
        lent._CONTROLS.pop(lender._ctl.name, None)
        lender.close()


@pytest.mark.parametrize("lenders", [1], indirect=True)
def test_threads_giving_back_slots_of_one_control_at_once_map_it_once(lenders, monkeypatch) -> None:
    """Its mapping made slow (as a loaded machine may make it), every thread found the control unmapped and
    mapped it: THREADS opens of one segment, the last mapping kept. Now one maps it and the others use that."""
    (lender,) = lenders
    control = lender._ctl.name
    lent._CONTROLS.pop(control, None)
    opened, open_segment = collections.Counter(), lent.open_segment

    def slow_open(name, flags):
        opened[name] += 1
        time.sleep(0.02)
        return open_segment(name, flags)

    monkeypatch.setattr(lent, "open_segment", slow_open)
    for slot in range(THREADS):
        lender._ctl.buf[slot] = lent._TAKEN
    together = threading.Barrier(THREADS)

    def give_back(slot: int) -> None:
        together.wait()
        lent._free(control, slot)

    with ThreadPoolExecutor(THREADS) as threads:
        list(threads.map(give_back, range(THREADS)))
    assert opened[control] == 1
    assert bytes(lender._ctl.buf[:THREADS]) == bytes([lent._FREE]) * THREADS


@pytest.mark.parametrize("lenders", [2 * lent._MAX_MAPPINGS], indirect=True)
def test_snapshots_dropped_on_many_threads_give_every_slot_back(lenders) -> None:
    """A smoke test (it passed before the lock too: the race it ran into lost no give-back): borrowed snapshots of
    more lenders than the cache holds, dropped on THREADS threads at once, each drop giving its slot back through
    the cache and evicting as it goes; every slot comes back free, and the cache keeps its bound."""
    per_lender = 16
    sources = [lender.publish(thaw_format.Snapshot(weights=thaw_format.Weights(
        {"t": numpy.full(256, index, numpy.uint8)}))) for index, lender in enumerate(lenders)
        for _ in range(per_lender)]
    borrowed = [lent.borrow(source) for source in sources]
    for lender in lenders:
        assert bytes(lender._ctl.buf[:per_lender]) == bytes([lent._TAKEN]) * per_lender
    together = threading.Barrier(THREADS)

    def drop(share: list) -> None:
        together.wait()
        while share:
            share.pop()  # its last view: the finalizer gives its slot back on this thread

    shares = [borrowed[i::THREADS] for i in range(THREADS)]
    del borrowed
    with ThreadPoolExecutor(THREADS) as threads:
        list(threads.map(drop, shares))
    for lender in lenders:
        assert bytes(lender._ctl.buf[:per_lender]) == bytes([lent._FREE]) * per_lender, lender._ctl.name
    assert len(lent._CONTROLS) <= lent._MAX_MAPPINGS
