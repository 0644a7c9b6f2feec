"""thaw_format.mlx: arrays to Tensors and back, byte for byte, for every MLX dtype."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thaw_format import Tensor, as_tensor
from thaw_format.mlx import dtype_name, from_mlx, to_mlx

DTYPES = ["float64", "float32", "float16", "bfloat16", "complex64", "int64", "int32", "int16", "int8", "uint64",
          "uint32", "uint16", "uint8", "bool"]


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("name", DTYPES)
def test_round_trip_is_byte_identical(name):
    mlx_type = getattr(mx, "bool_" if name == "bool" else name)
    size = mx.zeros((1,), dtype=mlx_type).itemsize
    raw = random_bytes(3 * 5 * size)
    if name == "bool":
        raw = bytes(b & 1 for b in raw)  # bool bytes other than 0 and 1 are not valid values
    tensor = Tensor(name, (3, 5), raw)
    array = to_mlx(tensor)
    assert array.dtype == mlx_type and array.shape == (3, 5)
    back = from_mlx(array)
    assert back == tensor and back.readonly


def row_major(array: mx.array) -> bytes:
    bits = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array  # numpy knows no bfloat16
    return np.ascontiguousarray(np.array(bits)).tobytes()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_strided_arrays_are_made_row_major(dtype):
    """Rows contiguous (an outer slice or reversal) or not (a transpose, a step in the last axis, a 1-D reversal,
    a broadcast), evaluated or lazy."""
    base = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4).astype(dtype)
    mx.eval(base)
    flat = base.reshape(-1)
    for array in (base.transpose(2, 0, 1), base[:, 1:], base[::-1], base[:, 1:, ::2], flat[::-1], (base * 2)[:, ::-1],
                  mx.broadcast_to(mx.array([1.0, 2.0], dtype=dtype), (3, 2)), base[1:], base * 2):
        tensor = from_mlx(array)
        assert tensor.readonly and tensor.shape == array.shape and tensor.tobytes() == row_major(array)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_evaluated_row_major_arrays_are_shared_not_held(dtype):
    """Exported as they are (bfloat16 too, with no uint16 view for MLX to evaluate), through an array object of
    from_mlx's own, not the caller's."""
    base = mx.arange(8, dtype=mx.float32).astype(dtype)
    mx.eval(base)
    tensor = from_mlx(base)
    assert np.frombuffer(tensor.data, np.uint8).ctypes.data == np.frombuffer(memoryview(base).cast("B"),
                                                                             np.uint8).ctypes.data
    assert tensor.data.obj is not base and tensor.data.obj.dtype == dtype


@pytest.mark.parametrize("change", ["slice", "add"])
def test_in_place_ops_leave_an_exported_tensor_as_it_was(change):
    """MLX's in-place syntax gives the caller's array object a new buffer and may write it over the old one where
    nothing else holds that: a Tensor holding the caller's own object would change under a save reading it."""
    a = mx.arange(8.0)
    mx.eval(a)
    tensor = from_mlx(a)
    before = tensor.tobytes()
    if change == "slice":
        a[0:2] = mx.array([9.0, 9.0])
    else:
        a += 1
    mx.eval(a)
    assert tensor.tobytes() == before
    assert a.tolist()[:2] == ([9.0, 9.0] if change == "slice" else [1.0, 2.0])


def test_bfloat16_bits_pass_unchanged():
    bits = mx.array([0x3F80, 0x7FC1, 0xFF80, 0x0001], dtype=mx.uint16)  # 1.0, a NaN payload, -inf, a subnormal
    tensor = from_mlx(bits.view(mx.bfloat16))
    assert tensor.dtype == "bfloat16" and tensor.tobytes() == np.array(bits).tobytes()
    assert np.array_equal(np.array(to_mlx(tensor).view(mx.uint16)), np.array(bits))


def test_to_mlx_copies():
    raw = bytearray(np.arange(4, dtype=np.float32).tobytes())
    array = to_mlx(Tensor("float32", (4,), raw))
    raw[:4] = b"\xff" * 4
    assert np.array(array).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_scalar_and_empty():
    assert from_mlx(mx.array(2.5)).shape == () and to_mlx(from_mlx(mx.array(2.5))).item() == 2.5
    assert to_mlx(from_mlx(mx.zeros((0, 3)))).shape == (0, 3)


def test_unknown_dtypes_are_refused():
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        to_mlx(Tensor("float8_e4m3fn", (2,), b"\0\0"))
    assert dtype_name(mx.bfloat16) == "bfloat16"


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 5), max_size=4), seed=st.integers(0, 2**16),
       transpose=st.booleans())
def test_any_array_round_trips(name, shape, seed, transpose):
    """Arrays of any rank (0-d and empty included), contiguous or transposed, survive mx -> Tensor -> mx."""
    mlx_type = getattr(mx, "bool_" if name == "bool" else name)
    raw = np.frombuffer(random_bytes(int(np.prod(shape)) * mx.zeros((1,), dtype=mlx_type).itemsize, seed), np.uint8)
    if name == "bool":
        raw = raw & 1
    array = to_mlx(Tensor(name, shape, raw.tobytes()))
    if transpose:
        array = array.T
    tensor = from_mlx(array)
    assert tensor == as_tensor(array) and tensor.shape == tuple(array.shape)
    assert from_mlx(to_mlx(tensor)) == tensor
