"""CRC32C: the known answer, every compiled kernel against the software one and against the crc32c and
google-crc32c packages on every size and alignment around the kernels' block boundaries, combine, and the
chunked and parallel forms."""

import random

import crc32c as crc32c_package
import pytest

from conftest import available_kernels
from thaw_format import mover

KERNELS = available_kernels()
# Sizes around every block boundary of every kernel (16, 32, 64, 128, 256, 512 bytes, the 3-way blocks of
# 256 B and 8 KiB, the hybrid blocks of 1984 B and 31744 B) plus random ones up to 1 MiB.
BOUNDARIES = [16, 32, 64, 128, 248, 256, 512, 768, 1024, 1984, 3 * 256, 3 * 8192, 31744, 2 * 31744 + 1984]
SIZES = sorted({max(0, b + d) for b in BOUNDARIES for d in (-9, -8, -1, 0, 1, 7, 8, 15, 16, 17)}
               | set(range(0, 80)) | {random.Random(s).randrange(1 << 20) for s in range(40)})


def random_bytes(n, seed):
    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="module")
def blob():
    return random_bytes((1 << 20) + 128, 1)


def test_known_answer_of_every_path(select_kernel):
    assert mover._py_crc32c(b"123456789") == 0xE3069283
    for name in KERNELS:
        select_kernel(name)
        assert mover._c_crc32c(b"123456789") == 0xE3069283, name


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_equals_software_at_every_size_and_alignment(kernel, select_kernel, native, blob):
    ffi, lib = native
    view = memoryview(blob)
    cases = [(size, align, seed) for seed, size in enumerate(SIZES) for align in (0, 1, 3, 7, 8, 13, 31, 63)]
    select_kernel("software")
    expected = [lib.thaw_crc32c(seed, ffi.from_buffer(view[align : align + size]), size) for size, align, seed in cases]
    select_kernel(kernel)
    got = [lib.thaw_crc32c(seed, ffi.from_buffer(view[align : align + size]), size) for size, align, seed in cases]
    assert got == expected


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_equals_the_packages(kernel, select_kernel, blob):
    google_crc32c = pytest.importorskip("google_crc32c")
    select_kernel(kernel)
    for seed in range(60):
        rng = random.Random(seed)
        start = rng.randrange(64)
        data = blob[start : start + rng.randrange(len(blob) - 64)]
        assert mover._c_crc32c(data) == crc32c_package.crc32c(data) == google_crc32c.value(data)


def test_continuation_and_combine(native, blob):
    _, lib = native
    for split in (0, 1, 100, 4096, 500_000, len(blob)):
        a, b = blob[:split], blob[split:]
        assert mover.crc32c(b, mover.crc32c(a)) == mover.crc32c(blob)
        assert lib.thaw_crc32c_combine(mover.crc32c(a), mover.crc32c(b), len(b)) == mover.crc32c(blob)


def test_parallel_crc_of_large_buffers_matches(native):
    data = random_bytes((24 << 20) + 4321, 2)  # past the 4 MiB threshold, uneven split
    assert mover.crc32c(data) == crc32c_package.crc32c(data)
    assert mover.crc32c(data, 0x1234) == crc32c_package.crc32c(data, 0x1234)


@pytest.mark.parametrize("chunk_size", [4096, 65536, 1 << 20])
def test_chunk_crcs_native_equals_portable(native, chunk_size):
    for size in (0, 1, chunk_size - 1, chunk_size, chunk_size + 1, 6 * chunk_size + 99):
        data = random_bytes(size, size)
        assert mover._c_chunk_crcs(data, chunk_size) == mover._py_chunk_crcs(data, chunk_size)


@pytest.mark.parametrize("chunk_size", [4096, 200_000, 1 << 20, 3 << 20])
def test_copy_chunk_crcs_copies_and_checksums_the_copy(native, chunk_size):
    """libthaw_cuda's ring fills and empties its slots with this: the copy is exact and each chunk's CRC is the
    copy's (blocks of 128 KiB continue one CRC across a chunk), on one thread and on the pool (>= 4 MiB)."""
    ffi, lib = native
    for size in (0, 1, chunk_size - 1, chunk_size + 1, (9 << 20) + 77):
        data = random_bytes(size, size + 1)
        out = bytearray(size + 3)  # bytes past the copy stay untouched
        crcs = ffi.new("uint32_t[]", max(1, -(-size // chunk_size)))
        lib.thaw_copy_chunk_crcs(ffi.from_buffer(out), ffi.from_buffer(data), size, chunk_size, crcs)
        assert bytes(out[:size]) == data and out[size:] == b"\0\0\0"
        assert list(crcs)[: -(-size // chunk_size)] == list(mover._py_chunk_crcs(data, chunk_size))


def test_every_buffer_kind(native):
    np = pytest.importorskip("numpy")
    data = random_bytes(10_000, 3)
    expected = crc32c_package.crc32c(data)
    kinds = [data, bytearray(data), memoryview(data), np.frombuffer(data, dtype=np.float32).reshape(50, 50)]
    assert all(mover.crc32c(k) == expected for k in kinds)


def test_backend_names_the_kernel(native):
    assert mover.backend().startswith("libthaw 0.1 (crc32c: ")
    assert any(name in mover.backend() for name in KERNELS)
