"""Snapshots lent between processes in POSIX shared memory: the writer's bytes become the reader's, no copy.

A `Lender` (an engine's worker, say) writes each snapshot into a segment no reader holds and lends it, named
"shm://thawlent_<lender>_<slot>_<generation>#<nbytes>". `borrow(source)` maps the segment in the reader,
verifies every chunk and returns a Snapshot whose tensors view the mapping (read-only). When the last of
those views is garbage-collected, the reader hands the segment back by clearing its slot in the lender's small
control segment; the lender reuses returned segments for later snapshots, so their pages stay warm (fresh
shared memory costs a page fault and a zeroing per 4 KiB page, more than the copy itself). A lent snapshot is
never overwritten while a reader holds it: ownership passes with the source and comes back with the slot.
A borrower holds an open-file-description lock on its slot's byte of the control segment for as long as it
holds the snapshot; the kernel drops the lock when the last process holding it exits, however it dies, so a
lender takes back the slot of a borrower that died without giving it back. A process forked while holding a
borrowed snapshot inherits the lock: the slot stays out until it, too, drops the snapshot or exits. A slot
lent but never borrowed (its reader died between the capture and its borrow) is taken back by the lender's first
publish UNBORROWED_S seconds after it was lent, its segment unlinked: in a long-running engine such slots would
otherwise each hold a snapshot's memory until the lender closes. A borrow coming later fails, by the segment's
name, before it marks the slot (which may lend another snapshot by then): a borrower checks the segment is there
under its lock on the slot's byte, which the lender takes before it takes a slot back.

Readers cache a few mappings per process (`open_snapshot`, and `segment_view` for the segment's bytes as they
are), so a segment read again (the next lent capture in a recycled segment, a client's reused restore segment, a
fork pool's parent's segment) is neither mapped nor faulted again; `forget` drops a segment's.
`load_shared(path)` (thaw_format.load(path, shared=True)) reads a snapshot file, verified, into a segment of
its own, which the Snapshot's read-only tensors view; when the last of them is collected the segment is kept
for the next shared load (a few at most; `drop_idle_loads()` unlinks them now, exit does too).
`lent_source(snapshot)` gives back the source of a borrowed or shared-loaded snapshot still exactly as it was
written into its segment, so a restore can hand the segment itself to the engine instead of encoding the
snapshot again: the one copy a snapshot in the client's memory would otherwise cost on its way to an engine in
other processes. `send(owner, snapshot)` is that choice for a restore: the snapshot's own segment, else the
snapshot read by the engine's process straight from this one's memory (thaw_format.sdk.remote), else the
engine's reused restore segment written in the same call; the reader need not check any of them again (Trust,
below), and knows the snapshot by the client's id (`sent_id`), not by that of the segment's new encoding.
`sending` makes the restore, and falls back to the segment for good when the engine may not read this process.

Trust, decided here once for every engine: bytes are verified where they enter the user's trust domain (a
file, a network, another user's process, a segment named by a source string, whose writer the engine cannot
know); memory held by the client and its own engine processes (the same user, the client's descendants) is not
verified again. So `send` tells the engine's process that it may read unchecked: a snapshot's own segment whose
bytes were checked where they came in (a shared load that verified its file, a capture its engine's process
gathered with the checksums in the same pass), the client's memory read remotely (thaw_format.sdk.remote), and
the restore segment the same call writes. A segment borrowed or shared-loaded with verify=False is one the client
did not check: it is verified against its own checksums (a shared load's are the file's) before any engine
changes anything, by the engine's process where it lies when it is sent as its own segment, else by this
process (`verify_unchecked`: a restore into an engine in this process, or a snapshot no longer exactly as
written). A Snapshot in the client's private memory (thaw_format.load without shared=True, even with
verify=False, or one built here) carries no checksums to verify against: it is trusted as the client trusts it.
Sources a caller names as strings are verified by the engine unless the caller says it checked them
(thaw_format.sdk.shared.checked_by_caller: a fork pool's segment). Another process of the same user can write
the client's segments in /dev/shm: that is inside the domain, and not checked.
"""

from __future__ import annotations

import atexit
import fcntl
import mmap
import os
import secrets
import struct
import threading
import time
import weakref
from collections import OrderedDict
from multiprocessing import shared_memory
from typing import Callable, NamedTuple, Optional, TypeVar, Union

