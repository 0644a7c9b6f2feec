"""The golden vectors: each decodes to its description, and rewriting its content gives identical bytes."""

import json
from pathlib import Path

import pytest

import thaw_format as tf

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
NAMES = sorted(p.stem for p in VECTORS.glob("*.thaw"))


def test_every_released_vector_exists():
    assert NAMES == ["kv_layer_kinds", "kv_only_weights_ref", "kv_prefix_tree", "kv_v_head_dim", "scheduler_in_flight",
                     "weights_only"]


@pytest.mark.parametrize("name", NAMES)
def test_vector_decodes_to_its_description(name):
    data = (VECTORS / f"{name}.thaw").read_bytes()
    expected = json.loads((VECTORS / f"{name}.json").read_text())
    f = tf.SnapshotFile(data)
    f.verify()
    assert f.id == expected["id"]
    assert list(f.version) == expected["version"]
    assert f.document == expected["document"]
    assert f.names() == [t["name"] for t in expected["tensors"]]
    for t in expected["tensors"]:
        got = f.tensor(t["name"])
        assert (got.dtype, list(got.shape), got.data.hex()) == (t["dtype"], t["shape"], t["hex"]), t["name"]


@pytest.mark.parametrize("name", NAMES)
def test_vector_rewrites_to_identical_bytes(name, tmp_path):
    data = (VECTORS / f"{name}.thaw").read_bytes()
    snapshot = tf.loads(data)
    assert tf.dumps(snapshot) == data
    assert tf.save(snapshot, tmp_path / "again.thaw") == snapshot.id
    assert (tmp_path / "again.thaw").read_bytes() == data


def test_vector_semantics():
    """Spot checks of meaning, so the vectors cannot drift into merely self-consistent bytes."""
    tree = tf.load(VECTORS / "kv_prefix_tree.thaw")
    assert tree.prefix.parents == [-1, 0, 0]
    assert tree.prefix.chain_tokens(2) == [1, 2, 3, 4, 9, 10]
    assert tree.kv.num_pages == 3 and tree.prefix.hash.hashes[2] is None
    sched = tf.load(VECTORS / "scheduler_in_flight.thaw")
    (req,) = sched.scheduler.requests
    assert (req.status, req.output_token_ids, req.sampling.seed, req.rng_state.tobytes()) == (
        "running", [7, 8], 1234, bytes(range(8)))
    ref = tf.load(VECTORS / "kv_only_weights_ref.thaw")
    weights = tf.load(VECTORS / "weights_only.thaw")
    assert ref.weights.tensors == {}
    assert ref.weights.ref.weights_digest == tf.weights_digest(weights.weights.tensors) == ref.model.weights_digest
    with tf.open(VECTORS / "kv_only_weights_ref.thaw") as f:
        assert f.features == (1, 0) and f.version == (1, 0)
    with tf.open(VECTORS / "kv_v_head_dim.thaw") as f:  # the only 1.1 feature: the only 1.1 file
        assert f.features == (2, 0) and f.version == (1, 1)
    (layer,) = tf.load(VECTORS / "kv_v_head_dim.thaw").kv.layers
    assert (layer.tensors["k"].shape, layer.tensors["v"].shape) == ((1, 4, 2, 4), (1, 4, 2, 2))
