"""Lent snapshots (thaw_format.sdk.lent) come back to their lender however their borrower ends: given back
when its views are collected, or taken back when every process holding it has died without giving it back;
never while any process, a forked child included, still holds it."""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os

import numpy
import pytest

import thaw_format
from thaw_format.sdk import lent
from thaw_format.sdk.shared import release_segments

FORK = multiprocessing.get_context("fork")


def snapshot(fill: int) -> thaw_format.Snapshot:
    return thaw_format.Snapshot(weights=thaw_format.Weights({"t": numpy.full(4096, fill, numpy.uint8)}))


def segment(source: str) -> str:
    return lent.parse(source)[0]


@pytest.fixture
def lender():
    started = lent.Lender()
    yield started
    started.close()


def _borrow_and_die(source: str) -> None:
    held = lent.borrow(source)
    assert bytes(held.weights.tensors["t"].data[:1]) == b"\x01"
    os._exit(3)  # no finalizer runs: the slot is never given back


def _exit_normally() -> None:
    """What a forked child's normal exit runs (atexit, weakref finalizers: this copy of the snapshot is given
    back), without leaving the test's frames the fork copied."""
    atexit._run_exitfuncs()
    os._exit(0)


def run(target, *args) -> None:
    child = FORK.Process(target=target, args=args)
    child.start()
    child.join()
    assert child.exitcode in (0, 3), child.exitcode


def test_a_snapshot_given_back_is_recycled_and_a_held_one_is_not(lender):
    held = lent.borrow(lender.publish(snapshot(1)))
    first = lent.lent_source(held)
    second = lender.publish(snapshot(2))
    assert segment(second) != segment(first)  # held: never overwritten
    lent.borrow(second)  # borrowed and dropped at once: given back
    gc.collect()
    assert segment(lender.publish(snapshot(3))) == segment(second)
    assert bytes(held.weights.tensors["t"].data) == bytes([1]) * 4096


def test_the_slot_of_a_borrower_that_died_is_taken_back(lender):
    source = lender.publish(snapshot(1))
    run(_borrow_and_die, source)
    assert segment(lender.publish(snapshot(2))) == segment(source)


def test_a_forked_child_giving_back_leaves_the_snapshot_with_its_parent(lender):
    held = lent.borrow(lender.publish(snapshot(1)))
    source = lent.lent_source(held)
    run(_exit_normally)
    assert segment(lender.publish(snapshot(2))) != segment(source)  # the parent still holds it
    assert bytes(held.weights.tensors["t"].data) == bytes([1]) * 4096
    del held
    gc.collect()
    assert segment(lender.publish(snapshot(3))) == segment(source)


def test_a_lent_snapshot_not_yet_borrowed_is_never_reused(lender):
    source = lender.publish(snapshot(1))
    assert segment(lender.publish(snapshot(2))) != segment(source)


def exists(source: str) -> bool:
    return os.path.exists(f"/dev/shm/{segment(source)}")


def test_a_segment_its_publisher_withdraws_is_unlinked_at_once_and_its_slot_lends_again(lender):
    """A capture that fails after publishing (a tensor-parallel rank's write) withdraws what no client will
    borrow: unlinked now, not UNBORROWED_S later, and the slot lends the next snapshot."""
    withdrawn = lender.publish(snapshot(1))
    lender.withdraw(withdrawn)
    assert not exists(withdrawn)
    with pytest.raises(FileNotFoundError):
        lent.borrow(withdrawn)
    assert lent._slot_of(segment(lender.publish(snapshot(2)))) == lent._slot_of(segment(withdrawn))


def test_a_slot_lent_and_never_borrowed_is_taken_back_once_its_time_is_up():
    """A reader that died between the capture and its borrow (or never borrows) does not hold the slot, and its
    segment's memory, until the lender closes: once unborrowed_s have passed (none here), the lender's next
    publish takes the slot back and unlinks its segment. A borrow coming later fails by name, before it marks
    the slot, which by then lends another snapshot; that one is borrowed and held as any other."""
    lender = lent.Lender(unborrowed_s=0)
    try:
        dropped = [lender.publish(snapshot(fill)) for fill in (1, 2, 3)]
        assert not any(map(exists, dropped[:-1])) and exists(dropped[-1])
        late = dropped[-1]
        now = lender.publish(snapshot(4))  # the late one's slot, taken back, lends this one
        assert not exists(late) and lent._slot_of(segment(now)) == lent._slot_of(segment(late))
        with pytest.raises(FileNotFoundError, match="taken back by its lender \\(not borrowed within"):
            lent.borrow(late)
        held = lent.borrow(now)
        assert segment(lender.publish(snapshot(5))) != segment(now)  # held: never taken back, never reused
        assert bytes(held.weights.tensors["t"].data) == bytes([4]) * 4096
    finally:
        lender.close()


