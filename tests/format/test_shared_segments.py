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
import thaw_format.numpy  # noqa: F401  (_kv_snapshot builds its tensors with it)
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
        assert (name, False) in lent._MAPPINGS
        lent.forget(source)
        assert (name, False) not in lent._MAPPINGS
    finally:
        segment.close()


def test_a_writable_view_writes_the_owners_segment_and_is_dropped_once_unlinked():
    """A tensor-parallel rank writes its share into the segment its first rank published, through lent's one
    mapping cache: a later mapping drops the cached one of a segment its owner unlinked (its memory goes)."""
    from thaw_format.sdk import lent

    snap = thaw_format.Snapshot(weights=thaw_format.Weights({"t": numpy.arange(64, dtype=numpy.uint8)}))
    first, second = Segment(), Segment()
    try:
        source = first.publish(snap)
        view = lent.writable_view(source)
        view[0] ^= 0xFF
        assert lent._mapping(lent.parse(source)[0], len(view))[0] == view[0]  # the read-only mapping sees it
        name = lent.parse(source)[0]
        del view
        first.close()
        lent.writable_view(second.publish(snap))
        assert not [key for key in lent._MAPPINGS if key[0] == name]
    finally:
        second.close()


def test_threads_reading_and_forgetting_segments_share_the_mapping_cache_safely():
    """Threads (a Ray driver's put beside ForkPool rounds) map more segments than the cache keeps and forget
    them: each one's eviction or forget must not break another's lookup (a KeyError in move_to_end, or the prune
    iterating the cache while another thread adds to it). Threads switch every microsecond to make that likely."""
    import sys
    import threading

    from thaw_format.sdk import lent

    snap = thaw_format.Snapshot(weights=thaw_format.Weights({"t": numpy.arange(64, dtype=numpy.uint8)}))
    segments = [Segment() for _ in range(lent._MAX_MAPPINGS + 2)]
    errors, interval = [], sys.getswitchinterval()
    try:
        sources = [segment.publish(snap) for segment in segments]

        def hammer(offset: int) -> None:
            try:
                for i in range(300):
                    source = sources[(offset + i) % len(sources)]
                    assert bytes(lent.segment_view(source)[-1:]) != b""
                    if i % 7 == 0:
                        lent.forget(source)
            except Exception as exc:
                errors.append(exc)

        sys.setswitchinterval(1e-6)
        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        for source in sources:
            lent.forget(source)
        for segment in segments:
            segment.close()
    assert errors == []


def test_an_engine_without_the_verified_keyword_still_restores_checked_sources():
    """An engine written before the contract's `verified` keyword: sdk.shared.restore_source passes the keyword
    only when set, so every caller that has not checked the source itself still reaches the engine."""
    from thaw_format.sdk.shared import restore_source

    class OlderEngine:
        def restore_source(self, source):
            return [source]

    assert restore_source(OlderEngine(), "shm://x#8") == ["shm://x#8"]


def _kv_snapshot() -> thaw_format.Snapshot:
    rng = numpy.random.default_rng(5)
    layers = [thaw_format.KVLayer("attention", {role: thaw_format.numpy.from_numpy(
        rng.standard_normal((3, 4, 2, 8)).astype(numpy.float32)) for role in ("k", "v")},
        num_kv_heads=2, head_dim=8) for _ in range(2)]
    return thaw_format.Snapshot(
        model=thaw_format.ModelInfo(architecture="x", config_digest="sha256:" + "0" * 64, dtype="float32"),
        kv=thaw_format.KVCache(page_size=4, dtype="float32", layers=layers),
        prefix=thaw_format.PrefixTree(parents=[-1, 0, 1], tokens=[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]))


def _tensor_bytes(snapshot) -> list[bytes]:
    return [bytes(t.data) for layer in snapshot.kv.layers for t in layer.tensors.values()]


def _segment_file(source: str) -> str:
    return "/dev/shm/" + source[len("shm://"):].partition("#")[0]


def test_a_snapshot_loaded_shared_is_its_own_segment_and_outlives_its_file(tmp_path):
    import gc
    import os

    from thaw_format.sdk import lent

    lent.drop_idle_loads()  # segments earlier tests' loads left kept would take the places this one checks
    path = tmp_path / "kv.thaw"
    thaw_format.save(_kv_snapshot(), path)
    plain = thaw_format.load(path)
    loaded = thaw_format.load(path, shared=True)
    source = lent.lent_source(loaded)
    assert source is not None and os.path.exists(_segment_file(source))  # a restore hands this segment over
    other = thaw_format.load(path, shared=True)
    assert lent.lent_source(other) not in (None, source)  # each load has a segment of its own
    path.write_bytes(b"\0" * 64)  # the file changed, then deleted, after the load: the snapshot holds its bytes
    os.remove(path)
    assert loaded.id == plain.id and loaded.prefix == plain.prefix and _tensor_bytes(loaded) == _tensor_bytes(plain)
    assert all(memoryview(t.data).readonly for layer in loaded.kv.layers for t in layer.tensors.values())
    assert _tensor_bytes(lent.open_snapshot(source, verify=True)) == _tensor_bytes(plain)  # its CRCs hold there

    thaw_format.save(_kv_snapshot(), path)
    del loaded
    gc.collect()
    again = thaw_format.load(path, shared=True)
    assert lent.lent_source(again) == source  # the dropped load's segment, kept warm for the next one
    assert _tensor_bytes(again) == _tensor_bytes(plain)


