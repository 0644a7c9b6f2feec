"""The one place that decides how bulk bytes move: checksums, file I/O, gather and scatter.

Two paths give the same bytes and results. The native one is libthaw (C, `thaw_format._libthaw`, built by
`pip install`): hardware CRC32C chosen once per process, parallel region I/O on a persistent thread pool
that verifies every chunk in a private staging buffer before copying it out, and multi-threaded
gather/scatter, all with the GIL released. The portable one uses the `crc32c` package and memoryview copies
(C memcpy). The choice is made once, at import; `backend()` says which path is active and, for the portable
one, why libthaw is not.

Everything works on buffers (bytes, bytearray, memoryview, mmap, numpy arrays, anything C-contiguous with
the buffer protocol) and never loops over bytes in Python. The functions, on either path:

    crc32c(data, value=0) -> int              CRC32C of data, continuing from value
    chunk_crcs(data, chunk_size) -> array('I')  CRC32C of each chunk_size piece (the last may be short)
    write_regions(fd, [(offset, buffer, chunk_size)], progress=None) -> [array('I')]
        pwrite each buffer at its offset and return its chunk CRCs, computed while the bytes are hot. A gap
        of less than 4 KiB between one region's end and the next one's start is written as zeros (padding).
    read_regions(fd, [(offset, out, chunk_size, expected_crcs)], progress=None, *, direct=False)
        fill each writable `out` from the file; every chunk is checked in a staging buffer before it is
        copied out, so `out` never receives a bad chunk's bytes. Returns the first bad (region, chunk) in
        file order, or None. direct=True tries O_DIRECT (native path) and falls back where refused.
    verify_regions(fd, [(offset, length, chunk_size, expected_crcs)], progress=None, *, direct=False)
        the same check with bounded memory and no target.
    check_buffer(buffer, [(offset, length, chunk_size, first_crc)], crcs, progress=None, *, zero_gaps=False)
        the same check for regions of a buffer already in memory (a mapped file): each chunk against
        crcs[first_crc + k], the bytes read once where they lie (in parallel on the native path). The regions
        may be an int64 array of such rows. zero_gaps=True also requires the bytes between one region's end
        and the next region's start to be zero (padding); a non-zero gap is reported as (region, -1), region
        being the one after the gap. A region outside the buffer, past the end of crcs, or (zero_gaps) out of
        order raises ValueError before any byte is read. On the native path a SIGBUS while reading (the
        mapped file was truncated) raises EOFError instead of ending the process.
    gather(src, offsets, length, out) / scatter(src, out, offsets, length)
        copy slab i between src[offsets[i]:+length] and out[i*length:+length] (and back); a slab outside
        its buffer raises ValueError before any byte moves. `offsets` is copied first, so it may alias `out`.
    gather_pages(blocks, block_offsets, layout, out, chunk_size=0) -> array('I') or None
        page i of `out` = the engine block at byte block_offsets[i] of `blocks`, read through a PageLayout
        (the engine's element order, e.g. a transposed K), with the CRC32C of each chunk_size chunk of `out`
        computed in the same pass when chunk_size > 0 (on the native path, in the move itself where the CPU
        folds with VPCLMULQDQ, rows are whole 128-byte steps and chunk_size is a multiple of a row).
        scatter_pages(pages, blocks, block_offsets, layout) writes them back. Bad ranges, shared memory
        between the two sides and (scatter) two pages for one block raise ValueError before any byte moves.
    gather_pages_to_file(fd, offset, blocks, block_offsets, layout, chunk_size) -> array('I')
        gather_pages straight into a file at `offset` (pwrite), with each chunk's CRC32C: on the native path
        through a tile per thread, one 2 MiB-aligned span of the file at a time, written from the tile while it
        is hot, so no buffer of the pages' size is touched and the page cache can keep the file in 2 MiB folios
        (a later mapping of it faults once per 2 MiB). A failed write raises OSError; what was written before
        stays. Either path refuses, before any byte moves, what gather_pages refuses, then a chunk_size that
        is not a positive multiple of the item size, a negative offset (ValueError) and a negative fd
        (OSError EBADF).
    scatter_pages_checked(pages, blocks, block_offsets, layout, chunk_size, expected) -> int or None
        scatter_pages that checks each chunk_size chunk of the pages against expected[c]: on the native path
        where the CPU allows (x86 AVX2 with VPCLMULQDQ) and rows are whole 128-byte steps, in the move itself
        (each byte read once, folded into the CRC as it is stored), else just before moving it (the chunk is
        still in cache). Returns the first bad chunk; other chunks, and the bad one on the one-read path, may
        have been written: the caller discards `blocks` (a fresh buffer, never live state). On the
        native path a SIGBUS while reading the pages (a mapped file truncated under them) raises EOFError
        instead of ending the process, after other chunks may have moved.
    scatter_pages_checked_batch([(pages, blocks, block_offsets, layout, chunk_size, expected, release)])
        -> (i, chunk) or None
        scatter_pages_checked of each, in one run of the native path's thread pool (its threads woken once for
        them all); every scatter's ranges are checked before any byte of any of them moves (ValueError naming
        the scatter). Returns the first scatter (in order) with a bad chunk and that chunk; a SIGBUS raises
        PagesFaulted (an EOFError) naming the scatter. Any scatter's blocks may have been written. The scatters
        run at once: no scatter's blocks may overlap another's pages or blocks (not checked across scatters).
        release=True (native path on Linux: RELEASES_PAGES): the pages are a read-only mapping of a file, whose
        memory pages are unmapped once that scatter has moved (they stay in the page cache), so a batch never
        maps the whole file at once; elsewhere the flag does nothing and the caller releases them.
    remote_window(pid, address, nbytes) -> memoryview
        another process's bytes, named here: scatter_pages reads a view of it from that process (Linux
        process_vm_readv, native path), one pass with no copy here; any other read of it faults (it maps
        nothing readable). A refused read, or one of a range whose first or last byte is not mapped, raises
        RemoteReadError before any byte moves; a hole inside the range fails the same way, after other
        units may have moved (the caller discards what it scattered into).
    remote_readable(pid, [(address, nbytes)])   raise RemoteReadError unless those bytes can be read so
    remote_token(pid, address, token)           raise RemoteReadError (refused) unless pid holds token there
    fetched(data)                               data's bytes here: itself, or a remote window's read into a copy
    copy_with_crcs(src, out, chunk_size) -> array('I')
        out[:len(src)] = src and the CRC32C of each chunk of it, in one multi-threaded pass (native path)
    empty(nbytes) -> memoryview                 an uninitialised writable buffer, the target of a load
    recycled(nbytes) -> memoryview              the same, reusing a buffer of that size let go earlier
    start_writeback(fd, offset, length)         start writing those dirty file pages to disk, not waiting (a
        save's fsync then finds most of them written; native path on Linux, else nothing)
    prefault(buffer) -> int                     fault in the pages of a writable buffer about to be written
        whole that are not resident yet (one system call per 2 MiB where each store would trap once per
        page): the bytes populated, or -errno (native path on Linux, else 0)
Reads raise EOFError when the file is shorter than a region, OSError on an I/O error.
Staging memory is bounded whatever a file declares: chunks up to _STAGED_CHUNK_BYTES are staged whole (per
thread on the native path); a larger chunk is read in _STAGE_BYTES pieces on one thread with a running
CRC, copied out piece by piece, and its bytes in `out` are zeroed again if its CRC fails, so on return `out`
still holds no byte of a bad chunk.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import weakref
from array import array
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import crc32c as _crc32c

try:
    from ._libthaw import ffi as _ffi, lib as _lib

    _UNAVAILABLE = None
except ImportError as exc:  # not built: no compiler at install time, or an unsupported platform
    _ffi = _lib = None
    _UNAVAILABLE = f"thaw_format._libthaw is not built ({exc})"

Progress = Optional[Callable[[int], None]]
WriteRegion = Tuple[int, object, int]  # (file offset, buffer, chunk size)
ReadRegion = Tuple[int, object, int, Sequence[int]]  # (file offset, writable buffer, chunk size, expected CRCs)
VerifyRegion = Tuple[int, int, int, Sequence[int]]  # (file offset, length, chunk size, expected CRCs)
BufferRegion = Tuple[int, int, int, int]  # (offset in the buffer, length, chunk size, index of its first CRC)

# With a progress callback, regions go to C in batches of about this many bytes, reported after each.
_PROGRESS_BYTES = 64 << 20
# ... and a region longer than this goes in pieces of about this size (whole chunks), so that one huge tensor
# reports as it goes. Larger than a batch: each call costs about 1-2 ms (its pool's wake-up, its stage buffers
# faulted in afresh): a verify from the page cache, 2 cores, was 20% slower in 64 MiB pieces, 6% in these.
_PROGRESS_PIECE_BYTES = 256 << 20
# Gaps this small between consecutive written regions are padding and written as zeros.
_PADDING_LIMIT = 4096
# Reads are staged through a bounded buffer so a bad chunk never reaches the caller's target.
_STAGE_BYTES = 8 << 20
# Chunks larger than this are not staged whole (a file may declare 1 GiB chunks, and the native path stages
# one chunk per thread): they take the bounded path, _check_regions.
_STAGED_CHUNK_BYTES = 8 << 20


def backend() -> str:
    """Say which implementation moves the bytes, e.g. "libthaw 0.1 (crc32c: avx2-vpclmulqdq, pages: avx2, 2
    threads)" (pages: the transposed-tile kernel of the KV page moves)."""
    if _lib is None:
        return f"python (crc32c package); libthaw unavailable: {_UNAVAILABLE}"
    impl = _ffi.string(_lib.thaw_crc32c_impl()).decode()
    tiles = _ffi.string(_lib.thaw_pages_impl()).decode()
    return f"libthaw 0.1 (crc32c: {impl}, pages: {tiles}, {_lib.thaw_threads()} threads)"


