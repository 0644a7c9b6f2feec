"""A Snapshot in this process sent to another process as a remote source (thaw_format.sdk.remote through
lent.send / lent.sending): a real child process opens it, its structure from the restore segment and its KV read
from this process's memory by the scatter, byte-identical; a reader asked to verify it refuses; and where the
system refuses the read (the child without CAP_SYS_PTRACE reading a process that is not dumpable, as Yama or a
seccomp filter would refuse it) the restore is made again from the restore segment, and every later one goes
there at once."""

import ctypes
import hashlib
import json
import os
import subprocess
import sys

import pytest
from exited import exited_pid

import thaw_format as tf
from thaw_format import mover
from thaw_format.sdk import lent, remote, shared

# The child: open the source, scatter every KV tensor (one page, one row of bytes) into a buffer of its own,
# print the digest of the bytes and of the rest of the snapshot, or the error. argv: source, "drop" to give up
# CAP_SYS_PTRACE first.
CHILD = r"""
import ctypes, hashlib, json, sys
import numpy as np
from thaw_format import mover
from thaw_format.sdk import lent, remote

if sys.argv[2] == "drop":  # capget/capset (version 3): clear CAP_SYS_PTRACE (19) from effective and permitted
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    assert libc.capget(header, data) == 0
    data[0] &= ~(1 << 19); data[1] &= ~(1 << 19)
    assert libc.capset(header, data) == 0
try:
    snapshot = lent.open_snapshot(sys.argv[1], verify=sys.argv[3] == "verify")
    h = hashlib.sha256()
    for layer in snapshot.kv.layers:
        for role in ("k", "v"):
            n, pages = layer.tensors[role].nbytes, remote.scatter_view(layer.tensors[role])
            assert isinstance(pages.obj, mover.RemoteWindow) == remote.is_remote(sys.argv[1])  # read by the scatter
            out = np.zeros(n, np.uint8)
            mover.scatter_pages(pages, out, [0], mover.PageLayout(1, np.zeros(1, np.int64), n, 1))
            h.update(out.tobytes())
    print(json.dumps({"kv": h.hexdigest(), "prefix": snapshot.prefix.tokens, "id": snapshot.id,
                      "rng": bytes(snapshot.scheduler.requests[0].rng_state.data).hex()}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def read_in_child(source: str, *, drop: bool = False, verify: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, source, "drop" if drop else "keep",
                          "verify" if verify else "trust"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected(snapshot) -> dict:
    h = hashlib.sha256()
    for layer in snapshot.kv.layers:
        for role in ("k", "v"):
            h.update(layer.tensors[role].data)
    return {"kv": h.hexdigest(), "prefix": snapshot.prefix.tokens, "id": snapshot.id,
            "rng": bytes(snapshot.scheduler.requests[0].rng_state.data).hex()}


class Engine:
    """A stand-in owner: send keys its restore segment and its remote refusal on it."""


@pytest.fixture
def native():
    if mover._lib is None:
        pytest.skip(f"libthaw not built: {mover.backend()}")


def test_a_snapshot_in_this_process_is_read_by_another_from_here(native, full_snapshot, tmp_path):
    tf.save(full_snapshot, tmp_path / "s.thaw")
    loaded = tf.load(tmp_path / "s.thaw")
    owner = Engine()
    source, checked = lent.send(owner, loaded)
    assert remote.is_remote(source) and checked and lent.last_sent(owner) == "remote"
    pid, _token, tensors, sender_id, _ = remote.parse(source)
    assert pid == os.getpid() and sorted(tensors) == ["kv/0/k", "kv/0/v", "kv/1/k", "kv/1/v"]
    assert sender_id == loaded.id == full_snapshot.id is not None
    assert read_in_child(source) == expected(loaded)  # the same id too: a capture after it names its parent
    assert "carries no checksums" in read_in_child(source, verify=True)["error"]


def test_a_snapshot_never_saved_reaches_the_reader_without_an_id(native, full_snapshot):
    """A snapshot built in memory has no id (its id counts the checksums of its KV, which the remote read never
    computes): the source says so with an empty id, and the reader's snapshot has id None, as the Snapshot
    itself handed to an engine in the sender's process has; never the id of the segment, counted over the zeros
    left for the KV."""
    owner = Engine()
    source, _ = lent.send(owner, full_snapshot)
    assert full_snapshot.id is None and source.split("|")[1] == "" and remote.parse(source)[3] is None
    assert read_in_child(source) == expected(full_snapshot) and expected(full_snapshot)["id"] is None


def _not_dumpable():
    """This process made not dumpable, so that only a reader with CAP_SYS_PTRACE may read its memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_DUMPABLE = 4
    assert libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    return lambda: libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


