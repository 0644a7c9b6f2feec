"""How a snapshot travels between the client and the engine's processes, named by a `source` string.

"shm://...#nbytes": POSIX shared memory, written with checksums (the KV pages gathered straight into it by
libthaw) and read in place through a cached mapping: no file, no pickle, no copy. A capture is lent
(thaw_format.sdk.lent): the worker writes it into a segment it hands to the client, whose Snapshot views it
and gives it back when garbage-collected; restoring such a snapshot hands the same segment back to the worker
untouched, and so does a snapshot loaded from a file with `thaw_format.load(path, shared=True)` (its own
read-only segment, verified by the load); the worker verifies what thaw_format.sdk.lent's trust rule says was
not checked where it came in (a source named by a string, a shared load made with verify=False). Any other snapshot
is read by the worker straight from the client's memory, "remote://...", its KV scattered in one pass
(thaw_format.sdk.remote), or where the system refuses that, encoded once into the client's reused restore
segment for that engine (thaw_format.sdk.lent.sending chooses, api.restore), and
`capture_shared` publishes into the worker's reused segment, so steady use touches warm pages. "shm://name"
(no "#"): one snapshot's own segment (thaw_format.sdk.shared). "local://n": the same process (an in-process
engine with its worker in-process too): the Snapshot object itself is handed over, with no copy and no
encoding. A path is a snapshot file.
"""

from __future__ import annotations

import thaw_format

from thaw_format.sdk import lent, remote
from thaw_format.sdk.shared import SHM_PREFIX, read_shared

LOCAL_PREFIX = "local://"
_LOCAL: dict[str, thaw_format.Snapshot] = {}


class LocalSnapshot:
    """A snapshot handed to code in this same process."""

    def __init__(self, snapshot: thaw_format.Snapshot) -> None:
        self.source = f"{LOCAL_PREFIX}{id(snapshot)}"
        _LOCAL[self.source] = snapshot

    def close(self) -> None:
        _LOCAL.pop(self.source, None)

    def __enter__(self) -> "LocalSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(source: str, *, unlink: bool = False, keep: bool = False, lender=None, verify: bool = True) -> thaw_format.Snapshot:
    """The snapshot a source names, checksums verified (unless `verify` is False, or a borrowed capture's, see
    below); a shared-memory snapshot's tensors view the segment.
    `unlink` releases a snapshot's own source (the reader is its last user); `keep` is for a snapshot that
    outlives the call: a lent one is borrowed (the caller owns it), one in a reused segment copied out, verified.
    Otherwise a reused segment is read through `lender` (the caller's own segments) or a cached mapping."""
    if source.startswith(LOCAL_PREFIX):
        return _LOCAL.pop(source) if unlink else _LOCAL[source]
    if remote.is_remote(source):
        return lent.open_snapshot(source, verify=verify)
    if source.startswith(SHM_PREFIX):
        if "#" not in source:
            return read_shared(source, unlink=unlink, verify=verify)
        if keep and lent.is_lent(source):
            # A capture the engine's worker just gathered, its checksums computed in the same pass: the header is
            # parsed and checked, the bytes are not read again here (as the in-process path hands its Snapshot
            # over unread), nor by a restore of it into an engine of this client (thaw_format.sdk.lent's trust
            # rule); a saved copy is verified when it is loaded.
            return lent._borrow_capture(source)
        if keep:
            return read_shared(source, copy=True)
        return lent.open_snapshot(source, lender=lender, verify=verify)
    return thaw_format.load(source, verify=verify)


def structure(source: str) -> thaw_format.Snapshot:
    """A source's snapshot, unverified, for its structure (model, prefix, requests) only: its bytes are left
    where they lie, for the engine's worker to verify and read."""
    if source.startswith(SHM_PREFIX):
        return lent.open_snapshot(source, verify=False) if "#" in source else read_shared(source, verify=False)
    return thaw_format.load(source, mmap=True, verify=False)
