"""MLXEngine.restore (a Snapshot in this process, as captured or as thaw_format.load read it from its file) and
restore_source (a reused shared-memory segment, a pool worker's every round) write the KV over the arrays of the
caches they replace: the engine's cache is then byte for byte, capacity included, the cache a fresh restore builds,
for every cache kind, after a longer session too, and it generates what a fresh engine restored from the same
snapshot generates, with the same cached-token count. Memory something else holds (a user's array, a view of one, a
layer object or cache list, a capture) is never written over. A snapshot refused (another model, a layout MLX cannot hold, a request MLX cannot sample, a
damaged chunk of a segment) leaves the engine as it was, its arrays included."""

import dataclasses
import mmap
import os

import mlx.core as mx
import numpy as np
import pytest

import thaw_format
import thaw_mlx
from sessions import full_state
from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError, SnapshotFile
from thaw_format.mlx import from_mlx
from thaw_format.mover import RemoteReadError
from thaw_format.sdk import greedy, lent, remote
from thaw_format.sdk.shared import Segment, open_segment
from thaw_mlx import MLXEngine
from thaw_mlx._internals import paged_buffers
from unreadable import unreadable_page


@pytest.fixture
def segment():
    published = Segment()
    yield published
    published.close()


@pytest.fixture(params=["restore", "restore_loaded", "restore_source"])
def restoring(request, segment, saved):
    """How a test restores a snapshot into an engine: the Snapshot itself, the Snapshot thaw_format.load reads
    back from its file (checked there), or its segment (rewritten each time: the engine's mapping shows it)."""
    if request.param == "restore":
        return lambda engine, snapshot: engine.restore(snapshot)
    if request.param == "restore_loaded":
        return lambda engine, snapshot: engine.restore(thaw_format.load(saved(snapshot)))
    return lambda engine, snapshot: engine.restore_source(segment.publish(snapshot))


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


def arrays_of(engine) -> list:
    return [a for layer in engine_cache(engine) for a in paged_buffers(layer)]


def address(array) -> int:
    """Where the memory of an array lies."""
    return np.frombuffer(from_mlx(array).data, np.uint8).ctypes.data


def addresses(engine) -> set[int]:
    """Where the memory of the engine's paged arrays lies."""
    return {address(a) for a in arrays_of(engine)}


def flip_bit(source: str, tensor: str) -> None:
    name, _, nbytes = source[len("shm://"):].partition("#")
    fd = open_segment(name, os.O_RDWR)
    try:
        with mmap.mmap(fd, int(nbytes)) as mapped:
            mapped[SnapshotFile(mapped).info(tensor)[2].offset + 100] ^= 0x10
    finally:
        os.close(fd)


def assert_untouched(engine, before: list, arrays: list) -> None:
    """The engine holds the same state as before, in the very arrays it held."""
    assert full_state(engine_cache(engine)) == before
    assert all(a is b for a, b in zip(arrays_of(engine), arrays, strict=True))


@pytest.mark.parametrize("name", ["llama-kv", "llama-kv-bf16", "llama-quantized", "llama-rotating", "lfm2-hybrid"])
def test_a_shorter_session_over_a_longer_one_is_the_fresh_restore_byte_for_byte(name, session, restoring):
    model, short, long = sessions_of(name, session)
    engine = MLXEngine(model)
    restoring(engine, long)
    replaced = addresses(engine)
    restoring(engine, short)
    cache = engine_cache(engine)
    fresh = thaw_mlx.restore(model, short)
    assert full_state(cache) == full_state(fresh) and whole_buffers(cache) == whole_buffers(fresh)
    # every paged array's memory was written over (same capacity: both sessions are under mlx-lm's step of 256
    # tokens), none copied first: nothing else held it
    assert addresses(engine) == replaced


@pytest.mark.parametrize("name", ["llama-kv", "llama-quantized"])
def test_an_engine_restored_in_place_generates_as_a_fresh_one(name, session, restoring):
    """Over the arrays of a longer session (and again over its own): the output of a prompt extending the
    snapshot's tokens, and the engine's cached-token count, are those of an engine that never held a cache."""
    model, short, long = sessions_of(name, session)
    prompt = thaw_mlx.snapshot_tokens(short) + [3, 1, 4]
    engine, fresh = MLXEngine(model), MLXEngine(model)
    fresh.restore(short)
    expected = fresh.generate(prompt, greedy(12))
    assert expected.cached_tokens == thaw_mlx.snapshot_num_computed(short)
    restoring(engine, long)
    for _ in range(2):  # over the longer session's arrays, then over its own
        restoring(engine, short)
        got = engine.generate(prompt, greedy(12))
        assert (got.token_ids, got.cached_tokens) == (expected.token_ids, expected.cached_tokens)
        engine.restore(short)  # the generation above left a second session; back to one