def _bytes_view(data) -> memoryview:
    return memoryview(data).cast("B")


def _num_chunks(length: int, chunk_size: int) -> int:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return -(-length // chunk_size)


def _expected_crcs(expected, length: int, chunk_size: int, index: int):
    """The expected CRCs as a uint32 buffer of exactly one entry per chunk (C reads that many): an array('I')
    or a memoryview of one (a reader's slice of its trailer) as it is, anything else copied."""
    kind = expected.typecode if isinstance(expected, array) else getattr(expected, "format", None)
    crcs = expected if kind == "I" and isinstance(expected, (array, memoryview)) else array("I", expected)
    if len(crcs) != _num_chunks(length, chunk_size):
        raise ValueError(
            f"region {index}: {len(crcs)} expected CRCs for {_num_chunks(length, chunk_size)} chunks "
            f"of {chunk_size} bytes in {length} bytes"
        )
    return crcs


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page; where empty() starts a buffer of two or more


def empty(nbytes: int) -> memoryview:
    """A writable byte buffer of nbytes, left uninitialised for a caller that fills every byte it exposes (a
    load): zeroing it first would touch every page once more. numpy allocates it, so tracemalloc counts it
    and large buffers get transparent huge pages; imported here, so that `import thaw_format` stays light.

    A buffer of 2 * HUGE_PAGE or more starts on a HUGE_PAGE boundary, in an allocation HUGE_PAGE larger (the
    rest never touched: address space, not memory), so that every page of it can be huge: at malloc's offset
    its first and last 2 MiB stay in 4 KiB pages (12% of a load's 16 MiB KV tensors), which an engine's process
    reading it (process_vm_readv, thaw_format.sdk.remote) pins one by one at about twice the CPU per byte
    (benchmarks/HISTORY.md, SGLang)."""
    import numpy

    if nbytes < 2 * HUGE_PAGE:
        return memoryview(numpy.empty(nbytes, numpy.uint8))
    base = numpy.empty(nbytes + HUGE_PAGE, numpy.uint8)
    skip = -base.ctypes.data % HUGE_PAGE
    return memoryview(base[skip : skip + nbytes])


# Buffers of recycled() let go, by size: kept for the next call of that size, up to _RECYCLE_BYTES in all.
_RECYCLE_BYTES = 1 << 30
_recycled: dict[int, list] = {}
_recycled_bytes = [0]


def recycled(nbytes: int) -> memoryview:
    """A buffer as numpy.empty(nbytes) gives (not aligned to a huge page as empty's: a capture's buffer stays in
    this process), but memory already touched where it can be: a buffer of the same size that an earlier call
    handed out and that nothing references any more (kept, up to _RECYCLE_BYTES in all, when its last view
    went). Faulting fresh memory in costs about as much as writing it (the kernel zeroes every page first, in
    4 KiB or 2 MiB faults), so a capture repeated in steady state (fork rounds) would pay twice per byte
    without this. Like any allocator cache, the kept buffers stay in this process's memory."""
    import numpy

    try:
        base = _recycled.get(nbytes, []).pop()  # atomic under the GIL: a finaliser may append meanwhile
        _recycled_bytes[0] -= nbytes
    except IndexError:
        base = numpy.empty(nbytes, numpy.uint8)
    handed = base[:]  # a view: when the last reference to it goes, base goes back
    weakref.finalize(handed, _keep, base)
    return memoryview(handed)


def _keep(base) -> None:
    if _recycled_bytes[0] + base.nbytes <= _RECYCLE_BYTES:
        _recycled_bytes[0] += base.nbytes
        _recycled.setdefault(base.nbytes, []).append(base)


def _own_offsets(offsets) -> array:
    """A private int64 copy of the offsets: one memcpy for a contiguous int64 buffer (numpy int64,
    array('q')), else converted element by element."""
    try:
        view = memoryview(offsets)
        if view.c_contiguous and view.itemsize == 8 and view.format.lstrip("<=@") in ("q", "l"):
            owned = array("q")
            owned.frombytes(view.cast("B"))
            return owned
    except TypeError:
        pass
    return array("q", offsets)


def _check_slabs(src_len: int, out_len: int, offsets, length: int, slabs_in_src: bool) -> None:
    """Refuse a gather/scatter whose slabs leave their buffer, before any byte moves."""
    if length < 0:
        raise ValueError(f"slab length must be >= 0, got {length}")
    dense, sparse = (out_len, src_len) if slabs_in_src else (src_len, out_len)
    if len(offsets) * length > dense:
        raise ValueError(f"{len(offsets)} slabs of {length} bytes need {len(offsets) * length} bytes, buffer has {dense}")
    for i, off in enumerate(offsets):
        if off < 0 or off + length > sparse:
            raise ValueError(f"slab {i} [{off}, {off + length}) is outside a buffer of {sparse} bytes")


class PageLayout(NamedTuple):
    """Where a token-major page's elements sit in an engine block: `rows` rows of `row_elems` elements of
    `itemsize` bytes; row r starts at element row_start[r] of the block, its elements col_stride apart."""

    itemsize: int
    row_start: object  # int64 numpy array, one entry per row
    row_elems: int
    col_stride: int

    @property
    def page_bytes(self) -> int:
        return len(self.row_start) * self.row_elems * self.itemsize


def page_layout(positions, itemsize: int) -> PageLayout:
    """The PageLayout of a page whose element j (page order) sits at block element positions[j]: rows as long
    as the positions keep one stride (a head_dim row, transposed or not), else one element per row."""
    import numpy

    positions = numpy.ascontiguousarray(positions, dtype=numpy.int64).ravel()
    n = len(positions)
    if n > 1:
        steps = numpy.diff(positions)
        stride = int(steps[0])
        breaks = numpy.flatnonzero(steps != stride)
        width = int(breaks[0]) + 1 if len(breaks) else n
        if n % width == 0:
            rows = positions.reshape(-1, width)
            if numpy.array_equal(rows, rows[:, :1] + numpy.arange(width, dtype=numpy.int64) * stride):
                return PageLayout(itemsize, numpy.ascontiguousarray(rows[:, 0]), width, stride)
    return PageLayout(itemsize, positions, 1, 1)


_INT64_MAX = (1 << 63) - 1


def consecutive_runs(pages) -> list[tuple[int, int, int]]:
    """(first page, count, index in `pages`) of each run of consecutive page numbers: the slices of a page
    buffer that one gather_pages / scatter_pages call each can take. `pages` is a one-dimensional numpy array of
    an integer dtype (taken as it is: a restore's thousands of rows need no round trip through a list) or a
    sequence of ints (not bools); either way the numbers must lie in [0, 2**63): anything else is refused, not
    rounded, parsed or wrapped by numpy's int64 conversion."""
    import numpy

    numbers = _page_array(pages) if isinstance(pages, numpy.ndarray) else _page_list(pages)
    if numbers.size == 0:
        return []
    starts = numpy.concatenate(([0], numpy.flatnonzero(numpy.diff(numbers) != 1) + 1))
    counts = numpy.diff(numpy.append(starts, numbers.size))
    return list(zip(numbers[starts].tolist(), counts.tolist(), starts.tolist()))


def _page_array(pages):
    """consecutive_runs's numbers from an array: integer dtype, one dimension, range checked vectorised."""
    import numpy

    if pages.dtype.kind not in "iu":  # bool ("b"), floats, objects, strings: not page numbers
        raise TypeError(f"page numbers must be ints, not {pages.dtype}")
    if pages.ndim != 1:
        raise ValueError(f"page numbers must be a one-dimensional array, not of shape {pages.shape}")
    if pages.size and (pages.min() < 0 or pages.max() > _INT64_MAX):  # a uint64 past 2**63 - 1 would wrap
        raise ValueError(f"page numbers must lie in [0, 2**63), not {int(pages.min())}..{int(pages.max())}")
    return pages.astype(numpy.int64, copy=False)


def _page_list(pages: Sequence[int]):
    """consecutive_runs's numbers from a sequence of ints: type, min and max each one pass in C."""
    import numpy

    from .document import ints_within

    pages = pages if isinstance(pages, list) else list(pages)
    if not ints_within(pages, 0, _INT64_MAX):
        others = sorted({type(p).__name__ for p in pages} - {"int"})
        if others:
            raise TypeError(f"page numbers must be ints, not {', '.join(others)}")
        raise ValueError(f"page numbers must lie in [0, 2**63), not {min(pages)}..{max(pages)}")
    return numpy.asarray(pages, dtype=numpy.int64)


def _page_positions(layout: PageLayout):
    """Every page element's block element, in page order (the portable path's index)."""
    import numpy

    cols = numpy.arange(layout.row_elems, dtype=numpy.int64) * layout.col_stride
    return (numpy.asarray(layout.row_start, dtype=numpy.int64)[:, None] + cols).ravel()


def _check_pages(blocks_len: int, pages_len: int, offsets, layout: PageLayout, scatter: bool, shared: bool) -> None:
    """Refuse a page move whose ranges are wrong, before any byte moves, naming what is wrong."""
    import numpy

    if layout.itemsize not in (1, 2, 4, 8) or len(layout.row_start) == 0 or layout.row_elems < 1:
        raise ValueError(f"page layout: itemsize {layout.itemsize} (must be 1, 2, 4 or 8), "
                         f"{len(layout.row_start)} rows of {layout.row_elems} elements (must be >= 1)")
    need = len(offsets) * layout.page_bytes
    if need > pages_len:
        raise ValueError(f"{len(offsets)} pages of {layout.page_bytes} bytes need {need} bytes, buffer has {pages_len}")
    if shared:
        raise ValueError("the pages buffer and the engine buffer share memory")
    positions = _page_positions(layout)
    lo, hi = int(positions.min()) * layout.itemsize, (int(positions.max()) + 1) * layout.itemsize
    for i, off in enumerate(map(int, offsets)):  # Python ints: no wrap-around
        if off + lo < 0 or off + hi > blocks_len:
            raise ValueError(f"page {i}: its block at byte {off} spans [{off + lo}, {off + hi}), outside an engine "
                             f"buffer of {blocks_len} bytes")
    if scatter:
        values, counts = numpy.unique(numpy.asarray(offsets, dtype=numpy.int64), return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"pages name block offset {int(values[counts > 1][0])} more than once: a scatter "
                             "writes each block once")


def progress_step(chunk_size: int) -> int:
    """Bytes of a region between two progress reports: whole chunks, about _PROGRESS_PIECE_BYTES (one chunk at
    least)."""
    return max(chunk_size, _PROGRESS_PIECE_BYTES // chunk_size * chunk_size)


def _cuts(lengths: Sequence[int], chunk_sizes: Sequence[int], progress: Progress):
    """The (region, start, length) pieces, in order, to hand regions over in for a progress hook: a region longer
    than _PROGRESS_PIECE_BYTES goes in pieces of whole chunks (progress_step), so a file of one 4 GiB tensor
    reports as it goes, not only at its end. None (regions go whole) without a hook or where none is that long."""
    if progress is None or not any(length > _PROGRESS_PIECE_BYTES for length in lengths):
        return None
    pieces = []
    for index, (length, chunk_size) in enumerate(zip(lengths, chunk_sizes)):
        step = progress_step(chunk_size)
        pieces += [(index, start, min(step, length - start)) for start in range(0, length, step)] or [(index, 0, 0)]
    return pieces


def _batches(sizes: Sequence[int], progress: Progress):
    """Index ranges of consecutive regions of about _PROGRESS_BYTES each (one range without progress)."""
    if progress is None:
        yield 0, len(sizes)
        return
    start, total = 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= _PROGRESS_BYTES:
            yield start, i + 1
            start, total = i + 1, 0
    if start < len(sizes):
        yield start, len(sizes)


# ---------------------------------------------------------------------------------------------------------
# The portable path


def _py_crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


def _py_chunk_crcs(data, chunk_size: int) -> array:
    view = _bytes_view(data)
    _num_chunks(len(view), chunk_size)
    return array("I", (_crc32c.crc32c(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)))


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """os.pwrite all of view at offset (a write may take less than asked; one that takes nothing would never
    end, so it raises OSError)."""
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.EIO, f"pwrite wrote nothing of {len(view)} bytes at offset {offset}")
        view = view[written:]
        offset += written


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = os.preadv(fd, [view], offset)
    while got < len(view):
        more = os.preadv(fd, [view[got:]], offset + got)
        if more == 0:
            raise EOFError(f"file ends before byte {offset + len(view)}")
        got += more


def _py_write_regions(fd: int, regions: Sequence[WriteRegion], progress: Progress = None) -> list:
    crcs = []
    for index, (offset, data, chunk_size) in enumerate(regions):
        view = _bytes_view(data)
        _num_chunks(len(view), chunk_size)
        region_crcs = array("I")
        step = progress_step(chunk_size) if progress else max(len(view), 1)  # reported as it goes, with a hook
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            region_crcs.extend(_py_chunk_crcs(piece, chunk_size))
            pwrite_all(fd, piece, offset + start)
            if progress:
                progress(len(piece))
        crcs.append(region_crcs)
        gap = regions[index + 1][0] - (offset + len(view)) if index + 1 < len(regions) else 0
        if 0 < gap < _PADDING_LIMIT:  # padding, as the native path writes it
            pwrite_all(fd, memoryview(bytes(gap)), offset + len(view))
    return crcs


def _check_regions(fd: int, regions, progress: Progress, copy_out: bool):
    """Read each region through a stage of at most _STAGE_BYTES, check its chunks, and copy them out if asked.

    Chunks that fit the stage are staged whole and checked before they are copied. A larger chunk is read in
    stage-sized pieces with a running CRC and copied as it goes; if its CRC then fails, its bytes in the
    target are zeroed before returning, so the caller never holds a bad chunk's bytes."""
    stage = None
    for region_index, (offset, target, chunk_size, expected) in enumerate(regions):
        length = len(target) if copy_out else target
        expected = _expected_crcs(expected, length, chunk_size, region_index)
        if stage is None or len(stage) < min(_STAGE_BYTES, length):  # grown as needed, never past the bound
            stage = memoryview(bytearray(min(_STAGE_BYTES, length)))
        if chunk_size <= _STAGE_BYTES:
            step = (_STAGE_BYTES // chunk_size) * chunk_size
            for start in range(0, length, step):
                piece = stage[: min(step, length - start)]
                _pread_into(fd, piece, offset + start)
                first = start // chunk_size
                for k, crc in enumerate(chunk_crcs(piece, chunk_size)):
                    if crc != expected[first + k]:
                        return region_index, first + k
                if copy_out:
                    target[start : start + len(piece)] = piece
                if progress:
                    progress(len(piece))
            continue
        for chunk, chunk_start in enumerate(range(0, length, chunk_size)):
            chunk_end, value = min(chunk_start + chunk_size, length), 0
            for start in range(chunk_start, chunk_end, _STAGE_BYTES):
                piece = stage[: min(_STAGE_BYTES, chunk_end - start)]
                _pread_into(fd, piece, offset + start)
                value = crc32c(piece, value)
                if copy_out:
                    target[start : start + len(piece)] = piece
                if progress:
                    progress(len(piece))
            if value != expected[chunk]:
                if copy_out:
                    _zero(target[chunk_start:chunk_end], stage)
                return region_index, chunk
    return None


def _zero(target: memoryview, stage: memoryview) -> None:
    stage[:] = bytes(len(stage))
    for start in range(0, len(target), len(stage)):
        target[start : start + len(stage)] = stage[: min(len(stage), len(target) - start)]


def _split_by_chunk_size(fd: int, regions: Sequence, progress: Progress, native, copy_out: bool):
    """Runs of consecutive regions: those with chunks up to _STAGED_CHUNK_BYTES go to `native(fd, run,
    progress)` (C, parallel, one staged chunk per thread), the others to the bounded _check_regions.
    Returns the first bad (region, chunk) in file order, or None."""
    start = 0
    while start < len(regions):
        big = regions[start][2] > _STAGED_CHUNK_BYTES
        stop = start + 1
        while stop < len(regions) and (regions[stop][2] > _STAGED_CHUNK_BYTES) == big:
            stop += 1
        run = regions[start:stop]
        if big:
            targets = [(o, _bytes_view(t), c, e) for o, t, c, e in run] if copy_out else run
            bad = _check_regions(fd, targets, progress, copy_out)
        else:
            bad = native(fd, run, progress)
        if bad is not None:
            return start + bad[0], bad[1]
        start = stop
    return None


def _py_read_regions(fd: int, regions: Sequence[ReadRegion], progress: Progress = None, *, direct: bool = False):
    targets = [(offset, _bytes_view(out), chunk_size, expected) for offset, out, chunk_size, expected in regions]
    return _check_regions(fd, targets, progress, copy_out=True)


def _py_verify_regions(fd: int, regions: Sequence[VerifyRegion], progress: Progress = None, *, direct: bool = False):
    return _check_regions(fd, regions, progress, copy_out=False)


def _region_table(size: int, regions: Sequence[BufferRegion], n_crcs: int, ordered: bool = False):
    """The regions as an int64 numpy table (offset, length, chunk_size, first_crc), each checked to lie
    inside a buffer of `size` bytes and its CRCs inside `n_crcs` (and, if `ordered`, each to start at or
    after the previous one's end): one vectorised check, not one per region."""
    import numpy

    try:
        table = numpy.asarray(regions, dtype=numpy.int64).reshape(-1, 4)
    except OverflowError:
        raise ValueError("a region's offset, length, chunk size or first CRC is out of range") from None
    offset, length, chunk, first = table.T
    bad = (offset < 0) | (length < 0) | (chunk <= 0) | (first < 0) | (offset > size) | (length > size - offset)
    safe_chunk = numpy.maximum(chunk, 1)
    bad |= first > n_crcs - (length // safe_chunk + (length % safe_chunk != 0))  # no overflow
    if bad.any():
        i = int(bad.argmax())
        raise ValueError(f"region {i} {tuple(int(v) for v in table[i])} is outside a buffer of {size} bytes "
                         f"with {n_crcs} CRCs (or has a chunk size <= 0)")
    if ordered and len(table) > 1:
        overlap = offset[1:] < offset[:-1] + length[:-1]  # sums stay below 2 * size: no overflow
        if overlap.any():
            i = int(overlap.argmax()) + 1
            raise ValueError(f"region {i} starts at {int(offset[i])}, before region {i - 1} ends: zero_gaps needs "
                             "regions in order")
    return table


def _py_check_buffer(buffer, regions: Sequence[BufferRegion], crcs, progress: Progress = None, *, zero_gaps: bool = False):
    view = _bytes_view(buffer)
    crcs = crcs if isinstance(crcs, array) and crcs.typecode == "I" else array("I", crcs)
    table = _region_table(len(view), regions, len(crcs), zero_gaps)
    end = None
    for index, (offset, length, chunk_size, first) in enumerate(table.tolist()):
        if zero_gaps and end is not None and view[end:offset].tobytes().strip(b"\0"):
            return index, -1
        end = offset + length
        step = progress_step(chunk_size) if progress else max(length, 1)  # reported as it goes, with a hook
        for start in range(offset, end, step):
            got = _py_chunk_crcs(view[start : min(start + step, end)], chunk_size)
            skip = (start - offset) // chunk_size
            bad = next((c for c, crc in enumerate(got) if crc != crcs[first + skip + c]), None)
            if bad is not None:
                return index, skip + bad
            if progress:
                progress(min(step, end - start))
    return None


def _py_gather(src, offsets: Sequence[int], length: int, out) -> None:
    s, o, offsets = _bytes_view(src), _bytes_view(out), _own_offsets(offsets)
    _check_slabs(len(s), len(o), offsets, length, slabs_in_src=True)
    for i, off in enumerate(offsets):
        o[i * length : (i + 1) * length] = s[off : off + length]


def _py_scatter(src, out, offsets: Sequence[int], length: int) -> None:
    s, o, offsets = _bytes_view(src), _bytes_view(out), _own_offsets(offsets)
    _check_slabs(len(s), len(o), offsets, length, slabs_in_src=False)
    for i, off in enumerate(offsets):
        o[off : off + length] = s[i * length : (i + 1) * length]


def _py_gather_pages(blocks, block_offsets, layout: PageLayout, out, chunk_size: int = 0):
    import numpy

    b, o = numpy.frombuffer(_bytes_view(blocks), numpy.uint8), numpy.frombuffer(_bytes_view(out), numpy.uint8)
    offsets = numpy.asarray(block_offsets, dtype=numpy.int64)
    _check_pages(len(b), len(o), offsets, layout, False, _shares_memory(b, o))
    index = _page_byte_index(offsets, layout)
    o[: index.size] = b[index]
    return _py_chunk_crcs(o[: index.size], chunk_size) if chunk_size else None


def _check_file_side(fd: int, offset: int, chunk_size: int, itemsize: int) -> None:
    """Refuse what a gather into a file cannot take besides its pages, as libthaw does."""
    if chunk_size <= 0 or chunk_size % itemsize:
        raise ValueError(f"chunk_size must be a positive multiple of the item size {itemsize}, got {chunk_size}")
    _check_offset(offset)
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def _check_offset(offset: int) -> None:
    if offset < 0:
        raise ValueError(f"a file offset must be >= 0, got {offset}")


def _py_gather_pages_to_file(fd: int, offset: int, blocks, block_offsets, layout: PageLayout,
                             chunk_size: int) -> array:
    import numpy

    need = len(block_offsets) * layout.page_bytes
    _check_pages(len(_bytes_view(blocks)), need, numpy.asarray(block_offsets, dtype=numpy.int64), layout, False,
                 False)
    _check_file_side(fd, offset, chunk_size, layout.itemsize)
    out = memoryview(bytearray(need))
    crcs = _py_gather_pages(blocks, block_offsets, layout, out, chunk_size)
    pwrite_all(fd, out, offset)
    return crcs


def _py_scatter_pages(pages, blocks, block_offsets, layout: PageLayout) -> None:
    import numpy

    p, b = numpy.frombuffer(_bytes_view(pages), numpy.uint8), numpy.frombuffer(_bytes_view(blocks), numpy.uint8)
    offsets = numpy.asarray(block_offsets, dtype=numpy.int64)
    _check_pages(len(b), len(p), offsets, layout, True, _shares_memory(b, p))
    index = _page_byte_index(offsets, layout)
    b[index] = p[: index.size]


def _py_scatter_pages_checked(pages, blocks, block_offsets, layout: PageLayout, chunk_size: int, expected):
    view = _bytes_view(pages)[: len(block_offsets) * layout.page_bytes]
    expected = _expected_crcs(expected, len(view), chunk_size, 0)
    got = _py_chunk_crcs(view, chunk_size)
    bad = next((c for c, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if bad is None:
        _py_scatter_pages(pages, blocks, block_offsets, layout)
    return bad


def _py_scatter_pages_checked_batch(scatters):
    scatters = list(scatters)
    for i, (pages, blocks, block_offsets, layout, chunk_size, expected, _) in enumerate(scatters):  # all first
        try:
            p, b = _bytes_view(pages), _bytes_view(blocks)
            if b.readonly:
                raise ValueError("the blocks are read-only")
            if chunk_size <= 0 or chunk_size % layout.itemsize:
                raise ValueError(f"chunk_size {chunk_size} is not a positive multiple of the item size")
            _expected_crcs(expected, min(len(block_offsets) * layout.page_bytes, len(p)), chunk_size, 0)
            _check_pages(len(b), len(p), block_offsets, layout, True, _shares_memory(p, b))
        except ValueError as exc:
            raise ValueError(f"scatter {i}: {exc}") from None
    for i, scatter in enumerate(scatters):
        bad = _py_scatter_pages_checked(*scatter[:6])
        if bad is not None:
            return i, bad
    return None


def _shares_memory(a, b) -> bool:
    """Whether two contiguous byte buffers overlap in memory."""
    import numpy

    return numpy.shares_memory(numpy.frombuffer(a, numpy.uint8), numpy.frombuffer(b, numpy.uint8))


def _page_byte_index(offsets, layout: PageLayout):
    """The engine byte of every page byte, pages in order: one vectorised index for numpy."""
    import numpy

    elements = _page_positions(layout) * layout.itemsize
    item = numpy.arange(layout.itemsize, dtype=numpy.int64)
    return (offsets[:, None, None] + elements[None, :, None] + item).ravel()


def _py_copy_with_crcs(src, out, chunk_size: int) -> array:
    s = _bytes_view(src)
    target = _bytes_view(out)[: len(s)]
    target[:] = s
    return _py_chunk_crcs(target, chunk_size)


# ---------------------------------------------------------------------------------------------------------
# The native path (libthaw); every _lib call releases the GIL.


if _ffi is not None:  # resolved once: from_buffer is several times faster with a ctype than with a string
    _CHARS, _UINT32S, _INT64S = _ffi.typeof("char[]"), _ffi.typeof("uint32_t[]"), _ffi.typeof("int64_t[]")
    _REGIONS = _ffi.typeof("thaw_region[]")
    assert _ffi.sizeof("thaw_region") == 40  # five 8-byte fields: _c_check_buffer fills them as uint64 rows


def _c_buffer(data, writable: bool = False):
    return _ffi.from_buffer(_CHARS, data, writable)


def _c_crc32c(data, value: int = 0) -> int:
    if type(data) is bytes:  # cffi passes bytes as a pointer without a buffer object
        return _lib.thaw_crc32c_parallel(value, data, len(data))
    buf = _ffi.from_buffer(_CHARS, data)
    return _lib.thaw_crc32c_parallel(value, buf, len(buf))


def _c_chunk_crcs(data, chunk_size: int) -> array:
    buf = _c_buffer(data)
    out = array("I", bytes(4 * _num_chunks(len(buf), chunk_size)))
    _lib.thaw_chunk_crcs(buf, len(buf), chunk_size, _ffi.from_buffer(_UINT32S, out, True))
    return out


def _raise_io(status) -> None:
    if status.error == _lib.THAW_EOF:
        raise EOFError("file ends before the last region")
    if status.error == _lib.THAW_FAULT:
        raise EOFError(f"reading region {status.bad_region} through the mapping faulted (SIGBUS): the file is "
                       "shorter than its mapping, truncated under it")
    raise OSError(status.error, os.strerror(status.error))


def _c_run(call, fd: int, specs: list, progress: Progress, *flags):
    """Hand (offset, buffer cdata or NULL, length, chunk_size, crcs cdata) specs to C in progress batches;
    return the first bad (region, chunk) or None."""
    cuts = _cuts([spec[2] for spec in specs], [spec[3] for spec in specs], progress)
    if cuts is not None:  # pointers moved to each piece's first byte and CRC (a NULL buffer, a verify's, stays)
        whole = specs
        specs = [(whole[i][0] + at, _ffi.NULL if whole[i][1] == _ffi.NULL else whole[i][1] + at, length,
                  whole[i][3], whole[i][4] + at // whole[i][3]) for i, at, length in cuts]
    status = _ffi.new("thaw_io_status *")
    for start, stop in _batches([spec[2] for spec in specs], progress):
        regions = _ffi.new("thaw_region[]", specs[start:stop])
        code = call(fd, regions, stop - start, *flags, status)
        if code == _lib.THAW_IO_ERROR:
            _raise_io(status)
        if code == _lib.THAW_BAD_CHUNK:
            if cuts is None:
                return start + status.bad_region, status.bad_chunk
            region, at, _ = cuts[start + status.bad_region]
            return region, at // whole[region][3] + status.bad_chunk
        if progress:
            progress(sum(spec[2] for spec in specs[start:stop]))
    return None


def _c_write_regions(fd: int, regions: Sequence[WriteRegion], progress: Progress = None) -> list:
    bufs = [_ffi.from_buffer(_CHARS, data) for _, data, _ in regions]
    counts = [_num_chunks(len(buf), chunk_size) for buf, (_, _, chunk_size) in zip(bufs, regions)]
    flat = array("I", bytes(4 * sum(counts)))  # one array for every region's CRCs, split after
    base = _ffi.from_buffer(_UINT32S, flat, True)
    specs, firsts, first = [], [], 0
    for (offset, _, chunk_size), buf, count in zip(regions, bufs, counts):
        specs.append((offset, buf, len(buf), chunk_size, base + first))
        firsts.append(first)
        first += count
    _c_run(_lib.thaw_write_regions, fd, specs, progress)
    return [flat[f : f + count] for f, count in zip(firsts, counts)]


def _c_read_regions(fd: int, regions: Sequence[ReadRegion], progress: Progress = None, *, direct: bool = False):
    return _split_by_chunk_size(fd, regions, progress, lambda fd, run, p: _c_read_staged(fd, run, p, direct), True)


def _c_verify_regions(fd: int, regions: Sequence[VerifyRegion], progress: Progress = None, *, direct: bool = False):
    return _split_by_chunk_size(fd, regions, progress, lambda fd, run, p: _c_verify_staged(fd, run, p, direct), False)


def _c_read_staged(fd: int, regions: Sequence[ReadRegion], progress: Progress, direct: bool):
    specs = []
    for index, (offset, out, chunk_size, expected) in enumerate(regions):
        buf = _c_buffer(out, writable=True)
        crcs = _expected_crcs(expected, len(buf), chunk_size, index)
        specs.append((offset, buf, len(buf), chunk_size, _ffi.from_buffer(_UINT32S, crcs)))
    return _c_run(_lib.thaw_read_regions, fd, specs, progress, _lib.THAW_DIRECT if direct else 0)


def _c_verify_staged(fd: int, regions: Sequence[VerifyRegion], progress: Progress, direct: bool):
    specs = [
        (offset, _ffi.NULL, length, chunk_size,
         _ffi.from_buffer(_UINT32S, _expected_crcs(expected, length, chunk_size, index)))
        for index, (offset, length, chunk_size, expected) in enumerate(regions)
    ]
    return _c_run(_lib.thaw_verify_regions, fd, specs, progress, _lib.THAW_DIRECT if direct else 0)


def _c_check_buffer(buffer, regions: Sequence[BufferRegion], crcs, progress: Progress = None, *, zero_gaps: bool = False):
    import numpy

    data = _c_buffer(buffer)
    crcs = crcs if isinstance(crcs, array) and crcs.typecode == "I" else array("I", crcs)
    table = _region_table(len(data), regions, len(crcs), zero_gaps)
    cuts = _cuts(table[:, 1].tolist(), table[:, 2].tolist(), progress)
    whole = table
    if cuts is not None:  # rows of (offset, length, chunk_size, first_crc) for each piece
        table = numpy.array([(whole[i, 0] + at, length, whole[i, 2], whole[i, 3] + at // whole[i, 2])
                             for i, at, length in cuts], dtype=numpy.int64).reshape(-1, 4)
    expected = _ffi.from_buffer(_UINT32S, crcs)
    # thaw_region[] built in one vectorised pass: (file offset, buf, len, chunk_size, crcs) per row
    rows = numpy.empty((len(table), 5), numpy.uint64)
    rows[:, 0], rows[:, 2], rows[:, 3] = table[:, 0], table[:, 1], table[:, 2]
    rows[:, 1] = table[:, 0].astype(numpy.uint64) + numpy.uint64(int(_ffi.cast("uintptr_t", data)))
    rows[:, 4] = table[:, 3].astype(numpy.uint64) * numpy.uint64(4) + numpy.uint64(int(_ffi.cast("uintptr_t", expected)))
    status = _ffi.new("thaw_io_status *")
    flags = _lib.THAW_ZERO_GAPS if zero_gaps else 0
    for start, stop in _batches(table[:, 1], progress):
        batch, lead = rows[start:stop], 0
        if zero_gaps and start > 0:  # the gap before this batch: an empty region at the previous one's end leads
            batch, lead = numpy.concatenate([rows[start - 1 : start], batch]), 1
            batch[0, 0] += batch[0, 2]
            batch[0, 1] += batch[0, 2]
            batch[0, 2] = 0
        code = _lib.thaw_check_mapped(_ffi.from_buffer(_REGIONS, batch), len(batch), flags, status)
        if code in (_lib.THAW_BAD_CHUNK, _lib.THAW_BAD_GAP):
            piece = start - lead + status.bad_region
            region, at = (piece, 0) if cuts is None else cuts[piece][:2]  # a gap is before a region's first piece
            return region, -1 if code == _lib.THAW_BAD_GAP else at // int(whole[region, 2]) + status.bad_chunk
        if code != _lib.THAW_OK:
            _raise_io(status)
        if progress:
            progress(int(table[start:stop, 1].sum()))
    return None


def _c_offsets(offsets):
    """Offsets as int64 cdata over a private copy, so a caller's offsets that alias a buffer being written
    cannot change under the copy loop."""
    return _ffi.from_buffer(_INT64S, _own_offsets(offsets))


def _c_gather(src, offsets: Sequence[int], length: int, out) -> None:
    offsets = _own_offsets(offsets)
    s, o, offs = _c_buffer(src), _c_buffer(out, writable=True), _ffi.from_buffer(_INT64S, offsets)
    if length < 0 or _lib.thaw_gather(s, len(s), offs, len(offs), length, o, len(o)):
        _check_slabs(len(s), len(o), offsets, length, slabs_in_src=True)  # raises, naming the bad slab


def _c_scatter(src, out, offsets: Sequence[int], length: int) -> None:
    offsets = _own_offsets(offsets)
    s, o, offs = _c_buffer(src), _c_buffer(out, writable=True), _ffi.from_buffer(_INT64S, offsets)
    if length < 0 or _lib.thaw_scatter(s, len(s), o, len(o), offs, len(offs), length):
        _check_slabs(len(s), len(o), offsets, length, slabs_in_src=False)  # raises, naming the bad slab


def _c_page_layout(layout: PageLayout):
    """The C struct and the buffer its row_start points into (kept alive by the caller)."""
    rows = _c_offsets(layout.row_start)
    return _ffi.new("thaw_page_layout *", (layout.itemsize, len(rows), layout.row_elems, layout.col_stride, rows)), rows


def _c_gather_pages(blocks, block_offsets, layout: PageLayout, out, chunk_size: int = 0):
    b, o, offs = _c_buffer(blocks), _c_buffer(out, writable=True), _c_offsets(block_offsets)
    c_layout, _rows = _c_page_layout(layout)
    crcs = array("I", bytes(4 * _num_chunks(len(offs) * layout.page_bytes, chunk_size))) if chunk_size else None
    c_crcs = _ffi.from_buffer(_UINT32S, crcs, True) if crcs is not None else _ffi.NULL
    code = _lib.thaw_gather_pages(b, len(b), offs, len(offs), c_layout, o, len(o), max(chunk_size, 0), c_crcs)
    if code:
        _page_failure(code, len(b), len(o), block_offsets, layout, False, blocks, out)
    return crcs


def _c_gather_pages_to_file(fd: int, offset: int, blocks, block_offsets, layout: PageLayout,
                            chunk_size: int) -> array:
    _check_offset(offset)
    b, offs = _c_buffer(blocks), _c_offsets(block_offsets)
    c_layout, _rows = _c_page_layout(layout)
    crcs = array("I", bytes(4 * _num_chunks(len(offs) * layout.page_bytes, chunk_size) if chunk_size > 0 else 0))
    error = _ffi.new("int *")
    code = _lib.thaw_gather_pages_to_file(fd, offset, b, len(b), offs, len(offs), c_layout, max(chunk_size, 0),
                                          _ffi.from_buffer(_UINT32S, crcs, True), error)
    if code == _lib.THAW_PAGES_WRITE:
        raise OSError(error[0], os.strerror(error[0]))
    if code:
        _page_failure(code, len(b), len(offs) * layout.page_bytes, block_offsets, layout, False, blocks, None)
    return crcs


def _c_scatter_pages(pages, blocks, block_offsets, layout: PageLayout) -> None:
    p, b, offs = _c_buffer(pages), _c_buffer(blocks, writable=True), _c_offsets(block_offsets)
    c_layout, _rows = _c_page_layout(layout)
    code = _lib.thaw_scatter_pages(p, len(p), b, len(b), offs, len(offs), c_layout)
    if code:
        _page_failure(code, len(b), len(p), block_offsets, layout, True, blocks, pages)


def _c_scatter_pages_remote(remote: tuple[int, int, int], blocks, block_offsets, layout: PageLayout) -> None:
    pid, address, nbytes = remote
    b, offs = _c_buffer(blocks, writable=True), _c_offsets(block_offsets)
    c_layout, _rows = _c_page_layout(layout)
    error = _ffi.new("int *")
    code = _lib.thaw_scatter_pages_remote(pid, address, nbytes, b, len(b), offs, len(offs), c_layout, error)
    if code == _lib.THAW_PAGES_REMOTE:
        raise RemoteReadError(error[0], pid, address, nbytes)
    if code:
        _page_failure(code, len(b), nbytes, block_offsets, layout, True, blocks, None)


def _c_scatter_pages_checked(pages, blocks, block_offsets, layout: PageLayout, chunk_size: int, expected):
    p, b, offs = _c_buffer(pages), _c_buffer(blocks, writable=True), _c_offsets(block_offsets)
    c_layout, _rows = _c_page_layout(layout)
    expected = _expected_crcs(expected, min(len(offs) * layout.page_bytes, len(p)), chunk_size, 0)
    bad = _ffi.new("int64_t *")
    code = _lib.thaw_scatter_pages_checked(p, len(p), b, len(b), offs, len(offs), c_layout, chunk_size,
                                           _ffi.from_buffer(_UINT32S, expected), bad)
    if code == _lib.THAW_PAGES_FAULT:
        raise EOFError("reading the pages faulted (SIGBUS): they are a mapping of a file truncated under it")
    if code:
        _page_failure(code, len(b), len(p), block_offsets, layout, True, blocks, pages)
    return None if bad[0] < 0 else int(bad[0])


def _c_scatter_pages_checked_batch(scatters):
    keep, specs = [], []  # the cdata every spec points into, alive until the call returns
    for i, (pages, blocks, block_offsets, layout, chunk_size, expected, release) in enumerate(scatters):
        try:
            p, b, offs = _c_buffer(pages), _c_buffer(blocks, writable=True), _c_offsets(block_offsets)
            c_layout, rows = _c_page_layout(layout)
            crcs = _ffi.from_buffer(_UINT32S, _expected_crcs(expected, min(len(offs) * layout.page_bytes, len(p)),
                                                             chunk_size, 0))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"scatter {i}: {exc}") from None
        keep.append((p, b, offs, c_layout, rows, crcs, pages, blocks, block_offsets, layout))
        specs.append((p, len(p), b, len(b), offs, len(offs), c_layout, chunk_size, crcs, bool(release)))
    if not specs:
        return None
    failed, bad = _ffi.new("int64_t *"), _ffi.new("int64_t *")
    code = _lib.thaw_scatter_pages_checked_batch(_ffi.new("thaw_checked_scatter[]", specs), len(specs), failed, bad)
    if code == _lib.THAW_PAGES_FAULT:
        if failed[0] < 0:  # no scatter ran: the SIGBUS guard could not be installed
            raise RuntimeError("libthaw could not install its SIGBUS guard; nothing was moved")
        raise PagesFaulted(failed[0])
    if code == _lib.THAW_PAGES_NO_MEMORY:
        raise MemoryError("libthaw: out of memory for the batch's row order")
    if code:
        p, b, _, _, _, _, pages, blocks, block_offsets, layout = keep[failed[0]]
        try:
            _page_failure(code, len(b), len(p), block_offsets, layout, True, blocks, pages)
        except ValueError as exc:
            raise ValueError(f"scatter {failed[0]}: {exc}") from None
    return None if failed[0] < 0 else (int(failed[0]), int(bad[0]))


class PagesFaulted(EOFError):
    """A checked scatter's pages raised SIGBUS: they are a mapping of a file truncated under it. `index`: which
    scatter of a batch."""

    def __init__(self, index: int) -> None:
        super().__init__("reading the pages faulted (SIGBUS): they are a mapping of a file truncated under it")
        self.index = index


def _page_failure(code: int, blocks_len: int, pages_len: int, offsets, layout: PageLayout, scatter: bool,
                  blocks, pages) -> None:
    """Turn a refusal from C into the ValueError that names what is wrong."""
    if code == _lib.THAW_PAGES_NO_MEMORY:
        raise MemoryError("libthaw could not allocate the page move's working memory (a tile, row order, checks)")
    if code == _lib.THAW_PAGES_BAD_CHUNK:
        raise ValueError(f"chunk_size must be a positive multiple of the item size {layout.itemsize}")
    _check_pages(blocks_len, pages_len, list(offsets), layout, scatter, code == _lib.THAW_PAGES_OVERLAP)
    raise ValueError(f"libthaw refused the page move (code {code})")


def _c_copy_with_crcs(src, out, chunk_size: int) -> array:
    """A copy is a gather of one page of one row."""
    import numpy

    n = len(_bytes_view(src))
    if n == 0:
        _num_chunks(0, chunk_size)
        return array("I")
    return _c_gather_pages(src, [0], PageLayout(1, numpy.zeros(1, numpy.int64), n, 1), out, chunk_size)


def _c_start_writeback(fd: int, offset: int, length: int) -> None:
    _lib.thaw_start_writeback(fd, offset, length)


def _py_start_writeback(fd: int, offset: int, length: int) -> None:
    """Nothing without libthaw: the save's fsync writes everything."""


def _c_prefault(buffer) -> int:
    buf = _c_buffer(buffer, True)
    return _lib.thaw_prefault(buf, len(buf))


def _py_prefault(buffer) -> int:
    """Nothing without libthaw: the stores fault the pages in."""
    return 0


# ---------------------------------------------------------------------------------------------------------
# Another process's bytes (remote_window): read by scatter_pages from there, in one pass.


class RemoteReadError(OSError):
    """Another process's bytes could not be read: `refused` when the system forbids it (a ptrace policy, a
    seccomp filter, another user's process: a caller may fall back to a copy the other process makes itself);
    otherwise the process or its bytes are gone."""

    REFUSED = "remote read refused"  # in the message of every refusal, so it survives a trip through an RPC

    def __init__(self, code: int, pid: int, address: int, nbytes: int, refusal: Optional[str] = None) -> None:
        self.refused = refusal is not None or code in (errno.EPERM, errno.EACCES, errno.ENOSYS)
        why = {errno.ESRCH: f"there is no process {pid}",
               errno.EFAULT: f"process {pid} does not map the {nbytes} bytes at {address:#x}"}.get(code)
        if refusal is not None:
            why = f"{self.REFUSED}: {refusal}"
        elif why is None:
            why = (f"{self.REFUSED}: process {pid} may not be read by this one ({os.strerror(code)})" if self.refused
                   else f"reading {nbytes} bytes at {address:#x} of process {pid} failed ({os.strerror(code)})")
        super().__init__(code, why)


class RemoteWindow(mmap.mmap):
    """The stand-in for `nbytes` at `address` in process `pid`: a mapping of that size with no access (a read
    of it faults), whose views scatter_pages recognises and reads from the other process."""

    pid: int
    address: int


def remote_window(pid: int, address: int, nbytes: int) -> memoryview:
    if _lib is None:  # the portable path cannot read another process: a refusal, as the system's would be
        raise RemoteReadError(errno.ENOSYS, pid, address, nbytes)
    window = RemoteWindow(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE, prot=0)  # address space only, never touched
    window.pid, window.address = pid, address
    return memoryview(window)[:nbytes]


def remote_readable(pid: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Raise RemoteReadError unless the first and last byte of each (address, nbytes) of process pid can be read."""
    if _lib is None:
        raise RemoteReadError(errno.ENOSYS, pid, 0, 0)
    addresses, lens = array("Q", [a for a, _ in ranges]), array("Q", [n for _, n in ranges])
    code = _lib.thaw_remote_readable(pid, _ffi.from_buffer("uint64_t[]", addresses),
                                     _ffi.from_buffer("uint64_t[]", lens), len(ranges))
    if code:
        bad = next(((a, n) for a, n in ranges if n and _lib.thaw_remote_readable(
            pid, _ffi.new("uint64_t[]", [a]), _ffi.new("uint64_t[]", [n]), 1)), ranges[0])
        raise RemoteReadError(code, pid, *bad)


def remote_token(pid: int, address: int, token: bytes) -> None:
    """Raise RemoteReadError, as a refusal, unless process pid holds `token` at `address`: whatever the reason
    (refused, no such process, another process under that pid, as in another pid namespace or after the pid's
    reuse), the bytes a caller was sent to read there are not the sender's to read from here."""
    try:
        found = bytes(fetched(remote_window(pid, address, len(token))))
    except RemoteReadError as error:
        if error.refused:
            raise
        found = None
    if found != token:
        raise RemoteReadError(errno.EPERM, pid, address, len(token),
                              f"process {pid} seen from here is not the sender (its token is not at {address:#x})")


def _remote_of(pages) -> Optional[tuple[int, int, int]]:
    """(pid, address, nbytes) of a view of a RemoteWindow, else None."""
    view = memoryview(pages)
    window = view.obj
    if not isinstance(window, RemoteWindow):
        return None
    offset = int(_ffi.cast("uintptr_t", _c_buffer(view))) - int(_ffi.cast("uintptr_t", _c_buffer(window)))
    return window.pid, window.address + offset, view.nbytes


def fetched(data):
    """`data`'s bytes in this process: itself, or for a view of a RemoteWindow a local copy read from its process
    (for a reader other than scatter_pages, e.g. an upload to a GPU)."""
    remote = _remote_of(data) if _lib is not None else None
    if remote is None:
        return data
    import numpy

    out = empty(remote[2])
    _c_scatter_pages_remote(remote, out, [0], PageLayout(1, numpy.zeros(1, numpy.int64), remote[2], 1))
    return out


def _scatter_pages(local):
    def scatter_pages(pages, blocks, block_offsets, layout: PageLayout) -> None:
        remote = _remote_of(pages) if _lib is not None else None
        if remote is None:
            return local(pages, blocks, block_offsets, layout)
        _c_scatter_pages_remote(remote, blocks, block_offsets, layout)

    return scatter_pages


# ---------------------------------------------------------------------------------------------------------
# The public functions: bound once to the active path.

# Whether scatter_pages_checked_batch's release flag unmaps pages (libthaw's madvise, Linux only).
RELEASES_PAGES = _lib is not None and sys.platform.startswith("linux")

if _lib is not None:
    crc32c, chunk_crcs = _c_crc32c, _c_chunk_crcs
    write_regions, read_regions, verify_regions = _c_write_regions, _c_read_regions, _c_verify_regions
    check_buffer = _c_check_buffer
    gather, scatter = _c_gather, _c_scatter
    gather_pages, scatter_pages, copy_with_crcs = _c_gather_pages, _scatter_pages(_c_scatter_pages), _c_copy_with_crcs
    gather_pages_to_file = _c_gather_pages_to_file
    scatter_pages_checked, scatter_pages_checked_batch = _c_scatter_pages_checked, _c_scatter_pages_checked_batch
    start_writeback = _c_start_writeback
    prefault = _c_prefault
else:
    crc32c, chunk_crcs = _py_crc32c, _py_chunk_crcs
    write_regions, read_regions, verify_regions = _py_write_regions, _py_read_regions, _py_verify_regions
    check_buffer = _py_check_buffer
    gather, scatter = _py_gather, _py_scatter
    gather_pages, scatter_pages, copy_with_crcs = _py_gather_pages, _py_scatter_pages, _py_copy_with_crcs
    gather_pages_to_file = _py_gather_pages_to_file
    scatter_pages_checked, scatter_pages_checked_batch = _py_scatter_pages_checked, _py_scatter_pages_checked_batch
    start_writeback = _py_start_writeback
    prefault = _py_prefault
