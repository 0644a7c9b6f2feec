"""Durable threads: a LangGraph thread's KV saved after each turn and restored when the thread resumes,
after an eviction or in a new process, so the next turn prefills only its new tokens (the engine's own count).
Foreign, incompatible, stale and damaged snapshots are refused with a logged reason, and the turn prefills."""

import json
import logging
import shutil

import pytest
from langchain_core.messages import HumanMessage, SystemMessage, messages_to_dict

from conftest import run_script

SYSTEM = SystemMessage("You are a coding agent. " + "Keep the plan, the tool results and the diff in mind. " * 8)


@pytest.fixture
def store(tmp_path):
    return tmp_path / "threads"


@pytest.fixture
def agent(engine, model_dir, store):
    """A one-node LangGraph chat agent with a checkpointer, over a ChatThaw keeping threads' KV in `store`."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph

    from thaw_langgraph import ChatThaw

    chat = ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=16, thread_store=str(store))
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda state: {"messages": [chat.invoke(state["messages"])]})
    graph.add_edge(START, "agent")
    return chat, graph.compile(checkpointer=InMemorySaver())


def turn(app, thread_id: str, *messages):
    return app.invoke({"messages": list(messages)}, {"configurable": {"thread_id": thread_id}})["messages"][-1]


def saved_tokens(first) -> int:
    """Tokens the thread's first turn left computed: its prompt and reply, all but the reply's last token."""
    meta = first.response_metadata
    return len(meta["prompt_token_ids"]) + len(meta["token_ids"]) - 1


def test_a_thread_resumes_after_eviction_without_prefill(agent, store, plain, kind, evict):
    chat, app = agent
    first = turn(app, "t-1", SYSTEM, HumanMessage("step one: read the failing test."))
    assert first.response_metadata["thread_kv"] is None and (store / "t-1.thaw").is_file()
    evict()
    second = turn(app, "t-1", HumanMessage("step two: propose a fix."))
    meta = second.response_metadata
    assert meta["thread_kv"] == "restored"
    before = first.response_metadata["prompt_token_ids"]
    assert meta["prompt_token_ids"][: len(before)] == before
    assert meta["cached_tokens"] >= kind.cached(min(saved_tokens(first), len(meta["prompt_token_ids"]) - 1)) > 0
    assert meta["token_ids"] == plain(meta["prompt_token_ids"], 16)
    third = turn(app, "t-1", HumanMessage("step three: run the tests."))
    assert third.response_metadata["thread_kv"] == "resident"  # still cached: nothing restored


def test_a_thread_resumes_in_a_new_process(agent, store, model_dir, plain, kind, tmp_path):
    chat, app = agent
    first = turn(app, "t-2", SYSTEM, HumanMessage("step one: list the files."))
    history = app.get_state({"configurable": {"thread_id": "t-2"}}).values["messages"]
    messages = history + [HumanMessage("step two: open the first file.")]
    (tmp_path / "messages.json").write_text(json.dumps(messages_to_dict(messages)))
    out = run_script("resume_thread.py", kind.name, str(model_dir), str(store), "t-2", str(tmp_path / "messages.json"))
    meta = json.loads(next(line for line in out.splitlines() if line.startswith("THAW_RESULT "))[len("THAW_RESULT "):])
    assert meta["prompt_token_ids"] == chat.prompt_ids(messages)  # the saved ids, learnt from the snapshot
    assert meta["thread_kv"] == "restored"
    assert meta["cached_tokens"] >= kind.cached(saved_tokens(first)) > 0  # the new engine prefilled only the new turn
    assert meta["token_ids"] == plain(meta["prompt_token_ids"], 16)


def _refused(agent, plain, evict, caplog, thread_id: str, spoil, reason: str, messages=None):
    chat, app = agent
    turn(app, thread_id, SYSTEM, HumanMessage("step one: read the issue."))
    spoil()
    evict()
    with caplog.at_level(logging.WARNING, logger="thaw_langgraph.durable"):
        reply = turn(app, thread_id, *(messages or [HumanMessage("step two: reproduce it.")]))
    meta = reply.response_metadata
    assert any(reason in r.getMessage() and thread_id in r.getMessage() for r in caplog.records), caplog.text
    assert meta["thread_kv"] in (None, "stale") and meta["cached_tokens"] == 0  # prefilled, nothing restored
    assert meta["token_ids"] == plain(meta["prompt_token_ids"], 16)


def test_a_foreign_threads_snapshot_is_refused(agent, store, plain, evict, caplog):
    chat, app = agent

    def take_other():  # the thread's file replaced by another thread's snapshot
        turn(app, "t-other", SYSTEM, HumanMessage("another thread."))
        shutil.copy(store / "t-other.thaw", store / "t-3.thaw")

    _refused(agent, plain, evict, caplog, "t-3", take_other, "foreign")


def test_an_incompatible_snapshot_is_refused_by_identity(agent, store, plain, evict, caplog):
    import thaw_format
    from thaw_langgraph import ThreadStore

    def other_model():  # the same KV bytes, recorded as another model's
        threads = ThreadStore(str(store))
        snapshot = threads.load("t-4")
        snapshot.model.config_digest = "0" * len(snapshot.model.config_digest)
        threads.save("t-4", snapshot)
        assert thaw_format.loads((store / "t-4.thaw").read_bytes()).model.config_digest.startswith("000")

    _refused(agent, plain, evict, caplog, "t-4", other_model, "incompatible")


def test_a_damaged_snapshot_is_refused(agent, store, plain, evict, caplog):
    def damage():
        data = bytearray((store / "t-5.thaw").read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside the KV bytes, under a chunk checksum
        (store / "t-5.thaw").write_bytes(bytes(data))

    _refused(agent, plain, evict, caplog, "t-5", damage, "unreadable")


def test_a_stale_snapshot_is_refused(agent, plain, evict, caplog):
    """The thread's conversation no longer begins with what was saved (it was rewritten)."""
    from langchain_core.messages import RemoveMessage
    from langgraph.graph.message import REMOVE_ALL_MESSAGES

    rewritten = [RemoveMessage(id=REMOVE_ALL_MESSAGES), SystemMessage("A different agent now. " * 12),
                 HumanMessage("start over.")]
    _refused(agent, plain, evict, caplog, "t-6", lambda: None, "stale", messages=rewritten)


