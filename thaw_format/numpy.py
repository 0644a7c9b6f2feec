"""NumPy binding: Tensor <-> numpy.ndarray. bfloat16 and fp8 need the `ml_dtypes` package (as in JAX)."""

from __future__ import annotations

import numpy as np

from .dtypes import ITEMSIZE
from .tensor import Tensor


def _numpy_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        pass
    try:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    except (ImportError, AttributeError):
        raise TypeError(f"numpy has no dtype {name!r} (install ml_dtypes for bfloat16 and float8 types)") from None


def from_numpy(value: np.ndarray) -> Tensor:
    shape = np.shape(value)  # ascontiguousarray returns at least 1-D: a 0-d array (a scalar) would get [1]
    a = np.ascontiguousarray(value)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    name = a.dtype.name
    if name not in ITEMSIZE:
        raise TypeError(f"numpy dtype {a.dtype} has no thaw dtype name")
    return Tensor(name, shape, memoryview(a.reshape(-1).view(np.uint8)))


def to_numpy(tensor: Tensor) -> np.ndarray:
    """An array over the same bytes (read-only if they are)."""
    return np.frombuffer(tensor.data, dtype=_numpy_dtype(tensor.dtype)).reshape(tensor.shape)
