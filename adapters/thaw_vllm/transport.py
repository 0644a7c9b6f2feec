"""How a snapshot travels between the client and the engine's processes, named by a `source` string.

"shm://name": POSIX shared memory, written once with checksums (the KV pages gathered straight into it by
libthaw) and verified by each reader, who then reads the tensors in place through a private mapping: no
copy out, no file, no pickle. "local://n": the same process (an in-process engine with its worker in-process
too): the Snapshot object itself is handed over, with no copy and no encoding. A path is a snapshot file.
"""

from __future__ import annotations

import mmap
from multiprocessing import resource_tracker, shared_memory
from typing import Optional

import thaw_format

SHM_PREFIX = "shm://"
LOCAL_PREFIX = "local://"
_LOCAL: dict[str, thaw_format.Snapshot] = {}


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

    def __init__(self, snapshot: thaw_format.Snapshot, fill: Optional[dict] = None) -> None:
        """`fill` writes deferred tensors in place (thaw_format.EncodedSnapshot.write_into)."""
        encoded = thaw_format.EncodedSnapshot(snapshot)
        self._shm = _untracked(shared_memory.SharedMemory(create=True, size=max(encoded.nbytes, 1)))
        self.id = encoded.write_into(self._shm.buf, fill)
        self.nbytes = encoded.nbytes
        self.source = SHM_PREFIX + self._shm.name

    def detach(self) -> None:
        """Unmap here but leave the segment for a reader, who unlinks it (read(..., unlink=True))."""
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


class LocalSnapshot:
    """A snapshot handed to code in this same process."""

    def __init__(self, snapshot: thaw_format.Snapshot) -> None:
        self.source = f"{LOCAL_PREFIX}{id(snapshot)}"
        _LOCAL[self.source] = snapshot

    def detach(self) -> None:
        return

    def close(self) -> None:
        _LOCAL.pop(self.source, None)

    def __enter__(self) -> "LocalSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def publish(snapshot: thaw_format.Snapshot, *, local: bool):
    """A handle whose `source` names the snapshot for the reader; `close()` releases it."""
    return LocalSnapshot(snapshot) if local else SharedSnapshot(snapshot)


def read(source: str, *, unlink: bool = False) -> thaw_format.Snapshot:
    """The snapshot a source names, checksums verified: a shared-memory snapshot's tensors view the segment
    through a private copy-on-write mapping (kept while they live), a file's are read. `unlink` releases the
    source (the reader is its last user); the mapping outlives the name."""
    if source.startswith(LOCAL_PREFIX):
        return _LOCAL.pop(source) if unlink else _LOCAL[source]
    if not source.startswith(SHM_PREFIX):
        return thaw_format.load(source)
    try:
        shm = _untracked(shared_memory.SharedMemory(name=source[len(SHM_PREFIX):]))
    except FileNotFoundError:
        # A fork child's weights came through shared memory that its parent has released since.
        raise FileNotFoundError(f"snapshot {source} is gone: shared memory lives only while its writer holds it "
                                "(capture a fork child with include_weights=False: a KV-only snapshot that "
                                "names the weights by digest)") from None
    try:
        mapping = mmap.mmap(shm._fd, shm.size, access=mmap.ACCESS_COPY)
    finally:
        shm.close()
        if unlink:
            _unlink(shm)
    return thaw_format.loads(mapping, copy=False)

