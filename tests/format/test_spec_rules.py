"""Spec 1.2 rules: thaw_format and the reference decoder (spec/reference/decode.py) agree on each one.

Each case edits a golden vector's document (re-encoded by the spec's own minimal writer) so that it breaks one
rule written down in 1.2; both readers must refuse it, each naming the rule. The writer refuses the same
content before writing it (what it writes, its reader reads).
"""

import copy

import pytest

import thaw_format as tf
from test_spec_reference import build, ref, vector


def request(doc):
    return doc["scheduler"]["requests"][0]


def add_tensor(doc, name, dtype, shape):
    doc["tensors"].append({"name": name, "dtype": dtype, "shape": shape})


def rename(doc, old, new):
    next(t for t in doc["tensors"] if t["name"] == old)["name"] = new


# (vector, edit of its document, extra region bytes, what the reference says, what thaw_format says)
CASES = {
    "sampling_number_past_binary64": ("scheduler_in_flight", lambda d: request(d)["sampling"].update(temperature=10**400),
                                      None, r"sampling\.temperature is not number", "temperature must be number"),
    "sampling_number_is_string": ("scheduler_in_flight", lambda d: request(d)["sampling"].update(top_p="1"),
                                  None, r"sampling\.top_p is not number", "top_p must be number"),
    "sampling_int_past_64_bits": ("scheduler_in_flight", lambda d: request(d)["sampling"].update(seed=1 << 64),
                                  None, r"sampling\.seed is not int", "seed must be int"),
    "negative_count": ("scheduler_in_flight", lambda d: request(d)["sampling"].update(max_tokens=-1),
                       None, r"max_tokens is not count", "max_tokens must be count"),
    "token_id_past_64_bits": ("scheduler_in_flight", lambda d: request(d).update(output_token_ids=[7, 1 << 64]),
                              None, r"output_token_ids is not ints", "output_token_ids must be ints"),
    "computed_past_tokens": ("scheduler_in_flight", lambda d: request(d).update(num_computed_tokens=9),
                             None, "num_computed_tokens exceeds", "num_computed_tokens 9 is not in"),
    "tp_rank_past_size": ("scheduler_in_flight", lambda d: d["engine"].update(tp_rank=1, tp_size=1),
                          None, "tp_rank is not below", "tp_rank 1 must be in"),
    "rng_state_2d": ("scheduler_in_flight", lambda d: d["tensors"][-1].update(shape=[2, 4]),
                     None, "not a 1-D uint8", "must be a 1-D uint8 tensor"),
    "hash_uppercase": ("kv_prefix_tree", lambda d: d["prefix"]["hash"]["hashes"].__setitem__(0, "AB"),
                       None, "lowercase hex", "lowercase hex"),
    "hash_odd_length": ("kv_prefix_tree", lambda d: d["prefix"]["hash"]["hashes"].__setitem__(0, "abc"),
                        None, "lowercase hex", "lowercase hex"),
    # The reader checks every hash in one match over their joined text: each rule must still hold per entry.
    "hash_odd_lengths_joined_even": ("kv_prefix_tree",
                                     lambda d: d["prefix"]["hash"]["hashes"].__setitem__(slice(0, 2), ["abc", "d"]),
                                     None, "lowercase hex", "lowercase hex"),
    "hash_empty": ("kv_prefix_tree", lambda d: d["prefix"]["hash"]["hashes"].__setitem__(1, ""),
                   None, "lowercase hex", "lowercase hex"),
    "hash_zero_number": ("kv_prefix_tree", lambda d: d["prefix"]["hash"]["hashes"].__setitem__(2, 0),
                         None, "lowercase hex", "got 0"),
    "hash_bad_last_digit": ("kv_prefix_tree", lambda d: d["prefix"]["hash"]["hashes"].__setitem__(1, "2" * 63 + "g"),
                            None, "lowercase hex", "lowercase hex"),
    "attention_without_heads": ("kv_prefix_tree", lambda d: d["kv"]["layers"][0].update(head_dim=None),
                                None, "needs positive num_kv_heads", "needs num_kv_heads and head_dim"),
    "attention_extra_role": ("kv_layer_kinds", lambda d: (d["kv"]["layers"][0]["tensors"].append("x"),
                                                          add_tensor(d, "kv/0/x", "uint8", [1])),
                             b"\0", "has roles", "must hold tensors"),
    "sliding_window_without_window": ("kv_layer_kinds", lambda d: d["kv"]["layers"][0]["params"].pop("window"),
                                      None, r"params\.window", "params.window must be a positive integer"),
    "mla_latent_dim_mismatch": ("kv_layer_kinds", lambda d: d["kv"]["layers"][1]["params"].update(latent_dim=5),
                                None, "latent_dim", "latent_dim=5"),
    "quantized_packed_as_float": ("kv_layer_kinds", lambda d: d["tensors"][3].update(dtype="float32"),
                                  None, "unsigned integer", "packed values are one of"),
    "ring_write_index_per_sequence": ("kv_layer_kinds", lambda d: d["kv"]["layers"][3]["params"].update(write_index=[1, 2]),
                                      None, r"params\.write_index", "params.write_index must be 1"),
    "ring_keep_past_window": ("kv_layer_kinds", lambda d: d["kv"]["layers"][3]["params"].update(keep=5),
                              None, "keep > window", "keep 5 must be <= window 4"),
    "recurrent_role_gap": ("kv_layer_kinds", lambda d: (d["kv"]["layers"][4].update(tensors=["state.0", "state.2"]),
                                                        rename(d, "kv/4/state.1", "kv/4/state.2")),
                           None, "has roles", "must hold tensors"),
    "weights_tensor_without_section": ("kv_prefix_tree", lambda d: add_tensor(d, "weights/w", "uint8", [1]),
                                       b"\0", "namespace that does not refer", "no weights section"),
    "kv_tensor_no_layer_lists": ("kv_prefix_tree", lambda d: add_tensor(d, "kv/0/extra", "uint8", [1]),
                                 b"\0", "namespace that does not refer", "the kv section does not refer to it"),
    "checkpoint_name_not_string": ("weights_only", lambda d: d["weights"]["checkpoint_names"].update(x=1),
                                   None, "checkpoint_names values", "checkpoint_names must map"),
    "dim_past_int64": ("weights_only", lambda d: add_tensor(d, "zero", "uint8", [1 << 63, 0]),
                       b"", "non-negative integers", "non-negative integers below 2**63"),
}


