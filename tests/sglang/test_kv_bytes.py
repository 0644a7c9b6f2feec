"""SGLang slot buffers <-> pages move in libthaw: byte for byte what torch's index_select / index assignment
gave (the previous path), padding of short pages included, in float32 and bfloat16; without an engine."""

import pytest
import torch

import engine_guard


@pytest.fixture(scope="module")
def kv():
    return engine_guard.require("thaw_sglang.kv", "install it with scripts/setup-sglang.sh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_and_scatter_equal_the_torch_index_path(kv, dtype):
    gen = torch.Generator().manual_seed(0)
    buffers = [torch.randn(300, 2, 16, generator=gen).to(dtype) for _ in range(4)]  # 2 layers of K and V
    k_buffers, v_buffers = buffers[:2], buffers[2:]
    slots = torch.tensor([[5, 6, 7, 8], [120, 3, 250, 9], [40, 41, -1, -1]], dtype=torch.int64)

    cache = kv.gather_pages(k_buffers, v_buffers, slots)
    flat = slots.reshape(-1)
    for layer, k_buffer, v_buffer in zip(cache.layers, k_buffers, v_buffers):
        for role, buffer in (("k", k_buffer), ("v", v_buffer)):
            want = buffer.index_select(0, flat.clamp(min=0))
            want[flat == -1] = 0
            assert bytes(layer.tensors[role].data) == want.view(torch.uint8).numpy().tobytes()

    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 8])  # runs, and one out of order
    targets = torch.tensor([10, 11, 12, 13, 200, 201, 202, 203, 299, 0], dtype=torch.int32)
    fused = [torch.zeros_like(b) for b in buffers]
    kv.scatter_rows(cache, fused[:2], fused[2:], rows, targets)
    reference = [torch.zeros_like(b) for b in buffers]
    for layer, k_buffer, v_buffer in zip(cache.layers, reference[:2], reference[2:]):
        for role, buffer in (("k", k_buffer), ("v", v_buffer)):
            pages = torch.frombuffer(bytearray(layer.tensors[role].data), dtype=dtype).view(-1, 2, 16)
            buffer[targets.long()] = pages.index_select(0, rows)
    for a, b in zip(fused, reference):
        assert a.view(torch.uint8).equal(b.view(torch.uint8))


@pytest.mark.parametrize("padded", [False, True])
def test_a_deferred_capture_writes_the_same_snapshot_bytes_as_the_gathered_one(kv, padded):
    from thaw_format import KVCache, Snapshot
    from thaw_format.writer import EncodedSnapshot

    gen = torch.Generator().manual_seed(1)
    buffers = [torch.randn(300, 2, 16, generator=gen) for _ in range(4)]
    slots = torch.tensor([[5, 6, 7, 8], [120, 3, 250, -1 if padded else 9]], dtype=torch.int64)

    def written(cache: KVCache, fill: dict) -> bytes:
        encoded = EncodedSnapshot(Snapshot(model=None, weights=None, kv=cache))
        out = bytearray(encoded.nbytes)
        encoded.write_into(out, fill)
        return bytes(out)

    deferred, fill = kv.deferred_pages(buffers[:2], buffers[2:], slots)
    assert sorted(fill) == ["kv/0/k", "kv/0/v", "kv/1/k", "kv/1/v"]
    assert written(deferred, fill) == written(kv.gather_pages(buffers[:2], buffers[2:], slots), {})


@pytest.mark.parametrize("chunk_size", [128, 256, 384, 1000, 1 << 20])
def test_a_gather_with_padding_gives_the_pages_and_crcs_of_a_gather_summed_after(kv, chunk_size):
    """Short pages (one last, one inside: two chains) with chunks on rows (the gather folds their CRCs), across
    rows and larger than the whole: the pages are torch's index path, the CRCs those of the pages summed after."""
    from thaw_format import mover

    gen = torch.Generator().manual_seed(2)
    buffer = torch.randn(300, 2, 16, generator=gen)  # rows of 128 bytes
    slots = torch.tensor([[5, 6, 7, 8], [120, 3, -1, -1], [40, 41, 42, 43], [250, -1, -1, -1]], dtype=torch.int64)
    index, padding = kv._slots(slots)
    pages = torch.empty(len(index), 2, 16)
    crcs = kv._gather(buffer, index, padding, kv._bytes(pages), chunk_size)

    want = buffer.index_select(0, index)
    want[torch.from_numpy(padding)] = 0
    assert pages.view(torch.uint8).equal(want.view(torch.uint8))
    assert list(crcs) == list(mover.chunk_crcs(kv._bytes(want), chunk_size))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_tensor_parallel_rank_scatters_its_heads_of_every_row_its_slabs_found_once(kv, rank, monkeypatch):
    """Pages over 4 KV heads into a rank's buffers of 2: its heads of each row, as torch's index path gives them.
    Its slabs' offsets are the same for every layer and role: found once per call."""
    from thaw_format import KVCache, KVLayer
    from thaw_format.sdk.head_share import HeadShare, head_share
    from thaw_format.torch import from_torch

    gen = torch.Generator().manual_seed(3)
    pages = [torch.randn(3, 4, 4, 16, generator=gen) for _ in range(4)]  # 2 layers of K and V: 3 pages of 4 tokens
    cache = KVCache(page_size=4, dtype="float32", layers=[
        KVLayer(kind="attention", tensors={"k": from_torch(k), "v": from_torch(v)}, num_kv_heads=4, head_dim=16)
        for k, v in zip(pages[:2], pages[2:])])
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 11, 10])
    targets = torch.tensor([10, 11, 12, 13, 200, 201, 299, 0], dtype=torch.int32)
    share = head_share("a test", rank, 2, 2, 4, 16, 4)
    found = []
    slab_offsets = HeadShare.slab_offsets
    monkeypatch.setattr(HeadShare, "slab_offsets", lambda self, *a: found.append(a) or slab_offsets(self, *a))

    buffers = [torch.zeros(300, 2, 16) for _ in range(4)]
    kv.scatter_rows(cache, buffers[:2], buffers[2:], rows, targets, share)
    assert len(found) == 1
    for page, buffer in zip(pages, buffers):
        want = torch.zeros(300, 2, 16)
        want[targets.long()] = page.reshape(-1, 4, 16).index_select(0, rows)[:, 2 * rank : 2 * rank + 2]
        assert buffer.equal(want)


def test_tensor_sizes_name_each_kv_tensor_by_its_snapshot_name_and_bytes(kv):
    """What a tensor-parallel rank checks the regions the first rank published against (head_share.check_regions)."""
    buffers = [torch.zeros(300, 2, 16) for _ in range(4)]  # 2 layers of K and V
    cache = kv.gather_pages(buffers[:2], buffers[2:], torch.arange(12, dtype=torch.int64).reshape(3, 4))
    nbytes = 3 * 4 * 2 * 16 * 4  # 3 pages of 4 tokens, 2 heads of 16 float32s
    assert kv.tensor_sizes(cache) == {"kv/0/k": nbytes, "kv/0/v": nbytes, "kv/1/k": nbytes, "kv/1/v": nbytes}
