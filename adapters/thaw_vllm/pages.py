"""vLLM CPU attention KV blocks <-> thaw's token-major pages (spec section 5.3).

vLLM 0.32 allocates each layer's CPU KV cache as [num_blocks, num_kv_heads, block_size, 2 * head_dim], but its
attention backend does not use that shape: it views a block as [num_kv_heads, 2 * block_size, head_dim], K in
the first half of each KV head's rows and V in the second, and its C++ writer (cpu_attn_reshape_and_cache)
stores each half in the order its ISA's kernel reads. On the `vec` and `vec16` ISAs K is [head_dim, block_size]
(transposed) and V [block_size, head_dim]; on `amx` both are tiled. So the last axis of the allocation is not
"K then V of one token".

Rather than transcribe those orders, `native_layout` asks vLLM's writer where each element goes, once per
(ISA, dtype, block size, KV heads, head size): it writes one block of K and V whose values encode their
coordinates and reads where each landed. The result is the native position of every element of a page's K and
V, read by a gather (capture) and written by a scatter (restore), so the mapping is vLLM's own by construction.
It is refused unless the writer puts every element exactly once inside its own block and KV head region (a
quantizing or padded cache is not a permutation), and for another attention backend or a quantized KV cache.

The bytes move in libthaw (`thaw_format.mover.gather_pages` / `scatter_pages`): the positions become a row
description (a head_dim row per token and head, transposed for K on vec/vec16), and one multi-threaded C pass
per layer and role reads the blocks and writes token-major pages straight into their destination, with the
destination's chunk checksums computed in the same pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy
import torch
from thaw_format import mover

from . import _internals

# The integer type whose bit patterns a float dtype's values are built from and read back as.
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# Per-head K or V orders with a short name; other (tiled) orders are described by the writer that defines them.
_NAMED_ORDERS = ("[block_size, head_dim]", "[head_dim, block_size]")


@dataclass(frozen=True)
class NativeLayout:
    """One block's element order: where, in a block's flattened elements, each element of the flattened K page
    and V page ([block_size, num_kv_heads, head_dim] each) lives."""

    description: str  # engine.native_kv_layout of a snapshot
    block_shape: tuple[int, int, int]  # the allocation: (num_kv_heads, block_size, 2 * head_dim)
    page_shape: tuple[int, int, int]  # one role of a page: (block_size, num_kv_heads, head_dim)
    k_positions: torch.Tensor  # int64 [block_size * num_kv_heads * head_dim]
    v_positions: torch.Tensor
    pages: dict  # role ("k", "v") -> mover.PageLayout of the same positions, for libthaw

    @property
    def block_bytes(self) -> int:
        return 2 * self.pages["k"].page_bytes


def engine_layout(worker) -> tuple[list[torch.Tensor], NativeLayout]:
    """The worker's per-layer KV tensors and their block layout; NotImplementedError for any layout not mapped."""
    caches = _internals.kv_cache_tensors(worker)
    backends = set(_internals.attention_backends(worker))
    shapes = {(tuple(c.shape[1:]), c.dtype) for c in caches}
    if len(backends) != 1 or len(shapes) != 1:
        raise NotImplementedError(f"thaw_vllm maps one KV layout per engine; its layers have (backend, ISA, KV dtype) "
                                  f"{sorted(backends, key=str)} and (block shape, dtype) {sorted(shapes, key=str)}")
    ((backend, isa, kv_cache_dtype),) = backends
    if backend != "CPU_ATTN" or isa is None:
        raise NotImplementedError(f"thaw_vllm knows vLLM's CPU attention KV layout only; this engine uses {backend} "
                                  f"(ISA {isa})")
    if kv_cache_dtype != "auto":
        raise NotImplementedError(f"kv_cache_dtype={kv_cache_dtype!r}: thaw_vllm does not map quantized KV caches")
    if isa == "amx":
        _internals.allow_amx_tiles()
    ((heads, block_size, width), dtype) = shapes.pop()
    if block_size != worker.vllm_config.cache_config.block_size:
        raise NotImplementedError(f"the KV tensors hold blocks of {block_size} tokens, the scheduler's blocks are "
                                  f"{worker.vllm_config.cache_config.block_size}: thaw_vllm does not map split blocks")
    return caches, native_layout(isa, dtype, block_size, heads, width // 2)


@functools.lru_cache(maxsize=None)
def native_layout(isa: str, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int) -> NativeLayout:
    """Probe vLLM's writer for the block layout of one (ISA, dtype, shape)."""
    if dtype not in _BITS:
        raise NotImplementedError(f"KV dtype {dtype}: vLLM's CPU attention holds float32, bfloat16 or float16")
    bits = _BITS[dtype]
    one = int(torch.ones((), dtype=dtype).view(bits))
    # Codes are stored as the bit patterns one + code: positive normal numbers, which a copy keeps exactly.
    largest = int(torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(bits)) - one
    shape = (2, block_size, num_kv_heads, head_dim)
    if max(shape[0] * block_size, num_kv_heads, head_dim) > largest:
        raise NotImplementedError(f"KV block {shape} is too large to probe in {dtype}")
    tokens = torch.arange(block_size)
    role_token = _probe(isa, dtype, shape, torch.stack([tokens, tokens + block_size]).view(2, -1, 1, 1), one)
    head = _probe(isa, dtype, shape, torch.arange(num_kv_heads).view(1, 1, -1, 1), one)
    dim = _probe(isa, dtype, shape, torch.arange(head_dim).view(1, 1, 1, -1), one)
    src = (role_token * num_kv_heads + head) * head_dim + dim  # native element j holds pages[src[j]]

    region = block_size * head_dim
    expected_head = torch.arange(num_kv_heads).repeat_interleave(2 * region)
    expected_role = torch.arange(2).repeat_interleave(region).repeat(num_kv_heads)
    if not torch.equal(src.sort().values, torch.arange(src.numel())) or not (
        torch.equal(head, expected_head) and torch.equal(role_token // block_size, expected_role)
    ):
        raise NotImplementedError(f"vLLM's cpu_attn_reshape_and_cache (ISA {isa}, {dtype}, block {shape}) does not "
                                  "store one block as K then V of each KV head: thaw_vllm will not guess its layout")
    positions = src.argsort()  # the inverse permutation: pages element i lives at native position positions[i]
    half = src.numel() // 2
    itemsize = torch.empty((), dtype=dtype).element_size()
    return NativeLayout(
        description=_describe(isa, src, block_size, num_kv_heads, head_dim),
        block_shape=(num_kv_heads, block_size, 2 * head_dim),
        page_shape=(block_size, num_kv_heads, head_dim),
        k_positions=positions[:half],
        v_positions=positions[half:],
        pages={"k": mover.page_layout(positions[:half].numpy(), itemsize),
               "v": mover.page_layout(positions[half:].numpy(), itemsize)},
    )


def _probe(isa: str, dtype: torch.dtype, shape: tuple[int, ...], coordinate: torch.Tensor, one: int) -> torch.Tensor:
    """Write one block (the middle one of three) whose K and V elements hold `coordinate` (broadcast over
    [2, block_size, kv_heads, head_dim]) through vLLM's writer; the coordinate each native element received."""
    bits = _BITS[dtype]
    _, block_size, heads, head_dim = shape
    values = (coordinate.expand(shape) + one).to(bits).contiguous().view(dtype)
    cache = torch.full((3, heads, block_size, 2 * head_dim), -1, dtype=bits)  # -1: a NaN no code equals
    slots = torch.arange(block_size, 2 * block_size)
    _internals.cpu_attn_write(cache.view(dtype), values[0], values[1], slots, isa)
    if not (cache[0] == -1).all() or not (cache[2] == -1).all():
        raise NotImplementedError(f"vLLM's cpu_attn_reshape_and_cache (ISA {isa}) wrote outside the block it was given")
    codes = cache[1].flatten().long() - one
    if codes.min() < 0 or codes.max() > int(coordinate.max()):
        raise NotImplementedError(f"vLLM's cpu_attn_reshape_and_cache (ISA {isa}, {dtype}) does not copy K and V "
                                  "element for element: thaw_vllm will not guess its layout")
    return codes


def _describe(isa: str, src: torch.Tensor, block_size: int, heads: int, head_dim: int) -> str:
    """engine.native_kv_layout: the block structure the probe checked, and each role's order inside it."""
    ids = torch.arange(block_size * head_dim).view(block_size, head_dim)  # token * head_dim + dim
    per_head = src.view(heads, 2, block_size * head_dim)
    names = []
    for role, label in ((0, "K"), (1, "V")):
        name = f"{label} in the {isa} order of vLLM's cpu_attn_reshape_and_cache"
        for order_name, order in zip(_NAMED_ORDERS, (ids.flatten(), ids.T.flatten())):
            token, dim = order // head_dim, order % head_dim
            expected = ((role * block_size + token) * heads + torch.arange(heads)[:, None]) * head_dim + dim
            if torch.equal(per_head[:, role], expected):
                name = f"{label} as {order_name}"
        names.append(name)
    return (f"CPU_ATTN isa={isa}: [num_blocks, num_kv_heads, 2, block_size*head_dim], per block and KV head "
            f"{names[0]} then {names[1]} (allocated as [num_blocks, num_kv_heads, block_size, 2*head_dim])")


def _bytes(tensor: torch.Tensor) -> numpy.ndarray:
    """A tensor's bytes as a numpy view (no copy), for libthaw."""
    return tensor.view(torch.uint8).numpy()


def _offsets(block_ids, layout: NativeLayout) -> numpy.ndarray:
    return numpy.asarray(block_ids, dtype=numpy.int64) * layout.block_bytes


def gather_role(cache: torch.Tensor, block_ids, layout: NativeLayout, role: str, out, chunk_size: int = 0):
    """Write the given blocks' `role` ("k" or "v") into `out` as token-major pages [n, block_size, heads, dim];
    with chunk_size > 0, return the CRC32C of each chunk_size chunk of `out`, computed in the same pass."""
    return mover.gather_pages(_bytes(cache), _offsets(block_ids, layout), layout.pages[role], out, chunk_size)


def scatter_pages(cache: torch.Tensor, block_ids, k, v, layout: NativeLayout) -> None:
    """Write token-major K and V pages (buffers of len(block_ids) pages each) into the given blocks."""
    offsets = _offsets(block_ids, layout)
    mover.scatter_pages(k, _bytes(cache), offsets, layout.pages["k"])
    mover.scatter_pages(v, _bytes(cache), offsets, layout.pages["v"])


def blocks_to_pages(cache: torch.Tensor, block_ids: list[int], layout: NativeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the given blocks as contiguous [num_pages, block_size, num_kv_heads, head_dim]."""
    k, v = (cache.new_empty(len(block_ids), *layout.page_shape) for _ in range(2))
    gather_role(cache, block_ids, layout, "k", _bytes(k))
    gather_role(cache, block_ids, layout, "v", _bytes(v))
    return k, v


def pages_to_blocks(k, v, layout: NativeLayout, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of blocks_to_pages for K and V page buffers: [num_pages, *layout.block_shape], ready to assign
    into the cache."""
    n = len(memoryview(k).cast("B")) // layout.pages["k"].page_bytes
    blocks = torch.zeros(n, *layout.block_shape, dtype=dtype)
    scatter_pages(blocks, range(n), k, v, layout)
    return blocks
