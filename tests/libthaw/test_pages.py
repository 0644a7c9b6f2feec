"""KV page gather/scatter (thaw_gather_pages / thaw_scatter_pages), native and portable: byte-identical to a
numpy index for vLLM's transposed K, plain V, a head-major sequence array and arbitrary permutations, in every
item size; chunk CRCs equal to a separate pass; and every bad input (ranges, aliasing, repeated blocks, a broken
layout) refused with a ValueError before any byte moves, never a crash."""

import errno
import mmap
import os
import sys

import numpy as np
import pytest

from conftest import available_kernels
from thaw_format import mover

PATHS = {"native": (mover._c_gather_pages, mover._c_scatter_pages),
         "portable": (mover._py_gather_pages, mover._py_scatter_pages)}
DTYPES = {1: np.uint8, 2: np.float16, 4: np.float32, 8: np.float64}


def vllm_positions(block_size, heads, head_dim, role):
    """vLLM CPU vec/vec16: per block and head, K as [head_dim, block_size] then V as [block_size, head_dim]."""
    t, h, d = np.meshgrid(np.arange(block_size), np.arange(heads), np.arange(head_dim), indexing="ij")
    base = h * 2 * block_size * head_dim
    return (base + d * block_size + t if role == "k" else base + block_size * head_dim + t * head_dim + d).ravel()


def sequence_positions(page_size, heads, capacity, head_dim):
    """An MLX-style [heads, capacity, head_dim] array read token-major, one page of page_size tokens."""
    t, h, d = np.meshgrid(np.arange(page_size), np.arange(heads), np.arange(head_dim), indexing="ij")
    return (h * capacity * head_dim + t * head_dim + d).ravel()


def engine(n_blocks, block_elems, itemsize, seed=0):
    raw = np.random.default_rng(seed).integers(0, 256, n_blocks * block_elems * itemsize, dtype=np.uint8)
    return raw.view(DTYPES[itemsize])


def expected(blocks, block_elems, picks, positions):
    return np.ascontiguousarray(blocks.reshape(-1, block_elems)[picks][:, positions]).ravel()


