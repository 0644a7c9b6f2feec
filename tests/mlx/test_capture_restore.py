"""Capture and restore in one process: the KV and weights come back byte for byte and generation carries on
exactly; corrupted KV under the same tokens does not (the control that proves the restored bytes are read)."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import thaw_format
import thaw_mlx
from sessions import CASES, FIRST_TOKENS, LAYER_KINDS, kv_digest, make_cache
from thaw_format import IncompatibleSnapshotError, SchedulerState, Tensor
from thaw_format.mlx import from_mlx
from zoo import PROMPT


def valid_state(cache) -> list[bytes]:
    """The bytes mlx-lm reads: tokens 0..offset-1 of plain and quantized caches, whole rings and states."""
    arrays = []
    for c in cache:
        if type(c).__name__ == "ArraysCache":
            arrays += c.state[0]
            continue
        keys, values = c.state[:2]
        parts = [*keys, *values] if isinstance(keys, (tuple, list)) else [keys, values]
        limit = c.offset if type(c).__name__ != "RotatingKVCache" else None
        arrays += [p[..., :limit, :] for p in parts]
    return [from_mlx(a).tobytes() for a in arrays]


@pytest.mark.parametrize("name", list(CASES))
def test_restore_is_byte_identical_and_continues_exactly(name, session, saved):
    model, cache, tokens = session(name)
    case = CASES[name]
    snapshot = thaw_format.load(saved(thaw_mlx.capture(model, cache, tokens, num_prompt_tokens=len(case.prompt))))
    restored = thaw_mlx.restore(model, snapshot)
    assert tuple(layer.kind for layer in snapshot.kv.layers) == (case.kinds or (LAYER_KINDS[case.cache],) * 2)
    assert [type(c) for c in restored] == [type(c) for c in cache]
    assert thaw_mlx.num_cached_tokens(restored) == thaw_mlx.num_cached_tokens(cache) == len(tokens) - 1
    assert valid_state(restored) == valid_state(cache)
    assert thaw_mlx.snapshot_tokens(snapshot) == tokens
    assert snapshot.scheduler.requests[0].output_token_ids == tokens[len(case.prompt):]

    expected = list(thaw_mlx.generate(model, cache, tokens, 12))
    assert list(thaw_mlx.generate(model, restored, tokens, 12)) == expected
    assert kv_digest(model, restored, tokens + expected) == kv_digest(model, cache, tokens + expected)


def test_kv_is_stored_as_token_major_pages(session):
    model, cache, tokens = session("llama-kv")
    kv = thaw_mlx.capture(model, cache, tokens).kv
    offset = len(tokens) - 1  # 44 tokens: one full page of 32, one of 12 padded with zeros
    assert kv.page_size == 32 and kv.dtype == "float32"
    for layer, c in zip(kv.layers, cache):
        assert layer.kind == "attention" and layer.tensors["k"].shape == (2, 32, 2, 16)
        pages = np.frombuffer(layer.tensors["k"].data, np.float32).reshape(64, 2, 16)
        native = np.array(c.keys)[0, :, :offset, :].transpose(1, 0, 2)
        assert pages[:offset].tobytes() == native.tobytes() and not pages[offset:].any()


def test_weights_come_back_byte_identical(session, saved):
    model, cache, tokens = session("llama-kv-bf16")
    snapshot = thaw_format.load(saved(thaw_mlx.capture(model, cache, tokens)))
    assert snapshot.weights.tensors == thaw_mlx.model_weights(model)
    rebuilt = thaw_mlx.load_model(snapshot)
    assert thaw_mlx.model_weights(rebuilt) == thaw_mlx.model_weights(model)
    assert thaw_mlx.model_info(rebuilt) == snapshot.model


def test_prefix_tree_is_one_chain_of_the_computed_tokens(session):
    model, cache, tokens = session("llama-kv")
    snapshot = thaw_mlx.capture(model, cache, tokens)
    assert snapshot.prefix.parents == [-1, 0]
    assert snapshot.prefix.chain_tokens(1) == tokens[:-1]
    assert snapshot.scheduler.requests[0].num_computed_tokens == len(tokens) - 1


@pytest.mark.parametrize("name", ["llama-kv", "llama-quantized"])
def test_capture_after_generate_step_resumes_exactly(name, model_of):
    """mlx-lm's generate_step runs one token ahead; thaw_mlx.generate trims that token and computes it again."""
    model, kind = model_of(name), CASES[name].cache
    uninterrupted = generate_step(mx.array(PROMPT), model, prompt_cache=make_cache(model, kind), max_tokens=18)
    expected = [token for token, _ in uninterrupted]

    cache = make_cache(model, kind)
    steps = generate_step(mx.array(PROMPT), model, prompt_cache=cache, max_tokens=18)
    tokens = PROMPT + [token for token, _ in itertools.islice(steps, FIRST_TOKENS)]
    assert cache[0].offset == len(tokens)  # one ahead
    restored = thaw_mlx.restore(model, thaw_mlx.capture(model, cache, tokens))
    assert tokens[len(PROMPT):] + list(thaw_mlx.generate(model, restored, tokens, 10)) == expected


