"""Shared-memory sources across processes of one family, which share one multiprocessing resource tracker.

A reader that attached through SharedMemory registered the segment with that tracker; its owner's later unlink
then unregistered it twice, and the tracker printed a KeyError traceback (or unlinked a segment under its
owner). Readers now attach without the tracker: each scenario runs in a fresh interpreter whose stderr, the
tracker's too, must stay free of tracker complaints.
"""

from __future__ import annotations

import textwrap

import numpy
import pytest
from tracker_scenario import assert_runs_without_tracker_complaints

import thaw_format
from thaw_format.sdk.shared import Segment, SharedSnapshot, read_shared, read_source, release

SCENARIO = textwrap.dedent("""
    import multiprocessing, sys
    import numpy, thaw_format
    from multiprocessing import shared_memory
    from thaw_format.sdk.shared import SharedSnapshot, Segment, read_shared

    def read(source, unlink):
        snap = read_shared(source, unlink=unlink)
        assert bytes(snap.weights.tensors["t"].data) == bytes(range(64))

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("spawn")
        snap = thaw_format.Snapshot(weights=thaw_format.Weights({"t": numpy.arange(64, dtype=numpy.uint8)}))
        shared = SharedSnapshot(snap)
        shared.detach()  # the child reads it last and unlinks it
        segment = Segment()
        reused = segment.publish(snap)
        for source, unlink in ((shared.source, True), (reused, False)):
            child = ctx.Process(target=read, args=(source, unlink))
            child.start(); child.join()
            assert child.exitcode == 0, child.exitcode
        segment.close()  # the owner's own registration, unbalanced by nobody
        print("done")
""")


def test_readers_in_child_processes_leave_the_owners_tracker_alone(tmp_path):
    assert_runs_without_tracker_complaints(SCENARIO, tmp_path)


def test_a_released_source_is_gone_and_says_so():
    snap = thaw_format.Snapshot(weights=thaw_format.Weights({"t": numpy.zeros(8, numpy.float32)}))
    shared = SharedSnapshot(snap)
    shared.detach()
    release(shared.source)
    try:
        read_shared(shared.source)
    except FileNotFoundError as exc:
        assert "is gone" in str(exc)
    else:
        raise AssertionError("a released segment was read")


def test_only_a_shared_memory_segment_may_be_restored_as_checked_by_its_caller(tmp_path):
    """restore_source(..., verified=True) leaves the chunks of a segment its caller (a fork pool) checked; a file
    is always checked as it is read, so `verified` is refused for it before anything is read."""
    snap = thaw_format.Snapshot(weights=thaw_format.Weights({"t": numpy.arange(64, dtype=numpy.uint8)}))
    path = tmp_path / "s.thaw"
    thaw_format.save(snap, path)
    with pytest.raises(ValueError, match="verified=True is for a shared-memory segment .* a file is checked"):
        read_source(str(path), verified=True)
    segment = Segment()
    try:
        source = segment.publish(snap)
        assert bytes(read_source(source, verified=True).weights.tensors["t"].data) == bytes(range(64))
    finally:
        segment.close()


def test_a_reader_that_forgets_a_segment_keeps_no_mapping_of_it():
    """A fork pool checks each round's segment through lent's cached mapping; forgetting it (the pool's close)
    drops that mapping, so the segment's memory goes once its owner unlinks it."""
    from thaw_format.sdk import lent

    snap = thaw_format.Snapshot(weights=thaw_format.Weights({"t": numpy.arange(64, dtype=numpy.uint8)}))
    segment = Segment()
    try:
        source = segment.publish(snap)
        lent.open_snapshot(source)
        name = lent.parse(source)[0]
        assert name in lent._MAPPINGS
        lent.forget(source)
        assert name not in lent._MAPPINGS
    finally:
        segment.close()


def test_an_engine_without_the_verified_keyword_still_restores_checked_sources():
    """An engine written before the contract's `verified` keyword: sdk.shared.restore_source passes the keyword
    only when set, so every caller that has not checked the source itself still reaches the engine."""
    from thaw_format.sdk.shared import restore_source

    class OlderEngine:
        def restore_source(self, source):
            return [source]

    assert restore_source(OlderEngine(), "shm://x#8") == ["shm://x#8"]
