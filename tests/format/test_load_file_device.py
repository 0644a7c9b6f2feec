"""load_file(path, device), as safetensors' load_file(filename, device="cpu"): the CPU in every spelling torch
takes, and a device torch does not know or this machine lacks refused by name before the data is read."""

import pytest
import torch

import thaw_format as tf


@pytest.fixture
def saved(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    path = tmp_path / "w.thaw"
    tf.save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu")])
@pytest.mark.parametrize("mmap", [True, False])
def test_the_cpu_in_every_spelling(saved, device, mmap):
    path, tensors = saved
    loaded = tf.load_file(path, device, mmap=mmap)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].device.type == "cpu" and loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    assert tf.load_file(path, device=device).keys() == tensors.keys()


def _damaged(path):
    """The file with its last data byte changed: a load that read the data would raise CorruptSnapshotError."""
    with tf.open(path) as f:
        region = f.layout.regions[-1]
    data = bytearray(path.read_bytes())
    data[region.end - 1] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(tf.CorruptSnapshotError):
        tf.load_file(path)
    return path


@pytest.mark.parametrize("device, error, match", [
    ("gpu", ValueError, "unknown device 'gpu'"),
    ("cuda:x", ValueError, "unknown device 'cuda:x'"),
    ("meta", ValueError, "device 'meta' holds no data"),
    (1.5, TypeError, "device must be a torch.device, a str"),
    (True, TypeError, "got bool"),
    (-1, ValueError, "device -1: an accelerator's index is 0 or more"),  # said 'no accelerator' on a GPU too
])
def test_a_device_torch_does_not_know_is_refused_before_the_data_is_read(saved, device, error, match):
    path = _damaged(saved[0])
    with pytest.raises(error, match=match):
        tf.load_file(path, device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal is for one without")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1), 0])
def test_cuda_without_cuda_is_refused_by_name(saved, device):
    path = _damaged(saved[0])
    with pytest.raises(RuntimeError, match="available here") as refused:
        tf.load_file(path, device)
    assert repr(device) in str(refused.value)
