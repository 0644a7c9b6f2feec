"""Damage sweeps over one snapshot with every section: every bit of the header, region table and trailer,
sampled bits of every data chunk and padding gap, and every truncation of the file on disk. Each is detected,
and the error says where: the header range, the trailer, or the tensor, region, chunk and file byte range.

(tests/format/test_corruption.py flips one bit per byte from memory; these flip every bit and check locations.)
"""

import os
import random
import re

import pytest

import thaw_format as tf
from hostile import craft
from thaw_format.document import canonical_json

DATA = craft.sample_bytes()
LAYOUT = craft.where(DATA)
NAMES = [entry["name"] for entry in craft.document_of(DATA)["tensors"]]
CHUNK = re.compile(r"tensor '(.+)' \(region (\d+)\): checksum mismatch in chunk (\d+), file bytes \[(\d+), (\d+)\)")
# Errors a damaged preamble may legitimately give before the header CRC is even reached.
PREAMBLE_ERRORS = ("bytes [0, 8)", "format version", "unknown features", "preamble:", "header declares",
                   "header checksum mismatch")


def refuse(data, *, verify: bool = True) -> str:
    with pytest.raises(tf.SnapshotError) as err:
        tf.loads(data, verify=verify)
    return str(err.value)


def test_every_preamble_bit():
    for position in range(craft.PREAMBLE.size):
        for bit in range(8):
            message = refuse(craft.flipped(DATA, position, bit), verify=False)
            assert any(e in message for e in PREAMBLE_ERRORS), (position, bit, message)


def test_every_table_json_and_header_crc_bit():
    covered = f"header checksum mismatch over bytes [0, {LAYOUT.header_length - 4})"
    for position in range(craft.PREAMBLE.size, LAYOUT.header_length):
        for bit in range(8):
            message = refuse(craft.flipped(DATA, position, bit), verify=False)
            assert covered in message, (position, bit, message)


def test_every_trailer_bit():
    tail = len(DATA) - 12  # the trailer's own CRC and end magic follow the chunk CRCs
    for position in range(LAYOUT.trailer_offset, len(DATA)):
        expected = "checksum of the chunk table mismatch" if position < tail + 4 else "end magic"
        for bit in range(8):
            message = refuse(craft.flipped(DATA, position, bit), verify=False)
            assert message.startswith(f"trailer (bytes [{LAYOUT.trailer_offset}, {len(DATA)}))"), message
            assert expected in message, (position, bit, message)


def located_chunk(position: int) -> tuple:
    """(name, region, chunk, start, end) an error must name for damage at `position`, computed from the table."""
    for index, (offset, length, chunk_size, _) in enumerate(LAYOUT.regions):
        if offset <= position < offset + length:
            chunk = (position - offset) // chunk_size
            start = offset + chunk * chunk_size
            return NAMES[index], index, chunk, start, min(start + chunk_size, offset + length)
    raise AssertionError(f"{position} is in no region")


def data_positions(rng: random.Random, per_chunk: int = 3):
    for offset, length, chunk_size, _ in LAYOUT.regions:
        for start in range(offset, offset + length, chunk_size):
            end = min(start + chunk_size, offset + length)
            yield from {start, end - 1, *(rng.randrange(start, end) for _ in range(per_chunk))}


def every_reading_path(data: bytes, path):
    """The error of each way of reading verified data: from memory, from a path, mapped, one tensor, verify."""
    path.write_bytes(data)
    calls = {
        "loads": lambda: tf.loads(data),
        "load": lambda: tf.load(path),
        "load mmap": lambda: tf.load(path, mmap=True),
        "verify": lambda: tf.verify(path),
    }
    for call in calls.values():
        with pytest.raises(tf.CorruptSnapshotError) as err:
            call()
        yield str(err.value)


def test_sampled_data_bits_are_located(tmp_path):
    rng = random.Random(8)
    positions = list(data_positions(rng))
    assert len(positions) > 40
    for position in positions:
        damaged = bytes(craft.flipped(DATA, position, rng.randrange(8)))
        expected = located_chunk(position)
        for message in every_reading_path(damaged, tmp_path / "damaged.thaw"):
            found = CHUNK.search(message)
            assert found, message
            name, region, chunk, start, end = found.groups()
            assert (name, int(region), int(chunk), int(start), int(end)) == expected, (position, message)
        with tf.open(tmp_path / "damaged.thaw") as f:  # reading the damaged tensor alone names it the same way
            with pytest.raises(tf.CorruptSnapshotError, match=re.escape(f"chunk {expected[2]}, ")):
                f.tensor(expected[0])


def padding_gaps():
    gaps, position = [], LAYOUT.header_length
    for offset, length, _, _ in LAYOUT.regions:
        gaps.append((position, offset))
        position = offset + length
    gaps.append((position, LAYOUT.trailer_offset))
    return [(start, end) for start, end in gaps if end > start]


def test_sampled_padding_bits_fail_verification(tmp_path):
    """Padding is outside every checksum; full verification reads it (spec section 8, rule 12)."""
    rng = random.Random(9)
    path = tmp_path / "padding.thaw"
    for start, end in padding_gaps():
        for position in {start, end - 1, *(rng.randrange(start, end) for _ in range(4))}:
            path.write_bytes(craft.flipped(DATA, position, rng.randrange(8)))
            with pytest.raises(tf.CorruptSnapshotError) as err:
                tf.verify(path)
            low, high = map(int, re.search(r"padding bytes \[(\d+), (\d+)\)", str(err.value)).groups())
            assert low <= position < high


def test_every_truncation_on_disk(tmp_path):
    """Cut the file on disk to every shorter length, last byte first; each read of the path refuses it."""
    path = tmp_path / "cut.thaw"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_WRONLY)
    try:
        for length in range(len(DATA) - 1, -1, -1):
            os.ftruncate(fd, length)
            with pytest.raises(tf.CorruptSnapshotError) as err:
                tf.load(path, verify=False)
            assert any(w in str(err.value) for w in ("truncated", "shorter than", "past the end")), (length, err.value)
    finally:
        os.close(fd)


def test_the_sweep_base_is_valid_and_the_crafting_encoder_agrees_with_the_writer():
    assert tf.loads(DATA) == craft.sample_snapshot()
    document = tf.SnapshotFile(DATA).document
    rebuilt = craft.container(canonical_json(document), craft.payloads_of(DATA), optional=1)  # native_hashes bit
    assert bytes(rebuilt) == DATA
