"""thaw_langgraph: LangChain / LangGraph on a thaw engine.

    from thaw_langgraph import ChatThaw, fork_fanout, ThreadStore
    llm = ChatThaw(engine=engine, tokenizer=model_dir, thread_store="s3://bucket/threads")

`ChatThaw` is a LangChain chat model (invoke, ainvoke, batch, stream, astream) whose concurrent calls are
served in one engine batch, a shared prefix computed once; `fork_fanout` runs branches of one conversation
from one prefill; `thread_store=` keeps each LangGraph thread's KV across evictions and process restarts.
Written against the adapter contract (thaw_format.sdk), plus one method the contract lacks: `progress()`, a
request's tokens and the engine's cached-token count after each step (thaw_vllm's engine has it here, in
vllm_streaming.py); any contract engine that adds it can serve ChatThaw.
"""

from .chat_model import ChatThaw
from .fanout import fork_fanout
from .thread_store import ThreadStore

__all__ = ["ChatThaw", "ThreadStore", "fork_fanout"]
