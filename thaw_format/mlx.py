"""MLX binding: mx.array <-> Tensor. Needs only mlx and numpy (never torch).

bfloat16 comes in as its bits (MLX exports it as buffer format "bfloat16") and goes back to MLX as its uint16
bit pattern, since numpy knows no bfloat16.
`writable_arrays` hands out new arrays together with writable views of their (uninitialised) memory, so a
loader can write bytes straight into MLX (libthaw's scatter), each byte once, instead of building them
elsewhere and having MLX copy them, or zeroing the arrays first; `owned_view` hands out the memory of an array
its caller holds alone, to write over again.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import numpy as np

from . import mover
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
    """The array's bytes as a read-only Tensor: an evaluated row-major array's own memory, shared with MLX,
    else a row-major copy. Sharing is sound because the view holds its own array object: in-place syntax
    (`a[0:2] = b`, `a += b`) gives the caller's object a new buffer, and the exported one stays as it was."""
    name = dtype_name(array.dtype)
    if not array.size:
        return Tensor(name, array.shape, b"")  # memoryview cannot recast an empty view to bytes
    # copy.copy: a new array object on the same data, with no evaluation. Exported directly, the caller's object
    # would be the view's owner, and its in-place ops could let MLX write the result into the exported buffer, or
    # free it, under a save that is reading it. MLX's buffer export evaluates the array only if it must, so a
    # cache's evaluated keys are exported with no round trip through MLX's stream thread (which a busy machine
    # delays by milliseconds; thaw_mlx.save makes one per KV tensor); bfloat16 too, as format "bfloat16".
    view = memoryview(copy.copy(array))
    if view.c_contiguous:
        return Tensor(name, array.shape, view.toreadonly())
    # A strided array (a transpose, a slice, a broadcast); the format wants row-major bytes. Copied from the view
    # already evaluated where its rows are contiguous (CPython moves whole rows; a ring cache's transposed keys);
    # where they are not, CPython would copy item by item, many times slower than MLX, so MLX copies it.
    if view.strides[-1] == view.itemsize:
        return Tensor(name, array.shape, view.tobytes())
    return Tensor(name, array.shape, memoryview(mx.contiguous(array)).toreadonly())


def writable_arrays(specs) -> list[tuple[mx.array, memoryview]]:
    """New MLX arrays, one per (shape, format dtype) in `specs`, each with a writable byte view of its memory,
    which is left uninitialised: the caller writes every byte of each view, releases it, and only then lets MLX
    use the array (writing through a view later is a bug).

    Why this way: on CPU, MLX has no uninitialised array and adopts no outside memory, so the cheapest array a
    loader could write into would be mx.zeros, which writes every byte once before the loader does (a pass as
    long as the scatter itself). MLX's loader from a file object does allocate arrays without writing them: it
    takes their memory from its allocator (which keeps freed buffers: memory already touched) and asks the
    object to `readinto` it. So MLX is handed a file object (_Unwritten) serving a safetensors header that names
    the arrays (as unsigned integers of their item size, viewed back as their dtype: the same bytes), whose
    data reads leave MLX's memory as it is. The arrays are then sound to write: each owns a buffer nothing else
    has seen. MLX calls readinto on its own I/O threads and keeps a reader object that refers back to the file
    object; a reader dropped by one of MLX's threads after the interpreter began to exit ends the process (it
    must take the GIL: "terminate called without an active exception"), so this returns only once MLX has let
    go of every reader."""
    specs = [(tuple(shape), dtype) for shape, dtype in specs]
    for shape, dtype in specs:
        if dtype not in _TYPES:
            raise TypeError(f"MLX has no dtype for {dtype!r}")
        if not shape or any(not isinstance(d, int) or not 0 < d < 2**31 for d in shape):
            raise ValueError(f"writable_arrays needs shapes of positive dimensions, got {shape}")
    if not specs:
        return []
    raws = _load_unwritten(_Unwritten([(shape, np.dtype(_TYPES[dtype][1]).itemsize) for shape, dtype in specs]),
                           len(specs))
    arrays = [raw if raw.dtype == _TYPES[dtype][0] else raw.view(_TYPES[dtype][0])
              for raw, (_, dtype) in zip(raws, specs)]
    mx.eval(arrays)
    views = [sole_view(raw) for raw in raws]
    for view in views:
        mover.prefault(view)  # new memory: faulted in by system calls, not by a trap per page (see libthaw)
    return list(zip(arrays, views))


