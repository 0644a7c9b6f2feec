"""MLXEngine.restore_source from a reused shared-memory segment (a pool worker's every round): the KV is written
over the arrays of the caches it replaces, and the engine's cache is then byte for byte, capacity included,
the cache a fresh restore builds, for every cache kind, after a longer session too; an array something else
holds is never written over; a damaged chunk, or a segment shorter than its source says, is refused with the
engine untouched, and so is a request MLX cannot sample."""

import dataclasses
import mmap
import os
import weakref

import pytest

import thaw_mlx
from sessions import full_state
from thaw_format import CorruptSnapshotError, SnapshotFile
from thaw_format.mlx import from_mlx
from thaw_format.sdk.shared import Segment, open_segment
from thaw_mlx import MLXEngine
from thaw_mlx._internals import paged_buffers


@pytest.fixture
def segment():
    published = Segment()
    yield published
    published.close()


def sessions_of(name, session):
    """(model, a snapshot of the case's session, one of the same session 20 tokens on)."""
    model, cache, tokens = session(name)
    short = thaw_mlx.capture(model, cache, tokens, include_weights=False)
    tokens = tokens + list(thaw_mlx.generate(model, cache, tokens, 20))
    return model, short, thaw_mlx.capture(model, cache, tokens, include_weights=False)


def whole_buffers(cache) -> list[bytes]:
    """The bytes of every paged array, its capacity past the offset included (a cache's state stops there)."""
    return [from_mlx(a).tobytes() for layer in cache for a in paged_buffers(layer)]


def engine_cache(engine) -> list:
    (only,) = engine.sessions
    return only.cache


def flip_bit(source: str, tensor: str) -> None:
    name, _, nbytes = source[len("shm://"):].partition("#")
    fd = open_segment(name, os.O_RDWR)
    try:
        with mmap.mmap(fd, int(nbytes)) as mapped:
            mapped[SnapshotFile(mapped).info(tensor)[2].offset + 100] ^= 0x10
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["llama-kv", "llama-kv-bf16", "llama-quantized", "llama-rotating", "lfm2-hybrid"])
def test_a_shorter_session_over_a_longer_one_is_the_fresh_restore_byte_for_byte(name, session, segment):
    model, short, long = sessions_of(name, session)
    engine = MLXEngine(model)
    engine.restore_source(segment.publish(long))
    replaced = [weakref.ref(a) for layer in engine_cache(engine) for a in paged_buffers(layer)]
    engine.restore_source(segment.publish(short))  # the same segment, rewritten: the engine's mapping shows it
    cache = engine_cache(engine)
    fresh = thaw_mlx.restore(model, short)
    assert full_state(cache) == full_state(fresh) and whole_buffers(cache) == whole_buffers(fresh)
    now = [a for layer in cache for a in paged_buffers(layer)]
    # every paged array was written over (same capacity: both sessions are under mlx-lm's step of 256 tokens)
    assert len(now) == len(replaced) and all(any(r() is a for r in replaced) for a in now)


def test_an_array_held_outside_the_engine_is_never_written_over(session, segment):
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    engine.restore_source(segment.publish(long))
    held = engine_cache(engine)[0].keys
    before = from_mlx(held).tobytes()
    engine.restore_source(segment.publish(short))
    assert from_mlx(held).tobytes() == before
    assert engine_cache(engine)[0].keys is not held
    assert full_state(engine_cache(engine)) == full_state(thaw_mlx.restore(model, short))


def test_a_damaged_chunk_is_refused_with_the_engine_untouched(session, segment):
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    engine.restore_source(segment.publish(short))
    before = full_state(engine_cache(engine))
    source = segment.publish(long)
    flip_bit(source, "kv/1/v")  # the last paged tensor: every other one passes its check first
    with pytest.raises(CorruptSnapshotError, match=r"tensor 'kv/1/v'.*checksum mismatch in chunk 0"):
        engine.restore_source(source)
    assert full_state(engine_cache(engine)) == before


def test_a_damaged_segment_borrowed_or_shared_loaded_unverified_is_refused_by_restore(session, tmp_path):
    """MLXEngine.restore is handed the Snapshot itself: one whose segment the client did not check (borrowed or
    shared-loaded with verify=False) is verified first (thaw_format.sdk.lent's trust rule), the engine untouched."""
    import thaw_format
    from thaw_format.sdk import lent

    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    engine.restore(short)
    before = full_state(engine_cache(engine))
    lender = lent.Lender()
    try:
        source = lender.publish(long)
        flip_bit(source, "kv/1/v")
        with pytest.raises(CorruptSnapshotError, match=r"tensor 'kv/1/v'.*checksum mismatch in chunk 0"):
            engine.restore(lent.borrow(source, verify=False))
        assert full_state(engine_cache(engine)) == before
    finally:
        lender.close()
    path = tmp_path / "long.thaw"
    thaw_format.save(long, path)
    unverified = thaw_format.load(path, shared=True, verify=False)
    flip_bit(lent.lent_source(unverified), "kv/1/v")
    with pytest.raises(CorruptSnapshotError, match=r"tensor 'kv/1/v'.*checksum mismatch in chunk 0"):
        engine.restore(unverified)
    assert full_state(engine_cache(engine)) == before


def test_a_segment_shorter_than_its_source_says_is_refused_with_the_engine_untouched(session, segment):
    """Mapped past its end, a segment kills the reading process at the first read (SIGBUS): refused first."""
    model, short, _ = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    source = segment.publish(short)
    engine.restore_source(source)
    before = full_state(engine_cache(engine))
    name, _, nbytes = source[len("shm://"):].partition("#")
    with pytest.raises(ValueError, match=f"segment {name} holds .* bytes, its source says"):
        engine.restore_source(f"shm://{name}#{int(nbytes) + (1 << 30)}")
    with pytest.raises(ValueError, match="not a shared-memory segment source"):
        engine.restore_source(f"shm://{name}#many")
    assert full_state(engine_cache(engine)) == before


def test_a_request_mlx_cannot_sample_is_refused_with_the_engine_untouched(session, segment):
    """The sampler is refused before the engine gives up its caches, by check and by restore_source alike."""
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    engine.restore_source(segment.publish(short))
    before = full_state(engine_cache(engine))
    [request] = long.scheduler.requests
    sampling = dataclasses.replace(request.sampling, max_tokens=len(request.output_token_ids) + 4,
                                   repetition_penalty=1.3)
    refused = dataclasses.replace(long, scheduler=dataclasses.replace(
        long.scheduler, requests=[dataclasses.replace(request, sampling=sampling)]))
    source = segment.publish(refused)
    for attempt in (lambda: engine.check(refused), lambda: engine.restore_source(source)):
        with pytest.raises(ValueError, match="repetition_penalty"):
            attempt()
        assert full_state(engine_cache(engine)) == before
