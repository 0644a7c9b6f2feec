"""The binary container: preamble, region table, JSON document, aligned data regions, checksum trailer.

spec/SPEC.md is normative; this module is its executable form. Layout (all integers little-endian):

    [0, 32)             preamble: magic, major, minor, required and optional feature bits, region count, JSON length
    [32, 32 + 24 R)     region table: per region offset u64, length u64, chunk_size u32, flags u32
    then J bytes        JSON document (UTF-8) giving every region its meaning
    then 4 bytes        header CRC32C over every byte before it
    zero padding        up to the first 4096-aligned offset
    regions             region i starts at the first 4096-aligned offset at or after the end of region i-1
    trailer             at the first 4096-aligned offset after the last region: one CRC32C per chunk of every
                        region in order, a CRC32C of those CRCs, and the end magic.

Chunk checksums sit in a trailer rather than the header so a writer can stream in one pass: the header only
needs lengths, which are known before the data is read.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, Sequence

from . import mover
from .errors import CorruptSnapshotError, UnsupportedVersionError
from .tensor import MAX_DIMS

MAGIC = b"\x89THAW\r\n\x1a"  # non-ASCII first byte and CR LF catch text-mode transfers, as in PNG
END_MAGIC = b"THAW-END"
MAJOR = 1
# history: 1.0 (first release), 1.1 (required feature kv_v_head_dim), 1.2 (rules written down, no new bit or
# layout: writers still emit 1.0, or 1.1 for kv_v_head_dim). Bump: see spec section 6.
MINOR = 2
ALIGNMENT = 4096
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4096

PREAMBLE = struct.Struct("<8sHHIIIQ")
REGION = struct.Struct("<QQII")
_REGION_ROW = [("offset", "<u8"), ("length", "<u8"), ("chunk_size", "<u4"), ("flags", "<u4")]  # REGION, for numpy
CRC = struct.Struct("<I")
TRAILER_TAIL = struct.Struct("<I8s")

# Feature bits. A reader refuses a file with a required bit it does not know and ignores unknown optional bits.
REQUIRED_FEATURES = {1 << 0: "weights_ref", 1 << 1: "kv_v_head_dim"}
OPTIONAL_FEATURES = {1 << 0: "native_hashes"}
# The minor version that introduced each required bit: a writer emits the lowest version its bits need.
REQUIRED_FEATURE_MINOR = {1 << 0: 0, 1 << 1: 1}


def minor_version(required: int) -> int:
    return max([minor for bit, minor in REQUIRED_FEATURE_MINOR.items() if required & bit], default=0)


@dataclass(frozen=True)
class Limits:
    """Caps a reader enforces before allocating anything; raise them deliberately for unusual snapshots."""

    max_json_bytes: int = 64 << 20
    max_regions: int = 1 << 20
    max_dims: int = MAX_DIMS
    max_chunk_size: int = 1 << 30
    max_json_depth: int = 64


DEFAULT_LIMITS = Limits()


def align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def num_chunks(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


class Region(NamedTuple):
    """A NamedTuple, not a frozen dataclass: a reader makes one per region, and at 10^4-10^5 small regions a
    dataclass's construction alone costs more than reading their bytes."""

    offset: int
    length: int
    chunk_size: int
    first_chunk: int  # index of this region's first CRC in the trailer (derived, not stored)

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.length, self.chunk_size)

    @property
    def end(self) -> int:
        return self.offset + self.length

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """File byte range [start, end) of one of this region's chunks."""
        start = self.offset + chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.end)


@dataclass(frozen=True, eq=False)
class Layout:
    """Where everything sits in a file, from the region lengths alone.

    `table` is an int64 numpy array with one row (offset, length, chunk_size, first_chunk) per region: readers
    of 10^4-10^5 small tensors work on it in vectorised passes. `regions` gives the same rows as Region tuples,
    built on first use."""

    header_length: int  # preamble + table + JSON + header CRC
    table: Any = field(repr=False)
    trailer_offset: int
    total_chunks: int

    @cached_property
    def regions(self) -> tuple[Region, ...]:
        return tuple(map(Region._make, self.table.tolist()))

    @property
    def data_start(self) -> int:
        return align(self.header_length)

    @property
    def file_length(self) -> int:
        return self.trailer_offset + CRC.size * self.total_chunks + TRAILER_TAIL.size


