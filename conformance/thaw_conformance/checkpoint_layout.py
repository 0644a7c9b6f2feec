"""The tensors a Hugging Face checkpoint of each zoo architecture holds, worked out from its config alone.

The zoo writes its checkpoints without torch or transformers, so it names and shapes every tensor itself, as
transformers saves them (per-expert MoE weights, phi3's fused projections, no lm_head when embeddings are tied).
tests/conformance/test_zoo.py proves the layout against transformers for every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "random", "ones" or "zeros": what transformers' own initialisation puts there


def layout(model_type: str, config: dict) -> list[TensorSpec]:
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    # Gemma's norms scale by (1 + weight), so transformers starts them at zero.
    norm = "zeros" if model_type == "gemma2" else "ones"
    tensors = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), "random")]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors += _attention(model_type, config, prefix + "self_attn.")
        tensors += _mlp(model_type, config, i, prefix + "mlp.")
        tensors += [TensorSpec(prefix + n + ".weight", (hidden,), norm) for n in _LAYER_NORMS.get(model_type, _NORMS)]
    tensors.append(TensorSpec("model.norm.weight", (hidden,), norm))
    if not config["tie_word_embeddings"]:
        tensors.append(TensorSpec("lm_head.weight", (vocab, hidden), "random"))
    return tensors


_NORMS = ("input_layernorm", "post_attention_layernorm")
_LAYER_NORMS = {
    "gemma2": _NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


def _linear(name: str, out_features: int, in_features: int) -> TensorSpec:
    return TensorSpec(name + ".weight", (out_features, in_features), "random")


def _attention(model_type: str, c: dict, p: str) -> list[TensorSpec]:
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    if model_type == "deepseek_v2":  # multi-head latent attention: low-rank query, compressed KV latent + RoPE key
        qk_dim = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        q_rank, kv_rank = c["q_lora_rank"], c["kv_lora_rank"]
        query = ([_linear(p + "q_proj", heads * qk_dim, hidden)] if q_rank is None else
                 [_linear(p + "q_a_proj", q_rank, hidden), TensorSpec(p + "q_a_layernorm.weight", (q_rank,), "ones"),
                  _linear(p + "q_b_proj", heads * qk_dim, q_rank)])
        return query + [
            _linear(p + "kv_a_proj_with_mqa", kv_rank + c["qk_rope_head_dim"], hidden),
            TensorSpec(p + "kv_a_layernorm.weight", (kv_rank,), "ones"),
            _linear(p + "kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), kv_rank),
            _linear(p + "o_proj", hidden, heads * c["v_head_dim"]),
        ]
    head_dim = c.get("head_dim") or hidden // heads
    if model_type == "phi3":
        return [_linear(p + "qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden),
                _linear(p + "o_proj", hidden, heads * head_dim)]
    tensors = [_linear(p + "q_proj", heads * head_dim, hidden), _linear(p + "k_proj", kv_heads * head_dim, hidden),
               _linear(p + "v_proj", kv_heads * head_dim, hidden), _linear(p + "o_proj", hidden, heads * head_dim)]
    if model_type == "qwen2":  # Qwen2 always biases q, k and v
        tensors += [TensorSpec(p + f"{x}_proj.bias", (n * head_dim,), "zeros")
                    for x, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))]
    if model_type in ("qwen3", "qwen3_moe"):  # per-head RMSNorm of q and k
        tensors += [TensorSpec(p + "q_norm.weight", (head_dim,), "ones"),
                    TensorSpec(p + "k_norm.weight", (head_dim,), "ones")]
    if model_type == "olmo2":  # RMSNorm over all heads of q and of k
        tensors += [TensorSpec(p + "q_norm.weight", (heads * head_dim,), "ones"),
                    TensorSpec(p + "k_norm.weight", (kv_heads * head_dim,), "ones")]
    return tensors


def _gated(p: str, hidden: int, intermediate: int) -> list[TensorSpec]:
    return [_linear(p + "gate_proj", intermediate, hidden), _linear(p + "up_proj", intermediate, hidden),
            _linear(p + "down_proj", hidden, intermediate)]


def _mlp(model_type: str, c: dict, layer: int, p: str) -> list[TensorSpec]:
    hidden = c["hidden_size"]
    if model_type == "phi3":
        return [_linear(p + "gate_up_proj", 2 * c["intermediate_size"], hidden),
                _linear(p + "down_proj", hidden, c["intermediate_size"])]
    if model_type == "qwen3_moe" and layer not in c["mlp_only_layers"] and (layer + 1) % c["decoder_sparse_step"] == 0:
        return _experts(p, hidden, c["num_local_experts"], c["moe_intermediate_size"])
    if model_type == "deepseek_v2" and layer >= c["first_k_dense_replace"]:
        shared = c["n_shared_experts"] * c["moe_intermediate_size"]
        return (_experts(p, hidden, c["n_routed_experts"], c["moe_intermediate_size"])
                + _gated(p + "shared_experts.", hidden, shared))
    return _gated(p, hidden, c["intermediate_size"])


def _experts(p: str, hidden: int, experts: int, intermediate: int) -> list[TensorSpec]:
    tensors = [_linear(p + "gate", experts, hidden)]
    for e in range(experts):
        tensors += _gated(p + f"experts.{e}.", hidden, intermediate)
    return tensors
