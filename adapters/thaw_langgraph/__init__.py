"""thaw_langgraph: LangChain / LangGraph on a thaw engine.

    from thaw_langgraph import ChatThaw, fork_fanout, ThreadStore
    llm = ChatThaw(engine=engine, tokenizer=model_dir, thread_store="s3://bucket/threads")

`ChatThaw` is a LangChain chat model (invoke, ainvoke, batch, stream, astream) whose concurrent calls are
served in one engine batch, a shared prefix computed once; `fork_fanout` runs branches of one conversation
from one prefill; `thread_store=` keeps each LangGraph thread's KV across evictions and process restarts.
Written against the adapter contract (thaw_format.sdk) alone: any contract engine with the "streaming"
capability (several requests in flight, each one's tokens and the engine's own cached-token count after every
step: `progress()`) serves ChatThaw. thaw_vllm, thaw_mlx, thaw_sglang and thaw_transformers have it.
"""

from thaw_format.extras import require

require("langchain_core", "langgraph", "thaw_langgraph")  # before the modules that import it: name the extra

from .chat_model import ChatThaw
from .fanout import fork_fanout
from .thread_store import ThreadStore

__all__ = ["ChatThaw", "ThreadStore", "fork_fanout"]
