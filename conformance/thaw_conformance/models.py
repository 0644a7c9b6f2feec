"""The zoo checkpoints the suite runs: one per architecture family, the same files for every engine.

Every engine driver starts its engine from `checkpoint(arch)`, so that two engines serve identical weights and
the cross-engine checks can compare their KV byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from . import zoo

# arch -> zoo overrides. gemma2 ties its embeddings because MLX's gemma2 always does.
ARCHS: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma2": {"tie_word_embeddings": True}, "phi3": {},
    "granite": {}, "olmo2": {}, "qwen3_moe": {}, "deepseek_v2": {},
}


def checkpoint(arch: str, dtype: str = "float32") -> Path:
    return zoo.make_model(arch, dtype=dtype, **ARCHS[arch])


def uses_mla(arch: str) -> bool:
    """Whether the architecture's attention is DeepSeek's multi-head latent attention (a compressed KV latent)."""
    return "kv_lora_rank" in zoo.model_config(arch, **ARCHS[arch])[1]
