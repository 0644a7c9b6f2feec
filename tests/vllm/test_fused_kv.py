"""The fused KV path's refusal: a snapshot in shared memory with one corrupt chunk is refused by the worker's
verification before the engine core changes anything, so the engine's KV bytes and prefix cache are as they
were (the same path a multiprocessing engine takes; here the engine is in-process so its state can be read)."""

import pytest
import torch
from conftest import generate, trunk_tokens

import thaw_format


def kv_state(llm) -> list[bytes]:
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    return [cache.view(torch.uint8).numpy().tobytes() for cache in worker.model_runner.kv_caches]


def test_a_corrupt_chunk_in_shared_memory_leaves_the_engine_untouched(engine, greedy):
    import thaw_vllm
    from thaw_format.sdk.shared import SharedSnapshot
    from thaw_vllm import api

    trunk, other = trunk_tokens(130, seed=50), trunk_tokens(90, seed=51)
    generate(engine, trunk, greedy)
    snapshot = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    expected = generate(engine, other, greedy)  # the engine moves on: now it holds `other` too
    before = kv_state(engine)

    with SharedSnapshot(snapshot) as shared:
        region = thaw_format.SnapshotFile(shared._shm.buf).info("kv/0/k")[2]  # layer 0's K in the segment
        shared._shm.buf[region.offset + 1000] ^= 0x40  # one bit of layer 0's K, inside its first chunk
        with pytest.raises(thaw_format.CorruptSnapshotError, match="kv/0/k"):
            api.restore_source(engine, shared.source)
    assert kv_state(engine) == before
    assert generate(engine, other, greedy) == (expected[0], 64)  # its prefix cache still serves `other`