import numpy

from ..container import DEFAULT_LIMITS, Limits
from ..mover import RemoteReadError
from ..reader import SnapshotFile, loads
from ..snapshot import Snapshot
from ..writer import EncodedSnapshot
from . import remote
from .shared import SHM_PREFIX, known_by_sent_id, on_release, open_segment, owned_segment, segment_of

LENT_PREFIX = "thawlent_"
SLOTS = 256  # snapshots one lender may have out at once: one byte each in its control segment
KEEP_IDLE = 2  # returned segments a lender keeps for reuse; more are unlinked (they hold RAM in /dev/shm)
# Seconds a lent slot waits for its borrower before the lender may take it back: far longer than a reader takes to
# borrow the capture it asked for (at once, on the RPC's return), so only a reader that died or gave up misses it.
UNBORROWED_S = 60.0
_FREE, _LENT, _TAKEN = 0, 1, 2  # a slot's byte in the control segment: lent = not yet borrowed
T = TypeVar("T")


def parse(source: str) -> tuple[str, int]:
    """(segment name, snapshot bytes) of "shm://name#nbytes", or of "shm://name#nbytes|<snapshot id>" (sent_id)."""
    name, nbytes = segment_of(source)
    if nbytes is None:
        raise ValueError(f"not a shared-memory segment source: {source!r} (expected {SHM_PREFIX}<name>#<nbytes>, "
                         "then |<snapshot id> or not)")
    return name, nbytes


def is_lent(source: str) -> bool:
    return source.startswith(SHM_PREFIX + LENT_PREFIX)


def _slot_of(name: str) -> tuple[str, int]:
    """(control segment name, slot) of a lent segment's name."""
    stem, slot, _generation = name.rsplit("_", 2)
    return f"{stem}_ctl", int(slot)


