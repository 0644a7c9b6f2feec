"""A whole-engine capture of MLXEngine holds every session it served: sessions sharing a trunk and one unrelated
to it become one prefix tree (the trunk's pages once), and an engine restored from it (the Snapshot, the Snapshot
thaw_format.load reads back, the file itself by restore_source, or a shared-memory segment) holds each session's
KV byte for byte, so a prompt extending any of them gets the parent's tokens with the parent's cached-token count.
A damaged chunk leaves the target engine as it was. A model whose layers hold one sequence's state (a sliding
window's ring) keeps one session and warns for the rest (SessionsNotHeld), as does a session laid out otherwise."""

import mmap
import warnings

import pytest

import thaw_format
import thaw_mlx
from sessions import CASES, kv_digest, start
from thaw_conformance.sleep_wake import tokens
from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError, SnapshotFile
from thaw_format.sdk import greedy
from thaw_format.sdk.shared import Segment
from thaw_mlx import MLXEngine, SessionsNotHeld

TRUNK = tokens(70, seed=1)  # two full pages of 32 and a partial one
PROMPTS = [TRUNK + tokens(3, seed=2), TRUNK + tokens(5, seed=3), tokens(40, seed=9)]
TAIL = [3, 1, 4]
PARAMS = greedy(8)


def serve(engine, prompts=PROMPTS):
    for prompt in prompts:
        engine.generate(prompt, PARAMS)
    return engine


def held_kv(model, engine) -> dict:
    """Each session's KV bytes (the format's pages of its cache), by the tokens it holds them for."""
    return {tuple(s.tokens[: thaw_mlx.num_cached_tokens(s.cache)]): kv_digest(model, s.cache, s.tokens)
            for s in engine.sessions}


@pytest.fixture(scope="module")
def parent(model_of):
    """(engine, its capture, each session's KV, what a prompt extending each session gets): captured first."""
    model = model_of("llama-kv")
    engine = serve(MLXEngine(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SessionsNotHeld)
        snapshot = engine.capture(include_weights=False)
    kv = held_kv(model, engine)
    extending = [s.tokens + TAIL for s in engine.sessions] + [TRUNK + TAIL]
    want = [engine.generate(prompt, PARAMS) for prompt in extending]
    return engine, snapshot, kv, list(zip(extending, want))


@pytest.fixture(params=["restore", "restore_loaded", "restore_source_file", "restore_source_segment"])
def restored(request, model_of, saved):
    """A fresh engine restored from the parent's capture, each way an engine reads one."""
    def restore(snapshot):
        engine = MLXEngine(model_of("llama-kv"))
        if request.param == "restore":
            engine.restore(snapshot)
        elif request.param == "restore_loaded":
            engine.restore(thaw_format.load(saved(snapshot)))
        elif request.param == "restore_source_file":
            engine.restore_source(saved(snapshot))
        else:
            segment = Segment()
            try:
                engine.restore_source(segment.publish(snapshot))
            finally:
                segment.close()
        return engine
    return restore


def test_the_capture_is_one_tree_with_the_trunk_once(parent):
    _, snapshot, _, _ = parent
    tree = snapshot.prefix
    trunk_pages = [p for p in range(tree.num_pages) if tree.chain_tokens(p) in (TRUNK[:32], TRUNK[:64])]
    assert len(trunk_pages) == 2  # two full pages, shared by the two sessions on the trunk
    assert len(tree.leaves()) == 3 and tree.parents.count(-1) == 2  # the trunk's root and the other's
    assert snapshot.kv.layers[0].tensors["k"].shape[0] == tree.num_pages
    # the latest session is the snapshot's request (what thaw_mlx.restore reads): finished, nothing to resume
    (request,) = snapshot.scheduler.requests
    assert request.status == "finished" and request.prompt_token_ids[:40] == PROMPTS[2]


def test_every_session_is_restored_byte_for_byte_and_serves_as_on_the_parent(parent, restored, model_of):
    _, snapshot, kv, want = parent
    engine = restored(snapshot)
    assert held_kv(model_of("llama-kv"), engine) == kv
    assert engine.sessions[-1].tokens[:40] == PROMPTS[2]  # the latest, as on the parent: a capture's request
    for prompt, expected in want:
        got = engine.generate(prompt, PARAMS)
        assert (got.token_ids, got.cached_tokens) == (expected.token_ids, expected.cached_tokens)
    cached = [expected.cached_tokens for _, expected in want]
    assert cached == [len(p) - len(TAIL) - 1 for p, _ in want[:3]] + [len(TRUNK)]  # each session's whole KV


def test_a_shared_capture_gathers_every_session_s_pages_straight_into_the_segment(model_of):
    """capture_shared gathers the pages of several sessions into the segment (one run each, their chunk CRCs
    summed once all have moved): a restore_source, every chunk checked, holds each session byte for byte."""
    model = model_of("llama-kv")
    parent = serve(MLXEngine(model))
    child = MLXEngine(model)
    child.restore_source(parent.capture_shared())
    assert held_kv(model, child) == held_kv(model, parent) and len(child.sessions) == 3


def test_a_damaged_chunk_leaves_the_target_engine_as_it_was(parent, model_of, saved):
    _, snapshot, _, _ = parent
    model = model_of("llama-kv")
    target = serve(MLXEngine(model), [tokens(50, seed=11)])
    before = held_kv(model, target)
    path = saved(snapshot)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        mapped[SnapshotFile(mapped).info("kv/1/v")[2].offset + 5000] ^= 0x10  # in a page's V
    with pytest.raises(CorruptSnapshotError, match="kv/1/v"):
        target.restore_source(path)
    with pytest.raises(CorruptSnapshotError):
        thaw_format.load(path)
    assert held_kv(model, target) == before and target.running == {}


def test_a_request_in_flight_is_resumed_beside_every_session(model_of):
    model = model_of("llama-kv")
    engine = serve(MLXEngine(model))
    prompt = TRUNK + tokens(4, seed=4)
    alone = engine.generate(prompt, greedy(12)).token_ids
    rid = engine.submit(prompt, greedy(12))
    for _ in range(4):
        engine.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SessionsNotHeld)
        snapshot = engine.capture(include_weights=False)
    kv = held_kv(model, engine)
    child = MLXEngine(model)
    (resumed,) = child.restore(snapshot)
    assert resumed.request_id == rid and held_kv(model, child) == kv  # the four sessions, the request apart
    assert child.finish()[rid].output_token_ids == alone
    assert thaw_mlx.snapshot_tokens(snapshot)[: len(prompt)] == prompt  # thaw_mlx.restore reads the request


