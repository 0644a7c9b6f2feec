"""The contract's abort on SGLang in this process (tests/abort_checks.py), with the KV pool's count of slots no
request holds and SGLang's own pool-leak check once idle; the batch budget (ThawEngine.run_batches) across a
request's last result: SGLang's overlap scheduler runs one more batch for a request before it processes the result
that finishes it, and that batch's result, which gives no token, must not use up the batch allowed to the request
after it; and finish(), after which progress() reports nothing of what it finished. On the shared `llama` engine
(conftest.py), which test_kv_transport shares: each test leaves it unpaused and idle, even when it fails, so a
failure is not passed on to the tests after it, and SGLang's pool-leak check must not fire during it (no_new_leaks)."""

import threading

import pytest

from abort_checks import A, B, LONG, check_abort

pytestmark = pytest.mark.usefixtures("no_new_leaks")
WAIT = 60  # seconds: far more than a prefill of this model; past it the engine is unpaused to end the test


@pytest.fixture(scope="module")
def contract(thaw_sglang, llama):
    return thaw_sglang.SGLangEngine(llama)


def test_abort_frees_the_request_and_the_others_get_their_tokens_alone(contract):
    engine = contract
    check_abort(engine, lambda: len(engine.engine.tokenizer_manager.rid_to_state) + len(engine.queued),
                engine.engine.free_slots)


def _first_chunk(engine, stream):
    """Read the first chunk of `stream`, sent to the engine paused by run_batches(1); if none comes within WAIT
    (the engine paused before its prefill), unpause the engine so the request ends, and return None."""
    got = []
    reader = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)  # on the engine's event loop
    reader.start()
    reader.join(WAIT)
    if reader.is_alive():
        engine.unpause()
        reader.join()
        return None
    return got[0]


def _finished(chunk) -> bool:
    return chunk["meta_info"]["finish_reason"] is not None


def test_the_result_after_an_aborted_request_finished_uses_no_batch_of_the_next(contract):
    engine = contract.engine
    engine.run_batches(1)
    params = {"temperature": 0.0, "max_new_tokens": 50, "ignore_eos": True}
    streams = []
    try:
        stream = engine.generate(input_ids=A, sampling_params=params, stream=True, rid="left")
        streams.append(stream)
        chunk = next(stream)  # its prefill
        for _ in range(2):  # decoding, a batch at a time: paused with its next batch run, its result not processed
            engine.run_batches(1)
            chunk = next(stream)
        engine.abort("left")
        while not _finished(chunk):  # the result that finishes it; the batch run after it is then pending
            engine.run_batches(1)
            chunk = next(stream)
        assert chunk["meta_info"]["finish_reason"]["type"] == "abort"
        assert list(stream) == []
        engine.run_batches(1)  # the next request's prefill, not the aborted request's last batch
        streams.append(engine.generate(input_ids=B, stream=True, sampling_params={**params, "max_new_tokens": 4}))
        second = _first_chunk(engine, streams[-1])
        assert second is not None, \
            "the next request's prefill never ran: the aborted request's last batch took its turn"
        assert len(second["output_ids"]) == 1
    finally:
        try:
            engine.abort("left")  # a no-op once it ended; else it would run its 50 tokens beside the next test's
        finally:
            engine.unpause()
            for stream in streams:  # to their ends (the second's 4 tokens): the engine is then idle
                for _ in stream:
                    pass


def test_finish_leaves_nothing_for_progress_to_report_again(contract):
    """finish() ran a stepped request to its end, but the Progress its last step left (unfinished) stayed for
    the next progress(), which then reported a request long finished as running."""
    engine = contract
    stepped, queued = engine.submit(A, LONG), engine.submit(B, LONG)
    try:
        engine.step()  # the stepped request's second token; the queued one waits its turn
        done = engine.finish()
        assert set(done) == {stepped, queued}
        assert engine.progress() == {}
    finally:
        engine.finish()  # what a failure left submitted (nothing once finished): the engine unpaused and idle
