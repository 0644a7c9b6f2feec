"""The KV's way between the client and SGLang's scheduler (thaw_sglang.transport), on the shared `llama` engine,
which test_abort shares (the captures here name PROMPT's chain, whatever else its cache holds): a capture is lent
(the client's Snapshot views the segment the scheduler gathered into) with the same bytes as a capture written to a
file; restoring it hands that segment back; a corrupt chunk is refused before anything changes. SGLang's pool-leak
check must not fire during any test (no_new_leaks)."""

import mmap
import os

import pytest
from conftest import generate
from thaw_format import CorruptSnapshotError, SnapshotFile
from thaw_format.sdk import lent

PROMPT = list(range(300, 420))  # 120 tokens: three full pages and a short one
SUFFIX = [31, 32, 33]
pytestmark = pytest.mark.usefixtures("no_new_leaks")


@pytest.fixture(scope="module")
def engine(llama):
    generate(llama, PROMPT)
    return llama


@pytest.fixture(scope="module")
def reference(engine):
    """The engine's continuation of PROMPT + SUFFIX with PROMPT cached, before any restore."""
    return generate(engine, PROMPT + SUFFIX)


def _state(thaw_sglang, engine):
    snapshot = thaw_sglang.capture(engine, include_weights=False)
    return snapshot.prefix, [bytes(t.data) for layer in snapshot.kv.layers for t in layer.tensors.values()]


def _flip_bit(source: str, tensor: str = "kv/0/k") -> None:
    from _posixshmem import shm_open

    name, nbytes = lent.parse(source)
    fd = shm_open("/" + name, os.O_RDWR, mode=0)
    try:
        with mmap.mmap(fd, nbytes) as mapping:
            region = SnapshotFile(mapping).info(tensor)[2]
            mapping[region.offset + 1000] ^= 0x40
    finally:
        os.close(fd)


def _restores_exactly(thaw_sglang, engine, reference, snapshot) -> None:
    """Restored into the flushed engine, `snapshot` serves PROMPT from the cache and its pages hold its bytes."""
    assert engine.flush_cache().success
    thaw_sglang.restore(engine, snapshot)
    assert generate(engine, PROMPT + SUFFIX) == reference
    restored = thaw_sglang.capture(engine, include_weights=False, chains=[PROMPT])
    assert restored.prefix == snapshot.prefix
    assert [bytes(t.data) for layer in restored.kv.layers for t in layer.tensors.values()] == [
        bytes(t.data) for layer in snapshot.kv.layers for t in layer.tensors.values()]


def test_a_lent_capture_holds_the_bytes_of_a_file_capture_and_restores_through_its_own_segment(
        thaw_sglang, engine, reference, tmp_path):
    lent_snapshot = thaw_sglang.capture(engine, include_weights=False, chains=[PROMPT])
    source = lent.lent_source(lent_snapshot)
    assert source is not None  # restoring it hands the scheduler's segment back
    assert lent.send(engine, lent_snapshot) == (source, True)  # its own engine's capture: not read again
    lent.open_snapshot(source, verify=True)  # the chunk checksums the scheduler's gather computed hold
    saved = thaw_sglang.capture(engine, tmp_path / "kv.thaw", include_weights=False, chains=[PROMPT])
    assert lent_snapshot.prefix == saved.prefix
    assert [bytes(t.data) for layer in lent_snapshot.kv.layers for t in layer.tensors.values()] == [
        bytes(t.data) for layer in saved.kv.layers for t in layer.tensors.values()]

    assert engine.flush_cache().success
    thaw_sglang.restore(engine, lent_snapshot)
    assert generate(engine, PROMPT + SUFFIX) == reference


def test_a_corrupt_chunk_is_refused_before_anything_changes(thaw_sglang, engine, reference):
    from thaw_sglang.thaw_engine import capture_shared

    generate(engine, PROMPT)
    source = capture_shared(engine, chains=[PROMPT])
    _flip_bit(source)
    before = _state(thaw_sglang, engine)
    with pytest.raises(CorruptSnapshotError):
        thaw_sglang.restore(engine, source)
    assert _state(thaw_sglang, engine) == before
    output, cached = generate(engine, PROMPT + SUFFIX)  # the tree holds PROMPT + SUFFIX from the test before
    assert output == reference[0] and cached >= len(PROMPT)


