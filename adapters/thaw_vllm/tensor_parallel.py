"""vLLM's tensor-parallel ranks as thaw's head shares (thaw_format.sdk.head_share): rank r of N holds heads
[r*h, (r+1)*h) of H = N*h (vLLM's QKVParallelLinear), and every rank holds the same blocks (the engine core's block
table is one). Where vLLM replicates heads (fewer KV heads than ranks), splits a page's tokens between ranks (context
parallel) or its layers (pipeline parallel), no rank's share is a slab of whole heads: refused.
"""

from __future__ import annotations

from thaw_format.sdk import agreement
from thaw_format.sdk.head_share import HeadShare, head_share as _head_share

from . import _internals


def head_share(parallel_config, total_heads: int, heads: int, rank: int, head_dim: int, itemsize: int) -> HeadShare:
    """This rank's share of the KV heads, or NotImplementedError naming what thaw_vllm does not map."""
    other = {name: size for name, size in (
        ("pipeline_parallel_size", parallel_config.pipeline_parallel_size),
        ("decode_context_parallel_size", parallel_config.decode_context_parallel_size),
        ("prefill_context_parallel_size", parallel_config.prefill_context_parallel_size)) if size != 1}
    return _head_share("thaw_vllm", rank, parallel_config.tensor_parallel_size, heads, total_heads, head_dim,
                       itemsize, other=other)


def is_first() -> bool:
    """Whether this worker is its tensor-parallel group's first rank (thaw_format.sdk.agreement.is_first over the
    group's CPU process group): the rank that publishes a capture and seals it, and verifies a shared source for all."""
    return agreement.is_first(_internals.tp_cpu_group())
