"""The thread pool: created once and never grown by calls, safe under concurrent callers (the GIL is
released, so Python threads really overlap), and usable again in a child made by fork()."""

import multiprocessing
import os
import subprocess
import sys
import threading
import time

import crc32c as crc32c_package
import pytest

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


def test_back_to_back_calls_with_late_workers_get_correct_results(native):
    """Calls just over the parallel threshold, back to back, from one thread and from four, while every CPU spins:
    the pool's workers wake late, often after their caller took every index itself and returned; such a worker
    must neither join the next call with a finished one's state nor be waited for. Each call checksums another
    of eight spans, so a result taken from another call shows. Correctness only, no timing."""
    _, lib = native
    if lib.thaw_threads() == 1:
        pytest.skip("a pool of one thread has no workers to be late")
    size = (4 << 20) + 4096  # libthaw's PARALLEL_MIN (4 MiB) and a page
    spans = [memoryview(DATA)[i * 4096 : i * 4096 + size] for i in range(8)]
    expected = [crc32c_package.crc32c(span) for span in spans]

    def calls(count: int, first: int) -> list[int]:  # the indices of the calls that got a wrong CRC
        return [i for i in range(first, first + count) if mover.crc32c(spans[i % 8]) != expected[i % 8]]

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        assert calls(6000, 0) == []
        wrong = [None] * 4
        threads = [threading.Thread(target=lambda k=k: wrong.__setitem__(k, calls(1000, k))) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == [[]] * 4
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


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
