"""Test sessions: a tiny model, a cache of one kind, and the tokens it has seen; shared by tests and the worker."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache, make_prompt_cache

import thaw_mlx
from thaw_format.mlx import from_mlx
from zoo import PROMPT, make_model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
WINDOW = 16  # shorter than PROMPT, so a rotating cache runs past its window
FIRST_TOKENS = 8  # generated before the capture


def make_cache(model, kind: str) -> list:
    if kind == "kv":  # whatever the model makes itself: KVCache, or KVCache + RotatingKVCache for sliding layers
        return make_prompt_cache(model)
    if kind == "rotating":  # (make_prompt_cache's max_kv_size is ignored by models with their own make_cache)
        return [RotatingKVCache(max_size=WINDOW, keep=4) for _ in model.layers]
    if kind.startswith("quantized"):  # "quantized" (8 bits) or "quantized-4"
        bits = int(kind.partition("-")[2] or 8)
        return [QuantizedKVCache(group_size=32, bits=bits) for _ in model.layers]
    raise ValueError(kind)


@dataclass(frozen=True)
class Case:
    arch: str
    cache: str
    dtype: str = "float32"
    overrides: dict = field(default_factory=dict)
    kinds: tuple = ()  # the snapshot's KV layer kinds, when not all those of `cache`
    prompt: tuple = tuple(PROMPT)
    weight_bits: int = 0  # quantize the model's weights (4 or 8 bits, groups of 32)

    def model(self):
        model = make_model(self.arch, DTYPES[self.dtype], **self.overrides)
        if self.weight_bits:
            nn.quantize(model, group_size=32, bits=self.weight_bits)
            mx.eval(model.parameters())
        return model


HEAD_DIM_32 = {"num_attention_heads": 2, "num_key_value_heads": 1}  # quantization groups are 32 wide
CASES = {
    "llama-kv": Case("llama", "kv"),
    "qwen2-kv": Case("qwen2", "kv"),
    "qwen3-kv": Case("qwen3", "kv"),
    "gemma2-kv": Case("gemma2", "kv"),
    "llama-kv-fp16": Case("llama", "kv", "float16"),
    "llama-kv-bf16": Case("llama", "kv", "bfloat16"),
    "llama-rotating": Case("llama", "rotating"),
    "qwen3-rotating-bf16": Case("qwen3", "rotating", "bfloat16"),
    "llama-sliding-mixed": Case("llama", "kv", overrides={"layer_types": ["sliding_attention", "full_attention"],
                                                        "sliding_window": WINDOW}, kinds=("ring", "attention")),
    "llama-quantized": Case("llama", "quantized", overrides=HEAD_DIM_32),
    "qwen2-quantized-fp16": Case("qwen2", "quantized", "float16", overrides=HEAD_DIM_32),
    "qwen3-quantized-4bit": Case("qwen3", "quantized-4", overrides={"head_dim": 32}),
    # longer than mlx-lm's 256-token allocation step: the restored buffers span two steps
    "lfm2-hybrid": Case("lfm2", "kv", kinds=("recurrent", "attention", "recurrent")),
    "deepseek_v2-mla-kv": Case("deepseek_v2", "kv"),
    "qwen2-4bit-weights": Case("qwen2", "kv", weight_bits=4),
    "llama-kv-long": Case("llama", "kv", prompt=tuple((7 * i) % 251 for i in range(300))),
    # rows of 128 bytes (head_dim 32, float32): thaw_mlx.load moves and checks each chunk in one read (libthaw)
    "llama-kv-hd32": Case("llama", "kv", overrides={"head_dim": 32}),
}


LAYER_KINDS = {"kv": "attention", "rotating": "ring", "quantized": "quantized", "quantized-4": "quantized"}


def start(case: Case, model=None):
    """(model, cache, tokens): the prompt prefilled and FIRST_TOKENS generated with thaw_mlx.generate."""
    model = model or case.model()
    cache = make_cache(model, case.cache)
    tokens = list(case.prompt)
    tokens += thaw_mlx.generate(model, cache, tokens, FIRST_TOKENS)
    return model, cache, tokens


def kv_digest(model, cache, tokens) -> str:
    """SHA-256 over the bytes of the session's KV as the format stores it (pages, ring buffers)."""
    h = hashlib.sha256()
    for layer in thaw_mlx.capture(model, cache, tokens, include_weights=False).kv.layers:
        for role in sorted(layer.tensors):
            h.update(layer.tensors[role].data)
    return h.hexdigest()


def full_state(cache) -> list:
    """Every layer's class, offset, meta state and state: arrays whole (capacity included) with dtype and shape."""
    return [(type(c).__name__, getattr(c, "offset", None), getattr(c, "meta_state", None),
             [(k, (v.dtype, v.shape, from_mlx(v).tobytes()) if isinstance(v, mx.array) else v)
              for k, v in tree_flatten(c.state)])
            for c in cache]
