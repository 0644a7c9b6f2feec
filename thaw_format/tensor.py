"""The framework-neutral tensor: a dtype name, a shape, and the C-contiguous little-endian bytes."""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

from .dtypes import itemsize

MAX_DIM = (1 << 63) - 1  # every dimension fits an int64, as frameworks index them (spec section 4)
MAX_DIMS = 16  # dimensions of a stored tensor's shape at most (spec section 4); a writer refuses more


class Tensor:
    """Bytes with a dtype and a shape. `data` is a flat unsigned-byte memoryview of exactly `nbytes`.

    Equality is byte equality (with dtype and shape), which is what "bit-identical" means here.
    """

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape, data) -> None:
        self.dtype = dtype
        try:
            self.shape = tuple(map(operator.index, shape))  # int() would take 2.5 as 2 and "2" as 2
        except TypeError:
            raise TypeError(f"shape {shape!r}: every dimension must be an integer") from None
        if self.shape and not (0 <= min(self.shape) and max(self.shape) <= MAX_DIM):
            raise ValueError(f"shape {list(self.shape)}: every dimension must be in [0, 2**63 - 1]")
        view = data if type(data) is memoryview else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        need = math.prod(self.shape) * itemsize(dtype)
        if len(view) != need:
            raise ValueError(f"{dtype}{list(self.shape)} needs {need} bytes, got {len(view)}")
        self.data = view

    @classmethod
    def _of(cls, dtype: str, shape: tuple, data: memoryview) -> "Tensor":
        """A Tensor without the checks, for callers that built `data` as a flat byte view of exactly the size
        of a known dtype and shape (a reader after its header checks, a binding from a framework tensor).
        Loading thousands of small tensors spends most of its time in such per-tensor Python work."""
        tensor = object.__new__(cls)
        tensor.dtype, tensor.shape, tensor.data = dtype, shape, data
        return tensor

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def readonly(self) -> bool:
        return self.data.readonly

    def tobytes(self) -> bytes:
        return self.data.tobytes()

    def copy(self) -> "Tensor":
        return Tensor(self.dtype, self.shape, bytearray(self.data))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape and self.data == other.data

    __hash__ = None  # mutable bytes: not hashable

    def __repr__(self) -> str:
        return f"Tensor({self.dtype}, {list(self.shape)}, {self.nbytes} bytes)"


def as_tensor(value: Any) -> Tensor:
    """Turn a Tensor, torch tensor, numpy array or mlx array into a Tensor.

    Dispatches on the value's module so that only the framework the caller already uses gets imported.
    """
    if isinstance(value, Tensor):
        return value
    kind = type(value)
    convert = _CONVERTERS.get(kind)
    if convert is None:
        convert = _CONVERTERS[kind] = _converter(kind)
    return convert(value)


# type -> its binding's converter, found once per type: an import statement per call costs more than the
# conversion of a small tensor.
_CONVERTERS: dict[type, Callable[[Any], Tensor]] = {}


def _converter(kind: type) -> Callable[[Any], Tensor]:
    module = kind.__module__.split(".")[0]
    if module == "torch":
        from .torch import from_torch

        return from_torch
    if module == "numpy":
        from .numpy import from_numpy

        return from_numpy
    if module == "mlx":
        from .mlx import from_mlx

        return from_mlx
    raise TypeError(f"cannot store a {kind.__qualname__} as a tensor (expected torch, numpy or mlx)")