def writable_array(shape, dtype: str) -> tuple[mx.array, memoryview]:
    """One array of writable_arrays."""
    return writable_arrays([(shape, dtype)])[0]


class _Unwritten:
    """A read-only file object for MLX's safetensors loader: a header naming the arrays, then data whose reads
    leave MLX's memory unwritten (see writable_arrays). Data reads run on MLX's I/O threads, where an exception
    would end the process: they do nothing that can raise."""

    closed = False

    def __init__(self, specs) -> None:
        entries, start = {}, 0
        for i, (shape, width) in enumerate(specs):
            nbytes = math.prod(shape) * width
            entries[str(i)] = {"dtype": f"U{8 * width}", "shape": list(shape), "data_offsets": [start, start + nbytes]}
            start += nbytes
        header = json.dumps(entries).encode()
        self._header = len(header).to_bytes(8, "little") + header
        self._size = len(self._header) + start
        self._position = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = (0, self._position, self._size)[whence] + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, view) -> int:
        n, at = len(view), self._position
        self._position += n
        if at < len(self._header):  # the header (on the caller's thread, before any data)
            part = self._header[at : at + n]
            view[: len(part)] = part
        return n


def _load_unwritten(stream: _Unwritten, count: int, timeout: float = 10.0) -> list[mx.array]:
    """The `count` arrays `stream` names, evaluated, once MLX has let go of its reader of `stream`: an I/O thread
    drops its task, and with it a reference to the reader, just after the read the evaluation waited for (a
    few microseconds, as measured)."""
    unheld = sys.getrefcount(stream)
    try:
        loaded = mx.load(stream, format="safetensors")
        raws = [loaded.pop(str(i)) for i in range(count)]
        del loaded
        mx.eval(raws)  # evaluated arrays let go of their loader (its reader may live a moment longer)
    finally:  # a failed load too: a reader dropped later, on an MLX thread at exit, would abort the process
        deadline = time.monotonic() + timeout
        while sys.getrefcount(stream) > unheld:
            if time.monotonic() > deadline:
                raise RuntimeError("MLX still holds the reader of a finished load: mlx.load changed its lifetimes")
            time.sleep(0)  # lets the I/O thread take the GIL to drop its reader
    return raws


def sole_view(array: mx.array) -> memoryview:
    """A writable byte view of an evaluated array's memory, refused unless it covers exactly the array's
    row-major bytes: a broadcast, strided or transposed array shares or skips memory, so writing through it
    would be wrong. It does not prove that no other array shares the buffer: see writable_arrays."""
    view = memoryview(array)
    if view.readonly or not view.c_contiguous or view.nbytes != array.nbytes or view.shape != tuple(array.shape):
        raise ValueError(f"the {array.dtype}{list(array.shape)} array's memory is not its own row-major bytes "
                         f"(strides {view.strides}, {view.nbytes} bytes): not writable in place")
    return view.cast("B")


def owned_view(array: mx.array) -> memoryview:
    """A writable byte view of the memory of an array its caller holds alone (no other array, evaluated or
    not, shares or reads that buffer): a restore writing a new cache over the buffers of the one it replaces,
    with no allocation and no page faults. MLX arrays are immutable to every other holder, so writing into
    one that anything else can see is a bug; sole_view refuses only memory that is not the array's own."""
    mx.eval(array)
    return sole_view(array)


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
