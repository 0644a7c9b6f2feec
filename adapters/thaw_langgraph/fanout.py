"""fork_fanout: N branches of one conversation, the shared part prefilled once.

    replies = fork_fanout(llm, trunk_messages, [[HumanMessage("review security")], [HumanMessage("review style")]])

Every branch's prompt is the trunk followed by its suffix. The prompts' shared token prefix is computed into
the engine's cache first, as one request; then every branch runs at once (one batch in the engine) and reads
that prefix from the cache: each reply's `response_metadata["cached_tokens"]` is the engine's own count.
Replies come back in the order of `suffixes`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableConfig

from .chat_model import ChatThaw
from .engine_loop import shared_prefix

Suffix = Union[BaseMessage, Sequence[BaseMessage]]


def fork_fanout(llm: ChatThaw, messages: Sequence[BaseMessage], suffixes: Sequence[Suffix],
                config: Optional[RunnableConfig] = None, **options) -> list[AIMessage]:
    if not suffixes:
        raise ValueError("fork_fanout needs at least one suffix")
    branches = [list(messages) + ([s] if isinstance(s, BaseMessage) else list(s)) for s in suffixes]
    prefix = shared_prefix([llm.prompt_ids(b) for b in branches])
    if prefix:
        llm.prefill(prefix)
    bound = llm.bind(**options) if options else llm
    # every branch in flight at once, so the engine loop serves them in one batch
    return bound.batch(branches, {**(config or {}), "max_concurrency": len(branches)})
