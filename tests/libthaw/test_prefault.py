"""prefault: new memory is faulted in by system calls before a caller writes it whole, memory already resident
is left alone, and what is read back is unchanged (zeros for new memory, the bytes written for touched memory)."""

import mmap
import resource
import sys

import numpy as np
import pytest

from thaw_format import mover

PAGE = mmap.PAGESIZE
SIZE = 8 << 20  # four 2 MiB pieces: the threaded path

linux = pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@linux
def test_new_memory_is_populated_and_stays_zero(native):
    memory = mmap.mmap(-1, SIZE)  # anonymous, page-aligned, untouched
    assert mover.prefault(memory) == SIZE
    view = np.frombuffer(memory, np.uint8)
    assert not view.any()  # populating changes no byte
    before = minor_faults()
    view[:] = 7  # every page is in place already: the stores take (almost) no fault
    assert minor_faults() - before < SIZE // PAGE // 8
    assert mover.prefault(memory) == 0  # resident now: left alone
    assert (view == 7).all()


@linux
def test_only_whole_pages_inside_the_buffer(native):
    memory = mmap.mmap(-1, SIZE)
    inner = memoryview(memory)[100 : SIZE - 100]  # starts and ends inside a page
    assert mover.prefault(inner) == SIZE - 2 * PAGE
    assert mover.prefault(memoryview(memory)[1 : PAGE - 1]) == 0  # no whole page


@linux
def test_touched_memory_is_left_alone(native):
    buffer = bytearray(b"\x05") * SIZE
    assert mover.prefault(buffer) == 0
    assert buffer.count(5) == SIZE


def test_portable_path_does_nothing():
    memory = mmap.mmap(-1, SIZE)
    assert mover._py_prefault(memory) == 0
