"""A snapshot in the client's memory, read by an engine's other process where it lies: one pass, no copy.

A restore from a Snapshot held in this process's private memory (thaw_format.load without shared=True, a
snapshot built here) into an engine whose KV lives in another process (vLLM's worker, SGLang's scheduler)
would cost two passes over its KV: a copy into shared memory here, then the engine's scatter from there.
Instead `publish` writes everything but the KV into the engine's reused restore segment and names the KV
tensors by this process's id and their addresses:

    remote://<pid>/<token address>=<token>/<tensor name>=<address>+<nbytes>,...|<snapshot id>|shm://<segment>#<n>

and the engine's process (`open_remote`) first reads the sender's token (16 random bytes a process draws at
import and on fork) at its address: if it is not there, the pid names another process as seen from the engine
(another pid namespace, a reused pid), and the read counts as refused. Then it gets a Snapshot, with the
sender's id, whose KV tensors are RemoteTensors: the scatter reads their pages (`scatter_view`, a
mover.remote_window) from this process with process_vm_readv, straight into the engine's blocks; every other
access to their bytes (`data`, tobytes, equality, a binding, a save) reads them from this process into a copy
there first, once (a window maps nothing readable: the sender's address dereferenced in the engine's process
would fault). The sender keeps the Snapshot alive for the whole call, which is synchronous.

Trust (the rule of thaw_format.sdk.lent: bytes are verified where they enter the user's trust domain, the
client's and its engine processes' memory is not verified again): the KV regions of the segment are left
unwritten (their checksums in it are zero, so a reader that verified the segment would refuse it); the KV itself
carries no checksums, being the sender's own memory, trusted as the sender trusts it: verified when it was
loaded (unless loaded with verify=False, or mapped with mmap=True from a file changed since), or built in memory
with nothing to check; and the restore segment beside it is written by the sender in the same call. So a remote
source is checked by its caller (thaw_format.sdk.shared.checked_by_caller), as a verified shared load's own
segment is, and a reader asked to verify one refuses it: only lent.send makes them, for a restore that trusts
them.

Some systems refuse one process reading another's memory (seccomp filters in containers, another user's
process, Yama's ptrace scope: at its common default of 1 a process may read only its descendants, and the engine's
processes are the sender's children, so a stock Ubuntu host refuses it): the engine's process then raises a RemoteReadError saying "remote read refused"
before it changes anything, and lent.sending marks the engine (`refuse`) and restores again the two-pass way;
every later restore into that engine goes that way at once.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy

from .. import mover
from ..snapshot import PAGED_KINDS, Snapshot
from ..tensor import Tensor
from ..writer import unwritten
from .shared import owned_segment

REMOTE_PREFIX = "remote://"


def is_remote(source: str) -> bool:
    return source.startswith(REMOTE_PREFIX)


def refuse(owner) -> None:
    """Send every later snapshot to `owner` (an engine) through its restore segment: its processes may not read
    this one."""
    owner._thaw_remote_refused = True


def refused(owner) -> bool:
    """Whether `owner` was refused remote reads (refuse)."""
    return owner.__dict__.get("_thaw_remote_refused", False)


def _kv_tensors(snapshot: Snapshot) -> dict[str, Tensor]:
    """The paged KV tensors, by their names in the encoded snapshot (thaw_format.document)."""
    if snapshot.kv is None:
        return {}
    return {f"kv/{i}/{role}": tensor for i, layer in enumerate(snapshot.kv.layers) if layer.kind in PAGED_KINDS
            for role, tensor in layer.tensors.items() if tensor.nbytes}


def publish(owner, snapshot: Snapshot) -> Optional[str]:
    """The remote source of `snapshot` for `owner`'s other processes, its segment part written now into owner's
    reused restore segment; None when owner was refused remote reads or the snapshot has no KV to read so."""
    tensors = _kv_tensors(snapshot)
    if refused(owner) or not tensors:
        return None
    names = ",".join(f"{name}={_address(t.data)}+{t.nbytes}" for name, t in tensors.items())
    segment = owned_segment(owner, "restore").publish(snapshot, {name: unwritten for name in tensors})
    token = f"{_address(_TOKEN)}={bytes(_TOKEN).hex()}"
    return f"{REMOTE_PREFIX}{os.getpid()}/{token}/{names}|{snapshot.id or ''}|{segment}"


def _address(data) -> int:
    return numpy.frombuffer(data, numpy.uint8).ctypes.data


_TOKEN = numpy.frombuffer(bytearray(16), numpy.uint8)


def _new_token() -> None:
    """Draw this process's token: random bytes a reader finds at their address in the sender named by a remote
    source, or knows it reads some other process (another pid namespace, a reused pid) and falls back, as if
    refused. Drawn over the same bytes, at import and in a forked child: a new buffer would leave the child's copy
    of its parent's token in the memory it freed, at the address its parent's sources name, to be found there by
    a reader sent to the child (freed memory is not cleared; that an allocator writes over some of it is luck)."""
    _TOKEN[:] = numpy.frombuffer(os.urandom(16), numpy.uint8)


_new_token()
os.register_at_fork(after_in_child=_new_token)


def parse(source: str) -> tuple[int, tuple[int, bytes], dict[str, tuple[int, int]], Optional[str], str]:
    """(pid, (token address, token), {tensor name: (address, nbytes)}, the sender's snapshot id or None, segment
    source) of a remote source."""
    head, sender_id, segment = (source[len(REMOTE_PREFIX):].split("|", 2) + ["", ""])[:3]
    pid, token, names = (head.split("/", 2) + ["", ""])[:3]
    try:
        token_address, _, token_hex = token.partition("=")
        token_value = (_address_of(token_address), bytes.fromhex(token_hex))
        tensors = {}
        for entry in names.split(","):
            name, _, span = entry.partition("=")
            address, _, nbytes = span.partition("+")
            tensors[name] = (_address_of(address), _address_of(nbytes))
        if not is_remote(source) or not pid.isdigit() or len(token_value[1]) != 16 or not segment:
            raise ValueError
    except ValueError:
        raise ValueError(f"not a remote source: {source[:200]!r} (expected {REMOTE_PREFIX}<pid>/<address>=<token>/"
                         "<name>=<address>+<nbytes>,...|<snapshot id>|<segment>)") from None
    return int(pid), token_value, tensors, sender_id or None, segment


def _address_of(text: str) -> int:
    """A decimal address or length, refused (ValueError) outside 0 .. 2**64 - 1."""
    value = int(text) if text.isdigit() else -1
    if not 0 <= value < 1 << 64:
        raise ValueError(text)
    return value


class RemoteTensor(Tensor):
    """A tensor whose bytes lie in the sender's memory, named by a remote window. Its shape and size are known
    here; its bytes (`data`) are read from the sender on first use into a read-only copy, which is kept. Read
    them while the sender's call is in flight: after it returns, the window names memory the sender may reuse."""

    __slots__ = ("_window", "_copy")

    def __init__(self, dtype: str, shape: tuple, window: memoryview) -> None:
        self.dtype, self.shape, self._window, self._copy = dtype, shape, window, None

    @property
    def data(self) -> memoryview:
        if self._copy is None:
            self._copy = mover.fetched(self._window).toreadonly()
        return self._copy

    @property
    def nbytes(self) -> int:
        return len(self._window)

    @property
    def readonly(self) -> bool:
        return True  # the sender's bytes, never written from here

    def __copy__(self) -> "RemoteTensor":
        """The same window and copy (copy.copy would otherwise set `data`, which is read-only here)."""
        other = RemoteTensor(self.dtype, self.shape, self._window)
        other._copy = self._copy
        return other

    def __repr__(self) -> str:
        return f"RemoteTensor({self.dtype}, {list(self.shape)}, {self.nbytes} bytes)"


