"""check_buffer, native and portable: regions of a buffer already in memory (a mapped file) checked in place
against a flat CRC table, the first bad chunk in file order reported, and regions outside the buffer or
past the CRC table refused before any byte is read; with zero_gaps the padding between regions checked in
the same pass; and on the native path, a file truncated under its mapping reported instead of a SIGBUS."""

import signal
import subprocess
import sys
from array import array

import pytest
from test_regions import CASES

from thaw_format import mover

PATHS = {"native": mover._c_check_buffer, "portable": mover._py_check_buffer}


def image(regions):
    """The file's bytes (gaps zero), its (offset, length, chunk_size, first_crc) table and its flat CRCs."""
    end = max((off + len(d) for off, d, _ in regions), default=0)
    data, table, crcs = bytearray(end), [], array("I")
    for off, d, c in regions:
        data[off : off + len(d)] = d
        table.append((off, len(d), c, len(crcs)))
        crcs.extend(mover.chunk_crcs(d, c))
    return data, table, crcs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_clean_buffer_passes_and_every_region_is_reported_in_progress(native, path, case):
    data, table, crcs = image(CASES[case])
    seen = []
    assert PATHS[path](data, table, crcs, seen.append) is None
    assert sum(seen) == sum(length for _, length, _, _ in table)
    assert PATHS[path](bytes(data), table, list(crcs)) is None  # any buffer, any CRC sequence


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["big", "small-chunks", "many-small"])
def test_first_bad_chunk_in_file_order_is_reported(native, path, case):
    data, table, crcs = image(CASES[case])
    hits = [(i, (len(d) - 1) // c) for i, (_, d, c) in enumerate(CASES[case]) if d][-3:]
    for region, chunk in reversed(hits):  # damage the later ones first: the earliest must still win
        off, _, c, _ = table[region]
        data[off + chunk * c] ^= 0x40
    assert PATHS[path](data, table, crcs) == hits[0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pieces", [(2, 31), (15, 16), (16, 17), (0, 16), (31,)])
def test_the_first_bad_chunk_wins_whichever_threads_share_holds_it(native, path, pieces):
    """The native check gives each thread a contiguous share of the pieces (here 32 pieces of 256 KiB, 64 KiB
    chunks); a bad chunk late in one share must not hide an earlier one, at either side of a share's edge."""
    data, table, crcs = image([(0, bytes(range(256)) * (32 << 12), 1 << 16)])
    for piece in reversed(pieces):
        data[piece * (256 << 10) + 5] ^= 1
    assert PATHS[path](data, table, crcs) == (0, pieces[0] * 4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [(-1, 10, 4096, 0), (0, 10**6, 4096, 0), (0, 10, 0, 0), (0, 10, 4096, 1),
                                 (0, 10, 4096, -1), (2**63, 1, 1, 0), (0, 8, 2**63 - 1, 1)])
def test_regions_outside_the_buffer_or_the_crcs_are_refused(native, path, bad):
    data = bytes(4096)
    with pytest.raises(ValueError):
        PATHS[path](data, [bad], array("I", [0]))


def gaps_of(table):
    """(start, end) of every non-empty gap between consecutive regions."""
    return [(a[0] + a[1], b[0]) for a, b in zip(table, table[1:]) if b[0] > a[0] + a[1]]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["big", "small-chunks", "many-small"])
def test_zero_gaps_pass_and_a_non_zero_gap_is_named_by_the_region_after_it(native, path, case):
    data, table, crcs = image(CASES[case])
    assert PATHS[path](data, table, crcs, zero_gaps=True) is None
    gaps = gaps_of(table)
    start, end = gaps[len(gaps) // 2]
    after = next(i for i, row in enumerate(table) if row[0] == end)
    data[end - 1] = 1
    assert PATHS[path](data, table, crcs) is None  # gaps are not looked at unless asked
    assert PATHS[path](data, table, crcs, zero_gaps=True) == (after, -1)
    last_off, last_len, c, _ = table[-1]  # a bad chunk later in the file does not hide the earlier gap
    if last_len:
        data[last_off] ^= 1
        assert PATHS[path](data, table, crcs, zero_gaps=True) == (after, -1)


@pytest.mark.parametrize("path", PATHS)
def test_a_bad_chunk_before_a_bad_gap_is_reported_first(native, path):
    data, table, crcs = image(CASES["many-small"])
    first = next(i for i, row in enumerate(table) if row[1])
    data[table[first][0]] ^= 1
    start, end = gaps_of(table)[-1]
    data[start] = 9
    assert PATHS[path](data, table, crcs, zero_gaps=True) == (first, 0)


@pytest.mark.parametrize("path", PATHS)
def test_zero_gaps_needs_regions_in_order(native, path):
    data, table, crcs = image(CASES["small-chunks"])
    swapped = [table[1], table[0]] + table[2:]
    assert PATHS[path](data, swapped, crcs) is None  # order is free without the gap check
    with pytest.raises(ValueError, match="in order"):
        PATHS[path](data, swapped, crcs, zero_gaps=True)


@pytest.mark.parametrize("path", PATHS)
def test_gaps_between_progress_batches_are_checked(native, path, monkeypatch):
    monkeypatch.setattr(mover, "_PROGRESS_BYTES", 3000)  # many batches
    data, table, crcs = image(CASES["many-small"])
    seen = []
    assert PATHS[path](data, table, crcs, seen.append, zero_gaps=True) is None
    assert len(seen) > 10
    for start, end in gaps_of(table)[::50]:
        after = next(i for i, row in enumerate(table) if row[0] == end)
        data[start] = 3
        assert PATHS[path](data, table, crcs, seen.append, zero_gaps=True) == (after, -1)
        data[start] = 0


def test_a_mapping_cut_short_under_the_check_raises_eoferror(native, tmp_path):
    """SIGBUS guard: the file is truncated while mapped; the check reports it instead of the process dying.
    In a child process, so that a regression fails this test rather than killing the test run."""
    script = f"""
import mmap, os
from thaw_format import mover
data = os.urandom(3 << 20)
path = {str(tmp_path / "f")!r}
with open(path, "wb") as f:
    f.write(data)
fd = os.open(path, os.O_RDONLY)
m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
crcs = mover.chunk_crcs(data, 4096)
os.truncate(path, 1 << 20)
try:
    mover.check_buffer(m, [(0, len(data), 4096, 0)], crcs)
except EOFError as exc:
    print("EOFError:", exc)
assert mover.check_buffer(m, [(0, 1 << 20, 4096, 0)], crcs) is None  # the pages still there read as before
print("alive")
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert "EOFError:" in child.stdout and "SIGBUS" in child.stdout and "alive" in child.stdout, child.stdout


def test_a_sigbus_outside_the_guard_still_ends_the_process(native, tmp_path):
    """The guard catches only its own reads: a fault elsewhere reaches the handler from before libthaw's, here
    the default one, and the process dies of SIGBUS as it would have without libthaw."""
    script = f"""
import mmap, os
from thaw_format import mover
path = {str(tmp_path / "g")!r}
with open(path, "wb") as f:
    f.write(bytes(8192))
m = mmap.mmap(os.open(path, os.O_RDONLY), 0, access=mmap.ACCESS_READ)
mover.check_buffer(m, [(0, 4096, 4096, 0)], mover.chunk_crcs(bytes(4096), 4096))  # installs the guard
os.truncate(path, 0)
m[5000]
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGBUS, (child.returncode, child.stderr)


@pytest.mark.parametrize("path", PATHS)
def test_progress_advances_within_one_large_region(native, path, monkeypatch):
    """A mapped load's check reported per region (one 4 GiB tensor: nothing until the end); in 64 KiB steps now,
    and a bad chunk in a later step is still named by its region's own chunk index."""
    monkeypatch.setattr(mover, "_PROGRESS_BYTES", 64 << 10)
    monkeypatch.setattr(mover, "_PROGRESS_PIECE_BYTES", 64 << 10)
    data, table, crcs = image([(4096, bytes(range(256)) * 4096, 4096), ((1 << 20) + 8192, b"x" * 5000, 4096)])
    calls = []
    assert PATHS[path](data, table, crcs, calls.append, zero_gaps=True) is None
    assert sum(calls) == (1 << 20) + 5000 and max(calls) <= 64 << 10 and len(calls) >= 16
    data[4096 + 200 * 4096 + 7] ^= 0xFF  # chunk 200 of region 0
    assert PATHS[path](data, table, crcs, calls.append, zero_gaps=True) == (0, 200)
    data[4096 + 200 * 4096 + 7] ^= 0xFF
    data[(1 << 20) + 4096 + 10] = 1  # the gap before region 1
    assert PATHS[path](data, table, crcs, calls.append, zero_gaps=True) == (1, -1)
