"""check_buffer, native and portable: regions of a buffer already in memory (a mapped file) checked in place
against a flat CRC table, the first bad chunk in file order reported, and regions outside the buffer or
past the CRC table refused before any byte is read."""

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
@pytest.mark.parametrize("bad", [(-1, 10, 4096, 0), (0, 10**6, 4096, 0), (0, 10, 0, 0), (0, 10, 4096, 1),
                                 (0, 10, 4096, -1), (2**63, 1, 1, 0), (0, 8, 2**63 - 1, 1)])
def test_regions_outside_the_buffer_or_the_crcs_are_refused(native, path, bad):
    data = bytes(4096)
    with pytest.raises(ValueError):
        PATHS[path](data, [bad], array("I", [0]))
