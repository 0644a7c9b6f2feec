"""ThawConnector: thaw's hook into vLLM through its official KV connector API.

Scheduler side, it is how thaw sees the engine's block pool and requests: vLLM binds the KV cache manager to
it, announces every new request and every finished one (whose full blocks' token ids go into a ledger, the
only place a cached block's tokens can be learnt from). On resume it also supplies, as external KV, the
tokens of a request's last partly filled page, so a restored request recomputes nothing the original had
already computed. Worker side, it writes those tail pages into the blocks vLLM allocated, and gives a resumed
seeded request its sampling generator's exact state, both before the step's forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import _internals
from ._registry import Tail, engine_state


@dataclass
class ThawMetadata(KVConnectorMetadata):
    loads: list[tuple[int, Tail]] = field(default_factory=list)  # (block id, tail page) to write this step


class ThawConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._state = engine_state(vllm_config)
        self._loads: list[tuple[int, Tail]] = []

    # --- scheduler side ---

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._state.kv_cache_manager = kv_cache_manager

    def on_new_request(self, request) -> None:
        self._state.live[request.request_id] = request
        rng = self._state.pending_rng.pop(_internals.external_request_id(request.request_id), None)
        if rng is not None:
            self._state.rng_due[request.request_id] = rng

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        tail = self._state.pending_tails.get(_internals.external_request_id(request.request_id))
        if tail is None or num_computed_tokens != tail.start:
            return 0, False
        return tail.num_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        tail = self._state.pending_tails.pop(_internals.external_request_id(request.request_id))
        block_ids = blocks.get_block_ids()[0]
        self._loads.append((block_ids[tail.start // self._state.block_size], tail))

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta, self._loads = ThawMetadata(loads=self._loads), []
        return meta

    def request_finished(self, request, block_ids):
        computed_blocks = request.num_computed_tokens // self._state.block_size
        self._state.learn(request.block_hashes, request.all_token_ids, computed_blocks)
        self._state.live.pop(request.request_id, None)
        self._state.rng_due.pop(request.request_id, None)
        return False, None

    # --- worker side ---

    def start_load_kv(self, forward_context, **kwargs) -> None:
        worker = self._state.worker
        if worker is None:
            return
        meta = self._get_connector_metadata()
        if meta.loads:
            caches = _internals.kv_cache_tensors(worker)
            for block_id, tail in meta.loads:
                for cache, page in zip(caches, tail.pages):
                    cache[block_id].copy_(page)
        for request_id in list(self._state.rng_due):
            generator = _internals.sampling_generator(worker, request_id)
            if generator is not None:
                generator.set_state(self._state.rng_due.pop(request_id))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return
