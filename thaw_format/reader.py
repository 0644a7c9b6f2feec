"""Reading: every offset and size is checked against the file before it is used, and nothing is allocated
beyond what the header declares (itself capped by `Limits` and by the file's real size).
"""

from __future__ import annotations

import mmap
import os
from array import array
from typing import Callable, Optional

from . import mover
from .container import (
    ALIGNMENT,
    DEFAULT_LIMITS,
    PREAMBLE,
    Limits,
    Region,
    content_id,
    decode_header,
    decode_preamble,
    decode_trailer,
)
from .document import check_features, decode, describe_tensors, parse_json
from .errors import CorruptSnapshotError
from .gcpause import gc_paused
from .snapshot import Snapshot
from .tensor import Tensor

Progress = Optional[Callable[[int], None]]

_ZEROS = bytes(ALIGNMENT)  # padding is shorter than the alignment
_ARENA_BYTES = 16 << 20


class SnapshotFile:
    """An open snapshot: header, table and trailer checked; tensors read on demand.

    `source` is a path, or any buffer holding the snapshot's bytes (bytes, mmap, shared memory).
    """

    def __init__(self, source, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._fd: Optional[int] = None
        self._map: Optional[mmap.mmap] = None
        if isinstance(source, (str, os.PathLike)):
            self._fd = os.open(os.fspath(source), os.O_RDONLY)
            self._size = os.fstat(self._fd).st_size
        else:
            self._view = memoryview(source).cast("B")
            self._size = len(self._view)
        try:
            self._parse(limits)
        except BaseException:
            self.close()
            raise

    @gc_paused
    def _parse(self, limits: Limits) -> None:
        preamble = decode_preamble(self._read(0, min(PREAMBLE.size, self._size)), self._size, limits)
        header = self._read(0, preamble.header_length)
        self.layout, json_bytes = decode_header(header, preamble, self._size, limits)
        trailer = self._read(self.layout.trailer_offset, self.layout.file_length - self.layout.trailer_offset)
        self._crcs = decode_trailer(trailer, self.layout)
        self.id = content_id(header, trailer)
        self.version = (preamble.major, preamble.minor)
        self.features = (preamble.required, preamble.optional)
        self.document = parse_json(json_bytes, limits.max_json_depth)
        check_features(self.document, preamble.required, preamble.optional)
        described = describe_tensors(self.document, [r.length for r in self.layout.regions], limits.max_dims)
        self._entries = {name: (i, dtype, shape) for i, (name, dtype, shape) in enumerate(described)}

    # ------------------------------------------------------------------------------------------------ raw bytes

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            return bytes(self._view[offset : offset + length])
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise CorruptSnapshotError(f"file shrank while being read: bytes [{offset}, {offset + length}) are missing")
        return data

    def _mapped(self) -> memoryview:
        if self._fd is None:
            return self._view
        if self._map is None:
            # Copy-on-write: views are writable for frameworks, and writes never reach the file.
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
            self._map_view = memoryview(self._map)  # one view to slice, not one per tensor
        return self._map_view

    def _mover_io(self, call, regions: list, progress: Progress):
        # The mover reports a file cut short under an open reader (truncated in place) as EOFError.
        try:
            return call(self._fd, regions, progress)
        except EOFError as exc:
            raise CorruptSnapshotError(f"file shrank while being read: {exc}") from None

    def _expected(self, region: Region) -> array:
        return self._crcs[region.first_chunk : region.first_chunk + region.num_chunks]

    def _expected_views(self, regions) -> list[memoryview]:
        """Each region's expected CRCs as a slice of the trailer's, not a copy."""
        crcs = memoryview(self._crcs)
        return [crcs[r.first_chunk : r.first_chunk + r.num_chunks] for r in regions]

    def _bad_chunk(self, index: int, chunk: int) -> CorruptSnapshotError:
        region = self.layout.regions[index]
        start, end = region.chunk_range(chunk)
        name = self.names()[index]
        return CorruptSnapshotError(
            f"tensor {name!r} (region {index}): checksum mismatch in chunk {chunk}, file bytes [{start}, {end})"
        )

    def _check_view(self, index: int, view: memoryview) -> None:
        region = self.layout.regions[index]
        got = mover.chunk_crcs(view, region.chunk_size)
        expected = self._expected(region)
        if got != expected:
            raise self._bad_chunk(index, next(c for c, (a, b) in enumerate(zip(got, expected)) if a != b))

    # ------------------------------------------------------------------------------------------------ tensors

    def names(self) -> list[str]:
        """Tensor names in region order."""
        return list(self._entries)

    def info(self, name: str) -> tuple[str, tuple, Region]:
        index, dtype, shape = self._entries[name]
        return dtype, shape, self.layout.regions[index]

    def tensor(self, name: str, *, verify: bool = True, copy: bool = True) -> Tensor:
        """One tensor, reading only its bytes. `copy=False` gives a copy-on-write view over the mapped file."""
        index, dtype, shape = self._entries[name]
        if copy:
            return self._read_tensors([name], verify)[name]
        region = self.layout.regions[index]
        view = self._mapped()[region.offset : region.end]
        if verify:
            self._check_view(index, view)
        return Tensor._of(dtype, shape, view)  # checked against the region by describe_tensors

    def _read_tensors(self, names: list[str], verify: bool, progress: Progress = None) -> dict[str, Tensor]:
        """Copy tensors out in one batch, each chunk verified before it reaches its destination."""
        entries = [self._entries[name] for name in names]
        regions = [self.layout.regions[index] for index, _, _ in entries]
        views = _arena_views([region.length for region in regions])
        if self._fd is None:
            for (index, _, _), region, view in zip(entries, regions, views):
                source = self._view[region.offset : region.end]
                if verify:
                    self._check_view(index, source)
                view[:] = source
        elif verify:
            specs = [(r.offset, view, r.chunk_size, crcs)
                     for r, view, crcs in zip(regions, views, self._expected_views(regions))]
            bad = self._mover_io(mover.read_regions, specs, progress)
            if bad is not None:
                raise self._bad_chunk(entries[bad[0]][0], bad[1])
        else:
            for name, region, view in zip(names, regions, views):
                done = 0
                while done < region.length:  # one read returns at most ~2 GiB on Linux
                    got = os.preadv(self._fd, [view[done:]], region.offset + done)
                    if got == 0:
                        raise CorruptSnapshotError(f"file shrank while reading tensor {name!r}")
                    done += got
        # describe_tensors checked each dtype, shape and region length, so the views need no second check.
        return {name: Tensor._of(dtype, shape, view) for name, (_, dtype, shape), view in zip(names, entries, views)}

    # ------------------------------------------------------------------------------------------------ whole file

    @gc_paused
    def snapshot(self, *, verify: bool = True, copy: bool = True, progress: Progress = None) -> Snapshot:
        """The whole snapshot. `copy=False` keeps tensors as copy-on-write views over the file (zero-copy)."""
        names = self.names()
        if copy:
            tensors = self._read_tensors(names, verify, progress)
            snap = decode(self.document, tensors.__getitem__, names)
        else:
            if verify:
                self._verify_bytes(progress, mapped=True)
            snap = decode(self.document, lambda n: self.tensor(n, verify=False, copy=False), names)
        snap.id = self.id
        return snap

    @gc_paused
    def verify(self, progress: Progress = None) -> None:
        """Check every chunk checksum, that all padding is zero, and every section rule."""
        self._verify_bytes(progress)
        decode(self.document, lambda n: self.tensor(n, verify=False, copy=False), self.names())

    def _verify_bytes(self, progress: Progress, mapped: bool = False) -> None:
        """Chunk checksums and padding. `mapped` checks them through the file's mapping, for the zero-copy
        load whose tensors view it: its pages are then mapped once, by the check, and no read copies them."""
        regions = self.layout.regions
        if self._fd is None or mapped:
            view = self._mapped()
            for index, region in enumerate(regions):
                self._check_view(index, view[region.offset : region.end])
                if progress:
                    progress(region.length)
        else:
            specs = [(r.offset, r.length, r.chunk_size, crcs) for r, crcs in zip(regions, self._expected_views(regions))]
            bad = self._mover_io(mover.verify_regions, specs, progress)
            if bad is not None:
                raise self._bad_chunk(*bad)
        self._check_padding(self._mapped() if self._fd is None or mapped else None)

    def _check_padding(self, view: Optional[memoryview]) -> None:
        """Every gap is zero; gaps are read from `view` when given (no copy), else from the file."""
        gaps = []
        position = self.layout.header_length
        for region in self.layout.regions:
            gaps.append((position, region.offset))
            position = region.end
        gaps.append((position, self.layout.trailer_offset))
        for start, end in gaps:
            # Each gap is shorter than the alignment; startswith compares with memcmp, count(0) byte by byte.
            gap = view[start:end] if view is not None else self._read(start, end - start)
            if end > start and not _ZEROS.startswith(gap):
                raise CorruptSnapshotError(f"padding bytes [{start}, {end}) must be zero")

    def close(self) -> None:
        if self._map is not None:
            self._map_view = None  # drop this reader's own view, so only the tensors' views can hold the map
            try:
                self._map.close()
            except BufferError:
                pass  # tensors still view the mapping; it is released when they are
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SnapshotFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _arena_views(lengths: list[int]) -> list[memoryview]:
    """Writable, non-overlapping views of the given lengths, each at a 64-byte aligned offset of an arena.

    With thousands of small tensors, allocations cost more than the bytes: consecutive tensors share arenas
    of up to _ARENA_BYTES (a larger tensor gets one of its own). A view keeps its arena alive, so a tensor
    stays valid on its own, and one kept small tensor holds at most _ARENA_BYTES, not the whole snapshot.
    """
    views: list[memoryview] = []
    group: list[int] = []
    size = 0
    for length in lengths:
        padded = (length + 63) & ~63
        if group and size + padded > _ARENA_BYTES:
            views += _carve(group, size)
            group, size = [], 0
        group.append(length)
        size += padded
    return views + _carve(group, size) if group else views


def _carve(lengths: list[int], size: int) -> list[memoryview]:
    arena, start, views = mover.empty(size), 0, []
    for length in lengths:
        views.append(arena[start : start + length])
        start += (length + 63) & ~63
    return views


def open(path, *, limits: Limits = DEFAULT_LIMITS) -> SnapshotFile:  # noqa: A001 - mirrors builtins.open
    """Open a snapshot for lazy access: one tensor can be read without reading the rest."""
    return SnapshotFile(path, limits=limits)


def load(path, *, verify: bool = True, mmap: bool = False, limits: Limits = DEFAULT_LIMITS,
         progress: Progress = None) -> Snapshot:
    """Read a whole snapshot. `mmap=True` gives zero-copy copy-on-write tensors backed by the file."""
    with SnapshotFile(path, limits=limits) as f:
        return f.snapshot(verify=verify, copy=not mmap, progress=progress)


def loads(buffer, *, verify: bool = True, copy: bool = True, limits: Limits = DEFAULT_LIMITS) -> Snapshot:
    """Read a snapshot from memory. `copy=False` keeps tensors as views into `buffer`."""
    return SnapshotFile(buffer, limits=limits).snapshot(verify=verify, copy=copy)


def verify(path, *, limits: Limits = DEFAULT_LIMITS, progress: Progress = None) -> str:
    """Check every checksum and structural rule; return the snapshot id or raise a SnapshotError."""
    with SnapshotFile(path, limits=limits) as f:
        f.verify(progress)
        return f.id
