"""Captures lent through shared memory (thaw_format.sdk.lent): the worker gathers the KV pages into a segment
it hands to the client, whose Snapshot views it; restoring that snapshot, or a capture_shared source, hands
the segment back to the worker, which verifies every chunk before writing anything when the client did not
check it where it came in (a source named by a string, a shared load made with verify=False).

In-process engines (this test process) take the same worker path when asked for a shared-memory capture, so
their KV bytes can be compared; one engine in vLLM's default multiprocessing mode runs in lent_helper.py."""

import gc
import glob
import mmap
import os

import pytest
import torch
from conftest import ENGINE_KWARGS, generate, run_helper, trunk_tokens

import thaw_format
from thaw_format.sdk import lent


def kv_state(llm) -> list[bytes]:
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    return [cache.view(torch.uint8).numpy().tobytes() for cache in worker.model_runner.kv_caches]


def lent_capture(llm, chains):
    """A capture through the worker's lending path (what a multiprocessing engine's client gets)."""
    from thaw_vllm import _internals, transport

    args = {"include_weights": False, "chains": chains, "local": False}
    source = _internals.call_engine_core(llm, "thaw_call", "capture", args)["source"]
    assert lent.is_lent(source)
    return transport.read(source, unlink=True, keep=True)


def kv_bytes(snapshot) -> list[bytes]:
    return [bytes(layer.tensors[role].data) for layer in snapshot.kv.layers for role in ("k", "v")]


def flip_bit(source: str, tensor: str = "kv/0/k") -> None:
    from _posixshmem import shm_open

    name, nbytes = lent.parse(source)
    fd = shm_open("/" + name, os.O_RDWR, mode=0)
    try:
        with mmap.mmap(fd, nbytes) as mapping:
            region = thaw_format.SnapshotFile(mapping).info(tensor)[2]
            mapping[region.offset + 1000] ^= 0x40
    finally:
        os.close(fd)


def test_lent_pages_are_byte_identical_to_the_in_process_path(engine, greedy):
    import thaw_vllm

    trunk = trunk_tokens(200, seed=60)
    generate(engine, trunk, greedy)
    local = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    borrowed = lent_capture(engine, [trunk])
    # vLLM picks the ISA per machine and dtype (vec on an AVX-512 CPU, vec16 without it, amx for bfloat16 on an
    # Intel CPU with AMX): the comparison holds for whichever layout the engine uses, named here.
    assert borrowed.engine.native_kv_layout.split(":")[0] in ("CPU_ATTN isa=vec", "CPU_ATTN isa=vec16",
                                                              "CPU_ATTN isa=amx")
    assert borrowed.engine.native_kv_layout == local.engine.native_kv_layout
    assert borrowed.kv.num_pages == local.kv.num_pages == 200 // 32
    assert kv_bytes(borrowed) == kv_bytes(local)
    assert borrowed.prefix == local.prefix
    assert all(memoryview(layer.tensors["k"].data).readonly for layer in borrowed.kv.layers)  # views, not copies


def test_a_lent_snapshot_is_never_overwritten_and_its_segment_is_recycled(engine, greedy):
    first, second = trunk_tokens(150, seed=61), trunk_tokens(150, seed=62)
    generate(engine, first, greedy)
    generate(engine, second, greedy)
    held = lent_capture(engine, [first])
    before = kv_bytes(held)
    held_source = lent.lent_source(held)
    other = lent_capture(engine, [second])
    other_source = lent.lent_source(other)
    assert other_source != held_source and kv_bytes(other) != before
    assert kv_bytes(held) == before  # the next capture went to another segment
    del other
    gc.collect()
    again = lent_capture(engine, [second])
    assert lent.lent_source(again) == other_source  # the returned segment was reused, not a new one
    assert kv_bytes(held) == before


def test_a_changed_snapshot_is_not_restored_from_its_segment(engine, greedy):
    import dataclasses

    trunk = trunk_tokens(100, seed=63)
    generate(engine, trunk, greedy)
    held = lent_capture(engine, [trunk])
    assert lent.lent_source(held) is not None
    held.prefix = dataclasses.replace(held.prefix, tokens=[list(t) for t in held.prefix.tokens])
    assert lent.lent_source(held) is not None  # equal content, rebuilt objects: still the segment's
    held.prefix.tokens[0][0] += 1
    assert lent.lent_source(held) is None  # the encoder would write other bytes: encode it again


