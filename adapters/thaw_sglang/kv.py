"""KV bytes between SGLang's per-layer slot buffers and the spec's token-major pages.

A slot holds one token's [kv_heads, head_dim], so a page is page_size slots gathered in order: on CPU each
layer's K and V move in one libthaw pass (thaw_format.mover.gather_pages with one row per token), with no
intermediate torch index, and a capture into shared memory gathers straight into it with the checksums
(`deferred_pages`); buffers on another device go through torch's own indexing.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from thaw_format import KVCache, KVLayer, Tensor, mover
from thaw_format.sdk import remote
from thaw_format.sdk.head_share import HeadShare, put_share, take_share
from thaw_format.writer import deferred_tensor
from thaw_format.torch import from_torch, to_torch

from .pages import PADDING


def _token_layout(buffer: torch.Tensor) -> mover.PageLayout:
    """One token's slot as a page of one row (buffer is [slots, kv_heads, head_dim])."""
    return mover.PageLayout(buffer.element_size(), np.zeros(1, np.int64), buffer[0].numel(), 1)


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.uint8).numpy()


def _gather(buffer: torch.Tensor, index: torch.Tensor, padding: np.ndarray, out, chunk_size: int = 0):
    """The slots `index` of `buffer` into `out`, one token row each in order, rows `padding` zero; with
    chunk_size > 0, the CRC32C of each chunk of `out`: from the gather's own pass, but for the chunks holding
    padding rows, summed again."""
    offsets = index.numpy().astype(np.int64) * (buffer[0].numel() * buffer.element_size())
    crcs = mover.gather_pages(_bytes(buffer), offsets, _token_layout(buffer), out, chunk_size)
    if not padding.size:
        return crcs
    data = np.frombuffer(out, np.uint8)
    row = data.size // len(index)
    data.reshape(len(index), row)[padding] = 0
    if chunk_size:
        # The gather summed slot 0's bytes where the padding rows are: the chunks holding them are summed again
        # (at most one per short page, read again from memory where the gather streamed them into `out`).
        first, last = padding * row // chunk_size, ((padding + 1) * row - 1) // chunk_size
        for chunk in {c for a, b in zip(first.tolist(), last.tolist()) for c in range(a, b + 1)}:
            crcs[chunk] = mover.crc32c(data[chunk * chunk_size : (chunk + 1) * chunk_size])
    return crcs


def _slots(slots: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    flat = slots.reshape(-1)
    return flat.clamp(min=0), np.flatnonzero((flat == PADDING).numpy())


def _dtype(k_buffers: list[torch.Tensor]) -> str:
    return str(k_buffers[0].dtype).removeprefix("torch.") if k_buffers else "float32"


def gather_pages(k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], slots: torch.Tensor) -> KVCache:
    """Each layer's K and V as [num_pages, page_size, kv_heads, head_dim], gathered by slot in one call each.

    Positions past the end of a short page are zero, so equal state always gives equal bytes.
    """
    num_pages, page_size = slots.shape
    index, padding = _slots(slots)
    layers = []
    for k_buffer, v_buffer in zip(k_buffers, v_buffers):
        _, heads, head_dim = k_buffer.shape
        tensors = {}
        for role, buffer in (("k", k_buffer), ("v", v_buffer)):
            if buffer.device.type == "cpu":
                pages = buffer.new_empty(len(index), heads, head_dim)
                _gather(buffer, index, padding, _bytes(pages))
            else:
                pages = buffer.index_select(0, index.to(buffer.device)).cpu()
                pages[torch.from_numpy(padding)] = 0
            tensors[role] = from_torch(pages.reshape(num_pages, page_size, heads, head_dim))
        layers.append(KVLayer(kind="attention", tensors=tensors, num_kv_heads=heads, head_dim=head_dim))
    return KVCache(page_size=page_size, dtype=_dtype(k_buffers), layers=layers)


def deferred_pages(k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], slots: torch.Tensor):
    """gather_pages's KVCache with its tensors deferred, and the `fill` functions (thaw_format.EncodedSnapshot.
    write_into) that gather each straight into the snapshot's buffer with its checksums: the KV leaves the
    engine in one pass. Buffers off the CPU are gathered at once (no fill)."""
    if any(buffer.device.type != "cpu" for buffer in k_buffers + v_buffers):
        return gather_pages(k_buffers, v_buffers, slots), {}
    num_pages, page_size = slots.shape
    index, padding = _slots(slots)
    dtype, layers, fill = _dtype(k_buffers), [], {}
    for i, (k_buffer, v_buffer) in enumerate(zip(k_buffers, v_buffers)):
        _, heads, head_dim = k_buffer.shape
        tensors = {role: deferred_tensor(dtype, (num_pages, page_size, heads, head_dim)) for role in ("k", "v")}
        layers.append(KVLayer(kind="attention", tensors=tensors, num_kv_heads=heads, head_dim=head_dim))
        for role, buffer in (("k", k_buffer), ("v", v_buffer)):
            fill[f"kv/{i}/{role}"] = functools.partial(_gather, buffer, index, padding)
    return KVCache(page_size=page_size, dtype=dtype, layers=layers), fill