def test_each_restore_checks_the_kv_once(session, restoring, monkeypatch):
    """check_snapshot_kv (each layer's pages and tensors) runs once per restore on every path, into an empty
    engine and over its arrays; and once for check."""
    import thaw_mlx.session

    checked, check_layer = [], thaw_mlx.session.check_layer
    monkeypatch.setattr(thaw_mlx.session, "check_layer", lambda i, *rest: (checked.append(i), check_layer(i, *rest))[1])
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    for snapshot in (long, short):
        checked.clear()
        restoring(engine, snapshot)
        assert checked == [0, 1]
    checked.clear()
    engine.check(short)
    assert checked == [0, 1]


def test_a_request_in_flight_restored_in_place_finishes_as_a_fresh_one(session, restoring):
    model, short, long = sessions_of("llama-kv", session)
    source = MLXEngine(model)
    rid = source.submit(thaw_mlx.snapshot_tokens(short), greedy(10))
    for _ in range(4):
        source.step()
    mid_stream = source.capture(include_weights=False)
    fresh = MLXEngine(model)
    fresh.restore(mid_stream)
    engine = MLXEngine(model)
    restoring(engine, long)
    engine.submit(thaw_mlx.snapshot_tokens(long), greedy(30))  # a request in flight of its own, replaced
    engine.step()
    [resumed] = restoring(engine, mid_stream)
    assert resumed.request_id == rid
    done = engine.finish()[rid]
    assert done == fresh.finish()[rid]  # its tokens and cached-token count
    assert done.output_token_ids == source.finish()[rid].output_token_ids


def test_an_array_held_outside_the_engine_is_never_written_over(session, restoring):
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    restoring(engine, long)
    held = engine_cache(engine)[0].keys
    before = from_mlx(held).tobytes()
    restoring(engine, short)
    assert from_mlx(held).tobytes() == before
    assert engine_cache(engine)[0].keys is not held
    assert full_state(engine_cache(engine)) == full_state(thaw_mlx.restore(model, short))


def test_a_restore_moves_only_the_arrays_it_writes_over(session, restoring, monkeypatch):
    """pages.moved_buffers takes one array of the replaced caches for each array the restore writes, no more: here
    the first session's own memory (taken over, no byte copied), while another session's arrays, of the same
    shapes and held by the caller, are let go of, neither copied nor written over: they keep their memory and
    their bytes."""
    import thaw_mlx.engine

    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    restoring(engine, long)
    engine.generate([5, 6, 7] * 10, greedy(4))  # a second session, sharing no prefix with the first
    first, second = engine.sessions
    assert len(first.tokens) > len(second.tokens) > 30
    first_memory = {address(a) for layer in first.cache for a in paged_buffers(layer)}
    held = [a for layer in second.cache for a in paged_buffers(layer)]
    assert {tuple(a.shape) for a in held} == {tuple(a.shape) for layer in first.cache for a in paged_buffers(layer)}
    held_bytes, held_memory = [from_mlx(a).tobytes() for a in held], [address(a) for a in held]
    del first, second
    moved, move = [], thaw_mlx.engine.moved_buffers
    monkeypatch.setattr(thaw_mlx.engine, "moved_buffers", lambda *args: moved.append(move(*args)) or moved[-1])
    restoring(engine, short)
    (taken,) = moved
    assert [len(layer) for layer in taken] == [2] * len(model.layers)  # its K and V, for each layer
    assert {address(array) for layer in taken for array, _ in layer} == first_memory
    assert [from_mlx(a).tobytes() for a in held] == held_bytes and [address(a) for a in held] == held_memory
    assert full_state(engine_cache(engine)) == full_state(thaw_mlx.restore(model, short))


