"""ChatThaw as a LangChain chat model on each real engine: invoke, stream, batch, async, metadata."""

import asyncio
import subprocess
import sys

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage


def conversation(topic: str) -> list:
    return [SystemMessage("You are a reviewer. " + "Check the code for bugs and style. " * 6),
            HumanMessage(f"please review the {topic} change in this diff.")]


def test_tokenizer_fits_the_model_and_has_a_chat_template(chat, model_dir):
    import json

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert len(chat.chat_tokens.tokenizer) <= vocab
    ids = chat.prompt_ids(conversation("cache"))
    assert max(ids) < vocab and chat.chat_tokens.decode(ids, special=True).startswith("<|im_start|>system\n")


def test_a_missing_tokenizer_directory_is_named(engine, tmp_path):
    """A path that is not there was taken for a Hub repo id: "Repo id must be in the form 'repo_name' or
    'namespace/repo_name'"; it is named as a missing directory, as a missing model directory is."""
    from thaw_langgraph import ChatThaw

    missing = tmp_path / "no-such-model"
    for tokenizer in (str(missing), missing):
        with pytest.raises(FileNotFoundError, match=rf"no tokenizer directory .*'{missing}'"):
            ChatThaw(engine=engine, tokenizer=tokenizer)


def test_invoke_reports_the_engines_own_counts(chat, engine, kind, plain):
    if kind.name == "vllm":
        from thaw_vllm._internals import engine_in_this_process

        assert not engine_in_this_process(engine.llm)  # vLLM's default multiprocessing mode
    messages = conversation("thread")
    first = chat.invoke(messages)
    again = chat.invoke(messages)
    meta, usage = again.response_metadata, again.usage_metadata
    prompt = meta["prompt_token_ids"]
    assert prompt == chat.prompt_ids(messages) and len(prompt) > 32
    assert again.content == first.content and meta["token_ids"] == first.response_metadata["token_ids"]
    assert again.content == chat.chat_tokens.decode(meta["token_ids"])
    assert meta["token_ids"] == plain(prompt, 16)
    # The repeated prompt is served from the engine's prefix cache, all of it but the last token (vLLM: every
    # full page but the one holding it).
    assert meta["cached_tokens"] == kind.cached(len(prompt) - 1) > 0
    assert usage == {"input_tokens": len(prompt), "output_tokens": len(meta["token_ids"]),
                     "total_tokens": len(prompt) + len(meta["token_ids"]),
                     "input_token_details": {"cache_read": meta["cached_tokens"]}}


def test_streamed_tokens_join_to_the_invoked_text(chat):
    messages = conversation("stream")
    chunks = list(chat.stream(messages))
    whole = chat.invoke(messages)
    assert len([c for c in chunks if c.content]) > 1  # token by token, not one block at the end
    assert "".join(c.content for c in chunks) == whole.content
    assert chunks[-1].response_metadata["token_ids"] == whole.response_metadata["token_ids"]


def test_batch_and_async_give_the_tokens_of_single_calls(chat):
    topics = ["alpha", "beta", "gamma"]
    singles = [chat.invoke(conversation(t)).response_metadata["token_ids"] for t in topics]
    batched = chat.batch([conversation(t) for t in topics])
    assert [m.response_metadata["token_ids"] for m in batched] == singles

    async def run_async():
        replies = await asyncio.gather(*(chat.ainvoke(conversation(t)) for t in topics))
        streamed = [c async for c in chat.astream(conversation(topics[0]))]
        return replies, streamed

    replies, streamed = asyncio.run(run_async())
    assert [m.response_metadata["token_ids"] for m in replies] == singles
    assert "".join(c.content for c in streamed) == replies[0].content


def test_a_stream_left_with_its_event_loop_logs_no_error(chat, engine, caplog):
    """An async stream abandoned after its first token, its event loop then closed (asyncio.run returned): the
    request is aborted (test_abort.py) without an error logged; each of its later tokens logged 'a token listener
    failed' once."""
    from thaw_langgraph.engine_loop import loop_for

    async def first_token():
        async for chunk in chat.astream("tell a long story.", max_tokens=200):
            return chunk.content

    asyncio.run(first_token())
    loop_for(engine).call(lambda e: None, idle=True)  # once the abandoned request is gone
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert chat.invoke("tell a long story.").content


def test_a_reply_fed_back_keeps_its_token_ids(chat, kind):
    """The next turn's prompt holds the reply's own ids (not a re-encoding), so it hits the cache past it."""
    messages = conversation("multi-turn")
    reply = chat.invoke(messages)
    turn2 = messages + [AIMessage(reply.content), HumanMessage("and the tests?")]
    ids = chat.prompt_ids(turn2)
    meta = reply.response_metadata
    history = meta["prompt_token_ids"] + chat.chat_tokens.kept(meta["token_ids"])
    assert ids[: len(history)] == history
    second = chat.invoke(turn2)
    assert second.response_metadata["cached_tokens"] >= kind.cached(len(history) - 1) > 0


def test_a_refused_request_fails_alone(chat, kind):
    """A prompt the engine refuses raises in its caller; calls beside it are served."""
    if kind.max_len is None:
        pytest.skip(f"{kind.name} takes prompts of any length: no request to refuse")
    too_long = [HumanMessage("token " * 5000)]
    replies = chat.batch([too_long, conversation("beside")], return_exceptions=True)
    assert isinstance(replies[0], Exception) and str(kind.max_len) in str(replies[0])
    assert replies[1].response_metadata["token_ids"]


def test_stop_strings_are_refused(chat):
    with pytest.raises(ValueError, match="stop strings"):
        chat.invoke(conversation("stop"), stop=["."])


def test_import_without_the_extra_names_it():
    """As every integration does (README, "Add thaw to your project"): the error says which extra to install."""
    code = "import sys; sys.modules['langchain_core'] = None; import thaw_langgraph"  # None: the import fails
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "pip install 'thaw[langgraph]'" in result.stderr, result.stderr
