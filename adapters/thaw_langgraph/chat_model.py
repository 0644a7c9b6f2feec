"""ChatThaw: a LangChain chat model over a thaw engine (an adapter's contract engine, thaw_format.sdk).

    llm = ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=128)
    llm.invoke([HumanMessage("...")])          # invoke / ainvoke / batch / stream / astream

The prompt is rendered with the tokenizer's chat template and fed to the engine as token ids; replies stop
at the tokenizer's end-of-turn ids. `response_metadata` carries the prompt and reply token ids and the
engine's own cached-token count; `usage_metadata` is LangChain's (cache_read: that count).

Durable threads: with `thread_store=` (a directory or fsspec URL) every turn of a thread (`thread_id` from the
config's "configurable", in a LangGraph graph or not, or passed as a keyword) saves the thread's KV afterwards
and restores it first where the engine no longer holds it (see durable.py).
"""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Optional, Sequence

from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, message_chunk_to_message
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import ConfigDict, PrivateAttr

import thaw_format
from thaw_format.sdk import Progress, Unsupported, greedy, require

from . import durable
from .chat_tokens import ChatTokens, Prompt
from .engine_loop import EngineLoop, ListenerGone, loop_for
from .thread_store import ThreadStore


@dataclass
class _Turn:
    prompt: Prompt
    params: thaw_format.SamplingParams
    thread_id: Optional[str]
    thread_kv: Optional[str]  # what resuming the thread did: resident, restored, stale; None if no thread


