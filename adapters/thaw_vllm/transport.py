"""How a snapshot travels between the client and the engine's processes, named by a `source` string.

"shm://name" and "shm://name#nbytes": POSIX shared memory (thaw_format.sdk.shared), written with checksums
(the KV pages gathered straight into it by libthaw) and verified by each reader, who reads the tensors in
place through a private mapping, or copies them out of a segment its writer reuses: no file, no pickle.
Each engine's worker reuses one segment for its captures and each client one per engine for its restores,
so steady use touches warm pages. "local://n": the same process (an in-process engine with its worker in-process
too): the Snapshot object itself is handed over, with no copy and no encoding. A path is a snapshot file.
"""

from __future__ import annotations

import thaw_format
import weakref

from thaw_format.sdk.shared import SHM_PREFIX, Segment, SharedSnapshot, read_shared

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


class _Published:
    """A snapshot written into its engine's reused segment: released by the next one."""

    def __init__(self, source: str) -> None:
        self.source = source

    def close(self) -> None:
        return

    def __enter__(self) -> "_Published":
        return self

    def __exit__(self, *exc) -> None:
        return


def engine_segment(owner) -> Segment:
    """The segment reused for snapshots sent to one engine (or captured by one worker), unlinked with it."""
    segment = getattr(owner, "_thaw_segment", None)
    if segment is None:
        segment = owner._thaw_segment = Segment()
        weakref.finalize(owner, segment.close)
    return segment


def publish(snapshot: thaw_format.Snapshot, *, local: bool, engine=None):
    """A handle whose `source` names the snapshot for the reader; `close()` releases it. With `engine`, the
    snapshot goes into that engine's reused segment (the reader must be done with it before the next)."""
    if local:
        return LocalSnapshot(snapshot)
    return _Published(engine_segment(engine).publish(snapshot)) if engine is not None else SharedSnapshot(snapshot)


def read(source: str, *, unlink: bool = False, keep: bool = False) -> thaw_format.Snapshot:
    """The snapshot a source names, checksums verified: a shared-memory snapshot's tensors view the segment
    (thaw_format.sdk.shared), a file's are read. `unlink` releases a snapshot's own source (the reader is its
    last user); `keep` copies out of a reused segment, for a snapshot that outlives its writer's next one."""
    if source.startswith(LOCAL_PREFIX):
        return _LOCAL.pop(source) if unlink else _LOCAL[source]
    if source.startswith(SHM_PREFIX):
        reused = "#" in source
        return read_shared(source, unlink=unlink and not reused, copy=keep and reused)
    return thaw_format.load(source)
