"""A fork-pool worker: `python -m thaw_format.sdk.pool_worker '<json config>'`, started by ForkPool.

Like a fork child (thaw_format.sdk.child) it starts one engine from a factory and its JSON arguments and
answers JSON lines on stdout (the engine's own printing goes to stderr). It stays warm across rounds: each
request {"source": "shm://...", "verified": true, "prompt": [...], "params": {...}} restores that KV snapshot
(`restore_source`: the engine reads it in place; `verified`: the pool has checked every chunk of it, so the
engine does not read them twice), then generates the prompt, and is answered with {"generation": {...},
"restore_s": ..., "generate_s": ..., "via": "segment"} or {"error": "..."}. End of input closes the engine.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from ..snapshot import SamplingParams
from .child import protocol_replies
from .engine_process import lead_own_group
from .factories import resolve
from .shared import restore_source


def run_round(engine, message: dict) -> dict:
    start = time.perf_counter()
    restore_source(engine, message["source"], verified=message.get("verified", False))
    restored = time.perf_counter()
    generation = engine.generate(message["prompt"], SamplingParams(**message["params"]))
    return {"generation": dataclasses.asdict(generation), "restore_s": restored - start,
            "generate_s": time.perf_counter() - restored, "via": "segment"}


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    reply = protocol_replies()
    try:  # a failure here is reported too
        lead_own_group(config["parent"])  # the processes its engine starts end with it (thaw_format.sdk.engine_process)
        engine = resolve(config["factory"])(**config["kwargs"])
    except Exception as exc:
        reply({"error": f"starting the pool engine: {type(exc).__name__}: {exc}"})
        return 1
    try:  # its engine is closed whatever happens from here: a parent gone meanwhile fails the first reply
        reply({"ready": True})
        for line in sys.stdin:
            try:
                reply(run_round(engine, json.loads(line)))
            except Exception as exc:  # reported to the pool, which raises it
                reply({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
