"""Snapshots in POSIX shared memory, named "shm://<name>": written once with their checksums, read in place.

A writer encodes the snapshot straight into a segment (tensors it defers are written by `fill` functions,
e.g. an engine's KV pages gathered by libthaw). A reader maps the segment privately (copy-on-write),
verifies every chunk and gets tensors that view the mapping (or copies of them): no file, no pickle.

Two kinds of segment. `SharedSnapshot` is one snapshot's own segment ("shm://name"); its mapping outlives
the name, so the last reader may unlink it at once. `Segment` is a buffer its owner reuses for one snapshot
after another ("shm://name#nbytes"): fresh shared memory costs a page fault and zeroing per 4 KiB page and an
unlink that frees them all, several times the cost of the copy itself, so a steady stream of snapshots
(restores, fork rounds) keeps its pages warm. A reader of a reused segment must be done with its view before
the owner writes the next snapshot (a restore is), or copy (`copy=True`, a capture handed to a caller).

`SharedKV` is the contract's default of `capture_shared` / `restore_source` (thaw_format.sdk.contract), which
every adapter's engine class inherits and may override with a faster path of its own.
"""

from __future__ import annotations

import mmap
import os
import weakref
from multiprocessing import resource_tracker, shared_memory
from typing import Optional, Sequence, Union

from ..reader import load, loads
from ..snapshot import Snapshot
from ..writer import EncodedSnapshot

SHM_PREFIX = "shm://"


