"""A fork child: `python -m thaw_vllm.child '<json config>'`.

Starts an engine whose weights and KV come from a snapshot (a path or shm://name), then answers JSON lines
on stdin ({"prompt": [...], "params": {...}}) with JSON lines on stdout. vLLM's own output goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else the engine prints stays off the protocol stream
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one engine per child, in this process

    from vllm import SamplingParams

    from . import api, transport
    from .identity import SNAPSHOT_KEY
    from .llm import LLM

    kwargs = dict(config["engine_kwargs"], load_format="thaw", model_loader_extra_config={SNAPSHOT_KEY: config["source"]})
    llm = LLM(config["model"], **kwargs)
    api.restore(llm, transport.read(config["source"]))
    from .fork import Child

    child = Child([], llm=llm)
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if message.get("ready"):
                reply = {"ready": True}
            else:
                done = child.generate(message["prompt"], SamplingParams(**message["params"]))
                reply = {"token_ids": done.token_ids, "num_cached_tokens": done.num_cached_tokens}
        except Exception as exc:  # reported to the parent, which raises it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        protocol.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
