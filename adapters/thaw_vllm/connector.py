"""ThawConnector: thaw's hook into vLLM through its official KV connector API.

Scheduler side (engine-core process), it keeps a ledger of the token ids of every block a finished request
left in the prefix cache (the block pool keeps only hashes). Blocks evicted since stay in it until a walk of the
prefix-cache table prunes it: at a capture of everything, and as blocks are recorded, once the ledger passes
twice the pool (`prune`: an engine that never captures keeps at most that many). The walk costs the table's size,
at most the pool's, and runs inside the scheduler step that finishes a request: one step's latency, once per at
least a pool's worth of new blocks. vLLM tells a connector of no eviction (its BlockRemoved events go to its
KV-event publisher, only where one is configured). One gap, harmless: a block evicted and pruned, then computed
again only by a request preempted before a capture (never finished, so never recorded), is missed by a capture of
everything; a restored engine computes it again, as any page not captured. For a resumed request, it offers the
tokens of its last partly filled page as external KV, so a restored request recomputes nothing the original had
already computed. Worker side (worker process), it
writes those tail pages into the blocks vLLM allocated, and gives a resumed seeded request its sampling
generator's exact state, before the step's forward pass.
Metadata between the sides is plain data (block ids, request ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata

from . import _internals


@dataclass
class ThawMetadata(KVConnectorMetadata):
    loads: list[tuple[int, str]] = field(default_factory=list)  # (block id, resume key) to write this step
    rng: dict[str, str] = field(default_factory=dict)  # vLLM request id -> resume key, until applied


class ThawConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        # hash -> (parent, tokens) of blocks cached when learnt, evicted ones too until `prune` forgets them
        self.ledger: dict[bytes, tuple[Optional[bytes], tuple[int, ...]]] = {}
        self.ledger_bound: Optional[int] = None  # twice the pool, once vLLM binds its cache manager
        self.tails: dict[str, tuple[int, int]] = {}  # resume key -> (first position, token count)
        self.rng_keys: set[str] = set()  # resume keys whose generator state the worker holds
        self._rng_due: dict[str, str] = {}
        self._loads: list[tuple[int, str]] = []
        # worker side, filled by the worker extension: resume key -> (KV tensors, per-layer block pages)
        self.staged_tails: dict[str, tuple[list, list]] = {}
        self.staged_rng: dict[str, tuple[object, object]] = {}  # resume key -> (worker, generator state)

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        """vLLM's scheduler hands its cache manager over once built (scheduler side only): the ledger's bound is
        twice its pool, and `prune` walks its prefix-cache table (the base class keeps it as `_kv_cache_manager`)."""
        super().bind_kv_cache_manager(kv_cache_manager)
        self.ledger_bound = 2 * _internals.num_blocks(kv_cache_manager)

    def learn(self, block_hashes, token_ids, num_blocks: int) -> None:
        """Record the token ids of a request's first `num_blocks` full blocks (cached: vLLM caches a block once
        its tokens are scheduled, so a prune as they are recorded keeps them). Before vLLM binds its cache manager
        there is no table to walk, and nothing is pruned (this runs inside vLLM's request_finished: it must not
        raise)."""
        parent, bs = None, self.block_size
        for i, block_hash in enumerate(block_hashes[:num_blocks]):
            block_hash = bytes(block_hash)
            if block_hash not in self.ledger:
                self.ledger[block_hash] = (parent, tuple(token_ids[i * bs : (i + 1) * bs]))
                if self.ledger_bound is not None and len(self.ledger) > self.ledger_bound:
                    self.prune()
            parent = block_hash

    def prune(self) -> dict:
        """Walk the whole prefix-cache table (KV-cache group 0), forget the ledger's blocks evicted since, and
        return the table's blocks by hash."""
        cached = {}
        for block_hash, group, block in _internals.cached_blocks(self._kv_cache_manager):
            if group == 0:
                cached.setdefault(block_hash, block)
        self.ledger = {h: e for h, e in self.ledger.items() if h in cached}
        return cached

    # --- scheduler side ---

    def on_new_request(self, request) -> None:
        key = _internals.external_request_id(request.request_id)
        if key in self.rng_keys:
            self.rng_keys.discard(key)
            self._rng_due[request.request_id] = key

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        tail = self.tails.get(_internals.external_request_id(request.request_id))
        if tail is None or num_computed_tokens != tail[0]:
            return 0, False
        return tail[1], False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        key = _internals.external_request_id(request.request_id)
        start, _ = self.tails.pop(key)
        self._loads.append((blocks.get_block_ids()[0][start // self.block_size], key))

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = ThawMetadata(loads=self._loads, rng=dict(self._rng_due))
        self._loads = []
        return meta

    def request_finished(self, request, block_ids):
        self.learn(request.block_hashes, request.all_token_ids, request.num_computed_tokens // self.block_size)
        self._rng_due.pop(request.request_id, None)
        return False, None

    # --- worker side ---

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        for block_id, key in meta.loads:
            caches, pages = self.staged_tails.pop(key)
            for cache, page in zip(caches, pages):
                cache[block_id].copy_(page)
        for request_id, key in meta.rng.items():
            staged = self.staged_rng.get(key)
            generator = None if staged is None else _internals.sampling_generator(staged[0], request_id)
            if generator is not None:
                generator.set_state(staged[1])
                del self.staged_rng[key]

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return
