"""A round's KV to its actors: the parent's capture_shared segment ("shm://name#nbytes") handed as it is to an
actor on the parent's node, which reads it in place as a ForkPool worker does (no copy before its restore), and
put once into Ray's object store, as one buffer, for the actors on other nodes (none there: no put)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy
import ray

from thaw_format.sdk.lent import segment_view

SEGMENT, OBJECT = "segment", "object"  # how an actor got the round's KV (ForkRound.kv_via)


def put_capture(source: str) -> ray.ObjectRef:
    """One ray.put of the snapshot's bytes in the segment `source` names ("shm://name#nbytes", from the parent's
    capture_shared): a numpy uint8 array, which an actor on the node that holds it reads without a copy. The
    bytes are the format's, not a pickled Snapshot: a reader checks them against their own checksums.
    The segment is read through lent's process-wide cache of a few mappings (lent.segment_view; the pool's close
    forgets its segment's): the parent reuses its segment round after round, and a mapping made afresh for each
    put faulted in every page of it again, as much CPU time as the copy itself (benchmarks/HISTORY.md, fork pool)."""
    return ray.put(numpy.frombuffer(segment_view(source), numpy.uint8))  # the one copy, into the object store


def hand_out(source: str, nodes: Sequence[Optional[str]], here: Optional[str]) -> list[Union[str, ray.ObjectRef]]:
    """What each actor of a round is sent, by its node's Ray id in `nodes`: `source` itself to one on `here`, the
    node whose /dev/shm holds the segment (None: to none, every actor sent the object), else the object of one
    put_capture shared by them all, put only if some actor needs it."""
    remote = [node is None or node != here for node in nodes]
    snapshot = put_capture(source) if any(remote) else None
    return [snapshot if far else source for far in remote]

