"""MLX binding: mx.array <-> Tensor. Needs only mlx and numpy (never torch).

bfloat16 travels as its uint16 bit pattern, since neither the buffer protocol nor numpy knows bfloat16.
`filled_arrays` makes new arrays whose memory a loader writes itself (libthaw's scatter), each byte once, instead
of building the bytes elsewhere and having MLX copy them, or zeroing the arrays first.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Optional

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


def filled_arrays(specs, fill: Callable[[int, memoryview], None]) -> list[mx.array]:
    """New MLX arrays, one per (shape, format dtype) in `specs`, whose bytes `fill(i, view)` writes: `view` is a
    writable byte view of exactly array i's row-major memory, uninitialised, and valid only during the call
    (fill must write every byte and keep no reference to the view).

    Why this way: on CPU, MLX has no uninitialised array and adopts no outside memory, so the cheapest array a
    loader could write into used to be mx.zeros, which writes every byte once before the loader does. What MLX
    does have is loading from a file object: it allocates each array from its own allocator (which recycles
    freed buffers: memory already touched) and asks the object to `readinto` that memory. So MLX is handed a file
    object that serves a safetensors header naming the arrays (as unsigned integers of their item size, viewed
    back as their dtype: the same bytes) and answers each array's read by calling fill. Each byte is written
    once, by fill, into memory the arrays own from the start: nothing else can see it until this returns.

    MLX calls readinto on its own I/O thread, where an exception would end the process: the first exception
    from fill is kept, later fills are skipped, and it is raised here once MLX returns (the arrays dropped)."""
    specs = [(tuple(shape), dtype) for shape, dtype in specs]
    for shape, dtype in specs:
        if dtype not in _TYPES:
            raise TypeError(f"MLX has no dtype for {dtype!r}")
        if not shape or any(not isinstance(d, int) or not 0 < d < 2**31 for d in shape):
            raise ValueError(f"filled_arrays needs a shape of positive dimensions, got {shape}")
    stream = _FillStream(specs, fill)
    loaded = mx.load(stream, format="safetensors")
    if stream.error is not None:
        raise stream.error
    if stream.filled != len(specs):  # MLX read an array from somewhere else: never hand it out
        raise RuntimeError(f"MLX asked for {stream.filled} of {len(specs)} arrays: mlx.load changed its reads")
    arrays = [loaded[str(i)] for i in range(len(specs))]
    arrays = [a if a.dtype == _TYPES[dtype][0] else a.view(_TYPES[dtype][0]) for a, (_, dtype) in zip(arrays, specs)]
    mx.eval(arrays)
    return arrays


def _without_frames(exc: BaseException) -> BaseException:
    """The exception with its tracebacks (and those of the exceptions it chains) dropped: their frames would
    hold fill's view of MLX's memory past the call."""
    seen = exc
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return exc


class _FillStream:
    """A read-only file object that MLX's safetensors loader reads: the header from bytes, each array's data from
    fill (see filled_arrays)."""

    closed = False

    def __init__(self, specs, fill) -> None:
        entries, start = {}, 0
        self._starts = {}
        for i, (shape, dtype) in enumerate(specs):
            nbytes = math.prod(shape) * np.dtype(_TYPES[dtype][1]).itemsize
            width = np.dtype(_TYPES[dtype][1]).itemsize
            entries[str(i)] = {"dtype": f"U{8 * width}", "shape": list(shape), "data_offsets": [start, start + nbytes]}
            self._starts[start] = (i, nbytes)
            start += nbytes
        header = json.dumps(entries).encode()
        self._header = len(header).to_bytes(8, "little") + header
        self._size = len(self._header) + start
        self._fill, self._position = fill, 0
        self.error: Optional[BaseException] = None
        self.filled = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = {0: 0, 1: self._position, 2: self._size}[whence] + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, view) -> int:
        n, at = len(view), self._position
        self._position += n
        if at < len(self._header):  # the header, read on the caller's thread
            if at + n > len(self._header):
                raise ValueError("a read spans the header and the data")
            view[:] = self._header[at : at + n]
            return n
        index, nbytes = self._starts.get(at - len(self._header), (None, None))
        if self.error is not None:
            return n
        try:
            if nbytes != n:
                raise RuntimeError(f"MLX read {n} bytes at {at}, not an array's data: mlx.load changed its reads")
            self._fill(index, view)
            self.filled += 1
        except BaseException as exc:  # raised by filled_arrays: never into MLX's thread
            self.error = _without_frames(exc)
        view.release()  # this view of MLX's memory ends with the call (fill's contract: it keeps none)
        return n


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
