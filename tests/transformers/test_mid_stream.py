"""Requests captured in flight finish in a fresh engine with the parent's tokens (greedy and seeded), and
in-process fork children share the parent's pages and continue as the parent does."""

import pytest

import thaw_format
from thaw_format.sdk import greedy, seeded
from conftest import PROMPT


@pytest.mark.parametrize("params", [greedy(12), seeded(7, 12)], ids=["greedy", "seeded"])
def test_mid_stream_resume(params, engine, saved):
    parent = engine("llama")
    rid = parent.submit(PROMPT[::-1][:40], params)
    for _ in range(5):
        assert parent.step() == {}
    path = saved(parent.capture())
    want = parent.finish()[rid]
    child = engine("llama")
    resumed = child.restore(thaw_format.load(path))
    assert [(r.request_id, len(r.previous_output_token_ids)) for r in resumed] == [(rid, 5)]
    got = child.finish(resumed)[rid]
    assert got.output_token_ids == want.output_token_ids and len(set(got.output_token_ids)) > 3
    assert got.cached_tokens == 44  # 40 prompt tokens and 4 outputs from the pages; the 5th output is fed


def test_step_finishes_requests(engine):
    e = engine("llama")
    a, b = e.submit(PROMPT[:10], greedy(2)), e.submit(PROMPT[:20], greedy(3))
    assert e.step() == {} and list(e.step()) == [a] and list(e.step()) == [b] and not e.requests


def test_fork_children_share_pages_and_continue(engine):
    parent = engine("llama")
    first = parent.generate(PROMPT, greedy(6))
    context = PROMPT + first.token_ids
    want = [parent.generate(context, seeded(100 + i, 8)).token_ids for i in range(2)]
    children = parent.fork(2, context=context)
    for page in range(len(parent.cache.pages)):  # the same tensors: no KV bytes moved
        assert all(c.cache.pages[page].block is parent.cache.pages[page].block for c in children)
    got = [child.generate(context, seeded(100 + i, 8)) for i, child in enumerate(children)]
    assert [g.token_ids for g in got] == want and want[0] != want[1]
    assert all(g.cached_tokens == len(context) - 1 for g in got)


def test_fork_into_processes(fresh_engine):
    """Children in other processes (thaw_format.sdk.fork from this engine's launch_spec) restore the context's
    pages and continue as the parent does, with the parent's cache hit."""
    parent = fresh_engine("llama")
    first = parent.generate(PROMPT, greedy(6))
    context = PROMPT + first.token_ids
    want = [parent.generate(context, seeded(100 + i, 8)) for i in range(2)]
    children = parent.fork(2, context=context, processes=True)
    try:
        got = [child.generate(context, seeded(100 + i, 8)) for i, child in enumerate(children)]
    finally:
        for child in children:
            child.close()
    assert [(g.token_ids, g.cached_tokens, g.logprobs) for g in got] == \
        [(w.token_ids, w.cached_tokens, w.logprobs) for w in want]


def test_fork_computes_a_missing_context(engine):
    parent = engine("llama")
    [child] = parent.fork(1, context=PROMPT)
    assert child.generate(PROMPT + [9], greedy(4)).cached_tokens == len(PROMPT)
