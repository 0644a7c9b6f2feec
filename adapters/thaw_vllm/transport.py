"""How a snapshot travels between the client and the engine's processes, named by a `source` string.

"shm://name": POSIX shared memory, written once with checksums (the KV pages gathered straight into it by
libthaw) and verified by each reader, who then reads the tensors in place through a private mapping: no
copy out, no file, no pickle. "local://n": the same process (an in-process engine with its worker in-process
too): the Snapshot object itself is handed over, with no copy and no encoding. A path is a snapshot file.
"""

from __future__ import annotations

import thaw_format
from thaw_format.sdk.shared import SHM_PREFIX, SharedSnapshot, read_shared

LOCAL_PREFIX = "local://"
_LOCAL: dict[str, thaw_format.Snapshot] = {}


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
    (thaw_format.sdk.shared), a file's are read. `unlink` releases the source (the reader is its last user)."""
    if source.startswith(LOCAL_PREFIX):
        return _LOCAL.pop(source) if unlink else _LOCAL[source]
    if source.startswith(SHM_PREFIX):
        return read_shared(source, unlink=unlink)
    return thaw_format.load(source)
