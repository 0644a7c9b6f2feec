import random

import pytest

import thaw_format as tf
from thaw_format.tensor import Tensor


def make_full_snapshot(seed: int = 0) -> tf.Snapshot:
    """A snapshot with every section filled, small enough for byte sweeps."""
    rng = random.Random(seed)

    def raw(dtype, shape):
        n = 1
        for d in shape:
            n *= d
        return Tensor(dtype, shape, rng.randbytes(n * tf.dtypes.ITEMSIZE[dtype]))

    page_size, pages = 4, 3
    layers = [
        tf.KVLayer("attention", {"k": raw("float32", (pages, page_size, 2, 4)), "v": raw("float32", (pages, page_size, 2, 4))},
                   num_kv_heads=2, head_dim=4),
        tf.KVLayer("sliding_window", {"k": raw("float32", (pages, page_size, 2, 4)), "v": raw("float32", (pages, page_size, 2, 4))},
                   num_kv_heads=2, head_dim=4, params={"window": 8}),
    ]
    return tf.Snapshot(
        model=tf.ModelInfo("llama", tf.config_digest({"hidden_size": 8}), "float32", config={"hidden_size": 8}),
        weights=tf.Weights({"embed.weight": raw("float32", (16, 8)), "norm.weight": raw("bfloat16", (8,))},
                           checkpoint_names={"embed.weight": "model.embed_tokens.weight"}),
        kv=tf.KVCache(page_size=page_size, dtype="float32", layers=layers),
        prefix=tf.PrefixTree(parents=[-1, 0, 0], tokens=[[1, 2, 3, 4], [5, 6], [7, 8, 9]],
                             hash=tf.NativeHash("test.sha256", 4, ["aa" * 32, None, None], seed="00")),
        scheduler=tf.SchedulerState([tf.Request("r0", "running", [1, 2, 3, 4, 5, 6], [42], tf.SamplingParams(seed=7),
                                                num_computed_tokens=6, pages=[0, 1],
                                                rng_state=raw("uint8", (16,)))]),
        engine=tf.EngineInfo("test-engine", "1.0", attention_backend="none", native_kv_layout="token-major"),
        lineage=tf.Lineage(parent=None, label="trunk", created="2026-11-23T00:00:00Z"),
        metadata={"purpose": "tests"},
    )


@pytest.fixture
def full_snapshot():
    return make_full_snapshot()