def test_thaw_mlx_restore_reads_the_snapshot_s_one_session(parent, model_of):
    """The functional API keeps its one-sequence meaning: the snapshot's request (the latest session); a KV-only
    snapshot of several branches (no request to name one) is for MLXEngine.restore."""
    engine, snapshot, _, _ = parent
    model = model_of("llama-kv")
    cache = thaw_mlx.restore(model, snapshot)
    tokens_held = thaw_mlx.snapshot_tokens(snapshot)
    assert kv_digest(model, cache, tokens_held) == kv_digest(model, engine.sessions[2].cache, tokens_held)
    kv_only = thaw_format.Snapshot(model=snapshot.model, weights=None, kv=snapshot.kv, prefix=snapshot.prefix)
    with pytest.raises(IncompatibleSnapshotError, match="prefix tree of 3 branches .*MLXEngine.restore"):
        thaw_mlx.restore(model, kv_only)


def test_a_model_with_a_ring_layer_keeps_one_session_and_warns_of_the_tokens_left_out(model_of):
    """A sliding window's ring holds one sequence's state: the latest session is held, and the warning counts
    the KV left out, past the trunk the other session shares with it (its 3 prompt tokens and outputs)."""
    import re

    model = model_of("llama-sliding-mixed")
    engine = serve(MLXEngine(model), PROMPTS[:2])
    with pytest.warns(SessionsNotHeld, match="holds 1 sequences; the KV of 1 other sessions") as warned:
        snapshot = engine.capture(include_weights=False)
    left = int(re.search(r"\((\d+) tokens past", str(warned[0].message)).group(1))
    assert left == len(PROMPTS[0]) + PARAMS.max_tokens - 1 - len(TRUNK)
    child = MLXEngine(model)
    child.restore(snapshot)
    (only,) = child.sessions
    assert only.tokens[: len(PROMPTS[1])] == PROMPTS[1]


