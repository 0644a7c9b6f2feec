"""The CUDA ring's staging plan (thaw_stage_plan in libthaw, run here on the CPU): every byte of every region
is staged exactly once, in order, in pieces of whole chunks that fit a slot, and a slot is reused only after
every other slot took a piece (double buffering at least)."""

import pytest

from thaw_format import _libthaw_cuda

MIB = 1 << 20


def covered(plan, lengths, chunks, slot_bytes):
    for region, (length, chunk) in enumerate(zip(lengths, chunks)):
        pieces = [p for p in plan if p[0] == region]
        assert [p[1] for p in pieces] == sorted(p[1] for p in pieces)
        assert sum(p[2] for p in pieces) == length
        position = 0
        for _, start, size, _ in pieces:
            assert start == position and start % chunk == 0
            assert size <= max(slot_bytes, chunk)
            position += size


@pytest.mark.parametrize("lengths,chunks,slot_bytes,slots", [
    ([40 * MIB, 12345, 3 * MIB], [MIB, MIB, MIB], 16 * MIB, 4),
    ([100, 0, 7], [3, 5, 1], 10, 2),
    ([5 * MIB], [4 * MIB], MIB, 3),  # a chunk larger than a slot gets a slot of its own size
    ([1 << 30], [MIB], 16 * MIB, 1),  # one slot requested: two are used
])
def test_plan_stages_every_byte_once_in_order(native, lengths, chunks, slot_bytes, slots):
    plan = _libthaw_cuda.stage_plan(lengths, chunks, slot_bytes, slots)
    covered(plan, lengths, chunks, slot_bytes)
    assert [p[0] for p in plan] == sorted(p[0] for p in plan)  # regions in order
    ring = max(2, min(slots, 8))
    assert [p[3] for p in plan] == [k % ring for k in range(len(plan))]


def test_slot_bytes_and_slot_count(native):
    ffi, lib = native
    lens, chunks = ffi.new("uint64_t[]", [5 * MIB, 10]), ffi.new("uint64_t[]", [4 * MIB, 1])
    assert lib.thaw_stage_slot_bytes(lens, chunks, 2, MIB) == 4 * MIB
    assert lib.thaw_stage_slot_bytes(lens, chunks, 2, 16 * MIB) == 16 * MIB
    assert [lib.thaw_stage_slots(n) for n in (0, 1, 2, 5, 8, 64)] == [2, 2, 2, 5, 8, 8]


def test_plan_refuses_zero_chunk(native):
    with pytest.raises(ValueError, match="chunk size"):
        _libthaw_cuda.stage_plan([10], [0])


def test_empty_plan(native):
    assert _libthaw_cuda.stage_plan([], []) == []
    assert _libthaw_cuda.stage_plan([0, 0], [1, 1]) == []