class Lender:
    """Writes snapshots into segments it lends; a borrower gives each back by clearing its slot. The segments
    are registered with multiprocessing's resource tracker (unlinked if this process dies); close() unlinks them."""

    def __init__(self, *, unborrowed_s: float = UNBORROWED_S) -> None:
        self._stem = f"{LENT_PREFIX}{os.getpid()}x{secrets.token_hex(4)}"
        self._ctl = shared_memory.SharedMemory(name=f"{self._stem}_ctl", create=True, size=SLOTS)
        self._ctl_fd = open_segment(self._ctl.name, os.O_RDWR)  # asks the kernel who holds which slot's lock
        self._segments: list[Optional[shared_memory.SharedMemory]] = [None] * SLOTS
        self._lent_at = [0.0] * SLOTS  # time.monotonic() of each slot's last publish
        self._unborrowed_s = unborrowed_s
        self._generation = 0

    def publish(self, snapshot: Union[Snapshot, EncodedSnapshot], fill: Optional[dict] = None) -> str:
        """Write `snapshot` (or its EncodedSnapshot, laid out already; its deferred tensors by `fill`, as
        EncodedSnapshot.write_into) into a segment no borrower holds and lend it: return its source."""
        encoded = EncodedSnapshot.of(snapshot)
        slot = self._slot(encoded.nbytes)
        segment = self._segments[slot]
        encoded.write_into(segment.buf, fill)
        self._ctl.buf[slot] = _LENT
        self._lent_at[slot] = time.monotonic()
        return f"{SHM_PREFIX}{segment.name}#{encoded.nbytes}"

    def withdraw(self, source: str) -> None:
        """Take back a segment `publish` lent that no reader will borrow (its publisher failed after publishing):
        unlinked now, not UNBORROWED_S later (where a borrower is taking it, or this process still reads it, it
        stays lent, and is taken back as any unborrowed slot is)."""
        self._take_back(_slot_of(parse(source)[0])[1])

    def _slot(self, nbytes: int) -> int:
        """A free slot whose segment holds nbytes (the smallest such), else a free slot given a new segment.
        Idle segments beyond KEEP_IDLE are unlinked."""
        free = [s for s in range(SLOTS) if self._available(s)]
        if not free:
            raise RuntimeError(f"all {SLOTS} snapshots this engine lent are still held by their readers: drop some")
        idle = [s for s in free if self._segments[s] is not None]
        fitting = sorted((self._segments[s].size, s) for s in idle if self._segments[s].size >= nbytes)
        slot = fitting[0][1] if fitting else (idle[0] if idle else free[0])
        for spare in [s for s in idle if s != slot][KEEP_IDLE:]:
            self._drop(spare)
        if self._segments[slot] is None or self._segments[slot].size < nbytes:
            self._drop(slot)
            self._generation += 1  # a new name: readers' cached mappings of the old segment never alias it
            self._segments[slot] = shared_memory.SharedMemory(
                name=f"{self._stem}_{slot}_{self._generation}", create=True, size=max(nbytes, 1))
        return slot

    def _available(self, slot: int) -> bool:
        """No borrower holds the slot: given back, or borrowed by processes that all died without giving it
        back (no lock on its byte). A slot given back by one process while another that inherited the
        snapshot (a fork) still holds the lock is not available."""
        if self._segments[slot] is None:
            return True  # nothing was lent from it (segments are dropped only from available slots)
        if self._ctl.buf[slot] == _LENT:  # its reader has not borrowed it yet
            return time.monotonic() - self._lent_at[slot] >= self._unborrowed_s and self._take_back(slot)
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, slot, 1, 0)
        if struct.unpack(_FLOCK, fcntl.fcntl(self._ctl_fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK:
            return False
        self._ctl.buf[slot] = _FREE
        return True

    def _take_back(self, slot: int) -> bool:
        """Take back a slot lent and never borrowed: its segment unlinked, under a write lock on the slot's byte,
        so that a borrower (which checks the segment is there under its own lock on that byte) either holds it
        already or finds it gone, never the next snapshot lent from the slot. False if a borrower is taking it, or
        this process reads it itself."""
        lock = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, slot, 1, 0)
        try:
            fcntl.fcntl(self._ctl_fd, fcntl.F_OFD_SETLK, lock)
        except OSError:  # EAGAIN: a borrower holds the byte's lock
            return False
        try:
            if self._ctl.buf[slot] != _LENT:
                return False  # borrowed meanwhile
            segment = self._segments[slot]
            try:
                segment.close()  # refused while a view of it lives
            except BufferError:  # a snapshot this process reads from its own buffer (open_snapshot with the lender)
                if segment.buf is None:  # close let go of its buffer before the mapping refused: give it back
                    segment._buf = memoryview(segment._mmap)
                return False
            self._drop(slot)
            self._ctl.buf[slot] = _FREE
            return True
        finally:
            fcntl.fcntl(self._ctl_fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, slot, 1, 0))

    def _drop(self, slot: int) -> None:
        segment, self._segments[slot] = self._segments[slot], None
        if segment is not None:
            segment.close()
            segment.unlink()

    def view(self, name: str) -> Optional[memoryview]:
        """This lender's own segment of that name (a restore from a snapshot it lent), or None."""
        if not name.startswith(self._stem + "_"):
            return None
        segment = self._segments[_slot_of(name)[1]]
        return segment.buf if segment is not None and segment.name == name else None

    def close(self) -> None:
        """Unlink every segment (readers keep the mappings they hold) and the control segment."""
        for slot in range(SLOTS):
            self._drop(slot)
        if self._ctl_fd >= 0:
            os.close(self._ctl_fd)
            self._ctl_fd = -1  # a second close must not close another file's descriptor
        self._ctl.close()
        self._ctl.unlink()


# --- readers ------------------------------------------------------------------------------------------------

_MAX_MAPPINGS = 4
_COMPARED_BYTES = 1 << 20
_MAPPINGS: "OrderedDict[tuple[str, bool], mmap.mmap]" = OrderedDict()  # (segment name, writable) -> shared mapping, recent last
# Readers on several threads share it (a Ray driver's put beside ForkPool rounds, LangGraph's worker threads): an
# unlocked prune could iterate it while another thread adds, or evict the key another is about to move to the end.
_MAPPINGS_LOCK = threading.Lock()


class _Held(NamedTuple):
    """A borrowed or shared-loaded snapshot (weakly), the segment it came from, whether its bytes were checked
    where they came in, and the id it was read with (what an engine reading the segment knows it by)."""
    snapshot: weakref.ref
    source: str
    base: weakref.ref  # the array viewing the segment, which its tensors view
    checked: bool
    snapshot_id: Optional[str]


_BORROWED: dict[int, _Held] = {}  # by id(snapshot)


