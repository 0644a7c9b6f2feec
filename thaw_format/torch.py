"""PyTorch binding: Tensor <-> torch.Tensor. Imported only by callers that use torch."""

from __future__ import annotations

import torch

from .dtypes import ITEMSIZE
from .tensor import Tensor


def from_torch(value: torch.Tensor) -> Tensor:
    """Bytes of any CPU or device tensor; non-contiguous, conjugated and negative-bit views are materialised."""
    t = value.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise TypeError(f"torch dtype {t.dtype} has no thaw dtype name")
    raw = t.reshape(-1).view(torch.uint8).numpy()  # shares memory; the array keeps the tensor alive
    return Tensor(name, tuple(t.shape), memoryview(raw))


def to_torch(tensor: Tensor) -> torch.Tensor:
    """A torch.Tensor over the same bytes when they are writable (no copy), otherwise over a copy."""
    dtype = getattr(torch, tensor.dtype)
    if tensor.nbytes == 0:
        return torch.empty(tensor.shape, dtype=dtype)
    data = tensor.data if not tensor.data.readonly else bytearray(tensor.data)
    return torch.frombuffer(data, dtype=dtype).reshape(tensor.shape)
