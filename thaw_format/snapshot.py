"""The snapshot model: engine-neutral sections, every one optional.

Designed against the real state of vLLM (paged blocks, hash-chained prefix table), SGLang (token slots, radix
tree) and MLX (per-sequence contiguous, rotating and quantized caches): KV is kept as token-major pages plus a
layout descriptor, and the prefix table as token ids, so that any engine can rebuild its own structures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .tensor import Tensor

# KV layer kinds whose tensors are indexed by prefix-tree page: [num_pages, page_size, ...].
PAGED_KINDS = ("attention", "sliding_window", "mla", "quantized")
# KV layer kinds whose tensors are indexed by sequence: [num_sequences, ...].
SEQUENCE_KINDS = ("ring", "recurrent")
REQUEST_STATUSES = ("waiting", "running", "preempted", "finished")


@dataclass
class ModelInfo:
    """What model the state belongs to; restoring into another model is refused using this."""

    architecture: str
    config_digest: str
    dtype: str
    weights_digest: Optional[str] = None
    config: Optional[dict] = None


@dataclass
class WeightsRef:
    """Weights held by another snapshot, named by the digest of its weights."""

    weights_digest: str
    snapshot_id: Optional[str] = None


@dataclass
class Weights:
    """Named tensors under engine-native names, with checkpoint names where known."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    checkpoint_names: dict[str, str] = field(default_factory=dict)
    ref: Optional[WeightsRef] = None


@dataclass
class KVLayer:
    """One layer's cache. `kind` says how to read `tensors` (roles such as "k", "v", "latent", "state.0").

    Paged kinds hold [num_pages, page_size, ...] token-major pages; sequence kinds hold [num_sequences, ...].
    """

    kind: str
    tensors: dict[str, Tensor]
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class KVCache:
    page_size: int
    dtype: str
    layers: list[KVLayer]

    @property
    def num_pages(self) -> int:
        for layer in self.layers:
            if layer.kind in PAGED_KINDS and layer.tensors:
                shape = next(iter(layer.tensors.values())).shape
                return shape[0] if shape else 0
        return 0


@dataclass
class NativeHash:
    """The engine's own prefix hashing, kept so a restore can check its rebuilt table against the original."""

    algorithm: str
    tokens_per_hash: int
    hashes: list[Optional[str]]
    seed: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrefixTree:
    """A forest of pages: page i holds tokens[i] and continues page parents[i] (-1: a root).

    Only a page that no other page continues may hold fewer than page_size tokens.
    """

    parents: list[int]
    tokens: list[list[int]]
    hash: Optional[NativeHash] = None

    @property
    def num_pages(self) -> int:
        return len(self.parents)

    def chain(self, page: int) -> list[int]:
        """The pages from a root down to `page`, in order."""
        pages = []
        seen = set()
        while page != -1:
            if page in seen:
                raise ValueError(f"prefix tree has a cycle through page {page}")
            seen.add(page)
            pages.append(page)
            page = self.parents[page]
        return pages[::-1]

    def chain_tokens(self, page: int) -> list[int]:
        """Every token id from a root down to the end of `page`."""
        return [t for p in self.chain(page) for t in self.tokens[p]]

    def leaves(self) -> list[int]:
        """Pages no other page continues, in page order."""
        continued = set(self.parents)
        return [p for p in range(self.num_pages) if p not in continued]


@dataclass
class SamplingParams:
    """A canonical set every engine maps onto; what does not fit goes in `extra`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Request:
    id: str
    status: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_computed_tokens: int = 0
    pages: list[int] = field(default_factory=list)
    rng_state: Optional[Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedulerState:
    requests: list[Request] = field(default_factory=list)


@dataclass
class EngineInfo:
    name: str
    version: str
    attention_backend: Optional[str] = None
    native_kv_layout: Optional[str] = None
    tp_rank: int = 0
    tp_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lineage:
    parent: Optional[str] = None
    label: Optional[str] = None
    created: Optional[str] = None


@dataclass
class Snapshot:
    model: Optional[ModelInfo] = None
    weights: Optional[Weights] = None
    kv: Optional[KVCache] = None
    prefix: Optional[PrefixTree] = None
    scheduler: Optional[SchedulerState] = None
    engine: Optional[EngineInfo] = None
    lineage: Optional[Lineage] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The content digest ("sha256:<hex>"), known once the snapshot has been written or read.
    id: Optional[str] = field(default=None, compare=False)
