"""Tiny random-weight mlx-lm models, the same in every process: seeded, then scaled so that outputs vary.

MLX's default initialisation makes a tiny model repeat one token, which would hide a wrong cache; scaling the
weights up (the embedding down for gemma2, whose tied embedding also scales the logits) gives varied tokens.
"""

from __future__ import annotations

import importlib

import mlx.core as mx
from mlx.utils import tree_map_with_path

_COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256)
CONFIGS = {
    "llama": dict(_COMMON, model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(_COMMON, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(_COMMON, model_type="qwen3", head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096,
                  rope_theta=10000.0),
    "gemma2": dict(_COMMON, model_type="gemma2", head_dim=16, query_pre_attn_scalar=16.0),
    # a hybrid: short convolutions (recurrent state) around one attention layer
    "lfm2": dict(_COMMON, model_type="lfm2", num_hidden_layers=3, max_position_embeddings=4096, norm_eps=1e-5,
                 conv_bias=False, conv_L_cache=3, block_dim=64, block_multiple_of=32, block_ffn_dim_multiplier=1.0,
                 block_auto_adjust_ff_dim=False, layer_types=["conv", "full_attention", "conv"]),
    # MLA run as plain attention: K heads of 16 + 8 (RoPE) wide, V heads 16 wide (format 1.1, v_head_dim)
    "deepseek_v2": dict(_COMMON, model_type="deepseek_v2", kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4, n_routed_experts=None,
                        max_position_embeddings=4096, rope_theta=10000.0,
                        rope_scaling={"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096}),
}
# (scale of non-norm weights, scale of the embedding)
_SCALES = {"llama": (4.0, 4.0), "qwen2": (4.0, 4.0), "qwen3": (4.0, 4.0), "gemma2": (4.0, 0.25), "lfm2": (2.0, 2.0),
           "deepseek_v2": (4.0, 4.0)}
PROMPT = [5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 47, 50, 53, 56, 59, 62, 65, 68, 71, 74, 77, 80,
          83, 86, 89, 92, 95, 98, 101, 104, 107, 110, 113]  # 37 tokens: one full page of 32 and a partial one


def make_model(arch: str, dtype=mx.float32, **overrides):
    config = dict(CONFIGS[arch], **overrides)
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    weight_scale, embed_scale = _SCALES[arch]

    def scale(path, x):
        if "norm" in path:
            return x.astype(dtype)
        return (x * (embed_scale if "embed" in path else weight_scale)).astype(dtype)

    model.update(tree_map_with_path(scale, model.parameters()))
    mx.eval(model.parameters())
    return model
