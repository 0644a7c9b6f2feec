"""A new process resumes a durable thread:
`python resume_thread.py ENGINE MODEL_DIR STORE THREAD_ID MESSAGES_JSON` (ENGINE: one of engines.ENGINES).

Starts its own engine (nothing cached), runs one turn of the thread with ChatThaw over the same thread
store, and prints the reply's response_metadata as one JSON line "THAW_RESULT {...}".
"""

import json
import logging
import sys
from pathlib import Path

if __name__ == "__main__":  # vLLM's multiprocessing mode spawns processes that import this module
    from langchain_core.messages import messages_from_dict

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import engines
    from thaw_langgraph import ChatThaw

    logging.basicConfig(level=logging.INFO)
    name, model_dir, store, thread_id, messages_file = sys.argv[1:6]
    engine = engines.start(name, model_dir)
    chat = ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=16, thread_store=store)
    with open(messages_file) as f:
        messages = messages_from_dict(json.load(f))
    reply = chat.invoke(messages, thread_id=thread_id)
    print("THAW_RESULT " + json.dumps(reply.response_metadata), flush=True)
    engine.close()
