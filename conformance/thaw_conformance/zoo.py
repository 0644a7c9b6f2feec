"""Tiny, seeded, random-weight Hugging Face checkpoints made locally, for engine tests and benchmarks.

No model can be downloaded here, so every test model is built from a config: ``make_model(arch, root)``
writes ``config.json`` + ``model.safetensors`` once into ``<root>/<arch>-<digest>`` and returns that
directory; the digest covers the config, dtype and seed, so a changed recipe never reuses a stale
directory. Needs numpy only (no torch, no transformers, never an engine), so every engine's environment,
an MLX-only Mac included, builds the same bytes: config.json is the full config as transformers 5 writes it
(less its version line), the weights come from `seeded_weights`, the tensor layout from `checkpoint_layout`.

Weights use ``initializer_range=0.1``: the default 0.02 makes tiny models repeat one token, which hides
a wrong KV cache from a continuation test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import safetensors_writer, seeded_weights
from .checkout import cache_dir
from .checkpoint_layout import layout

# Token ids every zoo model agrees on, so tests can pick prompts from [3, vocab_size).
_SPECIAL_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# 2 layers, hidden 128, 4 query heads of 32 over 2 KV heads: small enough for a 2-core CPU, and a head
# size vLLM's CPU attention supports.
_TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 16384,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    **_SPECIAL_TOKENS,
}

# transformers' defaults, written out so that config.json does not depend on the installed version.
_WRITTEN_DEFAULTS = {
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "use_cache": True,
}

# model_type -> the class transformers and the engines load it as, and the further defaults transformers 5
# writes into its config.json (tests/conformance/test_zoo.py checks them against transformers).
_NO_BIAS = {"attention_bias": False}
_DEFAULTS: dict[str, dict] = {
    "llama": {"architectures": ["LlamaForCausalLM"], **_NO_BIAS, "mlp_bias": False, "pretraining_tp": 1},
    "mistral": {"architectures": ["MistralForCausalLM"]},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "max_window_layers": 28, "sliding_window": None},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], **_NO_BIAS, "max_window_layers": 28, "sliding_window": None,
              "use_sliding_window": False},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], **_NO_BIAS, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "use_bidirectional_attention": None},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "embd_pdrop": 0.0, "resid_pdrop": 0.0,
             "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "sliding_window": None,
             "rope_parameters": {"partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "default"}},
    "granite": {"architectures": ["GraniteForCausalLM"], **_NO_BIAS, "attention_multiplier": 1.0,
                "embedding_multiplier": 1.0, "logits_scaling": 1.0, "mlp_bias": False, "residual_multiplier": 1.0},
    "olmo2": {"architectures": ["Olmo2ForCausalLM"], **_NO_BIAS, "rms_norm_eps": 1e-5},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], **_NO_BIAS, "mlp_only_layers": [],
                  "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
                  "sliding_window": None, "use_sliding_window": False},
    "deepseek_v2": {"architectures": ["DeepseekV2ForCausalLM"], **_NO_BIAS, "mlp_bias": False, "n_group": None,
                    "norm_topk_prob": False, "output_router_logits": False, "pretraining_tp": 1,
                    "routed_scaling_factor": 1.0, "topk_group": None},
}

# model_type -> overrides of _TINY. Architectures without a head_dim field derive it from
# hidden_size / num_attention_heads (= 32 here).
_RECIPES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {"use_sliding_window": False}),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 32, "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh",
               "hidden_act": "gelu_pytorch_tanh"}),  # SGLang reads both (and requires them equal)
    "phi3": ("phi3", {"head_dim": None}),
    "granite": ("granite", {}),
    "olmo2": ("olmo2", {"head_dim": None}),
    "qwen3_moe": (
        "qwen3_moe",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "decoder_sparse_step": 1},
    ),
    # Multi-head latent attention (MLA): a compressed KV latent of 32 + a shared 16-wide RoPE key per token;
    # layer 0 dense, layer 1 a mixture of experts.
    "deepseek_v2": (
        "deepseek_v2",
        {"head_dim": None, "kv_lora_rank": 32, "q_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
         "v_head_dim": 32, "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
         "n_shared_experts": 1, "moe_intermediate_size": 64, "first_k_dense_replace": 1, "topk_method": "greedy",
         # YaRN at factor 1 (no scaling): the RoPE every engine's DeepSeek-V2 implements.
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                             "original_max_position_embeddings": 16384, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 1.0, "mscale_all_dim": 0.0}},
    ),
    # The Qwen2.5-0.5B shape (494M parameters) with random weights, for benchmarks of realistic size.
    "qwen2.5-0.5b": (
        "qwen2",
        {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "head_dim": None,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "initializer_range": 0.02,
        },
    ),
}

ARCHITECTURES: tuple[str, ...] = tuple(_RECIPES)

_ZOO_VERSION = 2  # bump when the recipe changes in a way the config digest cannot see


def default_root() -> Path:
    """``<checkout>/.cache/zoo`` (ignored by git, beside the other caches), or the user's cache when installed."""
    return cache_dir() / "zoo"


def model_config(arch: str, **overrides) -> tuple[str, dict]:
    """The (model_type, config fields) that ``make_model`` builds; ``head_dim=None`` drops the field."""
    if arch not in _RECIPES:
        raise ValueError(f"unknown zoo architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    model_type, recipe = _RECIPES[arch]
    fields = {**_TINY, **_WRITTEN_DEFAULTS, **_DEFAULTS[model_type], **recipe, **overrides, "model_type": model_type}
    layers = range(fields["num_hidden_layers"])
    if model_type in ("qwen2", "qwen3"):  # the zoo's Qwen models use no sliding window
        fields.setdefault("layer_types", ["full_attention" for _ in layers])
    if model_type == "gemma2":  # Gemma 2 alternates a sliding-window layer and a global one
        fields.setdefault("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention" for i in layers])
    if model_type == "deepseek_v2":  # MLA's head sizes as transformers records them
        fields.setdefault("qk_head_dim", fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"])
        fields["head_dim"] = fields.get("head_dim") or fields["qk_rope_head_dim"]
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    return model_type, fields


def make_model(arch: str, root: str | os.PathLike | None = None, *, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """Return a directory holding a seeded random-weight checkpoint of ``arch``, building it on first use.

    ``overrides`` replace config fields (for example ``num_hidden_layers=4``). The same arguments always
    give the same directory and the same bytes.
    """
    model_type, fields = model_config(arch, **overrides)
    recipe = {"zoo_version": _ZOO_VERSION, "model_type": model_type, "dtype": dtype, "seed": seed, "config": fields}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(root) if root is not None else default_root()
    target = root / f"{arch}-{digest}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=root))
    try:
        _build(model_type, fields, dtype, seed, staging)
        try:
            staging.rename(target)  # atomic: a concurrent builder either wins or finds the finished model
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(model_type: str, fields: dict, dtype: str, seed: int, out: Path) -> None:
    config = {**fields, "dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {}
    for spec in layout(model_type, fields):
        count = math.prod(spec.shape)
        if spec.init == "random":
            values = seeded_weights.uniform(spec.name, seed, count, fields["initializer_range"])
        else:
            values = np.full(count, 1.0 if spec.init == "ones" else 0.0, np.float32)
        tensors[spec.name] = (spec.shape, seeded_weights.cast(values, dtype))
    safetensors_writer.write(out / "model.safetensors", tensors, dtype)
