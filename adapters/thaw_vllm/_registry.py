"""Per-engine state shared, inside the engine-core process, by the KV connector and the worker extension.

vLLM builds the scheduler-side connector (which sees the block pool and every request) and the worker
(which holds the KV tensors) in the same process for a single-rank engine; they find each other here under
the engine's KV-transfer engine id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Tail:
    """KV of a request's last, partly filled page, written into its block when the resumed request is scheduled."""

    start: int  # first token position of the page
    num_tokens: int
    pages: list[torch.Tensor]  # per layer, native block layout [kv_heads, block_size, 2*head_dim]


@dataclass
class EngineState:
    kv_cache_manager: Any = None
    worker: Any = None
    block_size: int = 0
    live: dict[str, Any] = field(default_factory=dict)  # request id -> vllm Request, while unfinished
    # block hash -> (parent hash or None, token ids): what each cached block holds, learnt from requests
    ledger: dict[bytes, tuple[Optional[bytes], tuple[int, ...]]] = field(default_factory=dict)
    pending_tails: dict[str, Tail] = field(default_factory=dict)  # by external request id
    pending_rng: dict[str, torch.Tensor] = field(default_factory=dict)  # by external request id
    rng_due: dict[str, torch.Tensor] = field(default_factory=dict)  # by vLLM request id, set on first step

    def learn(self, block_hashes, token_ids, num_blocks: int) -> None:
        """Record the tokens of a request's first `num_blocks` full blocks."""
        parent = None
        for i, block_hash in enumerate(block_hashes[:num_blocks]):
            block_hash = bytes(block_hash)
            if block_hash not in self.ledger:
                self.ledger[block_hash] = (parent, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size]))
            parent = block_hash


_ENGINES: dict[str, EngineState] = {}


def engine_state(vllm_config) -> EngineState:
    transfer = vllm_config.kv_transfer_config
    if transfer is None or transfer.kv_connector != "ThawConnector":
        raise RuntimeError(
            "this engine was started without thaw's KV connector; start it with thaw_vllm.LLM or pass "
            "**thaw_vllm.engine_args() to vllm.LLM"
        )
    state = _ENGINES.setdefault(transfer.engine_id, EngineState())
    state.block_size = vllm_config.cache_config.block_size
    return state