def test_a_slot_its_lender_reads_itself_is_not_taken_back_under_it():
    """A restore in the lender's own process reads a segment it lent through its own buffer (open_snapshot with
    the lender), unborrowed: while that snapshot lives the slot is not taken back."""
    lender = lent.Lender(unborrowed_s=0)
    try:
        source = lender.publish(snapshot(1))
        reading = lent.open_snapshot(source, lender=lender)
        lender.publish(snapshot(2))
        assert exists(source) and bytes(reading.weights.tensors["t"].data) == bytes([1]) * 4096
        del reading
        gc.collect()
        lender.publish(snapshot(3))
        assert not exists(source)
    finally:
        lender.close()


def test_a_slice_of_its_own_buffer_the_lender_reads_leaves_the_slot_whole():
    """Lender.view hands out the segment's own buffer; a slice of it (a memoryview over the same memory, not an
    export of the buffer) held past unborrowed_s keeps the slot from being taken back, as an export does, and
    the segment stays usable: borrowed, given back, and lent again. (SharedMemory.close lets go of its buffer
    before its mmap refuses to close, so a failed take-back must not leave the segment without one.)"""
    lender = lent.Lender(unborrowed_s=0)
    try:
        source = lender.publish(snapshot(1))
        piece = lender.view(segment(source))[:16]
        lender.publish(snapshot(2))  # its time is up, but this process reads it
        assert exists(source)
        held = lent.borrow(source)
        del held, piece
        gc.collect()
        for fill in (3, 4, 5):  # the slot, given back, lends again from its kept segment
            assert bytes(lent.borrow(lender.publish(snapshot(fill))).weights.tensors["t"].data) == bytes([fill]) * 4096
    finally:
        lender.close()


def test_a_slot_unborrowed_within_its_time_stays_lent(lender):
    """The default time (lent.UNBORROWED_S) is far longer than a reader takes to borrow what it asked for."""
    assert lent.UNBORROWED_S >= 60
    source = lender.publish(snapshot(1))
    lender.publish(snapshot(2))
    assert exists(source) and bytes(lent.borrow(source).weights.tensors["t"].data) == bytes([1]) * 4096


def test_send_leaves_unchecked_only_a_segment_whose_bytes_the_client_did_not_verify(lender, tmp_path):
    """lent.send hands a borrowed or shared-loaded snapshot over as its own segment, checked where its bytes came
    in (the trust rule), unless it was borrowed or shared-loaded with verify=False: its reader verifies that one. Any other it
    writes into the owner's one reused restore segment, its checksums from the same pass: checked."""
    class Engine:  # what owns the restore segment: an engine object
        pass

    engine = Engine()
    borrowed = lent.borrow(lender.publish(snapshot(1)))
    assert lent.send(engine, borrowed) == (lent.lent_source(borrowed), True)
    unread = lent.borrow(lender.publish(snapshot(4)), verify=False)  # any source string: its reader verifies it
    assert lent.send(engine, unread) == (lent.lent_source(unread), False)
    captured = lent._borrow_capture(lender.publish(snapshot(5)))  # an adapter's own engine's capture
    assert lent.send(engine, captured) == (lent.lent_source(captured), True)
    path = tmp_path / "s.thaw"
    thaw_format.save(snapshot(2), path)
    shared = thaw_format.load(path, shared=True)
    assert lent.send(engine, shared) == (lent.lent_source(shared), True)
    unverified = thaw_format.load(path, shared=True, verify=False)
    assert lent.send(engine, unverified) == (lent.lent_source(unverified), False)
    assert lent.last_sent(engine) == "lent"
    try:
        first, checked = lent.send(engine, thaw_format.load(path))
        assert checked
        again, checked = lent.send(engine, snapshot(3))
        assert checked and segment(again) == segment(first)
        written = lent.open_snapshot(again, verify=True)  # the checksums the send computed hold
        assert bytes(written.weights.tensors["t"].data) == bytes([3]) * 4096
        del written
        lent.forget(again)
    finally:
        release_segments(engine)



