"""Tiny, seeded, random-weight Hugging Face checkpoints made locally, for engine tests and benchmarks.

No model can be downloaded here, so every test model is built from a config: ``make_model(arch, root)``
writes ``config.json`` + ``model.safetensors`` once into ``<root>/<arch>-<digest>`` and returns that
directory; the digest covers the config, dtype and seed, so a changed recipe never reuses a stale
directory. Imports only torch and transformers (never an engine), so every engine's tests can share it.

Weights use ``initializer_range=0.1``: the default 0.02 makes tiny models repeat one token, which hides
a wrong KV cache from a continuation test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

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
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "decoder_sparse_step": 1},
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
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "initializer_range": 0.02,
        },
    ),
}

ARCHITECTURES: tuple[str, ...] = tuple(_RECIPES)

_ZOO_VERSION = 1  # bump when the recipe changes in a way the config digest cannot see


def default_root() -> Path:
    """``<checkout>/.cache/zoo``: ignored by git, beside the other caches."""
    return Path(__file__).resolve().parents[2] / ".cache" / "zoo"


def model_config(arch: str, **overrides) -> tuple[str, dict]:
    """The (model_type, config fields) that ``make_model`` builds; ``head_dim=None`` drops the field."""
    if arch not in _RECIPES:
        raise ValueError(f"unknown zoo architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    model_type, recipe = _RECIPES[arch]
    fields = {**_TINY, **recipe, **overrides}
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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(getattr(torch, dtype))
    model.config.torch_dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