def broken(name):
    vec, edit, extra, _, _ = CASES[name]
    _, desc = vector(vec)
    doc = copy.deepcopy(desc["document"])
    edit(doc)
    blobs = [bytes.fromhex(t["hex"]) for t in desc["tensors"]] + ([extra] if extra is not None else [])
    return build(doc, blobs, required=desc["features"]["required"], optional=desc["features"]["optional"],
                 minor=desc["version"][1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_readers_refuse(name):
    data = broken(name)
    with pytest.raises(ref.CorruptSnapshotError, match=CASES[name][3]):
        ref.decode(data)
    with pytest.raises(tf.CorruptSnapshotError, match=CASES[name][4].replace("[", r"\[").replace("*", r"\*")
                       .replace("(", r"\(")):
        tf.loads(data)


def test_unknown_layer_kind_is_kept_by_both():  # section 5.3: a later minor's kind is carried, not refused
    data, desc = vector("kv_layer_kinds")
    assert ref.decode(data)["document"]["kv"]["layers"][5]["kind"] == "future_kind"
    snapshot = tf.loads(data)
    layer = snapshot.kv.layers[5]
    assert (layer.kind, layer.tensors["x"].tobytes(), layer.params) == ("future_kind", b"\x01\x02",
                                                                         {"added_in": "a later minor"})
    assert tf.dumps(snapshot) == data  # kept byte for byte


def test_writer_refuses_what_its_reader_refuses(tmp_path):
    snapshot = tf.loads(vector("scheduler_in_flight")[0])
    snapshot.scheduler.requests[0].sampling.temperature = 10**400
    with pytest.raises(ValueError, match="temperature must be number"):
        tf.dumps(snapshot)
    snapshot = tf.loads(vector("weights_only")[0])
    snapshot.weights.checkpoint_names = {"a": 3}
    with pytest.raises(ValueError, match="checkpoint_names"):
        tf.save(snapshot, tmp_path / "x.thaw")
    assert list(tmp_path.iterdir()) == []