def test_capture_shared_restores_from_the_source_and_hits_the_prefix_cache(engine, greedy):
    from thaw_format.sdk.shared import read_shared

    from thaw_vllm import VLLMEngine

    adapter = VLLMEngine(engine)
    trunk, suffix = trunk_tokens(140, seed=64), trunk_tokens(9, seed=65)
    expected = generate(engine, trunk + suffix, greedy)
    source = adapter.capture_shared(chains=[trunk])
    reader = read_shared(source)  # what a pool worker in another process does
    assert reader.weights is None and reader.kv.num_pages == 140 // 32
    assert engine.reset_prefix_cache()
    assert generate(engine, trunk + suffix, greedy)[1] == 0
    assert engine.reset_prefix_cache()
    adapter.restore_source(source)
    assert generate(engine, trunk + suffix, greedy) == (expected[0], 128)


def test_a_corrupt_chunk_in_a_shared_source_leaves_the_engine_untouched(engine, greedy):
    from thaw_vllm import VLLMEngine

    adapter = VLLMEngine(engine)
    trunk, other = trunk_tokens(130, seed=66), trunk_tokens(90, seed=67)
    generate(engine, trunk, greedy)
    source = adapter.capture_shared(chains=[trunk])
    expected = generate(engine, other, greedy)
    before = kv_state(engine)
    flip_bit(source)
    with pytest.raises(thaw_format.CorruptSnapshotError, match="kv/0/k"):
        adapter.restore_source(source)
    assert kv_state(engine) == before
    assert generate(engine, other, greedy) == (expected[0], 64)


def test_segments_the_client_did_not_check_are_verified_before_an_in_process_engine_changes(engine, greedy, tmp_path):
    """The trust rule holds in-process too, where the engine is handed the Snapshot itself: a segment borrowed
    with verify=False (any source string) or shared-loaded with verify=False is verified before the engine
    changes, and refused there when corrupt, as the worker of a multiprocessing engine refuses it."""
    import thaw_vllm

    trunk, other = trunk_tokens(120, seed=68), trunk_tokens(80, seed=69)
    generate(engine, trunk, greedy)
    captured = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    expected = generate(engine, other, greedy)
    before = kv_state(engine)

    lender = lent.Lender()
    try:
        source = lender.publish(captured)
        flip_bit(source)
        borrowed = lent.borrow(source, verify=False)
        with pytest.raises(thaw_format.CorruptSnapshotError, match="kv/0/k"):
            thaw_vllm.restore(engine, borrowed)
        assert kv_state(engine) == before
    finally:
        lender.close()

    path = tmp_path / "kv.thaw"
    thaw_format.save(captured, path)
    unverified = thaw_format.load(path, shared=True, verify=False)
    flip_bit(lent.lent_source(unverified))
    with pytest.raises(thaw_format.CorruptSnapshotError, match="kv/0/k"):
        thaw_vllm.restore(engine, unverified)
    assert kv_state(engine) == before
    assert generate(engine, other, greedy) == (expected[0], 64)


def test_lender_segments_are_released():
    """Borrowed segments come back to the lender when dropped and are gone from /dev/shm once it closes."""
    import numpy as np
    from thaw_format.numpy import from_numpy

    # A lender on its own: the session's engines (and their workers' lenders) live to the session's end.
    snapshot = thaw_format.Snapshot(
        model=thaw_format.ModelInfo(architecture="x", config_digest="sha256:" + "0" * 64, dtype="float32"),
        kv=thaw_format.KVCache(page_size=4, dtype="float32", layers=[thaw_format.KVLayer(
            "attention", {"k": from_numpy(np.ones((2, 4, 1, 8), np.float32)),
                          "v": from_numpy(np.zeros((2, 4, 1, 8), np.float32))}, num_kv_heads=1, head_dim=8)]),
        prefix=thaw_format.PrefixTree(parents=[-1, 0], tokens=[[1, 2, 3, 4], [5, 6, 7, 8]]))
    lender = lent.Lender()
    sources = [lender.publish(snapshot) for _ in range(4)]
    assert len(set(sources)) == 4  # nobody gave any back yet: four segments
    borrowed = [lent.borrow(s) for s in sources]
    assert [kv_bytes(b) for b in borrowed] == [kv_bytes(snapshot)] * 4
    kept = borrowed.pop()
    del borrowed
    gc.collect()
    recycled = lender.publish(snapshot)
    stem = lent.parse(recycled)[0].rsplit("_", 2)[0]
    # the control segment, the kept one, the recycled one and the other idle ones (no more than KEEP_IDLE)
    assert recycled in sources[:3] and len(glob.glob(f"/dev/shm/{stem}_*")) == 3 + lent.KEEP_IDLE
    lender.close()
    assert not glob.glob(f"/dev/shm/{stem}_*")
    assert kv_bytes(kept) == kv_bytes(snapshot)  # its mapping outlives the name
    assert lent.lent_source(kept) is None  # no engine could open it by name: a restore encodes it again


