"""Count the calls that make a save durable, for tests in any directory (each has its own conftest)."""

import os


def count(monkeypatch) -> dict[str, int]:
    """{"fsync": calls of os.fsync (file and folder), "writeback": writebacks started per stage}, counted while
    the real calls still run: patched in the test only, to observe what a writer asks of the kernel."""
    from thaw_format import mover

    counts = {"fsync": 0, "writeback": 0}

    def counted(key, real):
        def call(*args):
            counts[key] += 1
            return real(*args)
        return call

    monkeypatch.setattr(os, "fsync", counted("fsync", os.fsync))
    monkeypatch.setattr(mover, "start_writeback", counted("writeback", mover.start_writeback))
    return counts
