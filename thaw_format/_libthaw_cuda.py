"""libthaw's CUDA mover (libthaw/cuda), opened only where a GPU is present.

The shared object thaw_format/libthaw_cuda.so is built by `pip install` where nvcc exists and links the CUDA
runtime statically; it is opened with dlopen (cffi ABI mode) on first use, and only when an NVIDIA device
node exists, so CPU-only machines never load it. Device memory is passed as integer addresses (for a torch
tensor: `t.data_ptr()`), streams as integer handles (0 for the default stream).
"""

from __future__ import annotations

import os
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Tuple

import cffi

from . import mover

LIBRARY = Path(__file__).resolve().parent / "libthaw_cuda.so"

_CDEF = """
typedef struct { uint64_t offset; void *device; uint64_t len; uint64_t chunk_size; uint32_t *crcs; } thaw_cuda_region;
typedef struct { void *chunk_crcs; void *copy_chunk_crcs; void *read_regions; void *write_regions; } thaw_cuda_host_ops;
void thaw_cuda_set_host_ops(const thaw_cuda_host_ops *ops);
int thaw_cuda_device_count(void);
const char *thaw_cuda_last_error(void);
int thaw_cuda_gather_to_host(const void *device_src, const int64_t *offsets, size_t n, size_t length,
                             void *host_out, void *stream);
int thaw_cuda_scatter_from_host(const void *host_src, void *device_out, const int64_t *offsets, size_t n,
                                size_t length, void *stream);
int thaw_cuda_write_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                            void *stream);
int thaw_cuda_read_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                           void *stream, int64_t *bad_region, int64_t *bad_chunk);
int thaw_cuda_write_host(void *host, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                         void *stream);
int thaw_cuda_read_host(const void *host, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                        void *stream, int64_t *bad_region, int64_t *bad_chunk);
int thaw_cuda_register_host(void *host, size_t len);
int thaw_cuda_unregister_host(void *host);
"""

SLOT_BYTES = 16 << 20
SLOTS = 4

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_opened: Optional[object] = None


def unavailable_reason(library: Path = LIBRARY) -> Optional[str]:
    """Why the CUDA mover cannot be used here, or None when it can."""
    if mover._lib is None:
        return "libthaw (the CPU library it checksums with) is not built"
    if not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU here (/dev/nvidiactl is absent)"
    if not library.exists():
        return f"{library.name} was not built (no nvcc at install time)"
    return None


def open_library(library: Path = LIBRARY):
    """The CUDA mover's library; raises RuntimeError naming why it is unavailable."""
    global _opened
    if _opened is None:
        reason = unavailable_reason(library)
        if reason:
            raise RuntimeError(f"libthaw CUDA mover unavailable: {reason}")
        lib = _ffi.dlopen(str(library))
        if lib.thaw_cuda_device_count() < 1:
            raise RuntimeError("libthaw CUDA mover unavailable: the CUDA runtime sees no device")
        # The ring's host side runs on libthaw's thread pool: its routines are handed over by address.
        lib.thaw_cuda_set_host_ops(_ffi.new("thaw_cuda_host_ops *", [_address(name) for name in (
            "thaw_chunk_crcs", "thaw_copy_chunk_crcs", "thaw_read_regions", "thaw_write_regions")]))
        _opened = lib
    return _opened


def _address(name: str):
    """A function of the CPU library (libthaw), as a pointer the CUDA library can call."""
    return _ffi.cast("void *", int(mover._ffi.cast("uintptr_t", mover._ffi.addressof(mover._lib, name))))


def _check(lib, code: int) -> int:
    if code == 2:
        raise RuntimeError(f"libthaw CUDA mover: {_ffi.string(lib.thaw_cuda_last_error()).decode()}")
    return code


def _offsets(offsets):
    return _ffi.from_buffer("int64_t[]", array("q", offsets))


def gather_to_host(device_src: int, offsets: Sequence[int], length: int, out, stream: int = 0) -> None:
    """Copy slabs device_src + offsets[i] (length bytes each) into the host buffer `out`, in order."""
    lib = open_library()
    host = _ffi.from_buffer(out, require_writable=True)
    if len(host) < len(offsets) * length:
        raise ValueError(f"out holds {len(host)} bytes, {len(offsets)} slabs need {len(offsets) * length}")
    _check(lib, lib.thaw_cuda_gather_to_host(_ffi.cast("void *", device_src), _offsets(offsets), len(offsets),
                                             length, host, _ffi.cast("void *", stream)))


