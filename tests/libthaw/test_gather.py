"""Gather and scatter, native and portable: round trips of 10,000 KV-sized blocks, every offset type, the
multi-threaded path, and out-of-range slabs refused before any byte moves."""

import random
from array import array

import numpy as np
import pytest

from thaw_format import mover

PATHS = {"native": (mover._c_gather, mover._c_scatter), "portable": (mover._py_gather, mover._py_scatter)}


def pool_and_offsets(n_blocks, block, picks, seed):
    rng = random.Random(seed)
    pool = bytearray(rng.randbytes(n_blocks * block))
    chosen = rng.sample(range(n_blocks), picks)
    return pool, [i * block for i in chosen]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block,n_blocks,picks", [(512, 12_000, 10_000), (64 << 10, 200, 150), (3, 50, 50)])
def test_round_trip(native, path, block, n_blocks, picks):
    gather, scatter = PATHS[path]
    pool, offsets = pool_and_offsets(n_blocks, block, picks, block)
    out = bytearray(picks * block)
    gather(pool, offsets, block, out)
    assert all(out[i * block : (i + 1) * block] == pool[o : o + block] for i, o in enumerate(offsets))
    restored = bytearray(len(pool))
    scatter(out, restored, offsets, block)
    assert all(restored[o : o + block] == pool[o : o + block] for o in offsets)


@pytest.mark.parametrize("kind", ["list", "numpy", "array"])
def test_native_equals_portable_for_every_offset_type(native, kind):
    pool, offsets = pool_and_offsets(4000, 1024, 3000, 7)  # 3 MiB: the threaded path
    typed = {"list": offsets, "numpy": np.array(offsets, dtype=np.int64), "array": array("q", offsets)}[kind]
    a, b = bytearray(len(offsets) * 1024), bytearray(len(offsets) * 1024)
    mover._c_gather(pool, typed, 1024, a)
    mover._py_gather(pool, offsets, 1024, b)
    assert a == b
    x, y = bytearray(len(pool)), bytearray(len(pool))
    mover._c_scatter(a, x, typed, 1024)
    mover._py_scatter(b, y, offsets, 1024)
    assert x == y


def test_gather_into_numpy_and_torch_views(native):
    torch = pytest.importorskip("torch")
    kv = torch.arange(64 * 16 * 8, dtype=torch.float32).reshape(64, 16, 8)  # [pages, page_size, dim]
    block = 16 * 8 * 4
    pages = [5, 0, 63, 17]
    out = torch.empty(len(pages), 16, 8, dtype=torch.float32)
    mover.gather(kv.numpy(), [p * block for p in pages], block, out.numpy())
    assert torch.equal(out.view(torch.uint8), kv[pages].view(torch.uint8))


@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_is_refused_before_any_copy(native, path):
    gather, scatter = PATHS[path]
    pool = bytearray(range(256)) * 4
    out = bytearray(b"\xff" * 64)
    with pytest.raises(ValueError, match="slab 2"):
        gather(pool, [0, 64, 1010, 128], 16, out)
    assert out == b"\xff" * 64
    with pytest.raises(ValueError, match="slab 0"):
        gather(pool, [-1], 16, out)
    with pytest.raises(ValueError, match="need"):
        gather(pool, [0] * 5, 16, out)
    target = bytearray(1024)
    with pytest.raises(ValueError, match="slab 1"):
        scatter(out, target, [0, 1020], 16)
    assert target == bytearray(1024)


def test_recycled_buffers_come_back_once_let_go(monkeypatch):
    """mover.recycled hands out a buffer of the size asked, reuses one whose every view is gone (never one still
    viewed), and keeps no more than its byte limit."""
    monkeypatch.setattr(mover, "_recycled", {})
    monkeypatch.setattr(mover, "_recycled_bytes", [0])
    monkeypatch.setattr(mover, "_RECYCLE_BYTES", 3 * 4096)
    address = lambda view: np.frombuffer(view, np.uint8).ctypes.data  # noqa: E731
    first = mover.recycled(4096)
    first[:] = b"\1" * 4096
    held = np.frombuffer(first, np.uint8)  # a view of it still held
    where = address(first)
    del first
    second = mover.recycled(4096)
    assert len(second) == 4096 and address(second) != where  # still viewed: not handed out again
    del held
    third = mover.recycled(4096)
    assert address(third) == where and bytes(third) == b"\1" * 4096  # let go: reused as it was
    kept = [mover.recycled(4096) for _ in range(4)]
    del second, third, kept
    assert mover._recycled_bytes[0] == 3 * 4096 and len(mover._recycled[4096]) == 3
    assert len(mover.recycled(8192)) == 8192


@pytest.mark.parametrize("nbytes", [4096, (4 << 20) - 1, 4 << 20, (5 << 20) + 3])
def test_large_empty_buffers_start_on_a_huge_page(nbytes):
    """mover.empty's buffers of 4 MiB and more start on a 2 MiB boundary (all their pages can be huge), smaller
    ones wherever numpy puts them; either way exactly nbytes, writable, each byte its own."""
    buffer = mover.empty(nbytes)
    array = np.frombuffer(buffer, np.uint8)
    assert len(buffer) == nbytes and not buffer.readonly
    if nbytes >= 2 * mover.HUGE_PAGE:
        assert array.ctypes.data % mover.HUGE_PAGE == 0
    array[:] = 7
    assert bytes(buffer) == b"\x07" * nbytes


@pytest.mark.parametrize("start", [mover._py_start_writeback] + ([mover._c_start_writeback] if mover._lib else []))
def test_start_writeback_changes_nothing_in_the_file(tmp_path, start):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    with open(path, "r+b") as f:
        f.write(b"y" * 5000)
        f.flush()
        start(f.fileno(), 0, 5000)
        start(f.fileno(), 9000, 0)
    assert path.read_bytes() == b"y" * 5000 + b"x" * 5000
