"""The adapter contract on vLLM, from the call shapes users start with: a plain vllm.LLM loading a thaw snapshot."""

import pytest

from conftest import ENGINE_KWARGS, make_engine, trunk_tokens


@pytest.fixture(scope="module")
def weights_snapshot(vllm, zoo, tmp_path_factory):
    """A snapshot with weights, for load_format="thaw"."""
    import thaw_format
    import thaw_vllm

    path = tmp_path_factory.mktemp("contract") / "weights.thaw"
    thaw_format.save(thaw_vllm.capture(make_engine(zoo, "llama", "float32")), path)
    return path


# In-process engines stay alive to the end of the session, as conftest's do: vLLM's shutdown of one in-process
# engine tears down process-wide state (its parallel groups) that the other in-process engines still use.
_KEEP = []


def _plain_llm(vllm, zoo, snapshot, **extra):
    return vllm.LLM(str(zoo.make_model("llama", dtype="float32")), load_format="thaw",
                    model_loader_extra_config={"thaw_snapshot": str(snapshot)}, **extra)


def test_plain_llm_without_thaw_arguments_is_refused_naming_the_one_to_add(vllm, zoo, weights_snapshot):
    import thaw_vllm

    llm = _plain_llm(vllm, zoo, weights_snapshot, dtype="float32", **ENGINE_KWARGS)
    _KEEP.append(llm)
    with pytest.raises(RuntimeError, match=r"pass every argument through engine_args.*\*\*thaw_vllm\.engine_args\("):
        thaw_vllm.VLLMEngine(llm).capture(include_weights=False)
    with pytest.raises(RuntimeError, match=r"pass every argument through engine_args.*\*\*thaw_vllm\.engine_args\("):
        thaw_vllm.VLLMEngine(llm).launch_spec()


def test_plain_llm_with_engine_args_is_captured_and_forked_into_processes(vllm, zoo, weights_snapshot):
    import thaw_vllm
    from thaw_format.sdk import greedy, pending_requests

    parent = thaw_vllm.VLLMEngine(_plain_llm(vllm, zoo, weights_snapshot, **thaw_vllm.engine_args(dtype="float32", **ENGINE_KWARGS)))
    _KEEP.append(parent.llm)
    trunk = trunk_tokens(70, seed=41)
    prompt = trunk + trunk_tokens(4, seed=42)
    parent.generate(trunk, greedy(1))
    want = parent.generate(prompt, greedy(8))
    assert want.cached_tokens == 64
    assert pending_requests(parent.capture(include_weights=False)) == []
    children = parent.fork(2, context=trunk, processes=True)
    try:
        for child in children:
            got = child.generate(prompt, greedy(8))
            assert got.token_ids == want.token_ids and got.cached_tokens == 64  # the restored pages, hit
    finally:
        for child in children:
            child.close()


def test_params_that_are_not_sampling_params_are_refused_by_name(vllm, zoo):
    """generate(prompt, None) raised AttributeError (params.logprobs), and differently on every engine."""
    import thaw_vllm

    engine = thaw_vllm.VLLMEngine(make_engine(zoo, "llama", "float32"))
    for params in (None, {"max_tokens": 2}):
        for call in (engine.generate, engine.submit):
            with pytest.raises(TypeError, match=f"params must be a thaw_format.SamplingParams .*, not "
                                                f"{type(params).__name__}"):
                call(trunk_tokens(8), params)
    assert not engine.llm.llm_engine.has_unfinished_requests()
