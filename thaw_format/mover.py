"""The one place that decides how bulk bytes move: checksums, file I/O, gather and scatter.

Everything here works on buffers (bytes, bytearray, memoryview, mmap, anything with the buffer protocol) and
never loops over bytes in Python. This module holds the portable path: CRC32C from the `crc32c` package and
copies done by memoryview slice assignment (a C memcpy).
"""

from __future__ import annotations

import os
from array import array
from typing import Callable, Optional, Sequence, Tuple

import crc32c as _crc32c

Progress = Optional[Callable[[int], None]]

# Reads are staged through a bounded buffer so a bad chunk never reaches the caller's target.
_STAGE_BYTES = 8 << 20


def backend() -> str:
    """Say which implementation moves the bytes."""
    return "python (crc32c package)"


def crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


def chunk_crcs(data, chunk_size: int) -> array:
    """CRC32C of each `chunk_size` piece of `data`; the last piece may be short."""
    view = memoryview(data).cast("B")
    return array("I", (_crc32c.crc32c(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)))


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = os.preadv(fd, [view], offset)
    while got < len(view):
        more = os.preadv(fd, [view[got:]], offset + got)
        if more == 0:
            raise EOFError(f"file ends before byte {offset + len(view)}")
        got += more


def write_regions(fd: int, regions: Sequence[Tuple[int, object, int]], progress: Progress = None) -> list:
    """pwrite each (offset, buffer, chunk_size) region and return its chunk CRCs."""
    crcs = []
    for offset, data, chunk_size in regions:
        view = memoryview(data).cast("B")
        crcs.append(chunk_crcs(view, chunk_size))
        _pwrite_all(fd, view, offset)
        if progress:
            progress(len(view))
    return crcs


def read_regions(fd: int, regions: Sequence[Tuple[int, object, int, Sequence[int]]], progress: Progress = None):
    """Fill each (offset, out, chunk_size, expected_crcs) region, verifying each chunk before it lands in `out`.

    Returns (region_index, chunk_index) of the first bad chunk, or None.
    """
    for region_index, (offset, out, chunk_size, expected) in enumerate(regions):
        target = memoryview(out).cast("B")
        stage_size = max(chunk_size, (_STAGE_BYTES // chunk_size) * chunk_size)
        stage = memoryview(bytearray(min(stage_size, len(target))))
        for start in range(0, len(target), stage_size):
            piece = stage[: min(stage_size, len(target) - start)]
            _pread_into(fd, piece, offset + start)
            got = chunk_crcs(piece, chunk_size)
            first = start // chunk_size
            for k, crc in enumerate(got):
                if crc != expected[first + k]:
                    return region_index, first + k
            target[start : start + len(piece)] = piece
            if progress:
                progress(len(piece))
    return None


def verify_regions(fd: int, regions: Sequence[Tuple[int, int, int, Sequence[int]]], progress: Progress = None):
    """Check each (offset, length, chunk_size, expected_crcs) region with bounded memory.

    Returns (region_index, chunk_index) of the first bad chunk, or None.
    """
    for region_index, (offset, length, chunk_size, expected) in enumerate(regions):
        stage_size = max(chunk_size, (_STAGE_BYTES // chunk_size) * chunk_size)
        stage = memoryview(bytearray(min(stage_size, length)))
        for start in range(0, length, stage_size):
            piece = stage[: min(stage_size, length - start)]
            _pread_into(fd, piece, offset + start)
            first = start // chunk_size
            for k, crc in enumerate(chunk_crcs(piece, chunk_size)):
                if crc != expected[first + k]:
                    return region_index, first + k
            if progress:
                progress(len(piece))
    return None


def gather(src, offsets: Sequence[int], length: int, out) -> None:
    """Copy the slabs src[offsets[i] : offsets[i] + length] into out[i * length : (i + 1) * length]."""
    s, o = memoryview(src).cast("B"), memoryview(out).cast("B")
    for i, off in enumerate(offsets):
        o[i * length : (i + 1) * length] = s[off : off + length]


def scatter(src, out, offsets: Sequence[int], length: int) -> None:
    """Copy src[i * length : (i + 1) * length] into the slabs out[offsets[i] : offsets[i] + length]."""
    s, o = memoryview(src).cast("B"), memoryview(out).cast("B")
    for i, off in enumerate(offsets):
        o[off : off + length] = s[i * length : (i + 1) * length]
