"""The transposed-tile kernels of the page gather and scatter (thaw_pages_select): every kernel this CPU runs
("avx512" 16 x 16, which in a gather with chunk CRCs of whole pages also sums the rows as it moves them and
streams them out; "avx2" 8 x 8; "sse2" 4 x 4; "rows" element by element) gives the same pages and chunk CRCs as
numpy's indexing of vLLM's vec layout, and writes the same blocks back. Selecting a lesser kernel is how these
tests stand in for a CPU without AVX-512: the dispatcher takes the best kernel the CPU reports, and the summing
tiles also step aside when the CRC32C kernel in use is not the AVX-512 one. The scatter's 16 x 16 tiles ("avx512") and
two 8 x 8 tiles ("avx2") write a K's 64-byte aligned lines whole with streaming stores."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import available_kernels, available_tiles
from test_pages import FILL, engine, expected, guards_kept, shifted_out, vllm_positions
from test_remote_pages import child, pages_bytes  # noqa: F401 (child: a fixture)
from thaw_format import mover

TILES = ("avx512", "avx2", "sse2", "rows")


def every_tile_kernel():
    """TILES as test parameters, each this CPU lacks a visible skip."""
    available = available_tiles()
    return [pytest.param(name, marks=pytest.mark.skipif(name not in available, reason=f"no {name} tiles here"))
            for name in TILES]


def vllm_case(block_size, heads, head_dim, role, n_pages, seed):
    """(blocks, offsets, layout, the pages' bytes, each page's block elements): n_pages of the given vec layout,
    blocks picked out of order."""
    positions, block_elems = vllm_positions(block_size, heads, head_dim, role), 2 * block_size * heads * head_dim
    blocks = engine(n_pages + 5, block_elems, 4, seed=seed)
    picks = np.random.default_rng(seed).permutation(n_pages + 5)[:n_pages]
    offsets = picks.astype(np.int64) * block_elems * 4
    want = expected(blocks, block_elems, picks, positions).view(np.uint8)
    elements = (offsets // 4)[:, None] + positions[None, :]
    return blocks, offsets, mover.page_layout(positions, 4), want, elements


SHAPES = [
    (16, 3, 128),  # block 16: one tile of 16 tokens per head; 3 heads
    (32, 5, 64),   # block 32: two tiles per head, summed as one pair of neighbouring lines; 5 heads
    (64, 2, 64),   # block 64: four tiles per head, summed as four neighbouring lines
    (48, 1, 64),   # block 48: three tiles per head, summed as a pair then one
    (48, 3, 64),   # the same for 3 heads: the pairs and single groups alternate
    (128, 2, 64),  # block 128: eight tiles per head, summed as two runs of four neighbouring lines
    (32, 3, 72),   # 288-byte rows, not whole 64-byte lines: tiles that move, then the pages summed; the
                   # scatter's last 8 columns a masked 16 x 16 tile
    (24, 1, 128),  # 24 tokens: a 16-row tile and an 8-row one; the scatter's K lines 96 bytes apart (unaligned)
    (16, 2, 12),   # rows shorter than a tile: the scatter's whole row one masked 16 x 16 tile
    (16, 3, 20),   # the scatter's last 4 columns a masked tile, its K lines 64 bytes apart
    (32, 2, 100),  # the same at 128 bytes apart, after six whole tiles
]


@pytest.mark.parametrize("tiles", every_tile_kernel())
@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_pages", [2, 0])  # chunks of two whole pages (summed as moved), or of 4 KiB
@pytest.mark.parametrize("shift", [0, 4])       # pages aligned for streaming stores, or not
def test_every_tile_kernel_gives_the_pages_and_crcs_of_numpy(native, select_tiles, tiles, role, shape,
                                                            chunk_pages, shift):
    blocks, offsets, layout, want, elements = vllm_case(*shape, role, n_pages=6, seed=sum(shape))
    chunk = chunk_pages * layout.page_bytes or 4096
    select_tiles(tiles)
    raw, start, out = shifted_out(len(want), shift)
    assert mover.gather_pages(blocks, offsets, layout, out, chunk) == mover.chunk_crcs(want, chunk)
    assert out.tobytes() == want.tobytes()
    assert guards_kept(raw, start, len(want))


@pytest.mark.parametrize("tiles", every_tile_kernel())
@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shift", [0, 4])  # blocks whose K lines are 64-byte aligned (streamed whole), or not
def test_every_tile_kernel_scatters_the_pages_where_numpy_puts_them(native, select_tiles, tiles, role, shape,
                                                                    shift):
    blocks, offsets, layout, pages, elements = vllm_case(*shape, role, n_pages=6, seed=sum(shape))
    select_tiles(tiles)
    raw, start, out = shifted_out(blocks.nbytes, shift)
    restored = out.view(np.float32)
    mover.scatter_pages(pages, restored, offsets, layout)
    assert restored[elements.ravel()].view(np.uint8).tobytes() == pages.tobytes()
    untouched = np.ones(restored.size, bool)
    untouched[elements.ravel()] = False
    assert (restored[untouched].view(np.uint8) == FILL).all()  # no line past a row's end written
    assert guards_kept(raw, start, blocks.nbytes)


def filled_like(blocks):
    """Blocks of FILL bytes to scatter into: a write where none belongs shows."""
    return np.full(blocks.nbytes, FILL, np.uint8).view(blocks.dtype)


@pytest.mark.parametrize("tiles", every_tile_kernel())
@pytest.mark.parametrize("role", ["k", "v"])
def test_a_threaded_scatter_of_vllms_kv_checked_or_remote_is_the_same_under_every_tile_kernel(
        native, child, select_tiles, tiles, role):
    """The bench's shape, 40 pages (5 MiB: the thread pool), 1 MiB chunks: the plain scatter, the checked one
    (thaw_scatter_pages_checked: a corrupt chunk is found, and a transposed K's is not written: each of its
    chunks is checked before it moves) and the one reading another process's memory
    (thaw_scatter_pages_remote) put the pages where numpy does."""
    blocks, offsets, layout, _, elements = vllm_case(32, 8, 128, role, n_pages=40, seed=9)
    holder = child(5, 40 * layout.page_bytes)
    pages = pages_bytes(5, 40 * layout.page_bytes)
    select_tiles(tiles)
    for source in (pages, mover.remote_window(holder.pid, holder.address, len(pages))):
        restored = filled_like(blocks)
        mover.scatter_pages(source, restored, offsets, layout)
        assert restored[elements.ravel()].view(np.uint8).tobytes() == pages.tobytes()
    crcs, chunk = mover.chunk_crcs(pages, 1 << 20), 1 << 20
    restored = filled_like(blocks)
    assert mover.scatter_pages_checked(pages, restored, offsets, layout, chunk, crcs) is None
    assert restored[elements.ravel()].view(np.uint8).tobytes() == pages.tobytes()
    bad = pages.copy()
    bad[2 * chunk + 100] ^= 1
    restored = filled_like(blocks)
    assert mover.scatter_pages_checked(bad, restored, offsets, layout, chunk, crcs) == 2
    if role == "k":  # (V's rows are moved and summed in one read, written before their CRC is known)
        in_chunk_2 = elements.ravel()[np.arange(len(pages) // 4) // (chunk // 4) == 2]
        assert (restored[in_chunk_2].view(np.uint8) == FILL).all()


@pytest.mark.parametrize("tiles", every_tile_kernel())
@pytest.mark.parametrize("kernel", sorted({"software"} | set(available_kernels()[:1])))
def test_a_threaded_gather_of_vllms_k_is_the_same_under_every_tile_and_crc_kernel(native, select_tiles,
                                                                                   select_kernel, tiles, kernel):
    """The bench's shape (block 32, 8 heads x 128 float32), 40 pages (5 MiB: the thread pool), 1 MiB chunks of
    whole pages: under each tile kernel, and with the CRC32C kernel the summing tiles need or another."""
    blocks, offsets, layout, want, _ = vllm_case(32, 8, 128, "k", n_pages=40, seed=9)
    select_tiles(tiles)
    select_kernel(kernel)
    out = np.zeros_like(want)
    assert mover.gather_pages(blocks, offsets, layout, out, 1 << 20) == mover.chunk_crcs(want, 1 << 20)
    assert out.tobytes() == want.tobytes()


def test_the_best_tile_kernel_is_the_default_and_only_listed_kernels_are_selected(native, select_tiles):
    ffi, lib = native
    impl = lambda: ffi.string(lib.thaw_pages_impl()).decode()  # noqa: E731
    available = available_tiles()
    assert impl() == available[0]
    assert available == [name for name in TILES if name in available] and available[-1] == "rows"
    for name in available:
        select_tiles(name)
        assert impl() == name
    for name in [n for n in TILES if n not in available] + ["avx1024", ""]:
        assert lib.thaw_pages_select(name.encode()) == -1
        assert impl() == available[-1]


needs_summing_tiles = pytest.mark.skipif(
    "avx512" not in available_tiles() or "avx512-vpclmulqdq" not in available_kernels(),
    reason="no summing tiles here: they need the AVX-512 tiles and the AVX-512 + VPCLMULQDQ CRC32C kernel")

# K page shapes and the summing tiles' steps a page takes, by the groups of 16 tokens a step reads together (1, 2, 4)
STEPS = [
    ((16, 3, 128), [3, 0, 0]),  # block 16: one group a head
    ((32, 5, 64), [0, 5, 0]),   # block 32: a pair a head
    ((64, 2, 64), [0, 0, 2]),   # block 64: four a head
    ((48, 3, 64), [3, 3, 0]),   # block 48: a pair, then one, a head
    ((128, 2, 64), [0, 0, 4]),  # block 128: four, then four, a head
    ((32, 3, 72), [0, 0, 0]),   # 288-byte rows, not whole 64-byte lines: not summed in these tiles
]


@needs_summing_tiles
@pytest.mark.parametrize("shape, steps", STEPS)
def test_the_summing_tiles_read_a_blocks_neighbouring_groups_of_16_tokens_together(native, select_tiles,
                                                                                  select_kernel, shape, steps):
    """thaw_pages_summed_groups says which path a gather took: with the summing tiles, each block's 16-token groups
    are read 4 or 2 together where they follow on, and the CRCs are those of the portable CRC32C (the crc32c
    package, not libthaw). Under the AVX2 tiles, or for V (rows in order, no tiles), nothing is summed in them."""
    ffi, lib = native
    blocks, offsets, layout, want, _ = vllm_case(*shape, "k", n_pages=6, seed=sum(shape))
    chunk = 2 * layout.page_bytes
    select_tiles("avx512")
    select_kernel("avx512-vpclmulqdq")
    counts = ffi.new("size_t[3]")
    out = np.zeros_like(want)
    crcs = mover.gather_pages(blocks, offsets, layout, out, chunk)
    lib.thaw_pages_summed_groups(counts)
    assert list(counts) == steps
    assert list(crcs) == list(mover._py_chunk_crcs(want, chunk))
    assert out.tobytes() == want.tobytes()
    select_tiles("avx2")
    assert mover.gather_pages(blocks, offsets, layout, out, chunk) == crcs
    lib.thaw_pages_summed_groups(counts)
    assert list(counts) == [0, 0, 0]
    select_tiles("avx512")
    blocks, offsets, layout, want, _ = vllm_case(*shape, "v", n_pages=6, seed=sum(shape))
    mover.gather_pages(blocks, offsets, layout, np.zeros_like(want), chunk)
    lib.thaw_pages_summed_groups(counts)
    assert list(counts) == [0, 0, 0]


@needs_summing_tiles
@pytest.mark.parametrize("heads", range(2048, 2144, 16))  # page shapes no other test uses: each new here
def test_threads_meeting_a_new_page_shape_at_once_share_its_fold_constants(native, select_tiles, select_kernel,
                                                                          heads):
    """The summing tiles' fold constants are made on a page shape's first gather and kept (pages_crc16_for,
    published by compare-and-swap without a lock). Four threads, their arguments made beforehand, are released
    by a barrier into thaw_gather_pages with K pages of a new shape of 32768 rows or more: each gets the pages of
    numpy and the CRCs of chunk_crcs. The race is made likely, not forced: with the lost compare-and-swap counted (a print,
    since removed), two threads made one shape's table at once in 7 of 15 shapes, and in 4 of 5 runs of 3 shapes,
    when a table took about 0.1 ms; six shapes a run. (Each thread sorts its 32768 rows first, a few ms that vary
    by more than a table takes: its per-row constants, now 8 carry-less shifts a row where they were 2, are
    estimated at under 0.5 ms, not measured.)"""
    ffi, lib = native
    blocks, offsets, layout, want, _ = vllm_case(16, heads, 16, "k", n_pages=1, seed=4)
    select_tiles("avx512")
    select_kernel("avx512-vpclmulqdq")
    c_layout, _rows = mover._c_page_layout(layout)
    b, offs = mover._c_buffer(blocks), mover._c_offsets(offsets)
    outs, crcs = [np.zeros_like(want) for _ in range(4)], [np.zeros(1, np.uint32) for _ in range(4)]
    at_once = threading.Barrier(4)

    def gather(i):
        o, c = mover._c_buffer(outs[i], writable=True), ffi.from_buffer("uint32_t[]", crcs[i], True)
        at_once.wait()
        return lib.thaw_gather_pages(b, len(b), offs, len(offs), c_layout, o, len(o), layout.page_bytes, c)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(gather, range(4))) == [0] * 4
    assert [list(c) for c in crcs] == [list(mover.chunk_crcs(want, layout.page_bytes))] * 4
    assert all(out.tobytes() == want.tobytes() for out in outs)
