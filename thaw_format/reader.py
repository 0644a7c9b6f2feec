"""Reading: every offset and size is checked against the file before it is used, and nothing is allocated
beyond what the header declares (itself capped by `Limits` and by the file's real size).
"""

from __future__ import annotations

import difflib
import mmap
import os
import weakref
from typing import Callable, Iterator, Optional

from . import mover
from .container import (
    ALIGNMENT,
    CRC,
    DEFAULT_LIMITS,
    PREAMBLE,
    TRAILER_TAIL,
    Limits,
    Region,
    content_id,
    decode_header,
    decode_preamble,
    decode_trailer,
)
from .document import check_features, decode, describe_tensors, parse_json
from .errors import CorruptSnapshotError, MissingTensorError
from .gcpause import gc_paused
from .paths import open_regular
from .snapshot import Snapshot
from .tensor import Tensor

Progress = Optional[Callable[[int], None]]

_ZEROS = bytes(ALIGNMENT)  # padding is shorter than the alignment
_ARENA_BYTES = 16 << 20


class SnapshotFile:
    """An open snapshot: header, table and trailer checked; tensors read on demand.

    `source` is a path (str or os.PathLike), or any buffer holding the snapshot's bytes (bytes, mmap, shared
    memory). A file opened by path is checked again after each read of its data: if another program rewrote
    it in place meanwhile, the read raises CorruptSnapshotError rather than return a mix of two snapshots.
    """

    def __init__(self, source, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._fd: Optional[int] = None
        self._map: Optional[mmap.mmap] = None
        self._closed = False
        if isinstance(source, (str, os.PathLike)):
            self._fd = open_regular(os.fspath(source), CorruptSnapshotError)
            # a file opened without `with` and dropped unclosed closes when collected, as Python's files do
            # (its mapping holds a descriptor of its own); else each such open leaked a descriptor
            self._release = weakref.finalize(self, os.close, self._fd)
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
        # The header and the trailer were read at two moments: are they of one file?
        length = self.layout.header_length
        self._sealed = [header[: PREAMBLE.size], header[length - CRC.size : length], trailer[-TRAILER_TAIL.size :]]
        self._header, self._trailer = header, trailer  # as checked: what read_into writes
        self._check_unchanged()
        self.id = content_id(header, trailer)
        self.version = (preamble.major, preamble.minor)
        self.features = (preamble.required, preamble.optional)
        self.document = parse_json(json_bytes, limits.max_json_depth)
        check_features(self.document, preamble.required, preamble.optional)
        described = describe_tensors(self.document, self.layout.table[:, 1].tolist(), limits.max_dims)
        self._entries = {name: (i, dtype, shape) for i, (name, dtype, shape) in enumerate(described)}

    # ------------------------------------------------------------------------------------------------ raw bytes

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            return bytes(self._view[offset : offset + length])
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise CorruptSnapshotError(f"file shrank while being read: bytes [{offset}, {offset + length}) are missing")
        return data

    def _seals(self) -> list[tuple[int, int]]:
        """(offset, length) of the bytes that seal the file: the preamble, the header CRC (over the whole
        header) and the trailer's CRC (over every chunk's CRC) with the end magic."""
        return [(0, PREAMBLE.size), (self.layout.header_length - CRC.size, CRC.size),
                (self.layout.file_length - TRAILER_TAIL.size, TRAILER_TAIL.size)]

    def _check_unchanged(self) -> None:
        """Refuse a file rewritten in place since it was opened: its seals (the preamble and the header's and
        trailer's CRCs) must still be the bytes this reader checked, read in three small reads. Data read in
        between was verified against this trailer, so a verified read returns one snapshot's bytes, never a
        mix of two (short of a CRC32C collision in a seal)."""
        if self._fd is None:
            return
        if os.fstat(self._fd).st_size != self._size or [self._read(*seal) for seal in self._seals()] != self._sealed:
            raise CorruptSnapshotError("the file changed while being read (rewritten in place by another program)")

    def _mapped(self) -> memoryview:
        if self._fd is None:
            return self._view
        if self._map is None:
            # Copy-on-write: views are writable for frameworks, and writes never reach the file.
            # Mapped at the file's size now: shorter than when opened if it was cut short since (a larger file
            # is caught by _check_unchanged). mmap refuses an empty file with ValueError.
            try:
                mapping = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
            except ValueError:
                mapping = None
            if mapping is None or len(mapping) < self._size:
                left = 0 if mapping is None else len(mapping)
                if mapping is not None:
                    mapping.close()
                raise CorruptSnapshotError(f"file shrank while being read: {left} of its {self._size} bytes are left")
            self._map = mapping
            self._map_view = memoryview(self._map)  # one view to slice, not one per tensor
        return self._map_view

    def _mover_io(self, call, regions: list, progress: Progress):
        # The mover reports a file cut short under an open reader (truncated in place) as EOFError.
        try:
            return call(self._fd, regions, progress)
        except EOFError as exc:
            raise CorruptSnapshotError(f"file shrank while being read: {exc}") from None

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

    def _check_view(self, index: int, view: memoryview, first_chunk: int = 0) -> None:
        """Check `view`, the region's bytes from chunk `first_chunk` on, against those chunks' CRCs."""
        region = self.layout.regions[index]
        got = mover.chunk_crcs(view, region.chunk_size)
        start = region.first_chunk + first_chunk  # only this view's chunks: a piece of a large tensor copies few
        expected = self._crcs[start : start + len(got)]
        if got != expected:
            bad = next(c for c, (a, b) in enumerate(zip(got, expected)) if a != b)
            raise self._bad_chunk(index, first_chunk + bad)

    # ------------------------------------------------------------------------------------------------ tensors

    def names(self) -> list[str]:
        """Tensor names in region order."""
        return list(self._entries)

    def _entry(self, name: str) -> tuple[int, str, tuple]:
        try:
            return self._entries[name]
        except KeyError:
            # "w" for "weights/w": the same name in a section, then names that merely look alike
            close = [n for n in self._entries if n.rsplit("/", 1)[-1] == name][:5] or \
                difflib.get_close_matches(str(name), self._entries, n=5, cutoff=0.6)
            names = close or list(self._entries)[:10]
            more = "" if close or len(self._entries) <= 10 else f" and {len(self._entries) - 10} more"
            raise MissingTensorError(
                f"no tensor {name!r} in this snapshot; {'closest' if close else 'it has'}: "
                f"{', '.join(map(repr, names)) or 'none'}{more}"
            ) from None

    def info(self, name: str) -> tuple[str, tuple, Region]:
        index, dtype, shape = self._entry(name)
        return dtype, shape, self.layout.regions[index]

    def chunk_crcs(self, name: str) -> memoryview:
        """The CRC32C each chunk of the tensor's region must have (a view of the trailer's), for a caller that
        checks the bytes as it moves them (thaw_mlx.load checks KV pages while scattering them)."""
        return self._expected_views([self.info(name)[2]])[0]

    def tensor(self, name: str, *, verify: bool = True, copy: bool = True) -> Tensor:
        """One tensor, reading only its bytes. `copy=False` gives a copy-on-write view over the mapped file.

        A name the snapshot does not hold raises MissingTensorError (a KeyError) listing the closest names;
        weights are named `weights/<name>` (what `save_file` writes)."""
        self._check_open()
        index, dtype, shape = self._entry(name)
        if copy:
            return self._read_tensors([name], verify)[name]
        region = self.layout.regions[index]
        view = self._mapped()[region.offset : region.end]
        if verify:
            self._check_view(index, view)
            self._check_unchanged()
        return Tensor._of(dtype, shape, view)  # checked against the region by describe_tensors

    def verified_pieces(self, name: str) -> Iterator[memoryview]:
        """The tensor's bytes over the mapped file (no copy), in pieces of whole chunks (mover.progress_step's),
        each verified before it is given, and the file checked unchanged after the last: for a caller that reads
        a tensor through and reports as it goes (thaw diff's checksums)."""
        self._check_open()
        index = self._entry(name)[0]
        region = self.layout.regions[index]
        view = self._mapped()[region.offset : region.end]
        step = mover.progress_step(region.chunk_size)
        for start in range(0, region.length, step):
            piece = view[start : start + step]
            self._check_view(index, piece, start // region.chunk_size)
            yield piece
        self._check_unchanged()

    def _read_tensors(self, names: list[str], verify: bool, progress: Progress = None) -> dict[str, Tensor]:
        """Copy tensors out in one batch, each chunk verified before it reaches its destination."""
        entries = [self._entry(name) for name in names]
        regions = [self.layout.regions[index] for index, _, _ in entries]
        views = _arena_views([region.length for region in regions])
        self._fill([index for index, _, _ in entries], views, verify, progress)
        # describe_tensors checked each dtype, shape and region length, so the views need no second check.
        return {name: Tensor._of(dtype, shape, view) for name, (_, dtype, shape), view in zip(names, entries, views)}

    def _fill(self, indices: list[int], views: list[memoryview], verify: bool, progress: Progress) -> None:
        """Copy the regions `indices` into `views` (one each, of its length), each chunk verified before it
        reaches its view; then the file is checked unchanged."""
        regions = [self.layout.regions[index] for index in indices]
        if self._fd is None:
            bad = mover.check_buffer(self._view, regions, self._crcs) if verify else None
            if bad is not None:
                raise self._bad_chunk(indices[bad[0]], bad[1])
            for region, view in zip(regions, views):
                view[:] = self._view[region.offset : region.end]
        elif verify:
            specs = [(r.offset, view, r.chunk_size, crcs)
                     for r, view, crcs in zip(regions, views, self._expected_views(regions))]
            bad = self._mover_io(mover.read_regions, specs, progress)
            if bad is not None:
                raise self._bad_chunk(indices[bad[0]], bad[1])
        else:
            for index, region, view in zip(indices, regions, views):
                done = 0
                while done < region.length:  # one read returns at most ~2 GiB on Linux
                    got = os.preadv(self._fd, [view[done:]], region.offset + done)
                    if got == 0:
                        raise CorruptSnapshotError(f"file shrank while reading tensor {self.names()[index]!r}")
                    done += got
        self._check_unchanged()

    def read_into(self, out, *, verify: bool = True, progress: Progress = None) -> None:
        """Copy the whole snapshot into `out` (a writable buffer of at least `layout.file_length` bytes): the
        header and trailer as checked at open, every region with each chunk verified before it reaches `out`,
        and zeros for the padding (not read: outside every checksum). `out` then holds a valid snapshot image
        (`loads(out)`), whatever happens to the file afterwards."""
        self._check_open()
        layout, out = self.layout, memoryview(out).cast("B")
        if len(out) < layout.file_length:
            raise ValueError(f"the buffer holds {len(out)} bytes, the snapshot {layout.file_length}")
        position = layout.header_length
        for start, end in [(r.offset, r.end) for r in layout.regions] + [(layout.trailer_offset, 0)]:
            out[position : max(start, position)] = bytes(max(start - position, 0))
            position = end
        out[: layout.header_length] = self._header
        out[layout.trailer_offset : layout.file_length] = self._trailer
        self._fill(list(range(len(layout.regions))), [out[r.offset : r.end] for r in layout.regions], verify, progress)

    def _mapped_tensors(self) -> dict[str, Tensor]:
        """Every tensor as a view of the mapping, unverified: one pass over the region table, no per-name
        lookup and no Region objects (20,000 small tensors cost more in per-tensor calls than in bytes)."""
        view, table = self._mapped(), self.layout.table
        starts, ends = table[:, 0].tolist(), (table[:, 0] + table[:, 1]).tolist()
        return {name: Tensor._of(dtype, shape, view[starts[i] : ends[i]])
                for name, (i, dtype, shape) in self._entries.items()}

    # ------------------------------------------------------------------------------------------------ whole file

    @gc_paused
    def snapshot(self, *, verify: bool = True, copy: bool = True, progress: Progress = None) -> Snapshot:
        """The whole snapshot. `copy=False` keeps tensors as copy-on-write views over the file (zero-copy)."""
        self._check_open()
        names = self.names()
        if copy:
            tensors = self._read_tensors(names, verify, progress)
            snap = decode(self.document, tensors.__getitem__, names)
        else:
            if verify:
                self._verify_bytes(progress, mapped=True)
            self._check_unchanged()
            snap = decode(self.document, self._mapped_tensors().__getitem__, names)
        snap.id = self.id
        return snap

    @gc_paused
    def verify(self, progress: Progress = None) -> None:
        """Check every chunk checksum, that all padding is zero, and every section rule."""
        self._check_open()
        self._verify_bytes(progress)
        decode(self.document, self._mapped_tensors().__getitem__, self.names())

    def _verify_bytes(self, progress: Progress, mapped: bool = False) -> None:
        """Chunk checksums and padding. `mapped` checks them through the file's mapping, for the zero-copy
        load whose tensors view it: its pages are then mapped once, by the check, and no read copies them."""
        if self._fd is None or mapped:
            self._check_mapped(progress)
        else:
            regions = self.layout.regions
            specs = [(r.offset, r.length, r.chunk_size, crcs) for r, crcs in zip(regions, self._expected_views(regions))]
            bad = self._mover_io(mover.verify_regions, specs, progress)
            if bad is not None:
                raise self._bad_chunk(*bad)
            self._check_padding()
        self._check_unchanged()

    def _check_mapped(self, progress: Progress) -> None:
        """Every chunk and every padding gap, in one pass over the mapping (or buffer): the region table framed
        by two empty regions, at the header's end and at the trailer, so the gaps before the first region and
        after the last are checked with the others."""
        import numpy

        layout = self.layout
        rows = numpy.empty((len(layout.table) + 2, 4), numpy.int64)
        rows[1:-1] = layout.table
        rows[0], rows[-1] = (layout.header_length, 0, 1, 0), (layout.trailer_offset, 0, 1, 0)
        try:
            bad = mover.check_buffer(self._mapped(), rows, self._crcs, progress, zero_gaps=True)
        except EOFError as exc:  # the file was truncated under the mapping while it was being checked
            raise CorruptSnapshotError(f"file shrank while being read: {exc}") from None
        if bad is None:
            return
        index, chunk = bad
        if chunk < 0:
            start = int(rows[index - 1, 0] + rows[index - 1, 1])
            raise CorruptSnapshotError(f"padding bytes [{start}, {int(rows[index, 0])}) must be zero")
        raise self._bad_chunk(index - 1, chunk)

    def _check_padding(self) -> None:
        """Every gap is zero, read from the file (the streaming verify; mapped checks do it in C)."""
        gaps = []
        position = self.layout.header_length
        for region in self.layout.regions:
            gaps.append((position, region.offset))
            position = region.end
        gaps.append((position, self.layout.trailer_offset))
        for start, end in gaps:
            # Each gap is shorter than the alignment; startswith compares with memcmp.
            if end > start and not _ZEROS.startswith(self._read(start, end - start)):
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
            self._release()  # os.close, once
            self._fd = None
            self._closed = True  # a file opened by path; one over a buffer keeps reading the buffer

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the snapshot file is closed: read it inside its `with thaw_format.open(...)` block")

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


def _path(path) -> str:
    """A path argument: str, bytes (a file system path, as in `os.open`) or os.PathLike."""
    if isinstance(path, (str, bytes, os.PathLike)):
        return os.fsdecode(path)
    if callable(getattr(path, "read", None)):
        raise TypeError(f"expected a path (str, bytes or os.PathLike), got a file object ({type(path).__name__}): "
                        "pass its path, or loads() its bytes")
    raise TypeError(f"expected a path (str, bytes or os.PathLike), got {type(path).__name__}; "
                    "use loads() for a snapshot's bytes in memory")


def open(path, *, limits: Limits = DEFAULT_LIMITS) -> SnapshotFile:  # noqa: A001 - mirrors builtins.open
    """Open a snapshot for lazy access: one tensor can be read without reading the rest."""
    return SnapshotFile(_path(path), limits=limits)


def load(path, *, verify: bool = True, mmap: bool = False, shared: bool = False,
         limits: Limits = DEFAULT_LIMITS, progress: Progress = None) -> Snapshot:
    """Read a whole snapshot. `mmap=True` gives zero-copy copy-on-write tensors backed by the file.

    The mapped tensors are checked when loaded, and the file is checked unchanged then; a later in-place
    change to the file (truncation or a rewrite by another program) can still reach pages of the views not
    yet copied, or raise SIGBUS. `save` never changes a file in place: it renames a new file over the path,
    so views keep the snapshot they mapped. See RELIABILITY.md.

    `shared=True` reads the snapshot, verified, into a POSIX shared-memory segment of its own, which its
    read-only tensors view: restoring it into an engine that lives in other processes (vLLM's default
    multiprocessing mode, SGLang) hands that segment over as it is, with no copy
    (thaw_format.sdk.lent.load_shared). The file is not read again: changing or deleting it later changes
    nothing.

    `verify=False` checks no chunk here. A shared load's segment keeps the file's checksums and is verified
    before any engine restores it (thaw_format.sdk.lent's trust rule); a plain or mapped load's Snapshot is the
    caller's memory, and no engine verifies it."""
    if shared:
        if mmap:
            raise ValueError("load: mmap=True views the file, shared=True a shared-memory copy of it: choose one")
        from .sdk.lent import load_shared

        return load_shared(_path(path), verify=verify, limits=limits, progress=progress)
    with SnapshotFile(_path(path), limits=limits) as f:
        return f.snapshot(verify=verify, copy=not mmap, progress=progress)


def loads(buffer, *, verify: bool = True, copy: bool = True, limits: Limits = DEFAULT_LIMITS) -> Snapshot:
    """Read a snapshot from memory. `copy=False` keeps tensors as views into `buffer`."""
    if isinstance(buffer, (str, os.PathLike)):
        raise TypeError(f"loads() reads a snapshot's bytes, not a path ({type(buffer).__name__}); use load(path)")
    return SnapshotFile(buffer, limits=limits).snapshot(verify=verify, copy=copy)


def verify(path, *, limits: Limits = DEFAULT_LIMITS, progress: Progress = None) -> str:
    """Check every checksum and structural rule; return the snapshot id or raise a SnapshotError."""
    with SnapshotFile(_path(path), limits=limits) as f:
        f.verify(progress)
        return f.id
