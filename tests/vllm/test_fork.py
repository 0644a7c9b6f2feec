"""fork(llm, n): children continue the parent's context without prefill, in-process and in worker processes."""

import pytest

from conftest import generate, make_engine, trunk_tokens

SUFFIXES = [trunk_tokens(5 + i, seed=30 + i) for i in range(4)]


def cold_outputs(llm, trunk, params):
    """The parent's own output for each suffix, each prefilled from scratch."""
    outputs = []
    for suffix in SUFFIXES:
        llm.reset_prefix_cache()
        outputs.append(generate(llm, trunk + suffix, params)[0])
    return outputs


def test_in_process_children_share_the_parent_and_skip_prefill(engine, greedy):
    import thaw_vllm

    trunk = trunk_tokens(130, seed=31)
    expected = cold_outputs(engine, trunk, greedy)
    engine.reset_prefix_cache()
    generate(engine, trunk, greedy)
    children = thaw_vllm.fork(engine, 4)
    assert all(child.context[:128] == trunk[:128] for child in children)
    for child, suffix, want in zip(children, SUFFIXES, expected):
        done = child.generate(suffix, greedy)
        assert done.token_ids == want
        assert done.num_cached_tokens >= 128  # the trunk's four full pages came from the parent's cache


def test_process_children_restore_the_trunk_and_run_side_by_side(vllm, zoo, greedy):
    """Two worker-process children (each a whole engine: four would take minutes on two cores), each
    serving two of the four suffixes, then two at once (generate_all); each restores the trunk's KV snapshot."""
    import thaw_vllm

    parent = make_engine(zoo, "llama", "float32")
    trunk = trunk_tokens(130, seed=32)
    expected = cold_outputs(parent, trunk, greedy)
    parent.reset_prefix_cache()
    generate(parent, trunk, greedy)
    children = parent.fork(2, context=trunk, processes=True)
    try:
        for i, (suffix, want) in enumerate(zip(SUFFIXES, expected)):
            done = children[i % 2].generate(suffix, greedy)
            assert done.token_ids == want
            assert done.num_cached_tokens == 128
        side_by_side = thaw_vllm.generate_all(children, SUFFIXES[:2], greedy)  # both children run at once
        assert [d.token_ids for d in side_by_side] == expected[:2]
        assert [d.num_cached_tokens for d in side_by_side] == [128, 128]
        for suffixes in (SUFFIXES[:1], SUFFIXES[:3]):  # one suffix per child, or it says so (zip dropped them)
            with pytest.raises(ValueError, match=f"2 children and {len(suffixes)} suffixes"):
                thaw_vllm.generate_all(children, suffixes, greedy)
    finally:
        for child in children:
            child.close()
