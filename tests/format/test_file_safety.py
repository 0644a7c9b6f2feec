"""Paths: what the reader opens (regular files only), what it does when a file changes under it, and the
mode, cleanup and symlink behaviour of the atomic save."""

import errno
import gc
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
import sync_counts

import thaw_format as tf
from thaw_format.tensor import Tensor


def labelled(label: str) -> tf.Snapshot:
    """Same tensors and sizes for every label of one length: two such files differ only in their header."""
    weights = tf.Weights({"w": Tensor("uint8", (3 << 20,), bytes(range(256)) * (3 << 12))})
    return tf.Snapshot(weights=weights, lineage=tf.Lineage(label=label))


def rewrite_in_place(path, snapshot: tf.Snapshot) -> None:
    data = tf.dumps(snapshot)
    with open(path, "r+b") as f:  # in place: same inode, no rename
        f.write(data)
        f.truncate()


def finishes(call) -> BaseException:
    """Run `call` in a thread; it must end (not block) within 10 s. Returns what it raised."""
    raised = []

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "blocked"
    return raised[0] if raised else None


@pytest.mark.parametrize("entry", ["load", "load_mmap", "open", "verify", "load_file"])
def test_non_regular_files_are_refused_without_blocking(tmp_path, entry):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    call = {"load": tf.load, "load_mmap": lambda p: tf.load(p, mmap=True), "open": tf.open, "verify": tf.verify,
            "load_file": tf.load_file}[entry]
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a directory")):
        exc = finishes(lambda: call(path))
        assert isinstance(exc, tf.CorruptSnapshotError) and f"is {kind}, not a regular file" in str(exc), exc


