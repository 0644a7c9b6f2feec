"""The contract's "streaming" capability, on each engine directly: several requests in flight at once, each
one's tokens after every step, and each gets exactly the tokens it gets alone (the plain reference's)."""

import thaw_format
from thaw_format.sdk import require

import engines as engine_kinds
from engines import STOP

MAX_STEPS = 200  # far more than the requests need: a step that never finishes them fails instead of hanging


def test_requests_in_flight_together_stream_the_tokens_each_gets_alone(engine, kind, plain):
    from thaw_langgraph.engine_loop import loop_for

    require(engine, "streaming")
    prompts = [[(7 * i + 13 * j) % 1000 + 5 for j in range(30 + 11 * i)] for i in range(3)]
    params = [thaw_format.SamplingParams(temperature=0.0, max_tokens=n, stop_token_ids=STOP) for n in (5, 9, 7)]

    def run(engine):  # on the engine loop's thread, which owns the engine, once it is idle
        engine_kinds.evict(kind.name, engine)
        ids = [engine.submit(prompt, p) for prompt, p in zip(prompts, params)]
        reports = {rid: [] for rid in ids}
        finished = {}
        for _ in range(MAX_STEPS):
            if len(finished) == len(ids):
                break
            done = engine.step()
            for rid, progress in engine.progress().items():
                assert rid not in finished, f"{rid} reported after its last Progress"
                reports[rid].append(progress)
                if progress.finished:
                    finished[rid] = progress
            assert {rid: finished[rid].token_ids for rid in done} == done  # step's finished, as progress says
        return ids, reports

    ids, reports = loop_for(engine).call(run, idle=True)
    for rid, prompt, p in zip(ids, prompts, params):
        got = reports[rid]
        assert got and got[-1].finished, f"{rid} did not finish"
        for before, after in zip(got, got[1:]):  # token by token, each report extending the last
            assert after.token_ids[: len(before.token_ids)] == before.token_ids
            assert len(after.token_ids) <= len(before.token_ids) + 1
        assert got[-1].token_ids == plain(prompt, p.max_tokens)
        assert got[-1].cached_tokens == 0  # nothing of these prompts was cached: the engine's own count
