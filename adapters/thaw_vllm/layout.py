"""vLLM CPU KV blocks <-> thaw's token-major pages.

A CPU attention block is [num_kv_heads, block_size, 2 * head_dim] with K then V in the last axis; a thaw
page is [page_size, num_kv_heads, head_dim] per role.
"""

from __future__ import annotations

import torch

NATIVE_LAYOUT = "cpu_attn:[num_blocks, num_kv_heads, block_size, 2*head_dim] (K then V)"


def blocks_to_pages(cache: torch.Tensor, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the given blocks as contiguous [num_pages, block_size, num_kv_heads, head_dim]."""
    head_dim = cache.shape[-1] // 2
    blocks = cache[torch.tensor(block_ids, dtype=torch.long)] if block_ids else cache[:0]
    k = blocks[..., :head_dim].permute(0, 2, 1, 3).contiguous()
    v = blocks[..., head_dim:].permute(0, 2, 1, 3).contiguous()
    return k, v


def pages_to_blocks(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of blocks_to_pages: [num_pages, num_kv_heads, block_size, 2*head_dim]."""
    return torch.cat([k, v], dim=-1).permute(0, 2, 1, 3)