def test_a_snapshot_loaded_into_shared_memory_restores_from_its_own_segment(thaw_sglang, engine, reference, tmp_path):
    """thaw_format.load(path, shared=True) reads the file, verified, into a segment of its own; the restore hands
    that segment to the scheduler (no copy in the client), which writes the same bytes. The file corrupted and
    deleted after the load changes nothing; a load of the corrupted file is refused."""
    import thaw_format

    path = tmp_path / "kv.thaw"
    thaw_sglang.capture(engine, path, include_weights=False, chains=[PROMPT])
    loaded = thaw_format.load(path, shared=True)
    assert lent.lent_source(loaded) is not None
    with SnapshotFile(str(path)) as f:
        offset = f.info("kv/0/k")[2].offset
    data = bytearray(path.read_bytes())
    data[offset + 1000] ^= 0x40
    path.write_bytes(data)
    with pytest.raises(CorruptSnapshotError, match=r"tensor 'kv/0/k' .*checksum mismatch in chunk"):
        thaw_format.load(path, shared=True)
    path.unlink()

    _restores_exactly(thaw_sglang, engine, reference, loaded)


def test_a_snapshot_in_this_process_memory_restores_its_bytes_and_a_named_segment_is_still_verified(
        thaw_sglang, engine, reference, tmp_path):
    """A snapshot loaded into the client's own memory (thaw_format.load, no shared memory) is read by the
    scheduler straight from the client's memory and scattered in the same pass (thaw_format.sdk.remote): the
    engine's pages hold its bytes exactly and serve PROMPT from the cache. An engine refused such reads
    (remote.refuse, what lent.sending does when the scheduler reports a refusal: tests/format/test_remote_source
    and tests/vllm/test_lent_kv make the system refuse for real) gets it through its reused restore segment,
    written with its checksums by the restore itself, which the scheduler scatters without checking again. The
    same segment named by a source string (as a user would pass it) is verified: one flipped bit is refused
    before anything changes."""
    import thaw_format
    from thaw_format.sdk import remote

    path = tmp_path / "kv.thaw"
    thaw_sglang.capture(engine, path, include_weights=False, chains=[PROMPT])
    loaded = thaw_format.load(path)
    assert lent.lent_source(loaded) is None  # this process's own memory: no segment to hand back

    _restores_exactly(thaw_sglang, engine, reference, loaded)
    assert lent.last_sent(engine) == "remote"
    # the scheduler knows the client's snapshot by its id (not one counted over the KV it read from the client)
    assert thaw_sglang.capture(engine, include_weights=False).lineage.parent == loaded.id is not None
    remote.refuse(engine)
    _restores_exactly(thaw_sglang, engine, reference, loaded)
    assert lent.last_sent(engine) == "segment"
    source, checked = lent.send(engine, loaded)  # the restore segment, written again
    assert checked and source.startswith("shm://") and not lent.is_lent(source)
    _flip_bit(source)
    before = _state(thaw_sglang, engine)
    with pytest.raises(CorruptSnapshotError, match=r"kv/0/k"):
        thaw_sglang.restore(engine, source)
    assert _state(thaw_sglang, engine) == before


@pytest.mark.parametrize("chunk_size", [None, 1 << 16], ids=["never saved", "saved in 64 KiB chunks"])
def test_through_the_restore_segment_the_scheduler_knows_the_snapshot_by_the_clients_id(
        thaw_sglang, engine, reference, tmp_path, chunk_size):
    """Where the scheduler may not read the client (remote.refuse), the restore segment holds the snapshot encoded
    again, under an id of its own; the scheduler still records the client's snapshot's id as the lineage parent of
    its later captures: none for a snapshot never saved, the file's for one saved in other chunks than the
    segment's."""
    import dataclasses

    import thaw_format
    from thaw_format.sdk import remote

    generate(engine, PROMPT)
    captured = thaw_sglang.capture(engine, include_weights=False, chains=[PROMPT])
    snapshot = dataclasses.replace(captured, id=None)  # made in this process from a capture's parts: no id
    if chunk_size is not None:
        thaw_format.save(captured, tmp_path / "kv.thaw", chunk_size=chunk_size)
        snapshot = thaw_format.load(tmp_path / "kv.thaw")
    assert (snapshot.id is None) == (chunk_size is None)
    remote.refuse(engine)
    _restores_exactly(thaw_sglang, engine, reference, snapshot)
    assert lent.last_sent(engine) == "segment"
    assert thaw_sglang.capture(engine, include_weights=False).lineage.parent == snapshot.id


