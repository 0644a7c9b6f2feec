"""A round's snapshot into Ray's object store: the parent's capture_shared segment, put once as one buffer."""

from __future__ import annotations

import numpy
import ray

from thaw_format.sdk.lent import segment_view


def put_capture(source: str) -> ray.ObjectRef:
    """One ray.put of the snapshot's bytes in the segment `source` names ("shm://name#nbytes", from the parent's
    capture_shared): a numpy uint8 array, which an actor on the node that holds it reads without a copy. The
    bytes are the format's, not a pickled Snapshot: a reader checks them against their own checksums.
    The segment is read through lent's process-wide cache of a few mappings (lent.segment_view; the pool's close
    forgets its segment's): the parent reuses its segment round after round, and a mapping made afresh for each
    put faulted in every page of it again, as much CPU time as the copy itself (benchmarks/HISTORY.md, fork pool)."""
    return ray.put(numpy.frombuffer(segment_view(source), numpy.uint8))  # the one copy, into the object store
