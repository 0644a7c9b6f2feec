"""fork_fanout and the engine loop's coalescing: one prefill of the shared prefix, and the same tokens as a
plain engine serving every prompt alone, round after round."""

import queue

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

ASPECTS = ["security", "style", "performance", "correctness"]
TRUNK = [SystemMessage("You review code. " + "Be precise and cite the line. " * 8),
         HumanMessage("diff: fix the cache prefix bug in the engine snapshot restore function.")]


def test_coalescing_groups_by_shared_prefix():
    from thaw_langgraph.engine_loop import coalesce, shared_prefix

    a, b = list(range(40)), list(range(40)) + [7]
    c = list(range(1, 41))
    assert shared_prefix([a, b]) == a
    assert coalesce([a, b, c, [5]], min_shared=32) == [(a, [0, 1]), (None, [2]), (None, [3])]
    assert coalesce([a[:35], a[:33] + [99, 98]], min_shared=32) == [(a[:33], [0, 1])]


def test_the_loop_coalesces_at_the_engines_own_page_size():
    """min_shared defaults to the engine's page_size(): a shared prefix of one full page of the engine's is worth a
    prefill of its own. Every engine above has 32-token pages, as DEFAULT_PAGE_SIZE has, so none of them could
    tell the two apart; the template's toy engine has 4-token pages: two prompts admitted together that share 10
    tokens (two full pages, less than 32) run their prefix first, and each reads its 8 tokens from the cache."""
    from thaw_conformance.template.adapter import ToyThawEngine
    from thaw_format.sdk import greedy
    from thaw_langgraph.engine_loop import EngineLoop

    engine = ToyThawEngine.start()
    shared = list(range(3, 13))
    prompts = [shared + [20], shared + [21, 22]]
    alone = [ToyThawEngine.start().generate(p, greedy(5)).token_ids for p in prompts]
    loop = EngineLoop(engine)
    done: queue.SimpleQueue = queue.SimpleQueue()

    def submit_all(_):  # on the loop's thread, between steps: both are admitted in the next one
        for i, prompt in enumerate(prompts):
            loop.submit(prompt, greedy(5), lambda p, i=i: p.finished and done.put((i, p)), done.put)

    try:
        loop.call(submit_all, idle=True)
        results = dict(done.get(timeout=60) for _ in prompts)
    finally:
        loop.close()
    assert [results[i].cached_tokens for i in range(2)] == [8, 8]  # 0 each, uncoalesced at 32
    assert [results[i].token_ids for i in range(2)] == alone
    assert engine.page_size() == loop.min_shared == 4


def test_fork_fanout_prefills_the_trunk_once_and_keeps_order(chat, kind):
    from thaw_langgraph import fork_fanout

    suffixes = [HumanMessage(f"review the {a} of this change.") for a in ASPECTS]
    replies = fork_fanout(chat, TRUNK, suffixes)
    alone = [chat.invoke(TRUNK + [s]) for s in suffixes]
    shared = len(chat.prompt_ids(TRUNK))
    for reply, single, suffix in zip(replies, alone, suffixes):
        meta = reply.response_metadata
        assert meta["prompt_token_ids"] == chat.prompt_ids(TRUNK + [suffix])  # in the order of the suffixes
        assert meta["token_ids"] == single.response_metadata["token_ids"]
        assert meta["cached_tokens"] >= kind.cached(shared) > 0  # the trunk came from the cache


def test_fork_fanout_takes_strings_as_invoke_does(chat):
    """A string trunk or suffix is one human message, as invoke reads it (taken as a sequence, each character
    was a message of its own); a (role, text) tuple is one message, a list of them a conversation."""
    from thaw_langgraph import fork_fanout

    trunk = "diff: fix the cache prefix bug in the engine snapshot restore function."
    suffixes = ["review the security.", ("human", "review the style."), [HumanMessage("a"), AIMessage("b")]]
    replies = fork_fanout(chat, trunk, suffixes, max_tokens=1)
    conversations = [[HumanMessage("review the security.")], [HumanMessage("review the style.")],
                     [HumanMessage("a"), AIMessage("b")]]
    assert [r.response_metadata["prompt_token_ids"] for r in replies] == \
        [chat.prompt_ids([HumanMessage(trunk)] + c) for c in conversations]
    with pytest.raises(TypeError, match="a list of suffixes"):  # not one branch per character
        fork_fanout(chat, trunk, "review the security.", max_tokens=1)


