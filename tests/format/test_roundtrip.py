"""Every dtype and shape round-trips bit-exactly, through every sink and source."""

import errno
import io
import mmap
import os
import traceback
from array import array
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import thaw_format as tf
from thaw_format.dtypes import ITEMSIZE
from thaw_format.torch import from_torch, to_torch

TORCH_DTYPES = [getattr(torch, name) for name in ITEMSIZE]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


@st.composite
def torch_tensors(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    n = 1
    for d in shape:
        n *= d
    raw = draw(st.binary(min_size=n * ITEMSIZE[str(dtype)[6:]], max_size=n * ITEMSIZE[str(dtype)[6:]]))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    if len(shape) >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # a non-contiguous input
    return t


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), torch_tensors(), max_size=6))
def test_random_tensor_sets_round_trip(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("rt") / "w.thaw"
    tf.save_file(tensors, path)
    back = tf.load_file(path)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert same_bytes(t, back[name]), name


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_torch_dtype(tmp_path, dtype):
    t = torch.arange(96, dtype=torch.uint8).view(dtype).reshape(2, -1)  # 96 bytes suit every item size
    tensors = {"t": t, "scalar": t.reshape(-1)[0].clone(), "empty": t[:0]}
    tf.save_file(tensors, tmp_path / "d.thaw")
    back = tf.load_file(tmp_path / "d.thaw")
    for name in tensors:
        assert same_bytes(tensors[name], back[name]), name


def test_all_sinks_give_the_same_bytes(tmp_path, full_snapshot):
    path = tmp_path / "s.thaw"
    file_id = tf.save(full_snapshot, path)
    on_disk = path.read_bytes()
    assert tf.dumps(full_snapshot) == on_disk
    stream = io.BytesIO()
    assert tf.write(full_snapshot, stream) == file_id
    assert stream.getvalue() == on_disk
    assert file_id == tf.load(path).id == tf.loads(on_disk).id


def test_stream_to_a_pipe(full_snapshot):
    expected = tf.dumps(full_snapshot)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child streams into the pipe; the parent reads it all
        os.close(read_fd)
        with os.fdopen(write_fd, "wb") as out:
            tf.write(full_snapshot, out)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as src:
        got = src.read()
    os.waitpid(pid, 0)
    assert got == expected


def test_full_snapshot_round_trips_every_section(tmp_path, full_snapshot):
    tf.save(full_snapshot, tmp_path / "s.thaw")
    for back in (tf.load(tmp_path / "s.thaw"), tf.load(tmp_path / "s.thaw", mmap=True),
                 tf.loads(tf.dumps(full_snapshot)), tf.loads(tf.dumps(full_snapshot), copy=False)):
        assert back == full_snapshot


def test_loads_from_shared_memory_and_mmap(tmp_path, full_snapshot):
    encoded = tf.EncodedSnapshot(full_snapshot)
    shm = shared_memory.SharedMemory(create=True, size=encoded.nbytes)
    try:
        snapshot_id = encoded.write_into(shm.buf)
        back = tf.loads(shm.buf[: encoded.nbytes])
        assert back == full_snapshot and back.id == snapshot_id
        del back
    finally:
        shm.close()
        shm.unlink()
    path = tmp_path / "s.thaw"
    tf.save(full_snapshot, path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert tf.loads(m) == full_snapshot


def test_open_reads_one_tensor_lazily(tmp_path, full_snapshot):
    tf.save(full_snapshot, tmp_path / "s.thaw")
    with tf.open(tmp_path / "s.thaw") as f:
        assert "weights/embed.weight" in f.names()
        t = f.tensor("weights/norm.weight")
        assert t == full_snapshot.weights.tensors["norm.weight"]
        view = f.tensor("weights/embed.weight", copy=False)
        assert view == full_snapshot.weights.tensors["embed.weight"]
        del view


def test_mmap_views_are_zero_copy_and_never_write_back(tmp_path):
    path = tmp_path / "w.thaw"
    tf.save_file({"x": torch.ones(1024)}, path)
    before = path.read_bytes()
    snap = tf.load(path, mmap=True)
    x = to_torch(snap.weights.tensors["x"])
    x.add_(1)  # copy-on-write: the process sees its change, the file does not
    assert float(x[0]) == 2.0
    assert path.read_bytes() == before


@pytest.mark.parametrize("source", ["path", "buffer"])
def test_loaded_tensors_are_writable_and_independent_though_they_share_arenas(tmp_path, source):
    from thaw_format import reader

    half = (reader._ARENA_BYTES >> 1) + 1
    sizes = [0, 7, 4096, 1, half, 5, half, 9, 2, reader._ARENA_BYTES + 1]  # three arenas, the last its own
    tensors = {f"t{i}": torch.full((n,), i, dtype=torch.uint8) for i, n in enumerate(sizes)}
    path = tmp_path / "many.thaw"
    tf.save_file(tensors, path)
    loaded = tf.load(path) if source == "path" else tf.loads(path.read_bytes())
    views = [loaded.weights.tensors[name].data for name in tensors]
    assert all(not v.readonly for v in views)
    arenas = {}
    for view in views:
        arenas.setdefault(id(view.obj), []).append(view)
    assert len(arenas) == 3
    assert all(len(shared[0].obj) <= reader._ARENA_BYTES for shared in arenas.values() if len(shared) > 1)
    for i, view in enumerate(views):
        view[:] = bytes([100 + i]) * len(view)  # writing one tensor touches no other
    for i, (name, view) in enumerate(zip(tensors, views)):
        assert view.tobytes() == bytes([100 + i]) * sizes[i], name
    kept = loaded.weights.tensors["t1"]
    del loaded, views
    assert kept.tobytes() == bytes([101]) * 7  # valid on its own: its view keeps its arena alive


def test_torch_binding_round_trip_is_zero_copy_for_writable_data():
    t = torch.randn(3, 5)
    thawed = from_torch(t)
    back = to_torch(thawed)
    back[0, 0] = 123.0
    assert float(t[0, 0]) == 123.0  # same memory


def test_numpy_binding():
    np = pytest.importorskip("numpy")
    from thaw_format.numpy import from_numpy, to_numpy

    a = np.arange(12, dtype=np.int16).reshape(3, 4).T
    t = from_numpy(a)
    assert t.dtype == "int16" and t.shape == (4, 3)
    assert (to_numpy(t) == a).all()
    big_endian = np.arange(4, dtype=">u4")
    assert to_numpy(from_numpy(big_endian)).tolist() == [0, 1, 2, 3]


def test_save_is_atomic_and_leaves_no_temporary(tmp_path, full_snapshot):
    path = tmp_path / "s.thaw"
    tf.save(full_snapshot, path)
    old = path.read_bytes()
    full_snapshot.metadata["generation"] = "2"
    tf.save(full_snapshot, path)
    assert path.read_bytes() != old
    assert sorted(os.listdir(tmp_path)) == ["s.thaw"]


def test_writer_is_deterministic(full_snapshot):
    assert tf.dumps(full_snapshot) == tf.dumps(tf.loads(tf.dumps(full_snapshot)))


def _kv_snapshot(v_head_dim, params=None):
    k = np.zeros((1, 4, 2, 8), np.float32)
    v = np.ones((1, 4, 2, v_head_dim), np.float32)
    layer = tf.KVLayer("attention", {"k": k, "v": v}, num_kv_heads=2, head_dim=8, params=params or {})
    return tf.Snapshot(kv=tf.KVCache(4, "float32", [layer]), prefix=tf.PrefixTree(parents=[-1], tokens=[[1, 2]]))


def test_v_head_dim_sets_required_bit_1_and_version_1_1():
    data = tf.dumps(_kv_snapshot(4, {"v_head_dim": 4}))
    f = tf.SnapshotFile(data)
    assert (f.version, f.features) == ((1, 1), (2, 0))
    assert tf.loads(data).kv.layers[0].tensors["v"].shape == (1, 4, 2, 4)
    plain = tf.SnapshotFile(tf.dumps(_kv_snapshot(8)))
    assert (plain.version, plain.features) == ((1, 0), (0, 0))  # the lowest version that represents the file


@pytest.mark.parametrize("v_head_dim, params, match", [
    (4, {}, r"tensor 'v' has shape \[1, 4, 2, 4\], expected \[pages, 4, num_kv_heads=2, v_head_dim=8\]"),
    (4, {"v_head_dim": 6}, r"v_head_dim=6"),
    (4, {"v_head_dim": 0}, r"params.v_head_dim must be a positive integer"),
])
def test_v_head_dim_must_match_v(v_head_dim, params, match):
    with pytest.raises(ValueError, match=match):
        tf.dumps(_kv_snapshot(v_head_dim, params))


def test_reseal_checksums_tensors_written_after_write_into(full_snapshot):
    """writer.reseal: KV tensors whose fills wrote nothing and returned placeholder checksums, their bytes put in
    place afterwards (as a tensor-parallel engine's ranks do), give the bytes and id a plain write gives."""
    from thaw_format.writer import deferred_tensor, reseal

    plain = tf.dumps(full_snapshot)
    reals, fill = {}, {}
    for i, layer in enumerate(full_snapshot.kv.layers):
        for role, real in list(layer.tensors.items()):
            reals[f"kv/{i}/{role}"] = real
            layer.tensors[role] = deferred_tensor(real.dtype, real.shape)
            fill[f"kv/{i}/{role}"] = lambda target, chunk_size: array("I", bytes(4 * -(-len(target) // chunk_size)))
    encoded = tf.EncodedSnapshot(full_snapshot)
    buffer = bytearray(encoded.nbytes)
    encoded.write_into(buffer, fill)
    with pytest.raises(tf.CorruptSnapshotError):
        tf.loads(bytes(buffer))
    with tf.SnapshotFile(bytes(buffer)) as written:
        for name, real in reals.items():
            region = written.info(name)[2]
            buffer[region.offset : region.end] = bytes(real.data)
    assert reseal(buffer, list(reals)) == tf.SnapshotFile(plain).id
    assert bytes(buffer) == plain


def test_save_with_fill_writes_the_same_file_in_place_of_deferred_tensors(tmp_path, full_snapshot):
    """EncodedSnapshot.save(fill=): a deferred tensor's bytes written by its fill straight into the file's
    region give the file the tensor itself gives; a fill that fails leaves the old file and no temporary."""
    from thaw_format.writer import deferred_tensor

    plain, filled = tmp_path / "plain.thaw", tmp_path / "filled.thaw"
    plain_id = tf.EncodedSnapshot(full_snapshot).save(plain)
    name, real = "embed.weight", full_snapshot.weights.tensors["embed.weight"]
    full_snapshot.weights.tensors[name] = deferred_tensor(real.dtype, real.shape)

    def fill(target, chunk_size):
        return tf.mover.copy_with_crcs(real.data, target, chunk_size)

    assert tf.EncodedSnapshot(full_snapshot).save(filled, fill={f"weights/{name}": fill}) == plain_id
    assert filled.read_bytes() == plain.read_bytes()

    def failing(target, chunk_size):
        raise RuntimeError("engine gone")

    with pytest.raises(RuntimeError, match="engine gone"):
        tf.EncodedSnapshot(full_snapshot).save(filled, fill={f"weights/{name}": failing})
    assert filled.read_bytes() == plain.read_bytes() and sorted(os.listdir(tmp_path)) == ["filled.thaw", "plain.thaw"]

    def unreadable(target, chunk_size):  # an OSError class of its own constructor: it became a TypeError
        raise tf.mover.RemoteReadError(errno.ESRCH, 12345, 0x1000, 4096)

    def full(target, chunk_size):  # no file named: a staged fill writes memory, so its error stays its own
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(tf.mover.RemoteReadError) as gone:
        tf.EncodedSnapshot(full_snapshot).save(filled, fill={f"weights/{name}": unreadable})
    assert gone.value.errno == errno.ESRCH
    with pytest.raises(OSError) as no_space:
        tf.EncodedSnapshot(full_snapshot).save(filled, fill={f"weights/{name}": full})
    assert no_space.value.errno == errno.ENOSPC and no_space.value.filename is None
    assert "full" in [frame.f_code.co_name for frame, _ in traceback.walk_tb(no_space.value.__traceback__)]
    assert filled.read_bytes() == plain.read_bytes() and sorted(os.listdir(tmp_path)) == ["filled.thaw", "plain.thaw"]


def test_save_with_many_fills_matches_the_plain_file_and_a_late_failure_leaves_the_old_one(tmp_path, full_snapshot):
    """Fills of tensors of different sizes take turns in the save's two stage buffers: each tensor's bytes
    reach only its own region (twice over, so the second save reuses stages the first let go), and a fill
    that fails after others were written leaves the old file and no temporary."""
    from thaw_format.writer import deferred_tensor

    plain, filled = tmp_path / "plain.thaw", tmp_path / "filled.thaw"
    plain_id = tf.EncodedSnapshot(full_snapshot).save(plain)
    reals, fill = {}, {}
    for i, layer in enumerate(full_snapshot.kv.layers):
        for role, real in list(layer.tensors.items()):
            reals[f"kv/{i}/{role}"] = real
            layer.tensors[role] = deferred_tensor(real.dtype, real.shape)
    reals["weights/embed.weight"] = full_snapshot.weights.tensors["embed.weight"]
    full_snapshot.weights.tensors["embed.weight"] = deferred_tensor("float32", (16, 8))
    for name, real in reals.items():
        fill[name] = lambda target, chunk_size, real=real: tf.mover.copy_with_crcs(real.data, target, chunk_size)
    for _ in range(2):
        assert tf.EncodedSnapshot(full_snapshot).save(filled, fill=fill) == plain_id
        assert filled.read_bytes() == plain.read_bytes()

    def failing(target, chunk_size):
        raise RuntimeError("engine gone")

    with pytest.raises(RuntimeError, match="engine gone"):
        tf.EncodedSnapshot(full_snapshot).save(filled, fill={**fill, "kv/1/k": failing})
    with pytest.raises(ValueError, match="does not have"):
        tf.EncodedSnapshot(full_snapshot).save(filled, fill={**fill, "kv/9/k": failing})
    assert filled.read_bytes() == plain.read_bytes() and sorted(os.listdir(tmp_path)) == ["filled.thaw", "plain.thaw"]