@pytest.mark.parametrize("name", ["llama-kv", "llama-rotating", "llama-quantized"])
def test_corrupted_kv_under_the_same_tokens_changes_the_output(name, session):
    model, cache, tokens = session(name)
    snapshot = thaw_mlx.capture(model, cache, tokens)
    expected = list(thaw_mlx.generate(model, thaw_mlx.restore(model, snapshot), tokens, 12))
    rng = np.random.default_rng(1)
    for layer in snapshot.kv.layers:
        for role in ("k", "v"):
            t = layer.tensors[role]
            noise = rng.integers(0, 256, t.nbytes, dtype=np.uint8) if t.dtype == "uint32" else \
                rng.standard_normal(t.nbytes // 4).astype(np.float32).view(np.uint8)
            layer.tensors[role] = Tensor(t.dtype, t.shape, noise.tobytes())
    assert list(thaw_mlx.generate(model, thaw_mlx.restore(model, snapshot), tokens, 12)) != expected


def test_generate_step_past_the_window_cannot_be_resumed_exactly(model_of):
    """One ahead past its window, a ring has already overwritten what a re-computation would need: refused."""
    model = model_of("llama-rotating")
    cache = make_cache(model, "rotating")
    steps = generate_step(mx.array(PROMPT), model, prompt_cache=cache, max_tokens=18)
    tokens = PROMPT + [token for token, _ in itertools.islice(steps, FIRST_TOKENS)]
    restored = thaw_mlx.restore(model, thaw_mlx.capture(model, cache, tokens))
    with pytest.raises(ValueError, match="cannot drop it"):
        next(thaw_mlx.generate(model, restored, tokens, 1))


def test_the_session_pages_are_gathered_from_a_larger_tree(session):
    """A snapshot whose tree holds other branches (as an engine with many requests writes): the session's own
    pages are found through its page list, not by position."""
    model, cache, tokens = session("llama-kv")
    snapshot = thaw_mlx.capture(model, cache, tokens)
    expected = list(thaw_mlx.generate(model, thaw_mlx.restore(model, snapshot), tokens, 12))
    for layer in snapshot.kv.layers:
        for role, t in layer.tensors.items():  # a foreign page of ones first: the session's pages become 1 and 2
            page = t.nbytes // t.shape[0]
            layer.tensors[role] = Tensor(t.dtype, (t.shape[0] + 1, *t.shape[1:]),
                                         np.ones(page // 4, np.float32).tobytes() + t.tobytes())
    snapshot.prefix.parents = [-1, -1, 1]
    snapshot.prefix.tokens = [[9] * 32] + snapshot.prefix.tokens
    snapshot.scheduler.requests[0].pages = [1, 2]
    restored = thaw_mlx.restore(model, snapshot)
    assert valid_state(restored) == valid_state(cache)
    assert list(thaw_mlx.generate(model, restored, tokens, 12)) == expected


@pytest.mark.parametrize("page_size", [1, 7, 64])
def test_any_page_size(page_size, session):
    model, cache, tokens = session("llama-quantized")
    snapshot = thaw_format.loads(thaw_format.dumps(thaw_mlx.capture(model, cache, tokens, page_size=page_size)))
    assert snapshot.kv.num_pages == -(-(len(tokens) - 1) // page_size)
    restored = thaw_mlx.restore(model, snapshot)
    assert valid_state(restored) == valid_state(cache)
    assert list(thaw_mlx.generate(model, restored, tokens, 8)) == list(thaw_mlx.generate(model, cache, tokens, 8))


def test_a_prefix_cache_without_requests_restores_as_its_one_chain(session):
    """As vLLM and SGLang write an idle engine: no requests, a prefix tree of computed tokens."""
    model, cache, tokens = session("llama-kv")
    snapshot = thaw_mlx.capture(model, cache, tokens)
    expected = list(thaw_mlx.generate(model, thaw_mlx.restore(model, snapshot), tokens, 12))
    snapshot.scheduler = SchedulerState([])
    restored = thaw_mlx.restore(model, snapshot)
    assert thaw_mlx.snapshot_tokens(snapshot) == tokens[:-1] == snapshot.prefix.chain_tokens(1)
    assert thaw_mlx.num_cached_tokens(restored) == len(tokens) - 1
    assert list(thaw_mlx.generate(model, restored, tokens, 12)) == expected

    snapshot.prefix.parents.append(0)  # a second branch: which one is the session is not for thaw_mlx to guess
    snapshot.prefix.tokens.append([1, 2, 3])
    with pytest.raises(IncompatibleSnapshotError, match="prefix tree of 2 branches"):
        thaw_mlx.restore(model, snapshot)


def test_a_finished_session_is_recorded_as_finished_and_still_restores(session):
    model, cache, tokens = session("llama-kv")
    snapshot = thaw_mlx.capture(model, cache, tokens, include_weights=False, finished=True)
    (request,) = snapshot.scheduler.requests
    assert request.status == "finished" and request.num_computed_tokens == len(tokens) - 1
    restored = thaw_mlx.restore(model, snapshot)
    assert valid_state(restored) == valid_state(cache)
    assert thaw_mlx.capture(model, cache, tokens, include_weights=False).scheduler.requests[0].status == "running"