def test_load_file_refuses_a_fifo_before_importing_torch(tmp_path):
    """In a fresh interpreter, torch not yet imported: the refusal comes first. That import takes seconds on a first
    call and over a minute was measured on a busy machine, where the test above then found load_file "blocked"."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = ("import sys, thaw_format as tf\n"
            "try:\n    tf.load_file(sys.argv[1])\n"
            "except tf.CorruptSnapshotError as exc:\n    print(exc)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [f"{str(fifo)!r} is a FIFO, not a regular file", "False"]


def test_a_file_rewritten_in_place_during_a_copying_load_is_refused(tmp_path):
    path = tmp_path / "s.thaw"
    tf.save(labelled("AAAA"), path)
    other = labelled("BBBB")  # same data and trailer, another header: only a header check can tell
    with tf.open(path) as f:
        rewrite_in_place(path, other)
        with pytest.raises(tf.CorruptSnapshotError, match="changed while being read"):
            f.snapshot()
    with tf.open(path) as f:
        rewrite_in_place(path, labelled("CCCC"))
        for call in (lambda: f.snapshot(copy=False), lambda: f.tensor("weights/w"), f.verify):
            with pytest.raises(tf.CorruptSnapshotError, match="changed while being read"):
                call()


def test_a_rewrite_during_the_data_read_is_refused(tmp_path):
    path = tmp_path / "s.thaw"
    tf.save(labelled("AAAA"), path)
    once = []

    def progress(_):
        if not once:
            once.append(1)
            rewrite_in_place(path, labelled("BBBB"))

    with pytest.raises(tf.CorruptSnapshotError, match="changed while being read"):
        tf.load(path, progress=progress)
    assert tf.load(path).lineage.label == "BBBB"


def test_save_into_an_existing_directory_leaves_no_temporary(tmp_path):
    (tmp_path / "target").mkdir()
    with pytest.raises(IsADirectoryError):
        tf.save(labelled("A"), tmp_path / "target")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_save_follows_the_umask_and_keeps_an_existing_mode(tmp_path):
    path = tmp_path / "s.thaw"
    old = os.umask(0o077)
    try:
        tf.save(labelled("A"), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        os.umask(0o022)
        tf.save(labelled("B"), path)  # replacing: the file keeps its 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        path.chmod(0o640)
        tf.save(labelled("C"), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        tf.save(labelled("D"), tmp_path / "new.thaw")
        assert stat.S_IMODE((tmp_path / "new.thaw").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_save_replaces_a_symlink_and_leaves_its_target(tmp_path):
    target, link = tmp_path / "target.thaw", tmp_path / "link.thaw"
    tf.save(labelled("A"), target)
    link.symlink_to(target)
    tf.save(labelled("B"), link)
    assert not link.is_symlink() and tf.load(link).lineage.label == "B"
    assert tf.load(target).lineage.label == "A"


def test_a_checkpoint_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    exc = finishes(lambda: tf.checkpoint_weights_digest(tmp_path))
    assert isinstance(exc, ValueError) and "a FIFO, not a regular file" in str(exc), exc


@pytest.fixture
def syncs(monkeypatch):
    return sync_counts.count(monkeypatch)


@pytest.mark.parametrize("durable,fsyncs", [(True, 2), (False, 0)])
def test_a_save_fsyncs_file_and_folder_unless_not_durable_and_writes_the_same_bytes(tmp_path, syncs, durable, fsyncs):
    snapshot = labelled("A")
    path = tmp_path / "s.thaw"
    assert tf.save(snapshot, path, durable=durable) == snapshot.id
    assert syncs["fsync"] == fsyncs
    assert path.read_bytes() == tf.dumps(labelled("A"))
    assert tf.save_file({"w": np.arange(256, dtype=np.uint8)}, tmp_path / "w.thaw", durable=durable)
    assert syncs["fsync"] == 2 * fsyncs


@pytest.mark.parametrize("durable", [True, False])
def test_a_filled_save_starts_writeback_and_fsyncs_only_when_durable(tmp_path, syncs, durable):
    """The one-pass path (tensors gathered by a fill function into stages written out by pwrite)."""
    from thaw_format import mover
    from thaw_format.writer import EncodedSnapshot, deferred_tensor

    data = labelled("A").weights.tensors["w"]
    snapshot = tf.Snapshot(weights=tf.Weights({"w": deferred_tensor(data.dtype, data.shape)}),
                           lineage=tf.Lineage(label="A"))
    fill = {"weights/w": lambda target, chunk_size: mover.copy_with_crcs(data.data, target, chunk_size)}
    path = tmp_path / "s.thaw"
    EncodedSnapshot(snapshot).save(path, fill=fill, durable=durable)
    assert path.read_bytes() == tf.dumps(labelled("A"))
    assert (syncs["fsync"], syncs["writeback"] > 0) == ((2, True) if durable else (0, False))


@pytest.mark.parametrize("durable", [True, False])
@pytest.mark.parametrize("replacing", [True, False])
def test_a_save_that_fails_midway_leaves_the_old_file_or_none_and_no_temporary(tmp_path, durable, replacing):
    path = tmp_path / "s.thaw"
    if replacing:
        tf.save(labelled("A"), path)
    old = path.read_bytes() if replacing else None

    def at_final_name():
        return path.read_bytes() if path.exists() else None

    def fail(done):
        assert at_final_name() == old  # the new bytes never show under the final name while written
        raise RuntimeError("stopped midway")

    with pytest.raises(RuntimeError, match="midway"):
        tf.save(labelled("B"), path, progress=fail, durable=durable)
    assert at_final_name() == old
    assert [p.name for p in tmp_path.iterdir()] == (["s.thaw"] if replacing else [])


class _ToFile:
    """A fill that writes its region straight into the file (as thaw_mlx's does), `extra` bytes too many (or,
    negative, too few), and says how many it wrote, with the CRCs of the right bytes (`crcs_extra` more)."""

    def __init__(self, data: bytes, extra: int, crcs_extra: int = 0) -> None:
        self.data, self.extra, self.crcs_extra = data, extra, crcs_extra

    def __call__(self, target, chunk_size):
        raise AssertionError("the writer stages a fill that can write to the file itself")

    def to_file(self, fd, offset, chunk_size, progress=None):
        from thaw_format import mover

        written = self.data + b"\xff" * self.extra if self.extra > 0 else self.data[: len(self.data) + self.extra]
        mover.pwrite_all(fd, memoryview(written), offset)
        crcs = mover.chunk_crcs(self.data, chunk_size)
        return len(written), crcs + crcs[: self.crcs_extra]


@pytest.mark.parametrize("extra, crcs_extra, wrong", [
    (0, 0, None),
    (1, 0, "wrote 3145829 bytes into its 3145828-byte region"),
    (5000, 0, "wrote 3150828 bytes into its 3145828-byte region"),  # over the padding into "x"'s region
    (-1, 0, "wrote 3145827 bytes into its 3145828-byte region"),
    (-(3 << 20) - 100, 0, "wrote 0 bytes into its 3145828-byte region"),
    (0, 1, "returned 5 CRCs for 4 chunks"),
])
@pytest.mark.parametrize("replacing", [True, False])
def test_a_fill_that_writes_its_region_a_wrong_length_is_refused_and_leaves_no_new_file(tmp_path, extra, crcs_extra,
                                                                                      wrong, replacing):
    """The writer takes to_file's count of the bytes it wrote and refuses any other than its region's length,
    wherever the bytes went: past its region (this one ends 100 bytes past a 4096 boundary) into the padding
    and the next tensor's region, which the writer would write over, or short of its end."""
    from thaw_format.writer import EncodedSnapshot, deferred_tensor

    data = bytes(range(256)) * (3 << 12) + bytes(range(100))
    after = Tensor("uint8", (8192,), bytes(8192))
    whole = tf.Snapshot(weights=tf.Weights({"w": Tensor("uint8", (len(data),), data), "x": after}))
    deferred = tf.Snapshot(weights=tf.Weights({"w": deferred_tensor("uint8", (len(data),)), "x": after}))
    path = tmp_path / "s.thaw"
    if replacing:
        tf.save(labelled("B"), path)
    old = path.read_bytes() if replacing else None
    save = lambda: EncodedSnapshot(deferred).save(path, fill={"weights/w": _ToFile(data, extra, crcs_extra)})  # noqa: E731
    if wrong is None:
        save()
        assert path.read_bytes() == tf.dumps(whole)
        return
    with pytest.raises(ValueError, match=f"fill of 'weights/w' {wrong}"):
        save()
    assert (path.read_bytes() if path.exists() else None) == old
    assert [p.name for p in tmp_path.iterdir()] == (["s.thaw"] if replacing else [])


