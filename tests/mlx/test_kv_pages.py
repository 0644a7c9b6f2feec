"""thaw_mlx's paged layers move in libthaw: byte for byte what the previous MLX-ops path built (transpose, pad,
reshape one way; index, reshape, transpose, pad the other), for full and short last pages, every float dtype,
quantized parts (packed uint32, scales) and pages restored out of order; with a file's CRCs, the same bytes or
CorruptSnapshotError."""

import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from thaw_format import CorruptSnapshotError, KVLayer, Tensor, mover  # noqa: E402
from thaw_format.mlx import from_mlx, to_mlx  # noqa: E402
from thaw_mlx import _internals, pages  # noqa: E402


def reference_to_pages(x, num_tokens, page_size):
    x = x[0, :, :num_tokens, :].transpose(1, 0, 2)
    num_pages = -(-num_tokens // page_size)
    pad = num_pages * page_size - num_tokens
    if pad:
        x = mx.concatenate([x, mx.zeros((pad, *x.shape[1:]), dtype=x.dtype)])
    return from_mlx(x.reshape(num_pages, page_size, *x.shape[1:]))


def reference_from_pages(tensor, chain, num_tokens):
    x = to_mlx(tensor)
    if chain != list(range(x.shape[0])):
        x = x[mx.array(chain, dtype=mx.int32)]
    x = x.reshape(-1, *x.shape[2:])[:num_tokens].transpose(1, 0, 2)
    capacity = -(-num_tokens // _internals.CACHE_STEP) * _internals.CACHE_STEP
    if capacity > num_tokens:
        x = mx.concatenate([x, mx.zeros((x.shape[0], capacity - num_tokens, x.shape[2]), dtype=x.dtype)], axis=1)
    return mx.contiguous(x[None])


def as_bytes(array) -> bytes:
    return bytes(from_mlx(array).data)


def sequence(dtype, heads, capacity, dim, seed=0):
    raw = np.random.default_rng(seed).integers(0, 2**31, (1, heads, capacity, dim), dtype=np.uint32)
    if dtype == mx.uint32:
        return mx.array(raw)
    return mx.array(raw.astype(np.float32) / 2**31 - 0.5).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16, mx.uint32])
@pytest.mark.parametrize("num_tokens", [256, 200, 31, 1])
def test_pages_equal_the_mlx_ops_path(dtype, num_tokens):
    heads, capacity, dim, page_size = 3, 256, 24, 32
    x = sequence(dtype, heads, capacity, dim)
    mx.eval(x)
    got = pages.to_pages([pages.PageRun(x, 0, num_tokens)], page_size)
    want = reference_to_pages(x, num_tokens, page_size)
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    assert bytes(got.data) == bytes(want.data)

    for chain in (list(range(got.shape[0])), list(range(got.shape[0]))[::-1]):  # in order, and out of order
        restored = pages.from_pages(got, chain, num_tokens)
        assert restored.dtype == x.dtype
        assert as_bytes(restored) == as_bytes(reference_from_pages(got, chain, num_tokens))


CHECKED = [mover._py_scatter_pages_checked] + ([mover._c_scatter_pages_checked] if mover._lib is not None else [])


