"""Page bytes between the engine's device and host memory: through libthaw's CUDA mover when the tensor is on
an NVIDIA GPU and the mover is built, through torch otherwise (the CPU path). The choice is made here only.

The bytes are the same either way (tests/transformers/test_gpu.py compares them); restored bytes were already
checked chunk by chunk by thaw_format.load before they reach this module."""

from __future__ import annotations

from typing import Optional

import torch

from thaw_format import _libthaw_cuda


def cuda_mover_unavailable(device: torch.device) -> Optional[str]:
    """Why tensors on `device` move through torch rather than the CUDA mover (None: the CUDA mover is used)."""
    if device.type != "cuda":
        return f"the tensors are on {device.type}, not a CUDA GPU"
    return _libthaw_cuda.unavailable_reason()


def _raw(t: torch.Tensor):
    return t.reshape(-1).view(torch.uint8).numpy()


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy of t."""
    if t.numel() == 0 or cuda_mover_unavailable(t.device):
        return t.cpu()
    t = t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype)
    _libthaw_cuda.gather_to_host(t.data_ptr(), [0], t.numel() * t.element_size(), _raw(out))
    return out


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A copy of the host tensor t on `device`."""
    device = torch.device(device)
    if t.numel() == 0 or cuda_mover_unavailable(device):
        return t.to(device, copy=True)
    t = t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    _libthaw_cuda.scatter_from_host(_raw(t), out.data_ptr(), [0], t.numel() * t.element_size())
    return out