def test_a_write_that_takes_nothing_raises_instead_of_looping(tmp_path, monkeypatch):
    """os.pwrite returning 0 (nothing written, no error) would repeat the same write forever: the save's header
    and the portable path's regions are written by mover.pwrite_all."""
    from thaw_format import mover

    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    raised = finishes(lambda: tf.save(labelled("A"), tmp_path / "s.thaw"))
    assert isinstance(raised, OSError) and "pwrite wrote nothing of" in str(raised)
    assert list(tmp_path.iterdir()) == []
    with open(tmp_path / "r", "wb") as f:
        raised = finishes(lambda: mover._py_write_regions(f.fileno(), [(0, bytes(8192), 4096)]))
    assert isinstance(raised, OSError) and "pwrite wrote nothing of 8192 bytes at offset 0" in str(raised)


def test_a_save_into_a_missing_folder_names_the_folder_not_a_temporary(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        tf.save(labelled("A"), tmp_path / "nope" / "s.thaw")
    assert caught.value.filename == str(tmp_path / "nope") and "thaw-tmp" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match="folder .* does not exist"):  # "~" is not expanded, as in open()
        tf.save(labelled("A"), "~no-such-user-folder/s.thaw")


def test_a_save_over_a_directory_is_refused_before_writing_any_data(tmp_path, monkeypatch):
    (tmp_path / "target").mkdir()
    written = []
    with pytest.raises(IsADirectoryError) as caught:
        tf.save(labelled("A"), tmp_path / "target", progress=written.append)
    assert written == [] and caught.value.filename == str(tmp_path / "target")  # it wrote 3 MiB, then failed
    with pytest.raises(IsADirectoryError, match="separator"):  # the temporary was "..<hex>.thaw-tmp", written
        tf.save(labelled("A"), f"{tmp_path}/new.thaw/", progress=written.append)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(FileNotFoundError, match="empty path"):  # the temporary went to the parent, tmp_path
        tf.save(labelled("A"), "", progress=written.append)
    assert written == [] and sorted(p.name for p in tmp_path.iterdir()) == ["here", "target"]


@pytest.mark.parametrize("name", ["new.thaw/.", "new.thaw/..", ".", ".."])
def test_a_path_ending_in_a_dot_names_a_folder_and_is_refused_before_writing(tmp_path, monkeypatch, name):
    # abspath dropped the dot: "new.thaw/." (new.thaw missing) wrote the whole snapshot in the current folder, then
    # failed at the rename naming the temporary
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    written = []
    with pytest.raises(IsADirectoryError, match="names a folder") as caught:
        tf.save(labelled("A"), name, progress=written.append)
    assert written == [] and caught.value.filename == name
    assert [p.name for p in tmp_path.rglob("*")] == ["here"]


