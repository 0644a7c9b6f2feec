"""The contract's `abort` (part of "streaming"), written once for every engine: tests/langgraph/test_abort.py runs
it on each engine's session engine, tests/vllm/test_abort.py on vLLM in this process, where the block pool can
be read.

Four requests: A runs a few steps and is aborted; B runs to its end beside it; C is aborted once B has started;
D is aborted before any step (queued in every engine). B's tokens must be those it gets alone; each aborted
request is reported once more, finished and aborted, with the tokens last reported for it (none new), then
never again; a capture holds none of them; a second abort, an unknown id and a finished one give False; and the
engine's own count of requests in flight (and, where given, of free KV pages) is back where it started. Then a
request of max_tokens=1: finished, by a step or by a submit that runs its prefill (SGLang's), abort gives False.
Last, a request restored in flight is aborted like a submitted one.
"""

from __future__ import annotations

from typing import Callable, Optional

from thaw_format.sdk import Progress, greedy

MAX_STEPS = 200  # far more than B needs: a step that never finishes it fails instead of hanging


def prompt(seed: int, n: int) -> list[int]:
    """Deterministic ids in [5, 1000): every zoo model's vocabulary holds them."""
    return [(7 * seed + 13 * j) % 995 + 5 for j in range(n)]


A, B, C, D = (prompt(i, 40 + 9 * i) for i in range(4))
LONG, SHORT = greedy(40), greedy(10)  # greedy() ignores EOS: each request runs to its max_tokens


def check_abort(engine, in_flight: Callable[[], int], free_pages: Optional[Callable[[], int]] = None) -> None:
    """Run the checks on an idle engine (on the thread that owns it)."""
    alone = engine.generate(B, SHORT).token_ids  # the reference: B with nothing else in flight
    busy, free = in_flight(), free_pages() if free_pages else None
    assert busy == 0, f"{busy} requests in flight before the check"

    a, b = engine.submit(A, LONG), engine.submit(B, SHORT)
    d = engine.submit(D, LONG)
    assert engine.abort(d) is True  # queued: no step has run since its submit
    reported: dict[str, Progress] = {}
    finals: dict[str, Progress] = {}

    def read() -> None:
        for rid, progress in engine.progress().items():
            assert rid not in finals, f"{rid} reported after its last Progress"
            if progress.finished:
                finals[rid] = progress
            else:
                reported[rid] = progress

    read()
    for _ in range(3):
        engine.step()
        read()
    c = engine.submit(C, LONG)
    engine.step()
    read()
    last_a = reported.get(a)
    assert engine.abort(a) is True and engine.abort(c) is True
    assert engine.abort(a) is False and engine.abort("no-such-request") is False
    read()
    for rid, before in ((a, last_a), (d, None)):
        got = finals[rid]
        assert got.finished and got.aborted, got
        assert got.token_ids == (before.token_ids if before else []), (rid, got, before)
    assert finals[c].aborted and finals[c].finished

    snapshot = engine.capture(include_weights=False)
    held = {r.id for r in snapshot.scheduler.requests} if snapshot.scheduler is not None else set()
    assert not held & {a, c, d}, f"a capture after the aborts holds {held & {a, c, d}}"

    for _ in range(MAX_STEPS):
        if b in finals:
            break
        engine.step()
        read()
    assert finals[b].token_ids == alone and not finals[b].aborted
    assert set(finals) == {a, b, c, d}
    assert engine.abort(b) is False  # finished: a race with finishing is no error
    assert engine.progress() == {}  # nothing is reported twice
    check_one_token(engine)
    check_restored(engine)
    assert in_flight() == 0, f"{in_flight()} requests in flight after the aborts"
    if free_pages:
        assert free_pages() == free, f"{free_pages()} free KV pages after the aborts, {free} before"


def check_one_token(engine) -> None:
    """A request of max_tokens=1 is finished once its finished Progress is made, by a step or by a submit that runs
    the prefill (SGLang's): abort then gives False and nothing more is reported. Before that it is aborted like any
    other request. (No step of an idle engine: vLLM's multiprocessing step would wait for an output forever.)"""
    for abort_at_once in (True, False):
        e = engine.submit(A, greedy(1))
        reported = engine.progress().get(e)
        in_submit = reported is not None and reported.finished
        if abort_at_once and not in_submit:
            assert engine.abort(e) is True
            got = engine.progress()
            assert set(got) == {e} and got[e].finished and got[e].aborted and got[e].token_ids == [], got
            continue
        for _ in range(MAX_STEPS):
            if reported is not None and reported.finished:
                break
            engine.step()
            reported = engine.progress().get(e, reported)
        assert len(reported.token_ids) == 1 and not reported.aborted, reported
        assert engine.abort(e) is False, f"abort() of a finished request of one token gave True ({in_submit=})"
        assert engine.progress() == {}
        if in_submit:
            assert engine.step() == {e: reported.token_ids}  # the step after a finished one lets it go
            assert engine.progress() == {}


def check_restored(engine) -> None:
    """A request restored in flight (from a capture's scheduler state) is in flight like a submitted one: abort
    gives True, reports it once, finished and aborted, and finish() no longer runs it."""
    r = engine.submit(A, LONG)
    for _ in range(3):
        engine.step()
    snapshot = engine.capture(include_weights=False)
    assert set(engine.finish()) == {r}
    assert engine.progress() == {}, "finish() left a Progress of the request it finished, reported after it"
    resumed = [x.request_id for x in engine.restore(snapshot)]
    assert resumed == [r], resumed
    assert engine.abort(r) is True
    got = engine.progress()
    assert set(got) == {r} and got[r].finished and got[r].aborted, got
    assert r not in engine.finish() and engine.abort(r) is False and engine.progress() == {}