class ChatThaw(BaseChatModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any
    """A contract engine (thaw_format.sdk.Engine) with the "streaming" capability, or a vllm.LLM."""
    tokenizer: Any
    """A Hugging Face tokenizer with a chat template, or the directory holding one."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    thread_store: Any = None
    """A ThreadStore, a directory or an fsspec URL: where threads' KV is kept (durable threads)."""
    model_name: str = "thaw"
    coalesce: bool = True
    """Concurrent calls sharing a prefix compute it once (engine_loop.py); False: each computes its own."""

    _loop: EngineLoop = PrivateAttr()
    _tokens: ChatTokens = PrivateAttr()
    _store: Optional[ThreadStore] = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        self.engine = _contract_engine(self.engine)
        self._loop = loop_for(self.engine, coalesce=self.coalesce)
        self._tokens = _chat_tokens(self.tokenizer)
        if self.thread_store is not None:
            store = self.thread_store
            self._store = store if isinstance(store, ThreadStore) else ThreadStore(store)

    @property
    def _llm_type(self) -> str:
        return "thaw"

    @property
    def chat_tokens(self) -> ChatTokens:
        return self._tokens

    def prompt_ids(self, messages: Sequence[BaseMessage]) -> list[int]:
        """The token ids a call with `messages` feeds the engine."""
        return self._tokens.encode(messages).ids

    def prefill(self, prompt: Sequence[int]) -> Progress:
        """Compute `prompt`'s KV into the engine's cache (one token is generated and dropped)."""
        return self._run(list(prompt), greedy(1))

    def reply(self, prompt: Prompt, token_ids: Sequence[int], cached_tokens: int) -> AIMessage:
        """The message of a reply generated elsewhere (a fork pool's worker) for `prompt`, as invoke gives it;
        later prompts repeating it reuse its token ids."""
        progress = Progress(list(token_ids), cached_tokens, True)
        chunk = self._chunk(_Turn(prompt, self._params(), None, None), progress, _Text(self._tokens))
        self._tokens.remember(prompt, progress.token_ids)
        return message_chunk_to_message(chunk.message)

    # --- LangChain's entry points ---------------------------------------------------------------------------
    # The thread_id of a call's config (LangGraph's metadata, or {"configurable": {"thread_id": ...}} outside a
    # graph) travels as the keyword _begin reads: langchain-core's stream() gives _stream no run manager to
    # read the metadata from, and outside a graph nothing copies a configurable thread_id there. batch and
    # abatch call invoke and ainvoke; generate and agenerate take no config, and their metadata={"thread_id": ...}
    # reaches _begin through the run manager.

    def invoke(self, input, config: Optional[RunnableConfig] = None, **kwargs) -> AIMessage:
        return super().invoke(input, config, **_with_thread_id(config, kwargs))

    async def ainvoke(self, input, config: Optional[RunnableConfig] = None, **kwargs) -> AIMessage:
        return await super().ainvoke(input, config, **_with_thread_id(config, kwargs))

    def stream(self, input, config: Optional[RunnableConfig] = None, **kwargs) -> Iterator[AIMessageChunk]:
        return super().stream(input, config, **_with_thread_id(config, kwargs))

    def astream(self, input, config: Optional[RunnableConfig] = None, **kwargs) -> AsyncIterator[AIMessageChunk]:
        return super().astream(input, config, **_with_thread_id(config, kwargs))

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    def _stream(self, messages, stop=None, run_manager=None, **kwargs) -> Iterator[ChatGenerationChunk]:
        turn = self._begin(messages, stop, run_manager, kwargs)
        updates: queue.SimpleQueue = queue.SimpleQueue()
        job = self._loop.submit(turn.prompt.ids, turn.params, updates.put, updates.put)
        text, update = _Text(self._tokens), None
        try:
            while update is None or not update.finished:
                update = updates.get()
                if isinstance(update, BaseException):
                    raise update
                chunk = self._chunk(turn, update, text)
                if chunk is not None:
                    if run_manager is not None:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk  # a caller that stops iterating closes the generator here (GeneratorExit)
        finally:
            _cancel_unless_finished(self._loop, job, update)
        self._end(turn, update)  # a turn left unfinished is neither remembered nor saved in the thread store

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        turn = await asyncio.to_thread(self._begin, messages, stop, run_manager, kwargs)
        updates: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(item) -> None:  # called on the engine loop's thread
            # A caller gone with its event loop (cancelled, then asyncio.run returned) is not an error: the engine
            # loop aborts the request. Asked, not checked first: the loop may close between a check and the call.
            try:
                loop.call_soon_threadsafe(updates.put_nowait, item)
            except RuntimeError:
                if not loop.is_closed():
                    raise
                raise ListenerGone from None

        job = self._loop.submit(turn.prompt.ids, turn.params, deliver, deliver)
        text, update = _Text(self._tokens), None
        try:
            while update is None or not update.finished:
                update = await updates.get()  # a cancelled caller leaves here (CancelledError)
                if isinstance(update, BaseException):
                    raise update
                chunk = self._chunk(turn, update, text)
                if chunk is not None:
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk  # aclose(), or asyncio's finalizer of an abandoned generator, raises GeneratorExit
        finally:
            _cancel_unless_finished(self._loop, job, update)
        await asyncio.to_thread(self._end, turn, update)

    # --- one turn -----------------------------------------------------------------------------------------

    def _begin(self, messages, stop, run_manager, kwargs: dict) -> _Turn:
        if stop:
            raise ValueError("ChatThaw stops at the tokenizer's end-of-turn token ids; stop strings are not supported")
        thread_id = kwargs.pop("thread_id", None)
        if thread_id is None and run_manager is not None:  # generate/agenerate's metadata=, LangGraph's metadata
            thread_id = run_manager.metadata.get("thread_id")
        params = self._params(**kwargs)
        if self._store is None or thread_id is None:
            return _Turn(self._tokens.encode(messages), params, None, None)
        thread_id = str(thread_id)
        if not thread_id:  # refused, not taken as "no thread": that turn would run and silently save nothing
            raise ValueError("ChatThaw: thread_id is empty; a durable thread (thread_store=) needs a non-empty id")
        saved = durable.load(self._loop, self._store, thread_id)
        if saved is None:
            return _Turn(self._tokens.encode(messages), params, thread_id, None)
        self._tokens.learn(saved.history)  # the exact ids the saved KV belongs to
        prompt = self._tokens.encode(messages)
        return _Turn(prompt, params, thread_id, durable.resume(self._loop, saved, thread_id, prompt.ids))

    def _end(self, turn: _Turn, last: Progress) -> None:
        history = self._tokens.remember(turn.prompt, last.token_ids)
        if self._store is not None and turn.thread_id is not None:
            durable.save(self._loop, self._store, turn.thread_id, history)

    def _params(self, **overrides) -> thaw_format.SamplingParams:
        unknown = set(overrides) - {"max_tokens", "temperature", "top_p", "top_k", "seed"}
        if unknown:
            raise TypeError(f"ChatThaw: unknown generation options {sorted(unknown)}")
        fields = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "seed": self.seed, **overrides}
        return thaw_format.SamplingParams(**fields, stop_token_ids=self._tokens.stop_token_ids)

    def _chunk(self, turn: _Turn, update: Progress, text: "_Text") -> Optional[ChatGenerationChunk]:
        delta = text.advance(update.token_ids, update.finished)
        if not update.finished:
            return ChatGenerationChunk(message=AIMessageChunk(content=delta)) if delta else None
        ids = update.token_ids
        metadata = {
            "model_name": self.model_name,
            "finish_reason": "stop" if ids and ids[-1] in self._tokens.stop_token_ids else "length",
            "token_ids": list(ids), "prompt_token_ids": list(turn.prompt.ids), "cached_tokens": update.cached_tokens,
        }
        if turn.thread_id is not None:
            metadata["thread_id"], metadata["thread_kv"] = turn.thread_id, turn.thread_kv
        n = len(turn.prompt.ids)
        usage = {"input_tokens": n, "output_tokens": len(ids), "total_tokens": n + len(ids),
                 "input_token_details": {"cache_read": update.cached_tokens}}
        return ChatGenerationChunk(message=AIMessageChunk(content=delta, response_metadata=metadata,
                                                          usage_metadata=usage, chunk_position="last"))

    def _run(self, prompt: list[int], params: thaw_format.SamplingParams) -> Progress:
        updates: queue.SimpleQueue = queue.SimpleQueue()
        self._loop.submit(prompt, params, lambda p: p.finished and updates.put(p), updates.put)
        result = updates.get()
        if isinstance(result, BaseException):
            raise result
        return result


