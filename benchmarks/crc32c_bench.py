"""CRC32C throughput: libthaw (one thread, and the thread pool) against the crc32c and google-crc32c packages,
side by side in one process on the same buffers, best of several interleaved rounds."""

from __future__ import annotations

import os

import crc32c as crc32c_package

from common import best_seconds

SIZES = {"4 KiB": 4 << 10, "64 KiB": 64 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20}


def competitors() -> dict:
    from thaw_format import mover

    found = {}
    if mover._lib is not None:
        lib = mover._lib
        found["libthaw 1 thread"] = lambda d: lib.thaw_crc32c(0, d, len(d))
        found[f"libthaw {lib.thaw_threads()} threads"] = mover.crc32c
    found["crc32c"] = crc32c_package.crc32c
    try:
        import google_crc32c

        found["google-crc32c"] = google_crc32c.value
    except ImportError:
        pass
    return found


def run(rounds: int = 5) -> dict:
    """{size label: {competitor: GB/s}}."""
    funcs = competitors()
    results = {}
    for label, size in SIZES.items():
        data = os.urandom(size)
        expected = crc32c_package.crc32c(data)
        assert all(f(data) == expected for f in funcs.values()), "competitors disagree"
        best = {name: 0.0 for name in funcs}
        for _ in range(rounds):
            for name, f in funcs.items():
                seconds, _ = best_seconds(lambda: f(data), min_time=0.15)
                best[name] = max(best[name], size / seconds / 1e9)
        results[label] = best
    return results
