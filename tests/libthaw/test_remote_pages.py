"""KV pages scattered straight from another process's memory (mover.remote_window, thaw_scatter_pages_remote):
a real child process holds the pages, this one reads them with process_vm_readv and writes the same bytes as
the local scatter of the same pages, in every layout kind (plain, strided, a transposed K in whole lines and in
tiles, more than one thread's unit). A bad pid, an address the child does not map, or a range crossing the end
of its address space raises RemoteReadError, with nothing written."""

import subprocess
import sys

import numpy as np
import pytest
from exited import exited_pid

from thaw_format import mover
from test_pages import DTYPES, engine, sequence_positions, vllm_positions

CHILD = """
import ctypes, sys, numpy as np
data = np.random.default_rng(int(sys.argv[1])).integers(0, 256, int(sys.argv[2]), dtype=np.uint8)
if sys.argv[3] == "hole":  # the 4 KiB page holding the middle byte made unreadable
    middle = (data.ctypes.data + data.size // 2) // 4096 * 4096
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(middle), 4096, 0) == 0
print(data.ctypes.data, flush=True)
sys.stdin.read()  # hold the pages until the parent is done
"""


def pages_bytes(seed, nbytes):
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


class Child:
    """A process holding pages_bytes(seed, nbytes) at `address`, until closed; with hole=True, the 4 KiB page
    that holds its middle byte unreadable."""

    def __init__(self, seed, nbytes, hole=False):
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, str(seed), str(nbytes), "hole" if hole else "whole"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid, self.address = self.process.pid, int(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture
def child():
    made = []

    def start(seed, nbytes, hole=False):
        made.append(Child(seed, nbytes, hole))
        return made[-1]

    yield start
    for c in made:
        c.close()


CASES = {
    "vllm-k-lines": (lambda: vllm_positions(32, 4, 64, "k"), 2 * 32 * 4 * 64, 4),  # 16-row streamed lines
    "vllm-k-tiles": (lambda: vllm_positions(24, 3, 80, "k"), 2 * 24 * 3 * 80, 4),  # 8-row tiles, unaligned rows
    "vllm-v": (lambda: vllm_positions(32, 4, 64, "v"), 2 * 32 * 4 * 64, 2),
    "row-spacing": (lambda: sequence_positions(16, 2, 64, 24), 2 * 64 * 24, 2),
    "plain": (lambda: np.arange(4096), 4096, 1),
}


@pytest.mark.parametrize("pages", [5, 300])  # 300 pages: several threads' units, cut inside pages
@pytest.mark.parametrize("case", CASES)
def test_remote_scatter_writes_what_the_local_scatter_writes(native, child, case, pages):
    make, block_elems, itemsize = CASES[case]
    positions = make()
    layout = mover.page_layout(positions, itemsize)
    n_blocks = pages + 3
    picks = np.random.default_rng(1).permutation(n_blocks)[:pages]
    offsets = [int(p) * block_elems * itemsize for p in picks]
    nbytes = pages * layout.page_bytes
    holder = child(7, nbytes)
    local, remote = engine(n_blocks, block_elems, itemsize), engine(n_blocks, block_elems, itemsize)
    mover.scatter_pages(pages_bytes(7, nbytes).view(DTYPES[itemsize]), local, offsets, layout)
    mover.scatter_pages(mover.remote_window(holder.pid, holder.address, nbytes), remote, offsets, layout)
    assert remote.tobytes() == local.tobytes()


def test_a_slice_of_a_window_reads_its_own_bytes(native, child):
    """A restore scatters runs of pages: a slice of the window reads from its own offset in the other process."""
    positions, block_elems = vllm_positions(32, 2, 64, "k"), 2 * 32 * 2 * 64
    layout = mover.page_layout(positions, 4)
    holder = child(3, 6 * layout.page_bytes)
    window = mover.remote_window(holder.pid, holder.address, 6 * layout.page_bytes)
    local, remote = engine(4, block_elems, 4), engine(4, block_elems, 4)
    span = slice(2 * layout.page_bytes, 5 * layout.page_bytes)
    offsets = [3 * block_elems * 4, 0, 2 * block_elems * 4]
    mover.scatter_pages(pages_bytes(3, 6 * layout.page_bytes)[span], local, offsets, layout)
    mover.scatter_pages(window[span], remote, offsets, layout)
    assert remote.tobytes() == local.tobytes()


def test_bad_sources_raise_and_write_nothing(native, child):
    layout = mover.page_layout(vllm_positions(32, 2, 64, "k"), 4)
    nbytes = 4 * layout.page_bytes
    holder = child(5, nbytes)
    offsets = [i * 2 * 32 * 2 * 64 * 4 for i in range(4)]
    blocks = engine(4, 2 * 32 * 2 * 64, 4)
    before = blocks.tobytes()
    with exited_pid() as gone:
        bad = {"no such process": (gone, holder.address, nbytes, "there is no process"),
               "unmapped address": (holder.pid, 4096, nbytes, "does not map"),
               "end of user space": (holder.pid, (1 << 47) - nbytes // 2, nbytes, "does not map")}
        for name, (pid, address, length, message) in bad.items():
            with pytest.raises(mover.RemoteReadError, match=message) as caught:
                mover.scatter_pages(mover.remote_window(pid, address, length), blocks, offsets, layout)
            assert not caught.value.refused, name
            assert blocks.tobytes() == before, name
    with pytest.raises(mover.RemoteReadError, match="does not map"):
        mover.remote_readable(holder.pid, [(holder.address, nbytes), (8, 16)])
    mover.remote_readable(holder.pid, [(holder.address, nbytes)])


def test_fetched_reads_a_window_into_a_copy_and_leaves_local_bytes_as_they_are(native, child):
    holder = child(9, 70000)
    window = mover.remote_window(holder.pid, holder.address, 70000)
    assert bytes(mover.fetched(window[1000:9000])) == pages_bytes(9, 70000)[1000:9000].tobytes()
    local = bytearray(b"abc")
    assert mover.fetched(local) is local


@pytest.mark.parametrize("case", ["plain", "vllm-v"])
def test_a_hole_in_the_middle_of_the_pages_raises(native, child, case):
    """The range is checked readable at its ends only: a page unreadable in between fails the read that reaches
    it (a short read up to it, then EFAULT), on whichever thread, and the call raises."""
    make, block_elems, itemsize = CASES[case]
    layout = mover.page_layout(make(), itemsize)
    pages = (8 << 20) // layout.page_bytes
    nbytes = pages * layout.page_bytes
    holder = child(13, nbytes, hole=True)
    offsets = [i * block_elems * itemsize for i in range(pages)]
    with pytest.raises(mover.RemoteReadError, match="does not map"):
        mover.scatter_pages(mover.remote_window(holder.pid, holder.address, nbytes), engine(pages, block_elems,
                            itemsize), offsets, layout)