def test_a_segment_the_client_verified_is_trusted_and_every_other_is_verified(thaw_sglang, engine, reference,
                                                                              tmp_path):
    """The trust rule (thaw_format.sdk.lent): bytes are verified where they enter the user's trust domain, not
    again in the client's own engine. A shared load verified its file, so the scheduler restores its segment
    without reading it twice: a bit flipped in the segment after the load (by a process of the same user, inside
    the domain) reaches the engine's pages as it is. The same segment named by a source string is verified and
    refused, and so is a corrupt file shared-loaded with verify=False (the client checked nothing): both before
    anything changes."""
    import thaw_format

    path = tmp_path / "kv.thaw"
    thaw_sglang.capture(engine, path, include_weights=False, chains=[PROMPT])
    clean = [bytes(t.data) for layer in thaw_format.load(path).kv.layers for t in layer.tensors.values()]
    loaded = thaw_format.load(path, shared=True)
    source = lent.lent_source(loaded)
    _flip_bit(source)
    assert lent.lent_source(loaded) == source and lent.send(engine, loaded) == (source, True)
    flipped = [bytes(t.data) for layer in loaded.kv.layers for t in layer.tensors.values()]
    assert flipped != clean

    before = _state(thaw_sglang, engine)
    with pytest.raises(CorruptSnapshotError, match=r"kv/0/k"):
        thaw_sglang.restore(engine, source)
    assert _state(thaw_sglang, engine) == before

    assert engine.flush_cache().success
    thaw_sglang.restore(engine, loaded)
    restored = thaw_sglang.capture(engine, include_weights=False, chains=[PROMPT])
    assert [bytes(t.data) for layer in restored.kv.layers for t in layer.tensors.values()] == flipped

    with SnapshotFile(str(path)) as f:
        offset = f.info("kv/0/k")[2].offset
    data = bytearray(path.read_bytes())
    data[offset + 1000] ^= 0x40
    path.write_bytes(data)
    unverified = thaw_format.load(path, shared=True, verify=False)
    assert lent.send(engine, unverified)[1] is False
    before = _state(thaw_sglang, engine)
    with pytest.raises(CorruptSnapshotError, match=r"kv/0/k"):
        thaw_sglang.restore(engine, unverified)
    assert _state(thaw_sglang, engine) == before


def test_a_corrupt_segment_borrowed_without_verifying_is_refused_by_the_restore(thaw_sglang, engine, tmp_path):
    """borrow(source, verify=False) of a lent segment the client did not check (any source string, not its own
    engine's capture): the scheduler verifies it and refuses the corrupt chunk before anything changes, and
    verified=True cannot vouch for a Snapshot."""
    import thaw_format
    from thaw_sglang.thaw_engine import restore_pending

    path = tmp_path / "kv.thaw"
    thaw_sglang.capture(engine, path, include_weights=False, chains=[PROMPT])
    lender = lent.Lender()
    try:
        source = lender.publish(thaw_format.load(path))
        _flip_bit(source)
        borrowed = lent.borrow(source, verify=False)
        before = _state(thaw_sglang, engine)
        with pytest.raises(CorruptSnapshotError, match=r"kv/0/k"):
            thaw_sglang.restore(engine, borrowed)
        with pytest.raises(ValueError, match="verified=True is for a shared-memory source"):
            restore_pending(engine, borrowed, verified=True)
        assert _state(thaw_sglang, engine) == before
    finally:
        lender.close()
