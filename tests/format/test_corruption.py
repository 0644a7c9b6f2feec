"""Every change to the header, table and trailer is detected; data changes are detected and located; every
truncation is detected."""

import random
import re

import pytest

import thaw_format as tf
from thaw_format.container import CRC


@pytest.fixture(scope="module")
def encoded():
    from conftest import make_full_snapshot

    snap = make_full_snapshot()
    return snap, tf.EncodedSnapshot(snap, chunk_size=4096), tf.dumps(snap, chunk_size=4096)


def test_every_byte_of_the_header_is_covered(encoded):
    _, plan, data = encoded
    for position in range(plan.layout.header_length):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(tf.SnapshotError):
            tf.loads(damaged, verify=False)


def test_every_byte_of_the_trailer_is_covered(encoded):
    _, plan, data = encoded
    for position in range(plan.layout.trailer_offset, plan.nbytes):
        damaged = bytearray(data)
        damaged[position] ^= 0x80
        with pytest.raises(tf.CorruptSnapshotError, match="trailer"):
            tf.loads(damaged, verify=False)


def test_data_changes_are_detected_and_located(encoded):
    _, plan, data = encoded
    rng = random.Random(1)
    names = [e["name"] for e in tf.SnapshotFile(data).document["tensors"]]
    for index, region in enumerate(plan.layout.regions):
        if region.length == 0:
            continue
        for position in {region.offset, region.end - 1, rng.randrange(region.offset, region.end)}:
            damaged = bytearray(data)
            damaged[position] ^= 1 << rng.randrange(8)
            with pytest.raises(tf.CorruptSnapshotError) as err:
                tf.loads(damaged)
            message = str(err.value)
            assert f"tensor {names[index]!r} (region {index})" in message
            start, end = map(int, re.search(r"file bytes \[(\d+), (\d+)\)", message).groups())
            assert start <= position < end
            # Without data verification no checksum is read: the checksum is what caught it (a damaged
            # prefix tensor may still break a structural rule).
            try:
                tf.loads(damaged, verify=False)
            except tf.CorruptSnapshotError as exc:
                assert "checksum" not in str(exc)


def test_padding_changes_are_caught_by_verify(encoded, tmp_path):
    _, plan, data = encoded
    position = plan.layout.header_length + 1
    damaged = bytearray(data)
    damaged[position] = 0xFF
    path = tmp_path / "p.thaw"
    path.write_bytes(damaged)
    with pytest.raises(tf.CorruptSnapshotError, match="padding"):
        tf.verify(path)


def test_every_truncation_is_detected(encoded, tmp_path):
    _, plan, data = encoded
    for length in range(len(data)):
        with pytest.raises(tf.CorruptSnapshotError):
            tf.loads(data[:length], verify=False)
    path = tmp_path / "t.thaw"
    for length in (0, 7, 31, plan.layout.header_length, plan.layout.trailer_offset, len(data) - 1):
        path.write_bytes(data[:length])
        with pytest.raises(tf.CorruptSnapshotError):
            tf.load(path)


def test_trailing_bytes_are_rejected(encoded):
    _, _, data = encoded
    with pytest.raises(tf.CorruptSnapshotError, match="trailing"):
        tf.loads(data + b"\0")


def test_header_errors_name_the_problem(encoded):
    _, plan, data = encoded
    damaged = bytearray(data)
    damaged[0] = 0
    with pytest.raises(tf.CorruptSnapshotError, match="not a thaw snapshot"):
        tf.loads(damaged)
    damaged = bytearray(data)
    damaged[40] ^= 1  # inside the region table
    with pytest.raises(tf.CorruptSnapshotError, match=r"header checksum mismatch over bytes \[0, \d+\)"):
        tf.loads(damaged)
    assert CRC.size == 4