SHARED_LOAD_SCENARIO = textwrap.dedent("""
    import gc, os, sys
    import numpy, thaw_format
    from thaw_format.sdk import lent

    snap = thaw_format.Snapshot(weights=thaw_format.Weights({"t": numpy.arange(64, dtype=numpy.uint8)}))
    thaw_format.save(snap, sys.argv[1] if len(sys.argv) > 1 else "s.thaw")
    names = []
    for _ in range(4):  # more loads alive at once than segments kept: the others are unlinked when dropped
        held = [thaw_format.load("s.thaw", shared=True) for _ in range(3)]
        names += [lent.lent_source(h).partition("#")[0][len("shm://"):] for h in held]
        del held
        gc.collect()
    assert sum(os.path.exists("/dev/shm/" + n) for n in set(names)) == lent.KEEP_IDLE, names
    with open("names", "w") as f:
        f.write(" ".join(set(names)))
    print("done")  # the kept segments are unlinked at exit: the tracker finds none left
""")


def test_shared_loads_keep_a_few_segments_and_unlink_every_one_at_exit(tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)
    assert_runs_without_tracker_complaints(SHARED_LOAD_SCENARIO, tmp_path)
    assert not any(os.path.exists("/dev/shm/" + n) for n in (tmp_path / "names").read_text().split())


def test_a_corrupt_file_is_refused_by_a_shared_load_naming_the_chunk(tmp_path):
    path = tmp_path / "kv.thaw"
    thaw_format.save(_kv_snapshot(), path)
    with thaw_format.open(path) as f:
        region = f.info("kv/1/v")[2]
    data = bytearray(path.read_bytes())
    data[region.offset + 10] ^= 0x40
    path.write_bytes(data)
    with pytest.raises(thaw_format.CorruptSnapshotError, match=r"tensor 'kv/1/v' .*checksum mismatch in chunk 0"):
        thaw_format.load(path, shared=True)
    path.write_bytes(data[: region.offset + 10])  # cut short inside that tensor
    with pytest.raises(thaw_format.CorruptSnapshotError):
        thaw_format.load(path, shared=True)
    with pytest.raises(ValueError, match="choose one"):
        thaw_format.load(path, shared=True, mmap=True)


def test_a_forked_child_that_exits_leaves_its_parents_shared_loads_alone(tmp_path):
    import atexit
    import gc
    import multiprocessing
    import os

    from thaw_format.sdk import lent

    def exit_normally():  # what a forked child's normal exit runs: atexit, the finalizers it inherited
        atexit._run_exitfuncs()
        os._exit(0)

    path = tmp_path / "kv.thaw"
    thaw_format.save(_kv_snapshot(), path)
    held, dropped = thaw_format.load(path, shared=True), thaw_format.load(path, shared=True)
    kept = lent.lent_source(dropped)
    del dropped
    gc.collect()  # its segment is kept for the next load
    child = multiprocessing.get_context("fork").Process(target=exit_normally)
    child.start()
    child.join()
    assert child.exitcode == 0
    assert os.path.exists(_segment_file(lent.lent_source(held)))  # the parent's, still in use
    assert lent.lent_source(thaw_format.load(path, shared=True)) == kept  # and its kept one, still there


def test_a_shared_load_without_room_in_dev_shm_raises_before_writing(tmp_path, monkeypatch):
    import errno
    import os

    from thaw_format.sdk import lent

    path = tmp_path / "big.thaw"
    thaw_format.save(_kv_snapshot(), path)
    lent.drop_idle_loads()  # no kept segment to reuse: this load needs a new one
    created = []  # the names of the segments this load creates: other processes' come and go in /dev/shm

    class Named(lent.shared_memory.SharedMemory):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            created.append(self.name)

    def full(fd, offset, length):  # tmpfs at its size limit (writing into the segment would SIGBUS)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lent.shared_memory, "SharedMemory", Named)
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="no room for a .*shared load in /dev/shm"):
        thaw_format.load(path, shared=True)
    assert created and not [name for name in created if os.path.exists(f"/dev/shm/{name}")]  # none left behind
