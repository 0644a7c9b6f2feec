"""Abort on each engine: the contract's `abort` (tests/abort_checks.py), and ChatThaw's use of it. A caller that
leaves a stream early (a sync stream closed, an async task cancelled, its event loop closed under it) has its
request aborted on the engine loop's thread: the engine's own count of requests in flight is 0 at once, it holds
no KV of the reply the request would have gone on to make, and a durable thread saves no half turn."""

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from langchain_core.messages import HumanMessage

import engines as engine_kinds
from abort_checks import A, B, check_abort
from thaw_format.sdk import greedy

STORY = "tell the longest story you know, chapter by chapter, and never stop."
MAX = 120  # the reply's length alone: the reference never stops before it (checked), so only an abort ends it sooner


def test_abort_frees_the_request_and_the_others_get_their_tokens_alone(engine, kind):
    from thaw_langgraph.engine_loop import loop_for

    loop_for(engine).call(lambda e: check_abort(e, lambda: engine_kinds.in_flight(kind.name, e)), idle=True)
    if kind.name == "sglang":
        assert engine.engine.leak_warnings() == 0  # SGLang's own check of its pools once idle


@pytest.fixture
def story(chat, plain):
    """The prompt ids of STORY and the reply the model makes alone: MAX tokens, no stop token before."""
    ids = chat.prompt_ids([HumanMessage(STORY)])
    reply = plain(ids, MAX)
    assert len(reply) == MAX, "the reference stops early: choose another STORY"
    return ids, reply


def _left_early(engine, kind, story) -> None:
    """The engine serves nothing, and holds the KV of at most a few tokens of the reply (a request run to its end
    would leave all of it cached: vLLM's and SGLang's prefix caches, MLX's sessions, transformers' pages)."""
    from thaw_langgraph.engine_loop import loop_for

    ids, reply = story

    def state(e):
        snapshot = e.capture(include_weights=False, chains=[ids + reply])
        held = 0 if snapshot.prefix is None else sum(len(tokens) for tokens in snapshot.prefix.tokens)
        return engine_kinds.in_flight(kind.name, e), held

    busy, held = loop_for(engine).call(state)
    assert busy == 0
    assert held < len(ids) + MAX // 2, f"the engine holds {held} tokens of prompt ({len(ids)}) and reply: it ran on"


def test_a_sync_stream_closed_early_is_aborted(chat, engine, kind, story):
    stream = chat.stream(STORY, max_tokens=MAX)
    assert next(stream).content
    stream.close()  # what leaving a for loop over it does once the generator is dropped
    _left_early(engine, kind, story)


def test_a_cancelled_async_stream_is_aborted(chat, engine, kind, story):
    async def cancelled():
        first = asyncio.Event()

        async def consume():
            async for _ in chat.astream(STORY, max_tokens=MAX):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    _left_early(engine, kind, story)


def test_an_async_stream_whose_event_loop_closed_is_aborted(chat, engine, kind, story):
    """The event loop is closed with the stream still open (never finalized): its next token finds no loop to go
    to, and the engine loop aborts the request there."""
    from thaw_langgraph.engine_loop import loop_for

    loop = asyncio.new_event_loop()
    stream = chat.astream(STORY, max_tokens=MAX)
    assert loop.run_until_complete(anext(stream)).content
    loop.close()
    loop_for(engine).call(lambda e: None, idle=True)  # once the engine loop has let the request go
    _left_early(engine, kind, story)
    asyncio.run(stream.aclose())  # ended here, not by the closed loop's finalizer when it is collected


def test_a_durable_thread_saves_no_half_turn(engine, model_dir, tmp_path):
    from thaw_langgraph import ChatThaw

    store = tmp_path / "threads"
    chat = ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=MAX, thread_store=str(store))
    config = {"configurable": {"thread_id": "half"}}
    stream = chat.stream(STORY, config)
    next(stream)
    stream.close()
    assert not (store / "half.thaw").exists()
    first = chat.invoke(STORY, config, max_tokens=4)
    saved = (store / "half.thaw").read_bytes()
    stream = chat.stream([HumanMessage(STORY), first, HumanMessage("go on.")], config)
    next(stream)
    stream.close()
    assert (store / "half.thaw").read_bytes() == saved  # the thread's last complete turn


# The engine loop when a caller is gone and the engine fails too: the loop and the other callers of the same turn
# go on. Each test holds the loop's thread in a call while it hands the loop what then arrives in one turn.
WAIT = 300  # seconds: far more than any step here; a caller left waiting fails instead of hanging the run


def _hold(loop) -> tuple[threading.Event, threading.Thread]:
    entered, release = threading.Event(), threading.Event()

    def hold(engine):
        entered.set()
        release.wait(WAIT)

    worker = threading.Thread(target=loop.call, args=(hold,))
    worker.start()
    assert entered.wait(WAIT)
    return release, worker


def _gone(exc: BaseException) -> None:
    from thaw_langgraph.engine_loop import ListenerGone

    raise ListenerGone


def _finished(future: Future):
    def listen(progress) -> None:
        if progress.finished:
            future.set_result(progress.token_ids)

    return listen


def _answered(loop, fn):
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(loop.call, fn).result(timeout=WAIT)
    finally:
        pool.shutdown(wait=False)  # a call the loop never answers fails the test instead of hanging it


def test_a_gone_caller_of_a_refused_request_stops_no_other_request(engine):
    from thaw_langgraph.engine_loop import loop_for

    loop = loop_for(engine)
    release, worker = _hold(loop)
    loop.submit(A, None, lambda progress: None, _gone)  # refused (params is not a SamplingParams); caller gone
    other = Future()
    loop.submit(B, greedy(4), _finished(other), other.set_exception)
    release.set()
    worker.join()
    assert len(other.result(timeout=WAIT)) == 4


def test_a_failing_abort_loses_nothing_else_of_its_turn(engine, kind, monkeypatch):
    from thaw_langgraph.engine_loop import loop_for

    loop = loop_for(engine)
    started = threading.Event()
    job = loop.submit(A, greedy(200), lambda progress: started.set(), lambda exc: None)
    assert started.wait(WAIT)
    release, worker = _hold(loop)
    monkeypatch.setattr(engine, "abort", lambda request_id: (_ for _ in ()).throw(RuntimeError("engine gone")))
    loop.cancel(job)
    other = Future()
    loop.submit(B, greedy(4), _finished(other), other.set_exception)
    release.set()
    worker.join()
    assert len(other.result(timeout=WAIT)) == 4
    assert _answered(loop, lambda e: 42) == 42
    monkeypatch.undo()
    _answered(loop, lambda e: (e.abort(job.request_id), e.progress()))  # the request the failed abort left running
    assert _answered(loop, lambda e: engine_kinds.in_flight(kind.name, e)) == 0


def test_a_failing_step_with_a_gone_caller_keeps_the_loop(engine, kind, monkeypatch):
    from thaw_langgraph.engine_loop import loop_for

    loop = loop_for(engine)
    release, worker = _hold(loop)
    failed = threading.Event()
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("step failed")))
    job = loop.submit(A, greedy(4), lambda progress: None, lambda exc: (failed.set(), _gone(exc)))
    release.set()
    worker.join()
    assert failed.wait(WAIT)
    monkeypatch.undo()
    assert _answered(loop, lambda e: 42) == 42  # the loop's thread still runs
    _answered(loop, lambda e: (e.abort(job.request_id), e.progress()))  # submitted before the failing step
    assert _answered(loop, lambda e: engine_kinds.in_flight(kind.name, e)) == 0