def test_a_thread_resumes_from_an_fsspec_url(engine, model_dir, plain, kind, evict):
    """The same durable thread kept under an fsspec URL (fsspec's in-memory filesystem) instead of a directory."""
    import uuid

    import fsspec

    from thaw_langgraph import ChatThaw

    url = f"memory://thaw-threads-{uuid.uuid4().hex}"
    chat = ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=16, thread_store=url)
    messages = [SYSTEM, HumanMessage("step one: read the failing test.")]
    first = chat.invoke(messages, thread_id="t/url")
    fs, root = fsspec.core.url_to_fs(url)
    assert fs.ls(root, detail=False) == [f"{root}/t%2Furl.thaw"]  # one file per thread, the id quoted
    evict()
    second = chat.invoke(messages + [first, HumanMessage("step two: propose a fix.")], thread_id="t/url")
    meta = second.response_metadata
    assert meta["thread_kv"] == "restored"
    assert meta["cached_tokens"] >= kind.cached(min(saved_tokens(first), len(meta["prompt_token_ids"]) - 1)) > 0
    assert meta["token_ids"] == plain(meta["prompt_token_ids"], 16)


def test_every_entry_point_keeps_the_thread_its_config_names(engine, model_dir, store):
    """`invoke`, `batch`, `stream` and `astream` with {"configurable": {"thread_id": ...}} and no graph keep the
    thread, and so does `stream` inside a LangGraph node (langchain-core hands _stream no run manager there);
    `generate` and `agenerate`, which take no config, keep the thread their metadata= names."""
    import asyncio

    from langgraph.graph import START, MessagesState, StateGraph

    from thaw_langgraph import ChatThaw

    chat = ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=4, thread_store=str(store))
    messages = [SYSTEM, HumanMessage("step one: read the issue.")]
    config = lambda name: {"configurable": {"thread_id": name}}  # noqa: E731

    async def astream_last(name):
        return [chunk async for chunk in chat.astream(messages, config(name))][-1]

    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda state: {"messages": [list(chat.stream(state["messages"]))[-1]]})
    graph.add_edge(START, "agent")
    replies = {"t-invoke": chat.invoke(messages, config("t-invoke")),
               "t-batch": chat.batch([messages], config("t-batch"))[0],
               "t-stream": list(chat.stream(messages, config("t-stream")))[-1],
               "t-astream": asyncio.run(astream_last("t-astream")),
               "t-graph": graph.compile().invoke({"messages": messages}, config("t-graph"))["messages"][-1],
               "t-generate": chat.generate([messages], metadata={"thread_id": "t-generate"}).generations[0][0].message,
               "t-agenerate": asyncio.run(chat.agenerate([messages], metadata={"thread_id": "t-agenerate"}))
               .generations[0][0].message}
    for name, reply in replies.items():
        assert reply.response_metadata.get("thread_id") == name, name
    assert sorted(p.name for p in store.iterdir()) == sorted(f"{name}.thaw" for name in replies)


