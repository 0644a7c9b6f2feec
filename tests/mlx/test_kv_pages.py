"""thaw_mlx's paged layers move in libthaw: byte for byte what the previous MLX-ops path built (transpose, pad,
reshape one way; index, reshape, transpose, pad the other), for full and short last pages, every float dtype,
quantized parts (packed uint32, scales) and pages restored out of order."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

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
    got = pages.to_pages(x, num_tokens, page_size)
    want = reference_to_pages(x, num_tokens, page_size)
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    assert bytes(got.data) == bytes(want.data)

    for chain in (list(range(got.shape[0])), list(range(got.shape[0]))[::-1]):  # in order, and out of order
        restored = pages.from_pages(got, chain, num_tokens)
        assert restored.dtype == x.dtype
        assert as_bytes(restored) == as_bytes(reference_from_pages(got, chain, num_tokens))
