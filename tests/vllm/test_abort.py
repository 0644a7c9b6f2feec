"""The contract's abort on vLLM in this process (tests/abort_checks.py), where the engine core's block pool is
read directly: the free-block count is back where it started once the aborted requests are gone (their full
pages stay cached and evictable, which vLLM counts as free)."""

from conftest import make_engine

from abort_checks import check_abort


def test_abort_frees_the_blocks_and_the_others_get_their_tokens_alone(vllm, zoo):
    import thaw_vllm
    from thaw_vllm import _internals

    llm = make_engine(zoo, "llama", "float32")
    manager = _internals.kv_cache_manager(llm.llm_engine.engine_core.engine_core)
    check_abort(thaw_vllm.VLLMEngine(llm), llm.llm_engine.get_num_unfinished_requests,
                lambda: _internals.num_free_blocks(manager))