CASES = {
    "vllm-k": lambda: (vllm_positions(32, 4, 64, "k"), 2 * 32 * 4 * 64),
    "vllm-v": lambda: (vllm_positions(32, 4, 64, "v"), 2 * 32 * 4 * 64),
    "odd-head-dim-k": lambda: (vllm_positions(16, 3, 80, "k"), 2 * 16 * 3 * 80),
    # 12 tokens: an 8-row tile then a 4-row one; head_dim 20: columns left over after the 8-wide tiles
    "short-block-k": lambda: (vllm_positions(12, 2, 20, "k"), 2 * 12 * 2 * 20),
    "sequence": lambda: (sequence_positions(16, 2, 64, 24), 2 * 64 * 24),
    "permutation": lambda: (np.random.default_rng(3).permutation(2048), 2048),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("itemsize", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_round_trip_matches_numpy_index(native, path, itemsize, case):
    gather, scatter = PATHS[path]
    positions, block_elems = CASES[case]()
    n_blocks = 9
    blocks = engine(n_blocks, block_elems, itemsize)
    picks = [4, 0, 8, 2]
    offsets = [p * block_elems * itemsize for p in picks]
    layout = mover.page_layout(positions, itemsize)
    out = np.zeros(len(picks) * len(positions), DTYPES[itemsize])
    crcs = gather(blocks, offsets, layout, out, 4096)
    want = expected(blocks, block_elems, picks, positions)
    assert out.tobytes() == want.tobytes()
    assert crcs == mover.chunk_crcs(out, 4096)
    restored = np.zeros_like(blocks)
    scatter(out, restored, offsets, layout)
    assert expected(restored, block_elems, picks, positions).tobytes() == want.tobytes()


@pytest.mark.parametrize("shift", [0, 16])
@pytest.mark.parametrize("block_size", [32, 24])
def test_a_transposed_scatter_in_whole_lines_or_in_tiles_writes_the_same_bytes(native, shift, block_size):
    """16 tokens of a float32 K row fill a whole 64-byte line, which the native scatter writes with streaming
    stores where the blocks' lines are 64-byte aligned; 16 bytes off, or with rows 96 bytes apart (24 tokens),
    it moves them in 8-row tiles. Bytes outside the picked blocks stay as they were."""
    positions, block_elems = vllm_positions(block_size, 4, 64, "k"), 2 * block_size * 4 * 64
    blocks = engine(5, block_elems, 4)
    picks = [3, 0, 4]
    offsets = [p * block_elems * 4 for p in picks]
    layout = mover.page_layout(positions, 4)
    pages = expected(blocks, block_elems, picks, positions)
    raw, start, out = shifted_out(blocks.nbytes, shift)
    restored = out.view(np.float32)
    mover._c_scatter_pages(pages, restored, offsets, layout)
    assert expected(restored, block_elems, picks, positions).tobytes() == pages.tobytes()
    untouched = np.ones(restored.size, bool)
    untouched[(np.array(offsets)[:, None] // 4 + positions[None, :]).ravel()] = False
    assert (restored[untouched].view(np.uint8) == FILL).all() and guards_kept(raw, start, blocks.nbytes)


def test_page_layout_finds_rows(native):
    k = mover.page_layout(vllm_positions(32, 8, 128, "k"), 4)
    v = mover.page_layout(vllm_positions(32, 8, 128, "v"), 4)
    assert (len(k.row_start), k.row_elems, k.col_stride) == (256, 128, 32)
    assert (len(v.row_start), v.row_elems, v.col_stride) == (256, 128, 1)
    scattered = mover.page_layout(np.random.default_rng(0).permutation(100), 2)
    assert (len(scattered.row_start), scattered.row_elems) == (100, 1)


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("rows", [
    ("sequence", 4, 128, 1 << 20),  # MLX float32, 512-byte rows: one read where the kernel folds
    ("sequence", 2, 64, 4096),      # bfloat16, 128-byte rows, small chunks: one read
    ("sequence", 4, 24, 3 << 10),   # 96-byte rows: checked, then moved
    ("sequence", 4, 128, 5 << 8),   # chunks that split rows: checked, then moved
    ("k", 4, 128, 1 << 20),         # vLLM's transposed K: checked, then moved
])
@pytest.mark.parametrize("shift", [0, 4])  # destinations aligned for streaming stores, or not
def test_checked_scatter_in_one_read_or_two_writes_the_same_bytes_and_finds_a_bad_chunk(
        native, select_kernel, kernel, rows, shift):
    """thaw_scatter_pages_checked with every CRC kernel this CPU has: the bytes of the unchecked scatter, large
    enough for the thread pool, pages in reverse order; a corrupt chunk (and a later one) is reported as the
    first bad chunk. Which pass ran shows in the bad chunk: written on the one-read path (a kernel that folds,
    rows of whole 128-byte steps that chunks do not split), never on the check-then-move path."""
    select_kernel(kernel)
    role, itemsize, head_dim, chunk = rows
    heads, page_size = 8, 32
    if role == "sequence":
        capacity, n_pages = 2048, 64
        positions, block_elems = sequence_positions(page_size, heads, capacity, head_dim), heads * capacity * head_dim
        offsets = np.arange(n_pages, dtype=np.int64)[::-1] * page_size * head_dim * itemsize
        n_blocks = 1
    else:
        n_pages = n_blocks = 64
        positions, block_elems = vllm_positions(page_size, heads, head_dim, role), 2 * page_size * heads * head_dim
        offsets = np.arange(n_pages, dtype=np.int64)[::-1] * block_elems * itemsize
    layout = mover.page_layout(positions, itemsize)
    pages = engine(n_pages, len(positions), itemsize, seed=3).view(np.uint8)
    crcs = mover.chunk_crcs(pages, chunk)
    want = np.zeros(n_blocks * block_elems * itemsize + shift, np.uint8)[shift:]
    mover.scatter_pages(pages, want, offsets, layout)
    out = np.zeros(len(want) + shift, np.uint8)[shift:]
    assert mover.scatter_pages_checked(pages, out, offsets, layout, chunk, crcs) is None
    assert out.tobytes() == want.tobytes()

    bad = pages.copy()
    bad[5 * chunk + 7] ^= 1
    bad[-1] ^= 1  # and the last chunk
    out[:] = 0
    assert mover.scatter_pages_checked(bad, out, offsets, layout, chunk, crcs) == 5
    chunk_5 = np.zeros_like(out)  # 1 where chunk 5's bytes land
    mover.scatter_pages((np.arange(len(pages)) // chunk == 5).astype(np.uint8), chunk_5, offsets, layout)
    one_read = kernel.endswith("vpclmulqdq") and role == "sequence" and (head_dim * itemsize) % 128 == 0 \
        and chunk % (head_dim * itemsize) == 0
    if one_read:  # the bad chunk's bytes, as they are
        mover.scatter_pages(bad, want, offsets, layout)
        assert out[chunk_5 == 1].tobytes() == want[chunk_5 == 1].tobytes()
    else:
        assert not out[chunk_5 == 1].any()


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("path", ["native", "portable"])
def test_a_batch_of_checked_scatters_writes_each_scatters_bytes_and_names_the_first_bad_chunk(
        native, select_kernel, kernel, path):
    """mover.scatter_pages_checked_batch (thaw_scatter_pages_checked_batch: one run of the pool for them all):
    scatters of different layouts (sequence rows moved and summed in one read, a transposed K checked then
    moved, a small one) give the bytes each gives alone; a bad chunk in two of them is reported as the first
    scatter's first bad chunk; a scatter refused (a range outside its buffer) raises ValueError naming it
    before any byte of the others moves."""
    select_kernel(kernel)
    batch = {"native": mover._c_scatter_pages_checked_batch, "portable": mover._py_scatter_pages_checked_batch}[path]
    heads, page_size, dim, capacity, chunk = 8, 32, 128, 1024, 1 << 16
    cases = []
    for n_pages, positions, block_elems, reverse in (
            (32, sequence_positions(page_size, heads, capacity, dim), heads * capacity * dim, True),
            (16, vllm_positions(page_size, heads, dim, "k"), 2 * page_size * heads * dim, False),
            (2, sequence_positions(page_size, heads, capacity, dim), heads * capacity * dim, False)):
        layout = mover.page_layout(positions, 4)
        step = page_size * dim * 4 if block_elems == heads * capacity * dim else block_elems * 4
        offsets = np.arange(n_pages, dtype=np.int64)[:: -1 if reverse else 1] * step
        n_blocks = 1 if step != block_elems * 4 else n_pages
        pages = engine(n_pages, len(positions), 4, seed=len(cases)).view(np.uint8)
        want = np.zeros(n_blocks * block_elems * 4, np.uint8)
        mover.scatter_pages(pages, want, offsets, layout)
        cases.append((pages, want, offsets, layout, mover.chunk_crcs(pages, chunk)))
    outs = [np.zeros_like(want) for _, want, _, _, _ in cases]
    assert batch([(p, out, o, l, chunk, c, False) for (p, _, o, l, c), out in zip(cases, outs)]) is None
    assert all(out.tobytes() == want.tobytes() for out, (_, want, _, _, _) in zip(outs, cases))

    bad = [p.copy() for p, _, _, _, _ in cases]
    bad[1][3 * chunk + 5] ^= 1
    bad[2][0] ^= 1
    assert batch([(b, out, o, l, chunk, c, False) for b, (_, _, o, l, c), out in zip(bad, cases, outs)]) == (1, 3)

    untouched = [np.zeros_like(want) for _, want, _, _, _ in cases]
    specs = [(p, out, o, l, chunk, c, False) for (p, _, o, l, c), out in zip(cases, untouched)]
    pages, _, offsets, layout, crcs = cases[2]
    with pytest.raises(ValueError, match="^scatter 3: page 0"):
        batch(specs + [(pages, untouched[2][:100], offsets, layout, chunk, crcs, False)])
    with pytest.raises(ValueError, match="^scatter 1: .*expected CRCs"):
        batch([specs[0], (pages, untouched[2], offsets, layout, chunk, crcs[:-1], False)])
    read_only = np.zeros_like(untouched[2])
    read_only.flags.writeable = False
    with pytest.raises((ValueError, TypeError), match="^scatter 1: .*read-only"):
        batch([specs[0], (pages, read_only, offsets, layout, chunk, crcs, False)])
    assert not any(out.any() for out in untouched)
    assert batch([]) is None


def mapped_rss(address: int) -> int:
    """The resident bytes of this process's mapping that starts at `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    at = lines.index(next(line for line in lines if line.startswith(f"{address:x}-")))
    return 1024 * int(next(line for line in lines[at + 1 :] if line.startswith("Rss:")).split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_DONTNEED) is Linux's")
def test_a_batch_releases_a_mapped_files_pages_once_each_scatter_has_moved(native, tmp_path):
    """release=True (thaw_mlx.load's mapped file): each scatter's pages are unmapped once it has moved, so the
    mapping holds none of them after the call, and the bytes scattered are the file's; release=False leaves
    them mapped."""
    layout = mover.page_layout(np.arange(1024), 4)  # 4 KiB pages, 4 MiB per scatter: the thread pool's size
    data = engine(1, 2 << 20, 4, seed=5).view(np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    with open(tmp_path / "f", "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pages = np.frombuffer(mapping, np.uint8)
    half = len(pages) // 2
    offsets = np.arange(half // 4096, dtype=np.int64) * 4096
    for release in (False, True):
        outs = [np.zeros(half, np.uint8) for _ in range(2)]
        specs = [(pages[k * half : (k + 1) * half], out, offsets, layout, 1 << 20,
                  mover.chunk_crcs(data[k * half : (k + 1) * half], 1 << 20), release) for k, out in enumerate(outs)]
        assert mover.scatter_pages_checked_batch(specs) is None
        assert b"".join(out.tobytes() for out in outs) == data.tobytes()
        assert (mapped_rss(pages.ctypes.data) == 0) == release
    del pages, specs
    mapping.close()


def rows_case(role: str, row_bytes: int, seed: int):
    """6 MiB (enough for the thread pool) of pages of plain rows, out of order, for the gather: (blocks, offsets,
    layout, the pages' bytes). "slots": one bfloat16 row per page, the slots shuffled (SGLang's token slots);
    "sequence": pages of 32 tokens x 8 heads of a [heads, capacity, head_dim] float32 array, in reverse order
    (MLX's)."""
    total = 6 << 20
    if role == "slots":
        itemsize, n_pages = 2, total // row_bytes
        positions, block_elems = np.arange(row_bytes // 2), row_bytes // 2
        picks = np.random.default_rng(seed).permutation(n_pages + 9)[:n_pages]
        blocks = engine(n_pages + 9, block_elems, itemsize, seed=seed + 1)
    else:
        itemsize, head_dim, n_pages = 4, row_bytes // 4, total // (32 * 8 * row_bytes)
        positions, block_elems = sequence_positions(32, 8, 32 * n_pages, head_dim), 32 * head_dim
        picks = np.arange(n_pages)[::-1]
        blocks = engine(1, 8 * 32 * n_pages * head_dim, itemsize, seed=seed + 1)
    offsets = picks.astype(np.int64) * block_elems * itemsize
    layout = mover.page_layout(positions, itemsize)
    assert layout.row_elems * itemsize == row_bytes and layout.col_stride == 1
    return blocks, offsets, layout, blocks[(offsets // itemsize)[:, None] + positions[None, :]].view(np.uint8).ravel()


FILL = 0xAB  # what shifted_out's bytes hold before a kernel writes: a stray store, even of zeros, shows


def shifted_out(n: int, shift: int):
    """(raw, start, out): n bytes of `raw` at `shift` bytes past a 64-byte boundary, all of raw FILL."""
    raw = np.full(n + 128, FILL, np.uint8)
    start = (-raw.ctypes.data) % 64 + shift
    return raw, start, raw[start : start + n]


def guards_kept(raw, start: int, n: int) -> bool:
    """Whether the bytes of shifted_out's `raw` around its n bytes at `start` are still FILL."""
    return bool((raw[:start] == FILL).all() and (raw[start + n :] == FILL).all())


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("rows", [
    ("slots", 4096, 1 << 20),     # SGLang's token slots, 4 KiB rows: one read where the kernel folds
    ("slots", 128, 3 << 10),      # 128-byte rows, chunks of 24 rows: one read
    ("sequence", 512, 5 << 9),    # MLX-style 512-byte rows, chunks of 5 rows (starting inside pages): one read
    ("sequence", 96, 3 << 10),    # 96-byte rows: moved, then summed
    ("slots", 4096, 3 << 10),     # chunks that split rows: moved, then summed
    ("sequence", 512, 1000),      # the same, chunks not of whole rows
])
@pytest.mark.parametrize("shift", [0, 4, 16])  # pages aligned for streaming stores, or not
def test_gather_with_crcs_in_one_read_or_two_gives_the_same_pages_and_crcs(native, select_kernel, kernel, rows,
                                                                          shift):
    """thaw_gather_pages with chunk CRCs under every CRC kernel this CPU has: the pages and CRCs of the software
    kernel (which moves, then sums: it has no folding copy), large enough (6 MiB) for the thread pool, slots and
    pages out of order; the bytes around the pages untouched. The folding copy runs where the kernel has one,
    rows are whole 128-byte steps and chunks start on rows."""
    role, row_bytes, chunk = rows
    blocks, offsets, layout, want = rows_case(role, row_bytes, seed=4)
    select_kernel("software")
    want_crcs = mover.chunk_crcs(want, chunk)
    two_reads = np.zeros(len(want), np.uint8)
    assert mover.gather_pages(blocks, offsets, layout, two_reads, chunk) == want_crcs
    assert two_reads.tobytes() == want.tobytes()

    select_kernel(kernel)
    raw, start, out = shifted_out(len(want), shift)
    assert mover.gather_pages(blocks, offsets, layout, out, chunk) == want_crcs
    assert out.tobytes() == want.tobytes()
    assert guards_kept(raw, start, len(want))


@pytest.mark.parametrize("rows", [
    ("slots", 4096),     # SGLang's token slots: rows streamed into the pages
    ("sequence", 256),   # MLX-style rows of 8 heads x 64 float32, the shortest streamed
    ("sequence", 300),   # rows that end inside a 64-byte step: streamed, their tail copied
    ("sequence", 96),    # rows too short to stream: copied
])
@pytest.mark.parametrize("shift", [0, 4, 16])  # pages aligned for streaming stores, or not
def test_gather_without_crcs_streamed_or_copied_gives_the_pages(native, rows, shift):
    """thaw_gather_pages without CRCs (rows streamed into the pages where aligned and long enough), large enough
    (6 MiB) for the thread pool, pages out of order: numpy's indexing of the same bytes, the bytes around the
    pages untouched."""
    role, row_bytes = rows
    blocks, offsets, layout, want = rows_case(role, row_bytes, seed=6)
    raw, start, out = shifted_out(len(want), shift)
    assert mover.gather_pages(blocks, offsets, layout, out) is None
    assert out.tobytes() == want.tobytes()
    assert guards_kept(raw, start, len(want))


def test_threaded_gather_with_crcs_equals_separate_pass(native):
    """Large enough (16 MiB) for the thread pool, chunks not aligned with pages."""
    positions, block_elems = vllm_positions(32, 8, 128, "k"), 2 * 32 * 8 * 128
    blocks = engine(160, block_elems, 4, seed=1)
    picks = list(range(159, -1, -2)) + list(range(0, 160, 2))
    offsets = np.array(picks, dtype=np.int64) * block_elems * 4
    layout = mover.page_layout(positions, 4)
    out = np.empty(len(picks) * len(positions), np.float32)
    crcs = mover.gather_pages(blocks, offsets, layout, out, 3 << 16)
    assert out.tobytes() == expected(blocks, block_elems, picks, positions).tobytes()
    assert crcs == mover.chunk_crcs(out, 3 << 16)


@pytest.mark.parametrize("path", PATHS)
def test_bad_inputs_are_refused_before_any_byte_moves(native, path):
    gather, scatter = PATHS[path]
    positions, block_elems = vllm_positions(32, 2, 16, "k"), 2 * 32 * 2 * 16
    layout = mover.page_layout(positions, 4)
    blocks = engine(4, block_elems, 4)
    before = blocks.copy()
    out = np.full(2 * len(positions), 7, np.float32)
    page_bytes = len(positions) * 4
    block_bytes = block_elems * 4

    with pytest.raises(ValueError, match="page 1"):  # past the end
        gather(blocks, [0, 4 * block_bytes], layout, out)
    with pytest.raises(ValueError, match="page 0"):  # negative
        gather(blocks, [-4, 0], layout, out)
    with pytest.raises(ValueError, match="page 1"):  # huge: no wrap-around
        gather(blocks, [0, (1 << 63) - 1], layout, out)
    with pytest.raises(ValueError, match="need"):  # the pages buffer is too small
        gather(blocks, [0, 0, 0], layout, out)
    assert (out == 7).all()

    with pytest.raises(ValueError, match="share memory"):  # the output aliases the engine
        gather(blocks, [0], layout, blocks.view(np.uint8)[block_bytes:])
    with pytest.raises(ValueError, match="more than once"):  # two pages into one block race
        scatter(out, blocks, [block_bytes, block_bytes], layout)
    with pytest.raises(ValueError, match="share memory"):
        scatter(blocks.view(np.uint8)[:page_bytes], blocks, [2 * block_bytes], layout)
    with pytest.raises(ValueError, match="itemsize"):
        gather(blocks, [0], layout._replace(itemsize=3), out)
    with pytest.raises(ValueError, match="rows"):
        gather(blocks, [0], layout._replace(row_start=np.zeros(0, np.int64)), out)
    with pytest.raises(ValueError, match="page 0"):  # a row that reaches outside its buffer
        gather(blocks, [0], layout._replace(col_stride=-1), out)
    assert blocks.tobytes() == before.tobytes()


def test_no_pages_is_a_no_op(native):
    layout = mover.page_layout(np.arange(16), 4)
    out = np.zeros(0, np.float32)
    assert len(mover.gather_pages(np.zeros(16, np.float32), [], layout, out, 4096)) == 0
    mover.scatter_pages(out, np.zeros(16, np.float32), [], layout)


@pytest.mark.parametrize("path", ["native", "portable"])
@pytest.mark.parametrize("chunk", [3 << 16, 1 << 20, 3 << 20])  # chunks not aligned with pages; larger than a tile
@pytest.mark.parametrize("at", [0, 4096, (2 << 20) - 4])  # on, off and just before a 2 MiB span boundary
def test_gather_into_a_file_writes_the_pages_and_their_chunk_crcs(native, tmp_path, path, chunk, at):
    """Threaded (16 MiB of MLX-style pages, 40 KiB each), at an offset of the file: the bytes and CRCs of
    gather_pages into memory (chunks cut across the 2 MiB spans the native path writes by); the bytes around
    the pages untouched."""
    positions = sequence_positions(16, 8, 4096, 80)
    blocks = engine(1, 8 * 4096 * 80, 4, seed=2)
    picks = list(range(0, 256, 2)) + list(range(255, 0, -2))
    offsets = np.array(picks, dtype=np.int64) * 16 * 80 * 4
    layout = mover.page_layout(positions, 4)
    want = np.empty(len(picks) * len(positions), np.float32)
    want_crcs = mover.gather_pages(blocks, offsets, layout, want, chunk)
    target = tmp_path / "pages"
    target.write_bytes(b"\x07" * (at + want.nbytes + 4096))
    fd = os.open(target, os.O_RDWR)
    try:
        to_file = mover._c_gather_pages_to_file if path == "native" else mover._py_gather_pages_to_file
        crcs = to_file(fd, at, blocks, offsets, layout, chunk)
    finally:
        os.close(fd)
    data = target.read_bytes()
    assert data[at:-4096] == want.tobytes() and data[:at] + data[-4096:] == b"\x07" * (at + 4096)
    assert crcs == want_crcs


def test_gather_into_a_file_refuses_bad_input_and_reports_a_failed_write(native, tmp_path):
    layout = mover.page_layout(sequence_positions(16, 2, 64, 24), 4)
    blocks = engine(1, 2 * 64 * 24, 4)
    with pytest.raises(ValueError, match="page 1"):  # past the end, before anything is written
        mover.gather_pages_to_file(-1, 0, blocks, [0, 64 * 24 * 4], layout, 4096)
    with pytest.raises(ValueError, match="chunk_size"):
        mover.gather_pages_to_file(-1, 0, blocks, [0], layout, 0)
    with pytest.raises(OSError) as bad_fd:
        mover.gather_pages_to_file(-1, 0, blocks, [0], layout, 4096)
    assert bad_fd.value.errno == errno.EBADF
    read_only = tmp_path / "read-only"
    read_only.write_bytes(b"")
    fd = os.open(read_only, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as refused:
            mover.gather_pages_to_file(fd, 0, blocks, [0, 64 * 4], layout, 4096)
    finally:
        os.close(fd)
    assert refused.value.errno == errno.EBADF and read_only.read_bytes() == b""


def refusals(call):
    """The exception type each bad input gets from `call(**changes)`, None where it is accepted."""
    cases = {"page out of range": {"offsets": [0, 1 << 40]}, "chunk 0": {"chunk": 0},
             "chunk not whole items": {"chunk": 4098}, "negative file offset": {"at": -4096},
             "no descriptor": {"fd": -1}, "no descriptor, no pages": {"fd": -1, "offsets": []},
             "bad layout": {"itemsize": 3}}
    got = {}
    for name, changes in cases.items():
        try:
            call(**changes)
            got[name] = None
        except (ValueError, OSError) as error:
            got[name] = type(error).__name__
    return got


def test_both_paths_refuse_the_same_gathers_into_a_file(native, tmp_path):
    """gather_pages_to_file, native and portable: the same inputs refused, with the same exception types, and
    nothing written to the file."""
    layout = mover.page_layout(sequence_positions(16, 2, 64, 24), 4)
    blocks = engine(1, 2 * 64 * 24, 4)
    target = tmp_path / "file"
    target.write_bytes(b"\x07" * 8192)
    fd = os.open(target, os.O_RDWR)

    def gather(to_file, fd=fd, at=0, offsets=(0, 16 * 24 * 4), chunk=4096, itemsize=4):
        return to_file(fd, at, blocks, list(offsets), layout._replace(itemsize=itemsize), chunk)

    try:
        native_gather = refusals(lambda **c: gather(mover._c_gather_pages_to_file, **c))
        assert native_gather == refusals(lambda **c: gather(mover._py_gather_pages_to_file, **c))
    finally:
        os.close(fd)
    assert target.read_bytes() == b"\x07" * 8192
    assert native_gather["no descriptor"] == native_gather["no descriptor, no pages"] == "OSError"
    assert all(native_gather[k] == "ValueError"
               for k in ("page out of range", "chunk 0", "chunk not whole items", "negative file offset", "bad layout"))