def _mapping(name: str, nbytes: int, writable: bool = False) -> mmap.mmap:
    """A cached shared mapping of the whole segment, read-only unless `writable`: it always shows the owner's
    current bytes."""
    key = (name, writable)
    with _MAPPINGS_LOCK:
        mapping = _MAPPINGS.get(key)
        if mapping is None or len(mapping) < nbytes:
            fd = open_segment(name, os.O_RDWR if writable else os.O_RDONLY)
            try:
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
            finally:
                os.close(fd)
            if len(mapping) < nbytes:
                raise ValueError(f"segment {name} holds {len(mapping)} bytes, its source says {nbytes}")
            _MAPPINGS[key] = mapping
            for gone in [k for k in _MAPPINGS if not _exists(k[0])]:
                del _MAPPINGS[gone]  # unlinked by its owner: a cached mapping would keep its memory alive
            while len(_MAPPINGS) > _MAX_MAPPINGS:
                _MAPPINGS.popitem(last=False)  # not closed: views still using it keep it mapped
        _MAPPINGS.move_to_end(key)
        return mapping


def segment_view(source: str, *, writable: bool = False) -> memoryview:
    """A view of the segment `source` names, read-only unless `writable`, its mapping cached as a reader's
    (_mapping): mapped and faulted in once, not at each read of a segment its owner reuses. For a process that
    copies another's capture out (RayForkPool's put) or writes its share of it (a tensor-parallel capture's
    ranks: writable_view); `forget` drops the mapping."""
    name, nbytes = parse(source)
    return memoryview(_mapping(name, nbytes, writable))[:nbytes]


def writable_view(source: str) -> memoryview:
    """A writable view of the segment `source` names, its mapping cached as a reader's (_mapping): for a process
    that writes its share of a snapshot another published (a tensor-parallel capture's ranks)."""
    return segment_view(source, writable=True)


def forget(source: str) -> None:
    """Drop this process's cached mappings of a segment (views still using them keep them mapped), so that a
    reader done with it does not keep the segment's memory alive after its owner unlinks it."""
    name = parse(source)[0]
    with _MAPPINGS_LOCK:
        for writable in (False, True):
            _MAPPINGS.pop((name, writable), None)


def _exists(name: str) -> bool:
    try:
        os.close(open_segment(name))
    except FileNotFoundError:
        return False
    return True


def open_snapshot(source: str, *, verify: bool = True, lender: Optional[Lender] = None) -> Snapshot:
    """The snapshot in a segment ("shm://name#nbytes"), its tensors viewing the segment (no copy): through
    `lender`'s own buffer when it wrote it, else a cached mapping. The caller must be done with it before the
    segment's owner writes it again (a restore is); `borrow` is for snapshots that ownership passes with.
    A remote source (send) is opened as thaw_format.sdk.remote.open_remote opens it."""
    if remote.is_remote(source):
        return remote.open_remote(source, lambda segment: _open_snapshot(segment, False, None)[0], verify=verify)
    return _open_snapshot(source, verify, lender)[0]


def _open_snapshot(source: str, verify: bool, lender: Optional[Lender]) -> tuple[Snapshot, numpy.ndarray]:
    name, nbytes = parse(source)
    buffer = lender.view(name) if lender is not None else None
    # A numpy array as the exporter: every tensor view references it, and (unlike mmap) it can be watched.
    base = numpy.frombuffer(buffer if buffer is not None else _mapping(name, nbytes), numpy.uint8, count=nbytes)
    return known_by_sent_id(loads(base, copy=False, verify=verify), source), base


def borrow(source: str, *, verify: bool = True) -> Snapshot:
    """Take ownership of a lent snapshot: its tensors view the segment; it is given back to its lender when
    the last of them is garbage-collected. verify=False leaves its chunks unread here: the snapshot then counts
    as unchecked, and an engine it is restored into verifies it before changing anything (send, verify_unchecked)."""
    return _borrow(source, verify=verify, checked=verify)


def _borrow_capture(source: str) -> Snapshot:
    """borrow, for thaw's adapters only, of the capture their engine's own process just lent them (the source its
    capture call returned): not read here, and counted as checked, its checksums computed as that process
    gathered its own memory (the trust rule: the client's engine processes' memory is not verified again)."""
    return _borrow(source, verify=False, checked=True)