def test_a_refused_read_falls_back_to_the_restore_segment_for_good(native, full_snapshot, tmp_path):
    tf.save(full_snapshot, tmp_path / "s.thaw")  # an id, which either way reaches the reader
    owner, calls = Engine(), []

    def restore(source, checked):
        calls.append(source)
        result = read_in_child(source, drop=True)
        if "error" in result:
            raise RuntimeError(result["error"])  # as an engine's RPC reports it: its text
        return result

    undo = _not_dumpable()
    try:
        assert lent.sending(owner, full_snapshot, restore) == expected(full_snapshot)
    finally:
        undo()
    assert remote.is_remote(calls[0]) and not remote.is_remote(calls[1]) and len(calls) == 2
    assert remote.refused(owner) and lent.last_sent(owner) == "segment"
    assert lent.sending(owner, full_snapshot, restore) == expected(full_snapshot)
    assert len(calls) == 3 and not remote.is_remote(calls[2])  # straight to the segment: no second try


@pytest.mark.parametrize("chunk_size", [None, 1 << 16], ids=["never saved", "saved in 64 KiB chunks"])
def test_a_snapshot_sent_through_the_restore_segment_reaches_the_reader_under_its_own_id(native, full_snapshot,
                                                                                       tmp_path, chunk_size):
    """The restore segment holds the snapshot encoded again, in this encoder's chunks: an id of its own, not the
    sender's (None for a snapshot never saved; a file's, counted over its own chunks). The source names the
    sender's, and the reader's snapshot has it, as a remote source's has (the id an engine records as the lineage
    parent of its captures)."""
    snapshot = full_snapshot
    if chunk_size is not None:
        tf.save(full_snapshot, tmp_path / "s.thaw", chunk_size=chunk_size)
        snapshot = tf.load(tmp_path / "s.thaw")
    owner = Engine()
    remote.refuse(owner)
    source, checked = lent.send(owner, snapshot)
    assert checked and lent.last_sent(owner) == "segment"
    assert shared.sent_id(source) == (True, snapshot.id) and (snapshot.id is None) == (chunk_size is None)
    # the segment's own id, as a reader of the segment alone counts it, is another
    own_id = lent.open_snapshot(source.partition("|")[0], verify=True).id
    assert own_id.startswith("sha256:") and own_id != snapshot.id
    assert read_in_child(source) == expected(snapshot)
    # every reader of a segment source knows it by the sender's id: in place, copied out, or as a source string
    for read in (shared.read_shared(source), shared.read_shared(source, copy=True), shared.read_source(source)):
        assert expected(read) == expected(snapshot)


@pytest.mark.parametrize("source", ["shm://thaw_x#12x|sha256:ab", "shm://thaw_x#\u00b2", "shm://#12", "file://x"])
def test_a_malformed_segment_source_is_refused_by_name(source):
    for read in (shared.read_shared, lent.open_snapshot):
        with pytest.raises(ValueError, match="not a shared-memory source: '"):
            read(source)


def test_a_pid_that_is_not_the_sender_counts_as_a_refusal(native, full_snapshot):
    """As in another pid namespace or after the pid's reuse: whatever process the pid names from the reader, or
    none, it does not hold the sender's token, so the reader refuses before reading any KV (and the restore
    falls back to the segment)."""
    source, _ = lent.send(Engine(), full_snapshot)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with exited_pid() as gone:
            for pid in (gone, other.pid):
                rest = source[len(remote.REMOTE_PREFIX):].partition("/")[2]
                error = read_in_child(f"{remote.REMOTE_PREFIX}{pid}/{rest}")["error"]
                assert error.startswith("RemoteReadError") and mover.RemoteReadError.REFUSED in error
                assert f"process {pid} seen from here is not the sender" in error
    finally:
        other.kill()
        other.wait()