def test_concurrent_calls_admitted_together_are_coalesced(chat, kind, plain):
    """Requests that reach the engine loop in one admission: the shared prefix runs first, then every member
    reads it from the cache (the engine's count), and each gets the plain engine's tokens."""
    import engines as engine_kinds
    from thaw_langgraph.engine_loop import loop_for, shared_prefix

    loop = loop_for(chat.engine)
    prompts = [chat.prompt_ids(TRUNK + [HumanMessage(f"round zero, reviewer {i}.")]) for i in range(4)]
    params = chat._params(max_tokens=12)
    done: queue.SimpleQueue = queue.SimpleQueue()

    def submit_all(engine):  # on the loop's thread, between steps: all four are admitted in the next one
        engine_kinds.evict(kind.name, engine)  # nothing of the prompts is cached before
        for i, prompt in enumerate(prompts):
            loop.submit(prompt, params, lambda p, i=i: p.finished and done.put((i, p)), done.put)

    loop.call(submit_all, idle=True)
    results = dict(done.get(timeout=300) for _ in prompts)
    shared = len(shared_prefix(prompts))
    for i, prompt in enumerate(prompts):
        assert results[i].cached_tokens == kind.cached(shared) > 0
        assert results[i].token_ids == plain(prompt, 12)


def test_five_rounds_of_fanout_match_a_plain_engine(chat, kind, plain):
    """An agent loop: each round fans four reviewers out over the conversation so far, and the next round
    continues from one reviewer's reply. Every branch, every round, has the plain engine's tokens."""
    from thaw_langgraph import fork_fanout

    conversation = list(TRUNK)
    for round_ in range(5):
        suffixes = [HumanMessage(f"round {round_}: review the {a}.") for a in ASPECTS]
        replies = fork_fanout(chat, conversation, suffixes)
        shared = len(chat.prompt_ids(conversation))
        for reply in replies:
            meta = reply.response_metadata
            assert meta["token_ids"] == plain(meta["prompt_token_ids"], chat.max_tokens), f"round {round_}"
            assert meta["cached_tokens"] >= kind.cached(shared) > 0
        conversation += [suffixes[round_ % 4], AIMessage(replies[round_ % 4].content)]


def test_fork_fanout_on_a_fork_pool_gives_the_in_process_tokens_in_order(chat, engine, kind):
    """Four branches on a two-worker pool (two rounds): each worker restores the trunk's KV from the engine
    (its own cached-token count says so) and the replies are those of the in-process fan-out, in order."""
    from thaw_format.sdk import ForkPool

    from thaw_langgraph import fork_fanout

    if kind.name in ("vllm", "sglang"):
        # ChatThaw's pool path is the engine's ForkPool, proven on each engine in its own tests; here it runs on
        # MLX and transformers (a worker is a process whose engine starts in seconds).
        pytest.skip(f"not run on {kind.name}: a pool's two workers are two more engines (20-60 s each to start on "
                    "a 2-core machine); tests/vllm/test_pool.py and tests/sglang/test_pool.py run ForkPool on them, "
                    "tests/vllm/test_lent_kv.py a multiprocessing vLLM's capture_shared")
    suffixes = [HumanMessage(f"pool: review the {a} of this change.") for a in ASPECTS]
    in_process = fork_fanout(chat, TRUNK, suffixes)
    with ForkPool(engine, workers=2) as pool:
        pooled = fork_fanout(chat, TRUNK, suffixes, pool=pool)
        short = rf"share at least {engine.page_size()} prompt tokens .* these share \d+: run it without pool="
        with pytest.raises(ValueError, match=short):  # a pool moves full pages only
            fork_fanout(chat, [HumanMessage("hi")], ["a", "b"], pool=pool)
    shared = len(chat.prompt_ids(TRUNK))
    for reply, local, suffix in zip(pooled, in_process, suffixes):
        meta = reply.response_metadata
        assert meta["prompt_token_ids"] == chat.prompt_ids(TRUNK + [suffix])
        assert meta["token_ids"] == local.response_metadata["token_ids"] and reply.content == local.content
        assert meta["cached_tokens"] >= kind.cached(shared) > 0  # the worker read the trunk's restored pages