HOLDERS = {
    "its prompt-cache list": lambda engine: engine_cache(engine),
    "a layer object": lambda engine: engine_cache(engine)[0],
    "a slice of an array": lambda engine: engine_cache(engine)[0].keys[..., :10, :],
    "a reshaped array": lambda engine: engine_cache(engine)[1].values.reshape(-1),
}


def _held_bytes(held) -> list[bytes]:
    """The bytes of every array `held` is or holds (a cache layer: the arrays of its state)."""
    if isinstance(held, mx.array):
        return [from_mlx(held).tobytes()]
    if isinstance(held, (list, tuple)):
        return [b for item in held for b in _held_bytes(item)]
    return _held_bytes(held.state) if hasattr(held, "state") else []


@pytest.mark.parametrize("holder", HOLDERS)
def test_what_a_caller_holds_of_the_engines_cache_keeps_its_bytes(holder, session, restoring):
    """Not only a cache's array itself: the list or layer object it is in, or an array sharing its memory (a
    slice, a reshape), held across a restore, keeps its bytes; nothing else holding them, the engine's arrays are
    written over (test_a_shorter_session_over_a_longer_one_is_the_fresh_restore_byte_for_byte)."""
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    restoring(engine, long)
    held = HOLDERS[holder](engine)
    before = _held_bytes(held)
    restoring(engine, short)
    assert _held_bytes(held) == before
    assert full_state(engine_cache(engine)) == full_state(thaw_mlx.restore(model, short))


def test_a_capture_taken_before_keeps_its_bytes_and_restores_the_state_it_took(session, restoring):
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    restoring(engine, long)
    taken = engine.capture(include_weights=False)
    taken_bytes = [bytes(t.data) for layer in taken.kv.layers for t in layer.tensors.values()]
    state = full_state(engine_cache(engine))
    restoring(engine, short)  # over the arrays the capture was taken from
    assert [bytes(t.data) for layer in taken.kv.layers for t in layer.tensors.values()] == taken_bytes
    restoring(engine, taken)
    assert full_state(engine_cache(engine)) == state


class Sender:
    """The owner lent.send keys a restore segment on, as it would an engine in another process."""


def test_a_write_failing_after_the_checks_leaves_the_engine_empty(session):
    """Once every check passed only the KV's bytes themselves can fail: here a snapshot read from a process's
    memory (a remote source, read in place by the scatter), a page in the middle of its last layer's V unreadable,
    so that the read fails after the other layers were written over the engine's arrays. The restore raises that
    error and leaves the engine empty (no session, no request: never a cache half written over): it serves the
    prompt from no cached token, as a fresh engine does, and a view the caller held keeps its bytes. With the page
    readable again the same snapshot restores."""
    model, short, long = sessions_of("llama-kv-long", session)
    engine, fresh = MLXEngine(model), MLXEngine(model)
    engine.restore(short)
    held = engine_cache(engine)[0].keys[..., :10, :]
    kept = from_mlx(held).tobytes()
    sender = Sender()
    source, _ = lent.send(sender, long)
    assert remote.is_remote(source)
    opened = lent.open_snapshot(source, verify=False)
    with unreadable_page(long.kv.layers[-1].tensors["v"].data):
        with pytest.raises(RemoteReadError, match="does not map"):
            engine.restore(opened)
    assert engine.sessions == [] and engine.running == {}
    prompt = thaw_mlx.snapshot_tokens(long) + [3, 1, 4]
    got = engine.generate(prompt, greedy(8))
    assert got == fresh.generate(prompt, greedy(8)) and got.cached_tokens == 0
    assert from_mlx(held).tobytes() == kept
    engine.restore(opened)
    assert full_state(engine_cache(engine)) == full_state(thaw_mlx.restore(model, long))


