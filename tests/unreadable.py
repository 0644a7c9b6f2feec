"""A page of this process's memory another process cannot read, for tests in any directory (each has its own
conftest): a remote read (thaw_format.sdk.remote) of a range around it fails partway."""

import contextlib
import ctypes
import mmap
import os

import numpy as np


@contextlib.contextmanager
def unreadable_page(data: memoryview):
    """One page in the middle of `data` (this process's memory) made unreadable for the block, its first and last
    byte left readable: another process's read of it fails partway (EFAULT), and this process never touches it.
    Its protection is put back afterwards."""
    page = mmap.PAGESIZE
    start = np.frombuffer(data, np.uint8).ctypes.data
    address = (start + len(data) // 2) // page * page
    assert start < address and address + page < start + len(data)
    perms = next(line.split()[1] for line in open("/proc/self/maps")
                 if int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16))
    prot = (mmap.PROT_READ if "r" in perms else 0) | (mmap.PROT_WRITE if "w" in perms else 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(address, page, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        assert libc.mprotect(address, page, prot) == 0, os.strerror(ctypes.get_errno())
