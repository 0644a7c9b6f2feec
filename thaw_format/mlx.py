"""MLX binding: mx.array <-> Tensor. Needs only mlx and numpy (never torch).

bfloat16 travels as its uint16 bit pattern, since neither the buffer protocol nor numpy knows bfloat16.
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
