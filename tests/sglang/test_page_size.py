"""An engine whose own SGLang page size is not a divisor of 32 (64 tokens; SGLang caches whole pages of it only).
page_size() said 32 and every capture was refused ("not a multiple of the engine's page size 64"); now its
captures cut pages of 64, what page_size() says. A restore holds of each chain the tokens that fill whole SGLang
pages: a request captured in flight (its tokens end anywhere) is resumed with the tokens it gets alone, and nothing
leaks (SGLang's allocator hands out whole pages: a chain of another length took fewer slots than it had tokens).
The one engine of this file is its own: run the file on its own."""

from abort_checks import prompt
from thaw_format.sdk import greedy

PAGE = 64


def test_an_engine_of_64_token_pages_captures_and_restores_whole_pages(thaw_sglang, zoo, engines):
    engine = thaw_sglang.SGLangEngine(engines(zoo.make_model("llama"), page_size=PAGE))
    assert engine.page_size() == PAGE
    slots = engine.engine.free_slots()
    served = prompt(1, 150)
    alone = engine.generate(served, greedy(12))
    snapshot = engine.capture(include_weights=False)
    assert snapshot.kv.page_size == PAGE
    assert [len(tokens) for tokens in snapshot.prefix.tokens] == [PAGE, PAGE]  # 161 tokens computed: 2 pages kept

    stepped = prompt(2, 100)
    rid = engine.submit(stepped, greedy(20))
    for _ in range(5):
        engine.step()
    in_flight = engine.capture(include_weights=False)
    (held,) = in_flight.scheduler.requests
    assert held.num_computed_tokens % PAGE, "the request's tokens end on a page boundary: choose other lengths"
    reference = engine.finish()[rid].output_token_ids

    assert [r.request_id for r in engine.restore(in_flight)] == [rid]
    assert engine.finish()[rid].output_token_ids == reference
    engine.restore(snapshot)
    again = engine.generate(served, greedy(12))
    assert again.token_ids == alone.token_ids and again.cached_tokens == 2 * PAGE
    assert engine.engine.free_slots() == slots and engine.engine.leak_warnings() == 0