def test_multiprocessing_engine_lends_restores_and_refuses_corrupt_sources(zoo):
    """Also: a snapshot loaded from a file into shared memory restores byte-identical KV from its own segment, and
    one loaded into the client's own memory read from there by the worker (or, where the system refuses that read,
    through the engine's restore segment)."""
    trunk, other, suffix = trunk_tokens(130, seed=70), trunk_tokens(100, seed=71), trunk_tokens(7, seed=72)
    result = run_helper("lent_helper.py", {
        "model": str(zoo.make_model("llama", dtype="float32")), "dtype": "float32", "engine_kwargs": ENGINE_KWARGS,
        "trunk": trunk, "other": other, "suffix": suffix, "max_tokens": 12}, timeout=900)
    fresh, after = result["fresh"], result["after"]
    assert fresh["trunk"][1] == 0 and fresh["other"][1] == 0
    assert result["held_unchanged"] and None not in result["segments"] and len(set(result["segments"])) == 2
    assert after["trunk"] == [fresh["trunk"][0], 128]  # restored from the lent snapshot's own segment
    assert after["empty"] == [fresh["other"][0], 0]
    assert after["shared"] == [fresh["trunk"][0], 128]  # restored from capture_shared's source
    # the worker's refusal reaches this client (two processes away) as thaw_format's own error, naming the chunk
    assert result["corrupt_error"].startswith("thaw_format.errors.CorruptSnapshotError: ")
    assert "'kv/0/k'" in result["corrupt_error"] and "checksum mismatch" in result["corrupt_error"]
    assert after["after_corrupt"][0] == fresh["trunk"][0] and after["after_corrupt"][1] >= 128  # still served
    # a snapshot loaded with load(path, shared=True) is restored from its own segment: the engine's pages hold its
    # bytes exactly and serve the trunk from the cache; the load of the file corrupted since was refused
    assert result["loaded_is_its_segment"] and result["loaded_kv_identical"]
    assert after["loaded"] == [fresh["trunk"][0], 128]
    # a snapshot loaded into the client's own memory, read by the worker from there in one pass, likewise
    assert result["plain_is_in_memory"] and result["plain_kv_identical"] and result["plain_sent"] == "remote"
    assert after["plain"] == [fresh["trunk"][0], 128]
    # where the worker may not read the client, through the restore segment, with no error, then at once
    assert result["refused_sent"] == result["again_sent"] == "segment"
    assert result["refused_kv_identical"] and result["again_kv_identical"]
    assert after["refused"] == after["again"] == [fresh["trunk"][0], 128]
    # and the worker knows each snapshot by the client's id, not by that of the segment's encoding
    (sent, none, parent), (sent_file, file_id, file_parent) = result["parents"].values()
    assert sent == sent_file == "segment" and none is parent is None and file_parent == file_id is not None
    assert result["corrupt_file_error"].startswith("thaw_format.errors.CorruptSnapshotError: ")
    assert "'kv/0/k'" in result["corrupt_file_error"] and "checksum mismatch in chunk" in result["corrupt_file_error"]
    # a capture borrowed from the engine's own worker counts as checked (not read again); a segment borrowed with
    # verify=False from any other source string does not, and the worker refuses it when corrupt
    assert result["capture_checked"]
    assert result["borrowed_error"].startswith("thaw_format.errors.CorruptSnapshotError: ")
    assert "'kv/0/k'" in result["borrowed_error"] and "checksum mismatch" in result["borrowed_error"]
    # the same file shared-loaded with verify=False: the worker verifies the segment the client did not, and refuses it
    assert result["unverified_error"].startswith("thaw_format.errors.CorruptSnapshotError: ")
    assert "'kv/0/k'" in result["unverified_error"] and "checksum mismatch" in result["unverified_error"]
    assert result["lent_while_open"] and result["lent_after_close"] == []
