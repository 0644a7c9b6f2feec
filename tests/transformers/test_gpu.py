"""thaw_transformers on a CUDA GPU: pages move through libthaw's CUDA mover, byte-identical to torch's copies
of the same engine's pages; a restore into a fresh GPU engine lands them byte for byte, hits the prefix cache
and continues token-identically. On a CPU, the choice falls back to torch and says why."""

import os

import pytest
import torch

import thaw_format
from thaw_format.sdk import greedy
from thaw_transformers import TransformersEngine, transfer
from conftest import PROMPT, model_dir, page_bytes


def test_cpu_tensors_move_through_torch_and_say_why():
    reason = transfer.cuda_mover_unavailable(torch.device("cpu"))
    assert reason and "cpu" in reason
    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    assert torch.equal(transfer.to_host(t), t) and torch.equal(transfer.to_device(t, "cpu"), t)


@pytest.fixture(scope="module")
def gpu():
    reason = "no CUDA GPU visible to torch here (scripts/gpu-check.sh runs this on the GPU machine)" \
        if not torch.cuda.is_available() else transfer.cuda_mover_unavailable(torch.device("cuda"))
    if reason and os.environ.get("THAW_REQUIRE_GPU") == "1":
        pytest.fail(f"THAW_REQUIRE_GPU=1 but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v2"])
def test_cuda_capture_restore_through_the_mover(gpu, arch, tmp_path, monkeypatch):
    parent = TransformersEngine.start(str(model_dir(arch)), device="cuda")
    first = parent.generate(PROMPT, greedy(6))
    snapshot = parent.capture()
    with monkeypatch.context() as torch_only:  # the same engine's pages through torch's copies
        torch_only.setattr(transfer, "cuda_mover_unavailable", lambda device: "torch path for comparison")
        assert page_bytes(parent.capture(include_weights=False)) == page_bytes(snapshot)
    path = tmp_path / "gpu.thaw"
    thaw_format.save(snapshot, path)
    prompt = PROMPT + first.token_ids
    want = parent.generate(prompt, greedy(8))

    child = TransformersEngine.start(str(model_dir(arch)), device="cuda")
    assert child.restore(thaw_format.load(path)) == []
    assert all(t.is_cuda for page in child.cache.pages for kv in page.block for t in kv)
    assert page_bytes(child.capture(include_weights=False)) == page_bytes(thaw_format.load(path))
    got = child.generate(prompt, greedy(8))
    assert got.token_ids == want.token_ids
    assert got.cached_tokens == want.cached_tokens == len(prompt) - 1
