"""KV bytes between SGLang's per-layer slot buffers and the spec's token-major pages."""

from __future__ import annotations

import torch
from thaw_format import KVCache, KVLayer
from thaw_format.torch import from_torch, to_torch

from .pages import PADDING


def gather_pages(k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], slots: torch.Tensor) -> KVCache:
    """Each layer's K and V as [num_pages, page_size, kv_heads, head_dim], gathered by slot in one call each.

    Positions past the end of a short page are zero, so equal state always gives equal bytes.
    """
    num_pages, page_size = slots.shape
    flat = slots.reshape(-1)
    padding = flat == PADDING
    index = flat.clamp(min=0)
    layers = []
    for k_buffer, v_buffer in zip(k_buffers, v_buffers):
        _, heads, head_dim = k_buffer.shape
        tensors = {}
        for role, buffer in (("k", k_buffer), ("v", v_buffer)):
            pages = buffer.index_select(0, index)
            pages[padding] = 0
            tensors[role] = from_torch(pages.reshape(num_pages, page_size, heads, head_dim))
        layers.append(KVLayer(kind="attention", tensors=tensors, num_kv_heads=heads, head_dim=head_dim))
    dtype = str(k_buffers[0].dtype).removeprefix("torch.") if k_buffers else "float32"
    return KVCache(page_size=page_size, dtype=dtype, layers=layers)


def scatter_rows(
    kv: KVCache,
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    rows: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write flattened page rows `rows` of every layer into buffer slots `slots`, one call per buffer."""
    for layer, k_buffer, v_buffer in zip(kv.layers, k_buffers, v_buffers):
        for role, buffer in (("k", k_buffer), ("v", v_buffer)):
            pages = to_torch(layer.tensors[role])
            buffer[slots] = pages.reshape(-1, *pages.shape[2:]).index_select(0, rows).to(buffer.device)