class _Text:
    """The reply's text so far, handed out as deltas that join to the final text (a delta never ends inside
    a character whose bytes have not all arrived)."""

    def __init__(self, tokens: ChatTokens) -> None:
        self._tokens, self._sent = tokens, ""

    def advance(self, token_ids: list[int], finished: bool) -> str:
        text = self._tokens.decode(token_ids)
        if not finished and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self._sent):
            raise RuntimeError("the tokenizer's decoding of a longer reply changed text already streamed")
        delta, self._sent = text[len(self._sent):], text
        return delta


def _cancel_unless_finished(loop: EngineLoop, job, last) -> None:
    """A caller that left before its request finished (a generator closed early, a cancelled task, an error of its
    own) cancels it: the engine loop aborts it instead of generating up to max_tokens for no one. A request that
    failed in the loop is gone already, and cancelling it changes nothing."""
    if not isinstance(last, Progress) or not last.finished:
        loop.cancel(job)


def _with_thread_id(config: Optional[RunnableConfig], kwargs: dict) -> dict:
    """`kwargs` with the thread_id of the call's config (ensure_config also finds a LangGraph node's), unless given."""
    if "thread_id" in kwargs:
        return kwargs
    config = ensure_config(config)
    thread_id = config["metadata"].get("thread_id", config.get("configurable", {}).get("thread_id"))
    return kwargs if thread_id is None else {**kwargs, "thread_id": thread_id}


def _chat_tokens(tokenizer) -> ChatTokens:
    """A ChatTokens from one, from a directory holding a tokenizer, or from a tokenizer object."""
    if isinstance(tokenizer, ChatTokens):
        return tokenizer
    if isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__"):
        return ChatTokens.from_pretrained(tokenizer)
    return ChatTokens(tokenizer)


def _contract_engine(engine):
    """The engine ChatThaw drives: a contract engine that streams (several requests in flight, each one's tokens
    and the engine's cached-token count after every step). A vllm.LLM gets thaw_vllm's contract engine."""
    if not hasattr(type(engine), "capabilities"):
        try:
            import vllm
        except ImportError:
            vllm = None
        if vllm is None or not isinstance(engine, vllm.LLM):
            raise Unsupported(f"ChatThaw needs a thaw contract engine (thaw_format.sdk.Engine) or a vllm.LLM, "
                              f"not {type(engine).__name__}")
        engine = _vllm_engine(engine)
    require(engine, "streaming")
    return engine


_WRAPPED: dict[int, Any] = {}


def _vllm_engine(llm):
    """The one thaw_vllm.VLLMEngine over `llm` (one engine loop per engine: two would step it concurrently)."""
    from thaw_vllm import VLLMEngine

    engine = _WRAPPED.get(id(llm))
    if engine is None or engine.llm is not llm:
        engine = _WRAPPED[id(llm)] = VLLMEngine(llm)
    return engine
