"""A tensor-parallel rank's share of a snapshot's KV pages (thaw_format.sdk.head_share), engine-neutral: the slab of
whole heads it holds in every token row, read from and written back into pages over all heads."""

import numpy
import pytest
from thaw_format.sdk.head_share import head_share, put_share, take_share


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
    (2, 1, 1, "tensor_parallel_size=2 over 1 KV heads: each rank holds 1"),  # an engine replicates the head
    (4, 2, 1, "tensor_parallel_size=4 over 2 KV heads"),
])
def test_heads_that_do_not_divide_evenly_are_refused_naming_the_adapter(ranks, total, heads, match):
    with pytest.raises(NotImplementedError, match=f"{match}.*an adapter maps tensor parallelism only"):
        head_share("an adapter", 0, ranks, heads, total, 32, 4)
