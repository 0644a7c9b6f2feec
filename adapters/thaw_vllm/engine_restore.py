"""Restore, inside the engine-core process: rebuild the prefix-cache table from token ids with the engine's
own hash function and seed, write the KV into freshly allocated blocks, and stage what resumed requests need.
Everything that can be refused is checked before the first change to the engine."""

from __future__ import annotations

import thaw_format
import torch
from thaw_format.torch import to_torch

from . import _internals
from ._registry import EngineState, Tail
from .layout import pages_to_blocks


def _page_hashes(snapshot: thaw_format.Snapshot, full: list[int], hash_fn) -> dict[int, bytes]:
    tree, hashes = snapshot.prefix, {}

    def hash_of(page: int) -> bytes:
        if page not in hashes:
            parent = tree.parents[page]
            parent_hash = None if parent == -1 else hash_of(parent)
            hashes[page] = _internals.chain_hashes(hash_fn, [tree.tokens[page]], parent_hash)[0]
        return hashes[page]

    for page in full:
        hash_of(page)
    return hashes


def _check_native_hashes(snapshot, hashes: dict[int, bytes], algorithm: str, bs: int) -> None:
    """Where the snapshot's engine hashed exactly as this one does, the rebuilt table must match it."""
    native = snapshot.prefix.hash
    if native is None or (native.algorithm, native.tokens_per_hash, native.seed) != (algorithm, bs, _internals.hash_seed()):
        return
    for page, block_hash in hashes.items():
        if native.hashes[page] is not None and native.hashes[page] != block_hash.hex():
            raise thaw_format.CorruptSnapshotError(
                f"prefix page {page}: its token ids hash to {block_hash.hex()[:16]}..., the snapshot records "
                f"{native.hashes[page][:16]}... under the same algorithm and seed"
            )


def restore_state(worker, state: EngineState, snapshot: thaw_format.Snapshot) -> dict:
    kcm, bs = state.kv_cache_manager, state.block_size
    if state.live:
        raise RuntimeError(f"the engine has {len(state.live)} requests in flight; restore needs an idle engine")
    tree, kv = snapshot.prefix, snapshot.kv
    if tree is None or kv is None:
        return {"restored_pages": 0}
    algorithm, hash_fn = _internals.hash_function(worker.vllm_config)
    full = [p for p in range(tree.num_pages) if len(tree.tokens[p]) == bs]
    hashes = _page_hashes(snapshot, full, hash_fn)
    _check_native_hashes(snapshot, hashes, algorithm, bs)
    if len(full) > _internals.num_free_blocks(kcm):
        raise RuntimeError(f"the snapshot has {len(full)} full pages, the engine has {_internals.num_free_blocks(kcm)} free blocks")
    caches = _internals.kv_cache_tensors(worker)
    layers = [(to_torch(layer.tensors["k"]), to_torch(layer.tensors["v"])) for layer in kv.layers]

    if not _internals.reset_prefix_cache(kcm):
        raise RuntimeError("vLLM refused to reset its prefix cache (blocks still held)")
    state.ledger.clear()
    blocks = _internals.take_blocks(kcm, len(full))
    index = torch.tensor(full, dtype=torch.long)
    block_ids = [b.block_id for b in blocks]
    for cache, (k, v) in zip(caches, layers):
        cache[block_ids] = pages_to_blocks(k[index], v[index]).to(cache.dtype)
    for page, block in zip(full, blocks):
        _internals.publish_block(kcm, block, hashes[page], 0, bs)
        parent = tree.parents[page]
        state.ledger[hashes[page]] = (None if parent == -1 else hashes[parent], tuple(tree.tokens[page]))
    depth = {p: len(tree.chain(p)) for p in full}
    _internals.release_blocks(kcm, [b for _, b in sorted(zip(full, blocks), key=lambda pb: -depth[pb[0]])])

    for request in resumable(snapshot):
        last = request.pages[-1] if request.pages else None
        if last is not None and len(tree.tokens[last]) < bs:
            pages = [pages_to_blocks(k[last : last + 1], v[last : last + 1])[0].clone() for k, v in layers]
            state.pending_tails[request.id] = Tail(start=(len(request.pages) - 1) * bs,
                                                   num_tokens=len(tree.tokens[last]), pages=pages)
        if request.rng_state is not None:
            state.pending_rng[request.id] = to_torch(request.rng_state).clone()
    return {"restored_pages": len(full)}


def resumable(snapshot: thaw_format.Snapshot) -> list[thaw_format.Request]:
    """Requests a restore continues: every unfinished one."""
    if snapshot.scheduler is None:
        return []
    return [r for r in snapshot.scheduler.requests if r.status != "finished"]