def scatter_view(tensor: Tensor) -> memoryview:
    """What mover.scatter_pages reads `tensor`'s pages from: a RemoteTensor's window (the scatter reads the sender
    where its bytes lie, in its one pass) or the bytes of any other tensor. Only for scatter_pages: any other
    read of a window faults."""
    return tensor._window if isinstance(tensor, RemoteTensor) else tensor.data


def open_remote(source: str, open_segment, *, verify: bool) -> Snapshot:
    """The snapshot a remote source names: `open_segment(segment source)` (unverified) for all but the KV, whose
    tensors read from the sender. Raises mover.RemoteReadError if they cannot be read (refused, or the sender
    gone), before the caller changes anything; refuses verify=True (nothing to verify the KV against)."""
    if verify:
        raise ValueError("a remote source carries no checksums for its KV (the sender's own memory, checked when "
                         "it came in): only a restore its sender made (thaw_format.sdk.lent.send) reads it")
    pid, (token_address, token), tensors, sender_id, segment = parse(source)
    mover.remote_token(pid, token_address, token)
    mover.remote_readable(pid, list(tensors.values()))
    snapshot = open_segment(segment)
    own = _kv_tensors(snapshot)
    if set(own) != set(tensors) or any(own[name].nbytes != n for name, (_, n) in tensors.items()):
        raise ValueError(f"remote source {source[:200]!r} names KV tensors its segment does not hold as such")
    for i, layer in enumerate(snapshot.kv.layers):
        for role, tensor in list(layer.tensors.items()):
            if f"kv/{i}/{role}" in tensors:
                address, nbytes = tensors[f"kv/{i}/{role}"]
                window = mover.remote_window(pid, address, nbytes)
                layer.tensors[role] = RemoteTensor(tensor.dtype, tensor.shape, window)
    # The sender's id, None for a snapshot built in memory and never saved (as the Snapshot itself in the sender
    # has: its id would count its KV's checksums, which this read never computes); never the segment's own,
    # counted over the zero checksums of the KV regions it left unwritten.
    snapshot.id = sender_id
    return snapshot
