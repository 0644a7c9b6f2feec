"""Model identity: the checkpoint rule every adapter shares (spec 5.1), and the weights digest (spec 7)."""

import numpy as np
import torch
from safetensors.torch import save_file as st_save_file

import thaw_format as tf
from thaw_format.torch import from_torch


def test_checkpoint_weights_digest_is_the_digest_of_the_files_tensors(tmp_path):
    parts = [
        {"model.embed.weight": torch.randn(16, 8, dtype=torch.bfloat16), "lm_head.weight": torch.randn(16, 8)},
        {"model.norm.weight": torch.ones(8, dtype=torch.float16), "model.steps": torch.arange(3)},
    ]
    for i, part in enumerate(parts):
        st_save_file(part, str(tmp_path / f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
    tensors = {name: from_torch(t) for part in parts for name, t in part.items()}
    assert tf.checkpoint_weights_digest(tmp_path) == tf.weights_digest(tensors)


def test_checkpoint_weights_digest_sees_one_changed_value(tmp_path):
    w = torch.zeros(4, 4)
    st_save_file({"w": w}, str(tmp_path / "model.safetensors"))
    before = tf.checkpoint_weights_digest(tmp_path)
    w[2, 3] = 1.0
    st_save_file({"w": w}, str(tmp_path / "model.safetensors"))
    assert tf.checkpoint_weights_digest(tmp_path) != before


def test_weights_digest_ignores_insertion_order_and_input_kind():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, dtype=np.int64)
    assert tf.weights_digest({"a": a, "b": b}) == tf.weights_digest({"b": torch.from_numpy(b), "a": a})


def test_checkpoint_model_info_ignores_the_files_own_fields():
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "model_type": "llama"}
    written = dict(config, torch_dtype="float32", transformers_version="4.57.0", _name_or_path="/x")
    a = tf.checkpoint_model_info(config, "float32")
    b = tf.checkpoint_model_info(written, "float32")
    assert (a.architecture, a.config_digest) == (b.architecture, b.config_digest) == ("LlamaForCausalLM", a.config_digest)
    assert tf.checkpoint_model_info(dict(config, hidden_size=16), "float32").config_digest != a.config_digest
