"""Capture, inside the engine-core process: prefix-cache pages, their token ids, live requests, identity."""

from __future__ import annotations

from typing import Optional, Sequence

import thaw_format
import vllm
from thaw_format.torch import from_torch

from . import _internals, identity, sampling
from ._registry import EngineState
from .layout import NATIVE_LAYOUT, blocks_to_pages


def _chain_pages(state: EngineState, cached: dict, chains: Optional[Sequence[Sequence[int]]], hash_fn) -> list[bytes]:
    """Cached block hashes to capture, parents before children: every page whose whole chain is cached,
    or only the pages of the named token chains."""
    if chains is None:
        wanted = set(cached) & set(state.ledger)
    else:
        bs = state.block_size
        wanted = set()
        for tokens in chains:
            full = [tokens[i : i + bs] for i in range(0, len(tokens) - len(tokens) % bs, bs)]
            for block_hash in _internals.chain_hashes(hash_fn, full):
                if block_hash not in cached or block_hash not in state.ledger:
                    break
                wanted.add(block_hash)
    depth: dict[bytes, int] = {}

    def depth_of(block_hash: bytes) -> int:  # -1: some ancestor is no longer cached
        if block_hash not in depth:
            parent = state.ledger[block_hash][0]
            up = 0 if parent is None else (depth_of(parent) + 1 if parent in wanted else -1)
            depth[block_hash] = up if up >= 0 else -1
        return depth[block_hash]

    return sorted((h for h in wanted if depth_of(h) >= 0), key=lambda h: (depth[h], h))


def capture_state(worker, state: EngineState, *, include_weights: bool, chains=None) -> thaw_format.Snapshot:
    kcm, bs, config = state.kv_cache_manager, state.block_size, worker.vllm_config
    algorithm, hash_fn = _internals.hash_function(config)
    live = [_internals.request_fields(r) for r in state.live.values()]
    for r in live:
        state.learn(r["block_hashes"], r["prompt_token_ids"] + r["output_token_ids"], r["num_computed_tokens"] // bs)
    cached = {}
    for block_hash, group, block in _internals.cached_blocks(kcm):
        if group == 0:
            cached.setdefault(block_hash, block)
    state.ledger = {h: entry for h, entry in state.ledger.items() if h in cached}  # forget evicted blocks

    hashes = _chain_pages(state, cached, chains, hash_fn)
    page_of = {h: i for i, h in enumerate(hashes)}
    parents = [page_of.get(state.ledger[h][0], -1) for h in hashes]
    tokens = [list(state.ledger[h][1]) for h in hashes]
    block_ids = [cached[h].block_id for h in hashes]
    native_hashes: list[Optional[str]] = [h.hex() for h in hashes]

    requests = []
    for r in live:
        full = r["num_computed_tokens"] // bs
        chain = [page_of[h] for h in r["block_hashes"][:full] if h in page_of]
        if len(chain) != full:
            continue  # the request's pages were not asked for
        all_tokens = r["prompt_token_ids"] + r["output_token_ids"]
        tail_len = r["num_computed_tokens"] - full * bs
        if tail_len:  # the partly filled last page: never in the prefix table, kept for an exact resume
            parents.append(chain[-1] if chain else -1)
            tokens.append(all_tokens[full * bs : r["num_computed_tokens"]])
            block_ids.append(_internals.request_block_ids(kcm, r["request_id"])[full])
            native_hashes.append(None)
            chain.append(len(parents) - 1)
        generator = _internals.sampling_generator(worker, r["request_id"])
        requests.append(thaw_format.Request(
            id=_internals.external_request_id(r["request_id"]),
            status=_internals.status_name(r["status"]),
            prompt_token_ids=r["prompt_token_ids"],
            output_token_ids=r["output_token_ids"],
            sampling=sampling.to_thaw(r["sampling_params"]),
            num_computed_tokens=r["num_computed_tokens"],
            pages=chain,
            rng_state=None if generator is None else from_torch(generator.get_state()),
        ))

    layers = []
    for cache in _internals.kv_cache_tensors(worker):
        k, v = blocks_to_pages(cache, block_ids)
        layers.append(thaw_format.KVLayer("attention", {"k": from_torch(k), "v": from_torch(v)},
                                          num_kv_heads=cache.shape[1], head_dim=cache.shape[-1] // 2))
    weights = None
    digest = None
    if include_weights:
        tensors = identity.checkpoint_weights(config)
        digest = thaw_format.weights_digest(tensors)
        weights = thaw_format.Weights(tensors=tensors, checkpoint_names={n: n for n in tensors})
    return thaw_format.Snapshot(
        model=identity.model_info(config, digest),
        weights=weights,
        kv=thaw_format.KVCache(page_size=bs, dtype=identity.kv_dtype(worker), layers=layers),
        prefix=thaw_format.PrefixTree(parents=parents, tokens=tokens, hash=thaw_format.NativeHash(
            algorithm=algorithm, tokens_per_hash=bs, hashes=native_hashes, seed=_internals.hash_seed())),
        scheduler=thaw_format.SchedulerState(requests=requests),
        engine=thaw_format.EngineInfo(name="vllm", version=vllm.__version__, attention_backend="CPU_ATTN",
                                      native_kv_layout=NATIVE_LAYOUT, extra={"block_size": bs}),
    )
