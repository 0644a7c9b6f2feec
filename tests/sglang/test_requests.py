"""A request captured while it runs is resumed in another engine and ends exactly as it would have."""

import threading
import time

PROMPT = list(range(300, 340))
LONG_GREEDY = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}


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


def test_a_running_request_resumes_in_a_new_engine_where_it_stood(thaw_sglang, family):
    snapshot, uninterrupted = _capture_while_running(thaw_sglang, family.parent, PROMPT, LONG_GREEDY)
    [request] = snapshot.scheduler.requests
    done = request.output_token_ids
    assert request.status == "running" and request.prompt_token_ids == PROMPT
    assert done == uninterrupted[: len(done)] and len(done) < len(uninterrupted)
    # Every token but the last sampled one has KV, held by the request's chain of pages.
    assert request.num_computed_tokens == len(PROMPT) + len(done) - 1
    assert snapshot.prefix.chain_tokens(request.pages[-1]) == (PROMPT + done)[: request.num_computed_tokens]
    assert request.sampling.max_tokens == LONG_GREEDY["max_new_tokens"] and request.sampling.ignore_eos

    target = family.children[2]  # has the parent's weights, so the KV-only snapshot fits it
    thaw_sglang.restore(target, snapshot)
    [resumed] = thaw_sglang.resume(target, snapshot)
    assert resumed["meta_info"]["cached_tokens"] == request.num_computed_tokens
    assert done + resumed["output_ids"] == uninterrupted
    assert target.leak_warnings() == 0 and family.parent.leak_warnings() == 0


def test_a_paused_engine_is_captured_where_its_request_stopped(thaw_sglang, family):
    """pause() holds a running request between two batches: captures agree, and it resumes elsewhere exactly."""
    engine, params = family.parent, dict(LONG_GREEDY, max_new_tokens=16)
    stream = engine.generate(input_ids=PROMPT[::-1], sampling_params=params, stream=True)
    next(stream)  # the request runs: its first token is out
    engine.pause()
    try:
        snapshot = thaw_sglang.capture(engine, include_weights=False)
        time.sleep(0.5)
        assert thaw_sglang.capture(engine, include_weights=False).scheduler == snapshot.scheduler  # nothing ran meanwhile
    finally:
        engine.unpause()
    *_, last = stream  # each chunk holds every output token so far
    [request] = snapshot.scheduler.requests
    assert request.status == "running" and 0 < len(request.output_token_ids) < len(last["output_ids"]) == 16

    target = family.children[2]
    thaw_sglang.restore(target, snapshot)
    [resumed] = thaw_sglang.resume(target, snapshot)
    assert request.output_token_ids + resumed["output_ids"] == last["output_ids"]
    assert target.leak_warnings() == 0 and engine.leak_warnings() == 0
