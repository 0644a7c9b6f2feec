"""A tensor-parallel rank's share of a snapshot's KV pages (thaw_format.sdk.head_share), engine-neutral: the slab of
whole heads it holds in every token row, read from and written back into pages over all heads."""

import numpy
import pytest
from thaw_format.sdk.head_share import RegionsError, check_regions, head_share, put_share, take_share


def test_a_rank_holds_a_slab_of_whole_heads_in_every_token_row():
    pages = numpy.arange(2 * 4 * 6 * 8, dtype=numpy.float32).reshape(2, 4, 6, 8)  # 2 pages, 4 tokens, 6 heads
    out = numpy.zeros_like(pages)
    for rank in range(3):
        share = head_share("an adapter", rank, 3, 2, 6, 8, 4)
        offsets = share.slab_offsets(2, 4)
        local = numpy.frombuffer(take_share(pages, share, offsets, bytearray(len(offsets) * share.slab_bytes)),
                                 numpy.float32).reshape(2, 4, 2, 8)
        assert numpy.array_equal(local, pages[:, :, 2 * rank : 2 * rank + 2])
        put_share(numpy.ascontiguousarray(local), out, share, offsets)
    assert numpy.array_equal(out, pages)


@pytest.mark.parametrize("ranks, total, heads, match", [
    (2, 1, 1, r"tensor_parallel_size=2 over 1 KV heads: each rank holds 1, 2 in all \(the engine replicates them: "
              r"fewer KV heads than ranks\)"),
    (2, 3, 2, r"tensor_parallel_size=2 over 3 KV heads: each rank holds 2, 4 in all \(the engine pads them to 4, a "
              r"multiple of the ranks\)"),  # SGLang on CPU
    (4, 2, 1, r"tensor_parallel_size=4 over 2 KV heads: each rank holds 1, 4 in all \(the engine replicates them"),
    (2, 4, 1, r"tensor_parallel_size=2 over 4 KV heads: each rank holds 1, 2 in all \(not the model's 4\)"),
])
def test_heads_that_do_not_divide_evenly_are_refused_naming_the_adapter(ranks, total, heads, match):
    with pytest.raises(NotImplementedError, match=f"{match}.*an adapter maps tensor parallelism only"):
        head_share("an adapter", 0, ranks, heads, total, 32, 4)


def test_parallelism_besides_tensor_parallelism_is_refused_by_its_name():
    with pytest.raises(NotImplementedError, match="an adapter maps tensor parallelism only; this engine has pp_size=2"):
        head_share("an adapter", 0, 2, 1, 2, 32, 4, other={"pp_size": 2})


@pytest.mark.parametrize("regions, size, match", [
    ({"kv/0/k": (100, 164), "kv/0/v": (164, 196), "kv/1/k": (0, 64)}, 200, r"regions name \['kv/1/k'\], not"),
    ({"kv/0/k": (100, 164)}, 200, r"regions lack \['kv/0/v'\], not"),
    ({"kv/0/k": (100, 164), "kv/1/k": (0, 64)}, 200, r"regions lack \['kv/0/v'\] and name \['kv/1/k'\], not"),
    ({"kv/0/k": (100, 164), "kv/0/v": (164, 190)}, 200, "kv/0/v: the published region holds 26 bytes; this "
                                                       "rank expects 32"),
    ({"kv/0/k": (100, 164), "kv/0/v": (164, 196)}, 190, r"kv/0/v: the published region \[164, 196\) lies outside "
                                                        "the 190-byte segment"),
    ({"kv/0/k": (-1, 63), "kv/0/v": (164, 196)}, 200, "kv/0/k: the published region"),
])
def test_regions_the_first_rank_published_are_checked_against_this_ranks_tensors(regions, size, match):
    """A rank writes its heads into the regions the first rank laid out only where they are its own tensors'."""
    nbytes = {"kv/0/k": 64, "kv/0/v": 32}
    check_regions({"kv/0/k": [100, 164], "kv/0/v": [164, 196]}, 200, nbytes)  # as JSON brings them: lists
    with pytest.raises(RegionsError, match=match):
        check_regions(regions, size, nbytes)
