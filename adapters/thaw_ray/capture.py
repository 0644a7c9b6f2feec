"""A round's snapshot into Ray's object store: the parent's capture_shared segment, put once as one buffer."""

from __future__ import annotations

import mmap
import os
import traceback

import numpy
import ray

from thaw_format.sdk.lent import parse
from thaw_format.sdk.shared import open_segment


def put_capture(source: str) -> ray.ObjectRef:
    """One ray.put of the snapshot's bytes in the segment `source` names ("shm://name#nbytes", from the parent's
    capture_shared): a numpy uint8 array, which an actor on the node that holds it reads without a copy. The
    bytes are the format's, not a pickled Snapshot: a reader checks them against their own checksums."""
    name, nbytes = parse(source)
    fd = open_segment(name)
    try:
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        view = numpy.frombuffer(mapping, numpy.uint8, count=nbytes)
        try:
            return ray.put(view)  # the one copy: the segment's bytes into the object store
        except BaseException as exc:  # ObjectStoreFullError, say: its frames (ray.put's) hold the view
            traceback.clear_frames(exc.__traceback__)  # so the mapping closes, and close() hides no error
            raise
        finally:
            del view  # before the mapping closes: close() refuses while a view of it lives
    finally:
        mapping.close()