@pytest.mark.parametrize("num_tokens", [256, 200, 1])
@pytest.mark.parametrize("in_order", [True, False])
def test_checked_restore_scatters_the_same_bytes_and_refuses_a_bad_chunk(num_tokens, in_order):
    """from_pages with the file's CRCs: the same array as without them (checked in the scatter for pages in
    order, in a pass of its own otherwise), and CorruptSnapshotError for a flipped byte in any chunk."""
    heads, capacity, dim, page_size, chunk = 3, 256, 24, 32, 4096
    x = sequence(mx.float32, heads, capacity, dim)
    paged = pages.to_pages([pages.PageRun(x, 0, num_tokens)], page_size)
    chain = list(range(paged.shape[0]))[:: 1 if in_order else -1]
    crcs = mover.chunk_crcs(paged.data, chunk)
    want = as_bytes(pages.from_pages(paged, chain, num_tokens))
    got = pages.from_pages(paged, chain, num_tokens, pages.Expected("kv/0/k", chunk, crcs))
    assert as_bytes(got) == want
    for at in (0, paged.nbytes // 2, paged.nbytes - 1):
        data = bytearray(paged.data)
        data[at] ^= 1
        bad = Tensor(paged.dtype, paged.shape, data)
        with pytest.raises(CorruptSnapshotError, match=rf"'kv/0/k'.*chunk {at // chunk}\b"):
            pages.from_pages(bad, chain, num_tokens, pages.Expected("kv/0/k", chunk, crcs))


TRUNCATED_UNDER_THE_SCATTER = """
import mmap, os, sys
import mlx.core as mx
from thaw_format import CorruptSnapshotError, KVLayer, Tensor, mover
from thaw_mlx import pages

path, cut = sys.argv[1], int(sys.argv[2])
x = mx.random.normal((1, 8, 4096, 128))  # 16 MiB of pages: the scatter runs on libthaw's threads
paged = pages.to_pages([pages.PageRun(x, 0, 4096)], 256)
with open(path, "wb") as f:
    f.write(paged.data)
crcs = mover.chunk_crcs(paged.data, 1 << 20)
fd = os.open(path, os.O_RDONLY)
mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
os.close(fd)
os.truncate(path, cut)  # another program cuts the file after it is mapped, before the load reads it
view = Tensor(paged.dtype, paged.shape, memoryview(mapped))
chain, expected = list(range(paged.shape[0])), pages.Expected("kv/3/v", 1 << 20, crcs)
try:
    if sys.argv[3] == "alone":
        pages.from_pages(view, chain, 4096, expected)
    else:  # as the second tensor of a batch, after one in memory (its name comes from its index in the batch)
        layer = KVLayer("attention", {"k": paged, "v": view}, num_kv_heads=8, head_dim=128)
        targets = pages.scatter_targets([layer], [chain])[0]
        pages.fill_checked([layer], chain, [{"k": pages.Expected("kv/3/k", 1 << 20, crcs), "v": expected}], targets)
except CorruptSnapshotError as exc:
    print("CorruptSnapshotError:", exc)
print("alive")
"""


@pytest.mark.skipif(mover._lib is None, reason="the SIGBUS guard is libthaw's")
@pytest.mark.parametrize("cut", [0, (5 << 20) + 123, (16 << 20) - 4096])
@pytest.mark.parametrize("how", ["alone", "batch"])
def test_a_file_truncated_under_its_mapping_raises_in_the_checked_scatter(tmp_path, cut, how):
    """from_pages, and fill_checked as thaw_mlx.load calls it (every tensor of a cache in one libthaw call), from
    a mapping of the file: the file truncated after it is mapped (pages gone at the start, the middle, the end)
    gives CorruptSnapshotError naming the tensor, not a SIGBUS. In a child process, so that a regression fails
    this test rather than killing the test run."""
    child = subprocess.run([sys.executable, "-c", TRUNCATED_UNDER_THE_SCATTER, str(tmp_path / "kv"), str(cut), how],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, (child.returncode, child.stderr)
    assert child.stdout.splitlines() == [
        "CorruptSnapshotError: tensor 'kv/3/v': reading the pages faulted (SIGBUS): they are a mapping of a file "
        "truncated under it", "alive"], child.stdout


@pytest.mark.parametrize("num_tokens", [256, 200])
def test_fill_checked_scatters_a_cache_in_one_call_as_from_pages_does_and_names_the_bad_tensor(num_tokens):
    """fill_checked (thaw_mlx.load's scatter: every paged tensor of the cache in one libthaw call) gives the
    arrays from_pages gives tensor by tensor, leaves out the tensors it cannot check in the scatter (pages out
    of order, no CRCs), and a flipped byte in one tensor raises CorruptSnapshotError naming that tensor."""
    heads, capacity, dim, page_size, chunk = 2, 256, 32, 32, 4096
    layers, expected = [], []
    for i in range(3):
        k, v = (pages.to_pages([pages.PageRun(sequence(mx.float32, heads, capacity, dim, seed=2 * i + j), 0,
                                              num_tokens)], page_size) for j in range(2))
        layers.append(KVLayer("attention", {"k": k, "v": v}, num_kv_heads=heads, head_dim=dim))
        expected.append({role: pages.Expected(f"kv/{i}/{role}", chunk, mover.chunk_crcs(t.data, chunk))
                         for role, t in layers[-1].tensors.items()})
    chain = list(range(layers[0].tensors["k"].shape[0]))
    targets = pages.scatter_targets(layers, [chain])[0]
    filled = pages.fill_checked(layers, chain, expected, targets)
    assert filled == [frozenset({"k", "v"})] * 3
    for layer, checks, chosen, roles in zip(layers, expected, targets, filled):
        got = pages.decode_layer(layer, chain, num_tokens, checks, chosen, roles)
        want = pages.decode_layer(layer, chain, num_tokens)
        assert as_bytes(got.keys) == as_bytes(want.keys) and as_bytes(got.values) == as_bytes(want.values)
    targets = pages.scatter_targets(layers, [chain[::-1]])[0]
    assert pages.fill_checked(layers, chain[::-1], expected, targets) == [frozenset()] * 3  # from_pages checks them
    data = bytearray(layers[1].tensors["v"].data)
    data[len(data) // 2] ^= 1
    layers[1].tensors["v"] = Tensor("float32", layers[1].tensors["v"].shape, data)
    with pytest.raises(CorruptSnapshotError, match=r"'kv/1/v'.*chunk \d+"):
        pages.fill_checked(layers, chain, expected, pages.scatter_targets(layers, [chain])[0])


def test_fill_checked_lets_go_of_a_files_pages_itself_where_libthaw_cannot(monkeypatch):
    """Where libthaw does not unmap a mapped file's pages (not Linux, or the portable path), fill_checked calls
    each filled tensor's `done` after the batch, as from_pages does, so the whole file does not stay mapped."""
    monkeypatch.setattr(mover, "RELEASES_PAGES", False)
    heads, capacity, dim, page_size, chunk = 2, 256, 32, 32, 4096
    tensors = {role: pages.to_pages([pages.PageRun(sequence(mx.float32, heads, capacity, dim, seed=seed), 0, 64)],
                                    page_size) for seed, role in enumerate("kv")}
    layers = [KVLayer("attention", tensors, num_kv_heads=heads, head_dim=dim)]
    released = []
    expected = [{role: pages.Expected(f"kv/0/{role}", chunk, mover.chunk_crcs(t.data, chunk),
                                      lambda role=role: released.append(role)) for role, t in tensors.items()}]
    chain = list(range(tensors["k"].shape[0]))
    filled = pages.fill_checked(layers, chain, expected, pages.scatter_targets(layers, [chain])[0])
    assert filled == [frozenset("kv")] and sorted(released) == ["k", "v"]


@pytest.mark.parametrize("scatter", CHECKED, ids=lambda f: f.__name__)
def test_scatter_pages_checked_names_the_first_bad_chunk(scatter):
    """Both paths of mover.scatter_pages_checked: None and the pages in place when every chunk is good; else the
    first bad chunk, other chunks possibly written (the caller drops the buffer). The portable path writes none
    of a bad chunk's bytes; the native one, on this layout (1 KiB rows), moves and sums each chunk in one read
    where the CPU allows, and so may (tests/libthaw/test_pages.py tells the two apart)."""
    chunk, pages_n, page_bytes = 4096, 64, 1024  # 16 chunks
    layout = mover.page_layout(np.arange(page_bytes // 4), 4)
    data = np.random.default_rng(1).integers(0, 255, pages_n * page_bytes, dtype=np.uint8)
    offsets = np.arange(pages_n, dtype=np.int64)[::-1] * page_bytes  # reversed: a real scatter
    crcs = mover.chunk_crcs(data, chunk)
    out = np.zeros_like(data)
    assert scatter(data, out, offsets, layout, chunk, crcs) is None
    assert out.reshape(pages_n, -1)[::-1].tobytes() == data.tobytes()
    bad = data.copy()
    bad[5 * chunk + 7] ^= 1
    bad[9 * chunk] ^= 1
    out = np.zeros_like(data)
    assert scatter(bad, out, offsets, layout, chunk, crcs) == 5
    written = out.reshape(pages_n, -1)[::-1].reshape(-1)
    if scatter is mover._py_scatter_pages_checked:
        assert not written[5 * chunk : 6 * chunk].any()
    with pytest.raises(ValueError, match="expected CRCs"):
        scatter(data, out, offsets, layout, chunk, crcs[:-1])


@pytest.mark.parametrize("num_tokens", [256, 200, 31, 1])
@pytest.mark.parametrize("chunk", [4096, 8192, 1 << 20])
def test_gather_into_a_region_gives_its_chunk_crcs(num_tokens, chunk):
    """What thaw_mlx.save writes: the pages of to_pages, and the CRCs of every chunk of them, also where a short
    last page starts or ends mid-chunk (its CRCs are summed again)."""
    heads, capacity, dim, page_size = 3, 256, 24, 32  # 9 KiB pages: chunk boundaries fall inside pages
    x = sequence(mx.float32, heads, capacity, dim, seed=2)
    want = pages.to_pages([pages.PageRun(x, 0, num_tokens)], page_size)
    out = np.full(want.nbytes, 0xAB, np.uint8)  # stale bytes: the padding must be written too
    crcs = pages.gather_into([pages.PageRun(x, 0, num_tokens)], page_size, out, chunk)
    assert out.tobytes() == bytes(want.data)
    assert list(crcs) == list(mover.chunk_crcs(want.data, chunk))


@pytest.mark.parametrize("num_tokens", [256, 200, 31, 1])
@pytest.mark.parametrize("chunk", [4096, 8192, 1 << 20])
def test_gather_to_file_writes_the_region_with_its_chunk_crcs(tmp_path, num_tokens, chunk):
    """thaw_mlx.save's path into the file: the same bytes and CRCs as gather_into, over stale bytes of a file at
    an offset, a short last page's CRCs continuing the chunk the full pages end in, and the count of bytes
    written that the writer checks."""
    heads, capacity, dim, page_size = 3, 256, 24, 32
    x = sequence(mx.float32, heads, capacity, dim, seed=2)
    want = pages.to_pages([pages.PageRun(x, 0, num_tokens)], page_size)
    path = tmp_path / "region"
    path.write_bytes(b"\xab" * (want.nbytes + 100))
    with open(path, "r+b") as f:
        written, crcs = pages.gather_to_file(x, num_tokens, page_size, f.fileno(), 100, chunk)
    assert written == want.nbytes
    assert path.read_bytes() == b"\xab" * 100 + bytes(want.data)
    assert list(crcs) == list(mover.chunk_crcs(want.data, chunk))


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_runs_of_several_sequences_follow_one_another_with_the_chunk_crcs_of_the_whole(chunk):
    """An engine's sessions in one tensor (thaw_mlx.prefix_tree): each run's pages from its first one on, a short
    last page zero-padded in the middle of the tensor too, and the CRCs of the whole region's chunks."""
    heads, capacity, dim, page_size = 3, 256, 24, 32
    runs = [pages.PageRun(sequence(mx.float32, heads, capacity, dim, seed=seed), first, num_tokens)
            for seed, first, num_tokens in [(2, 0, 70), (3, 2, 100), (4, 1, 33)]]
    want = b"".join(bytes(reference_to_pages(run.x, run.num_tokens, page_size).data)[
        run.first * page_size * heads * dim * 4 :] for run in runs)
    assert bytes(pages.to_pages(runs, page_size).data) == want
    out = np.full(len(want), 0xAB, np.uint8)
    crcs = pages.gather_into(runs, page_size, out, chunk)
    assert out.tobytes() == want and list(crcs) == list(mover.chunk_crcs(want, chunk))
