"""Write the version-1 golden vectors: NAME.thaw and NAME.json (its decoded content, spec section 11).

Run from the repository root: `python spec/vectors/generate.py`. The vectors are committed; regenerate them only
for a new format version, never to make a failing test pass.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import thaw_format as tf
from thaw_format.tensor import Tensor

HERE = Path(__file__).parent


def floats(dtype: str, values: list[float], shape) -> Tensor:
    code = {"float32": "f", "float64": "d", "float16": "e"}[dtype]
    return Tensor(dtype, shape, struct.pack(f"<{len(values)}{code}", *values))


def bf16(values: list[float], shape) -> Tensor:
    # bfloat16 is the top half of float32; the chosen values are exact in bfloat16.
    packed = struct.pack(f"<{len(values)}f", *values)
    return Tensor("bfloat16", shape, b"".join(packed[i + 2 : i + 4] for i in range(0, len(packed), 4)))


def ramp(dtype: str, shape, scale: float = 0.125) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    return floats(dtype, [((i % 17) - 8) * scale for i in range(n)], shape)


CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 2,
          "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32}
MODEL = tf.ModelInfo("LlamaForCausalLM", tf.config_digest(CONFIG), "float32", config=CONFIG)
ENGINE = tf.EngineInfo("reference", "1.0", attention_backend="none",
                       native_kv_layout="(num_pages, page_size, num_kv_heads, head_dim)")
PAGE = 4


def kv_layers(pages: int) -> list[tf.KVLayer]:
    shape = (pages, PAGE, 2, 4)
    return [tf.KVLayer("attention", {"k": ramp("float32", shape, 0.25 * (i + 1)), "v": ramp("float32", shape, -0.5)},
                       num_kv_heads=2, head_dim=4) for i in range(2)]


def weights_only() -> tf.Snapshot:
    tensors = {
        "embed.weight": ramp("float32", (32, 8)),
        "norm.weight": bf16([1.0, 0.5, -2.0, 0.25, 3.0, -1.5, 0.125, 8.0], (8,)),
        "scale": floats("float64", [0.1], ()),
        "mask": Tensor("bool", (2, 3), bytes([1, 0, 1, 1, 0, 0])),
        "ids": Tensor("int64", (3,), struct.pack("<3q", -1, 0, 2**40)),
        "empty": Tensor("float16", (0, 4), b""),
    }
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    return tf.Snapshot(model=MODEL, weights=tf.Weights(tensors, checkpoint_names=names),
                       lineage=tf.Lineage(label="weights", created="2026-11-23T00:00:00Z"),
                       metadata={"source": "spec/vectors/generate.py"})


def kv_prefix_tree() -> tf.Snapshot:
    # Page 0 is a shared root; pages 1 and 2 are two continuations, page 2 partial (2 of 4 tokens).
    prefix = tf.PrefixTree(parents=[-1, 0, 0], tokens=[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]],
                           hash=tf.NativeHash("sha256", PAGE, ["11" * 32, "22" * 32, None], seed="00" * 32))
    return tf.Snapshot(model=MODEL, kv=tf.KVCache(PAGE, "float32", kv_layers(3)), prefix=prefix, engine=ENGINE,
                       lineage=tf.Lineage(label="trunk", created="2026-11-23T00:00:01Z"))


def scheduler_in_flight() -> tf.Snapshot:
    request = tf.Request(
        id="req-0", status="running", prompt_token_ids=[1, 2, 3, 4, 5, 6], output_token_ids=[7, 8],
        sampling=tf.SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=1234, max_tokens=16,
                                   stop_token_ids=[0], extra={"n": 1}),
        num_computed_tokens=7, pages=[0, 1], rng_state=Tensor("uint8", (8,), bytes(range(8))),
    )
    prefix = tf.PrefixTree(parents=[-1, 0], tokens=[[1, 2, 3, 4], [5, 6, 7]])
    return tf.Snapshot(model=MODEL, kv=tf.KVCache(PAGE, "float32", kv_layers(2)), prefix=prefix,
                       scheduler=tf.SchedulerState([request]), engine=ENGINE,
                       lineage=tf.Lineage(label="mid-generation", created="2026-11-23T00:00:02Z"))


def kv_only_weights_ref() -> tf.Snapshot:
    weights_digest = tf.weights_digest(weights_only().weights.tensors)
    model = tf.ModelInfo(MODEL.architecture, MODEL.config_digest, MODEL.dtype, weights_digest=weights_digest)
    prefix = tf.PrefixTree(parents=[-1], tokens=[[1, 2, 3, 4]])
    return tf.Snapshot(model=model, weights=tf.Weights(ref=tf.WeightsRef(weights_digest)),
                       kv=tf.KVCache(PAGE, "float32", kv_layers(1)), prefix=prefix, engine=ENGINE,
                       lineage=tf.Lineage(label="kv-only", created="2026-11-23T00:00:03Z"))


def kv_v_head_dim() -> tf.Snapshot:
    # Version 1.1: V's head size (2) differs from K's (4), as in DeepSeek's MLA run as plain attention.
    shape = (1, PAGE, 2, 4)
    layer = tf.KVLayer("attention", {"k": ramp("float32", shape), "v": ramp("float32", (1, PAGE, 2, 2), -0.5)},
                       num_kv_heads=2, head_dim=4, params={"v_head_dim": 2})
    prefix = tf.PrefixTree(parents=[-1], tokens=[[1, 2, 3]])
    return tf.Snapshot(model=MODEL, kv=tf.KVCache(PAGE, "float32", [layer]), prefix=prefix, engine=ENGINE,
                       lineage=tf.Lineage(label="v-head-dim", created="2026-11-30T00:00:00Z"))


def kv_layer_kinds() -> tf.Snapshot:
    # Spec 1.2 rules for every other layer kind (roles, params, shapes), and a kind no version defines yet,
    # which a reader keeps as it is (section 5.3). Still version 1.0: no feature bit is needed.
    paged = (1, PAGE, 1, 2)
    layers = [
        tf.KVLayer("sliding_window", {"k": ramp("float32", paged), "v": ramp("float32", paged, -1)},
                   num_kv_heads=1, head_dim=2, params={"window": 8}),
        tf.KVLayer("mla", {"latent": ramp("float32", (1, PAGE, 6))}, params={"latent_dim": 6, "rope_dim": 2}),
        tf.KVLayer("quantized", {
            "k": Tensor("uint32", (1, PAGE, 1, 1), bytes(range(16))), "v": Tensor("uint32", (1, PAGE, 1, 1), bytes(16)),
            "k_scales": ramp("float32", paged), "k_biases": ramp("float32", paged, 0.5),
            "v_scales": ramp("float32", paged, 0.25), "v_biases": ramp("float32", paged, -0.5)},
            num_kv_heads=1, head_dim=4, params={"bits": 8, "group_size": 2}),
        tf.KVLayer("ring", {"k": ramp("float32", (1, 4, 1, 2)), "v": ramp("float32", (1, 4, 1, 2), 2)},
                   num_kv_heads=1, head_dim=2, params={"window": 4, "keep": 0, "write_index": [2], "offset": [6]}),
        tf.KVLayer("recurrent", {"state.0": ramp("float32", (1, 3)), "state.1": ramp("float32", (1, 2, 2))}),
        tf.KVLayer("future_kind", {"x": Tensor("uint8", (2,), b"\x01\x02")}, params={"added_in": "a later minor"}),
    ]
    prefix = tf.PrefixTree(parents=[-1], tokens=[[1, 2, 3, 4]])
    return tf.Snapshot(model=MODEL, kv=tf.KVCache(PAGE, "float32", layers), prefix=prefix, engine=ENGINE,
                       lineage=tf.Lineage(label="layer-kinds", created="2026-12-02T00:00:00Z"))


VECTORS = {f.__name__: f for f in (weights_only, kv_prefix_tree, scheduler_in_flight, kv_only_weights_ref,
                                   kv_v_head_dim, kv_layer_kinds)}


def describe(data: bytes) -> dict:
    """The decoded content of a snapshot's bytes, as spec section 11 lays it out."""
    f = tf.SnapshotFile(data)
    f.verify()
    return {
        "id": f.id,
        "version": list(f.version),
        "features": {"required": f.features[0], "optional": f.features[1]},
        "document": f.document,
        "tensors": [{"name": n, "dtype": f.info(n)[0], "shape": list(f.info(n)[1]), "hex": f.tensor(n).data.hex()}
                    for n in f.names()],
    }


def main() -> int:
    for name, build in VECTORS.items():
        data = tf.dumps(build())
        (HERE / f"{name}.thaw").write_bytes(data)
        (HERE / f"{name}.json").write_text(json.dumps(describe(data), indent=1, sort_keys=True) + "\n")
        print(f"wrote {name}.thaw ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