def test_quantized_sessions_are_held_together_and_one_laid_out_otherwise_is_warned(model_of):
    """Sessions whose caches are quantized alike share the tree; one of plain KV (a prompt nothing held) is left
    out, with SessionsNotHeld."""
    model = model_of("llama-quantized")
    _, cache, first = start(CASES["llama-quantized"], model)
    engine = MLXEngine(model)
    engine.restore(thaw_mlx.capture(model, cache, first, include_weights=False))
    engine.generate(first + TAIL, PARAMS)  # extends the quantized session: its copy is quantized too
    plain = tokens(40, seed=9)
    engine.generate(plain, PARAMS)  # nothing held: a plain KVCache
    engine.sessions.append(engine.sessions.pop(0))  # a quantized session the latest: the one held first
    with pytest.warns(SessionsNotHeld, match="holds 2 sequences; the KV of 1 other sessions"):
        snapshot = engine.capture(include_weights=False)
    child = MLXEngine(model)
    child.restore(snapshot)
    assert {type(s.cache[0]).__name__ for s in child.sessions} == {"QuantizedKVCache"}
    assert held_kv(model, child) == {k: v for k, v in held_kv(model, engine).items() if list(k[:40]) != plain}


def test_a_session_ending_on_a_page_of_the_request_in_flight_is_restored(model_of):
    """A finished session whose cached tokens end on a page boundary inside the chain of the request in flight has
    no leaf of its own: the capture lists it (a finished request naming its pages), so the restored engine serves
    its prefix with the parent's cached-token count, and holds it as the latest session, as the parent did."""
    model = model_of("llama-kv")
    engine = MLXEngine(model)
    engine.generate(tokens(57, seed=1), PARAMS)
    (session,) = engine.sessions
    assert thaw_mlx.num_cached_tokens(session.cache) == 64  # two full pages, nothing past them
    rid = engine.submit(session.tokens + tokens(5, seed=3), greedy(20))
    for _ in range(3):
        engine.step()
    probe = session.tokens[:64] + TAIL
    want = engine.generate(probe, greedy(2))
    engine.sessions.pop()
    snapshot = engine.capture(include_weights=False)
    child = MLXEngine(model)
    (resumed,) = child.restore(snapshot)
    assert resumed.request_id == rid and [s.tokens for s in child.sessions] == [session.tokens]
    got = child.generate(probe, greedy(2))
    assert (got.token_ids, got.cached_tokens) == (want.token_ids, want.cached_tokens) == (want.token_ids, 64)
    cache = thaw_mlx.restore(model, snapshot)  # the functional API reads the request in flight
    assert thaw_mlx.num_cached_tokens(cache) == snapshot.scheduler.requests[0].num_computed_tokens


@pytest.mark.parametrize("fault, message", [
    ("cycle", r"prefix page 2: parent 4 must be -1 or an earlier page"),
    ("missing parent", r"prefix page 4: parent 99 must be -1 or an earlier page"),
    ("partial page inside a chain", r"prefix page 3: continued by another page, so it must be full \(32 tokens\)"),
])
def test_a_malformed_tree_in_memory_is_refused_by_the_format_s_rules_before_anything_changes(
        parent, model_of, fault, message):
    """The rules a file's reader checks (a page's parent comes before it, only a leaf is partial) are checked of a
    Snapshot in memory too, before the target engine changes: a KV-only tree of the parent's three sessions."""
    import copy

    _, snapshot, _, _ = parent
    tree = copy.deepcopy(snapshot.prefix)
    assert tree.parents == [-1, 0, -1, 2, 3, 3]  # the latest session's 2 pages, the trunk's 2 and 2 branches
    if fault == "cycle":
        tree.parents[2] = 4
    elif fault == "missing parent":
        tree.parents[4] = 99
    else:  # pages of 32, 20 and 20 tokens: the KV of the third would be read as if it followed 32
        tree.tokens[3] = tree.tokens[3][:20]
    bad = thaw_format.Snapshot(model=snapshot.model, weights=None, kv=snapshot.kv, prefix=tree)
    model = model_of("llama-kv")
    target = serve(MLXEngine(model), [tokens(50, seed=11)])
    before = held_kv(model, target)
    for call in (target.check, target.restore):
        with pytest.raises(CorruptSnapshotError, match=message):
            call(bad)
    assert held_kv(model, target) == before


def test_a_capture_of_a_request_submitted_with_nothing_cached_is_refused_without_a_false_warning(model_of):
    """A request submitted, none of its prompt held nor computed: the capture refuses it (ValueError, as before
    every session was held), with no SessionsNotHeld blaming ring or recurrent layers the model does not have."""
    engine = serve(MLXEngine(model_of("llama-kv")), PROMPTS[:1])
    engine.submit(tokens(30, seed=5), PARAMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SessionsNotHeld)
        with pytest.raises(ValueError, match="the cache holds 0 tokens"):
            engine.capture(include_weights=False)
