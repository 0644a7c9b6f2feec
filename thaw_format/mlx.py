"""MLX binding: mx.array <-> Tensor. Needs only mlx and numpy (never torch).

bfloat16 travels as its uint16 bit pattern, since neither the buffer protocol nor numpy knows bfloat16.
`writable_array` hands out a new array together with a writable view of its memory, so a loader can write
bytes straight into MLX (libthaw's scatter) instead of building them elsewhere and having MLX copy them.
"""

from __future__ import annotations

import numpy as np

from .extras import require
from .tensor import Tensor

mx = require("mlx.core", "mlx", "thaw_format.mlx")

# format dtype name -> (MLX dtype, numpy dtype of the same bytes)
_TYPES = {
    "float64": (mx.float64, np.float64),
    "float32": (mx.float32, np.float32),
    "float16": (mx.float16, np.float16),
    "bfloat16": (mx.bfloat16, np.uint16),
    "complex64": (mx.complex64, np.complex64),
    "int64": (mx.int64, np.int64),
    "int32": (mx.int32, np.int32),
    "int16": (mx.int16, np.int16),
    "int8": (mx.int8, np.int8),
    "uint64": (mx.uint64, np.uint64),
    "uint32": (mx.uint32, np.uint32),
    "uint16": (mx.uint16, np.uint16),
    "uint8": (mx.uint8, np.uint8),
    "bool": (mx.bool_, np.bool_),
}
_NAMES = {mlx_type: name for name, (mlx_type, _) in _TYPES.items()}


def dtype_name(dtype: mx.Dtype) -> str:
    """The format's name for an MLX dtype."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TypeError(f"no format dtype for MLX {dtype}") from None


def from_mlx(array: mx.array) -> Tensor:
    """The array's bytes as a read-only Tensor, sharing MLX's memory (MLX arrays are immutable)."""
    name = dtype_name(array.dtype)
    # A transposed or sliced array exports its strides; the format wants row-major bytes.
    array = mx.contiguous(array)
    if name == "bfloat16":
        array = array.view(mx.uint16)
    mx.eval(array)
    # memoryview cannot recast an empty view to bytes
    return Tensor(name, array.shape, memoryview(array).toreadonly() if array.size else b"")


def writable_array(shape, dtype: str) -> tuple[mx.array, memoryview]:
    """A new, zeroed MLX array of `shape` and format dtype `dtype`, and a writable byte view of its memory.

    MLX treats arrays as immutable, so writing into one is sound only while nothing else can see its buffer.
    That holds here by construction: mx.zeros is evaluated into a buffer of its own (MLX fills it from a
    scalar, which never donates), and the array has not yet been handed to anyone. The caller fills the view,
    releases it, and only then lets MLX use the array; writing through the view later is a bug. The view is
    checked to cover exactly the array's row-major bytes (no broadcast, no strides) before it is returned."""
    try:
        mlx_type, _ = _TYPES[dtype]
    except KeyError:
        raise TypeError(f"MLX has no dtype for {dtype!r}") from None
    shape = tuple(shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"writable_array needs a shape of positive dimensions, got {shape}")
    # bfloat16: the buffer protocol does not know it; its uint16 twin shares the same buffer (an MLX view of
    # the same item size shares memory).
    raw = mx.zeros(shape, mx.uint16 if dtype == "bfloat16" else mlx_type)
    array = raw.view(mlx_type) if dtype == "bfloat16" else raw
    mx.eval(raw, array)
    return array, sole_view(raw)


def sole_view(array: mx.array) -> memoryview:
    """A writable byte view of an evaluated array's memory, refused unless it covers exactly the array's
    row-major bytes: a broadcast, strided or transposed array shares or skips memory, so writing through it
    would be wrong. It does not prove that no other array shares the buffer: see writable_array."""
    view = memoryview(array)
    if view.readonly or not view.c_contiguous or view.nbytes != array.nbytes or view.shape != tuple(array.shape):
        raise ValueError(f"the {array.dtype}{list(array.shape)} array's memory is not its own row-major bytes "
                         f"(strides {view.strides}, {view.nbytes} bytes): not writable in place")
    return view.cast("B")


def to_mlx(tensor: Tensor) -> mx.array:
    """A new MLX array holding a copy of the tensor's bytes."""
    try:
        mlx_type, np_type = _TYPES[tensor.dtype]
    except KeyError:
        raise TypeError(f"MLX has no dtype for {tensor.dtype}") from None
    if tensor.dtype == "bfloat16":
        return mx.array(np.frombuffer(tensor.data, dtype=np_type).reshape(tensor.shape)).view(mlx_type)
    # An explicit dtype: MLX would otherwise narrow float64 to float32.
    return mx.array(np.frombuffer(tensor.data, dtype=np_type).reshape(tensor.shape), dtype=mlx_type)