# A sender that forks a child (a worker forked without exec holds a copy of its memory) and reads it: the child's
# token as it reports it, the 16 bytes at the sender's token address in the child, and remote_token's verdict.
FORKED = r"""
import json, os
from thaw_format import mover
from thaw_format.sdk import remote
address, token = remote._address(remote._TOKEN), bytes(remote._TOKEN)
(told, tell), (wait, done) = os.pipe(), os.pipe()
pid = os.fork()
if pid == 0:
    os.write(tell, bytes(remote._TOKEN))
    os.read(wait, 1)
    os._exit(0)
own = os.read(told, 16)
found = bytes(mover.fetched(mover.remote_window(pid, address, 16)))
try:
    mover.remote_token(pid, address, token)
    verdict = "taken for the sender"
except mover.RemoteReadError as error:
    verdict = str(error)
os.write(done, b"x")
os.waitpid(pid, 0)
print(json.dumps({"token": token.hex(), "own": own.hex(), "found": found.hex(), "verdict": verdict}))
"""


def test_a_forked_child_holds_its_own_token_where_its_parent_held_the_senders(native):
    """The child draws its token over the bytes its copy of the sender's token was in: a reader sent to the child's
    pid finds the child's own token at the address the sender's sources name, never the sender's left in memory
    the child freed, and refuses."""
    out = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["own"] != result["token"] and result["found"] == result["own"]
    assert mover.RemoteReadError.REFUSED in result["verdict"] and "is not the sender" in result["verdict"]


@pytest.mark.parametrize("bad", ["x/1=" + "00" * 16 + "/kv/0/k=1+2", "1/1=00/kv/0/k=1+2",
                                 "1/1=" + "00" * 16 + "/kv/0/k=-1+2", "1/1=" + "00" * 16 + f"/kv/0/k=1+{1 << 64}"])
def test_a_malformed_remote_source_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="not a remote source"):
        remote.parse(f"{remote.REMOTE_PREFIX}{bad}||shm://a#1")


# The child: open the source and read its KV every way but the scatter (bytes, equality, copies, numpy, a save
# and load), printing the digests; a read of the sender's address here would end it with SIGSEGV instead.
READERS = r"""
import copy, hashlib, json, sys
import thaw_format as tf
from thaw_format.numpy import to_numpy
from thaw_format.sdk import lent

snapshot = lent.open_snapshot(sys.argv[1], verify=False)
tensors = [layer.tensors[role] for layer in snapshot.kv.layers for role in ("k", "v")]
digests = {"tobytes": hashlib.sha256(b"".join(t.tobytes() for t in tensors)).hexdigest(),
           "numpy": hashlib.sha256(b"".join(to_numpy(t).tobytes() for t in tensors)).hexdigest(),
           "equal": all(t == t.copy() == copy.copy(t) for t in tensors), "readonly": all(t.readonly for t in tensors)}
tf.save(snapshot, sys.argv[2])
saved = tf.load(sys.argv[2])
digests["saved"] = hashlib.sha256(b"".join(layer.tensors[role].tobytes() for layer in saved.kv.layers
                                          for role in ("k", "v"))).hexdigest()
print(json.dumps(digests))
"""


def test_every_other_read_of_a_remote_kv_fetches_it_from_the_sender(native, full_snapshot, tmp_path):
    """Only the scatter reads a remote source's KV where it lies in the sender; every other reader of its tensors
    (their bytes, equality, a copy, numpy, a save) gets them read from the sender into a copy here first, never the
    sender's address dereferenced in the reader's process."""
    owner = Engine()  # holds the restore segment the source names
    source, _ = lent.send(owner, full_snapshot)
    assert remote.is_remote(source)
    out = subprocess.run([sys.executable, "-c", READERS, source, str(tmp_path / "copy.thaw")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    kv = hashlib.sha256(b"".join(layer.tensors[role].tobytes() for layer in full_snapshot.kv.layers
                                 for role in ("k", "v"))).hexdigest()
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"tobytes": kv, "numpy": kv, "equal": True,
                                                                "readonly": True, "saved": kv}