def scatter_from_host(src, device_out: int, offsets: Sequence[int], length: int, stream: int = 0) -> None:
    """Copy slab i of the host buffer `src` to device_out + offsets[i]."""
    lib = open_library()
    host = _ffi.from_buffer(src)
    if len(host) < len(offsets) * length:
        raise ValueError(f"src holds {len(host)} bytes, {len(offsets)} slabs need {len(offsets) * length}")
    _check(lib, lib.thaw_cuda_scatter_from_host(host, _ffi.cast("void *", device_out), _offsets(offsets),
                                                len(offsets), length, _ffi.cast("void *", stream)))


def _regions(regions, crcs):
    return _ffi.new("thaw_cuda_region[]", [
        (offset, _ffi.cast("void *", device), length, chunk_size, _ffi.from_buffer("uint32_t[]", k))
        for (offset, device, length, chunk_size, *_), k in zip(regions, crcs)])


def stage_plan(lengths: Sequence[int], chunk_sizes: Sequence[int], slot_bytes: int = SLOT_BYTES,
               slots: int = SLOTS) -> list:
    """The ring's plan (libthaw's thaw_stage_plan, in the CPU library): [(region, start, length, slot)] in the
    order the pieces move. Needs no GPU."""
    if mover._lib is None:
        raise RuntimeError("libthaw is not built: the staging plan lives in it")
    ffi, lib = mover._ffi, mover._lib
    lens, chunks = ffi.new("uint64_t[]", list(lengths)), ffi.new("uint64_t[]", list(chunk_sizes))
    count = lib.thaw_stage_plan(lens, chunks, len(lengths), slot_bytes, slots, ffi.NULL, 0)
    if count < 0:
        raise ValueError("a chunk size or slot_bytes is 0")
    out = ffi.new("thaw_stage_piece[]", max(count, 1))
    lib.thaw_stage_plan(lens, chunks, len(lengths), slot_bytes, slots, out, count)
    return [(p.region, p.start, p.len, p.slot) for p in out[0:count]]


def _endpoint(target, regions, writable: bool):
    """(function suffix, first argument) for a file descriptor or a host buffer, which must hold every region
    (the C side is given no length: a region past the buffer would be copied past it)."""
    if isinstance(target, int):
        return "regions", target
    host = _ffi.from_buffer(target, require_writable=writable)
    for i, (offset, _, length, *_) in enumerate(regions):
        if offset < 0 or length < 0 or offset + length > len(host):
            raise ValueError(f"region {i} (offset {offset}, {length} bytes) runs past the {len(host)}-byte host buffer")
    return "host", host


def write_regions(target, regions: Sequence[Tuple[int, int, int, int]], stream: int = 0) -> list:
    """Write (offset, device address, length, chunk size) regions to `target`, a file descriptor or a writable
    host buffer (offsets index into it); returns each region's chunk CRCs."""
    kind, first = _endpoint(target, regions, True)
    lib = open_library()
    crcs = [array("I", bytes(4 * -(-length // chunk))) for _, _, length, chunk in regions]
    _check(lib, getattr(lib, f"thaw_cuda_write_{kind}")(first, _regions(regions, crcs), len(regions), SLOT_BYTES,
                                                          SLOTS, _ffi.cast("void *", stream)))
    return crcs


def read_regions(source, regions: Sequence[Tuple[int, int, int, int, Sequence[int]]], stream: int = 0):
    """Fill (offset, device address, length, chunk size, expected CRCs) regions from `source`, a file
    descriptor or a host buffer, every chunk checked on the host before its copy to the device; returns the
    first bad (region, chunk) or None."""
    kind, first = _endpoint(source, regions, False)
    lib = open_library()
    crcs = [mover._expected_crcs(r[4], r[2], r[3], i) for i, r in enumerate(regions)]
    bad = _ffi.new("int64_t[2]")
    code = _check(lib, getattr(lib, f"thaw_cuda_read_{kind}")(first, _regions(regions, crcs), len(regions),
                                                                SLOT_BYTES, SLOTS, _ffi.cast("void *", stream),
                                                                bad, bad + 1))
    return (bad[0], bad[1]) if code == 1 else None


@contextmanager
def pinned(buffer):
    """Pin `buffer` (host memory) with the driver for the block: read_regions and write_regions on it then copy
    straight from and into it, each chunk checked in place, with no staging through the ring's slots (restore
    0.91 of torch's pinned copy on an H200, 0.65 staged). Pinning every page costs about three copies of the
    bytes, so it pays for bytes moved several times: a snapshot restored into many engines. A chunk is checked
    where it lies and copied after: nothing may write the buffer during a call on it."""
    lib = open_library()
    host = _ffi.from_buffer(buffer)
    if not len(host):
        raise ValueError("pinned: the buffer is empty")
    _check(lib, lib.thaw_cuda_register_host(host, len(host)))
    try:
        yield buffer
    finally:
        _check(lib, lib.thaw_cuda_unregister_host(host))
