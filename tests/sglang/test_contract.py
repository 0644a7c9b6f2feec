"""The adapter contract on SGLang, from the prior art's call shape: ThawEngine(sglang.Engine, model_path, ...)."""

import pytest

from conftest import ENGINE_ARGS, PROMPT_A, SHARED


def test_engine_class_and_path_positionally_start_a_contract_engine_that_forks(thaw_sglang, zoo, engines):
    import sglang
    from thaw_format.sdk import greedy

    native = thaw_sglang.ThawEngine(sglang.Engine, str(zoo.make_model("llama")), **ENGINE_ARGS)
    engines.adopt([native])
    engine = thaw_sglang.SGLangEngine(native)
    engine.generate(SHARED, greedy(1))
    want = engine.generate(PROMPT_A, greedy(8))
    assert want.cached_tokens == len(SHARED)  # the first request's prompt, from SGLang's radix cache
    [shared] = engine.fork(1, context=SHARED)
    assert shared.generate(PROMPT_A, greedy(8)).token_ids == want.token_ids
    [child] = engine.fork(1, context=SHARED, processes=True)  # started from launch_spec() in its own process
    try:
        got = child.generate(PROMPT_A, greedy(8))
        assert got.token_ids == want.token_ids and got.cached_tokens >= len(SHARED) - 1  # the restored pages (a partial last one may be recomputed)
    finally:
        child.close()


def test_another_engine_class_is_refused(thaw_sglang):
    with pytest.raises(TypeError, match="extends sglang.Engine only"):
        thaw_sglang.ThawEngine(dict, "/nonexistent")