def _borrow(source: str, *, verify: bool, checked: bool) -> Snapshot:
    if not is_lent(source):
        raise ValueError(f"{source!r} is not a lent snapshot")
    name = parse(source)[0]
    control, slot = _slot_of(name)
    hold = _hold(control, slot, name)  # raises having marked nothing
    try:
        snapshot, base = _open_snapshot(source, verify, None)
    except BaseException:
        _give_back(control, slot, hold)
        raise
    weakref.finalize(base, _give_back, control, slot, hold)
    return _held(snapshot, source, base, checked=checked)


def _held(snapshot: Snapshot, source: str, base: numpy.ndarray, *, checked: bool) -> Snapshot:
    """Remember that `snapshot`'s tensors view the segment `source` names at `base` (lent_source), and whether
    its bytes were checked where they came in (send)."""
    _BORROWED[id(snapshot)] = _Held(weakref.ref(snapshot), source, weakref.ref(base), checked, snapshot.id)
    weakref.finalize(snapshot, _BORROWED.pop, id(snapshot), None)
    return snapshot


def _held_entry(snapshot: Snapshot) -> Optional[_Held]:
    entry = _BORROWED.get(id(snapshot))
    return entry if entry is not None and entry.snapshot() is snapshot else None


def verify_unchecked(snapshot: Snapshot) -> None:
    """Verify every chunk of the segment a snapshot borrowed or shared-loaded with verify=False views, here
    (CorruptSnapshotError names a bad one), once; nothing for any other snapshot. For a restore that hands an
    engine the Snapshot itself (an engine in this process) or sends its bytes other than as that segment (send):
    an engine's process verifies an unchecked segment only when it is handed the segment itself."""
    entry = _held_entry(snapshot)
    base = None if entry is None or entry.checked else entry.base()
    if base is not None:
        loads(base, copy=False, verify=True)
        _BORROWED[id(snapshot)] = entry._replace(checked=True)


def owned_lender(owner) -> Lender:
    """The Lender of `owner`'s captures (a worker's, a scheduler's), created on first use, its segments unlinked
    when the owner is collected, at this process's exit, or at shared.release_segments(owner)."""
    found = owner.__dict__.get("_thaw_lender")
    if found is None:
        found = owner._thaw_lender = Lender()
        on_release(owner, found.close)
    return found


def load_shared(path: str, *, verify: bool = True, limits: Limits = DEFAULT_LIMITS, progress=None) -> Snapshot:
    """thaw_format.load(path, shared=True): the snapshot file read into a shared-memory segment of its own, every
    chunk verified before it lands there (a bad one raises CorruptSnapshotError naming it), its tensors read-only
    views of the segment. The file is read once: changing or deleting it afterwards changes nothing here, and the
    segment holds exactly the bytes that were verified.

    When the last view is collected the segment is kept for the next shared load (up to KEEP_IDLE of them), so
    an engine process that mapped it for a restore finds it mapped again (its cached mapping: no page faults, a
    cost about that of a copy); others are unlinked, and the kept ones at this process's exit. Segments are
    registered with multiprocessing's resource tracker, which unlinks them if this process dies."""
    with SnapshotFile(path, limits=limits) as f:
        nbytes = f.layout.file_length
        segment = _load_segment(nbytes)
        try:
            f.read_into(segment.buf, verify=verify, progress=progress)
            fd = open_segment(segment.name)
            try:
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # what the tensors view: nobody writes it
            finally:
                os.close(fd)
        except BaseException:
            _retire(segment, os.getpid())
            raise
    base = numpy.frombuffer(mapping, numpy.uint8, count=nbytes)
    weakref.finalize(base, _retire, segment, os.getpid())
    return _held(loads(base, copy=False, verify=False), f"{SHM_PREFIX}{segment.name}#{nbytes}", base, checked=verify)


_IDLE_LOADS: list[shared_memory.SharedMemory] = []  # segments of dropped shared loads, kept for the next
_KEEP_LOADS = [KEEP_IDLE]  # 0 once this process exits: every segment is then unlinked
_LOADS_LOCK = threading.Lock()  # loads and finalizers may run on several threads
os.register_at_fork(after_in_child=_IDLE_LOADS.clear)  # the parent's to reuse and unlink, not a child's