def plan_layout(json_length: int, lengths: Sequence[int], chunk_sizes: Sequence[int]) -> Layout:
    """Regions packed in order at ALIGNMENT, from the first aligned offset after the header."""
    import numpy  # here, not at module level: `import thaw_format` stays light

    header_length = PREAMBLE.size + REGION.size * len(lengths) + json_length + CRC.size
    table = numpy.zeros((len(lengths), 4), numpy.int64)
    table[:, 1], table[:, 2] = lengths, chunk_sizes
    length, chunk = table[:, 1], table[:, 2]
    aligned = (length + (ALIGNMENT - 1)) // ALIGNMENT * ALIGNMENT
    counts = -(-length // chunk)
    numpy.cumsum(aligned[:-1], out=table[1:, 0])
    table[:, 0] += align(header_length)
    numpy.cumsum(counts[:-1], out=table[1:, 3])
    trailer_offset = align(header_length) + int(aligned.sum())
    return Layout(header_length, table, trailer_offset, int(counts.sum()))


def encode_header(json_bytes: bytes, layout: Layout, required: int, optional: int) -> bytes:
    """Preamble, table, JSON and header CRC, padded with zeros to the data start."""
    import numpy

    table = numpy.zeros(len(layout.table), numpy.dtype(_REGION_ROW))  # flags stay 0
    table["offset"], table["length"], table["chunk_size"] = layout.table[:, 0], layout.table[:, 1], layout.table[:, 2]
    preamble = PREAMBLE.pack(MAGIC, MAJOR, minor_version(required), required, optional, len(table), len(json_bytes))
    body = b"".join([preamble, table.tobytes(), json_bytes])
    padding = layout.data_start - layout.header_length
    return body + CRC.pack(mover.crc32c(body)) + bytes(padding)


def encode_trailer(crcs: array) -> bytes:
    crc_bytes = crcs.tobytes() if isinstance(crcs, array) else array("I", crcs).tobytes()
    return crc_bytes + TRAILER_TAIL.pack(mover.crc32c(crc_bytes), END_MAGIC)


@dataclass(frozen=True)
class Preamble:
    major: int
    minor: int
    required: int
    optional: int
    region_count: int
    json_length: int

    @property
    def header_length(self) -> int:
        return PREAMBLE.size + REGION.size * self.region_count + self.json_length + CRC.size


def decode_preamble(data: bytes, file_length: int, limits: Limits) -> Preamble:
    """Check the first 32 bytes against the version, features, limits and the file's size."""
    if len(data) < PREAMBLE.size:
        raise CorruptSnapshotError(
            f"file is {file_length} bytes, shorter than the {PREAMBLE.size}-byte preamble: truncated or not a snapshot"
        )
    magic, major, minor, required, optional, region_count, json_length = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise CorruptSnapshotError(f"not a thaw snapshot: bytes [0, 8) are {magic!r}, expected {MAGIC!r}")
    if major != MAJOR:
        raise UnsupportedVersionError(
            f"snapshot format version {major}.{minor}; this reader reads major version {MAJOR} (any minor)"
        )
    unknown = required & ~sum(REQUIRED_FEATURES)
    if unknown:
        raise UnsupportedVersionError(
            f"snapshot (version {major}.{minor}) requires unknown features 0x{unknown:08x}; "
            f"this reader knows {sorted(REQUIRED_FEATURES.values())}"
        )
    if region_count > limits.max_regions:
        raise CorruptSnapshotError(
            f"preamble: region count {region_count} exceeds the limit {limits.max_regions} (Limits.max_regions)"
        )
    if json_length > limits.max_json_bytes:
        raise CorruptSnapshotError(
            f"preamble: JSON length {json_length} exceeds the limit {limits.max_json_bytes} (Limits.max_json_bytes)"
        )
    preamble = Preamble(major, minor, required, optional, region_count, json_length)
    if preamble.header_length > file_length:
        raise CorruptSnapshotError(
            f"header declares {preamble.header_length} bytes ({region_count} regions, {json_length}-byte JSON) "
            f"but the file has {file_length}: truncated"
        )
    return preamble


def decode_header(header: bytes, preamble: Preamble, file_length: int, limits: Limits) -> tuple[Layout, bytes]:
    """Check the header CRC and the region table; return the layout and the JSON bytes."""
    body_length = preamble.header_length - CRC.size
    (stored,) = CRC.unpack_from(header, body_length)
    computed = mover.crc32c(memoryview(header)[:body_length])
    if stored != computed:
        raise CorruptSnapshotError(
            f"header checksum mismatch over bytes [0, {body_length}): stored 0x{stored:08x}, computed 0x{computed:08x}"
        )
    table_start = PREAMBLE.size
    json_start = table_start + preamble.region_count * REGION.size
    rows = _check_region_table(header[table_start:json_start], align(preamble.header_length), file_length, limits)
    layout = plan_layout(preamble.json_length, rows["length"], rows["chunk_size"])
    if layout.file_length != file_length:
        state = "truncated" if file_length < layout.file_length else "has trailing bytes"
        raise CorruptSnapshotError(
            f"file is {file_length} bytes but its header describes {layout.file_length}: {state}"
        )
    return layout, bytes(header[json_start:body_length])


def _check_region_table(table: bytes, data_start: int, file_length: int, limits: Limits):
    """Every region table entry in one vectorised pass: flags zero, a valid chunk size, inside the file, and
    packed in order (each offset is the aligned end of the previous region; the first is `data_start`).
    The first bad entry is named by _region_error. Sums are only trusted up to the first bad entry, where
    every earlier entry lies inside the file, so none can overflow. Returns the rows (a numpy record array)."""
    import numpy

    rows = numpy.frombuffer(table, numpy.dtype(_REGION_ROW))
    if not len(rows):
        return rows
    offset, length = rows["offset"], rows["length"]
    chunk, flags = rows["chunk_size"].astype(numpy.uint64), rows["flags"]
    size = numpy.uint64(file_length)
    inside = (offset <= size) & (length <= size - numpy.minimum(offset, size))
    expected = numpy.empty_like(offset)
    expected[0] = data_start
    end = offset[:-1] + length[:-1]  # wraps only after a bad entry, never read then
    expected[1:] = (end + numpy.uint64(ALIGNMENT - 1)) // numpy.uint64(ALIGNMENT) * numpy.uint64(ALIGNMENT)
    not_power_of_two = (chunk & (chunk - numpy.uint64(1))) != 0
    bad = ((flags != 0) | (chunk < MIN_CHUNK_SIZE) | (chunk > limits.max_chunk_size) | not_power_of_two | ~inside
           | (offset != expected))
    if bad.any():
        i = int(bad.argmax())
        previous_end = data_start if i == 0 else int(offset[i - 1]) + int(length[i - 1])
        raise _region_error(i, int(offset[i]), int(length[i]), int(chunk[i]), int(flags[i]),
                            data_start if i == 0 else align(previous_end), file_length, limits)
    return rows


def _region_error(i: int, offset: int, length: int, chunk_size: int, flags: int, expected_offset: int,
                  file_length: int, limits: Limits) -> CorruptSnapshotError:
    """What is wrong with region table entry i (built only for a bad entry: the table may hold a million)."""
    start = PREAMBLE.size + i * REGION.size
    where = f"region table entry {i} (bytes [{start}, {start + REGION.size}))"
    if flags != 0:
        return CorruptSnapshotError(f"{where}: flags 0x{flags:08x} are reserved and must be zero in version 1")
    if chunk_size < MIN_CHUNK_SIZE or chunk_size > limits.max_chunk_size or chunk_size & (chunk_size - 1):
        return CorruptSnapshotError(
            f"{where}: chunk size {chunk_size} is not a power of two in [{MIN_CHUNK_SIZE}, {limits.max_chunk_size}]"
        )
    if offset != expected_offset:
        return CorruptSnapshotError(
            f"{where}: offset {offset} must be {expected_offset} "
            f"(regions are packed in order at {ALIGNMENT}-byte alignment)"
        )
    return CorruptSnapshotError(
        f"{where}: bytes [{offset}, {offset + length}) run past the end of the {file_length}-byte file"
    )


def decode_trailer(trailer: bytes, layout: Layout) -> array:
    """Check the trailer's CRC and end magic; return the chunk CRCs."""
    crc_bytes = layout.total_chunks * CRC.size
    stored, end_magic = TRAILER_TAIL.unpack_from(trailer, crc_bytes)
    where = f"trailer (bytes [{layout.trailer_offset}, {layout.file_length}))"
    if end_magic != END_MAGIC:
        raise CorruptSnapshotError(f"{where}: end magic is {end_magic!r}, expected {END_MAGIC!r}")
    computed = mover.crc32c(memoryview(trailer)[:crc_bytes])
    if stored != computed:
        raise CorruptSnapshotError(
            f"{where}: checksum of the chunk table mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}"
        )
    crcs = array("I")
    crcs.frombytes(bytes(trailer[:crc_bytes]))
    return crcs


def content_id(header: bytes, trailer: bytes) -> str:
    """The snapshot id: SHA-256 over the header (meaning) and trailer (per-chunk checksums of all data)."""
    digest = hashlib.sha256(header)
    digest.update(trailer)
    return "sha256:" + digest.hexdigest()