REFUSALS = {
    "another model": (lambda s, other: other, IncompatibleSnapshotError, "model.architecture"),
    "a layer too few": (lambda s, other: dataclasses.replace(s, kv=dataclasses.replace(s.kv, layers=s.kv.layers[:-1])),
                        IncompatibleSnapshotError, r"kv.layers \(count\)"),
    "pages not of its prefix tree": (lambda s, other: dataclasses.replace(s, scheduler=dataclasses.replace(
        s.scheduler, requests=[dataclasses.replace(s.scheduler.requests[0], pages=[1])])),
        IncompatibleSnapshotError, "not one chain"),
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_refused_snapshot_leaves_the_engine_untouched(refusal, session, model_of, restoring):
    model, short, long = sessions_of("llama-kv", session)
    other_model, other_cache, other_tokens = session("qwen2-kv")
    edit, error, match = REFUSALS[refusal]
    bad = edit(long, thaw_mlx.capture(other_model, other_cache, other_tokens, include_weights=False))
    engine = MLXEngine(model)
    restoring(engine, short)
    before, arrays = full_state(engine_cache(engine)), arrays_of(engine)
    for attempt in (lambda: engine.check(bad), lambda: restoring(engine, bad)):  # check refuses what restore does
        with pytest.raises(error, match=match):
            attempt()
        assert_untouched(engine, before, arrays)


def test_a_damaged_chunk_of_a_segment_is_refused_with_the_engine_untouched(session, segment):
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    engine.restore_source(segment.publish(short))
    before, arrays = full_state(engine_cache(engine)), arrays_of(engine)
    source = segment.publish(long)
    flip_bit(source, "kv/1/v")  # the last paged tensor: every other one passes its check first
    with pytest.raises(CorruptSnapshotError, match=r"tensor 'kv/1/v'.*checksum mismatch in chunk 0"):
        engine.restore_source(source)
    assert_untouched(engine, before, arrays)


def test_a_damaged_segment_borrowed_or_shared_loaded_unverified_is_refused_by_restore(session, tmp_path):
    """MLXEngine.restore is handed the Snapshot itself: one whose segment the client did not check (borrowed or
    shared-loaded with verify=False) is verified first (thaw_format.sdk.lent's trust rule), the engine untouched."""
    from thaw_format.sdk import lent

    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    engine.restore(short)
    before, arrays = full_state(engine_cache(engine)), arrays_of(engine)
    lender = lent.Lender()
    try:
        source = lender.publish(long)
        flip_bit(source, "kv/1/v")
        with pytest.raises(CorruptSnapshotError, match=r"tensor 'kv/1/v'.*checksum mismatch in chunk 0"):
            engine.restore(lent.borrow(source, verify=False))
        assert_untouched(engine, before, arrays)
    finally:
        lender.close()
    path = tmp_path / "long.thaw"
    thaw_format.save(long, path)
    unverified = thaw_format.load(path, shared=True, verify=False)
    flip_bit(lent.lent_source(unverified), "kv/1/v")
    with pytest.raises(CorruptSnapshotError, match=r"tensor 'kv/1/v'.*checksum mismatch in chunk 0"):
        engine.restore(unverified)
    assert_untouched(engine, before, arrays)


def test_a_segment_shorter_than_its_source_says_is_refused_with_the_engine_untouched(session, segment):
    """Mapped past its end, a segment kills the reading process at the first read (SIGBUS): refused first."""
    model, short, _ = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    source = segment.publish(short)
    engine.restore_source(source)
    before, arrays = full_state(engine_cache(engine)), arrays_of(engine)
    name, _, nbytes = source[len("shm://"):].partition("#")
    with pytest.raises(ValueError, match=f"segment {name} holds .* bytes, its source says"):
        engine.restore_source(f"shm://{name}#{int(nbytes) + (1 << 30)}")
    for size in ("many", "\u00b2"):  # not a size; a digit, but not an ASCII one
        with pytest.raises(ValueError, match="not a shared-memory source"):
            engine.restore_source(f"shm://{name}#{size}")
    assert_untouched(engine, before, arrays)


def test_a_request_mlx_cannot_sample_is_refused_with_the_engine_untouched(session, restoring):
    """The sampler is refused before the engine gives up its caches, by check and by either restore alike."""
    model, short, long = sessions_of("llama-kv", session)
    engine = MLXEngine(model)
    restoring(engine, short)
    before, arrays = full_state(engine_cache(engine)), arrays_of(engine)
    [request] = long.scheduler.requests
    sampling = dataclasses.replace(request.sampling, max_tokens=len(request.output_token_ids) + 4,
                                   repetition_penalty=1.3)
    refused = dataclasses.replace(long, scheduler=dataclasses.replace(
        long.scheduler, requests=[dataclasses.replace(request, sampling=sampling)]))
    for attempt in (lambda: engine.check(refused), lambda: restoring(engine, refused)):
        with pytest.raises(ValueError, match="repetition_penalty"):
            attempt()
        assert_untouched(engine, before, arrays)
