"""fork_fanout: N branches of one conversation, the shared part prefilled once.

    replies = fork_fanout(llm, trunk_messages, [[HumanMessage("review security")], [HumanMessage("review style")]])
    replies = fork_fanout(llm, trunk_messages, suffixes, pool=pool)   # on a thaw_format.sdk.ForkPool's workers

The trunk is what `invoke` takes (a string is one human message); each suffix is one message (a message, a
string, a (role, text) tuple or a dict) or a list of them. Every branch's prompt is the trunk followed by its
suffix. The prompts' shared token prefix is computed into the engine's cache first, as one request.
In-process, every branch then runs at once (one batch in the engine) and reads that prefix from the cache.
With `pool=`, each round hands the prefix's KV pages to the pool's workers (a KV-only capture of the engine's
cache) and each worker continues one branch: the engine itself serves other calls meanwhile; more branches
than workers take several rounds. Either way each reply's `response_metadata["cached_tokens"]` is the count
of the engine that served it, and replies come back in the order of `suffixes`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, convert_to_messages
from langchain_core.runnables import RunnableConfig

from thaw_format.sdk.pool import parent_page_size
from thaw_format.sdk.shared import capture_shared

from .chat_model import ChatThaw
from .engine_loop import shared_prefix

Suffix = Union[BaseMessage, str, tuple, dict, Sequence[BaseMessage]]


def fork_fanout(llm: ChatThaw, messages: Union[str, Sequence[BaseMessage]], suffixes: Sequence[Suffix],
                config: Optional[RunnableConfig] = None, *, pool=None, **options) -> list[AIMessage]:
    if isinstance(suffixes, str):  # else each character would be a branch
        raise TypeError("fork_fanout takes a list of suffixes, one per branch: [suffix], not a string")
    if not suffixes:
        raise ValueError("fork_fanout needs at least one suffix")
    trunk = _conversation(messages)
    branches = [trunk + _conversation([s] if _one_message(s) else s) for s in suffixes]
    if pool is not None:
        return _on_pool(llm, pool, branches, options)
    prefix = shared_prefix([llm.prompt_ids(b) for b in branches])
    if prefix:
        llm.prefill(prefix)
    bound = llm.bind(**options) if options else llm
    # every branch in flight at once, so the engine loop serves them in one batch
    return bound.batch(branches, {**(config or {}), "max_concurrency": len(branches)})


def _conversation(messages) -> list[BaseMessage]:
    """Messages as LangChain's invoke reads them. A string is one human message: taken as a sequence, each of
    its characters would become a message of its own, a prompt nobody meant, answered without an error."""
    return [HumanMessage(messages)] if isinstance(messages, str) else convert_to_messages(messages)


def _one_message(suffix) -> bool:
    """A message as LangChain names one: a message, a string, a dict, or a (role, text) tuple."""
    return isinstance(suffix, (BaseMessage, str, dict)) or (isinstance(suffix, tuple) and len(suffix) == 2
                                                            and isinstance(suffix[0], str))


def _on_pool(llm: ChatThaw, pool, branches: list, options: dict) -> list[AIMessage]:
    params = llm._params(**options)  # unknown options are refused before anything runs
    prompts = [llm.chat_tokens.encode(b) for b in branches]
    prefix = shared_prefix([p.ids for p in prompts])
    parent = _LoopParent(llm)
    page = parent.page_size()
    if len(prefix) < page:  # the pool moves full pages only
        raise ValueError(f"fork_fanout with a pool needs branches that share at least {page} prompt tokens (a page "
                         f"of the engine's: the KV the workers take); these share {len(prefix)}: run it without pool=")
    llm.prefill(prefix)
    replies = []
    for start in range(0, len(prompts), pool.workers):
        chunk = prompts[start : start + pool.workers]
        round_ = pool.fork(parent, len(chunk), context=prefix, suffixes=[p.ids[len(prefix):] for p in chunk],
                           params=params)
        replies += [llm.reply(prompt, g.token_ids, g.cached_tokens) for prompt, g in zip(chunk, round_.generations)]
    return replies


class _LoopParent:
    """The parent a pool round reads: the engine's capture, run on its engine loop's thread between steps (the
    engine keeps serving other calls while the workers generate)."""

    def __init__(self, llm: ChatThaw) -> None:
        self._loop = llm._loop

    def capture_shared(self, *, chains=None) -> str:
        """The engine's own: the round took SharedKV's default over this class's capture(), which held the pages
        of the requests in flight (transformers) and skipped an engine's direct path into the segment (MLX)."""
        return self._loop.call(lambda engine: capture_shared(engine, chains=chains))

    def page_size(self) -> int:
        """The engine's page_size(), or the pool's TypeError naming an engine without one (not AttributeError)."""
        return self._loop.call(parent_page_size)