def corrupt_lent(lender, fill: int) -> str:
    """A lent snapshot whose tensor's first byte changed after its checksums were written."""
    source = lender.publish(snapshot(fill))
    written = lender.view(segment(source))
    written[bytes(written).index(bytes([fill]) * 4096)] = fill ^ 0xFF
    return source


def test_a_corrupt_segment_borrowed_unverified_is_verified_before_any_engine_takes_it(lender):
    """borrow(verify=False) of any source string leaves it unchecked: send hands it over for its reader to
    verify, verify_unchecked (an engine in this process) finds the bad chunk, and so does send itself when the
    snapshot is no longer exactly as written (its bytes then go another way than its own segment)."""
    class Engine:
        pass

    engine = Engine()
    with pytest.raises(thaw_format.CorruptSnapshotError):
        lent.borrow(corrupt_lent(lender, 1))
    held = lent.borrow(corrupt_lent(lender, 2), verify=False)
    source, checked = lent.send(engine, held)
    assert not checked
    with pytest.raises(thaw_format.CorruptSnapshotError):
        lent.open_snapshot(source, verify=not checked)  # what the engine's process reads
    with pytest.raises(thaw_format.CorruptSnapshotError):
        lent.verify_unchecked(held)
    held.lineage = thaw_format.Lineage(label="changed")  # no longer as written: not sent as its own segment
    try:
        assert lent.lent_source(held) is None
        with pytest.raises(thaw_format.CorruptSnapshotError):
            lent.send(engine, held)
    finally:
        release_segments(engine)
    good = lent.borrow(lender.publish(snapshot(3)), verify=False)
    lent.verify_unchecked(good)
    assert lent.send(engine, good) == (lent.lent_source(good), True)  # verified once, here: checked now
    release_segments(engine)


def test_a_borrowed_snapshot_changed_into_what_the_writer_refuses_is_refused_by_name(lender):
    """lent_source compares a snapshot with its segment without the writer's checks (an equal header is one the
    reader accepted): content changed into what the writer refuses differs from its segment, and sending it
    raises the writer's own error; content that cannot be encoded at all raises the encoder's. Either way
    before any engine is handed anything."""
    class Engine:
        pass

    engine = Engine()
    kv = thaw_format.Snapshot(
        kv=thaw_format.KVCache(page_size=2, dtype="uint8", layers=[thaw_format.KVLayer(
            "attention", {r: numpy.zeros((2, 2, 1, 4), numpy.uint8) for r in "kv"}, num_kv_heads=1, head_dim=4)]),
        prefix=thaw_format.PrefixTree(parents=[-1, 0], tokens=[[1, 2], [3]], hash=thaw_format.NativeHash(
            algorithm="sha256", tokens_per_hash=2, hashes=["ab", None])))
    held = lent.borrow(lender.publish(kv))
    assert lent.lent_source(held) is not None
    try:
        held.prefix.hash.hashes[0] = "AB"  # encodes, and differs
        assert lent.lent_source(held) is None
        with pytest.raises(ValueError, match="lowercase hex"):
            lent.send(engine, held)
        held.prefix.hash.hashes[0] = "ab"
        held.prefix.tokens[1] = [3, 1 << 40]
        with pytest.raises(ValueError, match="out of int32 range"):
            lent.send(engine, held)
    finally:
        release_segments(engine)
    held.prefix.tokens[1] = [3]
    with pytest.raises(ValueError, match="never written"):
        thaw_format.EncodedSnapshot.compared(held).write_into(bytearray(1 << 20))


def test_a_snapshot_saved_with_other_chunks_is_not_sent_as_its_segment(lender, tmp_path):
    """save() with another chunk size gives a borrowed snapshot that file's id, while an engine reading its
    segment would know it by the segment's own: send hands its bytes over another way, which names its id (an
    engine's restore refuses a staged snapshot whose id is not the one it planned from)."""
    class Engine:
        pass

    engine = Engine()
    held = lent.borrow(lender.publish(snapshot(1)))
    assert lent.lent_source(held) is not None
    thaw_format.save(held, tmp_path / "other-chunks.thaw", chunk_size=1 << 16)
    assert lent.lent_source(held) is None
    try:
        source, checked = lent.send(engine, held)
        assert lent.open_snapshot(source, verify=not checked).id == held.id
    finally:
        release_segments(engine)