def untracked(shm: shared_memory.SharedMemory) -> shared_memory.SharedMemory:
    """`shm`, just created here, left out of this process's resource tracker: a reader unlinks it."""
    # Python 3.11's tracker would otherwise unlink the segment when its creator exits, before a reader came.
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def open_segment(name: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the named segment, opened without SharedMemory: attaching through it would register the
    segment with this process's resource tracker, which processes of one family share, and unbalance the
    owner's own registration (a KeyError in the tracker, or a segment unlinked under its owner)."""
    from _posixshmem import shm_open

    try:
        return shm_open("/" + name, flags, mode=0)
    except FileNotFoundError:
        raise FileNotFoundError(f"shared-memory segment {name} is gone: its owner closed it") from None


def unlink_name(name: str) -> None:
    """Unlink a segment that no resource tracker holds (created untracked, or another process's to release)."""
    from _posixshmem import shm_unlink

    shm_unlink("/" + name)


class SharedSnapshot:
    """A snapshot written once into a shared-memory segment; `source` names it for other processes."""

    def __init__(self, snapshot: Snapshot, fill: Optional[dict] = None) -> None:
        """`fill` writes deferred tensors in place (thaw_format.EncodedSnapshot.write_into)."""
        encoded = EncodedSnapshot(snapshot)
        self._shm = untracked(shared_memory.SharedMemory(create=True, size=max(encoded.nbytes, 1)))
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
            unlink_name(self._shm.name)
            self._shm = None

    def __enter__(self) -> "SharedSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Segment:
    """A shared-memory buffer reused for one snapshot after another; grown (replaced) when one does not fit.
    The segment stays registered with multiprocessing's resource tracker, which unlinks it if this process
    dies; close() unlinks it otherwise."""

    def __init__(self) -> None:
        self._shm: Optional[shared_memory.SharedMemory] = None

    def publish(self, snapshot: Union[Snapshot, EncodedSnapshot], fill: Optional[dict] = None) -> str:
        """Write `snapshot` (or its EncodedSnapshot, laid out already) over the previous one; return its source,
        "shm://name#nbytes"."""
        encoded = EncodedSnapshot.of(snapshot)
        if self._shm is None or self._shm.size < encoded.nbytes:
            self.close()
            self._shm = shared_memory.SharedMemory(create=True, size=max(encoded.nbytes, 1))
        encoded.write_into(self._shm.buf, fill)
        return f"{SHM_PREFIX}{self._shm.name}#{encoded.nbytes}"

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None


def release(source: str) -> None:
    """Unlink a snapshot's own segment ("shm://name") whose readers have all mapped it (or never will)."""
    unlink_name(source[len(SHM_PREFIX):])


def segment_of(source: str) -> tuple[str, Optional[int]]:
    """(segment name, snapshot bytes or None) of "shm://name" (a snapshot's own segment) or "shm://name#nbytes"
    (a reused one), either followed by "|<snapshot id>" or not (sent_id)."""
    name, hashed, nbytes = source.partition("|")[0][len(SHM_PREFIX):].partition("#")
    if not source.startswith(SHM_PREFIX) or not name or (hashed and not (nbytes.isascii() and nbytes.isdigit())):
        raise ValueError(f"not a shared-memory source: {source!r} (expected {SHM_PREFIX}<name> or "
                         f"{SHM_PREFIX}<name>#<nbytes>, then |<snapshot id> or not)")
    return name, int(nbytes) if hashed else None


def sent_id(source: str) -> tuple[bool, Optional[str]]:
    """Whether a segment source names the id of the snapshot its sender holds, and that id (None: the sender's
    has none). send's restore segment does: the snapshot encoded into it again has an id of its own (counted over
    a header and checksums of this encoding, with its chunk size), which is not the sender's snapshot's (None for
    one built in memory and never saved, that of a file saved with other chunks), and the engine must know the
    snapshot it continues by the sender's (the lineage parent of its captures). The sender's word, like the id a
    remote source names: no reader can check it against bytes encoded another way."""
    segment, named, snapshot_id = source.partition("|")
    if not named or not segment.startswith(SHM_PREFIX):
        return False, None  # a remote source names the id in its own way (thaw_format.sdk.remote)
    return True, snapshot_id or None


def known_by_sent_id(snapshot: Snapshot, source: str) -> Snapshot:
    """`snapshot`, read from `source`, with the id its sender named there (sent_id), where it names one."""
    named, snapshot_id = sent_id(source)
    if named:
        snapshot.id = snapshot_id
    return snapshot


def read_shared(source: str, *, unlink: bool = False, copy: bool = False, verify: bool = True) -> Snapshot:
    """The snapshot in the segment `source` names, its checksums verified. Its tensors view a private mapping
    of the segment, kept while they live, or (copy=True) are copied out. `unlink` releases a snapshot's own
    segment (its last reader); a reused segment ("#nbytes") is its owner's to release."""
    name, nbytes = segment_of(source)
    if nbytes is not None:
        if unlink:
            raise ValueError(f"{source} is a reused segment: its owner releases it, not a reader")
    try:
        fd = open_segment(name)
    except FileNotFoundError:
        gone = ("its owner closed the segment" if nbytes is not None else "shared memory lives only while its writer "
                "holds it (capture a fork child with include_weights=False: a KV-only snapshot that names the "
                "weights by digest)")
        raise FileNotFoundError(f"snapshot {source} is gone: {gone}") from None
    try:
        mapping = mmap.mmap(fd, nbytes or 0, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
        if unlink:
            unlink_name(name)
    return known_by_sent_id(loads(mapping, copy=copy, verify=verify), source)


def owned_segment(owner, role: str = "kv") -> Segment:
    """The Segment `owner` (an engine, a scheduler) reuses for its `role`'s snapshots, created on first use and
    unlinked when the owner is collected or this process exits. Roles keep apart what must not overwrite each
    other: an engine's published captures ("kv") and the snapshots sent into it ("restore")."""
    segments = owner.__dict__.setdefault("_thaw_segments", {})
    if role not in segments:
        segment = segments[role] = Segment()
        on_release(owner, segment.close)
    return segments[role]


def on_release(owner, close) -> None:
    """Call `close` (unlinking segments `owner` holds) once: when `owner` is collected, at this process's exit,
    or at release_segments(owner), whichever comes first."""
    owner.__dict__.setdefault("_thaw_releases", []).append(weakref.finalize(owner, close))


def release_segments(owner) -> None:
    """Unlink now every segment `owner` holds (owned_segment, on_release). For a process about to be killed,
    whose finalizers never run: its segments, registered with the resource tracker its family shares, would
    be left to that tracker, which unlinks them only when the process that started it exits, with a warning
    of leaked shared memory."""
    for release in owner.__dict__.pop("_thaw_releases", []):
        release()
    owner.__dict__.pop("_thaw_segments", None)


def read_source(source: str, *, verified: bool = False) -> Snapshot:
    """The snapshot a source names, every checksum verified: "shm://..." read in place from shared memory (a
    reused segment's reader must be done before its owner's next snapshot), anything else a snapshot file.
    `verified`: its caller has checked every chunk (checked_by_caller)."""
    checked = checked_by_caller(source, verified)
    if source.startswith(SHM_PREFIX):
        return read_shared(source, verify=not checked)
    return load(source, mmap=True)


def checked_by_caller(source: str, verified: bool) -> bool:
    """Whether a restore may leave the chunks of `source`, named by its caller, unchecked because the caller
    checked them (`verified`): only a shared-memory segment, which a fork pool checks once for all its workers
    before any of them reads it (thaw_format.sdk.pool). Every other source, and every segment a caller has not
    checked, is verified. (A Snapshot the client holds is sent as thaw_format.sdk.lent.send says: its trust rule.)"""
    if verified and not source.startswith(SHM_PREFIX):
        raise ValueError(f"verified=True is for a shared-memory segment its caller has checked, not {source!r}: "
                         "a file is checked as it is read")
    return verified


class SharedKV:
    """The contract's default `capture_shared` / `restore_source`: a KV-only capture published once in the
    engine's reused segment, and a restore from a source read in place. An adapter whose engine lives in
    other processes overrides them to move the KV there directly."""

    def capture_shared(self, *, chains: Optional[Sequence[Sequence[int]]] = None) -> str:
        snapshot = self.capture(include_weights=False, chains=chains)
        # KV only: the requests in flight here are this engine's to finish (a fork pool's workers resumed them,
        # and their next restore was refused: "restore needs an idle engine"). Dropping them here leaves their
        # pages in when this engine's capture() adds them whatever the chains: such an engine overrides this
        # method to capture the chains' pages only (every adapter here does).
        snapshot.scheduler = None
        return owned_segment(self).publish(snapshot)

    def restore_source(self, source: str, *, verified: bool = False) -> list:
        return self.restore(read_source(source, verified=verified))


def capture_shared(engine, *, chains: Optional[Sequence[Sequence[int]]] = None) -> str:
    """engine.capture_shared(chains=...), or SharedKV's default for an engine class that does not have it."""
    method = getattr(engine, "capture_shared", None)
    return method(chains=chains) if method is not None else SharedKV.capture_shared(engine, chains=chains)


def restore_source(engine, source: str, *, verified: bool = False) -> list:
    """engine.restore_source(source, verified=...), or SharedKV's default for an engine class that does not
    have it."""
    method = getattr(engine, "restore_source", None)
    if method is None:
        return SharedKV.restore_source(engine, source, verified=verified)
    # the keyword only when set: an engine written before the contract had it still restores checked sources
    return method(source, verified=True) if verified else method(source)
