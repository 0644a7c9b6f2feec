"""Snapshots in POSIX shared memory, named "shm://<name>": written once with their checksums, read in place.

A writer encodes the snapshot straight into a new segment (tensors it defers are written by `fill`
functions, e.g. an engine's KV pages gathered by libthaw). A reader maps the segment privately
(copy-on-write), verifies every chunk and gets tensors that view the mapping: no copy out, no file, no
pickle. The mapping outlives the segment's name, so the last reader may unlink it at once.
"""

from __future__ import annotations

import mmap
from multiprocessing import resource_tracker, shared_memory
from typing import Optional

from ..reader import loads
from ..snapshot import Snapshot
from ..writer import EncodedSnapshot

SHM_PREFIX = "shm://"


def _untracked(shm: shared_memory.SharedMemory) -> shared_memory.SharedMemory:
    # The creator or the last reader unlinks explicitly; Python 3.11's tracker would otherwise unlink a
    # segment when whichever process first touched it exits, and warn about "leaks" in the others.
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def _unlink(shm: shared_memory.SharedMemory) -> None:
    resource_tracker.register(shm._name, "shared_memory")  # unlink() unregisters it again
    shm.unlink()


class SharedSnapshot:
    """A snapshot written once into a shared-memory segment; `source` names it for other processes."""

    def __init__(self, snapshot: Snapshot, fill: Optional[dict] = None) -> None:
        """`fill` writes deferred tensors in place (thaw_format.EncodedSnapshot.write_into)."""
        encoded = EncodedSnapshot(snapshot)
        self._shm = _untracked(shared_memory.SharedMemory(create=True, size=max(encoded.nbytes, 1)))
        self.id = encoded.write_into(self._shm.buf, fill)
        self.nbytes = encoded.nbytes
        self.source = SHM_PREFIX + self._shm.name

    def detach(self) -> None:
        """Unmap here but leave the segment for a reader, who unlinks it (read_shared(..., unlink=True))."""
        self._shm.close()
        self._shm = None

    def close(self) -> None:
        """Unlink the segment; readers that still have it mapped keep their mapping."""
        if self._shm is not None:
            self._shm.close()
            _unlink(self._shm)
            self._shm = None

    def __enter__(self) -> "SharedSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_shared(source: str, *, unlink: bool = False, verify: bool = True) -> Snapshot:
    """The snapshot in the segment `source` ("shm://name") names, its checksums verified; its tensors view a
    private mapping of the segment, kept while they live. `unlink` releases the name (the last reader)."""
    if not source.startswith(SHM_PREFIX):
        raise ValueError(f"not a shared-memory source: {source!r} (expected {SHM_PREFIX}<name>)")
    try:
        shm = _untracked(shared_memory.SharedMemory(name=source[len(SHM_PREFIX):]))
    except FileNotFoundError:
        raise FileNotFoundError(f"snapshot {source} is gone: shared memory lives only while its writer holds it "
                                "(capture a fork child with include_weights=False: a KV-only snapshot that "
                                "names the weights by digest)") from None
    try:
        mapping = mmap.mmap(shm._fd, shm.size, access=mmap.ACCESS_COPY)
    finally:
        shm.close()
        if unlink:
            _unlink(shm)
    return loads(mapping, copy=False, verify=verify)