def _load_segment(nbytes: int) -> shared_memory.SharedMemory:
    """The smallest kept segment that holds nbytes, else a new one with its memory reserved: tmpfs allocates
    on first write, so a full /dev/shm would otherwise kill the process with SIGBUS in the middle of the read."""
    with _LOADS_LOCK:
        fitting = [s for s in _IDLE_LOADS if s.size >= nbytes]
        if fitting:
            segment = min(fitting, key=lambda s: s.size)
            _IDLE_LOADS.remove(segment)
            return segment
    segment = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
    try:
        fd = open_segment(segment.name, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        finally:
            os.close(fd)
    except OSError as e:
        _unlink(segment)
        raise OSError(e.errno, f"no room for a {nbytes}-byte shared load in /dev/shm ({e.strerror}): "
                               "load it without shared=True, or give /dev/shm more space") from None
    return segment


def _retire(segment: shared_memory.SharedMemory, owner: int) -> None:
    """A dropped shared load's segment: kept for the next, else unlinked. Only in the process that loaded it
    (a forked child that exits runs the finalizers it inherited, for segments its parent still uses)."""
    if os.getpid() != owner:
        return
    with _LOADS_LOCK:
        if len(_IDLE_LOADS) < _KEEP_LOADS[0]:
            _IDLE_LOADS.append(segment)
            return
    _unlink(segment)


def _unlink(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.close()
    except BufferError:
        pass  # a failed load's traceback still views it: unmapped when that goes
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


def drop_idle_loads() -> None:
    """Unlink the segments kept for later shared loads (they hold memory in /dev/shm until then)."""
    with _LOADS_LOCK:
        idle = _IDLE_LOADS[:]
        _IDLE_LOADS.clear()
    for segment in idle:
        _unlink(segment)


@atexit.register
def _at_exit() -> None:
    _KEEP_LOADS[0] = 0
    drop_idle_loads()


_CONTROLS: "OrderedDict[str, mmap.mmap]" = OrderedDict()  # control segment name -> shared mapping, least recently used
# first. Slots are given back from any thread (a snapshot's finalizer runs where its last view is dropped): unlocked,
# threads that found a control missing here each opened and mapped it (duplicate mappings, the last one kept), and with
# more new controls than the cache holds inserted at once, one thread's eviction could drop an entry another had just
# inserted (mapped again at its next give-back). Nothing was lost: each write went through a mapping its thread held.
# Re-entrant: a collection inside the locked section may run a finalizer, which gives back a slot on the same thread. An
# evicted mapping is only dropped, never closed: a thread still writing through it holds its own reference.
_CONTROLS_LOCK = threading.RLock()
# struct flock on Linux (64-bit): l_type, l_whence, l_start, l_len, l_pid; OFD locks need l_pid 0.
_FLOCK = "hhqqi4x"


def _hold(control: str, slot: int, name: str) -> Optional[int]:
    """A descriptor holding a shared lock on the slot's byte, marked borrowed: while it (or a copy a child
    inherited) is open, the lender leaves the slot alone. None if the lender is gone. FileNotFoundError if the
    lender took the slot back (Lender._take_back), the slot left unmarked: it may lend another snapshot now."""
    try:
        fd = open_segment(control, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        # Waits while the lender decides whether to take the slot back (its write lock, held for no longer).
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, slot, 1, 0))
        if not _exists(name):
            raise FileNotFoundError(f"lent snapshot {name} is gone: taken back by its lender (not borrowed within "
                                    f"lent.UNBORROWED_S, {UNBORROWED_S:g} s by default), or its lender replaced "
                                    "the slot's segment")
        os.pwrite(fd, bytes([_TAKEN]), slot)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _give_back(control: str, slot: int, hold: Optional[int] = None) -> None:
    try:
        _free(control, slot)
    finally:
        if hold is not None:
            os.close(hold)  # after the slot is marked free: the lender never sees a borrowed slot unlocked early


def _free(control: str, slot: int) -> None:
    with _CONTROLS_LOCK:
        mapping = _CONTROLS.get(control)
        if mapping is not None:
            _CONTROLS.move_to_end(control)  # the lenders in use stay mapped, the idle ones are evicted
        else:
            try:
                fd = open_segment(control, os.O_RDWR)
            except FileNotFoundError:
                return  # the lender is gone, and its segments with it
            try:
                mapping = _CONTROLS[control] = mmap.mmap(fd, SLOTS)
            finally:
                os.close(fd)
            while len(_CONTROLS) > _MAX_MAPPINGS:
                _CONTROLS.popitem(last=False)
    mapping[slot] = _FREE  # this thread's reference keeps it mapped, evicted meanwhile or not


def lent_source(snapshot: Snapshot) -> Optional[str]:
    """The source a borrowed (or shared-loaded) snapshot came from, if it still is exactly what was written
    there: the same header (model, prefix, requests, tensor shapes) and every tensor still the segment's own
    (read-only) bytes, and still known by the id it was read with (a save with another chunk size gives it that
    file's id, which an engine reading the segment would not know it by). Else None."""
    entry = _held_entry(snapshot)
    base = None if entry is None or snapshot.id != entry.snapshot_id else entry.base()
    if base is None:
        return None
    source, address = entry.source, base.ctypes.data
    name, nbytes = parse(source)
    if not _exists(name):
        return None  # its lender is gone: the mapping lives on here, but no engine can open the segment by name
    encoded = EncodedSnapshot.compared(snapshot)  # an equal header is one this process's reader accepted
    mapping = _mapping(name, nbytes)
    if encoded.nbytes != nbytes or mapping[: len(encoded.header)] != encoded.header:
        return None
    for (_, tensor), region in zip(encoded.tensors, encoded.layout.regions):
        if not tensor.nbytes or numpy.frombuffer(tensor.data, numpy.uint8).ctypes.data == address + region.offset:
            continue  # the segment's own bytes (read-only: nobody changed them)
        # Tensors the encoder derives from fields (the prefix tree's token ids) are new buffers: small, compared.
        if tensor.nbytes > _COMPARED_BYTES or mapping[region.offset : region.end] != memoryview(tensor.data).cast("B"):
            return None
    return source


def send(owner, snapshot: Snapshot) -> tuple[str, bool]:
    """The source an engine's other processes read `snapshot` (a Snapshot in this process) from, and whether its
    chunks are checked by the caller (thaw_format.sdk.shared.checked_by_caller), for `owner`, the engine: the
    trust rule of this module's docstring, the one place any engine's restore learns it.

    A borrowed or shared-loaded snapshot still as written is its own segment, handed over as it is: checked
    where its bytes came in, unless borrowed or shared-loaded with verify=False (the reader then verifies it). Any
    other (an unchecked segment's tensors first verified here, verify_unchecked) is read by the engine's process
    from this one where it lies (thaw_format.sdk.remote: its KV straight from this process's memory, the rest in
    `owner`'s reused restore segment), unless `owner` was refused such reads; then it is encoded by this call
    into that segment, each chunk's checksum computed from the bytes written in the same pass, its source naming
    the snapshot's own id (sent_id), which the reader's Snapshot takes, as it does a remote one's. Either way only
    this process writes what the reader reads, in this call, so the reader, checking it again, could find
    nothing but what this call wrote: checked. The reader must be done with it before `owner`'s next restore,
    and the caller keeps `snapshot` alive until then."""
    source = lent_source(snapshot)
    if source is not None:
        owner._thaw_sent = "lent"
        return source, _held_entry(snapshot).checked
    verify_unchecked(snapshot)  # an unchecked segment's tensors, sent as the client's memory: checked here first
    source = remote.publish(owner, snapshot)  # names the snapshot's id itself
    owner._thaw_sent = "remote" if source is not None else "segment"
    return source or f"{owned_segment(owner, 'restore').publish(snapshot)}|{snapshot.id or ''}", True


def last_sent(owner) -> Optional[str]:
    """How send last sent a snapshot to `owner`: "lent" (its own segment), "remote" (read from this process's
    memory) or "segment" (written into owner's restore segment); None before the first."""
    return owner.__dict__.get("_thaw_sent")


def sending(owner, snapshot: Snapshot, restore: Callable[[str, bool], T]) -> T:
    """restore(*send(owner, snapshot)): a restore of a Snapshot in this process into `owner`'s other processes.
    If they were refused reading this process's memory (mover.RemoteReadError, which they raise before changing
    anything), `owner` is marked so (remote.refuse) and the restore made again from its restore segment."""
    source, checked = send(owner, snapshot)
    try:
        return restore(source, checked)
    except Exception as error:
        if not remote.is_remote(source) or RemoteReadError.REFUSED not in str(error):
            raise
    remote.refuse(owner)
    return restore(*send(owner, snapshot))
