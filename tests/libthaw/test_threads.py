"""The thread pool: created once and never grown by calls, safe under concurrent callers (the GIL is
released, so Python threads really overlap), and usable again in a child made by fork()."""

import multiprocessing
import os
import sys
import threading
import time

import crc32c as crc32c_package

from thaw_format import mover

DATA = os.urandom(16 << 20)


def thread_count():
    return len(os.listdir("/proc/self/task"))


def test_pool_is_persistent_and_capped(native):
    _, lib = native
    assert 1 <= lib.thaw_threads() <= min(16, len(os.sched_getaffinity(0)))
    mover.crc32c(DATA)  # starts the pool if nothing has yet
    before = thread_count()
    for _ in range(20):
        mover.crc32c(DATA)
        mover.chunk_crcs(DATA, 1 << 20)
    assert thread_count() == before


def test_concurrent_callers_get_correct_results(native):
    expected = crc32c_package.crc32c(DATA)
    expected_chunks = mover._py_chunk_crcs(DATA, 1 << 20)
    results = []

    def worker():
        for _ in range(5):
            results.append(mover.crc32c(DATA) == expected and mover.chunk_crcs(DATA, 1 << 20) == expected_chunks)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 20


def child_crc(queue):
    queue.put(mover.crc32c(DATA))


def test_pool_works_in_a_forked_child(native):
    mover.crc32c(DATA)  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=child_crc, args=(queue,))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert got == crc32c_package.crc32c(DATA) and child.exitcode == 0


def test_the_gil_is_released_during_a_long_call(native, select_kernel):
    """While one thread checksums with the slow software kernel, Python code in another runs.

    No timing: with a switch interval far longer than the call, a thread that held the GIL through the call
    would let the other run no Python at all between its `entered` and `left` marks."""
    _, lib = native
    select_kernel("software")
    data = DATA * 8  # 128 MiB: a few hundred milliseconds at software speed
    marks, ticks = {}, []

    def checksum():
        marks["entered"] = time.perf_counter()
        lib.thaw_crc32c(0, data, len(data))
        marks["left"] = time.perf_counter()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        worker = threading.Thread(target=checksum)
        worker.start()
        while worker.is_alive():
            ticks.append(time.perf_counter())
            worker.join(0.001)  # waiting drops the GIL, so the worker can enter (and leave) its call
    finally:
        sys.setswitchinterval(interval)
    during = [t for t in ticks if marks["entered"] < t < marks["left"]]
    assert len(during) >= 3, (len(during), marks)
