"""A writer process for the crash tests.

    python writer_child.py PATH save|stream            write snapshots A and B to PATH, alternately, until killed
    python writer_child.py PATH save|stream POINT      write snapshot A once, stopping at POINT until killed

`save` uses the atomic tf.save; `stream` uses tf.write into the path opened for writing (no rename), the case
a crash is expected to leave a partial file in. The child prints "ready" once the snapshots are built, and
with a POINT, "at POINT" when it has stopped there: the parent kills it at exactly that step, not after a
delay. The points are reached by wrapping, in this process only, the calls tf.save makes (os.pwrite,
mover.write_regions, os.fsync, os.replace) and the stream tf.write writes to.
"""

from __future__ import annotations

import os
import random
import sys
import threading

import thaw_format as tf
from thaw_format import mover

TENSORS = 8
TENSOR_BYTES = 1 << 20

# Where a kill can land in tf.save, in order, and in tf.write.
SAVE_POINTS = ("created", "header", "half_data", "data", "trailer", "synced", "renamed")
STREAM_POINTS = ("header", "half_data")


def crash_snapshot(label: str) -> tf.Snapshot:
    """8 MiB of weights in 8 tensors, deterministic per label, so the parent can rebuild it to compare."""
    rng = random.Random(label)
    tensors = {
        f"layer{i}.weight": tf.Tensor("uint8", (TENSOR_BYTES,), rng.randbytes(TENSOR_BYTES)) for i in range(TENSORS)
    }
    return tf.Snapshot(weights=tf.Weights(tensors), lineage=tf.Lineage(label=label))


def stop(point: str) -> None:
    print(f"at {point}", flush=True)
    threading.Event().wait()  # until SIGKILL


def stop_in_save(point: str) -> None:
    """Wrap the steps of tf.save so that the step named `point` is the last one done."""
    pwrite, write_regions, fsync, replace = os.pwrite, mover.write_regions, os.fsync, os.replace
    in_regions = []  # the portable mover pwrites region data itself: those calls are not header or trailer

    def pwrite_hook(fd, data, offset):
        if in_regions:
            return pwrite(fd, data, offset)
        if point == "created" and offset == 0:
            stop(point)  # the temporary exists, nothing is written
        written = pwrite(fd, data, offset)
        if point == "trailer" and offset != 0:
            stop(point)  # complete, not yet fsynced
        return written

    def write_regions_hook(fd, regions, progress=None):
        if point == "header":
            stop(point)
        in_regions.append(True)
        if point == "half_data":
            write_regions(fd, regions[: len(regions) // 2], progress)
            stop(point)
        crcs = write_regions(fd, regions, progress)
        in_regions.clear()
        if point == "data":
            stop(point)  # every region written, no trailer
        return crcs

    def fsync_hook(fd):
        fsync(fd)
        if point == "synced":
            stop(point)  # the temporary is durable, not yet renamed

    def replace_hook(src, dst):
        replace(src, dst)
        if point == "renamed":
            stop(point)  # the new snapshot is at the path; the directory is not yet fsynced

    os.pwrite, mover.write_regions, os.fsync, os.replace = pwrite_hook, write_regions_hook, fsync_hook, replace_hook


class StoppingStream:
    """A file that stops the process after its first write (the header) or once half of `total` is written."""

    def __init__(self, file, point: str, total: int) -> None:
        self.file, self.point, self.total, self.written = file, point, total, 0

    def write(self, data) -> int:
        n = self.file.write(data)
        self.written += n
        if self.point == "header" or (self.point == "half_data" and self.written >= self.total // 2):
            self.file.flush()
            stop(self.point)
        return n


def main(path: str, mode: str, point: str = "") -> None:
    snapshots = [crash_snapshot("A"), crash_snapshot("B")]
    print("ready", flush=True)
    if point:
        if mode == "save":
            stop_in_save(point)
            tf.save(snapshots[0], path)
        else:
            with open(path, "wb") as file:
                tf.write(snapshots[0], StoppingStream(file, point, len(tf.dumps(snapshots[0]))))
        raise SystemExit(f"finished without reaching {point!r}")
    while True:
        for snapshot in snapshots:
            if mode == "save":
                tf.save(snapshot, path)
            else:
                with open(path, "wb") as stream:
                    tf.write(snapshot, stream)


if __name__ == "__main__":
    main(*sys.argv[1:])
