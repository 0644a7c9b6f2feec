"""Everything thaw_mlx knows about mlx-lm beyond its documented API, in one place, pinned to the tested version.

mlx-lm documents its caches only through `save_prompt_cache` / `load_prompt_cache`; what they hold (the order of
each cache class's `state` tuple, the ring buffer's write index, the growth step) and how a model class is found
from a config are internals. A newer mlx-lm must be tested and added here before thaw_mlx accepts it.
"""

from __future__ import annotations

from typing import Optional

import mlx_lm
from thaw_format.sdk.pins import require_tested
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache
from mlx_lm.utils import _get_classes

TESTED_MLX_LM = ("0.32.",)
require_tested("thaw_mlx", "mlx-lm", mlx_lm.__version__, TESTED_MLX_LM)

MLX_LM_VERSION = mlx_lm.__version__
# KVCache and QuantizedKVCache allocate their buffers in steps of this many tokens.
CACHE_STEP = KVCache.step


def kv_state(cache: KVCache):
    """(keys, values, offset): keys and values are [batch, kv_heads, capacity, head_dim], valid up to offset."""
    keys, values, offset = cache.state
    return keys, values, offset


def make_kv(keys, values, offset: int) -> KVCache:
    return KVCache.from_state((keys, values, offset))


def paged_buffers(cache) -> list:
    """The arrays a KVCache or QuantizedKVCache keeps its tokens in, whole (capacity included; `state` slices
    them to the offset); none for other caches and for an empty one."""
    if type(cache) is KVCache and cache.keys is not None:
        return [cache.keys, cache.values]
    if type(cache) is QuantizedKVCache and cache.keys is not None:
        return [*cache.keys, *cache.values]
    return []


def quantized_state(cache: QuantizedKVCache):
    """(keys, values, offset, group_size, bits): keys and values are (packed uint32, scales, biases) triples."""
    keys, values, offset, group_size, bits = cache.state
    return keys, values, offset, group_size, bits


def make_quantized(keys, values, offset: int, group_size: int, bits: int) -> QuantizedKVCache:
    return QuantizedKVCache.from_state((tuple(keys), tuple(values), offset, group_size, bits))


def ring_state(cache: RotatingKVCache):
    """(keys, values, offset, keep, max_size, write_index) with keys and values in physical (ring) order."""
    keys, values, offset, keep, max_size, write_index = cache.state
    return keys, values, offset, keep, max_size, write_index


def make_ring(keys, values, offset: int, keep: int, max_size: int, write_index: int) -> RotatingKVCache:
    return RotatingKVCache.from_state((keys, values, offset, keep, max_size, write_index))


def arrays_state(cache: ArraysCache):
    """(states, left_padding, lengths): a recurrent layer's state arrays, [batch, ...] each; padding and lengths
    are set only while mlx-lm batches sequences of different lengths."""
    states, left_padding, lengths = cache.state
    return states, left_padding, lengths


def make_arrays(states: list) -> ArraysCache:
    return ArraysCache.from_state((list(states), None, None))


def vocab_size(model) -> Optional[int]:
    """How many token ids the model embeds, as its arguments say; None where they name no vocabulary.

    The arguments are `model.args`, or `model.config` (plamo2, plamo3, youtu_llm); the bound is the largest of
    `vocab_size`, `embedding_size` (olmo: its table, 50304 rows past a vocab_size of 50280, and its output layer,
    emit ids up to it), `num_vocab` (phixtral) and a multimodal wrapper's `text_config["vocab_size"]`. Not read
    from the embedding table itself: its attribute differs across mlx-lm's models (embed_tokens, wte,
    tok_embeddings, ...) and models hold other tables beside it (gpt2's positions, gemma3n's per-layer ones),
    so finding "the" table would be a guess per model; the arguments are what mlx-lm sizes it from.
    """
    args = getattr(model, "args", None) or getattr(model, "config", None)
    text = getattr(args, "text_config", None)
    sizes = [getattr(args, name, None) for name in ("vocab_size", "embedding_size", "num_vocab")]
    sizes.append(text.get("vocab_size") if isinstance(text, dict) else None)
    sizes = [size for size in sizes if isinstance(size, int)]
    return max(sizes) if sizes else None


def model_classes(config: dict):
    """(Model, ModelArgs) for an mlx-lm config dict, as mlx-lm's own loader finds them."""
    return _get_classes(config)
