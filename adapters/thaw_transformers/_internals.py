"""Everything thaw_transformers relies on beyond transformers' documented API, in one place, pinned to the tested
version.

transformers documents `DynamicCache(config=...)`, `Cache.update` and the model forward; what a cache layer
holds (`keys`/`values` of [batch, kv_heads, tokens, head_dim]), that `update` copies what it is given, which
layers slide (`is_sliding`, `sliding_window`), how a sliding layer is kept from dropping tokens
(`activate_past_recording`) and the forward's cache argument name (`cache`, `past_key_values` before 5.x) are
internals. A newer transformers must be tested and added here before thaw_transformers accepts it. 5.24.x runs
in CI (the [transformers] extra pins 5.24.0); 5.25.0 (which mlx-lm pulls in by default, with its new `kernels`
dependency) passed tests/transformers and tests/langgraph --engine transformers on CPU.
"""

from __future__ import annotations

import torch
import transformers
from transformers.cache_utils import DynamicCache

from thaw_format.sdk.pins import require_tested

TESTED_TRANSFORMERS = ("5.24.", "5.25.")
require_tested("thaw_transformers", "transformers", transformers.__version__, TESTED_TRANSFORMERS)

TRANSFORMERS_VERSION = transformers.__version__


def new_cache(config) -> DynamicCache:
    """An empty cache laid out for the model (sliding layers where it slides) that keeps every token's KV.

    A sliding layer normally drops tokens that left its window; recording its past keeps them (what the model
    attends to is unchanged: the layer still hands attention only the window), so every token's KV can be paged
    into the prefix cache.
    """
    cache = DynamicCache(config=config)
    for layer in cache.layers:
        if layer.is_sliding:
            layer.activate_past_recording()
    return cache


def fill(cache: DynamicCache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give an empty cache layer the KV of its first tokens, [1, kv_heads, tokens, head_dim] each. The layer
    concatenates them onto tensors of its own (every layer kind, sliding or not, and every later token too), so
    it holds a copy and never writes the tensors handed to it: those may be views of the prefix cache's pages."""
    cache.update(keys, values, layer)


def layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer: [1, kv_heads, tokens, head_dim] each."""
    return cache.layers[layer].keys, cache.layers[layer].values


def sliding_window(cache: DynamicCache, layer: int):
    """The layer's attention window in tokens, or None for full attention."""
    entry = cache.layers[layer]
    return entry.sliding_window if entry.is_sliding else None


def forward(model, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run the model over input_ids [1, n] after the cache's tokens; the logits of the last position, [vocab]."""
    return model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
