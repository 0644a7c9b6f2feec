"""A request captured while it runs is resumed in another engine and ends exactly as it would have."""

import threading
import time

import pytest

PROMPT = list(range(300, 340))
LONG_GREEDY = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}


@pytest.fixture
def target(thaw_sglang, family):
    """A fork of the family (it has the parent's weights, so a KV-only snapshot fits it), handed back holding
    the family's snapshot again: test_fork checks each fork's cache as the fork left it, in whatever order the
    files run."""
    yield family.children[2]
    thaw_sglang.restore(family.children[2], family.snapshot)


def _capture_while_running(thaw_sglang, engine, prompt, params):
    """Capture again and again while a request runs, until one capture lands between two of its decode steps."""
    finished = {}
    worker = threading.Thread(target=lambda: finished.update(engine.generate(input_ids=prompt, sampling_params=params)))
    worker.start()
    snapshot = None
    try:
        while snapshot is None and worker.is_alive():
            candidate = thaw_sglang.capture(engine, include_weights=False)
            if any(r.status == "running" and r.output_token_ids for r in candidate.scheduler.requests):
                snapshot = candidate
    finally:
        worker.join()
    assert snapshot is not None, "the request finished before any capture saw it running"
    return snapshot, finished["output_ids"]


def test_a_running_request_resumes_in_a_new_engine_where_it_stood(thaw_sglang, family, target):
    snapshot, uninterrupted = _capture_while_running(thaw_sglang, family.parent, PROMPT, LONG_GREEDY)
    [request] = snapshot.scheduler.requests
    done = request.output_token_ids
    assert request.status == "running" and request.prompt_token_ids == PROMPT
    assert done == uninterrupted[: len(done)] and len(done) < len(uninterrupted)
    # Every token but the last sampled one has KV, held by the request's chain of pages.
    assert request.num_computed_tokens == len(PROMPT) + len(done) - 1
    assert snapshot.prefix.chain_tokens(request.pages[-1]) == (PROMPT + done)[: request.num_computed_tokens]
    assert request.sampling.max_tokens == LONG_GREEDY["max_new_tokens"] and request.sampling.ignore_eos

    thaw_sglang.restore(target, snapshot)
    [resumed] = thaw_sglang.resume(target, snapshot)
    assert resumed["meta_info"]["cached_tokens"] == request.num_computed_tokens
    assert done + resumed["output_ids"] == uninterrupted
    assert target.leak_warnings() == 0 and family.parent.leak_warnings() == 0


def test_a_stepped_request_is_captured_where_it_stopped_however_slow_the_client(thaw_sglang, family, target):
    """run_batches holds a request exactly where the steps left it, even right after its prefill, while the
    client dawdles (a slow machine): the engine pauses itself, so nothing runs on before a capture."""
    engine, params = family.parent, dict(LONG_GREEDY, max_new_tokens=16)
    engine.run_batches(1)  # the prefill only
    stream = engine.generate(input_ids=PROMPT[::-1], sampling_params=params, stream=True)
    try:
        snapshots = []
        for step in range(1, 5):
            if step > 1:
                engine.run_batches(1)  # one decode step
            assert len(next(stream)["output_ids"]) == step
            time.sleep(0.3)  # a client slower than the engine: an unpaused engine would run on meanwhile
            snapshots.append(thaw_sglang.capture(engine, include_weights=False))
            assert thaw_sglang.capture(engine, include_weights=False).scheduler == snapshots[-1].scheduler  # nothing ran
    finally:
        engine.unpause()
    *_, last = stream  # each chunk holds every output token so far
    assert len(last["output_ids"]) == 16
    for step, snapshot in enumerate(snapshots, 1):
        [request] = snapshot.scheduler.requests  # right after the prefill too (SGLang has not merged it yet)
        assert request.status == "running" and request.output_token_ids == last["output_ids"][:step]

    for snapshot in (snapshots[0], snapshots[-1]):
        thaw_sglang.restore(target, snapshot)
        [resumed] = thaw_sglang.resume(target, snapshot)
        assert snapshot.scheduler.requests[0].output_token_ids + resumed["output_ids"] == last["output_ids"]
    assert target.leak_warnings() == 0 and engine.leak_warnings() == 0
