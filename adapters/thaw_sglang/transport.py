"""How a snapshot travels between the client and SGLang's scheduler process, named by a `source` string.

Captures are lent (thaw_format.sdk.lent): the scheduler gathers the KV by slot straight into a shared-memory
segment no reader holds, with its checksums in the same pass, and the client's Snapshot views that segment and
gives it back when garbage-collected; restoring that Snapshot hands the same segment back to the scheduler
untouched, as does a Snapshot loaded with `thaw_format.load(path, shared=True)` (its own segment), and the
scheduler reads it in place without checking it again: thaw_format.sdk.lent's trust rule (it verifies a shared
load made with verify=False, and any source named by a string). Any other Snapshot (loaded into this process's memory, or built
here) is read by the scheduler straight from this process's memory, its KV scattered in one pass
(thaw_format.sdk.remote); where the system refuses that, it is encoded once into the client's reused segment for
that engine, its checksums computed in the same pass, and the scheduler scatters it without reading it twice
(thaw_format.sdk.lent.send). A capture for a
fork pool (`capture_shared`) goes into the scheduler's own reused segment. Each side reads a "shm://name#nbytes"
segment through its own buffer (the scheduler's lent segments) or a cached mapping, so steady use neither maps
nor faults pages again. A snapshot's own segment ("shm://name", a fork's) and a file path are read as
thaw_format.sdk.shared.read_source reads them.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from thaw_format import Snapshot
from thaw_format.sdk import lent, remote
from thaw_format.sdk.shared import SHM_PREFIX, read_source, release_segments

T = TypeVar("T")


def release(owner) -> None:
    """Unlink every segment one scheduler holds (its lender's, its reused one) now: SGLang ends a scheduler with
    SIGKILL, so its finalizers never run (thaw_format.sdk.shared.release_segments)."""
    release_segments(owner)
    owner.__dict__.pop("_thaw_lender", None)


def read(source: str, owner=None, *, verify: bool = True) -> Snapshot:
    """The snapshot a source names, every chunk verified where it lies (no copy; `verify=False`: a segment its
    caller checked, thaw_format.sdk.shared.checked_by_caller): a segment `owner` lent is read through its own
    buffer. The caller must be done with it before the segment's owner writes it again."""
    if remote.is_remote(source) or source.startswith(SHM_PREFIX) and "#" in source:
        return lent.open_snapshot(source, lender=owner.__dict__.get("_thaw_lender") if owner is not None else None,
                                  verify=verify)
    return read_source(source, verified=not verify)


def sending(engine, snapshot: Snapshot | str, call: Callable[[str, bool], T]) -> T:
    """call(source, checked) where `checked` says the caller checked its chunks: a source as given (not checked);
    a Snapshot as thaw_format.sdk.lent.sending sends it and says (a capture borrowed from a scheduler or a shared
    load, unchanged, by its own segment; any other read by the scheduler from this process's memory, or written
    into the engine's reused restore segment where it may not, within the call)."""
    if not isinstance(snapshot, Snapshot):
        return call(str(snapshot), False)
    return lent.sending(engine, snapshot, call)