def test_an_empty_thread_id_is_refused_by_every_entry_point(engine, model_dir, store):
    """thread_id "" (in the config, a LangGraph graph's, or a keyword) ran the turn without a thread, saving
    nothing, and in generate's metadata failed in the thread store. LangGraph's own InMemorySaver keeps a thread
    "" but its loop and metadata treat "" as no id; ChatThaw refuses it, before the turn reaches the engine."""
    import asyncio

    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph

    from thaw_langgraph import ChatThaw

    chat = ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=4, thread_store=str(store))
    messages = [HumanMessage("step one: read the issue.")]
    config = {"configurable": {"thread_id": ""}}

    async def astream():
        return [chunk async for chunk in chat.astream(messages, config)]

    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda state: {"messages": [chat.invoke(state["messages"])]})
    graph.add_edge(START, "agent")
    app = graph.compile(checkpointer=InMemorySaver())
    calls = {"invoke": lambda: chat.invoke(messages, config), "keyword": lambda: chat.invoke(messages, thread_id=""),
             "ainvoke": lambda: asyncio.run(chat.ainvoke(messages, config)),
             "batch": lambda: chat.batch([messages], config), "stream": lambda: list(chat.stream(messages, config)),
             "astream": lambda: asyncio.run(astream()),
             "generate": lambda: chat.generate([messages], metadata={"thread_id": ""}),
             "agenerate": lambda: asyncio.run(chat.agenerate([messages], metadata={"thread_id": ""})),
             "graph": lambda: app.invoke({"messages": messages}, config)}
    for call in calls.values():
        with pytest.raises(ValueError, match="thread_id is empty"):
            call()
    assert list(store.iterdir()) == []


def test_a_thread_with_an_id_too_long_for_a_file_name_resumes(engine, model_dir, store, plain, kind, evict):
    """A thread id whose quoted form would pass the filesystem's 255-byte name limit (every turn raised
    OSError 'File name too long') is kept under its SHA-256; another long id gets a file of its own."""
    from thaw_langgraph import ChatThaw

    chat = ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=16, thread_store=str(store))
    thread_id = "customer/\u00e9t\u00e9-" + "x" * 300
    messages = [SYSTEM, HumanMessage("step one: read the failing test.")]
    first = chat.invoke(messages, thread_id=thread_id)
    chat.invoke([HumanMessage("another thread.")], thread_id=thread_id + "y")
    names = sorted(path.name for path in store.iterdir())
    assert len(names) == 2 and all(len(name) < 100 for name in names), names
    evict()
    second = chat.invoke(messages + [first, HumanMessage("step two: propose a fix.")], thread_id=thread_id)
    meta = second.response_metadata
    assert meta["thread_id"] == thread_id and meta["thread_kv"] == "restored"
    assert meta["cached_tokens"] >= kind.cached(min(saved_tokens(first), len(meta["prompt_token_ids"]) - 1)) > 0
    assert meta["token_ids"] == plain(meta["prompt_token_ids"], 16)


def test_a_thread_store_of_the_wrong_type_is_refused(engine, model_dir, tmp_path, monkeypatch):
    """thread_store=5 made a directory named "5" in the working directory (str() of it) and kept threads there."""
    from thaw_langgraph import ChatThaw

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match="a thread store is a directory or an fsspec URL, not int 5"):
        ChatThaw(engine=engine, tokenizer=model_dir, thread_store=5)
    assert list(tmp_path.iterdir()) == []