def share_pages(k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], slots: torch.Tensor,
                share: HeadShare) -> tuple[KVCache, dict]:
    """A tensor-parallel rank's capture (tensor_parallel): the KVCache over all the model's heads, its tensors
    deferred, and for each tensor the `put` that writes this rank's heads of every page (zero past a short page's
    end, as gather_pages) into their slabs of the tensor's region, once the first rank has published it."""
    num_pages, page_size = slots.shape
    index, padding = _slots(slots)
    offsets = share.slab_offsets(num_pages, page_size)
    dtype, layers, puts = _dtype(k_buffers), [], {}
    for i, (k_buffer, v_buffer) in enumerate(zip(k_buffers, v_buffers)):
        shape = (num_pages, page_size, share.total_heads, share.head_dim)
        tensors = {role: deferred_tensor(dtype, shape) for role in ("k", "v")}
        layers.append(KVLayer(kind="attention", tensors=tensors, num_kv_heads=share.total_heads,
                              head_dim=share.head_dim))
        for role, buffer in (("k", k_buffer), ("v", v_buffer)):
            puts[f"kv/{i}/{role}"] = functools.partial(_put, buffer, index, padding, share, offsets)
    return KVCache(page_size=page_size, dtype=dtype, layers=layers), puts


def tensor_sizes(kv: KVCache) -> dict[str, int]:
    """The bytes of each KV tensor of `kv`, by its name in a snapshot (kv/{layer}/{role}): what a rank checks the
    regions the first rank published against (thaw_format.sdk.head_share.check_regions)."""
    return {f"kv/{i}/{role}": tensor.nbytes for i, layer in enumerate(kv.layers)
            for role, tensor in layer.tensors.items()}


def _put(buffer: torch.Tensor, index: torch.Tensor, padding: np.ndarray, share: HeadShare, offsets: np.ndarray,
         region) -> None:
    local = mover.recycled(len(index) * share.slab_bytes)
    _gather(buffer, index, padding, local)
    put_share(local, region, share, offsets)


def scatter_rows(
    kv: KVCache,
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    rows: torch.Tensor,
    slots: torch.Tensor,
    share: HeadShare | None = None,
) -> None:
    """Write flattened page rows `rows` of every layer into buffer slots `slots`: on CPU one libthaw scatter per
    run of consecutive rows (a page or more each). A tensor-parallel rank (`share`) writes its heads of each row."""
    runs = mover.consecutive_runs(rows.numpy())  # int64, as leaf_sequences makes them: no list round trip
    slot_numbers = slots.cpu().numpy().astype(np.int64)
    parallel = share is not None and not share.whole
    if parallel:
        # A rank's slabs in every row are the same in every layer and role, and so is the size of its heads of one
        # tensor: found once, into one buffer that each reuses (its scatters copy out of it).
        offsets = share.slab_offsets(kv.num_pages, kv.page_size)
        own = mover.recycled(len(offsets) * share.slab_bytes)
    for layer, k_buffer, v_buffer in zip(kv.layers, k_buffers, v_buffers):
        for role, buffer in (("k", k_buffer), ("v", v_buffer)):
            if buffer.device.type != "cpu":
                tensor = layer.tensors[role]  # a remote source's KV: read from the client into one writable copy
                pages = to_torch(Tensor(tensor.dtype, tensor.shape, mover.fetched(remote.scatter_view(tensor))))
                buffer[slots] = pages.reshape(-1, *pages.shape[2:]).index_select(0, rows).to(buffer.device)
                continue
            token_bytes = buffer[0].numel() * buffer.element_size()
            data, targets = remote.scatter_view(layer.tensors[role]), slot_numbers * token_bytes
            if parallel:  # this rank's heads of every row, one token's slot each
                data = take_share(data, share, offsets, own)
            for first, count, at in runs:
                mover.scatter_pages(data[first * token_bytes : (first + count) * token_bytes], _bytes(buffer),
                                    targets[at : at + count], _token_layout(buffer))