def test_the_folder_is_checked_as_spelt_and_named_as_the_user_wrote_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_bytes(b"x")
    written = []
    # abspath made "missing/.." the current folder: the whole temporary was written there, then the rename failed
    with pytest.raises(FileNotFoundError, match="does not exist") as caught:
        tf.save(labelled("A"), "missing/../s.thaw", progress=written.append)
    assert caught.value.filename == "missing/.."
    with pytest.raises(FileNotFoundError) as caught:
        tf.save(labelled("A"), "missing/s.thaw", progress=written.append)
    assert caught.value.filename == "missing"  # was the absolute folder
    with pytest.raises(NotADirectoryError, match="exists but is not a folder") as caught:  # was "does not exist"
        tf.save(labelled("A"), "file.txt/s.thaw", progress=written.append)
    assert caught.value.filename == "file.txt"
    with pytest.raises(NotADirectoryError, match="part of the path") as caught:
        tf.save(labelled("A"), "file.txt/sub/s.thaw", progress=written.append)
    assert caught.value.filename == "file.txt/sub"
    assert written == [] and os.listdir(tmp_path) == ["file.txt"]


def test_a_symlink_to_a_folder_is_saved_through_as_its_parent_and_replaced_as_its_path(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "via").symlink_to(tmp_path / "real")
    (tmp_path / "up").symlink_to(tmp_path / "elsewhere" / "deep")
    monkeypatch.chdir(tmp_path)
    tf.save(labelled("A"), "via/s.thaw")
    assert tf.load(tmp_path / "real" / "s.thaw").lineage.label == "A"
    tf.save(labelled("B"), "up/../s.thaw")  # the kernel's "..": beside deep, in elsewhere, as the rename resolves it
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["deep", "s.thaw"]
    assert tf.load("up/../s.thaw").lineage.label == "B"
    tf.save(labelled("C"), "via")  # a link at the path itself is replaced, its folder left alone
    assert not (tmp_path / "via").is_symlink() and tf.load("via").lineage.label == "C"
    assert os.listdir(tmp_path / "real") == ["s.thaw"]


def test_save_takes_a_bytes_path_as_load_does(tmp_path):
    path = os.fsencode(tmp_path / "s.thaw")
    snapshot_id = tf.save(labelled("A"), path)  # was TypeError: Can't mix strings and bytes in path components
    assert tf.load(path).id == snapshot_id


@pytest.mark.parametrize("name", ["a" * 250 + ".thaw", "é" * 125 + ".thaw"])  # 255 and 255 bytes
def test_a_file_name_of_the_longest_length_saves(tmp_path, name):
    # The temporary beside it added 23 bytes to the name: File name too long, for a name open() takes.
    snapshot_id = tf.save(labelled("A"), tmp_path / name)
    assert tf.load(tmp_path / name).id == snapshot_id and os.listdir(tmp_path) == [name]


def test_a_folder_that_refuses_the_save_is_named_with_the_users_path_not_the_temporary(tmp_path):
    """The PermissionError named the `.thaw-tmp` file beside the target, which the user never asked for. As root
    a folder's mode refuses nothing, so there the folder is /sys, where the kernel refuses a new file."""
    if os.geteuid() == 0:
        folder = "/sys"
    else:
        folder = str(tmp_path / "read-only")
        os.mkdir(folder, 0o555)
    path = os.path.join(folder, "s.thaw")
    with pytest.raises(PermissionError) as refused:
        tf.save(labelled("A"), path)
    assert refused.value.filename == path and refused.value.filename2 is None
    assert refused.value.errno == errno.EACCES and refused.value.strerror == os.strerror(errno.EACCES)
    assert str(refused.value) == f"[Errno 13] Permission denied: {path!r}"


def test_a_snapshot_file_dropped_without_close_releases_its_descriptor(tmp_path):
    path = tmp_path / "s.thaw"
    tf.save(labelled("A"), path)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        f = tf.open(path)
        mapped = f.tensor("weights/w", copy=False)
    del f
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 1  # was 50 more: each open kept its descriptor forever
    assert mapped.tobytes()[:3] == bytes(range(3))  # a view outlives its file object (its mapping has its own)


