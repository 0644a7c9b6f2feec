"""Region I/O, native and portable: identical files and CRCs from writes, verified reads that report the
first corrupt chunk with its index and never leave that chunk's bytes in the target, bounded verifies,
short files, progress, and O_DIRECT with its fallback."""

import os
import random
import subprocess
from array import array

import pytest

from thaw_format import mover

PATHS = {
    "native": (mover._c_write_regions, mover._c_read_regions, mover._c_verify_regions),
    "portable": (mover._py_write_regions, mover._py_read_regions, mover._py_verify_regions),
}
SENTINEL = 0xA5


def layout(sizes, chunk_size, align=4096, start=4096):
    """(offset, data, chunk_size) regions laid out like a snapshot: each region starts on an aligned offset."""
    rng = random.Random(len(sizes) * 7 + chunk_size)
    regions, offset = [], start
    for size in sizes:
        regions.append((offset, rng.randbytes(size), chunk_size))
        offset = -(-(offset + size) // align) * align
    return regions


CASES = {
    "big": layout([3 * (1 << 20) + 5, 1 << 20, 10], 1 << 20),
    "small-chunks": layout([700_000, 12_345, 0, 65_536 * 3], 4096),
    "many-small": layout([random.Random(i).randrange(0, 9000) for i in range(600)], 4096),
    "packed": layout([random.Random(i).randrange(1, 3000) for i in range(300)], 4096, align=1, start=0),
    # Writes cut large regions at 2 MiB file offsets, not at chunks: chunks wider than a piece, and many per piece.
    "wide-chunks": layout([7 * (1 << 20) + 3, 5 << 20], 3 * (1 << 20) + 1),
    "fine-chunks": layout([5 * (1 << 20) + 77], 4096, start=12288),
    # Thousands of tiny regions in one 2 MiB span (more than one pwritev's iovecs), spans ending inside padding.
    "tiny-packed": layout([random.Random(i).randrange(1, 100) for i in range(3000)], 4096, align=1000, start=0),
}


def write_file(path, regions, write):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return write(fd, regions)
    finally:
        os.close(fd)


def read_back(path, regions, read, **kwargs):
    targets = [bytearray([SENTINEL]) * len(data) for _, data, _ in regions]
    fd = os.open(path, os.O_RDONLY)
    try:
        bad = read(fd, [(off, t, c, mover.chunk_crcs(d, c)) for (off, d, c), t in zip(regions, targets)], **kwargs)
    finally:
        os.close(fd)
    return bad, targets


def verify(path, regions, verify_fn, expected=None, **kwargs):
    fd = os.open(path, os.O_RDONLY)
    try:
        specs = [(off, len(d), c, mover.chunk_crcs(d, c)) for off, d, c in regions]
        return verify_fn(fd, specs, **kwargs)
    finally:
        os.close(fd)


@pytest.mark.parametrize("case", CASES)
def test_native_and_portable_write_identical_files(native, tmp_path, case):
    regions = CASES[case]
    crcs = {name: write_file(tmp_path / name, regions, fns[0]) for name, fns in PATHS.items()}
    assert crcs["native"] == crcs["portable"] == [mover._py_chunk_crcs(d, c) for _, d, c in regions]
    assert (tmp_path / "native").read_bytes() == (tmp_path / "portable").read_bytes()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_read_and_verify_round_trip(native, tmp_path, case, path):
    regions = CASES[case]
    write, read, verify_fn = PATHS[path]
    write_file(tmp_path / "f", regions, write)
    bad, targets = read_back(tmp_path / "f", regions, read)
    assert bad is None
    assert all(bytes(t) == d for t, (_, d, _) in zip(targets, regions))
    assert verify(tmp_path / "f", regions, verify_fn) is None


def corrupt(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["big", "small-chunks", "many-small"])
def test_corrupt_chunk_is_reported_and_never_reaches_the_target(native, tmp_path, case, path):
    regions = CASES[case]
    write, read, verify_fn = PATHS[path]
    write_file(tmp_path / "f", regions, write)
    nonempty = [i for i, (_, d, _) in enumerate(regions) if len(d) > 2]
    rng = random.Random(case)
    for region in (nonempty[len(nonempty) // 2], nonempty[-1]):
        offset, data, chunk_size = regions[region]
        chunk = rng.randrange(-(-len(data) // chunk_size))
        at = chunk * chunk_size + rng.randrange(min(chunk_size, len(data) - chunk * chunk_size))
        corrupt(tmp_path / "f", offset + at)
        bad, targets = read_back(tmp_path / "f", regions, read)
        assert bad == (region, chunk)
        start, end = chunk * chunk_size, min((chunk + 1) * chunk_size, len(data))
        assert targets[region][start:end] == bytearray([SENTINEL]) * (end - start)
        assert verify(tmp_path / "f", regions, verify_fn) == (region, chunk)
        corrupt(tmp_path / "f", offset + at)  # repair for the next round


def test_first_bad_chunk_in_file_order_wins(native, tmp_path):
    regions = CASES["small-chunks"]
    write_file(tmp_path / "f", regions, mover._c_write_regions)
    corrupt(tmp_path / "f", regions[0][0] + 3 * 4096 + 1)
    corrupt(tmp_path / "f", regions[0][0] + 150 * 4096)
    corrupt(tmp_path / "f", regions[3][0] + 5)
    for read in (mover._c_read_regions, mover._py_read_regions):
        assert read_back(tmp_path / "f", regions, read)[0] == (0, 3)


@pytest.mark.parametrize("path", PATHS)
def test_short_file_raises_eof(native, tmp_path, path):
    regions = CASES["big"]
    write, read, _ = PATHS[path]
    write_file(tmp_path / "f", regions, write)
    os.truncate(tmp_path / "f", regions[-1][0] + 3)
    with pytest.raises(EOFError):
        read_back(tmp_path / "f", regions, read)


def test_expected_crc_count_is_checked_before_reading(native, tmp_path):
    (tmp_path / "f").write_bytes(bytes(10_000))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        for read in (mover._c_read_regions, mover._py_read_regions):
            with pytest.raises(ValueError, match="expected CRCs"):
                read(fd, [(0, bytearray(10_000), 4096, array("I", [0, 0]))])
    finally:
        os.close(fd)


@pytest.mark.parametrize("path", PATHS)
def test_progress_counts_every_byte(native, tmp_path, path, monkeypatch):
    monkeypatch.setattr(mover, "_PROGRESS_BYTES", 1 << 20)
    regions = CASES["big"] + CASES["many-small"][:50]
    regions = layout([len(d) for _, d, _ in regions], 4096)
    write, read, verify_fn = PATHS[path]
    total = sum(len(d) for _, d, _ in regions)
    seen = []
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        write(fd, regions, seen.append)
    finally:
        os.close(fd)
    assert sum(seen) == total and len(seen) > 1
    seen.clear()
    assert read_back(tmp_path / "f", regions, read, progress=seen.append)[0] is None
    assert sum(seen) == total
    seen.clear()
    assert verify(tmp_path / "f", regions, verify_fn, progress=seen.append) is None
    assert sum(seen) == total


def direct_status(native, path, regions, verify_only=False):
    """Run the C read (or verify) with THAW_DIRECT; return (code, status.direct, targets)."""
    ffi, lib = native
    targets = [bytearray(len(d)) for _, d, _ in regions]
    crcs = [mover.chunk_crcs(d, c) for _, d, c in regions]
    specs = [(off, ffi.NULL if verify_only else ffi.from_buffer(t), len(d), c, ffi.from_buffer("uint32_t[]", k))
             for (off, d, c), t, k in zip(regions, targets, crcs)]
    status = ffi.new("thaw_io_status *")
    fd = os.open(path, os.O_RDONLY)
    try:
        call = lib.thaw_verify_regions if verify_only else lib.thaw_read_regions
        code = call(fd, ffi.new("thaw_region[]", specs), len(specs), lib.THAW_DIRECT, status)
    finally:
        os.close(fd)
    return code, status.direct, targets


@pytest.mark.parametrize("case", ["big", "many-small", "packed"])
def test_direct_reads_on_a_filesystem_that_allows_them(native, tmp_path, case):
    regions = CASES[case]
    write_file(tmp_path / "f", regions, mover._c_write_regions)
    code, direct, targets = direct_status(native, tmp_path / "f", regions)
    assert code == 0 and direct == 1
    assert all(bytes(t) == d for t, (_, d, _) in zip(targets, regions))
    assert direct_status(native, tmp_path / "f", regions, verify_only=True)[:2] == (0, 1)
    bad, targets = read_back(tmp_path / "f", regions, mover.read_regions, direct=True)
    assert bad is None and all(bytes(t) == d for t, (_, d, _) in zip(targets, regions))


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs mount (no O_DIRECT support), or a skip where this process may not mount."""
    where = tmp_path / "ramfs"
    where.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a ramfs here (needs root) to get a filesystem that refuses O_DIRECT")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_direct_falls_back_where_the_filesystem_refuses(native, ramfs):
    regions = CASES["big"]
    write_file(ramfs / "f", regions, mover._c_write_regions)
    code, direct, targets = direct_status(native, ramfs / "f", regions)
    assert code == 0 and direct == 0
    assert all(bytes(t) == d for t, (_, d, _) in zip(targets, regions))


def test_small_gaps_are_written_as_zeros_and_larger_ones_left_alone(native, tmp_path):
    regions = [(100, b"a" * 50, 4096), (150, b"b" * 10, 4096), (1000, b"c" * 30, 4096), (9000, b"d" * 5, 4096)]
    files = {}
    for name, (write, _, _) in PATHS.items():
        (tmp_path / name).write_bytes(b"\xff" * 10_000)
        fd = os.open(tmp_path / name, os.O_RDWR)
        try:
            write(fd, regions)
        finally:
            os.close(fd)
        files[name] = (tmp_path / name).read_bytes()
    assert files["native"] == files["portable"]
    data = files["native"]
    assert data[:100] == b"\xff" * 100 and data[160:1000] == bytes(840) and data[1030:9000] == b"\xff" * 7970


# One region of 1 MiB in chunks of 4 KiB (a tensor far larger than a progress step), and a small one after it.
ONE_BIG = layout([1 << 20, 5000], 4096)


@pytest.mark.parametrize("path", PATHS)
def test_progress_advances_within_one_large_region(native, tmp_path, path, monkeypatch):
    """Progress was reported per region: a file of one 4 GiB tensor showed nothing until its end. With steps of
    64 KiB (whole chunks), writes, reads and verifies report that region in pieces, bytes and CRCs unchanged."""
    monkeypatch.setattr(mover, "_PROGRESS_BYTES", 64 << 10)
    monkeypatch.setattr(mover, "_PROGRESS_PIECE_BYTES", 64 << 10)
    monkeypatch.setattr(mover, "_STAGE_BYTES", 64 << 10)  # the portable read's stage, which also sets its steps
    write, read, verify_fn = PATHS[path]
    total = sum(len(d) for _, d, _ in ONE_BIG)
    for name, run in {
        "write": lambda sink: write_file(tmp_path / "f", ONE_BIG, lambda fd, r: write(fd, r, sink)),
        "read": lambda sink: read_back(tmp_path / "f", ONE_BIG, read, progress=sink)[0],
        "verify": lambda sink: verify(tmp_path / "f", ONE_BIG, verify_fn, progress=sink),
    }.items():
        calls = []
        result = run(calls.append)
        assert sum(calls) == total and max(calls) <= 64 << 10 and len(calls) >= (1 << 20) // (64 << 10), name
        assert result == ([mover._py_chunk_crcs(d, c) for _, d, c in ONE_BIG] if name == "write" else None), name


@pytest.mark.parametrize("path", PATHS)
def test_a_bad_chunk_in_a_later_piece_is_named_by_its_region_and_chunk(native, tmp_path, path, monkeypatch):
    """The pieces a progress hook cuts a region into report a bad chunk as the region's own chunk index."""
    monkeypatch.setattr(mover, "_PROGRESS_BYTES", 64 << 10)
    monkeypatch.setattr(mover, "_PROGRESS_PIECE_BYTES", 64 << 10)
    write, read, verify_fn = PATHS[path]
    write_file(tmp_path / "f", ONE_BIG, write)
    with open(tmp_path / "f", "r+b") as f:
        f.seek(ONE_BIG[0][0] + 200 * 4096 + 7)  # chunk 200 of region 0, in its 13th piece of 16 chunks
        f.write(b"\xff")
    assert read_back(tmp_path / "f", ONE_BIG, read, progress=lambda n: None)[0] == (0, 200)
    assert verify(tmp_path / "f", ONE_BIG, verify_fn, progress=lambda n: None) == (0, 200)
