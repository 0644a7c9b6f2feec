"""A writer process for the crash tests: it writes snapshots A and B to one path, alternately, until killed.

    python writer_child.py PATH save|stream

`save` uses the atomic tf.save; `stream` uses tf.write into the path opened for writing (no rename), the case
a crash is expected to leave a partial file in. It prints "ready" once the snapshots are built.
"""

from __future__ import annotations

import random
import sys

import thaw_format as tf

TENSORS = 8
TENSOR_BYTES = 1 << 20


def crash_snapshot(label: str) -> tf.Snapshot:
    """8 MiB of weights in 8 tensors, deterministic per label, so the parent can rebuild it to compare."""
    rng = random.Random(label)
    tensors = {
        f"layer{i}.weight": tf.Tensor("uint8", (TENSOR_BYTES,), rng.randbytes(TENSOR_BYTES)) for i in range(TENSORS)
    }
    return tf.Snapshot(weights=tf.Weights(tensors), lineage=tf.Lineage(label=label))


def main(path: str, mode: str) -> None:
    snapshots = [crash_snapshot("A"), crash_snapshot("B")]
    print("ready", flush=True)
    while True:
        for snapshot in snapshots:
            if mode == "save":
                tf.save(snapshot, path)
            else:
                with open(path, "wb") as stream:
                    tf.write(snapshot, stream)


if __name__ == "__main__":
    main(*sys.argv[1:])
