"""PyTorch binding: Tensor <-> torch.Tensor. Imported only by callers that use torch.

At thousands of small tensors these microseconds are the load and save time. Saving crosses through numpy
(`Tensor.numpy()` shares memory and is the cheapest export; numpy has no bfloat16, float8 or complex32, so
those travel as unsigned integers of the same size). Loading is one `torch.frombuffer` per tensor, which
takes every torch dtype directly; a shape other than 1-D costs one `view` more.
"""

from __future__ import annotations

import numpy as np

from .dtypes import ITEMSIZE
from .extras import require
from .tensor import Tensor

torch = require("torch", "torch", "thaw_format.torch")

_TORCH = {name: getattr(torch, name) for name in ITEMSIZE if isinstance(getattr(torch, name, None), torch.dtype)}
_NAMES = {dtype: name for name, dtype in _TORCH.items()}
_SAME_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _numpy_dtype(name: str) -> np.dtype:
    try:
        numpy_dtype = np.dtype(name)
        if numpy_dtype.itemsize == ITEMSIZE[name]:
            return numpy_dtype
    except TypeError:
        pass
    return np.dtype(_SAME_SIZE[ITEMSIZE[name]])


_NUMPY = {name: _numpy_dtype(name) for name in _TORCH}
# torch dtypes whose tensors `.numpy()` exports directly; the others are viewed as bytes first.
_EXPORTABLE = {dtype for name, dtype in _TORCH.items() if _NUMPY[name].name == name}


def from_torch(value: torch.Tensor) -> Tensor:
    """Bytes of any CPU or device tensor; non-contiguous, conjugated and negative-bit views are materialised."""
    t = value.detach() if value.requires_grad else value
    if t.layout != torch.strided:  # sparse and blocked layouts hold index arrays, not the tensor's elements
        raise TypeError(f"a {t.layout} tensor has no row-major bytes to store: convert it with .to_dense() first")
    if t.is_nested:  # ragged: no one shape
        raise TypeError("a nested tensor has no single shape to store: save its components by name instead")
    if t.is_meta:  # a shape without storage (a model built before its weights are loaded)
        raise ValueError("a tensor on the meta device holds no data to store: load or materialise it first")
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous() or t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg().contiguous()
    name = _NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"torch dtype {t.dtype} has no thaw dtype name")
    raw = t.numpy() if t.dtype in _EXPORTABLE else t.reshape(-1).view(torch.uint8).numpy()
    # The array shares the tensor's memory and keeps it alive; its size is the dtype's size times the shape.
    # (memoryview cannot cast a shape with a zero in it; an empty tensor has no bytes to share.)
    return Tensor._of(name, tuple(t.shape), memoryview(raw).cast("B") if raw.size else memoryview(bytearray()))


def to_torch(tensor: Tensor) -> torch.Tensor:
    """A torch.Tensor over the same bytes when they are writable (no copy), otherwise over a copy."""
    data, shape = tensor.data, tensor.shape
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=_TORCH[tensor.dtype])
    t = torch.frombuffer(data if not data.readonly else bytearray(data), dtype=_TORCH[tensor.dtype])
    return t if len(shape) == 1 else t.view(shape)


def device_of(device) -> torch.device:
    """`device` (a torch.device, "cpu", "cuda:1", an int for that accelerator index, as safetensors takes) as a
    torch.device that can hold tensors here: ValueError for one torch does not know or that holds no data
    ("meta"), RuntimeError for one this machine lacks (no CUDA, or fewer devices than the index)."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a torch.device, a str such as 'cpu' or 'cuda:0', or an int, got "
                        f"{type(device).__name__}")
    if isinstance(device, int) and device < 0:
        raise ValueError(f"device {device}: an accelerator's index is 0 or more")
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:  # an unknown name, or an int where torch finds no accelerator
        if isinstance(device, int):
            raise RuntimeError(f"device {device!r}: no accelerator is available here (torch {torch.__version__})") \
                from None
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "meta":  # no storage: the loaded bytes would be dropped
        raise ValueError(f"device {device!r} holds no data: load to 'cpu' or an accelerator")
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise RuntimeError(f"device {device!r}: no {parsed.type} device is available here (torch {torch.__version__})")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise RuntimeError(f"device {device!r}: this machine has {count()} {parsed.type} device(s)")
    return parsed