def test_a_fills_own_error_keeps_its_name_and_a_write_error_names_the_target(tmp_path, monkeypatch):
    """A staged fill writes memory, not the file: an OSError it raises without a file name (a device that went
    away) was given the target's name, as if the file were at fault. A write into the file without a name (a full
    disk) still names the target."""
    from thaw_format import mover
    from thaw_format.writer import EncodedSnapshot, deferred_tensor

    data = labelled("A").weights.tensors["w"]
    snapshot = tf.Snapshot(weights=tf.Weights({"w": deferred_tensor(data.dtype, data.shape)}))
    path = str(tmp_path / "s.thaw")

    def gone(target, chunk_size):
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    with pytest.raises(OSError) as caught:
        EncodedSnapshot(snapshot).save(path, fill={"weights/w": gone})
    assert caught.value.errno == errno.ENODEV and caught.value.filename is None
    assert os.listdir(tmp_path) == []

    # The disk fills at the filled region: the stage's write on the save's writer thread fails (the header's, on
    # the calling thread, goes through), its error re-raised by the save through the thread's future.
    region_offset, failed_on = EncodedSnapshot(snapshot).layout.regions[0].offset, []
    pwrite = os.pwrite

    def full_from_the_region(fd, data, offset):
        if offset < region_offset:
            return pwrite(fd, data, offset)
        failed_on.append(threading.current_thread().name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_from_the_region)
    copy = {"weights/w": lambda target, chunk_size: mover.copy_with_crcs(data.data, target, chunk_size)}
    with pytest.raises(OSError) as caught:
        EncodedSnapshot(snapshot).save(path, fill=copy)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == path
    assert os.listdir(tmp_path) == []
    assert failed_on and all(name.startswith("thaw-save") for name in failed_on), failed_on


class _ThreeArgumentToFile(_ToFile):
    def to_file(self, fd, offset, chunk_size):  # the form fills had before to_file took the progress hook
        return super().to_file(fd, offset, chunk_size)


@pytest.mark.parametrize("written_by", ["the save", "a staged fill", "to_file", "a three-argument to_file"])
def test_a_progress_hooks_own_error_is_not_renamed_to_the_target(tmp_path, written_by):
    """A hook printing to a closed pipe raises BrokenPipeError, naming no file: it is the hook's, not the file's,
    wherever the hook is called from (the save's writes, its writer thread, a to_file's return)."""
    from thaw_format import mover
    from thaw_format.writer import EncodedSnapshot, deferred_tensor

    data = labelled("A").weights.tensors["w"].data
    deferred = tf.Snapshot(weights=tf.Weights({"w": deferred_tensor("uint8", (len(data),))}))
    fill = {"a staged fill": lambda target, chunk_size: mover.copy_with_crcs(data, target, chunk_size),
            "to_file": _ToFile(data, 0), "a three-argument to_file": _ThreeArgumentToFile(data, 0)}
    path = str(tmp_path / "s.thaw")

    def closed_pipe(nbytes):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    with pytest.raises(BrokenPipeError) as caught:
        if written_by == "the save":
            tf.save(labelled("A"), path, progress=closed_pipe)
        else:
            EncodedSnapshot(deferred).save(path, closed_pipe, fill={"weights/w": fill[written_by]})
    assert caught.value.filename is None  # was the target's
    assert os.listdir(tmp_path) == []


def test_a_three_argument_to_file_still_saves_and_is_reported_when_it_returns(tmp_path):
    from thaw_format.writer import EncodedSnapshot, deferred_tensor

    whole = labelled("A")
    data = whole.weights.tensors["w"].data
    deferred = tf.Snapshot(weights=tf.Weights({"w": deferred_tensor("uint8", (len(data),))}), lineage=whole.lineage)
    path, calls = tmp_path / "s.thaw", []
    EncodedSnapshot(deferred).save(path, calls.append, fill={"weights/w": _ThreeArgumentToFile(data, 0)})
    assert path.read_bytes() == tf.dumps(whole) and calls == [len(data)]


def test_the_writer_keeps_no_to_file_alive(tmp_path):
    """The writer remembers per function whether a to_file takes the progress hook, weakly: a to_file made per
    fill (a closure) is not kept after its save, nor what it holds (for thaw_mlx, a cache's arrays)."""
    import weakref
    from types import SimpleNamespace

    from thaw_format.writer import EncodedSnapshot, deferred_tensor

    whole = labelled("A")
    held = _ToFile(whole.weights.tensors["w"].data, 0)
    deferred = tf.Snapshot(weights=tf.Weights({"w": deferred_tensor("uint8", (len(held.data),))}),
                           lineage=whole.lineage)

    def to_file(fd, offset, chunk_size, progress=None):
        return held.to_file(fd, offset, chunk_size)

    EncodedSnapshot(deferred).save(tmp_path / "s.thaw", fill={"weights/w": SimpleNamespace(to_file=to_file)})
    assert (tmp_path / "s.thaw").read_bytes() == tf.dumps(whole)
    gone = weakref.ref(to_file)
    del to_file
    assert gone() is None
